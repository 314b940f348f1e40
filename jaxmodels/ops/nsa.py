"""NSA — Native Sparse Attention (DeepSeek, arXiv 2502.11089), pure JAX.

Output per query head (paper §3.2 eq. 5)::

    o_t = sum_{c in (cmp, slc, win)} g_c * Attn(q_t, K_c, V_c)

each branch with its **own keys and values** (the caller passes three k/v pairs; pass the same
arrays to share them as flash-linear-attention does) and its own softmax; the gates
``gates[..., (cmp, slc, win)]`` are given already in [0, 1] (the paper: an MLP + sigmoid on the
layer input; fla: ``sigmoid(g_proj(x))``).

Branches (defaults l = 32, d = 16, l' = 64, n = 16 with 1 initial + 2 local blocks, w = 512):

* **Compression** (§3.3.1): compressed block i summarises tokens ``[i*d, i*d + l)`` through
  ``phi`` — `nsa_compress`, an MLP over the block's ``l`` keys plus a learned intra-block
  position bias (parameters passed as arrays), or mean pooling (``params=None``; what
  fla ``fla/ops/nsa`` uses). A sequence of length S has ``M = floor((S - l) / d) + 1`` blocks.
  **Causality: compressed block i is visible to the query at position t iff it ends at or
  before t, i.e. ``i*d + l - 1 <= t``** — so t sees ``floor((t + 1 - l) / d) + 1`` blocks (none
  before t = l - 1), the ``⌊(t−l)/d⌋+1`` count of the paper with 1-indexed t. A compressed block
  never summarises a token after its query. (fla ``naive_nsa_compression`` has the same rule with
  l = d.)
* **Selection** (§3.3.2): keys in blocks of l'. Importance of selection block j for query t is
  the compression attention probability mass ``p_cmp`` mapped onto it: every compressed block
  contributes ``|its tokens ∩ block j| / d`` times its probability (for l=32, d=16, l'=64 the
  weights 1, 2, 2, 2, 1 of the paper's eq. 9 over compressed blocks 4j-1 .. 4j+3; for
  l = d = l' it is ``p_cmp`` itself). Importance is **summed over the query heads of a GQA
  group**, so the group shares one selection (eq. 10). Per query the top-``n`` blocks are kept,
  ``n`` counting the forced blocks: the first ``num_init`` blocks and the ``num_local`` most
  recent ones (the query's own block ``t // l'`` and the one before it by default). Blocks
  starting after t are never selected; the query's own block is attended causally (keys <= t).
* **Sliding window** (§3.3.3): keys ``t - w < s <= t`` (w keys including itself).

Ties in the top-n are broken towards the lower block index (``jax.lax.top_k``).

Forms (``implementation=``): "reference" — dense [T, S] masks for every branch; "efficient" —
compression and selection scoring in query chunks (memory O(chunk * M)), the selection branch by
gathering selected blocks (`block_sparse_attention`, O(T * n * l')), the window by banded
attention (O(T * (w + band))). Decoding one token against caches: `nsa_decode`,
`nsa_update_compressed_cache`, `nsa_window_decode`.

References followed: the paper; fla-org/flash-linear-attention ``fla/ops/nsa/naive.py``
(visibility rule, forced first/current/previous blocks, -1 padding of missing blocks) and
``fla/layers/nsa.py`` (gates per head). Deviations from fla: paper's l/d/l' instead of one block
size; an MLP ``phi`` (or mean pooling); importance summed (fla: averaged — same ranking) over the
group; forced blocks ranked by +inf (fla: by a score of 1.0).

Dimension letters: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim,
M compressed blocks, P selection blocks, U stride chunks of d tokens, n selected slots,
X flattened block (l * H), F compression-MLP hidden width.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops.block_sparse import (
    banded_attention,
    block_sparse_attention,
    block_sparse_attention_reference,
    ceil_div,
    default_scale,
    loop_map,
    masked_attention,
    softmax_with_lse,
)

Array = jax.Array

__all__ = [
    "init_compression_params",
    "nsa_attention",
    "nsa_block_importance",
    "nsa_compress",
    "nsa_compressed_attention",
    "nsa_decode",
    "nsa_decode_tokens",
    "nsa_num_compressed",
    "nsa_select_blocks",
    "nsa_selected_attention",
    "nsa_sliding_window_attention",
    "nsa_update_compressed_cache",
    "nsa_window_decode",
]

CMP_BLOCK, CMP_STRIDE, SLC_BLOCK, NUM_SELECTED, WINDOW = 32, 16, 64, 16, 512


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def nsa_num_compressed(seq_len: int, cmp_block: int = CMP_BLOCK, cmp_stride: int = CMP_STRIDE):
    """Compressed blocks of a length-``seq_len`` sequence: ``floor((S - l) / d) + 1``, 0 if
    S < l. Works on Python ints and on int arrays."""
    if isinstance(seq_len, int):
        return 0 if seq_len < cmp_block else (seq_len - cmp_block) // cmp_stride + 1
    return jnp.where(seq_len < cmp_block, 0, (seq_len - cmp_block) // cmp_stride + 1)


def nsa_decode_tokens(
    context_len: int,
    *,
    cmp_block: int = CMP_BLOCK,
    cmp_stride: int = CMP_STRIDE,
    slc_block: int = SLC_BLOCK,
    num_selected: int = NUM_SELECTED,
    window: int = WINDOW,
    capped: bool = False,
) -> int:
    """Tokens loaded by one decode step at context length ``s`` (paper Table 4):
    ``floor((s - l) / d) + 1`` compressed + ``n * l'`` selected + ``w`` window tokens.

    Defaults give 8K -> 2047, 16K -> 2559, 32K -> 3583, 64K -> 5631. ``capped=True`` counts
    what `nsa_decode` actually reads at short contexts: each branch at most ``s`` tokens.
    """
    cmp = nsa_num_compressed(context_len, cmp_block, cmp_stride)
    slc, win = num_selected * slc_block, window
    if capped:
        slc, win = min(slc, context_len), min(win, context_len)
    return cmp + slc + win


# --------------------------------------------------------------------------------------------
# Compression phi
# --------------------------------------------------------------------------------------------


def init_compression_params(
    key: Array,
    *,
    cmp_block: int = CMP_BLOCK,
    head_dim: int,
    hidden: int | None = None,
    num_kv_heads: int | None = None,
    dtype=jnp.float32,
) -> dict[str, Array]:
    """Parameters of the compression MLP ``phi`` (one hidden layer, GELU), as plain arrays.

    Shapes (a leading ``[K]`` axis when ``num_kv_heads`` is given, else shared by all kv heads):
    ``pos`` [l, H] intra-block position bias (zeros at init), ``w1`` [l * H, F], ``b1`` [F],
    ``w2`` [F, H], ``b2`` [H]; F = ``hidden`` (default l * H). The paper (§3.3.1) specifies "a
    learnable MLP with intra-block position encoding" without sizes; these are our choice.
    """
    hidden = cmp_block * head_dim if hidden is None else hidden
    lead = () if num_kv_heads is None else (num_kv_heads,)
    k1, k2 = jax.random.split(key)
    fan1 = cmp_block * head_dim
    return {
        "pos": jnp.zeros(lead + (cmp_block, head_dim), dtype),
        "w1": (jax.random.normal(k1, lead + (fan1, hidden)) * fan1**-0.5).astype(dtype),
        "b1": jnp.zeros(lead + (hidden,), dtype),
        "w2": (jax.random.normal(k2, lead + (hidden, head_dim)) * hidden**-0.5).astype(dtype),
        "b2": jnp.zeros(lead + (head_dim,), dtype),
    }


def _phi(blocks_ZlKH: Array, params: dict[str, Array] | None) -> Array:
    """Apply phi to blocks [..., l, K, H] -> [..., K, H] (mean pooling when params is None)."""
    if params is None:
        return blocks_ZlKH.astype(jnp.float32).mean(axis=-3).astype(blocks_ZlKH.dtype)
    *lead, l, K, H = blocks_ZlKH.shape

    def per_head(p, ndim):  # give shared parameters a K axis
        return p if p.ndim == ndim + 1 else jnp.broadcast_to(p, (K,) + p.shape)

    pos_KlH = per_head(params["pos"], 2)
    w1, b1 = per_head(params["w1"], 2), per_head(params["b1"], 1)
    w2, b2 = per_head(params["w2"], 2), per_head(params["b2"], 1)
    x = blocks_ZlKH + jnp.swapaxes(pos_KlH, 0, 1).astype(blocks_ZlKH.dtype)
    x_ZKX = jnp.moveaxis(x, -3, -2).reshape(*lead, K, l * H)
    h = jax.nn.gelu(jnp.einsum("...KX,KXF->...KF", x_ZKX, w1) + b1, approximate=False)
    return (jnp.einsum("...KF,KFH->...KH", h, w2) + b2).astype(blocks_ZlKH.dtype)


def nsa_compress(
    x_BSKH: Array,
    *,
    cmp_block: int = CMP_BLOCK,
    cmp_stride: int = CMP_STRIDE,
    params: dict[str, Array] | None = None,
) -> Array:
    """Compressed keys (or values) ``phi(x[i*d : i*d + l])``, [B, M, K, H], M =
    `nsa_num_compressed` (S). Only complete blocks are produced.

    Args:
      x_BSKH: the compression branch's raw keys or values.
      cmp_block, cmp_stride: l and d.
      params: `init_compression_params`-shaped MLP parameters, or None for mean pooling.
    """
    B, S, K, H = x_BSKH.shape
    M = nsa_num_compressed(S, cmp_block, cmp_stride)
    if M == 0:
        return jnp.zeros((B, 0, K, H), x_BSKH.dtype)
    idx_Ml = np.arange(M)[:, None] * cmp_stride + np.arange(cmp_block)[None, :]
    return _phi(x_BSKH[:, idx_Ml], params)


def nsa_update_compressed_cache(
    cmp_cache_BMKH: Array,
    raw_cache_BSKH: Array,
    cache_len_B: Array,
    *,
    cmp_block: int = CMP_BLOCK,
    cmp_stride: int = CMP_STRIDE,
    params: dict[str, Array] | None = None,
    ring_buffer: bool = False,
) -> Array:
    """Write the compressed block that the token at position ``cache_len - 1`` completes.

    If ``cache_len >= l`` and ``(cache_len - l) % d == 0``, block ``i = (cache_len - l) // d``
    (tokens ``cache_len - l .. cache_len - 1``) is compressed with ``phi`` and stored at
    ``cmp_cache[:, i]``; otherwise the cache is returned unchanged. Running this after every
    token reproduces `nsa_compress` of the whole sequence.

    Args:
      cmp_cache_BMKH: compressed cache [B, M_max, K, H].
      raw_cache_BSKH: raw compression-branch keys (or values) [B, S_raw, K, H]; position p at
        slot p (linear) or ``p % S_raw`` (``ring_buffer=True``; needs S_raw >= l).
      cache_len_B: int [B] (or scalar) positions written so far, the new token included.
    """
    B, S_raw = raw_cache_BSKH.shape[:2]
    if ring_buffer and S_raw < cmp_block:
        raise ValueError(f"a ring buffer of {S_raw} slots cannot hold a block of {cmp_block}")
    lens = jnp.broadcast_to(jnp.asarray(cache_len_B, jnp.int32), (B,))

    def one(cache_MKH, raw_SKH, length):
        slots = length - cmp_block + jnp.arange(cmp_block)
        slots = slots % S_raw if ring_buffer else jnp.clip(slots, 0, S_raw - 1)
        entry = _phi(raw_SKH[slots], params)
        i = jnp.maximum(length - cmp_block, 0) // cmp_stride
        due = (length >= cmp_block) & ((length - cmp_block) % cmp_stride == 0)
        i = jnp.minimum(i, cache_MKH.shape[0] - 1)
        return cache_MKH.at[i].set(jnp.where(due, entry, cache_MKH[i]).astype(cache_MKH.dtype))

    return jax.vmap(one)(cmp_cache_BMKH, raw_cache_BSKH, lens)


# --------------------------------------------------------------------------------------------
# Branches
# --------------------------------------------------------------------------------------------


def _positions(B: int, T: int, q_positions_BT: Array | None) -> Array:
    if q_positions_BT is None:
        return jnp.broadcast_to(jnp.arange(T), (B, T))
    return q_positions_BT


def nsa_compressed_attention(
    q_BTNH: Array,
    k_cmp_BMKH: Array,
    v_cmp_BMKH: Array,
    *,
    cmp_block: int = CMP_BLOCK,
    cmp_stride: int = CMP_STRIDE,
    scale: float | None = None,
    q_positions_BT: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Compression branch: attention over the compressed blocks visible to each query.

    Block i is visible to the query at position t iff ``i*d + l - 1 <= t`` (it ends at or before
    t). Queries that see no block (t < l - 1) get output 0, lse -inf and probabilities 0 (as
    fla ``naive_nsa_compression``).

    Args:
      q_BTNH: queries; k_cmp_BMKH, v_cmp_BMKH: compressed keys/values (`nsa_compress`, or a
        compressed cache whose not-yet-written entries are invisible by this rule).
      q_positions_BT: query positions (default ``arange(T)``).

    Returns:
      ``(out_BTNH, lse_BTN, probs_BTNM)`` float32.
    """
    B, T, N, H = q_BTNH.shape
    M = k_cmp_BMKH.shape[1]
    scale = default_scale(H, scale)
    pos_BT = _positions(B, T, q_positions_BT)
    if M == 0:
        return (
            jnp.zeros((B, T, N, v_cmp_BMKH.shape[-1]), jnp.float32),
            jnp.full((B, T, N), -jnp.inf, jnp.float32),
            jnp.zeros((B, T, N, 0), jnp.float32),
        )
    out, lse, probs_BKTGM = _compressed_grouped(
        q_BTNH, k_cmp_BMKH, v_cmp_BMKH, pos_BT, cmp_block, cmp_stride, scale
    )
    return out, lse, jnp.transpose(probs_BKTGM, (0, 2, 1, 3, 4)).reshape(B, T, N, M)


