"""Pre-norm residual (the baseline): `x + f(RMSNorm(x))` around every sub-layer."""

import dataclasses

import flax.linen as nn
import jax

from jaxmodels import registry
from jaxmodels.config import BlockSettings, ResidualConfig
from jaxmodels.layers import RMSNorm


@dataclasses.dataclass(frozen=True)
class PrenormConfig(ResidualConfig):
    kind = "prenorm"


class PrenormExpand(nn.Module):
    config: PrenormConfig
    settings: BlockSettings

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return x_BTD


class PrenormSublayer(nn.Module):
    """Owns the sub-layer's RMSNorm (`norm/scale`)."""

    config: PrenormConfig
    settings: BlockSettings

    def setup(self):
        self.norm = RMSNorm(eps=self.settings.norm_eps, param_dtype=self.settings.param_dtype)

    def read(self, x_BTD: jax.Array):
        return self.norm(x_BTD), None

    def write(self, x_BTD: jax.Array, y_BTD: jax.Array, ctx) -> jax.Array:
        del ctx
        return x_BTD + y_BTD.astype(x_BTD.dtype)


class PrenormCollapse(nn.Module):
    config: PrenormConfig
    settings: BlockSettings

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return x_BTD


registry.register_residual(
    PrenormConfig,
    expand_cls=PrenormExpand,
    sublayer_cls=PrenormSublayer,
    collapse_cls=PrenormCollapse,
)
