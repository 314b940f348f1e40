"""Weight import from published checkpoints (Hugging Face layouts) into our parameters."""

from jaxmodels.weights.hf_deepseek import (
    load_mla_layers,
    mla_config_from_hf,
    mla_params_from_hf,
    mla_params_to_hf,
)

__all__ = ["load_mla_layers", "mla_config_from_hf", "mla_params_from_hf", "mla_params_to_hf"]
