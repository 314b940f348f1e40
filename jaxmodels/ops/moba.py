"""MoBA — Mixture of Block Attention (Moonshot AI, arXiv 2502.13189), pure JAX.

Keys are split into blocks of ``block_size`` tokens (the last one may be partial). For each query
head and query position t in block ``c = t // block_size`` (paper §2.2; MoonshotAI/MoBA
``moba/moba_naive.py``):

* gate ``s_j = <q_t, mean(K[block j])>``, a raw float32 dot product (no scaling, no parameters);
* only blocks that are **entirely in the past** (``j < c``) compete; the current block ``c`` is
  always selected (like a shared expert) and attended causally; future blocks never are;
* ``top_k`` **counts the current block**: the current block plus the ``top_k - 1`` past blocks
  with the largest gate (paper footnote 3, ``moba_naive.py`` sets the current block's gate to
  +inf before its top-k);
* selection is per query head; with GQA (q [B, T, N, H], k/v [B, S, K, H], N = K * G) query head
  n reads kv head ``n // G`` — the same as repeating keys/values to the query heads, which is what
  the official Hugging Face wrapper does (``repeat_interleave`` before MoBA).

Attention over the selected tokens is ordinary softmax attention with scale ``H ** -0.5``.

Ties: blocks with equal gate values are ranked by ``jax.lax.top_k``, which prefers the lower block
index. Both forms below share `moba_select_blocks`, so their selections are identical. (The
official code keeps ``gate >= k-th value`` intersected with torch.topk's index set — also exactly
``top_k`` blocks, but which tied block wins is left to torch.topk.)

Forms:
  * `moba_attention_reference` — builds the [B, N, T, S] token mask and runs dense masked
    attention (the ``moba_naive.py`` algorithm). O(T * S) memory.
  * `moba_attention(implementation="efficient")` — attends only to the selected blocks: the
    current block causally (block-diagonal attention), the history blocks by regrouping queries
    per selected block and gathering that block (`block_sparse_attention`), the two parts merged
    by log-sum-exp (paper Algorithm 1, ``moba_efficient.py``). Memory O(T * top_k * block_size).
  * `moba_decode` — one new token against a key/value cache: gate over cached block means.

Dimension letters: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim,
P key blocks, k (lowercase) selected-block slots.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxmodels.ops.block_sparse import (
    banded_attention,
    block_means,
    block_sparse_attention,
    blocks_to_token_mask,
    ceil_div,
    default_scale,
    masked_attention,
    merge_attention,
)

Array = jax.Array

__all__ = [
    "moba_attention",
    "moba_attention_reference",
    "moba_block_means",
    "moba_decode",
    "moba_decode_tokens",
    "moba_gate_logits",
    "moba_mask",
    "moba_select_blocks",
    "moba_sparsity",
    "moba_update_block_means",
]


def _check(q_BTNH: Array, k_BSKH: Array, block_size: int, top_k: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (it counts the current block), got {top_k}")
    N, K = q_BTNH.shape[-2], k_BSKH.shape[-2]
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")


def moba_block_means(k_BSKH: Array, block_size: int) -> Array:
    """Mean-pooled keys per block, float32 [B, ceil(S / block_size), K, H] (partial last block
    averaged over its real tokens, as ``moba_naive.py``)."""
    return block_means(k_BSKH, block_size)


def moba_gate_logits(q_BTNH: Array, means_BPKH: Array) -> Array:
    """Gate affinities ``<q, mean_pool(K_block)>`` in float32, [B, T, N, P] (paper §2.2 eq. 5,
    unscaled like ``moba_naive.py``)."""
    B, T, N, H = q_BTNH.shape
    K = means_BPKH.shape[2]
    q_BTKGH = q_BTNH.astype(jnp.float32).reshape(B, T, K, N // K, H)
    gate = jnp.einsum("BTKGH,BPKH->BTKGP", q_BTKGH, means_BPKH.astype(jnp.float32))
    return gate.reshape(B, T, N, -1)


def moba_select_blocks(
    q_BTNH: Array,
    means_BPKH: Array,
    *,
    block_size: int,
    top_k: int,
    q_positions_BT: Array | None = None,
) -> tuple[Array, Array]:
    """The blocks each query head attends to.

    Args:
      q_BTNH: queries.
      means_BPKH: block means (`moba_block_means`); blocks not entirely before a query are
        ignored for that query, so a cache's incomplete blocks may hold anything.
      block_size, top_k: MoBA settings (``top_k`` includes the current block).
      q_positions_BT: query positions (default ``arange(T)``, prefill).

    Returns:
      ``(idx_BTNk, valid_BTNk)`` with ``k = min(top_k, P + 1)`` slots: slot 0 is the current
      block ``pos // block_size`` (always valid), slots 1.. the past blocks with the largest
      gates in decreasing order; a slot is invalid when fewer than ``top_k - 1`` blocks lie in
      the past.
    """
    B, T, N, _ = q_BTNH.shape
    P = means_BPKH.shape[1]
    if q_positions_BT is None:
        q_positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    cur_BT = (q_positions_BT // block_size).astype(jnp.int32)
    cur_BTN1 = jnp.broadcast_to(cur_BT[:, :, None, None], (B, T, N, 1))
    n_hist = min(top_k - 1, P)
    if n_hist == 0:
        return cur_BTN1, jnp.ones_like(cur_BTN1, dtype=jnp.bool_)
    gate_BTNP = moba_gate_logits(q_BTNH, means_BPKH)
    past_BTP = jnp.arange(P)[None, None, :] < cur_BT[:, :, None]
    gate_BTNP = jnp.where(past_BTP[:, :, None, :], gate_BTNP, -jnp.inf)
    vals, hist = jax.lax.top_k(gate_BTNP, n_hist)
    idx = jnp.concatenate([cur_BTN1, hist.astype(jnp.int32)], axis=-1)
    valid = jnp.concatenate([jnp.ones_like(cur_BTN1, jnp.bool_), vals > -jnp.inf], axis=-1)
    return idx, valid


def moba_mask(q_BTNH: Array, k_BSKH: Array, *, block_size: int, top_k: int) -> Array:
    """MoBA's token-level visibility for prefill (T == S), bool [B, N, T, S]: selected blocks
    intersected with the causal mask (step 5 of ``moba_naive.py``)."""
    _check(q_BTNH, k_BSKH, block_size, top_k)
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if T != S:
        raise ValueError(f"moba_mask is for prefill, T == S; got T={T}, S={S}")
    idx, valid = moba_select_blocks(
        q_BTNH, moba_block_means(k_BSKH, block_size), block_size=block_size, top_k=top_k
    )
    sel_BNTS = blocks_to_token_mask(idx, valid, block=block_size, seq_len=S)
    causal_TS = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    return sel_BNTS & causal_TS


def moba_attention_reference(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    *,
    block_size: int,
    top_k: int,
    scale: float | None = None,
) -> Array:
    """MoBA prefill, naive form: dense attention under `moba_mask` (``moba_naive.py``).

    Args:
      q_BTNH: queries [B, T, N, H]; k_BSKH, v_BSKH: [B, S, K, H] with S == T.
      block_size: key block length; top_k: blocks per query including the current one.
      scale: logit scale, default H ** -0.5.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    mask_BNTS = moba_mask(q_BTNH, k_BSKH, block_size=block_size, top_k=top_k)
    scale = default_scale(q_BTNH.shape[-1], scale)
    out, _ = masked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BNTS, scale=scale)
    return out.astype(q_BTNH.dtype)


