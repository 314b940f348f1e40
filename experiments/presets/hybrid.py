"""`hybrid`: the mission's pieces in one model, at the default run's size.

    python -m experiments.train --preset hybrid --workdir runs/hybrid

Kimi Linear's attention stack (3 KDA : 1 NoPE MLA, the `kimi-linear` preset), DeepSeek-V4's
mHC residuals (4 streams, the `small-mhc` preset's) and Muon with Moonlight's RMS matching at
its best learning rate on the default run (1e-2, README "Muon vs AdamW on the default data");
everything else (width, depth, data, steps, schedule) is the `small` preset's, so it compares
like for like with the default run. Study 6 (docs/results.md) compares the two at equal wall
time; `small` stays the default until `hybrid` trains at least as well.
"""

import dataclasses

from experiments.config import RunConfig
from experiments.presets import register_preset
from experiments.presets.kimi_linear import kimi_linear
from jaxmodels.residual.mhc import MHCConfig


def hybrid() -> RunConfig:
    """`kimi-linear` (3 KDA : 1 NoPE MLA) with mHC residuals, trained with Muon."""
    base = kimi_linear()
    model = dataclasses.replace(base.model, residual=MHCConfig(hc_mult=4))
    optimizer = dataclasses.replace(base.optimizer, name="muon", learning_rate=1e-2)
    return dataclasses.replace(base, model=model, optimizer=optimizer)


register_preset("hybrid", hybrid)
