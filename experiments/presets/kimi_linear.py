"""`kimi-linear`: the Kimi Linear hybrid, three KDA layers for every NoPE MLA layer, at a size
that trains and decodes on a CPU in minutes.

    python -m experiments.train --preset kimi-linear --workdir runs/kimi-linear

Kimi Linear (arXiv 2510.26692 §4-5, reference/attention.md §5.4) interleaves Kimi Delta
Attention with MLA 3:1 and gives the MLA layers no positional encoding (the KDA layers carry
position). Everything but the attention is the `small` preset's, and the MLA layer is
`small-mla-nope`'s, so the run compares like for like with `small` (GQA) and `small-mla-nope`
(NoPE MLA in every layer). The KDA layers have 4 heads of 32 (as GQA's), conv kernel 4 and
chunk 64; only the MLA layer's cache grows with the context, the three KDA layers keep a
constant 4 x 32 x 32 fp32 state plus a 3-token conv window each.
"""

import dataclasses

from experiments.config import RunConfig
from experiments.presets import register_preset
from experiments.presets.base import small
from experiments.presets.mla import SMALL_MLA_NOPE
from jaxmodels.attention.kda import KDAConfig

SMALL_KDA = KDAConfig(num_heads=4, head_dim=32, conv_kernel_size=4, chunk_size=64)


def kimi_linear() -> RunConfig:
    """`small` with the Kimi Linear hybrid: 3 KDA : 1 NoPE MLA (arXiv 2510.26692)."""
    base = small()
    model = dataclasses.replace(
        base.model,
        layer_pattern=("kda", "kda", "kda", "mla"),
        attention={"kda": SMALL_KDA, "mla": SMALL_MLA_NOPE},
    )
    return dataclasses.replace(base, model=model)


register_preset("kimi-linear", kimi_linear)
