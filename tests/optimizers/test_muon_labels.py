"""Parameter routing (Muon vs AdamW) and matrix layouts from paths and shapes."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optimizers import (
    MuonDimensionNumbers,
    MuonRules,
    leaf_dimension_numbers,
    muon,
    muon_labels,
    scale_by_muon,
)
from optimizers.muon import _from_wide, _plan, _to_wide

D, N, K, H, F, L, V = 16, 4, 2, 8, 24, 2, 40
C_Q, C, NOPE, R, HV = 12, 10, 6, 4, 8


def zeros(*shape):
    return jnp.zeros(shape, jnp.float32)


def model_params():
    """Parameter tree shaped like this library's Linen decoder (scanned layers)."""
    return {
        "params": {
            "embed": {"embedding": zeros(V, D)},
            "layers": {
                "attn_norm": {"scale": zeros(L, D)},
                "attn": {
                    "q_proj": {"kernel": zeros(L, D, N, H)},
                    "k_proj": {"kernel": zeros(L, D, K, H)},
                    "v_proj": {"kernel": zeros(L, D, K, H), "bias": zeros(L, K, H)},
                    "o_proj": {"kernel": zeros(L, N, H, D)},
                },
                "mla": {
                    "q_a_proj": {"kernel": zeros(L, D, C_Q)},
                    "q_a_norm": {"scale": zeros(L, C_Q)},
                    "q_b_proj": {"kernel": zeros(L, C_Q, N, NOPE + R)},
                    "kv_a_proj_with_mqa": {"kernel": zeros(L, D, C + R)},
                    "kv_b_proj": {"kernel": zeros(L, C, N, NOPE + HV)},
                    "o_proj": {"kernel": zeros(L, N, HV, D)},
                },
                "mlp": {
                    "gate": {"kernel": zeros(L, D, F)},
                    "up": {"kernel": zeros(L, D, F)},
                    "down": {"kernel": zeros(L, F, D)},
                },
                "moe": {
                    "router": {"kernel": zeros(L, D, 4)},
                    "experts": {"up": {"kernel": zeros(L, 4, D, F)}},
                    "gate_bias": zeros(L, 4),
                },
                "mhc": {"fn": zeros(L, 24, 4 * D), "base": zeros(L, 24)},
                "residual_attn": {"query": zeros(L, D)},
            },
            "final_norm": {"scale": zeros(D)},
            "lm_head": {"kernel": zeros(D, V)},
        }
    }


def flat(tree):
    return {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers)
        )[0]
    }


EXPECTED_MUON = {
    "layers/attn/q_proj/kernel",
    "layers/attn/k_proj/kernel",
    "layers/attn/v_proj/kernel",
    "layers/attn/o_proj/kernel",
    "layers/mla/q_a_proj/kernel",
    "layers/mla/q_b_proj/kernel",
    "layers/mla/kv_a_proj_with_mqa/kernel",
    "layers/mla/kv_b_proj/kernel",
    "layers/mla/o_proj/kernel",
    "layers/mlp/gate/kernel",
    "layers/mlp/up/kernel",
    "layers/mlp/down/kernel",
    "layers/moe/router/kernel",
    "layers/moe/experts/up/kernel",
}


def test_labels_route_hidden_matrices_to_muon_and_the_rest_to_adamw():
    labels = flat(muon_labels(model_params()))
    muon_leaves = {k.removeprefix("params/") for k, v in labels.items() if v == "muon"}
    assert muon_leaves == EXPECTED_MUON
    for name in (
        "embed/embedding",
        "lm_head/kernel",
        "final_norm/scale",
        "layers/mhc/fn",
        "layers/attn/v_proj/bias",
        "layers/moe/gate_bias",
        "layers/residual_attn/query",
    ):
        assert labels["params/" + name] == "adam", name


@pytest.mark.parametrize("per_head", [False, True])
def test_dimension_numbers_of_stacked_and_per_head_kernels(per_head):
    rules = MuonRules(per_head=per_head)

    def dn(name):
        leaf = flat(model_params())["params/" + name]
        return leaf_dimension_numbers(("params", *name.split("/")), leaf.shape, rules)

    def matrix(name):
        leaf = flat(model_params())["params/" + name]
        return dn(name).matrix_shape(leaf.shape)  # (count, fan_in, fan_out)

    assert matrix("layers/mlp/up/kernel") == (L, D, F)
    assert matrix("layers/mlp/down/kernel") == (L, F, D)
    assert matrix("layers/moe/experts/up/kernel") == (L * 4, D, F)
    assert matrix("lm_head/kernel") == (1, D, V)
    if per_head:
        assert matrix("layers/attn/q_proj/kernel") == (L * N, D, H)
        assert matrix("layers/attn/k_proj/kernel") == (L * K, D, H)
        assert matrix("layers/attn/o_proj/kernel") == (L * N, H, D)
        assert matrix("layers/mla/q_b_proj/kernel") == (L * N, C_Q, NOPE + R)
        assert matrix("layers/mla/kv_b_proj/kernel") == (L * N, C, NOPE + HV)
        assert dn("layers/attn/q_proj/kernel") == MuonDimensionNumbers((1,), (3,))
    else:
        assert matrix("layers/attn/q_proj/kernel") == (L, D, N * H)
        assert matrix("layers/attn/o_proj/kernel") == (L, N * H, D)
        assert matrix("layers/mla/kv_b_proj/kernel") == (L, C, N * (NOPE + HV))
        assert dn("layers/attn/o_proj/kernel") == MuonDimensionNumbers((1, 2), (3,))


