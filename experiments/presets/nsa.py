"""`nsa-tiny`: Native Sparse Attention (DeepSeek, arXiv 2502.11089) in the `tiny` model, on
256-token sequences.

    python -m experiments.train --preset nsa-tiny --workdir runs/nsa-tiny

The `tiny` model (2 layers of width 32, 4 query heads in 2 kv groups of 8 dims) with NSA in
every layer, its block sizes scaled down so that a 256-token sequence is sparse: compression
blocks l = 8 with stride d = 4 (φ an MLP of width 64), selection blocks l' = 16, n = 4 selected
(1 initial + 2 local + 1 chosen), window w = 32. A query at the end of a sequence reads 63
compressed entries, 64 selected and 32 window tokens.
"""

import dataclasses

from experiments.config import RunConfig
from experiments.presets import register_preset
from experiments.presets.base import tiny
from jaxmodels.attention.nsa import NSAConfig

NSA_TINY = NSAConfig(
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    cmp_block=8,
    cmp_stride=4,
    slc_block=16,
    num_selected=4,
    num_init=1,
    num_local=2,
    window=32,
    query_chunk=128,
)


def nsa_tiny() -> RunConfig:
    """`tiny` with NSA in every layer (l=8, d=4, l'=16, n=4, w=32), 256-token sequences."""
    base = tiny()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, layer_pattern=("nsa",), attention={"nsa": NSA_TINY}),
        data=dataclasses.replace(base.data, seq_len=256),
    )


register_preset("nsa-tiny", nsa_tiny)
