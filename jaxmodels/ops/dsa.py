"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2), pure JAX: lightning indexer, shared top-k
selection, sparse attention over gathered latent entries, indexer losses, decode helpers.

Follows DeepSeek-V3.2 (DeepSeek_V3_2.pdf §1 eqs. 1–2 and §2.1; arXiv 2512.02556) and class
`Indexer` of deepseek-ai/DeepSeek-V3.2-Exp `inference/model.py` (with the 2025-11-17 erratum:
the indexer's RoPE is non-interleaved); facts in reference/attention.md §2.1–2.2, oracles §8.2.

Lightning indexer (eq. 1). For query token t and a visible key token s::

    I[t, s] = sum_j w[t, j] * relu(q_I[t, j] · k_I[s])

with J indexer heads of dim Ih. ``q_I`` comes from the MLA query latent c^Q, ``w`` from the
layer input, ``k_I`` = partial-RoPE(LayerNorm(W_k x)) is one key per token shared by the J heads.
The indexer's RoPE rotates its **first** R dims in the **half-split** layout (MLA rotates its last
R dims, interleaved) — `indexer_partial_rope`. V3.2's Hadamard rotation of q_I and k_I and the
FP8 quantisation are omitted: without FP8 the scores are invariant to the (orthonormal) rotation.
V3.2 scales the head weights by ``J^-0.5 * Ih^-0.5`` (`indexer_head_weights`), which matters
for the indexer loss (softmax over I) but not for the selection.

