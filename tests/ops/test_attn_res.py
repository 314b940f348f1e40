"""Attention Residuals depth attention and state (jaxmodels.ops.attn_res): oracles 23-26."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.attn_res import (
    attn_res_max_sources,
    attn_res_push,
    attn_res_read,
    attn_res_sources,
    attn_res_state_init,
    block_sources,
    depth_attention,
    depth_attention_reference,
)
from jaxmodels.ops.norms import rms_norm

B, T, D = 2, 3, 8

# Jitted once per argument structure: eager dispatch would compile every primitive per shape.
_ref = jax.jit(depth_attention_reference)
_push = jax.jit(attn_res_push, static_argnums=2)
_sub = jax.jit(lambda h, w: jnp.tanh(rms_norm(h) @ w))


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_zero_query_gives_uniform_average_oracle_23():
    """w = 0: every logit is 0, weights are 1/#valid sources, the output is their mean; and
    RMSNorm(mean) == RMSNorm(sum), i.e. the normalised input equals the pre-norm residual's."""
    src = _randn(0, (5, B, T, D))
    valid = jnp.array([True, True, True, False, False])
    src = src.at[3:].set(1e4)  # garbage in masked slots must not leak
    out, w = depth_attention(src, valid, jnp.zeros(D), _randn(1, (D,)), return_weights=True)
    np.testing.assert_allclose(w[:3], 1 / 3, atol=1e-7)
    np.testing.assert_array_equal(w[3:], 0.0)
    np.testing.assert_allclose(out, np.asarray(src[:3]).mean(0), atol=1e-6)
    np.testing.assert_allclose(rms_norm(out), rms_norm(src[:3].sum(0)), atol=1e-5)


def test_matches_reference_form_and_masked_slots_are_exactly_zero_oracle_26():
    src = _randn(2, (6, B, T, D))
    q, g = _randn(3, (D,)), 1.0 + _randn(4, (D,), 0.2)
    valid = jnp.array([True, False, True, True, False, True])
    out, w = depth_attention(src, valid, q, g, return_weights=True)
    keep = [0, 2, 3, 5]
    out_ref, w_ref = depth_attention_reference([src[i] for i in keep], q, g)
    np.testing.assert_allclose(out, out_ref, atol=1e-5)
    np.testing.assert_allclose(w[np.array(keep)], w_ref, atol=1e-6)
    assert np.all(np.asarray(w)[np.array([1, 4])] == 0.0)  # exactly 0
    np.testing.assert_allclose(np.asarray(w).sum(0), 1.0, atol=1e-6)
    # Huge query: the softmax saturates but the masked slots still get exactly 0 (no NaN).
    out2, w2 = depth_attention(src, valid, 1e4 * q, g, return_weights=True)
    assert np.all(np.isfinite(out2)) and np.all(np.asarray(w2)[np.array([1, 4])] == 0.0)


def test_gradients_match_reference_form():
    """The depth sum's written-out backward pass (jaxmodels.ops.reductions.weighted_sum) ==
    autodiff of the materialised-key reference, for the sources, query and key gain (fp32)."""
    src = _randn(12, (4, B, T, D))
    q, g = _randn(13, (D,)), 1.0 + _randn(14, (D,), 0.2)
    ct = _randn(15, (B, T, D))

    def loss(fn):
        return jax.jit(jax.grad(lambda s, q, g: jnp.sum(fn(s, q, g) * ct), argnums=(0, 1, 2)))

    fast = loss(lambda s, q, g: depth_attention(s, None, q, g))(src, q, g)
    slow = loss(lambda s, q, g: depth_attention_reference(list(s), q, g)[0])(src, q, g)
    for got, want in zip(fast, slow, strict=True):
        assert float(jnp.max(jnp.abs(want))) > 1e-3
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_scale_invariance_oracle_25():
    """Scaling one source by c > 0 leaves every logit unchanged (keys are RMS-normalised) but
    scales that source's value; v and 10 v get equal weights 0.5 / 0.5."""
    src = _randn(5, (4, B, T, D))
    q = _randn(6, (D,))
    _, w = depth_attention(src, None, q, return_weights=True)
    scaled = src.at[2].multiply(7.0)
    out_s, w_s = depth_attention(scaled, None, q, return_weights=True)
    np.testing.assert_allclose(w_s, w, atol=1e-6)
    want = sum(np.asarray(w)[i, ..., None] * np.asarray(scaled[i]) for i in range(4))
    np.testing.assert_allclose(out_s, want, atol=1e-5)
    v = src[0]
    _, w_pair = depth_attention(jnp.stack([v, 10.0 * v]), None, q, return_weights=True)
    np.testing.assert_allclose(w_pair, 0.5, atol=1e-6)


