"""Feed-forward ops (pure functions)."""

import jax
import jax.numpy as jnp


def swiglu(
    x_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array
) -> jax.Array:
    """SwiGLU feed-forward, `W_down (silu(x W_gate) * (x W_up))` (Shazeer 2020; DeepSeek-V3 `MLP`).

    Args:
      x_BTD: [B, T, D]; w_gate_DF, w_up_DF: [D, F]; w_down_FD: [F, D].

    Returns:
      [B, T, D].
    """
    gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate_DF)
    up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF, w_down_FD)
