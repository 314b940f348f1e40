"""Dense softmax attention (pure functions): the reference einsum form and jax's fused form.

Shapes: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] with N = K * G (grouped-query attention,
G query heads per kv head; K = N is multi-head, K = 1 multi-query attention). Masks are boolean
[B, T, S] (True = may attend), built from positions so that the same code serves training
(positions 0..T-1 against themselves) and cached decoding (new positions against cache slots).
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("reference", "xla", "cudnn")


def causal_mask(
    q_positions_BT: jax.Array,
    kv_positions_BS: jax.Array,
    *,
    kv_valid_BS: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Boolean [B, T, S] mask: key s is visible to query t iff pos_s <= pos_t (and valid).

    Args:
      q_positions_BT: [B, T] positions of the queries.
      kv_positions_BS: [B, S] positions of the keys (cache slots hold their token's position).
      kv_valid_BS: optional [B, S] validity of key slots (False for empty cache slots).
      window: if set, also require pos_t - pos_s < window (sliding window incl. self).
    """
    q = q_positions_BT[:, :, None]
    kv = kv_positions_BS[:, None, :]
    mask_BTS = kv <= q
    if window is not None:
        mask_BTS &= q - kv < window
    if kv_valid_BS is not None:
        mask_BTS &= kv_valid_BS[:, None, :]
    return mask_BTS


def attention_logits(q_BTNH: jax.Array, k_BSKH: jax.Array, *, scale: float) -> jax.Array:
    """Scaled logits [B, K, G, T, S] in float32 (the grouped view of [B, N, T, S])."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    return logits * scale


def max_logits_per_head(
    q_BTNH: jax.Array, k_BSKH: jax.Array, mask_BTS: jax.Array, *, scale: float
) -> jax.Array:
    """Per-query-head maximum of the visible attention logits, [N] float32 (MuonClip's S_max).

    The logits are the ones that enter the softmax (scale included), maximised over batch, query
    and key positions; masked entries are ignored.
    """
    logits_BKGTS = attention_logits(q_BTNH, k_BSKH, scale=scale)
    masked = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -jnp.inf)
    return jnp.max(masked, axis=(0, 3, 4)).reshape(-1)


def attention_reference(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array | None,
    *,
    scale: float,
    sink_N: jax.Array | None = None,
) -> jax.Array:
    """The simplest correct attention: einsum logits, float32 softmax, einsum values.

    Args:
      sink_N: optional per-head learned sink logit (DeepSeek-V4 / gpt-oss attention sink): an extra
        logit in the softmax denominator whose value contributes nothing.

    Returns:
      [B, T, N, Hv] in q's dtype. Rows with no visible key return zeros.
    """
    B, T, N, _ = q_BTNH.shape
    K = k_BSKH.shape[2]
    logits_BKGTS = attention_logits(q_BTNH, k_BSKH, scale=scale)
    if mask_BTS is not None:
        logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -jnp.inf)
    row_max = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
    if sink_N is not None:
        sink_11KG11 = sink_N.astype(jnp.float32).reshape(1, K, N // K, 1, 1)
        row_max = jnp.maximum(row_max, sink_11KG11)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits_BKGTS - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    if sink_N is not None:
        denom = denom + jnp.exp(sink_11KG11 - row_max)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out_BTKGH = jnp.einsum(
        "BKGTS,BSKH->BTKGH",
        probs.astype(v_BSKH.dtype),
        v_BSKH,
        preferred_element_type=jnp.float32,
    )
    return out_BTKGH.reshape(B, T, N, -1).astype(q_BTNH.dtype)


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array | None = None,
    *,
    scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Softmax attention with a choice of implementation.

    Args:
      q_BTNH, k_BSKH, v_BSKH: queries, keys, values (N divisible by K).
      mask_BTS: boolean visibility (see `causal_mask`), or None for full attention.
      scale: logit scale, default H**-0.5.
      implementation: "reference" (`attention_reference`), "xla" or "cudnn" (both through
        `jax.nn.dot_product_attention`; cuDNN needs a GPU and equal q/v head dims).

    Returns:
      [B, T, N, Hv] in q's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise ValueError(
            f"query heads {q_BTNH.shape[2]} are not divisible by kv heads {k_BSKH.shape[2]}"
        )
    if scale is None:
        scale = q_BTNH.shape[-1] ** -0.5
    if implementation == "reference" or v_BSKH.shape[-1] != q_BTNH.shape[-1]:
        return attention_reference(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=scale)
    mask = None if mask_BTS is None else mask_BTS[:, None]
    out = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask, scale=scale, implementation=implementation
    )
    if mask_BTS is not None:  # rows with no visible key: zeros, as the reference form
        out = jnp.where(jnp.any(mask_BTS, axis=-1)[:, :, None, None], out, 0)
    return out
