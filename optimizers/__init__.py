"""Optax transformations: Muon (Newton–Schulz schedules, Moonlight RMS matching, decoupled
weight decay, stacked/per-head weights), QK-Clip (MuonClip), and parameter routing.

Nothing here imports Flax: everything works on any pytree of arrays.

    import optimizers
    tx = optimizers.muon(3e-4, weight_decay=0.1)              # Muon + AdamW by name rules
    tx = optax.chain(tx, optimizers.qk_clip({("params", "layers", "attn"):
                                             optimizers.mha_targets(16, 4)}))
"""

from optimizers.labels import (
    ADAM,
    DEFAULT_RULES,
    MUON,
    MuonDimensionNumbers,
    MuonRules,
    leaf_dimension_numbers,
    leaf_label,
    muon_dimension_numbers,
    muon_labels,
)
from optimizers.muon import MuonState, muon, scale_by_muon, update_scale
from optimizers.newton_schulz import (
    DION,
    POLAR_EXPRESS,
    SCHEDULES,
    STABILISING,
    STANDARD,
    newton_schulz,
    ns_schedule,
    polar_factor,
)
from optimizers.qk_clip import (
    QKClipState,
    QKClipTarget,
    clip_factors,
    collect_max_logits,
    mha_targets,
    mla_targets,
    qk_clip,
)

__all__ = [
    "ADAM",
    "DEFAULT_RULES",
    "DION",
    "MUON",
    "POLAR_EXPRESS",
    "SCHEDULES",
    "STABILISING",
    "STANDARD",
    "MuonDimensionNumbers",
    "MuonRules",
    "MuonState",
    "QKClipState",
    "QKClipTarget",
    "clip_factors",
    "collect_max_logits",
    "leaf_dimension_numbers",
    "leaf_label",
    "mha_targets",
    "mla_targets",
    "muon",
    "muon_dimension_numbers",
    "muon_labels",
    "newton_schulz",
    "ns_schedule",
    "polar_factor",
    "qk_clip",
    "scale_by_muon",
    "update_scale",
]
