"""`hybrid`: the mission's pieces in one model; the main job's default.

    python -m experiments.train --workdir runs/default          # the default preset
    python -m experiments.train --preset hybrid --workdir runs/hybrid

Kimi Linear's attention stack (3 KDA : 1 NoPE MLA, the `kimi-linear` preset), DeepSeek-V4's
mHC residuals (4 streams, the `small-mhc` preset's) and Muon with Moonlight's RMS matching at
its best learning rate on the default data (1e-2; docs/results.md study 4). Width, depth and
data are the `small` preset's. One train step costs about 2.2x `small`'s on a CPU (KDA's
chunked form and mHC's four streams), so the run has 160 steps instead of 320 (warmup 15, the
same share): about the wall time of `small`'s 320. Study 6 (docs/results.md,
`python -m experiments.studies.hybrid_default`) measured it at equal wall time against
`small` (GQA, pre-norm, AdamW): 2.26 against 2.81 validation bits per byte, which made it the
default.
"""

import dataclasses

from experiments.config import RunConfig
from experiments.presets import register_preset
from experiments.presets.kimi_linear import kimi_linear
from jaxmodels.residual.mhc import MHCConfig

STEPS = 160


def hybrid() -> RunConfig:
    """`kimi-linear` (3 KDA : 1 NoPE MLA) with mHC residuals and Muon; the default run."""
    base = kimi_linear()
    model = dataclasses.replace(base.model, residual=MHCConfig(hc_mult=4))
    optimizer = dataclasses.replace(
        base.optimizer, name="muon", learning_rate=1e-2, warmup_steps=15
    )
    train = dataclasses.replace(base.train, steps=STEPS, eval_every=40, checkpoint_every=40)
    return dataclasses.replace(base, model=model, optimizer=optimizer, train=train)


register_preset("hybrid", hybrid)
