"""Sums that XLA:CPU runs fast: pairwise minor-axis sums and a weighted sum with its backward
pass written out, shared by the residual kinds (HC / mHC stream reads, AttnRes depth sums),
and a gradient materialised once (the SwiGLU block, KDA's short convolutions).

Three XLA:CPU behaviours, each measured on the ``small`` train step (README "Residual kinds",
Cost), motivate them:

* a ``reduce`` over the minor axis is emitted as a sequential scalar loop (float adds are not
  reassociated), while elementwise code vectorises: :func:`sum_minor` sums by repeated
  halving, ~8x faster at 128 terms;
* a per-token contraction written as an ``einsum`` becomes a batched dot of thousands of tiny
  matrices (``[1, M] x [M, D]`` per token), run one small GEMM at a time; so does its autodiff;
* ``optimization_barrier`` is dropped before fusion, and a cheap elementwise producer (such
  as an incoming gradient that is a sum of several terms) is fused into, and recomputed in,
  each of its consumers; a reduction's output is always written to memory, which
  :func:`materialize` uses.

Dimension letters as in DESIGN.md; ``K`` is the summed axis of :func:`weighted_sum` and ``D``
the trailing feature axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sum_minor(x: jax.Array) -> jax.Array:
    """Sum over the last axis by repeated halving (pairwise summation), [..., K] -> [...]."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        head = x[..., :half] + x[..., half : 2 * half]
        if x.shape[-1] % 2:
            head = jnp.concatenate([head[..., :1] + x[..., -1:], head[..., 1:]], axis=-1)
        x = head
    return x[..., 0]


def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged (exactly ``x + 0``), computed once and written to memory: summed with
    zeros over a new axis of size 2, because XLA:CPU materialises every reduction's output."""
    return jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0)


@jax.custom_vjp
def materialize_gradient(x: jax.Array) -> jax.Array:
    """``x`` unchanged; in the backward pass its cotangent is materialised once (see
    :func:`materialize`) instead of being recomputed in every consumer of the gradient.

    Where it pays: a gradient that is an expensive elementwise expression (a SiLU backward,
    with an exponential per element) and feeds several consumers, such as the transposed copy
    a weight-gradient matmul reads, or the ``W`` shifted products of a convolution's backward.
    XLA:CPU fuses the expression into each of them and, in a transposing copy, evaluates it in
    strided order: in the ``hybrid`` train step the SwiGLU gate's gradient took 7.5 ms per
    layer in one such copy of ``[352, 2048]`` elements. Train steps 9-16 % faster with it
    (``experiments/bench/materialized_gradients.py``; README, "Step time on CPU").
    """
    return x


materialize_gradient.defvjp(lambda x: (x, None), lambda _, g: (materialize(g),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def weighted_sum(weights: jax.Array, values: jax.Array, axis: int) -> jax.Array:
    """``sum_k weights[k] * values[k]`` over ``axis``, float32.

    Args:
      weights: ``values.shape`` without the trailing D axis, e.g. ``[..., K]`` for ``axis=-2``
        or ``[K, ...]`` for ``axis=0``.
      values: ``[..., K, ..., D]``, any float dtype.
      axis: the summed axis K of ``values`` (not the last one).

    Returns:
      float32 ``values.shape`` without ``axis``. The forward pass is elementwise; the backward
      pass (custom VJP) materialises the incoming gradient once, and sums the per-position
      inner products over D with :func:`sum_minor`. Equals autodiff of
      ``einsum("...k,...kd->...d")`` (tested).
    """
    return jnp.sum(weights.astype(jnp.float32)[..., None] * values.astype(jnp.float32), axis=axis)


def _weighted_sum_fwd(weights, values, axis):
    return weighted_sum(weights, values, axis), (weights, values)


def _weighted_sum_bwd(axis, residuals, g):
    weights, values = residuals
    g_expanded = jnp.expand_dims(materialize(g.astype(jnp.float32)), axis)
    d_weights = sum_minor(g_expanded * values.astype(jnp.float32))
    d_values = weights.astype(jnp.float32)[..., None] * g_expanded
    return d_weights.astype(weights.dtype), d_values.astype(values.dtype)


weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)
