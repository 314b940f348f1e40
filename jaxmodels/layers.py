"""Small Linen building blocks with logical axis names on every parameter.

Parameter naming is part of the public contract (optimizer labels and weight import rely on it):
dense kernels are `kernel`, norm gains `scale`, the embedding table `embedding`.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.config import BlockSettings
from jaxmodels.ops.norms import rms_norm
from jaxmodels.ops.reductions import materialize_gradient
from sharding.rules import constrain


def dense(
    features: int | Sequence[int],
    kernel_axes: Sequence[str | None],
    settings: BlockSettings,
    *,
    axis: int | Sequence[int] = -1,
    name: str | None = None,
    use_bias: bool = False,
    init_std: float | None = None,
) -> nn.DenseGeneral:
    """A bias-free `nn.DenseGeneral` whose kernel carries logical axes `kernel_axes`.

    The kernel shape is (contracted input dims..., features...), e.g. a query projection
    `dense((N, H), ("embed", "heads", "head_dim"))` has kernel [D, N, H].
    """
    std = settings.init_std if init_std is None else init_std
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=settings.dtype,
        param_dtype=settings.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=std), tuple(kernel_axes)
        ),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), tuple(kernel_axes[-1:] if kernel_axes else ())
        ),
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain `scale` [D] (initialised to ones); float32 statistics."""

    eps: float = 1e-6
    param_dtype: Any = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return rms_norm(x, scale, eps=self.eps)


class Embed(nn.Module):
    """Token embedding `embedding` [V, D] with an optional tied output projection (`attend`)."""

    vocab_size: int
    settings: BlockSettings

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=self.settings.init_std), ("vocab", "embed")
            ),
            (self.vocab_size, self.settings.hidden_size),
            self.settings.param_dtype,
        )

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        x_BTD = jnp.take(jnp.asarray(self.embedding, self.settings.dtype), tokens_BT, axis=0)
        return constrain(x_BTD, ("batch", "length", "act_embed"))

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits [B, T, V] = x · embeddingᵀ (tied output head)."""
        return jnp.einsum("BTD,VD->BTV", x_BTD, jnp.asarray(self.embedding, x_BTD.dtype))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward block: gate_proj, up_proj [D, F] and down_proj [F, D] (HF names).

    Same math as `jaxmodels.ops.mlp.swiglu` (tested, values and gradients); the gate and up
    activations pass through `materialize_gradient`, so their gradients (the SiLU backward) are
    computed once rather than inside each matmul's transposed operand.
    """

    intermediate_size: int
    settings: BlockSettings

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        F = self.intermediate_size
        gate_BTF = dense(F, ("embed", "mlp"), self.settings, name="gate_proj")(x_BTD)
        up_BTF = dense(F, ("embed", "mlp"), self.settings, name="up_proj")(x_BTD)
        gate_BTF, up_BTF = materialize_gradient(gate_BTF), materialize_gradient(up_BTF)
        hidden_BTF = constrain(nn.silu(gate_BTF) * up_BTF, ("batch", "length", "act_mlp"))
        y_BTD = dense(self.settings.hidden_size, ("mlp", "embed"), self.settings, name="down_proj")(
            hidden_BTF
        )
        return constrain(y_BTD, ("batch", "length", "act_embed"))
