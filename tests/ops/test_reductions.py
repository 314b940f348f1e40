"""jaxmodels.ops.reductions: the fast sums equal the plain ones, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.reductions import materialize, materialize_gradient, sum_minor, weighted_sum


def _randn(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("length", [1, 2, 5, 7, 128, 129])
def test_pairwise_minor_sum_equals_sum(length):
    x = _randn(40 + length, (3, 4, length))
    np.testing.assert_allclose(sum_minor(x), np.asarray(x).sum(-1), rtol=1e-6, atol=1e-5)


def test_materialize_is_the_identity_under_jit_and_grad():
    x = _randn(1, (5, 7))
    np.testing.assert_array_equal(jax.jit(materialize)(x), x)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(materialize(x) * x))(x), 2 * x)


def test_materialize_gradient_is_the_identity_with_unchanged_gradients():
    """Forward: x itself. Backward: the cotangent passed through, materialised (x + 0), so a
    function whose input feeds several consumers (a silu and a cube) has exactly the gradient it
    has without the wrapper: bitwise op by op, and to fp32 rounding once XLA fuses the step
    differently under jit."""
    x = _randn(2, (6, 9))
    weights = _randn(3, (6, 9))

    def loss(wrap, x):
        y = wrap(x)
        return jnp.sum(jax.nn.silu(y) * weights) + jnp.sum(y**3)

    np.testing.assert_array_equal(materialize_gradient(x), x)
    want = jax.grad(functools.partial(loss, lambda x: x))(x)
    np.testing.assert_array_equal(jax.grad(functools.partial(loss, materialize_gradient))(x), want)
    got_jit = jax.jit(jax.grad(functools.partial(loss, materialize_gradient)))(x)
    np.testing.assert_allclose(got_jit, want, rtol=1e-6, atol=1e-6)


# bf16: inputs and the result are bf16 (relative step 2^-8); both forms sum in fp32 and round
# once, so they differ by at most one bf16 step of a result up to ~20 here: 0.1 absolute.
_TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 1e-1}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    ("axis", "weights_shape", "values_shape", "einsum"),
    [
        (-2, (2, 3, 4), (2, 3, 4, 64), "btk,btkd->btd"),  # HC / mHC stream read
        (0, (5, 2, 3), (5, 2, 3, 64), "kbt,kbtd->btd"),  # AttnRes depth sum
    ],
)
def test_weighted_sum_equals_einsum_values_and_gradients(
    dtype, axis, weights_shape, values_shape, einsum
):
    weights, values = _randn(2, weights_shape).astype(dtype), _randn(3, values_shape).astype(dtype)
    ct = _randn(4, (2, 3, 64))
    atol = _TOLERANCE[dtype]

    def reference(w, v):
        return jnp.einsum(einsum, w.astype(jnp.float32), v.astype(jnp.float32))

    def fast(w, v):
        return weighted_sum(w, v, axis)

    np.testing.assert_allclose(fast(weights, values), reference(weights, values), atol=atol)
    grads = [
        jax.jit(jax.grad(lambda w, v, f=f: jnp.sum(f(w, v) * ct), (0, 1)))(weights, values)
        for f in (fast, reference)
    ]
    for got, want, arg in zip(*grads, (weights, values), strict=True):
        assert got.dtype == arg.dtype
        scale = max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol * scale
        )
