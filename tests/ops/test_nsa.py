"""NSA (arXiv 2502.11089) oracles: reference/attention.md §8.4, plus reference == efficient,
causality and prefill == decode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops.attention import attention_reference, causal_mask
from jaxmodels.ops.nsa import (
    init_compression_params,
    nsa_attention,
    nsa_block_importance,
    nsa_compress,
    nsa_compressed_attention,
    nsa_decode,
    nsa_decode_tokens,
    nsa_num_compressed,
    nsa_select_blocks,
    nsa_update_compressed_cache,
)

B, T, N, K, H = 2, 80, 4, 2, 16
HP = dict(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=24)  # 5 slc blocks
HP_ITEMS = tuple(HP.items())  # hashable, for static jit arguments
ALL = dict(HP, num_selected=5, window=T)  # every block selected, window covers the sequence


@functools.partial(jax.jit, static_argnames=("seed", "t", "n", "k", "mlp"))
def make_inputs(seed=0, t=T, n=N, k=K, mlp=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 10)
    q = jax.random.normal(ks[0], (B, t, n, H))
    raw = [jax.random.normal(kk, (B, t, k, H)) for kk in ks[1:7]]
    gates = jax.nn.sigmoid(jax.random.normal(ks[7], (B, t, n, 3)) * 2)
    params = None
    if mlp:
        params = [
            init_compression_params(
                kk, cmp_block=HP["cmp_block"], head_dim=H, hidden=32, num_kv_heads=k
            )
            for kk in ks[8:10]
        ]
        params = [dict(p, pos=jax.random.normal(ks[9], p["pos"].shape)) for p in params]
    return q, raw, gates, params


@functools.partial(jax.jit, static_argnames=("hp",))
def _branch_kv(raw, params, hp):
    hp = dict(hp)
    kw = dict(cmp_block=hp["cmp_block"], cmp_stride=hp["cmp_stride"])
    pk, pv = params if params is not None else (None, None)
    return dict(
        k_cmp_BMKH=nsa_compress(raw[0], params=pk, **kw),
        v_cmp_BMKH=nsa_compress(raw[1], params=pv, **kw),
        k_slc_BSKH=raw[2],
        v_slc_BSKH=raw[3],
        k_win_BSKH=raw[4],
        v_win_BSKH=raw[5],
    )


def branch_kv(raw, params, hp=HP):
    """The three branches' keys/values from six raw arrays (compression through phi)."""
    return _branch_kv(raw, params, tuple(hp.items()))


cmp_attention = jax.jit(functools.partial(nsa_compressed_attention, cmp_block=8, cmp_stride=4))


@functools.partial(jax.jit, static_argnames=("implementation", "hp"))
def nsa(q, kv, gates, *, implementation, hp=HP_ITEMS):
    return nsa_attention(
        q,
        **kv,
        gates_BTN3=gates,
        **dict(hp),
        implementation=implementation,
        query_chunk=32,
        tile=8,
        band=8,
        return_block_indices=True,
    )


@functools.partial(jax.jit, static_argnames=("implementation",))
def weighted_grads(q, raw, gates, params, w, *, implementation):
    """Gradients of sum(w * out) w.r.t. (q, raw branch inputs, gates, phi params); one compile
    serves the gradient, causality and group-support tests."""

    def loss(q, raw, gates, params):
        out, _, _ = nsa.__wrapped__(q, branch_kv(raw, params), gates, implementation=implementation)
        return jnp.sum(w * out)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, raw, gates, params)


@jax.jit
def dense_causal(q, k, v):
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return attention_reference(q, k, v, causal_mask(pos, pos), scale=H**-0.5)


def one_gate(i, q):
    return jnp.broadcast_to(jnp.eye(3)[i], q.shape[:3] + (3,))


