"""Attention Residuals (AttnRes; Kimi Team, arXiv 2603.15031): softmax attention over depth.

Instead of the Pre-Norm sum ``h_l = e + sum_{i<l} f_i``, each sublayer reads

    h_l = sum_s alpha_{s->l} v_s,    alpha_{.->l} = softmax_s( w_l . RMSNorm(v_s) )

over a set of *sources* ``v_s`` with one learned pseudo-query ``w_l`` [D] per sublayer
(zero-initialised, so the first read is the uniform average). Keys are the RMS-normalised values
(optionally with an RMSNorm gain). The softmax runs in float32.

* Full AttnRes: sources = the token embedding and every previous sublayer output.
* Block AttnRes with block size S: sources = the embedding, the sums of each *completed* block of
  S sublayer outputs, and the partial sum of the current block if it is non-empty (reference notes
  §9.1 and oracle 26). Block size 1 is Full AttnRes.

References read: fla ``fla/ops/attnres/naive.py`` (``naive_attnres``: same scoring, ``rms_norm``
with weight then ``query``), MaxText ``src/maxtext/layers/attn_res.py`` (static buffer + mask; its
K3 variant has a different source set), the AttnRes README pseudocode quoted in the notes.

For ``jit`` / ``nn.scan`` the sources live in a static-size buffer carried as :class:`AttnResState`;
unused slots are masked and get weight exactly 0. A decoder uses it as::

    state = attn_res_state_init(embed_BTD, attn_res_max_sources(num_sublayers, block_size))
    for each sublayer l (attention and MLP separately):
        h_BTD = attn_res_read(state, query_l_D, norm_scale_l_D)
        out_BTD = sublayer_l(norm_l(h_BTD))
        state = attn_res_push(state, out_BTD, block_size)
    final_BTD = attn_res_read(state, query_out_D, norm_scale_out_D)   # before the final norm

Parameter shapes a module owns per read: ``query`` [D] (zero init), ``norm_scale`` [D] (ones init)
or None for an unscaled key norm.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmodels.ops.reductions import weighted_sum

_HIGHEST = jax.lax.Precision.HIGHEST
_MASKED = float(jnp.finfo(jnp.float32).min)


def _depth_logits(
    values_SD: jax.Array, query_D: jax.Array, norm_scale_D: jax.Array | None, eps: float
) -> jax.Array:
    """``RMSNorm(v) . query`` over the last axis, float32, without materialising the keys:
    ``(v . (g * q)) * rsqrt(mean(v^2) + eps)``. [..., D] -> [...]."""
    v = values_SD.astype(jnp.float32)
    w = query_D.astype(jnp.float32)
    if norm_scale_D is not None:
        w = w * norm_scale_D.astype(jnp.float32)
    dots = jnp.einsum("...d,d->...", v, w, precision=_HIGHEST)
    return dots * jax.lax.rsqrt(jnp.mean(jnp.square(v), axis=-1) + eps)


def depth_attention(
    sources_SBTD: jax.Array,
    valid_mask_S: jax.Array | None,
    query_D: jax.Array,
    norm_scale_D: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    return_weights: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax over sources of ``RMSNorm(source) . query``, then the weighted sum of the sources.

    Args:
      sources_SBTD: [S, ..., D] stacked sources (static buffer; any leading axes after S).
      valid_mask_S: [S] bool, False for empty buffer slots (their weight is exactly 0), or None.
      query_D: [D] pseudo-query ``w_l``.
      norm_scale_D: optional [D] key RMSNorm gain (fla ``rms_weight``); None = unscaled.
      eps: key RMSNorm eps.
      return_weights: also return the depth weights.

    Returns:
      out [..., D] in the sources' dtype (weights and sum in float32); with ``return_weights``
      also weights [S, ...] float32 (sum to 1 over valid slots, 0 elsewhere).
    """
    logits = _depth_logits(sources_SBTD, query_D, norm_scale_D, eps)  # [S, ...]
    if valid_mask_S is not None:
        mask = valid_mask_S.reshape(valid_mask_S.shape + (1,) * (logits.ndim - 1))
        logits = jnp.where(mask, logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=0)
    if valid_mask_S is not None:
        weights = jnp.where(mask, weights, 0.0)
    out = weighted_sum(weights, sources_SBTD, 0).astype(sources_SBTD.dtype)
    return (out, weights) if return_weights else out


