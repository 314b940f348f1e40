"""Residual-kind presets: the `tiny` / `small` models with HC, mHC or AttnRes residuals.

    python -m experiments.train --preset small-mhc

Everything but `model.residual` is the base preset's, so runs compare like for like with
`tiny` / `small` (pre-norm).
"""

import dataclasses
from collections.abc import Callable

from experiments.config import RunConfig
from experiments.presets import register_preset
from experiments.presets.base import small, tiny
from jaxmodels.residual.attn_res import AttnResConfig
from jaxmodels.residual.hyper_connections import HyperConnectionsConfig
from jaxmodels.residual.mhc import MHCConfig


def with_residual(base: RunConfig, residual) -> RunConfig:
    """`base` with its model's residual kind replaced by `residual`."""
    return dataclasses.replace(base, model=dataclasses.replace(base.model, residual=residual))


def _residuals() -> dict[str, tuple[object, str]]:
    return {
        "hc": (
            HyperConnectionsConfig(hc_mult=4, dynamic=True),
            "dynamic Hyper-Connections, 4 streams (arXiv 2409.19606)",
        ),
        "mhc": (
            MHCConfig(hc_mult=4),
            "mHC as DeepSeek-V4 ships it, 4 streams, Sinkhorn 20 (arXiv 2512.24880)",
        ),
        "attnres": (
            AttnResConfig(mode="block", block_size=2),
            "Block Attention Residuals, one decoder layer per block (arXiv 2603.15031)",
        ),
        "attnres-full": (
            AttnResConfig(mode="full"),
            "Full Attention Residuals (arXiv 2603.15031)",
        ),
    }


def _register(base_name: str, base: Callable[[], RunConfig]) -> None:
    for suffix, (residual, what) in _residuals().items():

        def preset(residual=residual) -> RunConfig:
            return with_residual(base(), residual)

        register_preset(f"{base_name}-{suffix}", preset, f"`{base_name}` with {what}")


_register("tiny", tiny)
_register("small", small)