@pytest.mark.parametrize("implementation", ["efficient", "reference"])
def test_window_gate_with_window_covering_sequence_is_dense_causal(implementation):
    q, raw, _, params = make_inputs(0)
    out, _, _ = nsa(
        q,
        branch_kv(raw, params),
        one_gate(2, q),
        implementation=implementation,
        hp=tuple(ALL.items()),
    )
    np.testing.assert_allclose(out, dense_causal(q, raw[4], raw[5]), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("implementation", ["efficient", "reference"])
def test_selection_gate_with_all_blocks_selected_is_dense_causal(implementation):
    q, raw, _, params = make_inputs(1)
    out, idx, valid = nsa(
        q,
        branch_kv(raw, params),
        one_gate(1, q),  # n * l' = 80 >= T
        implementation=implementation,
        hp=tuple(ALL.items()),
    )
    np.testing.assert_allclose(out, dense_causal(q, raw[2], raw[3]), atol=2e-6, rtol=2e-6)
    n_visible = np.arange(T) // 16 + 1
    np.testing.assert_array_equal(
        valid.sum(-1), np.broadcast_to(n_visible[None, :, None], (B, T, K))
    )


def test_compression_visibility_rule():
    """Compressed block i is visible to query t iff i*d + l - 1 <= t (it ends at or before t)."""
    q, raw, _, _ = make_inputs(2, mlp=False)
    k_cmp = branch_kv(raw, None)["k_cmp_BMKH"]
    assert k_cmp.shape[1] == nsa_num_compressed(T, 8, 4) == (T - 8) // 4 + 1
    # mean pooling: entry i is the mean of tokens [4i, 4i + 8)
    np.testing.assert_allclose(k_cmp[:, 3], raw[0][:, 12:20].mean(1), atol=1e-6)
    _, lse, probs = cmp_attention(q, k_cmp, k_cmp)
    seen = (np.asarray(probs) > 0).sum(-1)
    t = np.arange(T)
    expected = np.where(t >= 7, (t + 1 - 8) // 4 + 1, 0)
    np.testing.assert_array_equal(seen, np.broadcast_to(expected[None, :, None], (B, T, N)))
    assert np.isneginf(np.asarray(lse)[:, :7]).all() and np.isfinite(np.asarray(lse)[:, 7:]).all()


def test_importance_overlap_weights_and_fast_map():
    # paper defaults: selection block j gathers compressed blocks 4j-1 .. 4j+3 with 1,2,2,2,1
    M, P = nsa_num_compressed(512), 512 // 64
    eye = jnp.eye(M)[None, :, None, :]  # probs one-hot on each compressed block
    W = nsa_block_importance(eye, num_kv_heads=1, num_slc_blocks=P, implementation="reference")
    np.testing.assert_array_equal(np.asarray(W)[0, 4 * 3 - 1 : 4 * 3 + 4, 0, 3], [1, 2, 2, 2, 1])
    np.testing.assert_array_equal(np.asarray(W)[0, :, 0].sum(-1), np.full(M, 2.0))  # l / d
    probs = jax.random.uniform(jax.random.PRNGKey(3), (2, 5, 8, M))
    for hp in [
        dict(),
        dict(cmp_block=64, cmp_stride=64, slc_block=64),
        dict(cmp_block=48, cmp_stride=16, slc_block=32),
    ]:
        m = nsa_num_compressed(512, hp.get("cmp_block", 32), hp.get("cmp_stride", 16))
        P = -(-512 // hp.get("slc_block", 64))
        kw = dict(num_kv_heads=2, num_slc_blocks=P, **hp)
        fast = nsa_block_importance(probs[..., :m], implementation="efficient", **kw)
        ref = nsa_block_importance(probs[..., :m], implementation="reference", **kw)
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)
    # l = d = l': importance is the group-summed compression probability itself (fla's case)
    ref = nsa_block_importance(
        probs,
        num_kv_heads=2,
        num_slc_blocks=M,
        cmp_block=16,
        cmp_stride=16,
        slc_block=16,
        implementation="efficient",
    )
    np.testing.assert_allclose(ref, probs.reshape(2, 5, 2, 4, M).sum(3), rtol=1e-6)


@pytest.mark.parametrize(
    "hp",
    [
        HP,
        dict(cmp_block=16, cmp_stride=16, slc_block=16, num_selected=4, window=16),  # fla-like
        dict(cmp_block=8, cmp_stride=4, slc_block=12, num_selected=4, window=20, num_local=1),
    ],
)
def test_efficient_matches_reference(hp):
    q, raw, gates, params = make_inputs(4)
    if hp["cmp_block"] != HP["cmp_block"]:
        params = None
    kv = branch_kv(raw, params, hp)
    out_e, idx_e, val_e = nsa(q, kv, gates, implementation="efficient", hp=tuple(hp.items()))
    out_r, idx_r, val_r = nsa(q, kv, gates, implementation="reference", hp=tuple(hp.items()))
    np.testing.assert_array_equal(val_e, val_r)
    np.testing.assert_array_equal(np.where(val_e, idx_e, -1), np.where(val_r, idx_r, -1))
    np.testing.assert_allclose(out_e, out_r, atol=1e-5, rtol=1e-5)


def test_efficient_gradients_match_reference():
    q, raw, gates, params = make_inputs(5)
    w = jax.random.normal(jax.random.PRNGKey(11), q.shape)
    leaves_e = jax.tree.leaves(weighted_grads(q, raw, gates, params, w, implementation="efficient"))
    leaves_r = jax.tree.leaves(weighted_grads(q, raw, gates, params, w, implementation="reference"))
    for g_e, g_r in zip(leaves_e, leaves_r, strict=True):
        assert np.isfinite(g_e).all()
        np.testing.assert_allclose(g_e, g_r, atol=1e-5, rtol=1e-4)
    assert max(float(jnp.abs(g).max()) for g in leaves_e) > 0


def test_group_shares_one_selection():
    """All query heads of a GQA group attend to exactly the same selected tokens, and that
    selection is the top-n of the group-summed importance."""
    q, raw, _, params = make_inputs(6)
    kv = branch_kv(raw, params)
    gates = one_gate(1, q)
    _, idx, valid = nsa(q, kv, gates, implementation="efficient")

    # which selection-branch values each (query, head) output depends on
    def support(t):
        rows = []
        for n in range(N):
            w = jnp.zeros((B, T, N, H)).at[:, t, n].set(1.0)
            _, g_raw, _, _ = weighted_grads(q, raw, gates, params, w, implementation="efficient")
            rows.append(np.abs(np.asarray(g_raw[3])).sum(-1) > 0)  # d/dv_slc: [B, S, K]
        return np.stack(rows, 1)  # [B, N, S, K]

    G = N // K
    for t in (45, 79):
        sup = support(t)
        for kh in range(K):
            heads = range(kh * G, (kh + 1) * G)
            toks = [sup[:, n, :, kh] for n in heads]
            for other in toks[1:]:
                np.testing.assert_array_equal(toks[0], other)
            # the tokens are exactly the selected blocks, up to t
            for b in range(B):
                blocks = set(np.asarray(idx[b, t, kh])[np.asarray(valid[b, t, kh])])
                want = [s for s in range(T) if s // 16 in blocks and s <= t]
                assert list(np.flatnonzero(toks[0][b])) == want
    # selection == top-n of the importance summed over the group's heads (independent numpy)
    _, _, probs = cmp_attention(q, kv["k_cmp_BMKH"], kv["v_cmp_BMKH"])
    probs = np.asarray(probs, np.float64)
    t = 79
    for b in range(B):
        for kh in range(K):
            p = probs[b, t, kh * G : (kh + 1) * G].sum(0)  # [M]
            imp = [
                sum(
                    p[i] * max(0, min(4 * i + 8, 16 * j + 16) - max(4 * i, 16 * j)) / 4
                    for i in range(len(p))
                )
                for j in range(5)
            ]
            assert len(imp) == 5
            # n = 4: the forced initial, previous and current (t = 79 is in block 4) blocks,
            # plus the better of blocks 1 and 2
            best = max((1, 2), key=lambda j: imp[j])
            assert set(np.asarray(idx[b, t, kh])) == {0, 3, 4, best}


def test_forced_blocks_and_slot_counts():
    imp = jax.random.uniform(jax.random.PRNGKey(0), (1, 200, 1, 13))
    idx, valid = nsa_select_blocks(imp, slc_block=16, num_selected=5, num_init=1, num_local=2)
    idx, valid = np.asarray(idx[0, :, 0]), np.asarray(valid[0, :, 0])
    for t in range(200):
        cur = t // 16
        chosen = set(idx[t][valid[t]])
        assert {0, cur, max(cur - 1, 0)} <= chosen
        assert max(chosen) <= cur and len(chosen) == min(5, cur + 1) == valid[t].sum()


def test_no_information_from_future_tokens():
    q, raw, gates, params = make_inputs(7)
    t0 = 50
    out, idx, _ = nsa(q, branch_kv(raw, params), gates, implementation="efficient")
    future = (jnp.arange(T) > t0)[None, :, None, None]
    noise = [jax.random.normal(jax.random.PRNGKey(20 + i), x.shape) * 5 for i, x in enumerate(raw)]
    raw2 = [x + e * future for x, e in zip(raw, noise, strict=True)]
    q2 = q + jax.random.normal(jax.random.PRNGKey(30), q.shape) * future
    out2, idx2, _ = nsa(q2, branch_kv(raw2, params), gates, implementation="efficient")
    np.testing.assert_array_equal(out[:, : t0 + 1], out2[:, : t0 + 1])
    np.testing.assert_array_equal(idx[:, : t0 + 1], idx2[:, : t0 + 1])
    assert not np.allclose(out[:, t0 + 1 :], out2[:, t0 + 1 :])

    w = jnp.zeros(q.shape).at[:, t0].set(1.0)
    g_q, g_raw, _, _ = weighted_grads(q, raw, gates, params, w, implementation="efficient")
    for g in [g_q, *g_raw]:
        g = np.asarray(g)
        assert np.abs(g[:, t0 + 1 :]).max() == 0.0 and np.abs(g[:, : t0 + 1]).max() > 0


@pytest.mark.parametrize("ring", [False, True])
def test_decode_matches_prefill(ring):
    q, raw, gates, params = make_inputs(8)
    out, idx, valid = nsa(q, branch_kv(raw, params), gates, implementation="efficient")
    s_max = 96
    pad = ((0, 0), (0, s_max - T), (0, 0), (0, 0))
    caches = [jnp.pad(x, pad, constant_values=3.0) for x in raw]
    m_max = nsa_num_compressed(s_max, 8, 4)
    ckw = dict(cmp_block=8, cmp_stride=4)
    win_slots = 32  # ring buffer >= w

    @jax.jit
    def step(state, t):
        k_cmp, v_cmp, k_win, v_win = state
        length = jnp.full((B,), t + 1)
        k_cmp = nsa_update_compressed_cache(k_cmp, caches[0], length, params=params[0], **ckw)
        v_cmp = nsa_update_compressed_cache(v_cmp, caches[1], length, params=params[1], **ckw)
        if ring:
            k_win = k_win.at[:, t % win_slots].set(raw[4][:, t])
            v_win = v_win.at[:, t % win_slots].set(raw[5][:, t])
        o, i, va = nsa_decode(
            q[:, t],
            k_cmp_BMKH=k_cmp,
            v_cmp_BMKH=v_cmp,
            k_slc_BSKH=caches[2],
            v_slc_BSKH=caches[3],
            k_win_BSKH=k_win,
            v_win_BSKH=v_win,
            gates_BN3=gates[:, t],
            cache_len_B=length,
            window_ring_buffer=ring,
            return_block_indices=True,
            **HP,
        )
        return (k_cmp, v_cmp, k_win, v_win), (o, i, va)

    junk = jnp.full((B, m_max, K, H), 9.0)
    win = (jnp.zeros((B, win_slots, K, H)),) * 2 if ring else (caches[4], caches[5])
    state = (junk, junk) + win
    outs, idxs = [], []
    for t in range(T):
        state, (o, i, va) = step(state, t)
        outs.append(o)
        idxs.append(np.where(va, i, -1))
    np.testing.assert_allclose(jnp.stack(outs, 1), out, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.stack(idxs, 1)[..., : idx.shape[-1]], np.where(valid, idx, -1))
    full_cmp = nsa_compress(raw[0], params=params[0], **ckw)
    np.testing.assert_allclose(state[0][:, : full_cmp.shape[1]], full_cmp, atol=1e-5, rtol=1e-5)


def test_decode_tokens_formula():
    # reference/attention.md §8.4: floor((s - 32) / 16) + 1 + 16 * 64 + 512
    expected = {8192: 2047, 16384: 2559, 32768: 3583, 65536: 5631}
    for s, tokens in expected.items():
        assert nsa_decode_tokens(s) == tokens
    ratios = [round(s / expected[s], 1) for s in sorted(expected)]
    assert ratios == [4.0, 6.4, 9.1, 11.6]
    assert nsa_decode_tokens(100, capped=True) == (100 - 32) // 16 + 1 + 100 + 100
    assert nsa_decode_tokens(20) == 0 + 1024 + 512