def test_plain_pytrees_are_understood():
    """A list under 'layers' is not a scanned stack; 2-D leaves are matrices anywhere."""
    tree = {"layers": [{"w": zeros(8, 12), "b": zeros(12)}], "head_w": zeros(12, 4)}
    assert flat_list_labels(tree) == {"layers/0/w": "muon", "layers/0/b": "adam", "head_w": "muon"}


def flat_list_labels(tree):
    leaves = jax.tree_util.tree_flatten_with_path(muon_labels(tree))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): v for p, v in leaves}


def test_reshape_round_trip():
    """Oracle §12.10: (2, 3, 4) with reduction 0, output 2 is 3 matrices of 2x4; (2, 3, 4, 5)
    with reduction 2, output (0, 3) is 3 matrices of 4x10; both invert exactly."""
    for shape, dims, matrices in [
        ((2, 3, 4), MuonDimensionNumbers((0,), (2,)), (3, 2, 4)),
        ((2, 3, 4, 5), MuonDimensionNumbers((2,), (0, 3)), (3, 4, 10)),
        ((6, 2), MuonDimensionNumbers((-2,), (-1,)), (1, 6, 2)),
    ]:
        x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
        plan = _plan(("w",), shape, dims)
        assert (plan.count, plan.fan_in, plan.fan_out) == matrices
        wide = _to_wide(x, plan)
        assert wide.shape[1] <= wide.shape[2]
        np.testing.assert_array_equal(_from_wide(wide, plan), x)


def test_optax_dimension_numbers_are_accepted():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 12)), jnp.float32)
    ours = scale_by_muon(dimension_numbers={"w": MuonDimensionNumbers((1,), (2,))})
    theirs = scale_by_muon(dimension_numbers={"w": optax.contrib.MuonDimensionNumbers(1, 2)})
    u1, _ = ours.update({"w": w}, ours.init({"w": w}))
    u2, _ = theirs.update({"w": w}, theirs.init({"w": w}))
    np.testing.assert_array_equal(u1["w"], u2["w"])


def test_overrides_and_unknown_layouts():
    tree = {"params": {"mystery": {"kernel": zeros(3, 8, 16)}, "mhc": {"fn": zeros(24, 64)}}}
    with pytest.warns(UserWarning, match=r"mystery/kernel with shape \(3, 8, 16\)"):
        labels = flat(muon_labels(tree))
    assert labels["params/mystery/kernel"] == "adam"
    rules = MuonRules(overrides=((r"mhc/fn$", "muon"), (r"mystery", "adam")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = flat(muon_labels(tree, rules))
    assert labels["params/mhc/fn"] == "muon" and labels["params/mystery/kernel"] == "adam"
    with pytest.raises(ValueError, match="label must be"):
        MuonRules(overrides=(("x", "sgd"),))


def test_depthwise_convolutions_get_adamw_without_a_warning():
    """KDA's short convolutions ([K, 1, C] filters, one per channel) are not matrices."""
    tree = {"params": {"attention": {"q_conv1d": {"kernel": zeros(4, 4, 32)}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = flat(muon_labels(tree))
    assert labels["params/attention/q_conv1d/kernel"] == "adam"


def test_muon_routes_updates_to_adamw_and_muon():
    """Inside `muon`, AdamW leaves get exactly optax.adamw's update and Muon leaves Muon's."""
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "embed": {"embedding": jnp.asarray(rng.standard_normal((V, D)), jnp.float32)},
            "layers": {"mlp": {"up": {"kernel": jnp.asarray(rng.standard_normal((L, D, F)))}}},
            "norm": {"scale": jnp.ones(D)},
        }
    }
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    tx = muon(0.01, weight_decay=0.1)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)

    adam = optax.adamw(0.01, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    for path in (("embed", "embedding"), ("norm", "scale")):
        p, g = params["params"][path[0]][path[1]], grads["params"][path[0]][path[1]]
        expected, _ = adam.update(g, adam.init(p), p)
        np.testing.assert_allclose(updates["params"][path[0]][path[1]], expected, rtol=1e-6)

    up = updates["params"]["layers"]["mlp"]["up"]["kernel"]
    w = params["params"]["layers"]["mlp"]["up"]["kernel"]
    direction = (up / -0.01 - 0.1 * w) / (0.2 * np.sqrt(F))  # = NS(g) per layer
    for i in range(L):
        sv = np.linalg.svd(np.asarray(direction[i]), compute_uv=False)
        assert 0.6 < sv.min() and sv.max() < 1.2  # orthogonalised per layer


def test_user_labels_override_routing():
    params = {"a": zeros(8, 12) + 1.0, "b": zeros(8, 12) + 1.0}
    grads = {"a": jnp.ones((8, 12)), "b": jnp.ones((8, 12))}
    labels = {"a": "adam", "b": "muon"}
    tx = muon(0.1, labels=labels)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], -0.1, rtol=1e-5)  # Adam's first step: -lr·sign
    # Rank-1 gradient: the Muon update has the RMS of a rank-1 polar factor, not 0.2.
    assert float(jnp.sqrt(jnp.mean(updates["b"] ** 2))) < 0.1 * 0.2