def _compressed_grouped(q_BTNH, k_cmp_BMKH, v_cmp_BMKH, pos_BT, cmp_block, cmp_stride, scale):
    """`nsa_compressed_attention` (M > 0) with probabilities in the matmul-friendly grouped
    layout [B, K, T, G, M] (rows (T, G) of one kv head form one plain matmul)."""
    B, T, N, H = q_BTNH.shape
    M, K = k_cmp_BMKH.shape[1], k_cmp_BMKH.shape[2]
    G = N // K
    q_BKYH = jnp.transpose(q_BTNH.reshape(B, T, K, G, H), (0, 2, 1, 3, 4)).reshape(B, K, T * G, H)
    k_BKMH = jnp.transpose(k_cmp_BMKH, (0, 2, 1, 3))
    v_BKMH = jnp.transpose(v_cmp_BMKH, (0, 2, 1, 3))
    logits = jnp.einsum("BKYH,BKMH->BKYM", q_BKYH, k_BKMH, preferred_element_type=jnp.float32)
    end_M = jnp.arange(M) * cmp_stride + cmp_block - 1
    visible_BTM = end_M[None, None, :] <= pos_BT[:, :, None]
    probs, lse_BKTG = softmax_with_lse(
        logits.reshape(B, K, T, G, M) * scale, visible_BTM[:, None, :, None, :]
    )
    out = jnp.einsum(
        "BKYM,BKMH->BKYH",
        probs.reshape(B, K, T * G, M).astype(v_BKMH.dtype),
        v_BKMH,
        preferred_element_type=jnp.float32,
    )
    out_BTNH = jnp.transpose(out.reshape(B, K, T, G, -1), (0, 2, 1, 3, 4)).reshape(B, T, N, -1)
    lse_BTN = jnp.transpose(lse_BKTG, (0, 2, 1, 3)).reshape(B, T, N)
    return out_BTNH, lse_BTN, probs


