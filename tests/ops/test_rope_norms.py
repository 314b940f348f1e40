"""RoPE / YaRN / softmax-scale oracles (reference/attention.md §1.4, §8.1), norms, SwiGLU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.config import BlockSettings
from jaxmodels.layers import SwiGLU
from jaxmodels.ops import mlp, norms, rope


@pytest.mark.parametrize(
    "head_dim,factor,mscale_all_dim,expected",
    [
        (192, 40.0, 1.0, 0.1352338),  # DeepSeek-V3 with YaRN
        (192, None, 1.0, 0.0721688),  # V3 without YaRN; Kimi-Linear NoPE MLA
        (192, 40.0, 0.707, 0.1147214),  # DeepSeek-V2 (mscale 0.707)
        (192, 32.0, 1.0, 0.1308608),  # Kimi K2
        (512, None, 1.0, 0.0441942),  # DeepSeek-V4
    ],
)
def test_softmax_scale_oracles(head_dim, factor, mscale_all_dim, expected):
    got = rope.softmax_scale(head_dim, yarn_factor=factor, mscale_all_dim=mscale_all_dim)
    assert got == pytest.approx(expected, abs=1e-6)


def test_yarn_correction_range_oracles():
    assert rope.yarn_correction_range(64, 10000.0, 4096, 32, 1) == (10, 23)
    assert rope.yarn_correction_range(64, 50000.0, 4096, 1, 1) == (19, 20)


def test_yarn_frequencies_keep_low_indices_and_divide_high_ones():
    base = rope.rope_inv_freq(64, 10000.0)
    yarn = rope.yarn_inv_freq(64, 10000.0, 40.0, 4096, 32, 1)
    np.testing.assert_allclose(yarn[:11], base[:11], rtol=0)
    np.testing.assert_allclose(yarn[23:], base[23:] / 40.0, rtol=1e-12)
    assert np.all((yarn[11:23] < base[11:23]) & (yarn[11:23] > base[11:23] / 40.0))


def test_interleaved_equals_half_after_column_permutation():
    key = jax.random.key(0)
    x = jax.random.normal(key, (2, 7, 3, 16))
    positions = jnp.broadcast_to(jnp.arange(7) * 3, (2, 7))
    inv_freq = rope.rope_inv_freq(16, 10000.0)
    perm = rope.interleaved_to_half_permutation(16)
    interleaved = rope.apply_rope(x, positions, inv_freq, layout="interleaved")
    half = rope.apply_rope(x[..., perm], positions, inv_freq, layout="half")
    np.testing.assert_allclose(interleaved[..., perm], half, atol=1e-6)


@pytest.mark.parametrize("layout", rope.LAYOUTS)
def test_rope_scores_depend_only_on_relative_position(layout):
    kq, kk = jax.random.split(jax.random.key(1))
    q = jax.random.normal(kq, (1, 1, 1, 8))
    k = jax.random.normal(kk, (1, 1, 1, 8))
    inv_freq = rope.rope_inv_freq(8, 10000.0)

    def score(pq, pk):
        rq = rope.apply_rope(q, jnp.array([[pq]]), inv_freq, layout=layout)
        rk = rope.apply_rope(k, jnp.array([[pk]]), inv_freq, layout=layout)
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    # Rotations preserve norms, and negative positions invert them.
    r = rope.apply_rope(q, jnp.array([[7]]), inv_freq, layout=layout)
    np.testing.assert_allclose(jnp.linalg.norm(r), jnp.linalg.norm(q), rtol=1e-6)
    back = rope.apply_rope(r, jnp.array([[-7]]), inv_freq, layout=layout)
    np.testing.assert_allclose(back, q, atol=1e-5)


def test_rope_rejects_bad_layout_and_odd_dims():
    with pytest.raises(ValueError, match="layout='bogus'"):
        rope.apply_rope(jnp.ones((1, 1, 4)), jnp.zeros((1, 1)), np.ones(2), layout="bogus")
    with pytest.raises(ValueError, match="rotary dim 5"):
        rope.apply_rope(jnp.ones((1, 1, 5)), jnp.zeros((1, 1)), np.ones(2))


def test_rms_norm_matches_hand_computation():
    x = jnp.array([[3.0, 4.0]])
    scale = jnp.array([2.0, 0.5])
    expected = np.array([[3.0, 4.0]]) / np.sqrt(12.5 + 1e-6) * np.array([2.0, 0.5])
    np.testing.assert_allclose(norms.rms_norm(x, scale), expected, rtol=1e-6)
    assert norms.rms_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_layer_norm_and_l2_normalize():
    x = jnp.array([[1.0, 2.0, 3.0]])
    y = norms.layer_norm(x, jnp.ones(3), jnp.full(3, 0.5), eps=0.0)
    np.testing.assert_allclose(y, (np.array([[-1, 0, 1]]) / np.sqrt(2 / 3)) + 0.5, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(norms.l2_normalize(x)), 1.0, rtol=1e-5)


def test_swiglu_matches_hand_formula():
    x = jnp.array([[[1.0, -2.0]]])
    wg = jnp.array([[1.0], [0.0]])
    wu = jnp.array([[0.0], [1.0]])
    wd = jnp.array([[3.0, 1.0]])
    silu1 = 1.0 / (1.0 + np.exp(-1.0))
    np.testing.assert_allclose(mlp.swiglu(x, wg, wu, wd), [[[silu1 * -2 * 3, silu1 * -2]]], 1e-6)


def test_swiglu_module_equals_the_op_values_and_gradients():
    """The Linen block (which materialises the gate and up gradients once, see
    `materialize_gradient`) == `ops.mlp.swiglu` with its weights, values and the gradients
    with respect to the input and every weight (fp32)."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    module = SwiGLU(intermediate_size=12, settings=BlockSettings(hidden_size=8))
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(1), x))["params"]
    cotangent = jax.random.normal(jax.random.key(2), (2, 5, 8))

    def via_module(params, x):
        return jnp.sum(module.apply({"params": params}, x) * cotangent)

    def via_op(params, x):
        w = {name: params[name]["kernel"] for name in ("gate_proj", "up_proj", "down_proj")}
        y = mlp.swiglu(x, w["gate_proj"], w["up_proj"], w["down_proj"])
        return jnp.sum(y * cotangent)

    got = jax.jit(jax.value_and_grad(via_module, argnums=(0, 1)))(params, x)
    want = jax.value_and_grad(via_op, argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
