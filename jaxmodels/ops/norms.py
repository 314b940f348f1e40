"""Normalisation ops (pure functions).

RMSNorm as in DeepSeek-V3 `inference/model.py` (`RMSNorm`, eps 1e-6) and Kimi Linear: the
statistic and the scaling are computed in float32 and the result is cast back to the input dtype.
"""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array | None = None, *, eps: float = 1e-6) -> jax.Array:
    """Root-mean-square normalisation over the last axis.

    Args:
      x: [..., D] input.
      scale: optional [D] gain (None: weightless, as DeepSeek-V4's q/hc norms).
      eps: added to the mean square before the square root.

    Returns:
      [..., D] in the dtype of `x`: `x / sqrt(mean(x^2) + eps) * scale`, computed in float32.
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """LayerNorm with gain and bias over the last axis, computed in float32.

    Used by DeepSeek-V3.2's lightning-indexer key (`k_norm`, a LayerNorm with bias).

    Args:
      x: [..., D]; scale, bias: [D].
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(
        jnp.float32
    )
    return y.astype(x.dtype)


def l2_normalize(x: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """Unit-L2 normalisation over the last axis (KDA/GDN q and k), computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype)
