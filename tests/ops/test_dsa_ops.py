"""DeepSeek Sparse Attention ops (DeepSeek-V3.2): oracles of reference/attention.md §8.2."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops import dsa
from jaxmodels.ops import rope as rope_ops
from jaxmodels.ops.attention import attention_reference, causal_mask

B, T, N, C, R, J, I = 2, 23, 3, 12, 4, 3, 8  # X = C + R latent entry, value = C
X = C + R
SCALE = X**-0.5
FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tiny shapes


def make(seed=0, t=T, s=None):
    s = t if s is None else s
    shapes = [(B, t, N, X), (B, s, X), (B, t, J, I), (B, t, J), (B, s, I)]
    return tuple(normal(shape, seed * 10 + i) for i, shape in enumerate(shapes))


def normal(shape, seed):
    """Standard normal float32 from numpy (no per-shape XLA compile, unlike jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def dense_causal(q, kv, mask=None):
    """Dense causal MQA over the latent entries: key = kv, value = kv[:, :, :C]."""
    t, s = q.shape[1], kv.shape[1]
    if mask is None:
        pos_q = jnp.broadcast_to(jnp.arange(t), (B, t))
        pos_k = jnp.broadcast_to(jnp.arange(s), (B, s))
        mask = causal_mask(pos_q, pos_k)
    return attention_reference(q, kv[:, :, None], kv[:, :, None, :C], mask, scale=SCALE)


@functools.partial(
    jax.jit,
    static_argnames=("topk", "implementation", "block_q", "chunks", "cached"),
    compiler_options=FAST,
)
def run_dsa(q, kv, iq, iw, ik, *, topk, implementation, block_q=4, chunks=3, cached=False):
    kw = {}
    if cached:  # the same causal problem, described by positions (the cached-prefill path)
        t, s = q.shape[1], kv.shape[1]
        kw = dict(
            q_positions_BT=jnp.broadcast_to(jnp.arange(s - t, s), (B, t)),
            kv_positions_BS=jnp.broadcast_to(jnp.arange(s), (B, s)),
        )
    return dsa.dsa_attention(
        q,
        kv,
        iq,
        iw,
        ik,
        topk=topk,
        value_dim=C,
        scale=SCALE,
        implementation=implementation,
        block_q=block_q,
        num_prefix_chunks=chunks,
        return_aux=True,
        **kw,
    )


@pytest.mark.parametrize("implementation", dsa.IMPLEMENTATIONS)
@pytest.mark.parametrize("cached", [False, True])
def test_topk_at_least_visible_is_dense_causal(implementation, cached):
    q, kv, iq, iw, ik = make()
    for topk in (T + 5,) if cached else (T,):
        out, aux = run_dsa(
            q, kv, iq, iw, ik, topk=topk, implementation=implementation, cached=cached
        )
        np.testing.assert_allclose(out, dense_causal(q, kv), atol=2e-5, rtol=2e-5)
        assert aux["indices"].shape == (B, T, T)  # k = min(topk, S)
        # every visible key selected exactly once, nothing else
        sel = np.asarray(dsa.indices_to_mask(aux["indices"], T))
        np.testing.assert_array_equal(sel, np.tril(np.ones((T, T), bool))[None].repeat(B, 0))


@pytest.mark.parametrize("topk", [1, 5, 13])
@pytest.mark.parametrize("cached", [False, True])
def test_gather_form_equals_dense_masked_form(topk, cached):
    q, kv, iq, iw, ik = make(1)
    out_g, aux_g = run_dsa(q, kv, iq, iw, ik, topk=topk, implementation="gather", cached=cached)
    out_r, aux_r = run_dsa(q, kv, iq, iw, ik, topk=topk, implementation="reference", cached=cached)
    np.testing.assert_array_equal(aux_g["indices"], aux_r["indices"])
    np.testing.assert_allclose(out_g, out_r, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(aux_g["scores"], aux_r["scores"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux_g["target"], aux_r["target"], rtol=1e-5, atol=1e-6)
    # the sparse output is a real restriction: it differs from dense causal attention
    assert np.max(np.abs(np.asarray(out_g - dense_causal(q, kv)))) > 1e-2
    # and equals dense attention under the scattered selection mask (independent oracle)
    mask = dsa.indices_to_mask(aux_g["indices"], T)
    np.testing.assert_allclose(out_g, dense_causal(q, kv, mask), atol=2e-5, rtol=2e-5)


def test_sparse_attention_gather_equals_reference_for_random_indices():
    q, kv, *_ = make(2, t=11, s=19)
    # distinct keys per query (as a top-k gives), some slots empty, one row with nothing
    rng = np.random.default_rng(3)
    idx = np.stack([rng.permutation(19)[:6] for _ in range(B * 11)]).reshape(B, 11, 6)
    idx = np.where(rng.random(idx.shape) < 0.3, -1, idx)
    idx[:, 0] = -1
    idx = jnp.asarray(idx, jnp.int32)
    outs = [
        jax.jit(
            functools.partial(
                dsa.sparse_attention, value_dim=C, scale=SCALE, implementation=impl, block_q=4
            ),
            compiler_options=FAST,
        )(q, kv, idx)
        for impl in dsa.IMPLEMENTATIONS
    ]
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-6)
    np.testing.assert_array_equal(outs[0][0][:, 0], 0.0)
    # target rows are distributions over the selected slots
    sums = np.asarray(outs[0][1].sum(-1))
    has = np.asarray((idx >= 0).any(-1))
    np.testing.assert_allclose(sums[has], 1.0, rtol=1e-5)


def test_selection_is_shared_by_heads_and_independent_of_the_main_query():
    q, kv, iq, iw, ik = make(4)
    out, aux = run_dsa(q, kv, iq, iw, ik, topk=5, implementation="gather")
    assert aux["indices"].ndim == 3  # [B, T, k]: no head axis
    q_other = normal(q.shape, 9)
    _, aux_other = run_dsa(q_other, kv, iq, iw, ik, topk=5, implementation="gather")
    np.testing.assert_array_equal(aux["indices"], aux_other["indices"])
    # every head attends over exactly the shared set: head n alone == masked attention
    mask = dsa.indices_to_mask(aux["indices"], T)
    for n in range(N):
        ref = dense_causal(q[:, :, n : n + 1], kv, mask)
        np.testing.assert_allclose(out[:, :, n : n + 1], ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cached", [False, True])
def test_no_future_token_is_selected_and_min_k_visible(cached):
    q, kv, iq, iw, ik = make(5)
    # make future keys attractive: large indexer keys late in the sequence
    ik = ik * jnp.linspace(0.1, 10.0, T)[None, :, None]
    topk = 6
    _, aux = run_dsa(q, kv, iq, iw, ik, topk=topk, implementation="gather", cached=cached)
    idx = np.asarray(aux["indices"])
    t = np.arange(T)[None, :, None]
    assert np.all((idx == -1) | ((idx >= 0) & (idx <= t)))
    counts = (idx >= 0).sum(-1)
    np.testing.assert_array_equal(counts, np.minimum(topk, np.arange(T) + 1)[None].repeat(B, 0))
    # the indexer-only selection (no attention) gives the same indices
    sel_kw = dict(topk=topk, block_q=4, num_prefix_chunks=3)
    if cached:
        sel_kw["q_positions_BT"] = jnp.broadcast_to(jnp.arange(T), (B, T))
    idx_only, _ = jax.jit(functools.partial(dsa.dsa_select, **sel_kw), compiler_options=FAST)(
        iq, iw, ik
    )
    np.testing.assert_array_equal(idx_only, idx)
    # no duplicates among the valid slots
    for b in range(B):
        for i in range(T):
            valid = idx[b, i][idx[b, i] >= 0]
            assert len(set(valid.tolist())) == len(valid)


def test_causality_no_gradient_from_later_keys():
    q, kv, iq, iw, ik = make(6)
    t0 = 9

    def f(kv, ik):
        out = dsa.dsa_attention(q, kv, iq, iw, ik, topk=4, value_dim=C, scale=SCALE, block_q=4)
        return jnp.sum(out[:, : t0 + 1] ** 2)

    g_kv, g_ik = jax.jit(jax.grad(f, argnums=(0, 1)), compiler_options=FAST)(kv, ik)
    np.testing.assert_array_equal(g_kv[:, t0 + 1 :], 0.0)
    np.testing.assert_array_equal(g_ik, 0.0)  # selection is discrete: no gradient to the indexer
    assert np.any(np.asarray(g_kv[:, : t0 + 1]) != 0)


def test_ties_break_towards_lower_index_deterministically():
    scores = jnp.array([[[1.0, 3.0, 3.0, 0.0, 3.0, 3.0, 2.0]]])
    mask = jnp.array([[[True, True, True, True, False, True, True]]])
    idx = dsa.select_topk(scores, mask, 3)
    np.testing.assert_array_equal(idx, [[[1, 2, 5]]])  # key 4 invisible, 5 is the next tie
    # all-zero indexer (w = 0): every score ties, the first k visible keys win, every run
    q, kv, iq, _, ik = make(7)
    iw0 = jnp.zeros((B, T, J))
    a = run_dsa(q, kv, iq, iw0, ik, topk=4, implementation="gather")[1]["indices"]
    b = run_dsa(q, kv, iq, iw0, ik, topk=4, implementation="reference")[1]["indices"]
    np.testing.assert_array_equal(a, b)
    expected = np.where(np.arange(4)[None] <= np.arange(T)[:, None], np.arange(4)[None], -1)
    np.testing.assert_array_equal(a, np.broadcast_to(expected, (B, T, 4)))


def test_indexer_scores_match_the_formula():
    _, _, iq, iw, ik = make(8, t=5)
    mask = jnp.tril(jnp.ones((5, 5), bool))[None]
    scores = jax.jit(dsa.indexer_scores, compiler_options=FAST)
    got, masked = scores(iq, iw, ik), np.asarray(scores(iq, iw, ik, mask))
    qn, wn, kn = (np.asarray(a, np.float64) for a in (iq, iw, ik))
    want = np.einsum("btj,btjs->bts", wn, np.maximum(np.einsum("btjd,bsd->btjs", qn, kn), 0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(masked[:, np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]]))


def test_indexer_rope_rotates_the_first_dims_half_split_and_is_relative():
    x = normal((1, 6, I), 10)
    pos = jnp.arange(6)[None] * 3
    inv_freq = rope_ops.rope_inv_freq(R, 10000.0)
    y = dsa.indexer_partial_rope(x, pos, inv_freq)
    np.testing.assert_array_equal(y[..., R:], x[..., R:])  # nope dims untouched (last)
    want = rope_ops.apply_rope(x[..., :R], pos, inv_freq, layout="half")
    np.testing.assert_allclose(y[..., :R], want, atol=1e-6)
    # half-split pairs (m, m + R/2), not interleaved (2m, 2m + 1)
    inter = rope_ops.apply_rope(x[..., :R], pos, inv_freq, layout="interleaved")
    assert np.max(np.abs(np.asarray(inter - want))) > 1e-2
    # q·k depends on the position difference only
    q = normal((1, 6, J, I), 11)
    s1 = dsa.indexer_scores(
        dsa.indexer_partial_rope(q, pos, inv_freq),
        jnp.ones((1, 6, J)),
        dsa.indexer_partial_rope(x, pos, inv_freq),
    )
    s2 = dsa.indexer_scores(
        dsa.indexer_partial_rope(q, pos + 17, inv_freq),
        jnp.ones((1, 6, J)),
        dsa.indexer_partial_rope(x, pos + 17, inv_freq),
    )
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-4)


def test_indexer_key_is_layer_norm_with_bias_then_rope():
    k = normal((B, 5, I), 12) * 3 + 1
    gain = jnp.linspace(0.5, 1.5, I)
    bias = jnp.linspace(-0.2, 0.3, I)
    pos = jnp.broadcast_to(jnp.arange(5), (B, 5))
    inv_freq = rope_ops.rope_inv_freq(R, 10000.0)
    got = dsa.indexer_key(k, gain, bias, pos, inv_freq)
    kn = np.asarray(k, np.float64)
    normed = (kn - kn.mean(-1, keepdims=True)) / np.sqrt(kn.var(-1, keepdims=True) + 1e-6)
    normed = normed * np.asarray(gain) + np.asarray(bias)
    np.testing.assert_allclose(got[..., R:], normed[..., R:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        got[..., :R],
        rope_ops.apply_rope(
            jnp.asarray(normed[..., :R], jnp.float32), pos, inv_freq, layout="half"
        ),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        dsa.indexer_head_weights(jnp.ones((1, 1, 16)), 64), 16**-0.5 * 64**-0.5, rtol=1e-6
    )


def test_kl_is_zero_when_distributions_match_and_positive_otherwise():
    scores = normal((B, 7, 9), 13) * 2
    valid = jnp.tril(jnp.ones((7, 9), bool), k=2)[None].repeat(B, 0)
    q = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    np.testing.assert_allclose(dsa.indexer_kl(q, scores, valid), 0.0, atol=1e-6)
    p = jax.nn.softmax(jnp.where(valid, -scores, -jnp.inf), axis=-1)
    kl = np.asarray(dsa.indexer_kl(p, scores, valid))
    pn, qn = np.asarray(p), np.asarray(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(pn > 0, pn * (np.log(pn) - np.log(qn)), 0.0).sum(-1)
    np.testing.assert_allclose(kl, want, rtol=1e-5, atol=1e-6)
    assert np.all(kl > 1e-3)
    # gradient w.r.t. the scores is softmax - target on valid entries, finite everywhere
    g = jax.grad(lambda s: dsa.indexer_kl(p, s, valid).sum())(scores)
    np.testing.assert_allclose(g, np.where(valid, qn - pn, 0.0), atol=1e-5)


def test_attention_target_rows_sum_to_one():
    logits = normal((B, N, 5, 8), 14)
    mask = jnp.tril(jnp.ones((5, 8), bool), k=3)
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    target = dsa.attention_target(probs)
    np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(target, np.asarray(probs).mean(1), rtol=1e-5)


def test_decode_topk_over_the_cache_equals_the_full_selection():
    q, kv, iq, iw, ik = make(15)
    topk = 5
    _, aux = run_dsa(q, kv, iq, iw, ik, topk=topk, implementation="reference")
    S_max = T + 4
    cache = dsa.write_indexer_cache(jnp.zeros((B, S_max, I)), ik[:, : T - 1], 0)
    cache = dsa.write_indexer_cache(cache, ik[:, T - 1 :], jnp.int32(T - 1))
    np.testing.assert_array_equal(cache[:, :T], ik)
    slots = jnp.broadcast_to(jnp.arange(S_max), (B, S_max))
    mask = causal_mask(jnp.full((B, 1), T - 1), slots, kv_valid_BS=slots < T)
    idx = dsa.decode_topk(iq[:, -1:], iw[:, -1:], cache, mask, topk)
    np.testing.assert_array_equal(idx, aux["indices"][:, -1:])
    # and the gather attention over the latent cache gives the last output row
    kv_cache = jnp.zeros((B, S_max, X)).at[:, :T].set(kv)
    out, _ = dsa.sparse_attention(q[:, -1:], kv_cache, idx, value_dim=C, scale=SCALE)
    full, _ = run_dsa(q, kv, iq, iw, ik, topk=topk, implementation="gather")
    np.testing.assert_allclose(out, full[:, -1:], atol=2e-5, rtol=2e-5)


def test_fused_memory_does_not_grow_with_t_squared():
    """The gather form compiles without a [T, S] attention array: temp bytes ~ linear in T."""

    def temp(t):
        args = make(16, t=t)
        fn = jax.jit(
            functools.partial(
                dsa.dsa_attention, topk=8, value_dim=C, scale=SCALE, block_q=32, num_prefix_chunks=2
            ),
            compiler_options=FAST,
        )
        mem = fn.lower(*args).compile().memory_analysis()
        return mem.temp_size_in_bytes

    small, big = temp(512), temp(2048)
    assert big < 6 * small  # 4x T: a [T, S] array would grow 16x
    dense_logits = B * N * 2048 * 2048 * 4
    assert big < dense_logits / 4


def test_bad_implementation_is_refused():
    q, kv, iq, iw, ik = make()
    with pytest.raises(ValueError, match="implementation"):
        dsa.dsa_attention(q, kv, iq, iw, ik, topk=3, value_dim=C, scale=1.0, implementation="x")
