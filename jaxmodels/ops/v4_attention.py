"""DeepSeek-V4 hybrid attention math (pure functions): compressor, block causality, the lightning
indexer over compressed entries, sliding-window + compressed attention with a sink, inverse RoPE
and the grouped low-rank output projection.

Follows DeepSeek-V4 (README "hybrid attention: CSA + HCA"; deepseek-ai/DeepSeek-V4-Flash
`inference/model.py` classes `Attention`, `Compressor`, `Indexer`) and the Hugging Face port
(`transformers/models/deepseek_v4/modeling_deepseek_v4.py`: `DeepseekV4Attention`,
`DeepseekV4HCACompressor`, `DeepseekV4CSACompressor`, `DeepseekV4Indexer`). Facts and oracles:
reference/attention.md §2.4 and §8.3.

The lightning-indexer scores and the top-k selection are DeepSeek Sparse Attention's
(`jaxmodels.ops.dsa`), applied to compressed entries instead of tokens.

One attention layer sees, for query t, the union of
  * a sliding window: the last `window` tokens including t (one shared KV head, key == value);
  * compressed entries (ratio r > 0): entry e pools tokens [e r, (e + 1) r) and is visible to t
    only once complete, i.e. e < floor((t + 1) / r) (`num_visible_entries`);
    - HCA (r = 128): every visible entry;
    - CSA (r = 4, overlapping windows): the `index_topk` visible entries with the highest
      lightning-indexer score;
  * a learned per-head sink logit (adds exp(sink_n) to the softmax denominator, value 0).

Indexer training (DeepSeek-V3.2 §2.1, as `jaxmodels.ops.dsa`): with `return_aux=True` the
attention also returns the inputs of the indexer KL over the selected entries (`ops.dsa.indexer_kl`,
DSA's `dsa_attention` aux layout): the index scores and the target, i.e. the main attention's
probabilities (window, sink and all) at the selected compressed entries, summed over heads and
L1-normalised. A dense warm-up selects every visible entry (top-k >= P).

Dimension letters (beyond the project table): P compressed entries, W positions pooled into one
entry (r, or 2r for the overlapping form), X projected compressor width (H, or 2H overlapping),
I indexer head dim, n indexer heads (`_BTn`), k selected entries, O o_lora_rank, G o_groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.ops import dsa
from jaxmodels.ops import rope as rope_ops
from jaxmodels.ops.attention import attention_reference
from jaxmodels.ops.block_sparse import (
    banded_attention,
    masked_attention,
    merge_attention,
    softmax_with_lse,
)

Array = jax.Array
IMPLEMENTATIONS = ("reference", "blocked")

# --------------------------------------------------------------------------------------------
# Partial RoPE (interleaved pairs on the trailing rope dims, as V4)
# --------------------------------------------------------------------------------------------


def apply_partial_rope(
    x: Array, positions_BT: Array, inv_freq: np.ndarray, *, inverse: bool = False
) -> Array:
    """Interleaved RoPE on the last `2 * len(inv_freq)` dims of `x`; the leading dims pass.

    V4 lays each head out as [nope | rope] and rotates adjacent pairs (reference/attention.md §7
    trap 1). `inverse=True` rotates by -position: V4's de-rotation of the attention output,
    whose rope dims carry the values' rotations (`apply_rotary_pos_emb(o, cos, -sin)`).

    Args:
      x: [B, T, ..., H]; positions_BT: [B, T] integer positions.
      inv_freq: [R/2] inverse frequencies.
    """
    rope_dim = 2 * len(inv_freq)
    pos = -positions_BT if inverse else positions_BT
    rotated = rope_ops.apply_rope(x[..., -rope_dim:], pos, inv_freq, layout="interleaved")
    return jnp.concatenate([x[..., :-rope_dim], rotated], axis=-1)


# --------------------------------------------------------------------------------------------
# Compressor: learned gated pooling of every r tokens into one entry
# --------------------------------------------------------------------------------------------


def gated_pool(kv_BPWX: Array, score_BPWX: Array) -> Array:
    """Per-channel softmax pooling over the W positions of each entry, float32 [B, P, X].

    `entry[p, x] = sum_w softmax_w(score[p, :, x])[w] * kv[p, w, x]`. Scores of -inf give a weight
    of 0; a channel whose scores are all -inf pools to 0 (no NaN).
    """
    s = score_BPWX.astype(jnp.float32)
    top = jnp.max(s, axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(s - top)
    denom = jnp.sum(w, axis=2, keepdims=True)
    probs = w / jnp.where(denom == 0, 1.0, denom)
    return jnp.sum(probs * kv_BPWX.astype(jnp.float32), axis=2)


def compress_tokens(
    kv_BTX: Array,
    gate_BTX: Array,
    position_bias_rX: Array,
    *,
    ratio: int,
    overlap: bool,
    valid_BT: Array | None = None,
) -> Array:
    """Pools the complete blocks of r tokens of a sequence into entries, float32 [B, T // r, H].

    The gate score of a token is `gate + position_bias[pos mod r]` (the learned positional bias,
    `ape` in the official code); the softmax runs per channel over the tokens of the entry.

    Non-overlapping (HCA, X = H): entry e pools block e = tokens [e r, (e + 1) r).
    Overlapping (CSA, ratio 4, X = 2H): entry e pools 2r tokens: the first H channels of block
    e - 1 and the last H channels of block e; block -1 has score -inf (weight 0).

    Args:
      kv_BTX, gate_BTX: per-token projections; tokens after the last complete block are ignored.
      position_bias_rX: [r, X] learned bias.
      valid_BT: optional; invalid tokens get score -inf (the cache's not-yet-seen slots).
    """
    B, T, X = kv_BTX.shape
    P = T // ratio
    if P == 0:
        return jnp.zeros((B, 0, X // 2 if overlap else X), jnp.float32)
    kv = kv_BTX[:, : P * ratio].reshape(B, P, ratio, X)
    score = gate_BTX[:, : P * ratio].reshape(B, P, ratio, X).astype(jnp.float32)
    score = score + position_bias_rX.astype(jnp.float32)
    if valid_BT is not None:
        valid_BPr = valid_BT[:, : P * ratio].reshape(B, P, ratio)
        score = jnp.where(valid_BPr[..., None], score, -jnp.inf)
    if not overlap:
        return gated_pool(kv, score)
    if X % 2:
        raise ValueError(f"overlapping compression needs an even projected width, got {X}")
    H = X // 2
    prev_kv = jnp.pad(kv[:, :-1, :, :H], ((0, 0), (1, 0), (0, 0), (0, 0)))
    prev_score = jnp.pad(
        score[:, :-1, :, :H], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf
    )
    window_kv = jnp.concatenate([prev_kv, kv[..., H:]], axis=2)
    window_score = jnp.concatenate([prev_score, score[..., H:]], axis=2)
    return gated_pool(window_kv, window_score)


def compress_tokens_reference(
    kv_BTX: Array, gate_BTX: Array, position_bias_rX: Array, *, ratio: int, overlap: bool
) -> Array:
    """Entry-by-entry loop form of `compress_tokens` (the test oracle), float32 [B, T // r, H]."""
    B, T, X = kv_BTX.shape
    H = X // 2 if overlap else X
    entries = []
    for e in range(T // ratio):
        cur = slice(e * ratio, (e + 1) * ratio)
        s = gate_BTX[:, cur].astype(jnp.float32) + position_bias_rX
        kv = kv_BTX[:, cur].astype(jnp.float32)
        if overlap:
            kv, s = kv[..., H:], s[..., H:]
            if e > 0:
                prev = slice((e - 1) * ratio, e * ratio)
                s_prev = gate_BTX[:, prev].astype(jnp.float32) + position_bias_rX
                kv = jnp.concatenate([kv_BTX[:, prev, :H].astype(jnp.float32), kv], axis=1)
                s = jnp.concatenate([s_prev[..., :H], s], axis=1)
        entries.append(jnp.sum(jax.nn.softmax(s, axis=1) * kv, axis=1))
    if not entries:
        return jnp.zeros((B, 0, H), jnp.float32)
    return jnp.stack(entries, axis=1)


def num_visible_entries(positions_BT: Array, ratio: int) -> Array:
    """Complete compressed entries a query at position t may see: floor((t + 1) / r)."""
    return (positions_BT + 1) // ratio


def entry_visibility(q_positions_BT: Array, entry_end_BP: Array) -> Array:
    """Boolean [B, T, P]: entry p is visible to query t iff its last token's position <= t.

    With entries of blocks [e r, (e + 1) r) this is e < floor((t + 1) / r).
    """
    return entry_end_BP[:, None, :] <= q_positions_BT[:, :, None]


# --------------------------------------------------------------------------------------------
# Lightning indexer over compressed entries (CSA)
# --------------------------------------------------------------------------------------------


def indexer_scores(q_BTnI: Array, w_BTn: Array, k_BPI: Array, *, scale: float) -> Array:
    """Lightning-indexer scores [B, T, P] float32: `sum_h w[t, h] * relu(q[t, h] . k[p]) * scale`.

    DeepSeek-V3.2 eq. 1 (`jaxmodels.ops.dsa.indexer_scores`) over V4's compressed indexer keys
    (`DeepseekV4IndexerScorer`): `w` carries index_n_heads^-0.5, `scale` is index_head_dim^-0.5
    (folded into the weights: ReLU commutes with a positive scale).
    """
    return dsa.indexer_scores(q_BTnI, w_BTn.astype(jnp.float32) * scale, k_BPI)


def topk_entries(scores_BTP: Array, visible_BTP: Array, k: int) -> tuple[Array, Array]:
    """The k best visible entries per query: (indices int32 [B, T, k], valid bool [B, T, k]).

    `jaxmodels.ops.dsa.select_topk` (ties to the lower index); a slot is valid iff it points at a
    visible entry, so a query with fewer than k visible entries keeps all of them (the official
    `min(topk, end_pos)`). Invalid slots hold index 0.
    """
    idx = dsa.select_topk(scores_BTP, visible_BTP, k)
    return jnp.maximum(idx, 0), idx >= 0


def selection_mask(idx_BTk: Array, valid_BTk: Array, num_entries: int) -> Array:
    """Boolean [B, T, P] with True at the valid selected entries."""
    return dsa.indices_to_mask(jnp.where(valid_BTk, idx_BTk, -1), num_entries)


@dataclasses.dataclass(frozen=True)
class IndexerInputs:
    """What CSA's top-k selection needs: indexer queries, head weights, compressed keys.

    q_BTnI: rotated indexer queries; w_BTn: head weights (× n^-0.5); k_BPI: compressed indexer
    keys (slot-aligned with the compressed KV entries); topk: `index_topk` (>= P: every visible
    entry, the dense warm-up); scale: I^-0.5.
    """

    q_BTnI: Array
    w_BTn: Array
    k_BPI: Array
    topk: int
    scale: float


# --------------------------------------------------------------------------------------------
# Attention over window + compressed entries, with a sink
# --------------------------------------------------------------------------------------------


def _selection_aux(scores_BTP, idx_BTk, valid_BTk, target_BTk):
    """The indexer-KL inputs in `ops.dsa.dsa_attention`'s aux layout: {"indices": int32 [B,T,k]
    (-1 = empty slot), "scores": index scores at the slots (-inf where empty), "target"}."""
    sel_BTk = jnp.take_along_axis(scores_BTP, idx_BTk, axis=-1)
    return {
        "indices": jnp.where(valid_BTk, idx_BTk, -1),
        "scores": jnp.where(valid_BTk, sel_BTk, -jnp.inf),
        "target": jnp.where(valid_BTk, target_BTk, 0.0),
    }


def _no_entries_aux(B, T):
    """`_selection_aux` before any compressed entry exists (k = 0)."""
    empty_BT0 = jnp.zeros((B, T, 0), jnp.float32)
    return {"indices": empty_BT0.astype(jnp.int32), "scores": empty_BT0, "target": empty_BT0}


def _check_aux(return_aux, indexer):
    if return_aux and indexer is None:
        raise ValueError("return_aux=True needs the CSA indexer (indexer=IndexerInputs(...))")


def window_mask(q_positions_BT: Array, kv_positions_BS: Array, window: int) -> Array:
    """[B, T, S]: 0 <= t - s < window and s >= 0 (negative positions mark empty slots)."""
    q = q_positions_BT[:, :, None]
    kv = kv_positions_BS[:, None, :]
    return (kv <= q) & (q - kv < window) & (kv >= 0)


def sink_rescale(lse_BTN: Array, sink_N: Array) -> Array:
    """The factor 1 / (1 + exp(sink - lse)) a sink applies to ordinary attention (§8.3)."""
    return jax.nn.sigmoid(lse_BTN - sink_N.astype(jnp.float32))


def v4_attention_reference(
    q_BTNH: Array,
    kv_BTH: Array,
    positions_BT: Array,
    *,
    window: int,
    sink_N: Array,
    scale: float,
    ring_kv_BWH: Array | None = None,
    ring_positions_BW: Array | None = None,
    cmp_BPH: Array | None = None,
    cmp_end_BP: Array | None = None,
    indexer: IndexerInputs | None = None,
    return_aux: bool = False,
):
    """The simplest correct form: one softmax (with sink) over every candidate key, [B,T,N,H].

    Keys (= values, one shared head) are the concatenation of the cached window `ring_kv`
    (positions `ring_positions`, negative = empty), the new tokens `kv_BTH` (at
    `positions_BT`) and the compressed entries `cmp_BPH` (visible iff `cmp_end <= t`; CSA
    additionally keeps only the indexer's top-k, `indexer`).

    With `return_aux` (CSA only) also returns the indexer-KL inputs (`_selection_aux`): the
    target is read off the explicit [B, T, N, S] probabilities of this softmax.
    """
    _check_aux(return_aux, indexer)
    keys, masks = [], []
    if ring_kv_BWH is not None:
        keys.append(ring_kv_BWH.astype(kv_BTH.dtype))
        masks.append(window_mask(positions_BT, ring_positions_BW, window))
    keys.append(kv_BTH)
    masks.append(window_mask(positions_BT, positions_BT, window))
    if cmp_BPH is not None and cmp_BPH.shape[1]:
        visible = entry_visibility(positions_BT, cmp_end_BP)
        if indexer is not None:
            scores = indexer_scores(
                indexer.q_BTnI, indexer.w_BTn, indexer.k_BPI, scale=indexer.scale
            )
            k = min(indexer.topk, cmp_BPH.shape[1])
            idx, valid = topk_entries(scores, visible, k)
            visible = selection_mask(idx, valid, cmp_BPH.shape[1])
        keys.append(cmp_BPH.astype(kv_BTH.dtype))
        masks.append(visible)
    kv_BS1H = jnp.concatenate(keys, axis=1)[:, :, None, :]
    mask_BTS = jnp.concatenate(masks, axis=-1)
    out = attention_reference(q_BTNH, kv_BS1H, kv_BS1H, mask_BTS, scale=scale, sink_N=sink_N)
    if not return_aux:
        return out
    P = 0 if cmp_BPH is None else cmp_BPH.shape[1]
    if not P:
        return out, _no_entries_aux(*positions_BT.shape)
    logits_BTNS = jnp.einsum(
        "BTNH,BSH->BTNS", q_BTNH, kv_BS1H[:, :, 0], preferred_element_type=jnp.float32
    )
    probs_BTNS, lse_BTN = softmax_with_lse(logits_BTNS * scale, mask_BTS[:, :, None])
    probs_BTNS = probs_BTNS * sink_rescale(lse_BTN, sink_N)[..., None]  # the sink's share
    # the compressed entries are the last P keys; unselected ones already have probability 0
    target_BTP = dsa.attention_target(probs_BTNS[..., -P:], axis=2)
    return out, _selection_aux(scores, idx, valid, jnp.take_along_axis(target_BTP, idx, axis=-1))


def _gathered_attention(q_BTNH, cmp_BPH, idx_BTk, valid_BTk, *, scale):
    """Attention over the gathered selected entries only: (out [B,T,N,H] f32, lse [B,T,N],
    probs [B,T,N,k] f32)."""
    sel_BTkH = jnp.take_along_axis(cmp_BPH[:, None], idx_BTk[..., None], axis=2)
    logits = jnp.einsum("BTNH,BTkH->BTNk", q_BTNH, sel_BTkH, preferred_element_type=jnp.float32)
    logits = jnp.where(valid_BTk[:, :, None, :], logits * scale, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(logits - top)
    denom = jnp.sum(w, axis=-1, keepdims=True)
    has = denom > 0
    probs = w / jnp.where(has, denom, 1.0)
    out = jnp.einsum(
        "BTNk,BTkH->BTNH",
        probs.astype(sel_BTkH.dtype),
        sel_BTkH,
        preferred_element_type=jnp.float32,
    )
    lse = jnp.where(has, top + jnp.log(jnp.where(has, denom, 1.0)), -jnp.inf)[..., 0]
    return out, lse, probs


def _compressed_part(
    q_BTNH, positions_BT, cmp_BPH, cmp_end_BP, indexer, *, scale, chunk, lse_rest_BTN=None
):
    """Compressed branch in query chunks: HCA dense over visible entries, CSA gathers top-k.

    Returns (out [B,T,N,H], lse [B,T,N]), plus the indexer-KL inputs (`_selection_aux`) when
    `lse_rest_BTN`, the log-sum-exp of every other part (window, sink), is given (CSA): head n
    puts the share sigmoid(lse_n - lse_rest_n) of its full attention on the selected entries,
    spread as its softmax over them, so the target needs only the gathered logits.
    """
    B, T, N, H = q_BTNH.shape
    P = cmp_BPH.shape[1]
    cmp_BPH = cmp_BPH.astype(q_BTNH.dtype)

    def one(q_c, pos_c, iq_c, iw_c, rest_c):
        visible = entry_visibility(pos_c, cmp_end_BP)
        if indexer is None:
            return masked_attention(
                q_c, cmp_BPH[:, :, None], cmp_BPH[:, :, None], visible[:, None], scale=scale
            )
        scores = indexer_scores(iq_c, iw_c, indexer.k_BPI, scale=indexer.scale)
        idx, valid = topk_entries(scores, visible, min(indexer.topk, P))
        out, lse, probs_BTNk = _gathered_attention(q_c, cmp_BPH, idx, valid, scale=scale)
        if rest_c is None:
            return out, lse
        share_BTN = jax.nn.sigmoid(lse - rest_c)
        target = dsa.attention_target(probs_BTNk * share_BTN[..., None], axis=2)
        return out, lse, _selection_aux(scores, idx, valid, target)

    iq = None if indexer is None else indexer.q_BTnI
    iw = None if indexer is None else indexer.w_BTn
    if T <= chunk:
        return one(q_BTNH, positions_BT, iq, iw, lse_rest_BTN)
    C = -(-T // chunk)
    pad = C * chunk - T

    def split(x, fill=0):
        if x is None:
            return None
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape((B, C, chunk) + x.shape[2:]), 1, 0)

    def unsplit(x):
        return jnp.moveaxis(x, 0, 1).reshape((B, C * chunk) + x.shape[3:])[:, :T]

    chunks = (
        split(q_BTNH),
        split(positions_BT, -1),
        split(iq),
        split(iw),
        split(lse_rest_BTN),
    )
    return jax.tree.map(unsplit, jax.lax.map(lambda a: one(*a), chunks))


def v4_attention(
    q_BTNH: Array,
    kv_BTH: Array,
    positions_BT: Array,
    *,
    window: int,
    sink_N: Array,
    scale: float,
    ring_kv_BWH: Array | None = None,
    ring_positions_BW: Array | None = None,
    cmp_BPH: Array | None = None,
    cmp_end_BP: Array | None = None,
    indexer: IndexerInputs | None = None,
    implementation: str = "blocked",
    query_chunk: int = 256,
    return_aux: bool = False,
):
    """V4 attention core, [B, T, N, H] in q's dtype (arguments as `v4_attention_reference`).

    With `return_aux` (CSA only) returns `(out, aux)`: the indexer-KL inputs in
    `ops.dsa.dsa_attention`'s layout, {"indices": int32 [B, T, k] (k = min(topk, P), -1 =
    empty), "scores": index scores at the selected entries [B, T, k] (-inf where empty),
    "target": the main attention's probabilities at the selected entries, summed over heads and
    L1-normalised [B, T, k]} (V3.2 §2.1; pass to `ops.dsa.indexer_kl` with the target stopped).

    implementation:
      "reference": `v4_attention_reference` (one dense masked softmax, O(T (W + T + P))).
      "blocked": each key set separately, merged by log-sum-exp with the sink as one more part:
        new-token window by banded attention (O(T * 2 window), needs consecutive positions),
        cached window O(T * W), compressed entries in query chunks of `query_chunk`: HCA dense
        over the entries, CSA over the gathered top-k only (O(T * k) attention; the indexer
        itself is O(T * P)).
    """
    kwargs = dict(
        window=window,
        sink_N=sink_N,
        scale=scale,
        ring_kv_BWH=ring_kv_BWH,
        ring_positions_BW=ring_positions_BW,
        cmp_BPH=cmp_BPH,
        cmp_end_BP=cmp_end_BP,
        indexer=indexer,
        return_aux=return_aux,
    )
    if implementation == "reference":
        return v4_attention_reference(q_BTNH, kv_BTH, positions_BT, **kwargs)
    if implementation != "blocked":
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    _check_aux(return_aux, indexer)
    B, T, N, _ = q_BTNH.shape
    kv_BT1H = kv_BTH[:, :, None, :]
    outs, lses = [], []
    if ring_kv_BWH is not None:
        ring = ring_kv_BWH.astype(kv_BTH.dtype)[:, :, None, :]
        mask = window_mask(positions_BT, ring_positions_BW, window)[:, None]
        o, lse = masked_attention(q_BTNH, ring, ring, mask, scale=scale)
        outs.append(o)
        lses.append(lse)
    if T > 2 * window:
        o, lse = banded_attention(
            q_BTNH, kv_BT1H, kv_BT1H, block=window, num_prev_blocks=1, window=window, scale=scale
        )
    else:
        mask = window_mask(positions_BT, positions_BT, window)[:, None]
        o, lse = masked_attention(q_BTNH, kv_BT1H, kv_BT1H, mask, scale=scale)
    outs.append(o)
    lses.append(lse)
    # The sink: one more part whose value is 0 and whose log-sum-exp is the sink logit.
    sink_BTN = jnp.broadcast_to(sink_N.astype(jnp.float32), (B, T, N))
    selection = []
    if cmp_BPH is not None and cmp_BPH.shape[1]:
        lse_rest = jax.nn.logsumexp(jnp.stack(lses + [sink_BTN]), axis=0) if return_aux else None
        o, lse, *selection = _compressed_part(
            q_BTNH,
            positions_BT,
            cmp_BPH,
            cmp_end_BP,
            indexer,
            scale=scale,
            chunk=query_chunk,
            lse_rest_BTN=lse_rest,
        )
        outs.append(o)
        lses.append(lse)
    outs.append(jnp.zeros_like(outs[0]))
    lses.append(sink_BTN)
    out, _ = merge_attention(jnp.stack(outs), jnp.stack(lses))
    out = out.astype(q_BTNH.dtype)
    if not return_aux:
        return out
    return out, selection[0] if selection else _no_entries_aux(B, T)


# --------------------------------------------------------------------------------------------
# Decode caches: rings of the most recent tokens
# --------------------------------------------------------------------------------------------


def ring_positions(index: Array, size: int) -> Array:
    """Positions [size] held by a ring whose slot s holds position p = s (mod size), after
    `index` tokens: the latest p < index with that residue; negative = never written."""
    slots = jnp.arange(size)
    return index - 1 - jnp.mod(index - 1 - slots, size)


def ring_write(ring_BLX: Array, new_BTX: Array, index: Array) -> Array:
    """Writes new tokens (positions index .. index + T - 1) into their slots pos mod L.

    Only the last min(T, L) tokens are kept (the older ones would be overwritten anyway).
    """
    L = ring_BLX.shape[1]
    T = new_BTX.shape[1]
    m = min(T, L)
    slots = jnp.mod(index + T - m + jnp.arange(m), L)
    return ring_BLX.at[:, slots].set(new_BTX[:, T - m :].astype(ring_BLX.dtype))


def ring_read(ring_BLX: Array, start: Array, length: int) -> Array:
    """Ring contents for positions start .. start + length - 1, in position order."""
    return jnp.take(ring_BLX, jnp.mod(start + jnp.arange(length), ring_BLX.shape[1]), axis=1)


def compress_step(
    ring_kv_BLX: Array,
    ring_gate_BLX: Array,
    new_kv_BTX: Array,
    new_gate_BTX: Array,
    index: Array,
    position_bias_rX: Array,
    *,
    ratio: int,
    overlap: bool,
) -> tuple[Array, Array]:
    """Pools every entry that the new tokens complete, for a decode cache.

    The ring holds the raw projections of the latest L = r (overlapping: 2r) tokens. The tokens
    from the start of the current block (overlapping: of the previous block) to the last new
    one are laid out block-aligned, then pooled with `compress_tokens`.

    Returns:
      (entries float32 [B, 1 + ceil(T / r), H], first entry id): candidate entries for ids
      index // r onwards. Only those with id < (index + T) // r are complete; the others pool a
      partial block and must stay invisible (they are overwritten once complete).
    """
    B, T, X = new_kv_BTX.shape
    L = ring_kv_BLX.shape[1]
    first = index // ratio
    base = (first - (1 if overlap else 0)) * ratio
    length = L + -(-T // ratio) * ratio

    def layout(ring, new):
        ext = jnp.zeros((B, length, X), new.dtype)
        ext = jax.lax.dynamic_update_slice(
            ext, ring_read(ring, base, L).astype(new.dtype), (0, 0, 0)
        )
        return jax.lax.dynamic_update_slice(ext, new, (0, index - base, 0))

    ext_kv = layout(ring_kv_BLX, new_kv_BTX)
    ext_gate = layout(ring_gate_BLX, new_gate_BTX)
    valid = jnp.broadcast_to(base + jnp.arange(length) >= 0, (B, length))
    entries = compress_tokens(
        ext_kv, ext_gate, position_bias_rX, ratio=ratio, overlap=overlap, valid_BT=valid
    )
    return entries[:, 1:] if overlap else entries, first


# --------------------------------------------------------------------------------------------
# Grouped low-rank output projection
# --------------------------------------------------------------------------------------------


def grouped_projection(o_BTNH: Array, wo_a_NHO: Array, groups: int) -> Array:
    """First half of V4's grouped output projection, [B, T, G, O].

    The N heads form G groups of N/G consecutive heads; each group's (N/G)*H outputs go through
    its own [(N/G)*H, O] block of `wo_a` ("o_a_proj", a block-diagonal [N*H, G*O] matrix).
    """
    B, T, N, H = o_BTNH.shape
    O = wo_a_NHO.shape[-1]
    o_BTGnH = o_BTNH.reshape(B, T, groups, N // groups, H)
    wo_a_GnHO = wo_a_NHO.reshape(groups, N // groups, H, O).astype(o_BTNH.dtype)
    return jnp.einsum("BTGnH,GnHO->BTGO", o_BTGnH, wo_a_GnHO)


def grouped_output(o_BTNH: Array, wo_a_NHO: Array, wo_b_GOD: Array) -> Array:
    """V4's grouped low-rank output projection, [B, T, D]: `grouped_projection`, then the G*O
    group outputs are mixed by `wo_b` [G, O, D] ("o_b_proj").

    Equals o.reshape(B, T, N*H) @ blockdiag(wo_a) @ wo_b.reshape(G*O, D) (tests check this).
    """
    z_BTGO = grouped_projection(o_BTNH, wo_a_NHO, wo_b_GOD.shape[0])
    return jnp.einsum("BTGO,GOD->BTD", z_BTGO, wo_b_GOD.astype(o_BTNH.dtype))
