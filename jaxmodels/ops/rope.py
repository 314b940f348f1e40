"""Rotary position embedding with YaRN frequency interpolation (pure functions).

Follows DeepSeek-V3 `inference/model.py` (`precompute_freqs_cis`, `apply_rotary_emb`) and the
Hugging Face `deepseek_v3` port (`yarn_get_mscale`, `mscale_all_dim`); equations in
reference/attention.md §1.4 and YaRN (Peng et al. 2023, arXiv 2309.00071).

Two layouts of the rotary dims R (R even):
  * "interleaved": pairs are adjacent dims (2m, 2m+1), as DeepSeek's demo code (complex view);
  * "half": pairs are (m, m + R/2), the "rotate_half" layout of Llama / Hugging Face.
Permuting the R columns of the projections from pairs to [evens, odds] turns one into the other
(`interleaved_to_half_permutation`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("interleaved", "half")


def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
    """Base inverse frequencies `theta^(-2m/dim)`, m = 0..dim/2-1, as float64 numpy [dim/2]."""
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def yarn_correction_range(
    dim: int, theta: float, original_max_position: int, beta_fast: float, beta_slow: float
) -> tuple[int, int]:
    """Frequency indices where YaRN's interpolation ramp starts and ends.

    `cd(r) = dim * ln(original / (2 pi r)) / (2 ln theta)`, low = floor(cd(beta_fast)),
    high = ceil(cd(beta_slow)), both clamped to [0, dim - 1] (DeepSeek-V3 `find_correction_range`,
    including its clamp to dim - 1). DeepSeek-V3 (64, 1e4, 4096, 32, 1) gives (10, 23).
    """

    def correction_dim(num_rotations: float) -> float:
        return (
            dim
            * math.log(original_max_position / (num_rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low = math.floor(correction_dim(beta_fast))
    high = math.ceil(correction_dim(beta_slow))
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(
    dim: int,
    theta: float,
    factor: float,
    original_max_position: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:
    """YaRN-interpolated inverse frequencies [dim/2] (float64 numpy).

    Indices <= low keep their frequency; indices >= high are divided by `factor`; a linear ramp
    in between: `f' = f / factor * ramp + f * (1 - ramp)`.
    """
    base = rope_inv_freq(dim, theta)
    low, high = yarn_correction_range(dim, theta, original_max_position, beta_fast, beta_slow)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return base / factor * ramp + base * (1.0 - ramp)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention-entropy factor `0.1 * mscale * ln(factor) + 1` (1 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(
    qk_head_dim: int, *, yarn_factor: float | None = None, mscale_all_dim: float = 1.0
) -> float:
    """Softmax temperature `qk_head_dim^-0.5 * mscale^2` (the square: mscale applies to q and k).

    DeepSeek-V3: qk_head_dim 192, factor 40, mscale_all_dim 1 -> 0.1352338.
    """
    scale = qk_head_dim**-0.5
    if yarn_factor is not None:
        scale *= yarn_mscale(yarn_factor, mscale_all_dim) ** 2
    return scale


def interleaved_to_half_permutation(dim: int) -> np.ndarray:
    """Column order [0, 2, 4, ..., 1, 3, 5, ...] mapping interleaved pairs to the half layout."""
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def apply_rope(
    x: jax.Array,
    positions_BT: jax.Array,
    inv_freq: jax.Array | np.ndarray,
    *,
    layout: str = "half",
    attention_scaling: float = 1.0,
) -> jax.Array:
    """Rotates the last axis of `x` by position-dependent angles.

    Args:
      x: [B, T, ..., R] (any number of axes between T and R, e.g. heads).
      positions_BT: [B, T] integer positions (negative positions rotate backwards, which is how
        DeepSeek-V4's inverse RoPE on the attention output is expressed).
      inv_freq: [R/2] inverse frequencies (`rope_inv_freq` or `yarn_inv_freq`).
      layout: "interleaved" (pairs 2m, 2m+1) or "half" (pairs m, m + R/2).
      attention_scaling: multiplies cos and sin (Hugging Face's YaRN `mscale / mscale_all_dim`).

    Returns:
      Same shape and dtype as `x`; the rotation is computed in float32.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    dim = x.shape[-1]
    if dim % 2 or len(inv_freq) * 2 != dim:
        raise ValueError(f"rotary dim {dim} must be even and equal 2 * len(inv_freq)")
    angles_BTR2 = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    extra = x.ndim - 3  # axes between T and R
    angles_BTR2 = angles_BTR2.reshape(angles_BTR2.shape[:2] + (1,) * extra + (dim // 2,))
    cos = jnp.cos(angles_BTR2) * attention_scaling
    sin = jnp.sin(angles_BTR2) * attention_scaling
    x32 = x.astype(jnp.float32)
    if layout == "interleaved":
        x_even, x_odd = x32[..., 0::2], x32[..., 1::2]
        out = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
        out = out.reshape(x.shape)
    else:
        x_lo, x_hi = x32[..., : dim // 2], x32[..., dim // 2 :]
        out = jnp.concatenate([x_lo * cos - x_hi * sin, x_lo * sin + x_hi * cos], axis=-1)
    return out.astype(x.dtype)