def depth_attention_reference(
    sources: Sequence[jax.Array],
    query_D: jax.Array,
    norm_scale_D: jax.Array | None = None,
    *,
    eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """Simplest form over a Python list of sources (no buffer, no mask): materialised keys
    ``RMSNorm(v) * g``, logits ``k . q``, float32 softmax. Returns (out [..., D], weights [S, ...]).
    """
    v = jnp.stack([s.astype(jnp.float32) for s in sources])
    k = v * jax.lax.rsqrt(jnp.mean(jnp.square(v), axis=-1, keepdims=True) + eps)
    if norm_scale_D is not None:
        k = k * norm_scale_D.astype(jnp.float32)
    p = jax.nn.softmax(jnp.sum(k * query_D.astype(jnp.float32), axis=-1), axis=0)
    out = jnp.sum(p[..., None] * v, axis=0)
    return out.astype(sources[0].dtype), p


def block_sources(
    embedding_BTD: jax.Array, outputs: Sequence[jax.Array], block_size: int
) -> list[jax.Array]:
    """Reference source list after the given sublayer outputs (oracle 26), as plain Python.

    ``[embedding, sum of block 1, ..., sum of block n, partial sum of the current block]``, the
    last entry only if the current block is non-empty. ``block_size=1`` gives Full AttnRes:
    ``[embedding, o_1, ..., o_k]``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    srcs = [embedding_BTD]
    for start in range(0, len(outputs), block_size):
        block = outputs[start : start + block_size]
        total = block[0]
        for o in block[1:]:
            total = total + o
        srcs.append(total)
    return srcs


class AttnResState(NamedTuple):
    """Depth-attention sources carried through a decoder (a pytree; fixed shapes for scan).

    Attributes:
      sources_SBTD: [max_sources, B, T, D]: slot 0 the embedding, slots ``1..num_sources-1`` the
        completed block sums (Full AttnRes: the sublayer outputs), the rest zeros (masked).
      num_sources: int32 [] number of filled slots (>= 1).
      partial_BTD: [B, T, D] sum of the current block's outputs so far.
      partial_count: int32 [] number of outputs in ``partial_BTD`` (0 = empty, masked).
    """

    sources_SBTD: jax.Array
    num_sources: jax.Array
    partial_BTD: jax.Array
    partial_count: jax.Array


def attn_res_max_sources(num_sublayers: int, block_size: int) -> int:
    """Buffer slots needed for ``num_sublayers`` pushes: ``1 + num_sublayers // block_size``
    (the embedding plus every block that can complete; the partial block has its own slot)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    return 1 + num_sublayers // block_size


def attn_res_state_init(
    x_BTD: jax.Array, max_sources: int, *, dtype: jnp.dtype | None = None
) -> AttnResState:
    """State holding only the embedding ``x_BTD`` as source 0.

    Args:
      x_BTD: [B, T, D] token embedding (any leading axes).
      max_sources: static buffer size, see :func:`attn_res_max_sources`.
      dtype: buffer dtype (default x's; float32 avoids bf16 rounding in block sums).
    """
    if max_sources < 1:
        raise ValueError(f"max_sources must be >= 1, got {max_sources}.")
    dtype = x_BTD.dtype if dtype is None else dtype
    x = x_BTD.astype(dtype)
    buf = jnp.zeros((max_sources, *x.shape), dtype).at[0].set(x)
    return AttnResState(
        sources_SBTD=buf,
        num_sources=jnp.asarray(1, jnp.int32),
        partial_BTD=jnp.zeros_like(x),
        partial_count=jnp.asarray(0, jnp.int32),
    )


def attn_res_push(
    state: AttnResState, layer_output_BTD: jax.Array, block_size: int
) -> AttnResState:
    """Add one sublayer output: accumulate into the current block; when the block has
    ``block_size`` outputs, store its sum in the next buffer slot and start an empty block.

    Works under ``jit``/``scan`` (``block_size`` is static; the slot index is traced). The buffer
    must have room (see :func:`attn_res_max_sources`); an overflowing write lands in the last slot.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    partial = state.partial_BTD + layer_output_BTD.astype(state.partial_BTD.dtype)
    count = state.partial_count + 1
    complete = count >= block_size
    slot = state.num_sources
    current = jax.lax.dynamic_index_in_dim(state.sources_SBTD, slot, 0, keepdims=False)
    sources = jax.lax.dynamic_update_index_in_dim(
        state.sources_SBTD, jnp.where(complete, partial, current), slot, 0
    )
    return AttnResState(
        sources_SBTD=sources,
        num_sources=jnp.where(complete, slot + 1, slot).astype(jnp.int32),
        partial_BTD=jnp.where(complete, jnp.zeros_like(partial), partial),
        partial_count=jnp.where(complete, 0, count).astype(jnp.int32),
    )


def attn_res_sources(state: AttnResState) -> tuple[jax.Array, jax.Array]:
    """All sources as one buffer: ([max_sources + 1, B, T, D], valid [max_sources + 1] bool);
    the last slot is the partial block sum, valid when non-empty."""
    s = state.sources_SBTD.shape[0]
    valid = jnp.concatenate(
        [jnp.arange(s) < state.num_sources, (state.partial_count > 0)[None]], axis=0
    )
    return jnp.concatenate([state.sources_SBTD, state.partial_BTD[None]], axis=0), valid


def attn_res_read(
    state: AttnResState,
    query_D: jax.Array,
    norm_scale_D: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    return_weights: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The next sublayer's input: :func:`depth_attention` over the state's valid sources.

    Same result as ``depth_attention(*attn_res_sources(state), query_D, norm_scale_D)`` without
    copying the buffer: the partial block is scored separately and joined in the softmax.

    Returns:
      out [B, T, D] (buffer dtype); with ``return_weights`` also weights [max_sources + 1, B, T]
      (slot order of :func:`attn_res_sources`; masked slots exactly 0).
    """
    s = state.sources_SBTD.shape[0]
    logits_buf = _depth_logits(state.sources_SBTD, query_D, norm_scale_D, eps)  # [S, B, T]
    logit_part = _depth_logits(state.partial_BTD, query_D, norm_scale_D, eps)  # [B, T]
    logits = jnp.concatenate([logits_buf, logit_part[None]], axis=0)
    valid = jnp.concatenate(
        [jnp.arange(s) < state.num_sources, (state.partial_count > 0)[None]], axis=0
    )
    mask = valid.reshape(valid.shape + (1,) * (logits.ndim - 1))
    weights = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=0)
    weights = jnp.where(mask, weights, 0.0)
    out = weighted_sum(weights[:s], state.sources_SBTD, 0)
    out = out + weights[s][..., None] * state.partial_BTD.astype(jnp.float32)
    out = out.astype(state.sources_SBTD.dtype)
    return (out, weights) if return_weights else out
