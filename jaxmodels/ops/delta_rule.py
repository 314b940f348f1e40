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
dim (H_k), J value head dim (H_v), P chunk index, M = B*N independent recurrences,
Z = P*M every chunk of every recurrence, A block index and X/Y/W positions inside a block of
the dyadic intra-chunk split.

Callers L2-normalise ``q`` and ``k`` (per head) before calling; ``beta`` is in ``[0, 1]``
(``[0, 2)`` also keeps the state bounded) and ``g <= 0``.
"""

from __future__ import annotations

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
    state0 = jnp.zeros((b, n, h, j), f32) if initial_state is None else initial_state.astype(f32)

    def body(state_BNHJ, xs):
        o_BNJ, state_BNHJ = _step(*xs, state_BNHJ, scale)
        return state_BNHJ, o_BNJ

    time_major = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, g, beta))
    state, o_TBNJ = jax.lax.scan(body, state0, time_major)
    return jnp.moveaxis(o_TBNJ, 0, 1).astype(v.dtype), state


# --------------------------------------------------------------------------------------------
# Chunkwise-parallel form
# --------------------------------------------------------------------------------------------


def _block_lower(top_left: Array, bottom_left: Array, bottom_right: Array) -> Array:
    """``[[top_left, 0], [bottom_left, bottom_right]]`` over the last two axes."""
    top = jnp.concatenate([top_left, jnp.zeros_like(top_left)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([bottom_left, bottom_right], axis=-1)], axis=-2)


def _intra_chunk(q_ZTH: Array, k_ZTH: Array, G_ZTH: Array, beta_ZT: Array) -> tuple[Array, Array]:
    """The state-independent matrices of every chunk: ``tril(A_qk)`` and ``(I + A_kk)^{-1}``.

    With ``G`` the within-chunk cumulative log-decay (non-increasing, since ``g <= 0``)::

        A_qk[t, s] = sum_c q_t[c] k_s[c] exp(G_t[c] - G_s[c])             s <= t, else 0
        A_kk[t, s] = beta_t sum_c k_t[c] k_s[c] exp(G_t[c] - G_s[c])      s < t, else 0

    Decay without overflow. ``exp(G_t - G_s)`` is never factored as ``exp(G_t) exp(-G_s)``
    (with strong decay ``-G_s`` reaches hundreds and overflows fp32). Instead the chunk is split
    dyadically, a generalisation of FLA's secondary chunking: at the level with blocks of
    ``2b`` rows, the lower-left ``b x b`` quadrant of each diagonal block pairs rows ``t`` of its
    second half with columns ``s`` of its first half, and with ``m`` the last row of the first
    half (``s <= m < t``)::

        exp(G_t - G_s) = exp(G_t - G_m) * exp(G_m - G_s),   both factors <= 1,

    so every quadrant is one exact matmul of decayed rows by decayed columns. Every pair
    ``s < t`` lies in exactly one quadrant (the level where ``t`` and ``s`` first part); the
    diagonal ``s = t`` has decay 1. No pairwise ``[C, C, H]`` tensor, no masked exponent, and no
    wasted products above the diagonal. A scalar gate (channel axis of size 1) broadcasts
    through the same code.

    ``(I + A_kk)^{-1}`` (the UT transform, Kimi Linear App. C) is built over the same levels by
    recursive block inversion of a unit lower-triangular matrix,
    ``[[L11, 0], [L21, L22]]^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]``, with ``L21``
    the ``A_kk`` quadrant just computed: exact, batched over all blocks, no sequential
    forward substitution and no ``lax.linalg.triangular_solve`` (one LAPACK call per chunk on
    CPU).

    Args:
      q_ZTH, k_ZTH: ``[Z, C, H]`` (Z = every chunk of every sequence and head).
      G_ZTH: ``[Z, C, H]`` (KDA) or ``[Z, C, 1]`` (Gated DeltaNet).
      beta_ZT: ``[Z, C]``.

    Returns:
      ``(a_qk_ZTS, t_ZTS)``, each ``[Z, C, C]``: ``tril(A_qk)`` and ``(I + A_kk)^{-1}``.
    """
    z, c, h = q_ZTH.shape
    c2 = 1 << (c - 1).bit_length()  # dyadic levels need a power of two: pad rows inside
    if c2 != c:
        rows = [(0, 0), (0, c2 - c), (0, 0)]
        q_ZTH, k_ZTH = jnp.pad(q_ZTH, rows), jnp.pad(k_ZTH, rows)
        G_ZTH = jnp.pad(G_ZTH, rows, mode="edge")  # no decay on padding: exponents stay <= 0
        beta_ZT = jnp.pad(beta_ZT, rows[:2])

    # 1 x 1 diagonal blocks: A_qk[t, t] = q_t . k_t, (I + A_kk)[t, t] = 1
    a_qk_ZAXY = jnp.einsum("ZTH,ZTH->ZT", q_ZTH, k_ZTH)[:, :, None, None]
    t_ZAXY = jnp.ones((z, c2, 1, 1), q_ZTH.dtype)
    b = 1
    while b < c2:  # blocks of 2b rows built from pairs of b-row blocks
        n_blk = c2 // (2 * b)

        def halves(x, n_blk=n_blk, b=b):
            x = x.reshape(z, n_blk, 2, b, x.shape[-1])
            return x[:, :, 0], x[:, :, 1]

        G1_ZAXH, G2_ZAXH = halves(G_ZTH)
        ref_ZA1H = G1_ZAXH[:, :, -1:]  # G_m, m = last row of the first half
        rows_ZAXH = jnp.exp(G2_ZAXH - ref_ZA1H)  # exp(G_t - G_m) <= 1
        k1_ZAXH, k2_ZAXH = halves(k_ZTH)
        cols_ZAYH = k1_ZAXH * jnp.exp(ref_ZA1H - G1_ZAXH)  # k_s exp(G_m - G_s), <= |k_s|
        q2_ZAXH = halves(q_ZTH)[1]
        beta2_ZAX1 = halves(beta_ZT[..., None])[1]
        qk_ZAXY = jnp.einsum("ZAXH,ZAYH->ZAXY", q2_ZAXH * rows_ZAXH, cols_ZAYH)
        kk_ZAXY = beta2_ZAX1 * jnp.einsum("ZAXH,ZAYH->ZAXY", k2_ZAXH * rows_ZAXH, cols_ZAYH)

        qk_prev = a_qk_ZAXY.reshape(z, n_blk, 2, b, b)
        a_qk_ZAXY = _block_lower(qk_prev[:, :, 0], qk_ZAXY, qk_prev[:, :, 1])
        t_prev = t_ZAXY.reshape(z, n_blk, 2, b, b)
        inv11_ZAXY, inv22_ZAXY = t_prev[:, :, 0], t_prev[:, :, 1]
        off_ZAXY = -jnp.einsum(
            "ZAXY,ZAYW->ZAXW", inv22_ZAXY, jnp.einsum("ZAXY,ZAYW->ZAXW", kk_ZAXY, inv11_ZAXY)
        )
        t_ZAXY = _block_lower(inv11_ZAXY, off_ZAXY, inv22_ZAXY)
        b *= 2
    return a_qk_ZAXY[:, 0, :c, :c], t_ZAXY[:, 0, :c, :c]


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
        [W | U] = (I + A_kk)^{-1} Diag(beta) [exp(G) * K | V]     (UT transform)
        V' = U - W S                                            (pseudo-values)
        O  = (exp(G) * scale Q) S + tril(A_qk) V',   A_qk like A_kk with scale q_t, s <= t
        S  <- Diag(exp(G_C)) S + (exp(G_C - G) * K)^T V'

    Everything that does not depend on ``S`` (the decayed Gram matrices, the UT inverse, W, U,
    the decayed queries and keys) is computed for all chunks at once; only the ``[C, H] x [H, J]``
    products that carry ``S`` from chunk to chunk run in a sequential ``lax.scan``, and the
    outputs are formed afterwards for all chunks at once. All exponents are ``<= 0`` (see
    ``_intra_chunk``), so strong decay cannot overflow. Forward cost per token and head: about
    ``3 C H + 2 C J + 3 H J`` multiply-adds (the recurrent form needs ``~4 H J``, but one token
    at a time). ``T`` need not divide by ``chunk_size``: the tail is padded with
    ``g = 0, beta = 0, k = 0``, which leaves the state unchanged. Differentiable by ordinary
    autodiff.

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
    state0 = jnp.zeros((b, n, h, j), f32) if initial_state is None else initial_state.astype(f32)

    pad = (-t) % c
    p = (t + pad) // c
    m = b * n  # independent recurrences

    def chunks(x):  # [B, T, N, F] -> [Z = P*B*N, C, F], zero padded (g = beta = k = 0)
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad), (0, 0), (0, 0)])
        x = x.reshape(b, p, c, n, x.shape[-1]).transpose(1, 0, 3, 2, 4)
        return x.reshape(p * m, c, x.shape[-1])

    q_ZTH = chunks(q) * scale
    k_ZTH = chunks(k)
    v_ZTJ = chunks(v)
    beta_ZT1 = chunks(beta[..., None])
    # within-chunk cumulative log-decay (<= 0), as a matmul: XLA:CPU lowers cumsum to a
    # reduce-window that it then re-fuses into (and recomputes in) every consumer
    G_ZTH = jnp.einsum("TS,ZSH->ZTH", jnp.tril(jnp.ones((c, c), f32)), chunks(g))

    # ---- state-independent work, all chunks at once
    a_qk_ZTS, t_ZTS = _intra_chunk(q_ZTH, k_ZTH, G_ZTH, beta_ZT1[..., 0])
    decay_ZTH = jnp.exp(G_ZTH)  # <= 1
    rhs_ZTX = beta_ZT1 * jnp.concatenate([decay_ZTH * k_ZTH, v_ZTJ], axis=-1)
    wu_ZTX = jnp.einsum("ZTS,ZSX->ZTX", t_ZTS, rhs_ZTX)  # [W | U] = T Diag(beta) [exp(G) K | V]
    w_ZTH, u_ZTJ = wu_ZTX[..., :h], wu_ZTX[..., h:]
    q_decayed_ZTH = decay_ZTH * q_ZTH
    k_to_end_ZTH = jnp.exp(G_ZTH[:, -1:] - G_ZTH) * k_ZTH  # exp(G_C - G_t) <= 1
    chunk_decay_ZH = jnp.exp(G_ZTH[:, -1])

    # ---- sequential part: carry S across chunks (only [C, H] x [H, J] products per step)
    def body(state_MHJ, xs):
        w_MTH, u_MTJ, k_end_MTH, decay_MH = xs
        pseudo_v_MTJ = u_MTJ - jnp.einsum("MTH,MHJ->MTJ", w_MTH, state_MHJ)
        new_state_MHJ = decay_MH[..., None] * state_MHJ + jnp.einsum(
            "MTH,MTJ->MHJ", k_end_MTH, pseudo_v_MTJ
        )
        return new_state_MHJ, (state_MHJ, pseudo_v_MTJ)

    chunk_major = tuple(
        x.reshape(p, m, *x.shape[1:]) for x in (w_ZTH, u_ZTJ, k_to_end_ZTH, chunk_decay_ZH)
    )
    final_state_MHJ, (state_in_PMHJ, pseudo_v_PMTJ) = jax.lax.scan(
        body, state0.reshape(m, h, j), chunk_major
    )

    # ---- outputs, all chunks at once
    o_ZTJ = jnp.einsum(
        "ZTH,ZHJ->ZTJ", q_decayed_ZTH, state_in_PMHJ.reshape(p * m, h, j)
    ) + jnp.einsum("ZTS,ZSJ->ZTJ", a_qk_ZTS, pseudo_v_PMTJ.reshape(p * m, c, j))
    o_BTNJ = o_ZTJ.reshape(p, b, n, c, j).transpose(1, 0, 3, 2, 4).reshape(b, p * c, n, j)
    return o_BTNJ[:, :t].astype(v.dtype), final_state_MHJ.reshape(b, n, h, j)


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