def _overlap_matrix(M: int, P: int, cmp_block: int, cmp_stride: int, slc_block: int) -> np.ndarray:
    """[M, P] tokens shared by compressed block i and selection block j, divided by d."""
    c0 = np.arange(M)[:, None] * cmp_stride
    s0 = np.arange(P)[None, :] * slc_block
    overlap = np.minimum(c0 + cmp_block, s0 + slc_block) - np.maximum(c0, s0)
    return np.maximum(overlap, 0).astype(np.float32) / cmp_stride


def nsa_block_importance(
    probs_BTNM: Array,
    *,
    num_kv_heads: int,
    num_slc_blocks: int,
    cmp_block: int = CMP_BLOCK,
    cmp_stride: int = CMP_STRIDE,
    slc_block: int = SLC_BLOCK,
    implementation: Literal["efficient", "reference"] = "efficient",
) -> Array:
    """Selection-block importance from compression probabilities, summed over each GQA group.

    ``imp[b, t, k, j] = sum_{n in group k} sum_i W[i, j] * p_cmp[b, t, n, i]`` with
    ``W[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d`` (paper §3.3.2 eqs. 9-10).

    ``"reference"`` multiplies by the dense [M, P] matrix W; ``"efficient"`` computes the same
    thing in O(M): each compressed block spreads its probability over its l/d stride chunks of
    d tokens (a short convolution), then chunks are sum-pooled l'/d at a time. The efficient form
    needs d to divide l and l'.

    Args:
      probs_BTNM: compression attention probabilities (`nsa_compressed_attention`).
      num_kv_heads: K (N must be a multiple).
      num_slc_blocks: P, ``ceil(S / l')`` for the key length S.

    Returns:
      float32 [B, T, K, P].
    """
    B, T, N, M = probs_BTNM.shape
    p_BTKM = probs_BTNM.astype(jnp.float32).reshape(B, T, num_kv_heads, N // num_kv_heads, M)
    return _map_to_selection_blocks(
        p_BTKM.sum(axis=3), num_slc_blocks, cmp_block, cmp_stride, slc_block, implementation
    )


def _map_to_selection_blocks(p_ZM, P, cmp_block, cmp_stride, slc_block, implementation):
    """Map group-summed compression probabilities [..., M] to selection blocks [..., P]."""
    M = p_ZM.shape[-1]
    if implementation == "reference":
        W = _overlap_matrix(M, P, cmp_block, cmp_stride, slc_block)
        return jnp.einsum("...M,MP->...P", p_ZM, jnp.asarray(W))
    if implementation != "efficient":
        raise ValueError(
            f"implementation must be 'efficient' or 'reference', got {implementation!r}"
        )
    if cmp_block % cmp_stride or slc_block % cmp_stride:
        raise ValueError(
            f"the efficient importance map needs cmp_stride={cmp_stride} to divide cmp_block="
            f"{cmp_block} and slc_block={slc_block}; use implementation='reference'"
        )
    r, e = cmp_block // cmp_stride, slc_block // cmp_stride
    U = P * e
    if M > U:  # blocks starting at or after P * l' cannot be visible: their mass is 0
        p_ZM, M = p_ZM[..., :U], U
    # chunk u (tokens [u*d, (u+1)*d)) is covered by compressed blocks u - r + 1 .. u
    p_ext = jnp.pad(p_ZM, ((0, 0),) * (p_ZM.ndim - 1) + ((r - 1, U - M),))
    chunks_ZU = sum(p_ext[..., r - 1 - a : r - 1 - a + U] for a in range(r))
    return chunks_ZU.reshape(p_ZM.shape[:-1] + (P, e)).sum(axis=-1)


def nsa_select_blocks(
    importance_BTKP: Array,
    *,
    slc_block: int = SLC_BLOCK,
    num_selected: int = NUM_SELECTED,
    num_init: int = 1,
    num_local: int = 2,
    q_positions_BT: Array | None = None,
) -> tuple[Array, Array]:
    """Top-n selection blocks per query and kv group (shared by the group's query heads).

    Candidates are blocks starting at or before the query (``j <= t // l'``). The first
    ``num_init`` blocks and the ``num_local`` blocks ending the candidate range (the query's own
    block and the ones before it) are forced (rank +inf); the rest are ranked by importance;
    ``n = num_selected`` counts the forced blocks.

    Returns:
      ``(idx_BTKn, valid_BTKn)``, ``n = min(num_selected, P)`` slots; a slot is invalid when the
      query has fewer candidate blocks than slots.
    """
    B, T, K, P = importance_BTKP.shape
    pos_BT = _positions(B, T, q_positions_BT)
    cur_BT1 = (pos_BT // slc_block)[:, :, None]
    j_P = jnp.arange(P)[None, None, :]
    visible = j_P <= cur_BT1
    forced = visible & ((j_P < num_init) | (j_P > cur_BT1 - num_local))
    score = jnp.where(
        forced[:, :, None],
        jnp.inf,
        jnp.where(visible[:, :, None], importance_BTKP.astype(jnp.float32), -jnp.inf),
    )
    vals, idx = jax.lax.top_k(score, min(num_selected, P))
    return idx.astype(jnp.int32), vals > -jnp.inf


def nsa_selected_attention(
    q_BTNH: Array,
    k_slc_BSKH: Array,
    v_slc_BSKH: Array,
    idx_BTKn: Array,
    valid_BTKn: Array,
    *,
    slc_block: int = SLC_BLOCK,
    scale: float | None = None,
    q_positions_BT: Array | None = None,
    implementation: Literal["efficient", "reference"] = "efficient",
    tile: int | None = None,
) -> tuple[Array, Array]:
    """Selection branch: causal attention to the tokens of the selected blocks.

    ``"efficient"`` gathers the selected blocks (`block_sparse_attention`, all G heads of a group
    in one tile); ``"reference"`` builds the [B, N, T, S] mask.

    Returns:
      ``(out_BTNH, lse_BTN)`` float32.
    """
    scale = default_scale(q_BTNH.shape[-1], scale)
    kw = dict(block=slc_block, scale=scale, q_positions_BT=q_positions_BT)
    if implementation == "reference":
        return block_sparse_attention_reference(
            q_BTNH, k_slc_BSKH, v_slc_BSKH, idx_BTKn, valid_BTKn, **kw
        )
    if implementation != "efficient":
        raise ValueError(
            f"implementation must be 'efficient' or 'reference', got {implementation!r}"
        )
    return block_sparse_attention(
        q_BTNH, k_slc_BSKH, v_slc_BSKH, idx_BTKn, valid_BTKn, tile=tile, **kw
    )


def nsa_sliding_window_attention(
    q_BTNH: Array,
    k_win_BSKH: Array,
    v_win_BSKH: Array,
    *,
    window: int = WINDOW,
    scale: float | None = None,
    implementation: Literal["efficient", "reference"] = "efficient",
    band: int = 128,
) -> tuple[Array, Array]:
    """Sliding-window branch (prefill, T == S): query t sees keys ``t - window < s <= t``.

    ``"efficient"``: banded attention over blocks of ``band`` queries, each against the
    ``ceil((w - 1) / band)`` key blocks before it and its own (O(T * (w + band)));
    ``"reference"``: dense mask.

    Returns:
      ``(out_BTNH, lse_BTN)`` float32.
    """
    T = q_BTNH.shape[1]
    scale = default_scale(q_BTNH.shape[-1], scale)
    if implementation == "reference":
        s, t = jnp.arange(T)[None, :], jnp.arange(T)[:, None]
        mask = (s <= t) & (s > t - window)
        return masked_attention(q_BTNH, k_win_BSKH, v_win_BSKH, mask, scale=scale)
    if implementation != "efficient":
        raise ValueError(
            f"implementation must be 'efficient' or 'reference', got {implementation!r}"
        )
    w = min(window, T)
    band = max(1, min(band, w))
    return banded_attention(
        q_BTNH,
        k_win_BSKH,
        v_win_BSKH,
        block=band,
        num_prev_blocks=ceil_div(w - 1, band),
        window=w,
        scale=scale,
    )


# --------------------------------------------------------------------------------------------
# The whole layer op
# --------------------------------------------------------------------------------------------


def _check_heads(q_BTNH: Array, *kvs: Array) -> None:
    N = q_BTNH.shape[-2]
    for x in kvs:
        if x.shape[-2] == 0 or N % x.shape[-2]:
            raise ValueError(f"query heads N={N} must be a multiple of kv heads {x.shape[-2]}")


def _importance_form(kw) -> str:
    """The O(M) importance map when its divisibility condition holds, else the dense matrix."""
    divides = kw["cmp_block"] % kw["cmp_stride"] == 0 and kw["slc_block"] % kw["cmp_stride"] == 0
    return "efficient" if divides else "reference"


def _combine(gates, o_cmp, o_slc, o_win, dtype):
    g = gates.astype(jnp.float32)
    out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    return out.astype(dtype)


def _compress_and_select_chunked(
    q_BTNH, k_cmp_BMKH, v_cmp_BMKH, *, scale, query_chunk, segments, sel_kw, imp_kw
):
    """Efficient compression branch + block selection: ``(o_cmp_BTNH, idx_BTKn, valid_BTKn)``.

    Queries are processed ``query_chunk`` at a time (``lax.map``), so the [chunk, M]
    probabilities are the largest temporary. The chunks are grouped into ``segments`` static
    segments; a segment ending at position e reads only the compressed blocks ending before e and
    ranks only the selection blocks starting before e (the rest are invisible to all its queries).
    """
    B, T, N, H = q_BTNH.shape
    K, P = imp_kw["num_kv_heads"], imp_kw["num_slc_blocks"]
    l, d, l_sel = imp_kw["cmp_block"], imp_kw["cmp_stride"], imp_kw["slc_block"]
    M = k_cmp_BMKH.shape[1]
    n_all = min(sel_kw["num_selected"], P)
    imp_form = _importance_form(imp_kw)
    C = min(query_chunk, T)
    nc = ceil_div(T, C)
    q_pad = jnp.pad(q_BTNH, ((0, 0), (0, nc * C - T), (0, 0), (0, 0)))
    q_cBCNH = jnp.moveaxis(q_pad.reshape(B, nc, C, N, H), 1, 0)
    # padded queries get positions >= T; their rows are dropped at the end
    pos_cBC = jnp.broadcast_to(jnp.arange(nc * C).reshape(nc, 1, C), (nc, B, C))
    S = max(1, min(segments, nc))
    bounds = [round(i * nc / S) for i in range(S + 1)]
    outs = []
    for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True):
        end = c1 * C  # exclusive end of the segment's (padded) positions
        M_s = min(M, nsa_num_compressed(end, l, d))
        P_s = min(P, ceil_div(end, l_sel))
        k_s, v_s = k_cmp_BMKH[:, :M_s], v_cmp_BMKH[:, :M_s]

        def chunk(args, M_s=M_s, P_s=P_s, k_s=k_s, v_s=v_s):
            q_c, pos_c = args
            if M_s == 0:
                o_c = jnp.zeros(q_c.shape[:3] + (v_s.shape[-1],), jnp.float32)
                imp_c = jnp.zeros((B, C, K, P_s), jnp.float32)
            else:
                o_c, _, p_BKCGM = _compressed_grouped(q_c, k_s, v_s, pos_c, l, d, scale)
                imp_BKCP = _map_to_selection_blocks(p_BKCGM.sum(axis=3), P_s, l, d, l_sel, imp_form)
                imp_c = jnp.transpose(imp_BKCP, (0, 2, 1, 3))
            i_c, v_c = nsa_select_blocks(imp_c, q_positions_BT=pos_c, **sel_kw)
            pad = ((0, 0),) * 3 + ((0, n_all - i_c.shape[-1]),)
            return o_c, jnp.pad(i_c, pad), jnp.pad(v_c, pad)

        outs.append(loop_map(chunk, (q_cBCNH[c0:c1], pos_cBC[c0:c1]), 1))

    def unchunk(xs):
        x = jnp.concatenate(xs, axis=0)
        return jnp.moveaxis(x, 0, 1).reshape((B, nc * C) + x.shape[3:])[:, :T]

    return tuple(unchunk([o[i] for o in outs]) for i in range(3))


def nsa_attention(
    q_BTNH: Array,
    *,
    k_cmp_BMKH: Array,
    v_cmp_BMKH: Array,
    k_slc_BSKH: Array,
    v_slc_BSKH: Array,
    k_win_BSKH: Array,
    v_win_BSKH: Array,
    gates_BTN3: Array,
    cmp_block: int = CMP_BLOCK,
    cmp_stride: int = CMP_STRIDE,
    slc_block: int = SLC_BLOCK,
    num_selected: int = NUM_SELECTED,
    num_init: int = 1,
    num_local: int = 2,
    window: int = WINDOW,
    scale: float | None = None,
    implementation: Literal["efficient", "reference"] = "efficient",
    query_chunk: int = 512,
    cmp_segments: int = 4,
    tile: int | None = None,
    band: int = 128,
    return_block_indices: bool = False,
) -> Array | tuple[Array, Array, Array]:
    """NSA prefill (causal, T == S): three gated branches (arXiv 2502.11089 §3).

    Args:
      q_BTNH: queries [B, T, N, H] (shared by the branches, as in the paper).
      k_cmp_BMKH, v_cmp_BMKH: compressed keys/values of the compression branch, [B, M, K, H]
        with M = `nsa_num_compressed` (T) — from `nsa_compress` (MLP phi or mean pooling), so a
        module can keep them as its decode cache.
      k_slc_BSKH, v_slc_BSKH: selection-branch keys/values [B, T, K, H].
      k_win_BSKH, v_win_BSKH: sliding-window keys/values [B, T, K, H].
      gates_BTN3: branch gates (cmp, slc, win) per query head, already in [0, 1].
      cmp_block, cmp_stride, slc_block, num_selected, num_init, num_local, window: l, d, l', n,
        forced initial / local blocks, w.
      scale: logit scale for every branch, default H ** -0.5.
      implementation: "efficient" or "reference" (see module docstring). Both use the same
        selection rule; "reference" computes the importance with the dense overlap matrix.
      query_chunk: queries per chunk of the compression/scoring pass (efficient form).
      cmp_segments: the efficient form splits the queries into this many static segments, each
        scoring only the compressed blocks that can be visible to it (a causal prefix): with 4
        segments the compression branch does 5/8 of the all-pairs work.
      tile, band: gather-tile rows (None = `auto_tile`) and window band length (efficient
        form).
      return_block_indices: also return ``(idx_BTKn, valid_BTKn)``.

    Returns:
      [B, T, N, H] in q's dtype (and the selection when asked).
    """
    B, T, N, H = q_BTNH.shape
    K = k_slc_BSKH.shape[2]
    _check_heads(q_BTNH, k_cmp_BMKH, k_slc_BSKH, k_win_BSKH)
    for name, x in (("k_slc", k_slc_BSKH), ("k_win", k_win_BSKH)):
        if x.shape[1] != T:
            raise ValueError(f"nsa_attention is for prefill: {name} has length {x.shape[1]}, T={T}")
    M = nsa_num_compressed(T, cmp_block, cmp_stride)
    if k_cmp_BMKH.shape[1] != M:
        raise ValueError(
            f"k_cmp has {k_cmp_BMKH.shape[1]} compressed blocks; length {T} with l={cmp_block}, "
            f"d={cmp_stride} gives {M} (use nsa_compress)"
        )
    P = ceil_div(T, slc_block)
    scale = default_scale(H, scale)
    sel_kw = dict(
        slc_block=slc_block, num_selected=num_selected, num_init=num_init, num_local=num_local
    )
    imp_kw = dict(
        num_kv_heads=K,
        num_slc_blocks=P,
        cmp_block=cmp_block,
        cmp_stride=cmp_stride,
        slc_block=slc_block,
    )
    cmp_kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale)

    if implementation == "reference":
        o_cmp, _, probs = nsa_compressed_attention(q_BTNH, k_cmp_BMKH, v_cmp_BMKH, **cmp_kw)
        imp = nsa_block_importance(probs, implementation="reference", **imp_kw)
        idx, valid = nsa_select_blocks(imp, **sel_kw)
    elif implementation == "efficient":
        o_cmp, idx, valid = _compress_and_select_chunked(
            q_BTNH,
            k_cmp_BMKH,
            v_cmp_BMKH,
            scale=scale,
            query_chunk=query_chunk,
            segments=cmp_segments,
            sel_kw=sel_kw,
            imp_kw=imp_kw,
        )
    else:
        raise ValueError(
            f"implementation must be 'efficient' or 'reference', got {implementation!r}"
        )

    o_slc, _ = nsa_selected_attention(
        q_BTNH,
        k_slc_BSKH,
        v_slc_BSKH,
        idx,
        valid,
        slc_block=slc_block,
        scale=scale,
        implementation=implementation,
        tile=tile,
    )
    o_win, _ = nsa_sliding_window_attention(
        q_BTNH,
        k_win_BSKH,
        v_win_BSKH,
        window=window,
        scale=scale,
        implementation=implementation,
        band=band,
    )
    out = _combine(gates_BTN3, o_cmp, o_slc, o_win, q_BTNH.dtype)
    if return_block_indices:
        return out, idx, valid
    return out


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def nsa_window_decode(
    q_BNH: Array,
    k_win_BSKH: Array,
    v_win_BSKH: Array,
    cache_len_B: Array,
    *,
    window: int = WINDOW,
    scale: float | None = None,
    ring_buffer: bool = False,
) -> tuple[Array, Array]:
    """Sliding-window attention of the token at ``cache_len - 1`` (keys ``pos - w < s <= pos``).

    Linear cache: position p at slot p; only ``min(w, S_max)`` slots are read. Ring buffer
    (``ring_buffer=True``): position p at slot ``p % S_max``, S_max >= w.

    Returns:
      ``(out_BNH, lse_BN)`` float32.
    """
    B, S_max = k_win_BSKH.shape[:2]
    if ring_buffer and S_max < window:
        raise ValueError(f"a ring buffer of {S_max} slots cannot hold a window of {window}")
    scale = default_scale(q_BNH.shape[-1], scale)
    pos_B = jnp.broadcast_to(jnp.asarray(cache_len_B, jnp.int32), (B,)) - 1
    if ring_buffer:
        slot = jnp.arange(S_max)[None, :]
        kpos_BW = pos_B[:, None] - (pos_B[:, None] - slot) % S_max
        k, v = k_win_BSKH, v_win_BSKH
    else:
        w = min(window, S_max)
        start_B = jnp.clip(pos_B + 1 - w, 0, S_max - w)
        take = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, w, axis=0))
        k, v = take(k_win_BSKH, start_B), take(v_win_BSKH, start_B)
        kpos_BW = start_B[:, None] + jnp.arange(w)[None, :]
    mask_BW = (kpos_BW >= 0) & (kpos_BW <= pos_B[:, None]) & (kpos_BW > pos_B[:, None] - window)
    out, lse = masked_attention(q_BNH[:, None], k, v, mask_BW[:, None, None, :], scale=scale)
    return out[:, 0], lse[:, 0]


