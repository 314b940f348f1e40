"""Gated delta rule (KDA / Gated DeltaNet): chunked == recurrent, decode, gradients, oracles.

Oracles from reference/attention.md §8.6. All numerics in fp32 unless the test says otherwise.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.delta_rule import (
    delta_rule,
    delta_rule_chunked,
    delta_rule_recurrent,
    delta_rule_step,
)

# Shared shapes so compiled functions are reused across tests. T = 100 is not a multiple of any
# chunk size used here, so every chunked call also exercises the tail padding.
B, T, N, H, J = 2, 100, 2, 16, 8
TOL = {"rtol": 1e-4, "atol": 2e-5}

# Every comparison goes through the public dispatcher; one compile per (shape, chunk size).
_delta_rule = jax.jit(delta_rule, static_argnames=("implementation", "chunk_size"))
chunked = functools.partial(_delta_rule, implementation="chunked")
recurrent = functools.partial(_delta_rule, implementation="recurrent")
step = jax.jit(delta_rule_step)


def _weighted_loss(impl, q, k, v, g, beta, s0, w_o, w_s):
    fn = delta_rule_chunked if impl == "chunked" else delta_rule_recurrent
    o, s = fn(q, k, v, g, beta, initial_state=s0)
    return jnp.sum(o * w_o) + jnp.sum(s * w_s)


# d(sum(o * w_o) + sum(S * w_s)) / d(q, k, v, g, beta, S0), shared by the gradient tests
grads_of = {
    impl: jax.jit(jax.grad(functools.partial(_weighted_loss, impl), argnums=tuple(range(6))))
    for impl in ("chunked", "recurrent")
}


def make_inputs(seed, *, t=T, gate="kda", decay="realistic", beta_max=1.0, dtype=jnp.float32):
    """q, k (L2-normalised), v, g (<= 0), beta, initial state (numpy RNG: nothing to compile).

    decay="realistic": g = -exp(A_log) softplus(f + dt_bias) with the FLA/Kimi initialisation
    (A_log = log U(1, 16) per head, dt ~ logU(1e-3, 1e-1) through inverse softplus).
    decay="strong": g ~ U(-5, 0), and one key channel (or head) at -5 every step, so the
    cumulative decay over a 64-token chunk reaches -320 and exp(-G) overflows fp32.
    """
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.standard_normal((B, t, N, H)))
    k = unit(rng.standard_normal((B, t, N, H)))
    v = rng.standard_normal((B, t, N, J))
    beta = beta_max / (1 + np.exp(-rng.standard_normal((B, t, N))))
    gate_shape = (B, t, N, H) if gate == "kda" else (B, t, N)
    if decay == "realistic":
        a_log = np.log(rng.uniform(1, 16, (N, 1) if gate == "kda" else (N,)))
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), gate_shape[2:]))
        dt_bias = dt + np.log(-np.expm1(-dt))  # inverse softplus
        g = -np.exp(a_log) * np.logaddexp(0, rng.standard_normal(gate_shape) + dt_bias)
    elif decay == "strong":
        g = -5.0 * rng.uniform(size=gate_shape)
        g[..., 0] = -5.0
    else:
        g = np.zeros(gate_shape)
    state0 = 0.5 * rng.standard_normal((B, N, H, J))
    inputs = [jnp.asarray(x, dtype) for x in (q, k, v, g, beta)]
    return (*inputs, jnp.asarray(state0, jnp.float32))


def assert_close(actual, desired, **tol):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(desired, np.float32), **(tol or TOL)
    )


# ------------------------------------------------------------------------------------------
# chunked == recurrent
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["kda", "gdn"])
@pytest.mark.parametrize("decay", ["realistic", "strong"])
def test_chunked_matches_recurrent(gate, decay):
    q, k, v, g, beta, s0 = make_inputs(0, gate=gate, decay=decay)
    o_ref, s_ref = recurrent(q, k, v, g, beta, initial_state=s0)
    o, s = chunked(q, k, v, g, beta, initial_state=s0, chunk_size=64)
    assert jnp.abs(o_ref).max() > 0.05  # the comparison is not between two near-zero tensors
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    if decay == "strong":  # the factored form exp(G_t) * exp(-G_s) would overflow here
        g_ch = g if gate == "kda" else g[..., None]
        G_first_chunk = jnp.cumsum(g_ch[:, :64], axis=1)
        assert bool(jnp.isinf(jnp.exp(-G_first_chunk)).any())


def test_extreme_decay_is_finite_and_exact():
    """g = -50 every step (cumulative -3200 per chunk): outputs and gradients stay finite."""
    q, k, v, g, beta, s0 = make_inputs(1)
    g = jnp.full_like(g, -50.0)
    o_ref, s_ref = recurrent(q, k, v, g, beta, initial_state=s0)
    o, s = chunked(q, k, v, g, beta, initial_state=s0, chunk_size=64)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    grads = grads_of["chunked"](q, k, v, g, beta, s0, jnp.ones_like(o), jnp.ones_like(s))
    assert all(bool(jnp.isfinite(x).all()) for x in grads)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_size_invariance(chunk_size):
    q, k, v, g, beta, s0 = make_inputs(2, decay="strong")
    o_ref, s_ref = recurrent(q, k, v, g, beta, initial_state=s0)
    o, s = chunked(q, k, v, g, beta, initial_state=s0, chunk_size=chunk_size)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


def test_tail_padding_is_inert():
    """T=50 with chunk 24 equals an explicit pad to 72 with g=0, beta=0, k=0 and junk q, v.

    (24 is also not a power of two, which the dyadic intra-chunk split pads internally.)
    """
    t, c = 50, 24
    q, k, v, g, beta, s0 = make_inputs(4, t=t, decay="strong")
    o, s = chunked(q, k, v, g, beta, initial_state=s0, chunk_size=c)
    junk = make_inputs(5, t=72 - t)
    pad = functools.partial(jnp.concatenate, axis=1)
    qp, vp = pad([q, junk[0]]), pad([v, junk[2]])  # junk queries and values in the padding
    kp = pad([k, jnp.zeros_like(junk[1])])
    gp = pad([g, jnp.zeros_like(junk[3])])
    bp = pad([beta, jnp.zeros_like(junk[4])])
    o_pad, s_pad = chunked(qp, kp, vp, gp, bp, initial_state=s0, chunk_size=c)
    assert_close(o, o_pad[:, :t])
    assert_close(s, s_pad)
    o_ref, s_ref = recurrent(q, k, v, g, beta, initial_state=s0)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


# ------------------------------------------------------------------------------------------
# state passing and decode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_state_passing(impl):
    """run(x1 || x2) == run(x2, initial_state=state(x1)), split off a chunk boundary."""
    fn = (lambda *a, **kw: chunked(*a, **kw, chunk_size=16)) if impl == "chunked" else recurrent
    q, k, v, g, beta, s0 = make_inputs(6, decay="strong")
    o_full, s_full = fn(q, k, v, g, beta, initial_state=s0)
    split = 37
    first = [x[:, :split] for x in (q, k, v, g, beta)]
    second = [x[:, split:] for x in (q, k, v, g, beta)]
    o1, s1 = fn(*first, initial_state=s0)
    o2, s2 = fn(*second, initial_state=s1)
    assert_close(jnp.concatenate([o1, o2], axis=1), o_full)
    assert_close(s2, s_full)


@pytest.mark.parametrize("gate", ["kda", "gdn"])
def test_prefill_then_decode_matches_recurrent(gate):
    """Chunked prefill of 37 tokens, then one delta_rule_step per token == the full recurrence."""
    q, k, v, g, beta, s0 = make_inputs(7, gate=gate)
    o_ref, s_ref = recurrent(q, k, v, g, beta, initial_state=s0)
    prefill = 37
    first = [x[:, :prefill] for x in (q, k, v, g, beta)]
    o_pre, state = chunked(*first, initial_state=s0, chunk_size=16)
    outs = [o_pre]
    for t in range(prefill, T):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t[:, None])
    assert_close(jnp.concatenate(outs, axis=1), o_ref)
    assert_close(state, s_ref)


def test_step_is_the_recurrence_from_zero_state():
    q, k, v, g, beta, _ = make_inputs(8, t=6)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, g, beta)
    state = jnp.zeros((B, N, H, J))
    for t in range(6):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        assert_close(o_t, o_ref[:, t])
    assert_close(state, s_ref)


# ------------------------------------------------------------------------------------------
# gradients and causality
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["kda", "gdn"])
def test_gradients_chunked_match_recurrent(gate):
    decay = "strong" if gate == "gdn" else "realistic"
    q, k, v, g, beta, s0 = make_inputs(9, gate=gate, decay=decay)
    kw = jax.random.split(jax.random.key(10), 2)
    w_o = jax.random.normal(kw[0], (B, T, N, J))
    w_s = jax.random.normal(kw[1], (B, N, H, J))
    args = (q, k, v, g, beta, s0, w_o, w_s)
    grads_ref = grads_of["recurrent"](*args)
    grads = grads_of["chunked"](*args)
    for name, gr, gc in zip(("q", "k", "v", "g", "beta", "state"), grads_ref, grads, strict=True):
        scale = float(jnp.abs(gr).max())
        assert scale > 1e-3, name
        np.testing.assert_allclose(gc, gr, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_causality():
    """No gradient flows from a later position to an earlier output (inside and across chunks)."""
    q, k, v, g, beta, s0 = make_inputs(11)
    for t0 in (5, 40, 70):  # chunk size 64: early and late in the first chunk, second chunk
        w_o = jnp.zeros((B, T, N, J)).at[:, t0].set(1.0)
        grads = grads_of["chunked"](q, k, v, g, beta, s0, w_o, jnp.zeros((B, N, H, J)))
        for x in grads[:5]:
            assert float(jnp.abs(x[:, t0 + 1 :]).max()) == 0.0
        assert float(jnp.abs(grads[1][:, : t0 + 1]).max()) > 0.0  # earlier keys do matter


# ------------------------------------------------------------------------------------------
# oracles
# ------------------------------------------------------------------------------------------


def test_kda_with_channel_identical_gates_is_gdn():
    q, k, v, g_gdn, beta, s0 = make_inputs(12, gate="gdn", decay="strong")
    g_kda = jnp.broadcast_to(g_gdn[..., None], (B, T, N, H))
    for fn in (chunked, recurrent):
        o_gdn, s_gdn = fn(q, k, v, g_gdn, beta, initial_state=s0)
        o_kda, s_kda = fn(q, k, v, g_kda, beta, initial_state=s0)
        assert_close(o_kda, o_gdn)
        assert_close(s_kda, s_gdn)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_delta_rule_write_oracle(impl):
    """No decay, beta = 1, ||k|| = 1: after the update S^T k = v exactly."""
    q, k, v, g, beta, s0 = make_inputs(13, decay="none")
    beta = jnp.ones_like(beta)
    for t in range(4):
        _, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s0)
        assert_close(jnp.einsum("bnh,bnhj->bnj", k[:, t], state), v[:, t], atol=1e-5, rtol=1e-5)
    fn = chunked if impl == "chunked" else recurrent
    _, s_final = fn(q, k, v, g, beta, initial_state=s0)
    assert_close(jnp.einsum("bnh,bnhj->bnj", k[:, -1], s_final), v[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["kda", "gdn"])
def test_beta_zero_is_pure_decay(gate):
    """beta = 0: o_t = scale * S0^T (exp(G_t) * q_t) with G_t = sum_{i<=t} g_i."""
    q, k, v, g, beta, s0 = make_inputs(14, gate=gate)
    beta = jnp.zeros_like(beta)
    g_ch = g if gate == "kda" else g[..., None]
    G = jnp.cumsum(g_ch, axis=1)
    expected = H**-0.5 * jnp.einsum("btnh,bnhj->btnj", jnp.exp(G) * q, s0)
    for fn in (chunked, recurrent):
        o, s = fn(q, k, v, g, beta, initial_state=s0)
        assert_close(o, expected)
        assert_close(s, jnp.exp(G[:, -1])[..., None] * s0)


def test_state_norm_never_grows_with_zero_values():
    """v = 0, ||k|| = 1, beta in [0, 2), g <= 0: the Frobenius norm of S is non-increasing."""
    q, k, v, g, beta, s0 = make_inputs(15, decay="strong", beta_max=1.99)
    v = jnp.zeros_like(v)

    def body(state, xs):
        _, new = delta_rule_step(*xs, state)
        return new, jnp.linalg.norm(new, axis=(-2, -1))

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    _, norms = jax.lax.scan(body, s0, xs)
    norms = jnp.concatenate([jnp.linalg.norm(s0, axis=(-2, -1))[None], norms])
    assert float(jnp.max(norms[1:] - norms[:-1])) <= 1e-6
    assert float(norms[-1].max()) < float(norms[0].min())  # and it does decay
    _, s_chunked = chunked(q, k, v, g, beta, initial_state=s0)
    assert_close(jnp.linalg.norm(s_chunked, axis=(-2, -1)), norms[-1])


def test_bf16_inputs():
    """bf16 inputs: compute and state stay fp32, so only o's final rounding to bf16 differs.

    Tolerance: o atol/rtol 1e-2 (bf16 has 8 mantissa bits, |o| < ~1); state 1e-4.
    """
    q, k, v, g, beta, s0 = make_inputs(16, dtype=jnp.bfloat16)
    o, s = chunked(q, k, v, g, beta, initial_state=s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
    o_ref, s_ref = recurrent(*up, initial_state=s0)
    assert_close(o, o_ref, rtol=1e-2, atol=1e-2)
    assert_close(s, s_ref, rtol=1e-4, atol=1e-4)
    o_step, s_step = step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0)
    assert o_step.dtype == jnp.bfloat16 and s_step.dtype == jnp.float32


# ------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------


def _scan_lengths(jaxpr):
    """Lengths of the top-level scans of a jaxpr (the op's only loop)."""
    return [eqn.params["length"] for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]


def test_dispatcher_routes_and_defaults():
    q, k, v, g, beta, s0 = make_inputs(17)

    def trace(implementation):
        fn = functools.partial(delta_rule, implementation=implementation, chunk_size=16)
        return jax.make_jaxpr(fn)(q, k, v, g, beta).jaxpr

    assert _scan_lengths(trace("chunked")) == [7]  # ceil(100 / 16) chunk steps
    assert _scan_lengths(trace("recurrent")) == [T]  # one step per token
    with pytest.raises(ValueError, match="implementation"):
        delta_rule(q, k, v, g, beta, implementation="fused")
    # scale defaults to H**-0.5 and multiplies o linearly; no initial state means zeros
    o_half, _ = delta_rule_recurrent(q, k, v, g, beta, scale=0.5 * H**-0.5)
    o_zero, _ = recurrent(q, k, v, g, beta, initial_state=jnp.zeros_like(s0))
    assert_close(o_half, 0.5 * o_zero)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"g": np.zeros((B, T, N, 3))}, "g must have shape"),
        ({"beta": np.zeros((B, T, N, 1))}, "beta must have shape"),
        ({"initial_state": np.zeros((B, N, J, H))}, "state must have shape"),
        ({"k": np.zeros((B, T, N, H + 1))}, "q and k"),
    ],
)
def test_shape_errors(bad, match):
    q, k, v, g, beta, _ = make_inputs(19)
    args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, **bad}
    for fn in (delta_rule_chunked, delta_rule_recurrent):
        with pytest.raises(ValueError, match=match):
            fn(**args)