Selection (eq. 2). Per query the ``topk`` visible keys with the largest I are kept — one index set
per token per layer, shared by every query head (DSA runs on the MQA form of MLA). With fewer
visible keys than ``topk`` all visible keys are kept (the demo's ``min(topk, end_pos)``), so
``topk >= visible`` reproduces dense causal attention. Ties go to the lower key index
(``jax.lax.top_k``), so the selection is deterministic. Indices are int32 ``[B, T, k]`` with
``k = min(topk, S)``, ``-1`` marking an empty slot (as flash-linear-attention ``naive_dsa``).

Sparse attention. The main attention runs over latent entries ``kv[s] = [c_kv_s ; k_rope_s]``
(width X = C + R) shared by all heads; the query is ``[q̃ ; q_rope]`` (q̃ = W_UK q_nope, the
absorbed form) and the value is ``kv[s][:value_dim]`` (= c_kv), as FlashMLA's sparse kernels.
``implementation="gather"`` processes query blocks and gathers the k selected entries per query
(memory ~ block_q·k·X per block; the [T, S] score matrix is never built); ``"reference"``
builds the dense [T, S] mask from the indices and runs masked softmax attention.

`dsa_attention` fuses indexer, selection and attention per query block (block_q queries against
the keys they can see), so neither the [T, S] indexer scores nor the [T, S] attention scores
exist at once: memory is O(block_q · (J · S + k · X) + T · N · V) — plus T · k for the
selection when it is returned — instead of O(N · T · S).

Indexer losses (§2.1). Target: the main attention probabilities summed over heads and
L1-normalised, ``p[t, :]``. Dense warm-up: ``KL(p[t, :] || softmax(I[t, :]))`` over the visible
keys; sparse stage: the same restricted to the selected set S_t. `indexer_kl` gives the per-token
KL; stop gradients (target, indexer input) are the caller's business.

Letters: B batch, T queries, S keys, N heads, X latent entry width (C + R), V value dim,
J indexer heads, I indexer head dim (``Ih`` in prose), k selected slots.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops import norms
from jaxmodels.ops import rope as rope_ops

Array = jax.Array

IMPLEMENTATIONS = ("gather", "reference")

__all__ = [
    "IMPLEMENTATIONS",
    "attention_target",
    "decode_topk",
    "dsa_attention",
    "dsa_select",
    "gather_attention",
    "indexer_head_weights",
    "indexer_key",
    "indexer_kl",
    "indexer_partial_rope",
    "indexer_scores",
    "indices_to_mask",
    "select_topk",
    "sparse_attention",
    "write_indexer_cache",
]


# --------------------------------------------------------------------------------------------
# Lightning indexer
# --------------------------------------------------------------------------------------------


def indexer_partial_rope(
    x: Array,
    positions_BT: Array,
    inv_freq: Array | np.ndarray,
    *,
    attention_scaling: float = 1.0,
) -> Array:
    """RoPE on the first R = 2·len(inv_freq) dims of ``x`` in the half-split layout.

    The indexer's layout (V3.2-Exp ``Indexer``, after the erratum; Hugging Face
    ``DeepseekV32Indexer``): ``[rope | nope]`` with rope FIRST and non-interleaved — the opposite
    of MLA's ``[nope | rope]`` interleaved layout (reference/attention.md §2.1, §7 item 1).

    Args:
      x: [B, T, ..., Ih] (e.g. [B, T, J, Ih] queries or [B, T, Ih] keys), Ih >= R.
      positions_BT: [B, T] positions.
      inv_freq: [R/2] inverse frequencies (the MLA rope's, YaRN included).
      attention_scaling: cos/sin multiplier (Hugging Face's YaRN mscale ratio; 1 for DeepSeek).
    """
    rope_dim = 2 * len(inv_freq)
    if x.shape[-1] < rope_dim:
        raise ValueError(f"indexer head dim {x.shape[-1]} is smaller than the rope dim {rope_dim}")
    rotated = rope_ops.apply_rope(
        x[..., :rope_dim],
        positions_BT,
        inv_freq,
        layout="half",
        attention_scaling=attention_scaling,
    )
    return jnp.concatenate([rotated, x[..., rope_dim:]], axis=-1)


def indexer_key(
    k_BSI: Array,
    norm_scale_I: Array,
    norm_bias_I: Array,
    positions_BS: Array,
    inv_freq: Array | np.ndarray,
    *,
    eps: float = 1e-6,
    attention_scaling: float = 1.0,
) -> Array:
    """The indexer key ``partial_rope(LayerNorm(W_k x))`` [B, S, Ih] from ``k_BSI = W_k x``.

    LayerNorm with gain and bias, eps 1e-6 (V3.2-Exp ``Indexer.k_norm``; reference §7 item 4).
    """
    k_BSI = norms.layer_norm(k_BSI, norm_scale_I, norm_bias_I, eps=eps)
    return indexer_partial_rope(k_BSI, positions_BS, inv_freq, attention_scaling=attention_scaling)


def indexer_head_weights(w_BTJ: Array, head_dim: int) -> Array:
    """V3.2's head-weight scaling: ``weights_proj(x) · J^-0.5 · Ih^-0.5`` (float32).

    (The demo multiplies by ``n_heads**-0.5`` and by ``softmax_scale = head_dim**-0.5``; Hugging
    Face scales the dot product instead — the same I since ReLU commutes with a positive scale.)
    """
    num_heads = w_BTJ.shape[-1]
    return w_BTJ.astype(jnp.float32) * (num_heads**-0.5 * head_dim**-0.5)


def indexer_scores(
    q_BTJI: Array, w_BTJ: Array, k_BSI: Array, mask_BTS: Array | None = None
) -> Array:
    """Index scores ``I[t, s] = sum_j w[t, j] relu(q[t, j] · k[s])`` [B, T, S] in float32.

    Args:
      q_BTJI: indexer queries (RoPE applied); w_BTJ: head weights (scaled, see
        `indexer_head_weights`); k_BSI: indexer keys (one per token, shared by the heads).
      mask_BTS: optional boolean visibility; invisible entries are ``-inf``.
    """
    dots_BTJS = jnp.einsum("BTJI,BSI->BTJS", q_BTJI, k_BSI, preferred_element_type=jnp.float32)
    scores_BTS = jnp.einsum("BTJS,BTJ->BTS", jax.nn.relu(dots_BTJS), w_BTJ.astype(jnp.float32))
    if mask_BTS is not None:
        scores_BTS = jnp.where(mask_BTS, scores_BTS, -jnp.inf)
    return scores_BTS


# --------------------------------------------------------------------------------------------
# Top-k selection
# --------------------------------------------------------------------------------------------


def select_topk(scores_BTS: Array, mask_BTS: Array | None, topk: int) -> Array:
    """The ``min(topk, S)`` highest-scoring visible keys per query, int32 [B, T, k].

    One index set per query token, shared by all query heads. Ties are broken towards the lower
    key index (`jax.lax.top_k` is stable), so the result is deterministic. Slots beyond the number
    of visible keys hold ``-1``; with ``topk >= visible`` every visible key is selected.

    Args:
      scores_BTS: index scores (any finite values where visible).
      mask_BTS: boolean visibility (None: all visible).
      topk: the selection budget (V3.2: 2048).
    """
    S = scores_BTS.shape[-1]
    k = min(topk, S)
    scores = scores_BTS.astype(jnp.float32)
    if mask_BTS is not None:
        scores = jnp.where(mask_BTS, scores, -jnp.inf)
    _, idx_BTk = jax.lax.top_k(scores, k)
    idx_BTk = idx_BTk.astype(jnp.int32)
    if mask_BTS is not None:
        visible = jnp.take_along_axis(jnp.broadcast_to(mask_BTS, scores.shape), idx_BTk, axis=-1)
        idx_BTk = jnp.where(visible, idx_BTk, -1)
    return idx_BTk


def indices_to_mask(idx_BTk: Array, num_keys: int) -> Array:
    """Boolean [B, T, S] with True at the selected keys (``-1`` slots select nothing)."""
    onehot = jax.nn.one_hot(idx_BTk, num_keys, dtype=jnp.bool_)  # -1 -> all False
    return jnp.any(onehot, axis=-2)


def _pad_slots(idx_BTk: Array, width: int, fill) -> Array:
    pad = width - idx_BTk.shape[-1]
    if pad <= 0:
        return idx_BTk
    return jnp.pad(idx_BTk, ((0, 0), (0, 0), (0, pad)), constant_values=fill)


# --------------------------------------------------------------------------------------------
# Sparse attention over selected latent entries
# --------------------------------------------------------------------------------------------


def attention_target(probs_BNTS: Array, axis: int = 1) -> Array:
    """Indexer training target: attention probabilities summed over heads, L1-normalised over
    the last axis (V3.2 §2.1). Rows without any mass stay 0. Returns float32 without ``axis``."""
    summed = jnp.sum(probs_BNTS.astype(jnp.float32), axis=axis)
    total = jnp.sum(summed, axis=-1, keepdims=True)
    return summed / jnp.where(total > 0, total, 1.0)


def _softmax(logits: Array, valid: Array, axis: int = -1) -> Array:
    logits = jnp.where(valid, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=axis, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=axis, keepdims=True)
    return weights / jnp.where(denom > 0, denom, 1.0)


def gather_attention(
    q_BTNX: Array, kv_BSX: Array, idx_BTk: Array, *, value_dim: int, scale: float
) -> tuple[Array, Array]:
    """Attention of every query over its own k gathered entries (one block; no [T, S] array).

    Args:
      q_BTNX: queries ``[q̃ ; q_rope]`` (absorbed MLA form), width X.
      kv_BSX: latent entries ``[c_kv ; k_rope]``, one per key, shared by the N heads.
      idx_BTk: selected key indices, ``-1`` = empty slot.
      value_dim: V; the value of key s is ``kv[s, :V]`` (the latent c_kv).
      scale: softmax scale.

    Returns:
      ``(out_BTNV float32, target_BTk float32)``: the attention output and the head-summed,
      L1-normalised attention probabilities over the selected slots (the sparse-stage target).
    """
    valid_BTk = idx_BTk >= 0
    safe_BTk = jnp.where(valid_BTk, idx_BTk, 0)
    sel_BTkX = jax.vmap(lambda kv_SX, i_Tk: kv_SX.at[i_Tk].get(mode="promise_in_bounds"))(
        kv_BSX, safe_BTk
    )
    # Selected slots as the long (row) axis of each per-query product: [k, X] x [X, N] is a far
    # better matmul shape for XLA:CPU than [N, X] x [X, k] (N is small; 1.6x faster measured).
    logits_BTkN = jnp.einsum(
        "BTkX,BTNX->BTkN", sel_BTkX.astype(q_BTNX.dtype), q_BTNX, preferred_element_type=jnp.float32
    )
    probs_BTkN = _softmax(logits_BTkN * scale, valid_BTk[..., None], axis=2)
    out_BTNV = jnp.einsum(
        "BTkN,BTkV->BTNV",
        probs_BTkN.astype(kv_BSX.dtype),
        sel_BTkX[..., :value_dim],
        preferred_element_type=jnp.float32,
    )
    return out_BTNV, attention_target(probs_BTkN, axis=3)


def _dense_sparse_attention(
    q_BTNX: Array, kv_BSX: Array, idx_BTk: Array, *, value_dim: int, scale: float
) -> tuple[Array, Array]:
    """Reference: the dense [T, S] mask of the selection, masked softmax over all S keys."""
    sel_BTS = indices_to_mask(idx_BTk, kv_BSX.shape[1])
    logits_BNTS = jnp.einsum(
        "BTNX,BSX->BNTS", q_BTNX, kv_BSX.astype(q_BTNX.dtype), preferred_element_type=jnp.float32
    )
    probs_BNTS = _softmax(logits_BNTS * scale, sel_BTS[:, None])
    out_BTNV = jnp.einsum(
        "BNTS,BSV->BTNV",
        probs_BNTS.astype(kv_BSX.dtype),
        kv_BSX[..., :value_dim],
        preferred_element_type=jnp.float32,
    )
    target_BTS = attention_target(probs_BNTS, axis=1)
    return out_BTNV, jnp.take_along_axis(target_BTS, jnp.maximum(idx_BTk, 0), axis=-1) * (
        idx_BTk >= 0
    )


def sparse_attention(
    q_BTNX: Array,
    kv_BSX: Array,
    idx_BTk: Array,
    *,
    value_dim: int,
    scale: float,
    implementation: str = "gather",
    block_q: int = 128,
) -> tuple[Array, Array]:
    """Attention restricted to given selections (shared by the heads), in query blocks.

    Args:
      q_BTNX, kv_BSX, idx_BTk, value_dim, scale: as `gather_attention`.
      implementation: "gather" (query blocks of ``block_q``, k gathered entries per query) or
        "reference" (dense [T, S] mask over all keys).

    Returns:
      ``(out_BTNV, target_BTk)`` float32, see `gather_attention`.
    """
    _check_implementation(implementation)
    if implementation == "reference":
        return _dense_sparse_attention(q_BTNX, kv_BSX, idx_BTk, value_dim=value_dim, scale=scale)
    B, T = q_BTNX.shape[:2]
    Tp = _round_up(T, min(block_q, T))
    nb = Tp // min(block_q, T)

    def blocks(x, fill=0):
        x = jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape((B, nb, Tp // nb) + x.shape[2:]), 1, 0)

    def one(args):
        q, idx = args
        return gather_attention(q, kv_BSX, idx, value_dim=value_dim, scale=scale)

    out, target = jax.lax.map(one, (blocks(q_BTNX), blocks(idx_BTk, -1)))
    return _unblock(out, T), _unblock(target, T)


# --------------------------------------------------------------------------------------------
# Fused indexer + selection + attention
# --------------------------------------------------------------------------------------------


def _visibility(B, T, S, q_positions_BT, kv_positions_BS, kv_valid_BS):
    causal_self = q_positions_BT is None
    if causal_self and T != S:
        raise ValueError(f"q_positions_BT=None means self-attention (T == S); got T={T}, S={S}")
    if causal_self:
        q_positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    if kv_positions_BS is None:
        kv_positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
    if kv_valid_BS is None:
        kv_valid_BS = jnp.ones((B, S), jnp.bool_)
    return causal_self, q_positions_BT, kv_positions_BS, kv_valid_BS


def _select_block(iq, iw, qpos, ik, kvpos, kvvalid, *, topk):
    """One query block: visibility from positions, index scores, top-k (+ their scores)."""
    mask_BTS = (kvpos[:, None, :] <= qpos[:, :, None]) & kvvalid[:, None, :]
    scores_BTS = indexer_scores(iq, iw, ik, mask_BTS)
    idx_BTk = select_topk(scores_BTS, mask_BTS, topk)
    sel_scores = jnp.take_along_axis(scores_BTS, jnp.maximum(idx_BTk, 0), axis=-1)
    return idx_BTk, jnp.where(idx_BTk >= 0, sel_scores, -jnp.inf)


def _run_blocked(fn, q_args, kv_args, *, causal_self, block_q, num_prefix_chunks):
    """Runs ``fn(*q_block_args, *kv_args)`` over query blocks and concatenates along T.

    ``q_args`` are [B, T, ...] arrays whose last entry is the query positions, ``kv_args``
    [B, S, ...] arrays. Blocks of ``block_q`` queries run sequentially (`jax.lax.map`), so only
    one block's temporaries are live. With ``causal_self`` (query i is key i, sees keys <= i) the
    queries are first split into ``num_prefix_chunks`` chunks, each against the key prefix up to
    its end only (static slices: about half the work of scoring every key).
    """
    T = q_args[0].shape[1]
    bq = min(block_q, T)
    if causal_self:
        chunk = bq * max(1, math.ceil(math.ceil(T / bq) / num_prefix_chunks))
        spans = [
            (start, min(start + chunk, T), min(start + chunk, T)) for start in range(0, T, chunk)
        ]
    else:
        spans = [(0, T, kv_args[0].shape[1])]
    parts = []
    for start, stop, end in spans:
        q_part = tuple(x[:, start:stop] for x in q_args)
        kv_part = tuple(x[:, :end] for x in kv_args)
        parts.append(_map_blocks(fn, q_part, kv_part, bq))
    return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts, strict=True))


def dsa_select(
    iq_BTJI: Array,
    iw_BTJ: Array,
    ik_BSI: Array,
    *,
    topk: int,
    q_positions_BT: Array | None = None,
    kv_positions_BS: Array | None = None,
    kv_valid_BS: Array | None = None,
    block_q: int = 128,
    num_prefix_chunks: int = 8,
) -> tuple[Array, Array]:
    """The lightning indexer's selection alone, in query blocks (no [T, S] array).

    Visibility and blocking as `dsa_attention`. Returns ``(indices, scores)``: int32 [B, T, k]
    (k = min(topk, S), -1 = empty) and the float32 index scores at those slots (-inf if empty).
    """
    B, T = iq_BTJI.shape[:2]
    S = ik_BSI.shape[1]
    causal_self, qpos, kvpos, kvvalid = _visibility(
        B, T, S, q_positions_BT, kv_positions_BS, kv_valid_BS
    )
    width = min(topk, S)

    def block(iq, iw, qpos, ik, kvpos, kvvalid):
        idx, sel = _select_block(iq, iw, qpos, ik, kvpos, kvvalid, topk=topk)
        return _pad_slots(idx, width, -1), _pad_slots(sel, width, -jnp.inf)

    return _run_blocked(
        block,
        (iq_BTJI, iw_BTJ, qpos),
        (ik_BSI, kvpos, kvvalid),
        causal_self=causal_self,
        block_q=block_q,
        num_prefix_chunks=num_prefix_chunks,
    )


def dsa_attention(
    q_BTNX: Array,
    kv_BSX: Array,
    iq_BTJI: Array,
    iw_BTJ: Array,
    ik_BSI: Array,
    *,
    topk: int,
    value_dim: int,
    scale: float,
    q_positions_BT: Array | None = None,
    kv_positions_BS: Array | None = None,
    kv_valid_BS: Array | None = None,
    implementation: str = "gather",
    block_q: int = 128,
    num_prefix_chunks: int = 8,
    return_aux: bool = False,
):
    """DSA: lightning-indexer scores, shared top-k selection, attention over the selection.

    Visibility. With ``q_positions_BT=None`` the T queries are the S keys (T == S; training and
    prefill into an empty cache): token i sees keys j <= i. The "gather" form then splits the
    queries into ``num_prefix_chunks`` chunks that score only the keys up to their end (about
    half the indexer work of scoring all S). Otherwise key s is visible to query t iff
    ``kv_positions[s] <= q_positions[t]`` and ``kv_valid[s]`` (cached prefill / decode; slots
    default to positions 0..S-1).

    Args:
      q_BTNX: main queries ``[q̃ ; q_rope]`` (absorbed MLA form); kv_BSX: latent entries
        ``[c_kv ; k_rope]``; value = ``kv[..., :value_dim]``.
      iq_BTJI, iw_BTJ, ik_BSI: indexer queries (RoPE'd), scaled head weights, keys (RoPE'd).
      topk: selection budget; scale: main softmax scale.
      implementation: "gather" — query blocks of ``block_q``, each scoring its keys, selecting
        and gathering k entries (no [T, S] array; memory O(block_q · (J · S + k · X) + T · N · V));
        "reference" — dense [T, S] index scores, dense masked attention.
      return_aux: also return the selection and the sparse-stage loss inputs.

    Returns:
      ``out_BTNV`` (float32), or ``(out_BTNV, aux)`` with aux = {"indices": int32 [B, T, k]
      (-1 = empty, k = min(topk, S)), "scores": index scores at the selected slots [B, T, k]
      (-inf where empty), "target": head-summed L1-normalised main-attention probabilities at
      the selected slots [B, T, k]}.
    """
    _check_implementation(implementation)
    B, T = q_BTNX.shape[:2]
    S = kv_BSX.shape[1]
    causal_self, qpos, kvpos, kvvalid = _visibility(
        B, T, S, q_positions_BT, kv_positions_BS, kv_valid_BS
    )
    width = min(topk, S)
    attend = gather_attention if implementation == "gather" else _dense_sparse_attention

    def block(q, iq, iw, qpos, kv, ik, kvpos, kvvalid):
        idx, sel = _select_block(iq, iw, qpos, ik, kvpos, kvvalid, topk=topk)
        out, target = attend(q, kv, idx, value_dim=value_dim, scale=scale)
        return (
            out,
            _pad_slots(idx, width, -1),
            _pad_slots(sel, width, -jnp.inf),
            _pad_slots(target, width, 0.0),
        )

    q_args = (q_BTNX, iq_BTJI, iw_BTJ, qpos)
    kv_args = (kv_BSX, ik_BSI, kvpos, kvvalid)
    if implementation == "reference":
        results = block(*q_args, *kv_args)
    else:
        results = _run_blocked(
            block,
            q_args,
            kv_args,
            causal_self=causal_self,
            block_q=block_q,
            num_prefix_chunks=num_prefix_chunks,
        )
    out, idx, sel_scores, target = results
    if not return_aux:
        return out
    return out, {"indices": idx, "scores": sel_scores, "target": target}


def _map_blocks(fn, q_args, kv_args, bq):
    """`jax.lax.map` of ``fn`` over query blocks of ``bq``; the last of ``q_args`` are the
    positions, padded with -1 (padded rows see nothing and are dropped)."""
    B, T = q_args[0].shape[:2]
    Tp = _round_up(T, bq)
    nb = Tp // bq

    def blocks(x, fill):
        x = jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape((B, nb, bq) + x.shape[2:]), 1, 0)

    fills = (0,) * (len(q_args) - 1) + (-1,)
    blocked = tuple(blocks(x, f) for x, f in zip(q_args, fills, strict=True))
    if nb == 1:
        outs = fn(*(x[0] for x in blocked), *kv_args)
        return tuple(o[:, :T] for o in outs)
    outs = jax.lax.map(lambda a: fn(*a, *kv_args), blocked)
    return tuple(_unblock(o, T) for o in outs)


