"""Multi-head Latent Attention presets: the `tiny` / `small` models with MLA in every layer.

    python -m experiments.train --preset small-mla

Everything but `model.attention` is the base preset's, so runs compare like for like with
`tiny` / `small` (GQA). At `small` width (128) the MLA layer (DeepSeek-V3 layout: query
LoRA 96, latent 64, 4 heads of 32 nope + 16 rope dims, interleaved RoPE) has 73.7K parameters
against GQA's 65.5K, and caches 80 values per token per layer against GQA's 256.
"""

import dataclasses
from collections.abc import Callable

from experiments.config import RunConfig
from experiments.presets import register_preset
from experiments.presets.base import small, tiny
from jaxmodels.attention.mla import MLAConfig
from jaxmodels.config import RopeConfig

TINY_MLA = MLAConfig(
    num_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
)
SMALL_MLA = MLAConfig(
    num_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
)
# Kimi-Linear's MLA layers: no query LoRA, no positional encoding.
SMALL_MLA_NOPE = dataclasses.replace(
    SMALL_MLA, q_lora_rank=None, use_nope=True, rope=RopeConfig(layout="half")
)


def with_attention(base: RunConfig, attention: MLAConfig) -> RunConfig:
    """`base` with every layer's attention replaced by `attention` (label "mla")."""
    model = dataclasses.replace(base.model, layer_pattern=("mla",), attention={"mla": attention})
    return dataclasses.replace(base, model=model)


def _register(name: str, base: Callable[[], RunConfig], attention: MLAConfig, what: str):
    def preset() -> RunConfig:
        return with_attention(base(), attention)

    register_preset(name, preset, f"`{base.__name__}` with {what}")


_register("tiny-mla", tiny, TINY_MLA, "MLA in every layer (DeepSeek-V3 layout)")
_register(
    "small-mla", small, SMALL_MLA, "MLA in every layer (DeepSeek-V3 layout, arXiv 2405.04434)"
)
_register(
    "small-mla-nope", small, SMALL_MLA_NOPE, "NoPE MLA in every layer (Kimi-Linear's MLA layers)"
)
