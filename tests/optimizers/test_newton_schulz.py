"""Newton–Schulz oracles (reference/optimizers_and_residuals.md §12, items 1-6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optimizers import ns_schedule, polar_factor
from optimizers.newton_schulz import POLAR_EXPRESS, STANDARD
from optimizers.newton_schulz import newton_schulz as _newton_schulz

# Jitted once per static configuration: eager op-by-op dispatch is the slow part on 2 cores.
newton_schulz = jax.jit(
    _newton_schulz,
    static_argnames=("coeffs", "steps", "compute_dtype", "eps", "precision", "implementation"),
)


def normal(seed, shape):
    """Test data from NumPy's generator (jax.random's first compile is slow on CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def scalar_map(schedule, s):
    """f_k∘…∘f_1 on scalars, float64."""
    s = np.asarray(s, np.float64)
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return s


def orthogonal(seed, n):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return jnp.asarray(q * np.sign(np.diagonal(r)), jnp.float32)


def with_singular_values(seed, s, m, n):
    """[m, n] matrix U diag(s) Vᵀ with the given singular values (len(s) = min(m, n))."""
    k = len(s)
    u = orthogonal(seed, m)[:, :k]
    v = orthogonal(seed + 100, n)[:, :k]
    return (u * jnp.asarray(s, jnp.float32)) @ v.T, u, v


SCHEDULES = {
    "standard": ("standard", None),
    "polar_express": ("polar_express", None),
    "deepseek_v4": ("deepseek_v4", None),
    "dion": ("dion", None),
    "explicit": (((3.0, -3.2, 1.2), (2.5, -2.0, 0.6), (1.875, -1.25, 0.375)), None),
}


