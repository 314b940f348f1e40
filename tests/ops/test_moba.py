"""MoBA (arXiv 2502.13189) oracles: reference/attention.md §8.5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.attention import attention_reference, causal_mask
from jaxmodels.ops.moba import (
    moba_attention,
    moba_block_means,
    moba_decode,
    moba_decode_tokens,
    moba_mask,
    moba_select_blocks,
    moba_sparsity,
    moba_update_block_means,
)

B, T, N, K, H = 2, 72, 4, 2, 16  # T not a multiple of the block sizes below: partial last block


@functools.partial(jax.jit, static_argnames=("seed", "t", "n", "k", "h", "dtype"))
def make_qkv(seed=0, t=T, n=N, k=K, h=H, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(kq, (B, t, n, h), dtype),
        jax.random.normal(kk, (B, t, k, h), dtype),
        jax.random.normal(kv, (B, t, k, h), dtype),
    )


@functools.partial(jax.jit, static_argnames=("block_size", "top_k", "implementation"))
def moba(q, k, v, *, block_size, top_k, implementation):
    return moba_attention(
        q, k, v, block_size=block_size, top_k=top_k, implementation=implementation, tile=8
    )


@functools.partial(jax.jit, static_argnames=("implementation",))
def weighted_grads(q, k, v, w, *, implementation):
    """Gradients of sum(w * moba(q, k, v)) for block 8, top-3 (shared by two tests)."""

    def loss(q, k, v):
        out = moba_attention(q, k, v, block_size=8, top_k=3, implementation=implementation, tile=8)
        return jnp.sum(w * out)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


jit_mask = jax.jit(moba_mask, static_argnames=("block_size", "top_k"))


def dense(q, k, v, mask_TS=None):
    t = q.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), (q.shape[0], t))
    mask = causal_mask(pos, pos)
    if mask_TS is not None:
        mask &= mask_TS[None]
    return attention_reference(q, k, v, mask, scale=q.shape[-1] ** -0.5)


@pytest.mark.parametrize("implementation,top_k", [("efficient", 9), ("reference", 5)])
def test_top_k_at_least_blocks_is_dense_causal(implementation, top_k):
    q, k, v = make_qkv()
    out = moba(q, k, v, block_size=16, top_k=top_k, implementation=implementation)  # 5 blocks
    np.testing.assert_allclose(out, dense(q, k, v), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("implementation", ["efficient", "reference"])
def test_top_k_one_is_block_diagonal_causal(implementation):
    q, k, v = make_qkv(1)
    blk = jnp.arange(T) // 16
    out = moba(q, k, v, block_size=16, top_k=1, implementation=implementation)
    np.testing.assert_allclose(
        out, dense(q, k, v, blk[:, None] == blk[None, :]), atol=2e-6, rtol=2e-6
    )


def expected_mask(q, k, block_size, top_k):
    """Loop transcription of the paper's gate (§2.2): numpy, independent of the ops."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b_, t_, n_, _ = q.shape
    g = n_ // k.shape[2]
    P = -(-t_ // block_size)
    mask = np.zeros((b_, n_, t_, t_), bool)
    for b in range(b_):
        for n in range(n_):
            kh = k[b, :, n // g]
            means = [kh[j * block_size : (j + 1) * block_size].mean(0) for j in range(P)]
            for t in range(t_):
                cur = t // block_size
                gates = np.array([q[b, t, n] @ means[j] for j in range(cur)])
                order = sorted(range(cur), key=lambda j: (-gates[j], j))  # ties: lower index
                for j in [cur] + order[: top_k - 1]:
                    mask[b, n, t, j * block_size : min((j + 1) * block_size, t + 1)] = True
    return mask


@pytest.mark.parametrize("block_size,top_k", [(8, 3), (16, 2), (1, 4)])
def test_mask_matches_paper_gate_and_is_causal(block_size, top_k):
    q, k, _ = make_qkv(2, t=40)
    mask = np.asarray(jit_mask(q, k, block_size=block_size, top_k=top_k))
    causal = np.tril(np.ones((40, 40), bool))
    assert not (mask & ~causal).any(), "a future token is visible"
    assert mask[..., np.arange(40), np.arange(40)].all(), "a query does not see itself"
    np.testing.assert_array_equal(mask, expected_mask(q, k, block_size, top_k))
    starts = range(0, 40, block_size)
    blocks_seen = sum(mask[..., s : s + block_size].any(-1).astype(int) for s in starts)
    cur = np.arange(40) // block_size
    np.testing.assert_array_equal(
        blocks_seen, np.broadcast_to(np.minimum(top_k, cur + 1), (B, N, 40))
    )


def test_block_size_one_attends_self_plus_best_past_tokens():
    q, k, _ = make_qkv(3, t=24)
    mask = np.asarray(jit_mask(q, k, block_size=1, top_k=3))
    scores = np.einsum(
        "btkgh,bskh->bkgts", np.asarray(q).reshape(B, 24, K, N // K, H), np.asarray(k)
    )
    scores = scores.reshape(B, N, 24, 24)
    t = 20
    best = np.argsort(-scores[:, :, t, :t], axis=-1)[..., :2]
    for b in range(B):
        for n in range(N):
            assert set(np.flatnonzero(mask[b, n, t])) == {t, *best[b, n]}


@pytest.mark.parametrize("block_size,top_k,n,k", [(8, 3, 4, 2), (7, 4, 6, 3)])
def test_efficient_matches_naive(block_size, top_k, n, k):
    q, kk, v = make_qkv(4, n=n, k=k)
    eff = moba(q, kk, v, block_size=block_size, top_k=top_k, implementation="efficient")
    ref = moba(q, kk, v, block_size=block_size, top_k=top_k, implementation="reference")
    np.testing.assert_allclose(eff, ref, atol=1e-5, rtol=1e-5)


def test_efficient_gradients_match_naive():
    q, k, v = make_qkv(5)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)
    g_effs = weighted_grads(q, k, v, w, implementation="efficient")
    g_refs = weighted_grads(q, k, v, w, implementation="reference")
    for g_eff, g_ref in zip(g_effs, g_refs, strict=True):
        assert np.isfinite(g_eff).all()
        np.testing.assert_allclose(g_eff, g_ref, atol=1e-5, rtol=1e-4)


def test_never_attends_future_tokens():
    q, k, v = make_qkv(6)
    t0 = 37

    out = moba(q, k, v, block_size=8, top_k=3, implementation="efficient")[:, : t0 + 1]
    # perturb every future key/value (this also changes future block means and gates)
    noise = jax.random.normal(jax.random.PRNGKey(7), k.shape) * 10
    future = (jnp.arange(T) > t0)[None, :, None, None]
    out2 = moba(
        q, k + noise * future, v + noise * future, block_size=8, top_k=3, implementation="efficient"
    )[:, : t0 + 1]
    np.testing.assert_array_equal(out, out2)
    # and no gradient flows from an output to a later position
    grads = weighted_grads(
        q, k, v, jnp.zeros(q.shape).at[:, t0].set(1.0), implementation="efficient"
    )
    for g in grads:
        assert np.abs(np.asarray(g)[:, t0 + 1 :]).max() == 0.0
        assert np.abs(np.asarray(g)[:, : t0 + 1]).max() > 0.0


def test_gqa_equals_repeated_kv_heads():
    q, k, v = make_qkv(7)
    rep = N // K  # repeat_interleave: kv head j serves query heads j*G .. j*G + G - 1
    out_gqa = moba(q, k, v, block_size=8, top_k=3, implementation="efficient")
    out_mha = moba(
        q,
        jnp.repeat(k, rep, 2),
        jnp.repeat(v, rep, 2),
        block_size=8,
        top_k=3,
        implementation="reference",
    )
    np.testing.assert_allclose(out_gqa, out_mha, atol=1e-6, rtol=1e-6)
    # heads select independently: two query heads of one kv group pick different blocks here
    idx, _ = moba_select_blocks(q, moba_block_means(k, 8), block_size=8, top_k=3)
    assert (idx[:, :, 0] != idx[:, :, 1]).any()


def test_ties_pick_lower_block_index_in_both_forms():
    q, _, v = make_qkv(8)
    k = jnp.ones((B, T, K, H))  # every block mean is equal: all gates tie
    idx, valid = moba_select_blocks(q, moba_block_means(k, 8), block_size=8, top_k=3)
    t = 50  # block 6; past blocks 0..5 all tie -> 0 and 1
    np.testing.assert_array_equal(idx[:, t], np.broadcast_to([6, 0, 1], (B, N, 3)))
    assert valid[:, t].all()
    eff = moba(q, k, v, block_size=8, top_k=3, implementation="efficient")
    ref = moba(q, k, v, block_size=8, top_k=3, implementation="reference")
    np.testing.assert_allclose(eff, ref, atol=1e-5, rtol=1e-5)


def test_decode_matches_prefill_rows():
    bs, top_k = 8, 3
    q, k, v = make_qkv(9)
    full = moba(q, k, v, block_size=bs, top_k=top_k, implementation="efficient")
    s_max = 80  # cache larger than the sequence; junk after the valid length must be ignored
    pad = ((0, 0), (0, s_max - T), (0, 0), (0, 0))
    k_cache = jnp.pad(k, pad, constant_values=7.0)
    v_cache = jnp.pad(v, pad, constant_values=7.0)

    @jax.jit
    def step(means, t):
        means = moba_update_block_means(means, k_cache, t + 1, block_size=bs)
        out = moba_decode(
            q[:, t],
            k_cache,
            v_cache,
            jnp.full((B,), t + 1),
            block_size=bs,
            top_k=top_k,
            block_means_BPKH=means,
        )
        return means, out

    means = jnp.zeros((B, s_max // bs, K, H))
    outs = []
    for t in range(T):
        means, o = step(means, t)
        outs.append(o)
    np.testing.assert_allclose(jnp.stack(outs, 1), full, atol=1e-5, rtol=1e-5)
    # without a means cache (computed from the key cache) and with per-sequence lengths
    lens = jnp.array([30, 57])
    out = jax.jit(functools.partial(moba_decode, block_size=bs, top_k=top_k))(
        q[jnp.arange(B), lens - 1], k_cache, v_cache, lens
    )
    np.testing.assert_allclose(out, full[jnp.arange(B), lens - 1], atol=1e-5, rtol=1e-5)


def test_bf16_runs_close_to_fp32():
    q, k, v = make_qkv(10)
    out32 = moba(q, k, v, block_size=8, top_k=3, implementation="efficient")
    out16 = moba(
        q.astype(jnp.bfloat16),
        k.astype(jnp.bfloat16),
        v.astype(jnp.bfloat16),
        block_size=8,
        top_k=3,
        implementation="efficient",
    )
    assert out16.dtype == jnp.bfloat16
    # gates are computed in fp32 from bf16-rounded inputs: selection may differ in rare near-ties
    close = np.isclose(np.asarray(out16, np.float32), out32, atol=5e-2, rtol=5e-2)
    assert close.mean() > 0.99


def test_sparsity_and_decode_token_formulas():
    assert moba_sparsity(8192, 512, 3) == pytest.approx(0.8125)
    assert moba_sparsity(32768, 512, 3) == pytest.approx(0.953125)
    assert moba_sparsity(2**20, 4096, 12) == pytest.approx(0.953125)
    assert moba_sparsity(131072, 4096, 12) == pytest.approx(0.625)
    assert moba_decode_tokens(32768, 512, 3) == 3 * 512
    assert moba_decode_tokens(1000, 512, 3) == 1000  # block 0 (512) + partial block 1 (488)
    assert moba_decode_tokens(513, 512, 3) == 513
