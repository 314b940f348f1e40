"""Weight import from published checkpoints (Hugging Face layouts) into our parameters."""

from jaxmodels.weights.hf_deepseek import (
    load_mla_layers,
    mla_config_from_hf,
    mla_params_from_hf,
    mla_params_to_hf,
)
from jaxmodels.weights.hf_kimi_linear import (
    kda_config_from_hf,
    kda_params_from_hf,
    kda_params_to_hf,
    load_kda_layers,
)

__all__ = [
    "kda_config_from_hf",
    "kda_params_from_hf",
    "kda_params_to_hf",
    "load_kda_layers",
    "load_mla_layers",
    "mla_config_from_hf",
    "mla_params_from_hf",
    "mla_params_to_hf",
]