def test_source_sets_oracle_26_example():
    """Block size 2, outputs o1, o2, o3: after o1 [e, o1]; after o2 [e, o1+o2];
    after o3 [e, o1+o2, o3] -- as valid slots of the static buffer and in the list reference."""
    e, o1, o2, o3 = (_randn(10 + i, (B, T, D)) for i in range(4))
    state = attn_res_state_init(e, attn_res_max_sources(3, 2))
    assert state.sources_SBTD.shape[0] == 2
    expected = [[e, o1], [e, o1 + o2], [e, o1 + o2, o3]]
    outs = [o1, o2, o3]
    for k, (o, want) in enumerate(zip(outs, expected, strict=True)):
        state = _push(state, o, 2)
        srcs, valid = attn_res_sources(state)
        got = [srcs[i] for i in np.flatnonzero(np.asarray(valid))]
        ref = block_sources(e, outs[: k + 1], 2)
        assert len(got) == len(want) == len(ref)
        for a, b, c in zip(got, want, ref, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
            np.testing.assert_allclose(c, b, atol=1e-6)


def _sublayer(h, w):
    return _sub(h, w)


@functools.partial(jax.jit, static_argnames=("block_size",))
def _run_scan(e, ws, qs, gs, q_out, g_out, block_size):
    """A decoder-shaped loop under lax.scan: read -> sublayer -> push, then the final read."""
    n_layers = ws.shape[0]
    state = attn_res_state_init(e, attn_res_max_sources(n_layers, block_size))

    def body(state, p):
        w, q, g = p
        h, weights = attn_res_read(state, q, g, return_weights=True)
        return attn_res_push(state, _sublayer(h, w), block_size), weights

    state, weights = jax.lax.scan(body, state, (ws, qs, gs))
    return attn_res_read(state, q_out, g_out), weights


def _run_reference(e, ws, qs, gs, q_out, g_out, block_size):
    outputs, weights = [], []
    for w, q, g in zip(ws, qs, gs, strict=True):
        h, p = _ref(block_sources(e, outputs, block_size), q, g)
        weights.append(p)
        outputs.append(_sublayer(h, w))
    return _ref(block_sources(e, outputs, block_size), q_out, g_out)[0], weights


def _params(n_layers, seed):
    ws = _randn(seed, (n_layers, D, D), 0.5)
    qs = _randn(seed + 1, (n_layers, D))
    gs = 1.0 + _randn(seed + 2, (n_layers, D), 0.1)
    return ws, qs, gs, _randn(seed + 3, (D,)), 1.0 + _randn(seed + 4, (D,), 0.1)


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_scan_state_matches_list_reference(block_size):
    """The static-buffer state under jit + lax.scan equals the plain-Python source lists, for the
    outputs and for every layer's depth weights (masked slots 0), including a final partial block
    (7 sublayers)."""
    n_layers = 7
    e = _randn(20, (B, T, D))
    params = _params(n_layers, 30)
    out, weights = _run_scan(e, *params, block_size=block_size)
    out_ref, weights_ref = _run_reference(e, *params, block_size)
    np.testing.assert_allclose(out, out_ref, atol=2e-5)
    s_max = attn_res_max_sources(n_layers, block_size)
    for layer, w_ref in enumerate(weights_ref):
        w = np.asarray(weights[layer])  # [s_max + 1, B, T]
        n_done = 1 + layer // block_size
        has_partial = layer % block_size != 0
        assert np.all(w[n_done:s_max] == 0.0)
        got = list(w[:n_done]) + ([w[s_max]] if has_partial else [])
        if not has_partial:
            assert np.all(w[s_max] == 0.0)
        np.testing.assert_allclose(np.stack(got), w_ref, atol=1e-6)


def test_block_size_one_equals_full_attn_res_oracle_24():
    """Block AttnRes with one sublayer per block == Full AttnRes, whose sources are written out
    here explicitly: [embedding, o_1, ..., o_{l-1}]."""
    n_layers = 5
    e = _randn(40, (B, T, D))
    ws, qs, gs, q_out, g_out = _params(n_layers, 50)
    out, weights = _run_scan(e, ws, qs, gs, q_out, g_out, block_size=1)
    outputs = []
    for layer in range(n_layers):
        h, p = _ref([e, *outputs], qs[layer], gs[layer])
        np.testing.assert_allclose(weights[layer][: layer + 1], p, atol=1e-6)
        outputs.append(_sublayer(h, ws[layer]))
    np.testing.assert_allclose(out, _ref([e, *outputs], q_out, g_out)[0], atol=2e-5)


def test_zero_queries_whole_network_is_uniform_average():
    """With all pseudo-queries zero, each sublayer input is the mean of its sources."""
    e = _randn(60, (B, T, D))
    ws, _, gs, _, g_out = _params(4, 70)
    zeros = jnp.zeros((4, D))
    _, weights = _run_scan(e, ws, zeros, gs, jnp.zeros(D), g_out, block_size=2)
    for layer in range(4):
        w = np.asarray(weights[layer])
        n_valid = 1 + layer // 2 + (layer % 2 != 0)
        np.testing.assert_allclose(np.sort(w, axis=0)[-n_valid:], 1.0 / n_valid, atol=1e-6)


def test_read_equals_depth_attention_on_concatenated_sources_and_grads():
    e = _randn(80, (B, T, D))
    state = attn_res_state_init(e, 3)
    for i in range(3):
        state = _push(state, _randn(81 + i, (B, T, D)), 2)
    q, g = _randn(90, (D,)), 1.0 + _randn(91, (D,), 0.1)
    out, w = attn_res_read(state, q, g, return_weights=True)
    out2, w2 = depth_attention(*attn_res_sources(state), q, g, return_weights=True)
    np.testing.assert_allclose(out, out2, atol=1e-6)
    np.testing.assert_allclose(w, w2, atol=1e-7)
    grads = jax.jit(
        jax.grad(lambda q, g: jnp.sum(attn_res_read(state, q, g) ** 2), argnums=(0, 1))
    )(q, g)
    assert all(np.all(np.isfinite(x)) and float(jnp.max(jnp.abs(x))) > 0 for x in grads)


def test_low_precision_buffer_and_errors():
    e = _randn(95, (B, T, D)).astype(jnp.bfloat16)
    state = attn_res_state_init(e, 2)
    assert state.sources_SBTD.dtype == jnp.bfloat16
    state32 = attn_res_state_init(e, 2, dtype=jnp.float32)
    assert state32.partial_BTD.dtype == jnp.float32
    out = attn_res_read(state, _randn(96, (D,)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), e.astype(jnp.float32), atol=0)
    with pytest.raises(ValueError, match="block_size"):
        attn_res_push(state, e, 0)
    with pytest.raises(ValueError, match="max_sources"):
        attn_res_state_init(e, 0)
    assert attn_res_max_sources(12, 4) == 4 and attn_res_max_sources(7, 1) == 8
