"""Shared pieces of block-sparse attention (MoBA, NSA): softmax with log-sum-exp, LSE merging,
block pooling, banded (local / sliding-window) attention and gather attention over selected
key blocks.

Every attention function here returns an **unnormalised-merge-ready pair** ``(out, lse)``: ``out``
is the softmax-normalised attention output over the keys that function saw, in float32, and
``lse`` the float32 log-sum-exp of the (scaled) logits over those keys, ``-inf`` where the query
saw no key (then ``out`` is 0). Two such partial results over disjoint key sets combine exactly
into attention over the union with `merge_attention` (the online-softmax / flash-attention
combination; MoBA arXiv 2502.13189 Algorithm 1 merges its current-block and history parts this
way, MoonshotAI/MoBA ``moba/moba_efficient.py``).

Dimension letters (beyond the project table): P key blocks, Q position inside a key block,
J selection groups (heads that share one block selection; J = N for MoBA's per-head selection,
J = K for NSA's per-GQA-group selection), R query heads per selection group (N = J * R),
n selected-block slots, I tiles, Y rows per tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "banded_attention",
    "block_means",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "blocks_to_token_mask",
    "masked_attention",
    "merge_attention",
    "softmax_with_lse",
]


# --------------------------------------------------------------------------------------------
# Softmax pieces
# --------------------------------------------------------------------------------------------


def softmax_with_lse(logits: Array, mask: Array) -> tuple[Array, Array]:
    """Masked softmax over the last axis, returning ``(probs, lse)`` in float32.

    Rows with no visible entry give ``probs = 0`` and ``lse = -inf`` (and finite gradients).

    Args:
      logits: [..., S] scaled logits (any float dtype; computed in float32).
      mask: boolean, broadcastable to ``logits``; True = visible.
    """
    logits = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    has_any = denom > 0
    safe = jnp.where(has_any, denom, 1.0)
    probs = weights / safe
    lse = jnp.where(has_any, row_max + jnp.log(safe), -jnp.inf)
    return probs, lse[..., 0]


def merge_attention(outs: Array, lses: Array, axis: int = 0) -> tuple[Array, Array]:
    """Combine partial attention results over disjoint key sets (log-sum-exp merge).

    ``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i lse_i``; parts with
    ``lse_i = -inf`` contribute nothing, and if every part is empty the result is ``(0, -inf)``.

    Args:
      outs: [..., H] partial outputs stacked along ``axis`` (which indexes the parts).
      lses: matching log-sum-exps, ``outs.shape[:-1]``.
      axis: the parts axis (counted on ``lses``; must not be the trailing ``H`` of ``outs``).

    Returns:
      ``(out, lse)`` with the parts axis removed, float32.
    """
    axis = axis % lses.ndim
    lses = lses.astype(jnp.float32)
    top = jnp.max(lses, axis=axis, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lses - top)
    denom = jnp.sum(w, axis=axis, keepdims=True)
    has_any = denom > 0
    safe = jnp.where(has_any, denom, 1.0)
    out = jnp.sum(outs.astype(jnp.float32) * (w / safe)[..., None], axis=axis)
    lse = jnp.where(has_any, top + jnp.log(safe), -jnp.inf)
    return out, jnp.squeeze(lse, axis)


# --------------------------------------------------------------------------------------------
# Block pooling and masks
# --------------------------------------------------------------------------------------------


def block_means(x_BSKH: Array, block: int) -> Array:
    """Mean of each length-``block`` block along S, float32 [B, ceil(S/block), K, H].

    The last block may be partial; it is averaged over its real tokens (as
    MoonshotAI/MoBA ``moba_naive.py`` does for its key-gate weights).
    """
    B, S, K, H = x_BSKH.shape
    P = -(-S // block)
    pad = P * block - S
    x = jnp.pad(x_BSKH.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    sums_BPKH = x.reshape(B, P, block, K, H).sum(axis=2)
    counts_P = jnp.minimum(block, S - jnp.arange(P) * block).astype(jnp.float32)
    return sums_BPKH / counts_P[None, :, None, None]


def blocks_to_token_mask(idx_BTJn: Array, valid_BTJn: Array, *, block: int, seq_len: int) -> Array:
    """Token-level visibility [B, J, T, S] of the selected key blocks (no causal mask applied).

    Args:
      idx_BTJn: int block indices per query and selection group.
      valid_BTJn: which slots hold a real selection.
      block: key block length; key s belongs to block ``s // block``.
      seq_len: S.
    """
    P = -(-seq_len // block)
    onehot = jax.nn.one_hot(idx_BTJn, P, dtype=jnp.bool_) & valid_BTJn[..., None]
    sel_BTJP = jnp.any(onehot, axis=-2)
    blk_S = jnp.arange(seq_len) // block
    return jnp.transpose(sel_BTJP[..., blk_S], (0, 2, 1, 3))


# --------------------------------------------------------------------------------------------
# Dense masked attention (the reference building block)
# --------------------------------------------------------------------------------------------


def masked_attention(
    q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask: Array, *, scale: float
) -> tuple[Array, Array]:
    """Dense attention with an arbitrary per-head mask; returns ``(out_BTNH, lse_BTN)`` fp32.

    Args:
      q_BTNH: queries; N = K * G (GQA, query head n uses kv head n // G).
      k_BSKH, v_BSKH: keys and values.
      mask: boolean broadcastable to [B, N, T, S] (True = visible).
      scale: logit scale.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    S = k_BSKH.shape[1]
    mask_BKGTS = jnp.broadcast_to(mask, (B, N, T, S)).reshape(B, K, N // K, T, S)
    probs, lse_BKGT = softmax_with_lse(logits * scale, mask_BKGTS)
    out = jnp.einsum(
        "BKGTS,BSKH->BTKGH", probs.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=jnp.float32
    )
    lse_BTN = jnp.transpose(lse_BKGT, (0, 3, 1, 2)).reshape(B, T, N)
    return out.reshape(B, T, N, -1), lse_BTN


# --------------------------------------------------------------------------------------------
# Banded attention: current block (MoBA) and sliding window (NSA)
# --------------------------------------------------------------------------------------------


def banded_attention(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    *,
    block: int,
    num_prev_blocks: int,
    window: int | None = None,
    scale: float,
) -> tuple[Array, Array]:
    """Causal attention restricted to the query's own block and ``num_prev_blocks`` before it.

    Queries and keys are the same positions (prefill, T == S). Query t in block c = t // block
    sees keys s with ``(c - num_prev_blocks) * block <= s <= t`` and, if ``window`` is given,
    ``t - window < s`` (a sliding window of ``window`` keys including itself). Cost and memory
    are O(T * (num_prev_blocks + 1) * block) per head instead of O(T^2).

    * MoBA's current-block part: ``num_prev_blocks=0, window=None``.
    * Sliding window w: ``num_prev_blocks = ceil((w - 1) / block)``, ``window=w``.

    Returns:
      ``(out_BTNH, lse_BTN)`` float32.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if S != T:
        raise ValueError(f"banded_attention needs T == S (prefill); got T={T}, S={S}")
    G = N // K
    P = -(-T // block)
    pad = P * block - T
    span = (num_prev_blocks + 1) * block

    def blocks(x):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape((B, P, block) + x.shape[2:])

    q_BPQKGH = blocks(q_BTNH).reshape(B, P, block, K, G, H)
    k_BPQKH, v_BPQKH = blocks(k_BSKH), blocks(v_BSKH)
    if num_prev_blocks:
        front = ((0, 0), (num_prev_blocks, 0), (0, 0), (0, 0), (0, 0))
        k_pad, v_pad = jnp.pad(k_BPQKH, front), jnp.pad(v_BPQKH, front)
        # key span of query block c: blocks c - num_prev_blocks .. c, concatenated along Q.
        k_span = jnp.concatenate([k_pad[:, r : r + P] for r in range(num_prev_blocks + 1)], 2)
        v_span = jnp.concatenate([v_pad[:, r : r + P] for r in range(num_prev_blocks + 1)], 2)
    else:
        k_span, v_span = k_BPQKH, v_BPQKH
    logits = jnp.einsum(
        "BPQKGH,BPXKH->BKGPQX", q_BPQKGH, k_span, preferred_element_type=jnp.float32
    )
    q_pos_PQ = jnp.arange(P * block).reshape(P, block)
    k_pos_PX = (jnp.arange(P)[:, None] - num_prev_blocks) * block + jnp.arange(span)[None, :]
    mask_PQX = (k_pos_PX[:, None, :] <= q_pos_PQ[:, :, None]) & (k_pos_PX[:, None, :] >= 0)
    if window is not None:
        mask_PQX &= k_pos_PX[:, None, :] > q_pos_PQ[:, :, None] - window
    probs, lse_BKGPQ = softmax_with_lse(logits * scale, mask_PQX)
    out = jnp.einsum(
        "BKGPQX,BPXKH->BPQKGH", probs.astype(v_span.dtype), v_span,
        preferred_element_type=jnp.float32,
    )
    out_BTNH = out.reshape(B, P * block, N, -1)[:, :T]
    lse_BTN = jnp.transpose(lse_BKGPQ, (0, 3, 4, 1, 2)).reshape(B, P * block, N)[:, :T]
    return out_BTNH, lse_BTN


# --------------------------------------------------------------------------------------------
# Gather attention over selected key blocks
# --------------------------------------------------------------------------------------------


def block_sparse_attention_reference(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    idx_BTJn: Array,
    valid_BTJn: Array,
    *,
    block: int,
    scale: float,
    q_positions_BT: Array | None = None,
) -> tuple[Array, Array]:
    """Dense-mask form of `block_sparse_attention` (builds the [B, N, T, S] mask)."""
    B, T, N, _ = q_BTNH.shape
    S = k_BSKH.shape[1]
    J = idx_BTJn.shape[2]
    if q_positions_BT is None:
        q_positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    sel_BJTS = blocks_to_token_mask(idx_BTJn, valid_BTJn, block=block, seq_len=S)
    sel_BNTS = jnp.repeat(sel_BJTS, N // J, axis=1)
    causal_BTS = jnp.arange(S)[None, None, :] <= q_positions_BT[:, :, None]
    return masked_attention(q_BTNH, k_BSKH, v_BSKH, sel_BNTS & causal_BTS[:, None], scale=scale)


def _tile_dispatch(blk_M: Array, num_blocks: int, tile: int, capacity: int):
    """Sort (query, slot) pairs by key block into tiles that each hold one block's pairs.

    Every block's group of pairs is padded to a multiple of ``tile`` rows, so a tile never mixes
    two blocks: this is the static-shape version of the varlen "queries regrouped by block"
    dispatch of MoBA's efficient kernel (and of MoE token dispatch).

    Args:
      blk_M: int32 [M] block of each pair; ``num_blocks`` marks an empty (invalid) pair.
      capacity: static number of rows R >= M + min(P, M) * (tile - 1), a multiple of ``tile``.

    Returns:
      ``(dest_M, row_pair_R, tile_blk_I)``: the row of each pair (``capacity`` = dropped), the
      pair of each row (``M`` = empty row), and the key block of each tile.
    """
    M = blk_M.shape[0]
    P = num_blocks
    counts = jnp.zeros(P + 1, jnp.int32).at[blk_M].add(1)[:P]
    padded = (counts + tile - 1) // tile * tile
    pad_start = jnp.cumsum(padded) - padded
    grp_start = jnp.cumsum(counts) - counts
    order = jnp.argsort(blk_M, stable=True)
    sorted_blk = blk_M[order]
    real = sorted_blk < P
    safe = jnp.minimum(sorted_blk, P - 1)
    rank = jnp.arange(M, dtype=jnp.int32) - grp_start[safe]
    dest_sorted = jnp.where(real, pad_start[safe] + rank, capacity)
    dest_M = jnp.zeros(M, jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
    row_pair = jnp.full(capacity, M, jnp.int32).at[dest_M].set(
        jnp.arange(M, dtype=jnp.int32), mode="drop"
    )
    row_blk = jnp.zeros(capacity, jnp.int32).at[dest_M].set(blk_M, mode="drop")
    tile_blk = row_blk.reshape(capacity // tile, tile).max(axis=1)
    return dest_M, row_pair, tile_blk


def _lane_block_sparse(q_TRH, kb_PQH, vb_PQH, idx_Tn, valid_Tn, qpos_T, *, seq_len, tile, scale):
    """One (batch, selection group) lane of `block_sparse_attention`."""
    T, R, H = q_TRH.shape
    P, Q, _ = kb_PQH.shape
    n = idx_Tn.shape[1]
    M = T * n
    capacity = -(-(M + min(P, M) * (tile - 1)) // tile) * tile
    blk_M = jnp.where(valid_Tn, idx_Tn, P).reshape(M).astype(jnp.int32)
    dest_M, row_pair, tile_blk = _tile_dispatch(blk_M, P, tile, capacity)
    row_t = row_pair // n  # T for empty rows
    row_real = row_pair < M
    q_rows = jnp.take(q_TRH, row_t, axis=0, mode="fill", fill_value=0)
    qpos_rows = jnp.take(qpos_T, row_t, axis=0, mode="fill", fill_value=-1)
    I = capacity // tile
    q_IYRH = q_rows.reshape(I, tile, R, H)
    k_IQH, v_IQH = kb_PQH[tile_blk], vb_PQH[tile_blk]
    logits = jnp.einsum("IYRH,IQH->IYRQ", q_IYRH, k_IQH, preferred_element_type=jnp.float32)
    k_pos_IQ = tile_blk[:, None] * Q + jnp.arange(Q)[None, :]
    qpos_IY = qpos_rows.reshape(I, tile)
    mask_IYQ = (
        (k_pos_IQ[:, None, :] <= qpos_IY[:, :, None])
        & (k_pos_IQ[:, None, :] < seq_len)
        & row_real.reshape(I, tile)[:, :, None]
    )
    probs, lse_IYR = softmax_with_lse(logits * scale, mask_IYQ[:, :, None, :])
    out_IYRH = jnp.einsum(
        "IYRQ,IQH->IYRH", probs.astype(v_IQH.dtype), v_IQH, preferred_element_type=jnp.float32
    )
    out_M = jnp.take(out_IYRH.reshape(capacity, R, -1), dest_M, axis=0, mode="fill", fill_value=0)
    lse_M = jnp.take(lse_IYR.reshape(capacity, R), dest_M, axis=0, mode="fill", fill_value=-jnp.inf)
    return merge_attention(out_M.reshape(T, n, R, -1), lse_M.reshape(T, n, R), axis=1)


def block_sparse_attention(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKH: Array,
    idx_BTJn: Array,
    valid_BTJn: Array,
    *,
    block: int,
    scale: float,
    q_positions_BT: Array | None = None,
    tile: int = 64,
) -> tuple[Array, Array]:
    """Attention of each query to the union of its selected key blocks, by gathering blocks.

    Query t of selection group j attends, with one softmax, to the keys of the blocks
    ``idx[b, t, j, :]`` whose ``valid`` flag is set, restricted causally to key positions
    ``<= q_positions[b, t]`` (and ``< S``). Selected blocks must be distinct per query. The R =
    N / J query heads of group j share its selection; group j reads kv head ``j // (J / K)``.

    Algorithm (static shapes; MoBA arXiv 2502.13189 Algorithm 1 / ``moba_efficient.py`` regroup
    queries by key block for varlen flash attention): the T * n (query, slot) pairs of a lane are
    sorted by block and each block's group is padded to a multiple of ``tile`` rows; each tile
    then multiplies ``tile`` gathered queries with one gathered key block (``[tile, block]``
    logits), and the per-slot results are merged by log-sum-exp. Work and memory are
    O(T * n * block) per head (plus at most ``P * tile`` padding rows), never O(T * S).
    For one decoding query use ``tile=1``.

    Args:
      q_BTNH: queries.
      k_BSKH, v_BSKH: keys/values (a prefill sequence or a cache; S need not be a multiple of
        ``block``).
      idx_BTJn: int32 selected block indices, J divides N and K divides J.
      valid_BTJn: bool, which slots are real.
      block: key block length.
      scale: logit scale.
      q_positions_BT: positions of the queries (default ``arange(T)``, i.e. prefill).
      tile: rows per tile (a multiple of 8 suits CPUs/TPUs).

    Returns:
      ``(out_BTNH, lse_BTN)`` float32 (zeros / ``-inf`` for a query with no visible key).
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    J, n = idx_BTJn.shape[2], idx_BTJn.shape[3]
    if N % J or J % K:
        raise ValueError(f"selection groups J={J} must divide N={N} and be a multiple of K={K}")
    R, JK = N // J, J // K
    if q_positions_BT is None:
        q_positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    P = -(-S // block)
    pad = P * block - S

    def blocks(x):
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.transpose(x.reshape(B, P, block, K, -1), (0, 3, 1, 2, 4))  # [B, K, P, Q, H]

    kb, vb = blocks(k_BSKH), blocks(v_BSKH)
    q_BKJTRH = jnp.transpose(q_BTNH.reshape(B, T, K, JK, R, H), (0, 2, 3, 1, 4, 5))
    idx_BKJTn = jnp.transpose(idx_BTJn.reshape(B, T, K, JK, n), (0, 2, 3, 1, 4))
    valid_BKJTn = jnp.transpose(valid_BTJn.reshape(B, T, K, JK, n), (0, 2, 3, 1, 4))

    def lane(q, kb_, vb_, idx, valid, qpos):
        return _lane_block_sparse(
            q, kb_, vb_, idx, valid, qpos, seq_len=S, tile=tile, scale=scale
        )

    over_j = jax.vmap(lane, in_axes=(0, None, None, 0, 0, None))
    over_k = jax.vmap(over_j, in_axes=(0, 0, 0, 0, 0, None))
    over_b = jax.vmap(over_k, in_axes=(0, 0, 0, 0, 0, 0))
    out, lse = over_b(q_BKJTRH, kb, vb, idx_BKJTn, valid_BKJTn, q_positions_BT)
    out_BTNH = jnp.transpose(out, (0, 3, 1, 2, 4, 5)).reshape(B, T, N, -1)
    lse_BTN = jnp.transpose(lse, (0, 3, 1, 2, 4)).reshape(B, T, N)
    return out_BTNH, lse_BTN


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale`` or the usual ``head_dim ** -0.5``."""
    return head_dim**-0.5 if scale is None else scale


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling of a / b (static Python ints)."""
    return -(-a // b)