def moba_attention(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    *,
    block_size: int,
    top_k: int,
    scale: float | None = None,
    implementation: Literal["efficient", "reference"] = "efficient",
    tile: int | None = None,
) -> Array:
    """MoBA prefill attention (causal, T == S).

    ``implementation="efficient"``: current block by block-diagonal causal attention, history
    blocks by per-block regrouped queries (`block_sparse_attention`, ``tile`` queries per
    gathered block), log-sum-exp merge (arXiv 2502.13189 Algorithm 1). ``"reference"``:
    `moba_attention_reference`. Both use the same block selection, so they agree to rounding.

    Args:
      q_BTNH: [B, T, N, H]; k_BSKH, v_BSKH: [B, S, K, H], S == T, N a multiple of K.
      block_size, top_k: MoBA settings (paper: 512 and 3 at 8K-32K; 4096 and 12 at 1M).
      scale: logit scale, default H ** -0.5.
      implementation: "efficient" or "reference".
      tile: rows per tile of the history gather (efficiency only; None = `auto_tile`).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    if implementation == "reference":
        return moba_attention_reference(
            q_BTNH, k_BSKH, v_BSKH, block_size=block_size, top_k=top_k, scale=scale
        )
    if implementation != "efficient":
        raise ValueError(
            f"implementation must be 'efficient' or 'reference', got {implementation!r}"
        )
    _check(q_BTNH, k_BSKH, block_size, top_k)
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if T != S:
        raise ValueError(f"moba_attention is for prefill, T == S; got T={T}, S={S}")
    scale = default_scale(q_BTNH.shape[-1], scale)
    out_cur, lse_cur = banded_attention(
        q_BTNH, k_BSKH, v_BSKH, block=block_size, num_prev_blocks=0, scale=scale
    )
    if top_k == 1 or ceil_div(S, block_size) == 1:
        return out_cur.astype(q_BTNH.dtype)
    idx, valid = moba_select_blocks(
        q_BTNH, moba_block_means(k_BSKH, block_size), block_size=block_size, top_k=top_k
    )
    out_hist, lse_hist = block_sparse_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        idx[..., 1:],
        valid[..., 1:],
        block=block_size,
        scale=scale,
        tile=tile,
        causal=False,  # history blocks end before the query's block starts
    )
    out, _ = merge_attention(jnp.stack([out_cur, out_hist]), jnp.stack([lse_cur, lse_hist]), axis=0)
    return out.astype(q_BTNH.dtype)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _lengths(cache_len, batch: int) -> Array:
    return jnp.broadcast_to(jnp.asarray(cache_len, jnp.int32), (batch,))


def moba_update_block_means(
    means_BPKH: Array, k_cache_BSKH: Array, cache_len_B: Array, *, block_size: int
) -> Array:
    """Refresh the block-mean cache after a token was written at position ``cache_len - 1``.

    When that token completes block ``p = cache_len // block_size - 1`` (``cache_len`` a multiple
    of ``block_size``), its mean is written to ``means[:, p]``; otherwise nothing changes. Only
    complete blocks are ever read by the gate, so this keeps `moba_decode` at O(top_k * block)
    key reads per step.

    Args:
      means_BPKH: float32 [B, P_max, K, H] block-mean cache.
      k_cache_BSKH: key cache [B, S_max, K, H] holding positions 0 .. cache_len - 1.
      cache_len_B: int [B] (or scalar) number of valid cache positions.
    """
    B = k_cache_BSKH.shape[0]
    lens = _lengths(cache_len_B, B)

    def one(means_PKH, k_SKH, length):
        p = jnp.maximum(length // block_size - 1, 0)
        blk = jax.lax.dynamic_slice_in_dim(k_SKH, p * block_size, block_size, axis=0)
        mean = blk.astype(jnp.float32).mean(axis=0)
        done = (length > 0) & (length % block_size == 0)
        new = jnp.where(done, mean, means_PKH[p])
        return means_PKH.at[p].set(new.astype(means_PKH.dtype))

    return jax.vmap(one)(means_BPKH, k_cache_BSKH, lens)


def moba_decode(
    q_BNH: Array,
    k_cache_BSKH: Array,
    v_cache_BSKH: Array,
    cache_len_B: Array,
    *,
    block_size: int,
    top_k: int,
    block_means_BPKH: Array | None = None,
    scale: float | None = None,
) -> Array:
    """MoBA attention of one new token at position ``cache_len - 1`` against a cache.

    The cache holds positions ``0 .. cache_len - 1`` (the new token's key/value already written).
    The block containing the new token — the partial last block of the cache, or a just
    completed one — is the current block and is always attended (causally: up to the new token);
    the ``top_k - 1`` complete past blocks with the largest gate ``<q, block mean>`` are added.
    This equals row ``cache_len - 1`` of `moba_attention` over the whole sequence. (The official
    release decodes with full attention; this is the paper's gate applied at decode time.)

    Args:
      q_BNH: the new token's queries [B, N, H].
      k_cache_BSKH, v_cache_BSKH: caches [B, S_max, K, H]; entries at or after ``cache_len``
        are ignored.
      cache_len_B: int [B] (or scalar) valid length including the new token.
      block_size, top_k: MoBA settings.
      block_means_BPKH: optional float32 block-mean cache (`moba_update_block_means`); computed
        from the whole key cache when omitted.
      scale: logit scale, default H ** -0.5.

    Returns:
      [B, N, H] in q's dtype.
    """
    _check(q_BNH, k_cache_BSKH, block_size, top_k)
    B = q_BNH.shape[0]
    scale = default_scale(q_BNH.shape[-1], scale)
    if block_means_BPKH is None:
        block_means_BPKH = moba_block_means(k_cache_BSKH, block_size)
    pos_B1 = (_lengths(cache_len_B, B) - 1)[:, None]
    q_B1NH = q_BNH[:, None]
    idx, valid = moba_select_blocks(
        q_B1NH, block_means_BPKH, block_size=block_size, top_k=top_k, q_positions_BT=pos_B1
    )
    out, _ = block_sparse_attention(
        q_B1NH,
        k_cache_BSKH,
        v_cache_BSKH,
        idx,
        valid,
        block=block_size,
        scale=scale,
        q_positions_BT=pos_B1,
        tile=1,
    )
    return out[:, 0].astype(q_BNH.dtype)


def moba_sparsity(seq_len: int, block_size: int, top_k: int) -> float:
    """The paper's sparsity figure ``1 - block_size * top_k / seq_len`` (§3.1;
    (512, 3, 8K) -> 81.25 %, (512, 3, 32K) -> 95.31 %)."""
    return 1.0 - block_size * top_k / seq_len


def moba_decode_tokens(context_len: int, block_size: int, top_k: int) -> int:
    """Keys read by one `moba_decode` step at context length ``context_len`` (the new token
    included): the current block's ``(context_len - 1) % block_size + 1`` tokens plus
    ``min(top_k - 1, complete past blocks)`` full blocks."""
    cur = (context_len - 1) // block_size
    return (context_len - 1) % block_size + 1 + min(top_k - 1, cur) * block_size