@pytest.mark.parametrize(
    "name, shape", [(name, (12, 20)) for name in SCHEDULES] + [("standard", (20, 12))]
)
def test_exact_scalar_oracle(name, shape):
    """Output singular values == f^k(s/‖s‖₂) and the input's singular vectors are kept."""
    coeffs, steps = SCHEDULES[name]
    if not isinstance(coeffs, str):
        coeffs = tuple(coeffs)  # hashable for the jit's static argument
    m, n = shape
    s = np.geomspace(0.02, 3.0, min(m, n))
    x, u, v = with_singular_values(1, s, m, n)
    out = newton_schulz(x, coeffs=coeffs, steps=steps, compute_dtype=jnp.float32)
    expected = scalar_map(ns_schedule(coeffs, steps), s / np.linalg.norm(s))
    core = np.asarray(u.T @ out @ v)  # diag(f(s)) if the singular vectors are kept
    np.testing.assert_allclose(np.diagonal(core), expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(core - np.diag(np.diagonal(core)), 0.0, atol=2e-5)


def test_bf16_compute_follows_the_oracle_loosely():
    s = np.linspace(0.1, 1.0, 16)
    x, u, v = with_singular_values(2, s, 16, 48)
    out = newton_schulz(x, compute_dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32
    got = np.diagonal(np.asarray(u.T @ out @ v))
    np.testing.assert_allclose(got, scalar_map([STANDARD] * 5, s / np.linalg.norm(s)), atol=3e-2)


@pytest.mark.parametrize(
    "name, lo, expected_range",
    [
        ("standard", 1e-2, (0.6818, 1.1344)),
        ("standard", 1e-3, (0.4705, 1.2024)),
        ("polar_express", 1e-2, (0.8703, 1.1236)),
        ("dion", 1e-2, (0.9778, 1.0318)),
        ("deepseek_v4", 1e-3, (1.0000, 1.0005)),
    ],
)
def test_schedule_ranges_on_scalars(name, lo, expected_range):
    """Oracle table §12.3-4: image of [lo, 1] under the whole schedule."""
    out = scalar_map(ns_schedule(name), np.geomspace(lo, 1.0, 100_001))
    np.testing.assert_allclose((out.min(), out.max()), expected_range, atol=1e-4)


def test_standard_schedule_facts():
    (a, b, c), *_ = ns_schedule("standard")
    assert len(ns_schedule("standard")) == 5 and a == 3.4445
    np.testing.assert_allclose(a + b + c, 0.701, atol=1e-9)  # f(1): 1 is not a fixed point
    dsv4 = ns_schedule("deepseek_v4")
    assert dsv4 == (STANDARD,) * 8 + ((2.0, -1.5, 0.5),) * 2
    assert ns_schedule("polar_express", 10)[7:] == (POLAR_EXPRESS[-1],) * 3


def test_gaussian_singular_values_in_range():
    """Gaussian 128×512 (normalised singular values all > 0.01) lands in [0.6818, 1.1344];
    DeepSeek-V4's hybrid lands at 1 (to float32 accuracy)."""
    x = normal(3, (128, 512))
    sv = np.linalg.svd(np.asarray(newton_schulz(x, compute_dtype=jnp.float32)), compute_uv=False)
    assert 0.6818 - 1e-4 <= sv.min() and sv.max() <= 1.1344 + 1e-4
    sv = np.linalg.svd(np.asarray(newton_schulz(x, coeffs="deepseek_v4")), compute_uv=False)
    assert 0.999 <= sv.min() and sv.max() <= 1.002


def test_equivariance():
    x = normal(4, (24, 40))
    out = newton_schulz(x)
    np.testing.assert_allclose(newton_schulz(x.T), out.T, atol=1e-5)
    p, q = orthogonal(5, 24), orthogonal(6, 40)
    np.testing.assert_allclose(newton_schulz(p @ x @ q), p @ out @ q, atol=1e-5)


def test_zero_input_gives_zero_without_nan():
    out = newton_schulz(jnp.zeros((3, 8, 5)))
    assert np.all(np.asarray(out) == 0.0)


@pytest.mark.parametrize("implementation", ["batched", "map"])
def test_batched_equals_per_matrix(implementation):
    x = normal(7, (2, 3, 16, 10))
    out = newton_schulz(x, implementation=implementation)
    one_by_one = jax.jit(lambda x: [[_newton_schulz(x[i, j]) for j in range(3)] for i in range(2)])
    # The forms differ only in the order XLA sums inside the matmuls ("map" runs them in a loop
    # body; unoptimised LLVM code, as in this suite, sums differently there), and each step
    # amplifies a rounding difference by up to the quintic's slope at zero: 3.4445^5 ~ 490 for
    # the small singular values, so an ulp (6e-8 at 0.5) may become ~3e-5. A batching mistake
    # (a wrong matrix, a shared norm) gives O(0.1) differences.
    np.testing.assert_allclose(out, np.asarray(one_by_one(x)), atol=3e-5)


def test_polar_express_long_schedule_reaches_the_polar_factor():
    x = normal(8, (32, 64))
    out = newton_schulz(x, coeffs="polar_express", steps=10)
    np.testing.assert_allclose(out, jax.jit(polar_factor)(x), atol=2e-4)


def test_rms_of_exact_polar_factor():
    """Moonlight Lemma 1: RMS(UVᵀ) = 1/sqrt(max(A, B)); ×0.2·sqrt(max) gives 0.2."""
    for shape in [(32, 96), (64, 64)]:
        o = jax.jit(polar_factor)(normal(9, shape))
        rms = float(jnp.sqrt(jnp.mean(o**2)))
        np.testing.assert_allclose(rms, 1 / np.sqrt(max(shape)), rtol=1e-5)
        np.testing.assert_allclose(0.2 * np.sqrt(max(shape)) * rms, 0.2, rtol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown Newton-Schulz schedule"):
        ns_schedule("muon")
    with pytest.raises(ValueError, match="steps=4 but 3"):
        ns_schedule(SCHEDULES["explicit"][0], 4)
    with pytest.raises(ValueError, match=">= 1"):
        ns_schedule("standard", 0)
    with pytest.raises(TypeError, match="static"):
        ns_schedule("standard", 5.0)
    with pytest.raises(ValueError, match="shape"):
        ns_schedule(((1.0, 2.0),))
    with pytest.raises(ValueError, match=r"\[..., m, n\]"):
        _newton_schulz(jnp.ones(4))
    with pytest.raises(ValueError, match="implementation"):
        _newton_schulz(jnp.ones((2, 2)), implementation="fast")
