"""The gated delta rule: KDA (channel-wise decay) and Gated DeltaNet (scalar decay), pure JAX.

One family of functions serves both models. The log-decay ``g`` (``g = log alpha <= 0``) is
either channel-wise, ``[B, T, N, H]`` (Kimi Delta Attention), or one scalar per head and step,
``[B, T, N]`` (Gated DeltaNet). The scalar form is given a trailing channel axis of size 1 and
then broadcasts through exactly the same code.

Recurrence per head (state ``S`` of shape ``[H, J]``, decay applied first; Kimi Linear
arXiv 2510.26692 §3 eq. 1, Gated DeltaNet arXiv 2412.06464 §3; FLA ``naive_recurrent_kda``)::

    S_t = Diag(exp(g_t)) S_{t-1}
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T
    o_t = scale * S_t^T q_t

Functions:
  * ``delta_rule_recurrent`` — the reference: ``lax.scan`` over time, fp32 state.
  * ``delta_rule_chunked``   — chunkwise-parallel WY/UT form (Kimi Linear §3.1 and App. C).
  * ``delta_rule_step``      — one decode step.
  * ``delta_rule``           — dispatcher, ``implementation="chunked" | "recurrent"``.

All compute is in fp32 whatever the input dtype; ``o`` is returned in ``v``'s dtype and the
state always in fp32.

Dimension letters (einsum strings, tensor-name suffixes): B batch, T sequence (or, inside a
chunk, the query/row position), S key/column position inside a chunk, N heads, H key/query head
dim (H_k), J value head dim (H_v), P chunk index, A sub-chunk index, X/Y positions inside a
sub-chunk.

Callers L2-normalise ``q`` and ``k`` (per head) before calling; ``beta`` is in ``[0, 1]``
(``[0, 2)`` also keeps the state bounded) and ``g <= 0``.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "delta_rule",
    "delta_rule_chunked",
    "delta_rule_recurrent",
    "delta_rule_step",
]

# Secondary (sub-)chunk length for the channel-wise intra-chunk decay; see ``_decayed_products``.
_SUB_CHUNK = 16


# --------------------------------------------------------------------------------------------
# Shape handling
# --------------------------------------------------------------------------------------------


def _gate_with_channels(g: Array, q: Array, name: str = "g") -> Array:
    """Return ``g`` with a trailing channel axis: size ``H`` (KDA) or 1 (GDN, broadcast)."""
    if g.shape == q.shape[:-1]:
        return g[..., None]
    if g.shape == q.shape or g.shape == (*q.shape[:-1], 1):
        return g
    raise ValueError(
        f"{name} must have shape {q.shape} (channel-wise decay, KDA) or {q.shape[:-1]} "
        f"(one scalar per head, Gated DeltaNet); got {g.shape}."
    )


def _check_inputs(
    q: Array, k: Array, v: Array, beta: Array, state: Array | None, *, seq: bool
) -> None:
    lead = "[B, T, N, H]" if seq else "[B, N, H]"
    ndim = 4 if seq else 3
    if q.ndim != ndim or q.shape != k.shape:
        raise ValueError(f"q and k must both have shape {lead}; got q {q.shape} and k {k.shape}.")
    if v.ndim != ndim or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must have shape {(*q.shape[:-1], 'H_v')}; got {v.shape}.")
    if beta.shape != q.shape[:-1]:
        raise ValueError(f"beta must have shape {q.shape[:-1]}; got {beta.shape}.")
    if state is not None:
        b, n = q.shape[0], q.shape[-2]
        want = (b, n, q.shape[-1], v.shape[-1])
        if state.shape != want:
            raise ValueError(f"state must have shape [B, N, H_k, H_v] = {want}; got {state.shape}.")


def _default_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else scale


# --------------------------------------------------------------------------------------------
# Decode step and the recurrent reference
# --------------------------------------------------------------------------------------------


def delta_rule_step(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    state: Array,
    *,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """One token of the gated delta rule (decode).

    Args:
      q, k: ``[B, N, H]`` (L2-normalised by the caller).
      v: ``[B, N, J]``.
      g: log-decay ``[B, N, H]`` (KDA) or ``[B, N]`` (Gated DeltaNet), ``<= 0``.
      beta: ``[B, N]``.
      state: ``[B, N, H, J]``, the state after the previous token.
      scale: output scale; default ``H**-0.5``.

    Returns:
      ``(o, new_state)``: ``o`` ``[B, N, J]`` in ``v``'s dtype, ``new_state`` ``[B, N, H, J]``
      fp32.

    Follows the per-step form of FLA ``fla/ops/kda/naive.py::naive_recurrent_kda`` (and
    ``fla/ops/gated_delta_rule/naive.py::naive_recurrent_gated_delta_rule`` for scalar ``g``);
    Kimi Linear arXiv 2510.26692 §3 eq. 1.
    """
    _check_inputs(q, k, v, beta, state, seq=False)
    g = _gate_with_channels(g, q)
    scale = _default_scale(scale, q.shape[-1])
    f32 = jnp.float32
    q_BNH, k_BNH, v_BNJ, g_BNH, beta_BN = (x.astype(f32) for x in (q, k, v, g, beta))
    o_BNJ, state_BNHJ = _step(q_BNH, k_BNH, v_BNJ, g_BNH, beta_BN, state.astype(f32), scale)
    return o_BNJ.astype(v.dtype), state_BNHJ


def _step(q_BNH, k_BNH, v_BNJ, g_BNH, beta_BN, state_BNHJ, scale):
    """fp32 body shared by ``delta_rule_step`` and ``delta_rule_recurrent``."""
    state_BNHJ = jnp.exp(g_BNH)[..., None] * state_BNHJ  # decay first (rows = key channels)
    error_BNJ = v_BNJ - jnp.einsum("BNH,BNHJ->BNJ", k_BNH, state_BNHJ)
    state_BNHJ = state_BNHJ + jnp.einsum("BNH,BNJ->BNHJ", beta_BN[..., None] * k_BNH, error_BNJ)
    o_BNJ = scale * jnp.einsum("BNH,BNHJ->BNJ", q_BNH, state_BNHJ)
    return o_BNJ, state_BNHJ


def delta_rule_recurrent(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    *,
    initial_state: Array | None = None,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """Gated delta rule, reference form: a ``lax.scan`` over time with an fp32 state.

    Args:
      q, k: ``[B, T, N, H]`` (L2-normalised by the caller).
      v: ``[B, T, N, J]``.
      g: log-decay ``[B, T, N, H]`` (KDA, channel-wise) or ``[B, T, N]`` (Gated DeltaNet), ``<= 0``.
      beta: ``[B, T, N]``.
      initial_state: ``[B, N, H, J]`` (fp32) or None for zeros.
      scale: output scale; default ``H**-0.5``.

    Returns:
      ``(o, final_state)``: ``o`` ``[B, T, N, J]`` in ``v``'s dtype, ``final_state``
      ``[B, N, H, J]`` fp32.

    Follows FLA ``fla/ops/kda/naive.py::naive_recurrent_kda`` and
    ``fla/ops/gated_delta_rule/naive.py::naive_recurrent_gated_delta_rule``; equations from
    Kimi Linear (arXiv 2510.26692) §3 eq. 1 and Gated DeltaNet (arXiv 2412.06464) §3.
    """
    _check_inputs(q, k, v, beta, initial_state, seq=True)
    g = _gate_with_channels(g, q)
    b, _, n, h = q.shape
    j = v.shape[-1]
    scale = _default_scale(scale, h)
    f32 = jnp.float32
    state0 = (
        jnp.zeros((b, n, h, j), f32) if initial_state is None else initial_state.astype(f32)
    )

    def body(state_BNHJ, xs):
        o_BNJ, state_BNHJ = _step(*xs, state_BNHJ, scale)
        return state_BNHJ, o_BNJ

    time_major = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, g, beta))
    state, o_TBNJ = jax.lax.scan(body, state0, time_major)
    return jnp.moveaxis(o_TBNJ, 0, 1).astype(v.dtype), state


# --------------------------------------------------------------------------------------------
# Chunkwise-parallel form
# --------------------------------------------------------------------------------------------


def _masked_exp(diff: Array, mask: Array) -> Array:
    """``exp(diff)`` where ``mask`` else 0, without ever evaluating exp of a masked entry.

    Masked entries may hold large positive exponents; replacing them *before* ``exp`` keeps
    both the value and the gradient free of inf/NaN.
    """
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _decayed_products(q_BNPTH: Array, k_BNPTH: Array, G_BNPTH: Array) -> tuple[Array, Array]:
    """Decay-weighted Gram matrices of one chunk, lower triangle including the diagonal.

    ``A_qk[t, s] = sum_c q_t[c] k_s[c] exp(G_t[c] - G_s[c])`` and likewise ``A_kk`` with ``k_t``
    for rows, for ``s <= t`` (0 above the diagonal); ``G`` is the within-chunk cumulative
    log-decay (non-increasing along the chunk since ``g <= 0``).

    ``exp(G_t - G_s)`` is never factored as ``exp(G_t) * exp(-G_s)``: with strong decay
    ``-G_s`` reaches hundreds and ``exp`` overflows fp32.
      * Scalar gates (channel axis of size 1): the ``[C, C]`` decay matrix is formed from masked
        pairwise differences and multiplies ``q k^T`` elementwise.
      * Channel-wise gates: the chunk is cut into sub-chunks of ``_SUB_CHUNK`` rows (FLA's
        secondary chunking). Between a row sub-chunk ``a`` and any earlier column, both factors of
        ``exp(G_t - G_m) * exp(G_m - G_s)`` are ``<= 1`` when the reference ``G_m`` is the
        cumulative decay just before sub-chunk ``a`` starts, so that block is one matmul. Inside
        a sub-chunk the masked pairwise differences are formed explicitly (``[c, c, H]``).

    Args:
      q_BNPTH, k_BNPTH: ``[B, N, P, C, H]``.
      G_BNPTH: ``[B, N, P, C, H]`` or ``[B, N, P, C, 1]``.

    Returns:
      ``(A_qk, A_kk)``, each ``[B, N, P, C, C]`` (rows t, columns s).
    """
    c = q_BNPTH.shape[-2]
    causal_TS = jnp.tril(jnp.ones((c, c), bool))

    if G_BNPTH.shape[-1] == 1:  # one scalar gate per step: a [C, C] decay matrix is exact
        G_BNPT = G_BNPTH[..., 0]
        decay_BNPTS = _masked_exp(G_BNPT[..., :, None] - G_BNPT[..., None, :], causal_TS)
        a_qk = jnp.einsum("BNPTH,BNPSH->BNPTS", q_BNPTH, k_BNPTH) * decay_BNPTS
        a_kk = jnp.einsum("BNPTH,BNPSH->BNPTS", k_BNPTH, k_BNPTH) * decay_BNPTS
        return a_qk, a_kk

    sub = math.gcd(c, _SUB_CHUNK)
    n_sub = c // sub
    *lead, _, h = q_BNPTH.shape

    def split(x):  # [..., C, H] -> [..., A, X, H]
        return x.reshape(*lead, n_sub, sub, h)

    qk_BNP2TH = jnp.stack([q_BNPTH, k_BNPTH], axis=3)  # rows for A_qk and A_kk in one pass
    G_BNPAXH = split(G_BNPTH)
    # reference: cumulative decay just before each sub-chunk (0 before the first one)
    ref_BNPAH = jnp.concatenate(
        [jnp.zeros_like(G_BNPAXH[..., :1, -1, :]), G_BNPAXH[..., :-1, -1, :]], axis=-2
    )

    # rows: exp(G_t - G_ref(a)) <= 1
    row_BNPAXH = jnp.exp(G_BNPAXH - ref_BNPAH[..., None, :])
    rows_BNP2AXH = qk_BNP2TH.reshape(*lead, 2, n_sub, sub, h) * row_BNPAXH[
        ..., None, :, :, :
    ]
    # columns s of earlier sub-chunks: exp(G_ref(a) - G_s) <= 1, masked to s < a * sub
    before_AS = jnp.arange(c)[None, :] < (jnp.arange(n_sub) * sub)[:, None]
    col_BNPASH = _masked_exp(
        ref_BNPAH[..., :, None, :] - G_BNPTH[..., None, :, :], before_AS[..., None]
    )
    cols_BNPASH = k_BNPTH[..., None, :, :] * col_BNPASH
    off_BNP2AXS = jnp.einsum("BNPQAXH,BNPASH->BNPQAXS", rows_BNP2AXH, cols_BNPASH)

    # diagonal sub-blocks: explicit masked pairwise differences, shared by A_qk and A_kk
    causal_XY = jnp.tril(jnp.ones((sub, sub), bool))
    pair_BNPAXYH = _masked_exp(
        G_BNPAXH[..., :, None, :] - G_BNPAXH[..., None, :, :], causal_XY[..., None]
    )
    k_BNPAXH = split(k_BNPTH)
    kpair_BNPAXYH = pair_BNPAXYH * k_BNPAXH[..., None, :, :]
    diag_BNP2AXY = jnp.einsum(
        "BNPQAXH,BNPAXYH->BNPQAXY",
        qk_BNP2TH.reshape(*lead, 2, n_sub, sub, h),
        kpair_BNPAXYH,
    )
    # row sub-chunk a = [earlier columns | its diagonal block | zeros above the diagonal]
    row_blocks = []
    for a in range(n_sub):
        parts = [off_BNP2AXS[..., a, :, : a * sub], diag_BNP2AXY[..., a, :, :]]
        if a + 1 < n_sub:
            parts.append(jnp.zeros((*diag_BNP2AXY.shape[:-3], sub, c - (a + 1) * sub), diag_BNP2AXY.dtype))
        row_blocks.append(jnp.concatenate(parts, axis=-1))
    full_BNP2TS = jnp.concatenate(row_blocks, axis=-2)
    return full_BNP2TS[..., 0, :, :], full_BNP2TS[..., 1, :, :]


def delta_rule_chunked(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    *,
    initial_state: Array | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
) -> tuple[Array, Array]:
    """Gated delta rule, chunkwise-parallel WY/UT form; same contract as the recurrent form.

    Within chunk ``[C]`` with incoming state ``S`` and cumulative log-decay ``G_t = sum_{i<=t} g_i``
    (Kimi Linear arXiv 2510.26692 §3.1 eqs. 2–9 and App. C; Gated DeltaNet arXiv 2412.06464
    §3.3; FLA ``fla/ops/kda/naive.py::naive_chunk_kda`` and
    ``fla/ops/gated_delta_rule/naive.py::naive_chunk_gated_delta_rule``)::

        A_kk[t, s] = beta_t sum_c k_t[c] k_s[c] exp(G_t[c] - G_s[c])      (s < t)
        (I + A_kk) [W | U] = Diag(beta) [exp(G) * K | V]           (triangular solve)
        V' = U - W S                                            (pseudo-values)
        O  = (exp(G) * scale Q) S + tril(A_qk) V',   A_qk like A_kk with scale q_t, s <= t
        S  <- Diag(exp(G_C)) S + (exp(G_C - G) * K)^T V'

    Everything that does not depend on ``S`` (the decayed Gram matrices, the solve, the decayed
    queries and keys) is computed for all chunks at once; only the ``[C, H] x [H, J]`` products
    that carry ``S`` from chunk to chunk run in a sequential ``lax.scan``, and the outputs are
    formed afterwards for all chunks at once. All exponents are ``<= 0`` (see
    ``_decayed_products``), so strong decay cannot overflow. ``T`` need not divide by
    ``chunk_size``: the tail is padded with ``g = 0, beta = 0, k = 0``, which leaves the state
    unchanged. Differentiable by ordinary autodiff.

    Args:
      q, k: ``[B, T, N, H]`` (L2-normalised by the caller).
      v: ``[B, T, N, J]``.
      g: log-decay ``[B, T, N, H]`` (KDA) or ``[B, T, N]`` (Gated DeltaNet), ``<= 0``.
      beta: ``[B, T, N]``.
      initial_state: ``[B, N, H, J]`` (fp32) or None for zeros.
      scale: output scale; default ``H**-0.5``.
      chunk_size: chunk length ``C`` (64 as in Kimi Linear).

    Returns:
      ``(o, final_state)``: ``o`` ``[B, T, N, J]`` in ``v``'s dtype, ``final_state``
      ``[B, N, H, J]`` fp32.
    """
    _check_inputs(q, k, v, beta, initial_state, seq=True)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}.")
    g = _gate_with_channels(g, q)
    b, t, n, h = q.shape
    j = v.shape[-1]
    c = chunk_size
    scale = _default_scale(scale, h)
    f32 = jnp.float32
    state0 = (
        jnp.zeros((b, n, h, j), f32) if initial_state is None else initial_state.astype(f32)
    )

    pad = (-t) % c
    p = (t + pad) // c

    def chunks(x):  # [B, T, N, ...] -> [B, N, P, C, ...], zero padded (g = beta = k = 0)
        x = x.astype(f32)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(b, p, c, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    q_BNPTH = chunks(q) * scale
    k_BNPTH = chunks(k)
    v_BNPTJ = chunks(v)
    beta_BNPT = chunks(beta)
    G_BNPTH = jnp.cumsum(chunks(g), axis=-2)  # within-chunk cumulative log-decay, <= 0

    # ---- state-independent work, all chunks at once
    a_qk_BNPTS, a_kk_BNPTS = _decayed_products(q_BNPTH, k_BNPTH, G_BNPTH)
    strict_TS = jnp.tril(jnp.ones((c, c), bool), -1)
    a_kk_BNPTS = jnp.where(strict_TS, a_kk_BNPTS * beta_BNPT[..., None], 0.0)
    decay_BNPTH = jnp.exp(G_BNPTH)
    rhs_BNPTX = beta_BNPT[..., None] * jnp.concatenate([decay_BNPTH * k_BNPTH, v_BNPTJ], -1)
    eye_TS = jnp.eye(c, dtype=f32)
    wu_BNPTX = jax.lax.linalg.triangular_solve(
        a_kk_BNPTS + eye_TS, rhs_BNPTX, left_side=True, lower=True, unit_diagonal=True
    )
    w_BNPTH, u_BNPTJ = wu_BNPTX[..., :h], wu_BNPTX[..., h:]
    q_decayed_BNPTH = decay_BNPTH * q_BNPTH  # exp(G_t) <= 1
    k_to_end_BNPTH = jnp.exp(G_BNPTH[..., -1:, :] - G_BNPTH) * k_BNPTH  # exp(G_C - G_t) <= 1
    chunk_decay_BNPH = jnp.exp(G_BNPTH[..., -1, :])

    # ---- sequential part: carry S across chunks
    def body(state_BNHJ, xs):
        w_BNTH, u_BNTJ, k_end_BNTH, decay_BNH = xs
        pseudo_v_BNTJ = u_BNTJ - jnp.einsum("BNTH,BNHJ->BNTJ", w_BNTH, state_BNHJ)
        new_state_BNHJ = decay_BNH[..., None] * state_BNHJ + jnp.einsum(
            "BNTH,BNTJ->BNHJ", k_end_BNTH, pseudo_v_BNTJ
        )
        return new_state_BNHJ, (state_BNHJ, pseudo_v_BNTJ)

    chunk_major = tuple(
        jnp.moveaxis(x, 2, 0) for x in (w_BNPTH, u_BNPTJ, k_to_end_BNPTH, chunk_decay_BNPH)
    )
    final_state, (state_in_PBNHJ, pseudo_v_PBNTJ) = jax.lax.scan(body, state0, chunk_major)

    # ---- outputs, all chunks at once
    o_BNPTJ = jnp.einsum(
        "BNPTH,PBNHJ->BNPTJ", q_decayed_BNPTH, state_in_PBNHJ
    ) + jnp.einsum("BNPTS,PBNSJ->BNPTJ", a_qk_BNPTS, pseudo_v_PBNTJ)
    o_BTNJ = jnp.moveaxis(o_BNPTJ, 1, 3).reshape(b, p * c, n, j)[:, :t]
    return o_BTNJ.astype(v.dtype), final_state


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def delta_rule(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    *,
    initial_state: Array | None = None,
    scale: float | None = None,
    implementation: Literal["chunked", "recurrent"] = "chunked",
    chunk_size: int = 64,
) -> tuple[Array, Array]:
    """Gated delta rule (KDA for ``g`` ``[B, T, N, H]``, Gated DeltaNet for ``g`` ``[B, T, N]``).

    ``implementation="chunked"`` (default; training and prefill) calls ``delta_rule_chunked``;
    ``"recurrent"`` calls the reference ``delta_rule_recurrent``. Both return
    ``(o [B, T, N, J], final_state [B, N, H, J] fp32)`` and agree to fp32 rounding. For one
    decode token use ``delta_rule_step``.
    """
    if implementation == "chunked":
        return delta_rule_chunked(
            q, k, v, g, beta, initial_state=initial_state, scale=scale, chunk_size=chunk_size
        )
    if implementation == "recurrent":
        return delta_rule_recurrent(q, k, v, g, beta, initial_state=initial_state, scale=scale)
    raise ValueError(f"implementation must be 'chunked' or 'recurrent'; got {implementation!r}.")
