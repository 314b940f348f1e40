"""Shared pieces of block-sparse attention (MoBA, NSA): softmax with log-sum-exp, LSE merging,
block pooling, banded (local / sliding-window) attention and gather attention over selected
key blocks.

Every attention function here returns a merge-ready pair ``(out, lse)``: ``out`` is the
softmax-normalised attention output over the keys that function saw, in float32, and
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

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# Logit elements computed per loop step by the looped kernels (1 MiB of float32): small enough
# to stay in a CPU's cache, large enough to amortise the loop (measured on XLA:CPU; 2**16 and
# 2**20 were slower).
_STEP_LOGITS = 2**18

__all__ = [
    "banded_attention",
    "block_means",
    "auto_tile",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "blocks_to_token_mask",
    "exp_weights",
    "loop_map",
    "masked_attention",
    "merge_attention",
    "normalise",
    "softmax_with_lse",
]


# --------------------------------------------------------------------------------------------
# Softmax pieces
# --------------------------------------------------------------------------------------------


def loop_map(fn, xs, per_step: int):
    """``lax.map(fn, xs)`` taking ``per_step`` items per iteration, or a plain ``vmap`` when one
    step covers everything (no loop: less to compile and to differentiate at small sizes)."""
    n = jax.tree.leaves(xs)[0].shape[0]
    if per_step >= n:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=max(1, per_step))


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


def exp_weights(logits: Array, mask: Array | None) -> tuple[Array, Array, Array]:
    """Unnormalised softmax weights for the normalise-after-the-value-matmul form.

    Returns ``(w, row_max, denom)`` in float32 with ``w = exp(logits - row_max)`` (0 where
    masked) and ``denom = sum(w)``; finish with `normalise`. Dividing the [.., H] output instead
    of the [.., S] weights saves a full pass over the weights. ``mask=None`` skips masking (every
    entry visible).
    """
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if mask is not None:
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    w = jnp.exp(logits - row_max)
    return w, row_max[..., 0], jnp.sum(w, axis=-1)


def normalise(out_unnorm: Array, row_max: Array, denom: Array) -> tuple[Array, Array]:
    """``(out / denom, row_max + log(denom))``; rows with ``denom == 0`` give ``(0, -inf)``."""
    has_any = denom > 0
    safe = jnp.where(has_any, denom, 1.0)
    lse = jnp.where(has_any, row_max + jnp.log(safe), -jnp.inf)
    return out_unnorm / safe[..., None], lse


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
    lse_parts = [x.astype(jnp.float32) for x in jnp.moveaxis(lses, axis, 0)]
    out_parts = [x.astype(jnp.float32) for x in jnp.moveaxis(outs, axis, 0)]
    # unrolled over the (static, few) parts: XLA:CPU runs a generic reduction over a short
    # leading axis with a broadcast weight ~50x slower than these elementwise ops
    top = functools.reduce(jnp.maximum, lse_parts)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    ws = [jnp.exp(x - top) for x in lse_parts]
    denom = functools.reduce(jnp.add, ws)
    out = functools.reduce(jnp.add, [o * w[..., None] for o, w in zip(out_parts, ws, strict=True)])
    return normalise(out, top, denom)


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
    R = num_prev_blocks
    span = (R + 1) * block
    Y = block * G  # rows of one query block: (position, head of the kv group)
    # [P, B, K, Y, H] queries; keys [B, K, R * block + P * block, H] with R zero blocks in front
    q_pad = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_PBKYH = jnp.transpose(q_pad.reshape(B, P, block, K, G, H), (1, 0, 3, 2, 4, 5))
    q_PBKYH = q_PBKYH.reshape(P, B, K, Y, H)
    kv_pad = ((0, 0), (R * block, pad), (0, 0), (0, 0))
    k_BKSH = jnp.transpose(jnp.pad(k_BSKH, kv_pad), (0, 2, 1, 3))
    v_BKSH = jnp.transpose(jnp.pad(v_BSKH, kv_pad), (0, 2, 1, 3))
    q_pos_Y = jnp.repeat(jnp.arange(block), G)
    k_off_X = jnp.arange(span) - R * block

    def one_block(args):
        c, q_BKYH = args
        k_span = jax.lax.dynamic_slice_in_dim(k_BKSH, c * block, span, axis=2)
        v_span = jax.lax.dynamic_slice_in_dim(v_BKSH, c * block, span, axis=2)
        logits = jnp.einsum("BKYH,BKXH->BKYX", q_BKYH, k_span, preferred_element_type=jnp.float32)
        q_pos, k_pos = c * block + q_pos_Y[:, None], c * block + k_off_X[None, :]
        mask = (k_pos <= q_pos) & (k_pos >= 0)
        if window is not None:
            mask &= k_pos > q_pos - window
        w, row_max, denom = exp_weights(logits * scale, mask)
        out = jnp.einsum(
            "BKYX,BKXH->BKYH", w.astype(v_span.dtype), v_span, preferred_element_type=jnp.float32
        )
        return normalise(out, row_max, denom)

    # one query block (or a few small ones) per step keeps the logits cache-resident
    per_step = max(1, _STEP_LOGITS // (B * K * Y * span))
    out, lse = loop_map(one_block, (jnp.arange(P), q_PBKYH), per_step)
    out = jnp.transpose(out.reshape(P, B, K, block, G, -1), (1, 0, 3, 2, 4, 5))
    out = out.reshape(B, P * block, N, -1)[:, :T]
    lse = jnp.transpose(lse.reshape(P, B, K, block, G), (1, 0, 3, 2, 4))
    return out, lse.reshape(B, P * block, N)[:, :T]


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
      ``(dest_M, row_pair_R, tile_blk_I)``: the row of each pair (``capacity`` for an invalid
      pair: a dump row), the pair of each row (``M`` = empty row), and the key block of each
      tile (0 for an empty tile).
    """
    M = blk_M.shape[0]
    P = num_blocks
    inb = dict(mode="promise_in_bounds")
    counts = jnp.zeros(P + 1, jnp.int32).at[blk_M].add(1, **inb)[:P]
    padded = (counts + tile - 1) // tile * tile
    pad_start = jnp.cumsum(padded) - padded
    grp_start = jnp.cumsum(counts) - counts
    order = jnp.argsort(blk_M, stable=True).astype(jnp.int32)
    sorted_blk = blk_M.at[order].get(**inb)
    safe = jnp.minimum(sorted_blk, P - 1)
    rank = jnp.arange(M, dtype=jnp.int32) - grp_start.at[safe].get(**inb)
    dest_sorted = jnp.where(sorted_blk < P, pad_start.at[safe].get(**inb) + rank, capacity)
    dest_M = jnp.zeros(M, jnp.int32).at[order].set(dest_sorted, unique_indices=True, **inb)
    rows = jnp.stack([jnp.full(capacity + 1, M, jnp.int32), jnp.zeros(capacity + 1, jnp.int32)])
    rows = rows.at[:, dest_M].set(jnp.stack([jnp.arange(M, dtype=jnp.int32), blk_M]), **inb)
    row_pair, row_blk = rows[0, :capacity], rows[1, :capacity]
    tile_blk = row_blk.reshape(capacity // tile, tile).max(axis=1)
    return dest_M, row_pair, tile_blk


def _lane_block_sparse(
    q_TRH, kb_XPQH, vb_XPQH, kv, idx_Tn, valid_Tn, qpos_T, *, seq_len, tile, scale, causal
):
    """One (batch, selection group) lane of `block_sparse_attention`; it reads ``kb[kv]``."""
    T, R, H = q_TRH.shape
    P, Q = kb_XPQH.shape[1:3]
    n = idx_Tn.shape[1]
    M = T * n
    inb = dict(mode="promise_in_bounds")
    capacity = -(-(M + min(P, M) * (tile - 1)) // tile) * tile
    blk_M = jnp.where(valid_Tn, idx_Tn, P).reshape(M).astype(jnp.int32)
    dest_M, row_pair, tile_blk = _tile_dispatch(blk_M, P, tile, capacity)
    row_t = row_pair // n  # T for empty rows: the zero query appended below
    q_ext = jnp.concatenate([q_TRH, jnp.zeros((1, R, H), q_TRH.dtype)])
    qpos_ext = jnp.concatenate([qpos_T, jnp.full((1,), -1, qpos_T.dtype)])
    I = capacity // tile
    row_t_IY = row_t.reshape(I, tile)

    def one_tile(args):
        rows_Y, blk = args
        q_YRH = q_ext.at[rows_Y].get(**inb)  # gathered inside the loop: stays in cache
        qpos_Y = qpos_ext.at[rows_Y].get(**inb)
        k_QH, v_QH = kb_XPQH[kv, blk], vb_XPQH[kv, blk]
        logits = jnp.einsum("YRH,QH->YRQ", q_YRH, k_QH, preferred_element_type=jnp.float32)
        if causal:
            # a selected block starts at or before its query, so a real row always sees a key;
            # empty rows (position -1) see none and are never read back
            k_pos = blk * Q + jnp.arange(Q)
            mask = ((k_pos[None, :] <= qpos_Y[:, None]) & (k_pos[None, :] < seq_len))[:, None]
        else:
            mask = None
        w, row_max, denom = exp_weights(logits * scale, mask)
        out = jnp.einsum(
            "YRQ,QH->YRH", w.astype(v_QH.dtype), v_QH, preferred_element_type=jnp.float32
        )
        return normalise(out, row_max, denom)

    # tiles are processed a few at a time so that their logits stay cache-resident
    per_step = max(1, _STEP_LOGITS // (tile * R * Q))
    out_IYRH, lse_IYR = loop_map(one_tile, (row_t_IY, tile_blk), per_step)
    # one dump row at index ``capacity`` for invalid pairs: output 0, lse -inf
    Hv = out_IYRH.shape[-1]
    out_rows = jnp.concatenate([out_IYRH.reshape(capacity, R, Hv), jnp.zeros((1, R, Hv))])
    lse_rows = jnp.concatenate([lse_IYR.reshape(capacity, R), jnp.full((1, R), -jnp.inf)])
    out_M = out_rows.at[dest_M].get(**inb)
    lse_M = lse_rows.at[dest_M].get(**inb)
    return merge_attention(out_M.reshape(T, n, R, -1), lse_M.reshape(T, n, R), axis=1)


def auto_tile(num_pairs: int, num_blocks: int, largest: int = 256) -> int:
    """Largest power-of-two tile (<= ``largest``, >= 1) whose expected padding, about
    ``num_blocks * tile / 2`` rows, stays within 1/8 of the ``num_pairs`` real rows.

    On XLA:CPU a [256, H] x [H, block] tile runs about twice as many FLOP/s as a [64, H] one.
    """
    tile = largest
    while tile > 1 and num_blocks * tile / 2 > num_pairs / 8:
        tile //= 2
    return tile


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
    tile: int | None = None,
    causal: bool = True,
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
      tile: rows per tile; None picks `auto_tile` (bigger tiles run faster per FLOP, each key
        block's group wastes up to ``tile - 1`` padding rows).
      causal: apply the causal mask (and the ``< S`` bound). ``False`` is an exact shortcut only
        when every selected block lies entirely before its query (MoBA's history blocks); it
        skips the mask pass.

    Returns:
      ``(out_BTNH, lse_BTN)`` float32 (zeros / ``-inf`` for a query with no visible key).
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    J, n = idx_BTJn.shape[2], idx_BTJn.shape[3]
    if N % J or J % K:
        raise ValueError(f"selection groups J={J} must divide N={N} and be a multiple of K={K}")
    R, JK = N // J, J // K
    if tile is None:
        tile = auto_tile(T * n, -(-S // block))
    if q_positions_BT is None:
        q_positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    P = -(-S // block)
    pad = P * block - S

    def blocks(x):
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.transpose(x.reshape(B, P, block, K, -1), (0, 3, 1, 2, 4))  # [B, K, P, Q, H]

    kb, vb = blocks(k_BSKH), blocks(v_BSKH)
    # One flat loop over the B * K * JK lanes, a lane reading its kv head's blocks by index.
    # (A loop rather than a vmap unless everything is small: one lane's rows live at a time,
    # which cut peak memory 2-4x at equal speed on CPU. Nested vmaps of the dispatch crashed
    # the XLA:CPU compiler in jax 0.10, hence one flat lane axis.)
    L = B * K * JK
    kb = kb.reshape((B * K,) + kb.shape[2:])
    vb = vb.reshape((B * K,) + vb.shape[2:])
    q_LTRH = jnp.transpose(q_BTNH.reshape(B, T, K, JK, R, H), (0, 2, 3, 1, 4, 5)).reshape(
        L, T, R, H
    )
    idx_LTn = jnp.transpose(idx_BTJn.reshape(B, T, K, JK, n), (0, 2, 3, 1, 4)).reshape(L, T, n)
    valid_LTn = jnp.transpose(valid_BTJn.reshape(B, T, K, JK, n), (0, 2, 3, 1, 4)).reshape(L, T, n)
    kv_lane_L = jnp.arange(L) // JK
    qpos_LT = jnp.repeat(q_positions_BT, K * JK, axis=0)

    def lane(q, kv_lane, idx, valid, qpos):
        return _lane_block_sparse(
            q,
            kb,
            vb,
            kv_lane,
            idx,
            valid,
            qpos,
            seq_len=S,
            tile=tile,
            scale=scale,
            causal=causal,
        )

    lane_logits = (T * n + min(P, T * n) * tile) * R * block  # upper bound per lane
    out, lse = loop_map(
        lambda a: lane(*a),
        (q_LTRH, kv_lane_L, idx_LTn, valid_LTn, qpos_LT),
        max(1, _STEP_LOGITS // lane_logits),
    )
    out = out.reshape(B, K, JK, T, R, -1)
    out_BTNH = jnp.transpose(out, (0, 3, 1, 2, 4, 5)).reshape(B, T, N, -1)
    lse_BTN = jnp.transpose(lse.reshape(B, K, JK, T, R), (0, 3, 1, 2, 4)).reshape(B, T, N)
    return out_BTNH, lse_BTN


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale`` or the usual ``head_dim ** -0.5``."""
    return head_dim**-0.5 if scale is None else scale


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling of a / b (static Python ints)."""
    return -(-a // b)
