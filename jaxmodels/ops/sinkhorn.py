"""Sinkhorn-Knopp projection of small square logit matrices onto (nearly) doubly stochastic ones.

Used by mHC (Manifold-Constrained Hyper-Connections, arXiv 2512.24880) to keep the residual
stream-mixing matrix in the Birkhoff polytope. Two forms are kept side by side, selected by
``form=`` in :func:`sinkhorn_knopp`:

``"paper"`` (arXiv 2512.24880 §4.2, Eq. 9)
    ``M0 = exp(L)``; then ``t_max`` times: normalise columns, then rows. The last operation is a row
    normalisation, so rows sum to 1 exactly and columns approximately.

``"v4"`` (DeepSeek-V4 official code: ``inference/kernel.py`` ``hc_split_sinkhorn``, the TileLang
kernel ``kernel_tilelang.py`` L401-423, and transformers ``DeepseekV4HyperConnection.forward``)
    ``softmax(L, axis=-1) + eps``; normalise columns (``+ eps`` in the denominator); then
    ``iters - 1`` rounds of (rows, columns), each with ``+ eps`` in the denominator. The last
    operation is a column normalisation, so *columns* are exact. The V4 code then applies the
    matrix transposed (``new_j = sum_i comb[i, j] x_i``), so the matrix that acts on the streams,
    ``comb^T``, has exact rows -- like the paper's.

Note the two forms are the same algorithm up to ``eps`` and a transposition: the V4 row-softmax
is a row normalisation of ``exp(L)``, so in the transposed frame V4 does (column, row) x ``iters``
starting from ``exp(L^T)``, exactly Eq. 9. ``sinkhorn_v4(L, eps=0).T == sinkhorn_paper(L.T)``
(tested). The visible differences are therefore (a) the ``eps`` terms and (b) which index of the
logit matrix is the source stream -- which matters for loading V4 weights.

All arithmetic is float32 regardless of the input dtype (DeepSeek-V4 runs it in fp32; mHC paper
§4.3.1 Eq. 19). Shapes: ``[..., M, M]``, any leading batch axes.

Oracle tolerances (reference notes §12, items 15-17): paper form rows exact; columns within
1e-3 only for logit std <= 1 (7.2e-4 max measured), 5.4e-2 at std 3. V4 form columns within
~1e-6, rows within 7.6e-4 at std 1.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp

SinkhornForm = Literal["v4", "paper"]


def _normalize_with_denominator(m: jax.Array, axis: int, eps: float):
    den = jnp.sum(m, axis=axis, keepdims=True) + eps
    return m / den, den


def _normalize(m: jax.Array, axis: int, eps: float) -> jax.Array:
    return _normalize_with_denominator(m, axis, eps)[0]


def _to_tokens_minor(x_MM: jax.Array) -> jax.Array:
    """[..., M, M] -> [M, M, N] (N = all leading axes flattened, float32).

    With the N matrices on the minor axis, every row or column sum is a sum of whole
    ``[N]`` vectors, which XLA:CPU vectorises; summing a size-M minor axis becomes a scalar
    loop (measured: the Sinkhorn backward of a ``small`` train step, 2048 matrices of 4 x 4,
    was a tenth of the mHC step).
    """
    m = x_MM.shape[-1]
    return jnp.transpose(x_MM.astype(jnp.float32).reshape(-1, m, m), (1, 2, 0))


def _from_tokens_minor(x_MMN: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    m = x_MMN.shape[0]
    return jnp.transpose(x_MMN, (2, 0, 1)).reshape(*lead, m, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _alternate(m_MMN: jax.Array, first_axis: int, rounds: int, eps: float, unroll) -> jax.Array:
    """``rounds`` x (normalise along ``first_axis``, then along the other matrix axis).

    ``m_MMN``: [M, M, N] positive, float32. The backward pass is written out (a reverse scan
    over the saved per-round inputs): for ``out = m / den``, ``den = sum_a m + eps``,
    ``dm = (dout - sum_a(dout * out)) / den``. It equals autodiff of the loop (tested) and keeps
    every reduction over a leading axis. Without differentiation (decoding) nothing is saved.
    """
    return jax.lax.fori_loop(
        0, rounds, lambda _, m: _one_round(m, first_axis, eps)[2], m_MMN, unroll=unroll
    )


def _one_round(m_MMN, first_axis, eps):
    first, first_den = _normalize_with_denominator(m_MMN, first_axis, eps)
    second, second_den = _normalize_with_denominator(first, 1 - first_axis, eps)
    return first, first_den, second, second_den


def _alternate_fwd(m_MMN, first_axis, rounds, eps, unroll):
    def body(m, _):
        return _one_round(m, first_axis, eps)[2], m

    out, inputs_RMMN = jax.lax.scan(body, m_MMN, None, length=rounds, unroll=unroll)
    return out, inputs_RMMN


def _alternate_bwd(first_axis, rounds, eps, unroll, inputs_RMMN, g_MMN):
    second_axis = 1 - first_axis

    def body(g, m):
        first, first_den, second, second_den = _one_round(m, first_axis, eps)
        g = (g - jnp.sum(g * second, axis=second_axis, keepdims=True)) / second_den
        g = (g - jnp.sum(g * first, axis=first_axis, keepdims=True)) / first_den
        return g, None

    g_MMN, _ = jax.lax.scan(body, g_MMN, inputs_RMMN, reverse=True, unroll=unroll)
    return (g_MMN,)


_alternate.defvjp(_alternate_fwd, _alternate_bwd)


def sinkhorn_paper(logits_MM: jax.Array, *, iters: int = 20, unroll: int | bool = 1) -> jax.Array:
    """Sinkhorn-Knopp as written in the mHC paper (arXiv 2512.24880 Eq. 9), float32.

    ``M0 = exp(L)``, then ``iters`` times ``M <- T_row(T_col(M))``. The exponent is taken after
    subtracting the per-matrix maximum, which only rescales the whole matrix and so leaves every
    iterate unchanged (column normalisation removes any common factor).

    Args:
      logits_MM: [..., M, M] logits ``R~`` (any float dtype).
      iters: ``t_max`` (20 in the paper and in DeepSeek-V4).
      unroll: unrolling of the scans over iterations (forward and backward); does not change the
        result. 1 is fastest on CPU.

    Returns:
      [..., M, M] float32, non-negative, rows summing to 1 (to rounding), columns approximately.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn_paper needs iters >= 1, got {iters}.")
    x_MMN = _to_tokens_minor(logits_MM)
    m_MMN = jnp.exp(x_MMN - jax.lax.stop_gradient(jnp.max(x_MMN, axis=(0, 1), keepdims=True)))
    m_MMN = _alternate(m_MMN, 0, iters, 0.0, unroll)  # columns, then rows
    return _from_tokens_minor(m_MMN, logits_MM.shape[:-2])