def nsa_decode(
    q_BNH: Array,
    *,
    k_cmp_BMKH: Array,
    v_cmp_BMKH: Array,
    k_slc_BSKH: Array,
    v_slc_BSKH: Array,
    k_win_BSKH: Array,
    v_win_BSKH: Array,
    gates_BN3: Array,
    cache_len_B: Array,
    cmp_block: int = CMP_BLOCK,
    cmp_stride: int = CMP_STRIDE,
    slc_block: int = SLC_BLOCK,
    num_selected: int = NUM_SELECTED,
    num_init: int = 1,
    num_local: int = 2,
    window: int = WINDOW,
    scale: float | None = None,
    window_ring_buffer: bool = False,
    return_block_indices: bool = False,
) -> Array | tuple[Array, Array, Array]:
    """NSA for one new token at position ``cache_len - 1`` against the three branches' caches.

    Equals row ``cache_len - 1`` of `nsa_attention` on the whole sequence. Reads
    ``floor((s - l) / d) + 1`` compressed entries, at most ``n * l'`` selected tokens and ``w``
    window tokens (`nsa_decode_tokens`).

    Args:
      q_BNH: the new token's queries [B, N, H].
      k_cmp_BMKH, v_cmp_BMKH: compressed caches [B, M_max, K, H] (`nsa_update_compressed_cache`;
        entries not yet complete are invisible and may hold anything).
      k_slc_BSKH, v_slc_BSKH: selection caches [B, S_max, K, H], position p at slot p.
      k_win_BSKH, v_win_BSKH: window caches (linear, or a ring buffer with
        ``window_ring_buffer=True``).
      gates_BN3: gates (cmp, slc, win) in [0, 1].
      cache_len_B: int [B] (or scalar): positions held, the new token included.
      Other arguments: as `nsa_attention`.

    Returns:
      [B, N, H] in q's dtype (and ``(idx_BKn, valid_BKn)`` when asked).
    """
    B, N, H = q_BNH.shape
    K, S_max = k_slc_BSKH.shape[2], k_slc_BSKH.shape[1]
    _check_heads(q_BNH, k_cmp_BMKH, k_slc_BSKH, k_win_BSKH)
    scale = default_scale(H, scale)
    pos_B1 = (jnp.broadcast_to(jnp.asarray(cache_len_B, jnp.int32), (B,)) - 1)[:, None]
    q_B1NH = q_BNH[:, None]
    o_cmp, _, probs = nsa_compressed_attention(
        q_B1NH,
        k_cmp_BMKH,
        v_cmp_BMKH,
        cmp_block=cmp_block,
        cmp_stride=cmp_stride,
        scale=scale,
        q_positions_BT=pos_B1,
    )
    imp = nsa_block_importance(
        probs,
        num_kv_heads=K,
        num_slc_blocks=ceil_div(S_max, slc_block),
        cmp_block=cmp_block,
        cmp_stride=cmp_stride,
        slc_block=slc_block,
        implementation=_importance_form(
            dict(cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block)
        ),
    )
    idx, valid = nsa_select_blocks(
        imp,
        slc_block=slc_block,
        num_selected=num_selected,
        num_init=num_init,
        num_local=num_local,
        q_positions_BT=pos_B1,
    )
    o_slc, _ = block_sparse_attention(
        q_B1NH,
        k_slc_BSKH,
        v_slc_BSKH,
        idx,
        valid,
        block=slc_block,
        scale=scale,
        q_positions_BT=pos_B1,
        tile=1,
    )
    o_win, _ = nsa_window_decode(
        q_BNH,
        k_win_BSKH,
        v_win_BSKH,
        cache_len_B,
        window=window,
        scale=scale,
        ring_buffer=window_ring_buffer,
    )
    out = _combine(gates_BN3, o_cmp[:, 0], o_slc[:, 0], o_win, q_BNH.dtype)
    if return_block_indices:
        return out, idx[:, 0], valid[:, 0]
    return out
