"""QK-Clip oracles (reference/optimizers_and_residuals.md §12, items 12-14): logits are built
from small weights here, clipped, and recomputed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optimizers import collect_max_logits, mha_targets, mla_targets, muon, qk_clip

B, T, D, N, H = 2, 5, 8, 4, 4
C_Q, C, NOPE, R, HV = 6, 6, 4, 2, 3
MODULE = ("params", "attn")


def normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


@jax.jit
def mha_logits(x_BTD, wq_DNH, wk_DKH):
    """[B, N, T, S] logits that enter the softmax (1/sqrt(H) included); GQA by repeating k."""
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, wq_DNH)
    k_BSKH = jnp.einsum("BSD,DKH->BSKH", x_BTD, wk_DKH)
    k_BSNH = jnp.repeat(k_BSKH, wq_DNH.shape[1] // wk_DKH.shape[1], axis=2)
    return jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH) / np.sqrt(wq_DNH.shape[-1])


def head_max(logits_BNTS):
    return jnp.max(logits_BNTS, axis=(0, 2, 3))


def apply_clip(params, updates, max_logits, targets, threshold):
    tx = qk_clip({MODULE: targets}, threshold=threshold)
    new_updates, state = tx.update(updates, tx.init(params), params, max_logits=max_logits)
    return optax.apply_updates(params, new_updates), new_updates, state


def mha_case(num_kv, hot_heads):
    x = normal(0, (B, T, D))
    wq, wk = normal(1, (D, N, H), 0.5), normal(2, (D, num_kv, H), 0.5)
    wq = wq.at[:, hot_heads].multiply(4.0)
    params = {"params": {"attn": {"q_proj": {"kernel": wq}, "k_proj": {"kernel": wk}}}}
    updates = jax.tree.map(lambda p: normal(3 + p.ndim, p.shape, 0.05), params)
    return x, params, updates


def attn(tree):
    return tree["params"]["attn"]


def test_mha_offending_heads_land_on_tau_and_the_rest_are_bit_identical():
    x, params, updates = mha_case(N, hot_heads=[0, 2])
    stepped = optax.apply_updates(params, updates)  # the logits of the post-update weights
    s = head_max(
        mha_logits(x, attn(stepped)["q_proj"]["kernel"], attn(stepped)["k_proj"]["kernel"])
    )
    tau = float(jnp.max(s[jnp.array([1, 3])])) * 1.5
    assert float(jnp.min(s[jnp.array([0, 2])])) > tau
    new, new_updates, state = apply_clip(params, updates, {MODULE: s}, mha_targets(N), tau)
    s_new = head_max(mha_logits(x, attn(new)["q_proj"]["kernel"], attn(new)["k_proj"]["kernel"]))
    np.testing.assert_allclose(s_new[jnp.array([0, 2])], tau, rtol=2e-6)
    np.testing.assert_array_equal(s_new[jnp.array([1, 3])], s[jnp.array([1, 3])])
    for name in ("q_proj", "k_proj"):
        got, ref = attn(new_updates)[name]["kernel"], attn(updates)[name]["kernel"]
        np.testing.assert_array_equal(got[:, jnp.array([1, 3])], ref[:, jnp.array([1, 3])])
    assert int(state.clipped) == 2


def test_gqa_group_max_lands_on_tau():
    """Oracle 14: γ of a kv group is the min over its query heads, applied to the whole group."""
    x, params, updates = mha_case(2, hot_heads=[1])
    stepped = optax.apply_updates(params, updates)
    s = head_max(
        mha_logits(x, attn(stepped)["q_proj"]["kernel"], attn(stepped)["k_proj"]["kernel"])
    )
    tau = float(jnp.max(s[jnp.array([0, 2, 3])])) * 1.2
    assert float(s[1]) > tau
    new, _, _ = apply_clip(params, updates, {MODULE: s}, mha_targets(N, 2), tau)
    logits_new = mha_logits(x, attn(new)["q_proj"]["kernel"], attn(new)["k_proj"]["kernel"])
    logits_old = mha_logits(x, attn(stepped)["q_proj"]["kernel"], attn(stepped)["k_proj"]["kernel"])
    np.testing.assert_allclose(jnp.max(head_max(logits_new)[:2]), tau, rtol=2e-6)
    gamma = tau / float(s[1])
    np.testing.assert_allclose(logits_new[:, :2], gamma * logits_old[:, :2], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(logits_new[:, 2:], logits_old[:, 2:])  # group 1 untouched


@jax.jit
def mla_logits(c_q, c_kv, k_rope, wq_b, wkv_b):
    """MLA logits per head: (q_nope·k_nope + q_rope·k_rope)/sqrt(NOPE + R), shared k_rope."""
    q = jnp.einsum("BTC,CNH->BTNH", c_q, wq_b)
    k_nope = jnp.einsum("BSC,CNH->BSNH", c_kv, wkv_b[..., :NOPE])
    nope = jnp.einsum("BTNH,BSNH->BNTS", q[..., :NOPE], k_nope)
    rope = jnp.einsum("BTNR,BSR->BNTS", q[..., NOPE:], k_rope)
    return (nope + rope) / np.sqrt(NOPE + R)


def test_mla_every_logit_of_a_clipped_head_scales_by_gamma():
    """Oracle 13: q_nope, k_nope by sqrt(γ), q_rope by γ, shared rope key untouched."""
    c_q, c_kv, k_rope = normal(0, (B, T, C_Q)), normal(1, (B, T, C)), normal(2, (B, T, R))
    wq_b = normal(3, (C_Q, N, NOPE + R), 0.5).at[:, 3].multiply(4.0)
    wkv_b = normal(4, (C, N, NOPE + HV), 0.5)
    w_kr = normal(5, (D, C + R))
    params = {
        "params": {
            "attn": {
                "q_b_proj": {"kernel": wq_b},
                "kv_b_proj": {"kernel": wkv_b},
                "kv_a_proj_with_mqa": {"kernel": w_kr},
            }
        }
    }
    updates = jax.tree.map(jnp.zeros_like, params)
    old = mla_logits(c_q, c_kv, k_rope, wq_b, wkv_b)
    s = head_max(old)
    tau = float(jnp.max(s[:3])) * 1.1
    assert float(s[3]) > tau
    new, _, _ = apply_clip(params, updates, {MODULE: s}, mla_targets(NOPE, R), tau)
    a = attn(new)
    logits = mla_logits(c_q, c_kv, k_rope, a["q_b_proj"]["kernel"], a["kv_b_proj"]["kernel"])
    np.testing.assert_allclose(logits[:, 3], tau / float(s[3]) * old[:, 3], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.max(logits[:, 3]), tau, rtol=2e-6)
    np.testing.assert_array_equal(logits[:, :3], old[:, :3])
    np.testing.assert_array_equal(a["kv_b_proj"]["kernel"][..., NOPE:], wkv_b[..., NOPE:])  # v
    np.testing.assert_array_equal(a["kv_a_proj_with_mqa"]["kernel"], w_kr)


def test_scanned_stack_clips_per_layer():
    """max_logits [L, N] for leaves with a leading layer axis [L, D, N, H]."""
    wq = normal(0, (2, D, N, H))
    params = {"params": {"attn": {"q_proj": {"kernel": wq}, "k_proj": {"kernel": wq + 1.0}}}}
    updates = jax.tree.map(jnp.zeros_like, params)
    s = jnp.array([[400.0, 50.0, 50.0, 50.0], [50.0, 50.0, 50.0, 25.0]])
    new, _, state = apply_clip(params, updates, {MODULE: s}, mha_targets(N), 100.0)
    q = attn(new)["q_proj"]["kernel"]
    np.testing.assert_allclose(q[0, :, 0], 0.5 * wq[0, :, 0], rtol=1e-6)  # sqrt(100/400)
    np.testing.assert_array_equal(q[0, :, 1:], wq[0, :, 1:])
    np.testing.assert_array_equal(q[1], wq[1])
    assert int(state.clipped) == 1


def test_chained_after_muon_gives_clip_of_the_muon_step():
    """params + updates == clip(params + muon_update), under jit and inject_hyperparams."""
    x, params, _ = mha_case(N, hot_heads=[0])
    grads = jax.tree.map(lambda p: normal(9, p.shape), params)
    s = jnp.array([300.0, 10.0, 10.0, 10.0])
    opt = optax.inject_hyperparams(muon)(learning_rate=0.05)
    tx = optax.chain(opt, qk_clip({MODULE: mha_targets(N)}, threshold=100.0))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, max_logits={MODULE: s})
    plain, _ = opt.update(grads, opt.init(params), params)
    stepped = optax.apply_updates(params, plain)
    new = optax.apply_updates(params, updates)
    for name in ("q_proj", "k_proj"):
        w, ref = attn(new)[name]["kernel"], attn(stepped)[name]["kernel"]
        np.testing.assert_allclose(w[:, 0], np.sqrt(1 / 3) * ref[:, 0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(w[:, 1:], ref[:, 1:], rtol=1e-6, atol=1e-7)
    del x


def test_nan_logits_do_not_clip_and_bad_calls_raise():
    _, params, updates = mha_case(N, hot_heads=[])
    s = jnp.array([jnp.nan, 1e4, 1.0, 1.0])
    _, new_updates, state = apply_clip(params, updates, {MODULE: s}, mha_targets(N), 100.0)
    np.testing.assert_array_equal(
        attn(new_updates)["q_proj"]["kernel"][:, 0], attn(updates)["q_proj"]["kernel"][:, 0]
    )
    assert int(state.clipped) == 1
    tx = qk_clip({MODULE: mha_targets(N)})
    with pytest.raises(ValueError, match="max_logits"):
        tx.update(updates, tx.init(params), params)
    with pytest.raises(ValueError, match="params"):
        tx.update(updates, tx.init(params), max_logits={MODULE: s})
    with pytest.raises(KeyError, match="params/attn"):
        tx.update(updates, tx.init(params), params, max_logits={("params", "other"): s})
    with pytest.raises(ValueError, match="heads"):
        tx.update(updates, tx.init(params), params, max_logits={MODULE: s[:3]})
    with pytest.raises(ValueError, match="multiple"):
        mha_targets(4, 3)


def test_collect_max_logits_from_sown_intermediates():
    inter = {"layers": {"attn": {"max_logits": (jnp.array([1.0, 5.0]), jnp.array([3.0, 2.0]))}}}
    got = collect_max_logits(inter)
    assert list(got) == [("params", "layers", "attn")]
    np.testing.assert_array_equal(got[("params", "layers", "attn")], [3.0, 5.0])