def sinkhorn_v4(
    logits_MM: jax.Array, *, iters: int = 20, eps: float = 1e-6, unroll: int | bool = 1
) -> jax.Array:
    """Sinkhorn-Knopp as the DeepSeek-V4 code computes ``comb`` (``hc_split_sinkhorn``), float32.

    ``softmax(L, -1) + eps`` -> column normalisation -> ``iters - 1`` x (row, column), every
    denominator ``sum + eps``. Returned in the code's layout ``comb[i, j]`` with ``i`` the *source*
    stream and ``j`` the destination: columns sum to 1 (up to ``eps``); the matrix that acts on the
    streams is ``comb^T`` (see :func:`jaxmodels.ops.hyper_connections.mhc_coefficients`).

    Args:
      logits_MM: [..., M, M] logits (``mixes_comb * scale[2] + base_comb``), any float dtype.
      iters: ``hc_sinkhorn_iters`` (20 in V4's config); total row and column normalisations are
        ``iters`` each (counting the softmax as the first row normalisation).
      eps: ``hc_eps`` (1e-6 in V4's config).
      unroll: as in :func:`sinkhorn_paper`.

    Returns:
      [..., M, M] float32 ``comb``.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn_v4 needs iters >= 1, got {iters}.")
    x_MMN = _to_tokens_minor(logits_MM)  # [row i, column j, N]
    m_MMN = _normalize(jax.nn.softmax(x_MMN, axis=1) + eps, 0, eps)
    m_MMN = _alternate(m_MMN, 1, iters - 1, eps, unroll)  # rows, then columns
    return _from_tokens_minor(m_MMN, logits_MM.shape[:-2])


def sinkhorn_knopp(
    logits_MM: jax.Array,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    form: SinkhornForm = "v4",
    unroll: int | bool = 1,
) -> jax.Array:
    """Dispatch to :func:`sinkhorn_v4` (default, checkpoint-compatible) or :func:`sinkhorn_paper`.

    Each form returns the matrix in its own source's layout (see the module docstring): ``"v4"``
    gives ``comb`` (exact columns, applied transposed), ``"paper"`` gives ``H_res`` (exact rows,
    applied as ``H_res @ x``). ``eps`` is ignored by the paper form.
    """
    if form == "v4":
        return sinkhorn_v4(logits_MM, iters=iters, eps=eps, unroll=unroll)
    if form == "paper":
        return sinkhorn_paper(logits_MM, iters=iters, unroll=unroll)
    raise ValueError(f"Unknown Sinkhorn form {form!r}; expected 'v4' or 'paper'.")


def stochasticity_error(m_MM: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Largest deviation of row sums and of column sums from 1.

    Args:
      m_MM: [..., M, M].

    Returns:
      (row_error, column_error): float32 scalars, ``max |sum_j m_ij - 1|`` and
      ``max |sum_i m_ij - 1|`` over all rows/columns and leading axes.
    """
    m = m_MM.astype(jnp.float32)
    row = jnp.max(jnp.abs(jnp.sum(m, axis=-1) - 1.0))
    col = jnp.max(jnp.abs(jnp.sum(m, axis=-2) - 1.0))
    return row, col
