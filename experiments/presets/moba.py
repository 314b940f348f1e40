"""`moba-tiny`: MoBA (Kimi, arXiv 2502.13189) in the `tiny` model, on 256-token sequences.

    python -m experiments.train --preset moba-tiny --workdir runs/moba-tiny
    python -m experiments.train --preset moba-tiny-hybrid   # last layer full attention

The `tiny` model (2 layers of width 32, 4 query heads in 2 kv groups of 8 dims) with MoBA in
every layer: blocks of 16 tokens, top-3 (the current block and two gated past blocks), so a
query at the end of a 256-token sequence reads 48 of its 256 keys — the paper's 81.25 %
sparsity of block 512 / top-3 at 8K, scaled down 32 times. `moba-tiny-hybrid` is the paper's
layer-wise hybrid (§3.3): MoBA first, full attention (GQA, same parameters) in the last layer.
"""

import dataclasses

from experiments.config import RunConfig
from experiments.presets import register_preset
from experiments.presets.base import tiny
from jaxmodels.attention.moba import MoBAConfig, layerwise_hybrid

MOBA_TINY = MoBAConfig(num_heads=4, num_kv_heads=2, head_dim=8, block_size=16, top_k=3)
SEQ_LEN = 256


def _tiny_with(**model_fields) -> RunConfig:
    base = tiny()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, **model_fields),
        data=dataclasses.replace(base.data, seq_len=SEQ_LEN),
    )


def moba_tiny() -> RunConfig:
    """`tiny` with MoBA in every layer (block 16, top-3), 256-token sequences."""
    return _tiny_with(layer_pattern=("moba",), attention={"moba": MOBA_TINY})


def moba_tiny_hybrid() -> RunConfig:
    """`moba-tiny` with full attention in the last layer (the paper's layer-wise hybrid)."""
    return _tiny_with(**layerwise_hybrid(MOBA_TINY, num_layers=2, num_full_layers=1))


register_preset("moba-tiny", moba_tiny)
register_preset("moba-tiny-hybrid", moba_tiny_hybrid)