def _unblock(x_nB_bq, T):
    nb, B, bq = x_nB_bq.shape[:3]
    x = jnp.moveaxis(x_nB_bq, 0, 1).reshape((B, nb * bq) + x_nB_bq.shape[3:])
    return x[:, :T]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")


# --------------------------------------------------------------------------------------------
# Indexer losses
# --------------------------------------------------------------------------------------------


def indexer_kl(target_BTS: Array, scores_BTS: Array, valid_BTS: Array) -> Array:
    """Per-query ``KL(target[t] || softmax(scores[t]))`` over the valid entries, [B, T] float32.

    Dense warm-up (V3.2 §2.1): target = head-summed L1-normalised main attention over all
    visible keys, scores = index scores over the same keys. Sparse stage: both restricted to the
    selected set (``valid = indices >= 0``). Entries with target 0 contribute 0; rows without a
    valid entry give 0. Gradients reach ``scores`` (and ``target``, which callers stop).
    """
    valid = jnp.broadcast_to(valid_BTS, scores_BTS.shape)
    scores = jnp.where(valid, scores_BTS.astype(jnp.float32), -jnp.inf)
    row_has = jnp.any(valid, axis=-1, keepdims=True)
    scores = jnp.where(row_has, scores, 0.0)
    log_q = jax.nn.log_softmax(scores, axis=-1)
    p = jnp.where(valid, target_BTS.astype(jnp.float32), 0.0)
    pos = p > 0
    log_p = jnp.log(jnp.where(pos, p, 1.0))
    kl = jnp.where(pos, p * (log_p - jnp.where(pos, log_q, 0.0)), 0.0)
    return jnp.sum(kl, axis=-1)


# --------------------------------------------------------------------------------------------
# Decode helpers
# --------------------------------------------------------------------------------------------


def write_indexer_cache(cache_BSI: Array, k_BTI: Array, index: Array) -> Array:
    """Writes the T new indexer keys into the cache at slot ``index`` (slot s = position s)."""
    return jax.lax.dynamic_update_slice(cache_BSI, k_BTI.astype(cache_BSI.dtype), (0, index, 0))


def decode_topk(
    iq_BTJI: Array, iw_BTJ: Array, ik_cache_BSI: Array, mask_BTS: Array, topk: int
) -> Array:
    """Top-k over the cached indexer keys for new tokens (decode: T = 1), int32 [B, T, k].

    ``mask_BTS`` marks filled cache slots not after each query (e.g. `gqa.cache_mask`).
    """
    scores_BTS = indexer_scores(iq_BTJI, iw_BTJ, ik_cache_BSI.astype(iq_BTJI.dtype), mask_BTS)
    return select_topk(scores_BTS, mask_BTS, topk)
