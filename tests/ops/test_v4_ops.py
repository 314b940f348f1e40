"""DeepSeek-V4 attention ops: compressor, block causality, indexer top-k, window + compressed
attention with a sink, decode rings, inverse RoPE, grouped output (reference/attention.md §8.3)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.ops import dsa
from jaxmodels.ops import v4_attention as ops
from jaxmodels.ops.attention import attention_reference, causal_mask
from jaxmodels.ops.block_sparse import masked_attention
from jaxmodels.ops.rope import rope_inv_freq


def _normal(seed, shape, scale=1.0):
    """Test data from numpy (no per-shape compilation of a jax random kernel)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --------------------------------------------------------------------------------------------
# Compressor


@pytest.mark.parametrize("ratio,overlap", [(4, True), (4, False), (8, False)])
def test_compress_tokens_equals_entry_by_entry_loop(ratio, overlap):
    H = 6
    X = 2 * H if overlap else H
    kv, gate = _normal(0, (2, 27, X)), _normal(1, (2, 27, X), 2.0)
    ape = _normal(2, (ratio, X))
    fast = ops.compress_tokens(kv, gate, ape, ratio=ratio, overlap=overlap)
    ref = ops.compress_tokens_reference(kv, gate, ape, ratio=ratio, overlap=overlap)
    assert fast.shape == (2, 27 // ratio, H)
    np.testing.assert_allclose(fast, ref, atol=1e-6)


def test_constant_gate_score_is_mean_pooling():
    ratio, H = 4, 5
    kv = _normal(0, (2, 16, 2 * H))
    zeros = jnp.zeros((2, 16, 2 * H))
    ape = jnp.zeros((ratio, 2 * H))
    blocks = kv.reshape(2, 4, ratio, 2 * H)
    # HCA form: the plain mean of each block.
    hca = ops.compress_tokens(kv[..., :H], zeros[..., :H], ape[:, :H], ratio=ratio, overlap=False)
    np.testing.assert_allclose(hca, blocks[..., :H].mean(axis=2), atol=1e-6)
    # CSA form: the mean over 8 tokens, previous block's first-half channels with the current
    # block's second-half channels; the first entry has no previous block (mean of 4).
    csa = ops.compress_tokens(kv, zeros, ape, ratio=ratio, overlap=True)
    window = jnp.concatenate([blocks[:, :-1, :, :H], blocks[:, 1:, :, H:]], axis=2)
    np.testing.assert_allclose(csa[:, 1:], window.mean(axis=2), atol=1e-6)
    np.testing.assert_allclose(csa[:, 0], blocks[:, 0, :, H:].mean(axis=1), atol=1e-6)


def test_gated_pool_is_a_per_channel_softmax_and_safe_when_empty():
    kv = _normal(0, (1, 3, 4, 2))
    score = _normal(1, (1, 3, 4, 2))
    score = score.at[0, 2].set(-jnp.inf)  # an entry with no valid position
    out = ops.gated_pool(kv, score)
    expected = jnp.sum(jax.nn.softmax(score[:, :2], axis=2) * kv[:, :2], axis=2)
    np.testing.assert_allclose(out[:, :2], expected, atol=1e-6)
    np.testing.assert_array_equal(out[:, 2], 0.0)
    grad = jax.grad(lambda s: ops.gated_pool(kv, s).sum())(score)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("ratio", [4, 128])
def test_visible_compressed_entries_are_floor_t_plus_1_over_r(ratio):
    T = 3 * ratio + 2
    positions = jnp.arange(T)[None]
    P = T // ratio
    entry_end = (jnp.arange(P) + 1)[None] * ratio - 1
    visible = ops.entry_visibility(positions, entry_end)
    np.testing.assert_array_equal(visible.sum(-1)[0], (np.arange(T) + 1) // ratio)
    np.testing.assert_array_equal(ops.num_visible_entries(positions, ratio)[0], visible.sum(-1)[0])
    # A query sees exactly the completed blocks, i.e. a prefix of the entries.
    assert int(visible[0, ratio - 2].sum()) == 0 and int(visible[0, ratio - 1].sum()) == 1


# --------------------------------------------------------------------------------------------
# Indexer top-k


def test_topk_entries_keeps_the_best_visible_entries():
    scores = jnp.array([[[0.5, 3.0, 1.0, 9.0, 2.0]]])
    visible = jnp.array([[[True, True, True, False, True]]])
    idx, valid = ops.topk_entries(scores, visible, 2)
    assert set(np.asarray(idx[0, 0])) == {1, 4} and bool(valid.all())
    visible_two = jnp.array([[[True, False, True, False, False]]])
    idx, valid = ops.topk_entries(scores, visible_two, 3)
    assert set(np.asarray(idx[0, 0])[np.asarray(valid[0, 0])]) == {0, 2}
    mask = ops.selection_mask(idx, valid, 5)
    np.testing.assert_array_equal(mask[0, 0], [True, False, True, False, False])


def test_indexer_scores_match_the_definition():
    q, k, w = _normal(0, (1, 3, 4, 8)), _normal(1, (1, 5, 8)), _normal(2, (1, 3, 4))
    got = ops.indexer_scores(q, w, k, scale=0.25)
    want = np.einsum("btn,btnp->btp", w, np.maximum(np.einsum("btni,bpi->btnp", q, k), 0)) / 4
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Attention over window + compressed entries, with a sink


def _qkv(T, N=4, H=8, B=2, seed=0):
    return _normal(seed, (B, T, N, H)), _normal(seed + 1, (B, T, H))


@functools.partial(
    jax.jit, static_argnames=("window", "implementation", "topk", "chunk", "return_aux")
)
def _v4(
    q, kv, pos, sink, cmp, cmp_end, iq, iw, ik, *, window, implementation, topk, chunk=8,
    return_aux=False,
):  # fmt: skip
    indexer = None if topk is None else ops.IndexerInputs(iq, iw, ik, topk, 0.5)
    return ops.v4_attention(
        q,
        kv,
        pos,
        window=window,
        sink_N=sink,
        scale=0.3,
        cmp_BPH=cmp,
        cmp_end_BP=cmp_end,
        indexer=indexer,
        implementation=implementation,
        query_chunk=chunk,
        return_aux=return_aux,
    )


def _compressed_inputs(T, ratio, H=8, n=3, I=4, seed=10):
    P = T // ratio
    cmp = _normal(seed, (2, P, H))
    end = jnp.broadcast_to((jnp.arange(P) + 1) * ratio - 1, (2, P))
    iq, iw, ik = (
        _normal(seed + 1, (2, T, n, I)),
        _normal(seed + 2, (2, T, n)),
        _normal(seed + 3, (2, P, I)),
    )
    return cmp, end, iq, iw, ik


@pytest.mark.parametrize("implementation", ["reference", "blocked"])
def test_window_only_equals_sliding_window_attention_with_sink(implementation):
    T, window = 23, 5  # T > 2 * window: the blocked form takes its banded path
    q, kv = _qkv(T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    sink = _normal(3, (4,))
    got = _v4(
        q,
        kv,
        pos,
        sink,
        None,
        None,
        None,
        None,
        None,
        window=window,
        implementation=implementation,
        topk=None,
    )
    mask = causal_mask(pos, pos, window=window)
    want = attention_reference(q, kv[:, :, None], kv[:, :, None], mask, scale=0.3, sink_N=sink)
    np.testing.assert_allclose(got, want, atol=2e-6)
    # and the window is really a window: a key older than `window` does not matter
    kv2 = kv.at[:, 0].set(100.0)
    got2 = _v4(
        q,
        kv2,
        pos,
        sink,
        None,
        None,
        None,
        None,
        None,
        window=window,
        implementation=implementation,
        topk=None,
    )
    np.testing.assert_allclose(got2[:, window:], got[:, window:], atol=2e-6)
    assert not np.allclose(got2[:, :window], got[:, :window])


def test_sink_rescales_ordinary_attention():
    T, window = 9, 4
    q, kv = _qkv(T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    sink = _normal(3, (4,), 2.0)
    with_sink = _v4(
        q,
        kv,
        pos,
        sink,
        None,
        None,
        None,
        None,
        None,
        window=window,
        implementation="blocked",
        topk=None,
    )
    mask = causal_mask(pos, pos, window=window)[:, None]
    plain, lse = masked_attention(q, kv[:, :, None], kv[:, :, None], mask, scale=0.3)
    expected = plain * ops.sink_rescale(lse, sink)[..., None]
    np.testing.assert_allclose(with_sink, expected, atol=2e-6)
    np.testing.assert_allclose(
        ops.sink_rescale(lse, sink), 1 / (1 + jnp.exp(sink - lse)), rtol=1e-6
    )


@pytest.mark.parametrize("implementation", ["reference", "blocked"])
def test_csa_with_topk_at_least_visible_equals_attending_all_compressed(implementation):
    T, window, ratio = 22, 3, 4
    q, kv = _qkv(T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    sink = _normal(3, (4,))
    cmp, end, iq, iw, ik = _compressed_inputs(T, ratio)
    P = cmp.shape[1]
    dense = _v4(
        q,
        kv,
        pos,
        sink,
        cmp,
        end,
        None,
        None,
        None,
        window=window,
        implementation=implementation,
        topk=None,
    )
    csa = _v4(
        q, kv, pos, sink, cmp, end, iq, iw, ik, window=window, implementation=implementation, topk=P
    )
    np.testing.assert_allclose(csa, dense, atol=2e-6)
    sparse = _v4(
        q, kv, pos, sink, cmp, end, iq, iw, ik, window=window, implementation=implementation, topk=2
    )
    assert not np.allclose(sparse[:, 15:], dense[:, 15:], atol=1e-3)  # 3+ visible: it selects


@pytest.mark.parametrize("topk", [None, 2])
def test_blocked_equals_reference_with_compressed_entries(topk):
    T, window, ratio = 29, 4, 4
    q, kv = _qkv(T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    sink = _normal(3, (4,))
    cmp, end, iq, iw, ik = _compressed_inputs(T, ratio)
    args = (q, kv, pos, sink, cmp, end, iq, iw, ik)
    ref = _v4(*args, window=window, implementation="reference", topk=topk)
    fast = _v4(*args, window=window, implementation="blocked", topk=topk)
    np.testing.assert_allclose(fast, ref, atol=2e-6)
    if topk is None:
        return  # gradients: checked on the CSA form (a superset of the HCA one)

    def loss(impl, q, kv, cmp):
        return jnp.sum(
            jnp.sin(
                _v4(
                    q,
                    kv,
                    pos,
                    sink,
                    cmp,
                    end,
                    iq,
                    iw,
                    ik,
                    window=window,
                    implementation=impl,
                    topk=topk,
                )
            )
        )

    g_ref = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2))(q, kv, cmp)
    g_fast = jax.grad(functools.partial(loss, "blocked"), argnums=(0, 1, 2))(q, kv, cmp)
    for a, b in zip(g_ref, g_fast, strict=True):
        assert np.all(np.isfinite(b))
        np.testing.assert_allclose(b, a, atol=5e-5)


def test_compressed_entry_is_invisible_until_its_block_completes():
    T, window, ratio = 12, 2, 4
    q, kv = _qkv(T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    sink = jnp.zeros((4,))
    cmp, end, *_ = _compressed_inputs(T, ratio)
    base = _v4(
        q,
        kv,
        pos,
        sink,
        cmp,
        end,
        None,
        None,
        None,
        window=window,
        implementation="blocked",
        topk=None,
    )
    moved = _v4(
        q,
        kv,
        pos,
        sink,
        cmp.at[:, 1].set(50.0),
        end,
        None,
        None,
        None,
        window=window,
        implementation="blocked",
        topk=None,
    )
    changed = np.any(~np.isclose(moved, base, atol=1e-6), axis=(0, 2, 3))
    np.testing.assert_array_equal(changed, np.arange(T) >= 2 * ratio - 1)  # entry 1 ends at t=7


# --------------------------------------------------------------------------------------------
# Indexer training: the KL inputs (DeepSeek-V3.2 §2.1 over compressed entries)


@pytest.mark.parametrize("topk", [2, 7])  # 7 = P: every visible entry (the dense warm-up)
def test_indexer_kl_inputs_blocked_equal_reference(topk):
    """The blocked form's target (gathered logits weighted by each head's share of its full
    attention) == the reference's, read off the explicit softmax over window + entries + sink;
    query chunks of 8 over T = 29."""
    T, window, ratio = 29, 4, 4
    q, kv = _qkv(T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    args = (q, kv, pos, _normal(3, (4,))) + _compressed_inputs(T, ratio)
    ref, ref_aux = _v4(*args, window=window, implementation="reference", topk=topk, return_aux=True)
    out, aux = _v4(*args, window=window, implementation="blocked", topk=topk, return_aux=True)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    np.testing.assert_array_equal(aux["indices"], ref_aux["indices"])
    np.testing.assert_allclose(aux["scores"], ref_aux["scores"], atol=1e-6)  # -inf where empty
    np.testing.assert_allclose(aux["target"], ref_aux["target"], atol=1e-6)
    # k = min(topk, P) slots, filled with min(topk, visible) entries; the target is a
    # distribution over them (rows without a visible entry are empty)
    n_visible = np.minimum(topk, (np.arange(T) + 1) // ratio)
    np.testing.assert_array_equal((aux["indices"] >= 0).sum(-1), np.broadcast_to(n_visible, (2, T)))
    np.testing.assert_allclose(aux["target"].sum(-1), np.broadcast_to(n_visible > 0, (2, T)), 1e-5)
    assert np.all(np.isneginf(aux["scores"]) == (aux["indices"] < 0))


@pytest.mark.parametrize("implementation", ["reference", "blocked"])
@pytest.mark.parametrize("topk", [2, 6])
def test_indexer_kl_is_zero_when_the_indexer_softmax_is_the_attention(implementation, topk):
    """Constructed: identical heads, one indexer head reading the main query and the entries
    themselves, all dots positive (ReLU = identity) and w * indexer scale = main scale, so the
    index scores equal the main logits and softmax(I) over the selection is the target: KL = 0.
    Doubling the head weight breaks the match."""
    T, window, ratio, H, N = 24, 4, 4, 8, 4
    P = T // ratio
    offset = np.zeros(H, np.float32)
    offset[-1] = 4.0  # q . e = 16 + N(0, 7): positive
    q_BTH = _normal(0, (2, T, H)) * (offset == 0) + offset
    cmp = _normal(1, (2, P, H)) * (offset == 0) + offset
    assert float(jnp.min(jnp.einsum("BTH,BPH->BTP", q_BTH, cmp))) > 0
    q = jnp.broadcast_to(q_BTH[:, :, None], (2, T, N, H))
    end = jnp.broadcast_to((jnp.arange(P) + 1) * ratio - 1, (2, P))
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    iq, iw = q_BTH[:, :, None], jnp.full((2, T, 1), 0.3 / 0.5)  # _v4: main 0.3, indexer 0.5
    kls = []
    for w in (iw, 2 * iw):
        _, aux = _v4(
            q, _normal(2, (2, T, H)), pos, _normal(3, (N,)), cmp, end, iq, w, cmp,
            window=window, implementation=implementation, topk=topk, return_aux=True,
        )  # fmt: skip
        kls.append(dsa.indexer_kl(aux["target"], aux["scores"], aux["indices"] >= 0))
    np.testing.assert_allclose(kls[0], 0.0, atol=1e-6)
    assert float(jnp.mean(kls[1])) > 1e-2


@pytest.mark.parametrize("implementation", ["reference", "blocked"])
def test_indexer_kl_inputs_before_the_first_entry_and_without_an_indexer(implementation):
    T = 3  # < ratio: no complete entry, no slot, KL 0
    q, kv = _qkv(T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    args = (q, kv, pos, _normal(3, (4,))) + _compressed_inputs(T, 4)
    _, aux = _v4(*args, window=4, implementation=implementation, topk=2, return_aux=True)
    assert {k: v.shape for k, v in aux.items()} == dict.fromkeys(aux, (2, T, 0))
    kl = dsa.indexer_kl(aux["target"], aux["scores"], aux["indices"] >= 0)
    np.testing.assert_array_equal(kl, np.zeros((2, T)))
    with pytest.raises(ValueError, match="return_aux=True needs the CSA indexer"):
        ops.v4_attention(
            q, kv, pos, window=4, sink_N=jnp.zeros(4), scale=0.3, return_aux=True,
            implementation=implementation,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Decode rings


def test_ring_buffer_holds_the_latest_positions():
    L = 4
    ring = jnp.zeros((1, L, 1))
    index = 0
    for chunk in (3, 1, 6, 1):
        new = (jnp.arange(index, index + chunk, dtype=jnp.float32) + 1)[None, :, None]
        ring = ops.ring_write(ring, new, jnp.int32(index))
        index += chunk
        positions = ops.ring_positions(jnp.int32(index), L)
        held = np.asarray(ring[0, :, 0]) - 1  # value = position + 1
        np.testing.assert_array_equal(held, np.asarray(positions))
        assert sorted(np.asarray(positions)) == list(range(index - L, index))
        np.testing.assert_array_equal(
            ops.ring_read(ring, jnp.int32(index - L), L)[0, :, 0] - 1, np.arange(index - L, index)
        )
    assert list(np.asarray(ops.ring_positions(jnp.int32(1), 3))) == [0, -2, -1]  # empty: < 0


@pytest.mark.parametrize("ratio,overlap", [(4, True), (3, False)])
def test_incremental_compression_equals_whole_sequence(ratio, overlap):
    H = 3
    X = 2 * H if overlap else H
    T = 23
    kv, gate = _normal(0, (2, T, X)), _normal(1, (2, T, X))
    ape = _normal(2, (ratio, X))
    whole = ops.compress_tokens(kv, gate, ape, ratio=ratio, overlap=overlap)
    L = ratio * (2 if overlap else 1)

    @jax.jit
    def step(state, new_kv, new_gate, index):
        ring_kv, ring_gate, entries = state
        pooled, first = ops.compress_step(
            ring_kv, ring_gate, new_kv, new_gate, index, ape, ratio=ratio, overlap=overlap
        )
        entries = jax.lax.dynamic_update_slice(entries, pooled, (0, first, 0))
        ring_kv = ops.ring_write(ring_kv, new_kv, index)
        ring_gate = ops.ring_write(ring_gate, new_gate, index)
        return ring_kv, ring_gate, entries

    state = (jnp.zeros((2, L, X)), jnp.zeros((2, L, X)), jnp.zeros((2, T // ratio + 2, H)))
    index = 0
    for chunk in (5, 1, 1, 7, 1, 1, 1, 6):
        new_kv, new_gate = kv[:, index : index + chunk], gate[:, index : index + chunk]
        state = step(state, new_kv, new_gate, jnp.int32(index))
        entries = state[2]
        index += chunk
        done = index // ratio
        np.testing.assert_allclose(entries[:, :done], whole[:, :done], atol=1e-6)
    assert index == T


# --------------------------------------------------------------------------------------------
# RoPE and output projection


def test_inverse_partial_rope_undoes_the_rotation_and_keeps_nope_dims():
    x = _normal(0, (2, 5, 3, 12))
    pos = jnp.broadcast_to(jnp.arange(5) * 7, (2, 5))
    inv_freq = rope_inv_freq(4, 10000.0)
    y = ops.apply_partial_rope(x, pos, inv_freq)
    np.testing.assert_array_equal(y[..., :8], x[..., :8])
    assert not np.allclose(y[:, 1:, :, 8:], x[:, 1:, :, 8:])
    back = ops.apply_partial_rope(y, pos, inv_freq, inverse=True)
    np.testing.assert_allclose(back, x, atol=1e-5)


def test_grouped_output_is_block_diagonal_then_mix():
    B, T, N, H, G, O, D = 2, 3, 4, 5, 2, 3, 7
    o = _normal(0, (B, T, N, H))
    wo_a, wo_b = _normal(1, (N, H, O)), _normal(2, (G, O, D))
    got = ops.grouped_output(o, wo_a, wo_b)
    blockdiag = np.zeros((N * H, G * O), np.float32)
    n = N // G
    for g in range(G):
        blockdiag[g * n * H : (g + 1) * n * H, g * O : (g + 1) * O] = np.asarray(
            wo_a[g * n : (g + 1) * n]
        ).reshape(n * H, O)
    want = np.asarray(o).reshape(B, T, N * H) @ blockdiag @ np.asarray(wo_b).reshape(G * O, D)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
