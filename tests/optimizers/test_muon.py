"""Muon as an optax transformation: parity with optax.contrib.muon, RMS matching, decoupled
weight decay, schedules, inject_hyperparams, chains, stacks, sharding, bad input and NaNs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optimizers import MuonDimensionNumbers, muon, scale_by_muon, update_scale


def normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def all_muon(params):
    return jax.tree.map(lambda _: "muon", params)


def rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def run_steps(tx, params, grads_per_step, jit=True, **extra):
    """Applies tx for each gradient tree in turn; returns the list of update trees."""
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    out = []
    for grads in grads_per_step:
        updates, state = update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


MATRICES = {"a": (16, 24), "b": (24, 16), "c": (8, 16)}  # two oriented shapes


def matrix_params(seed=0):
    return {k: normal(seed + i, s) for i, (k, s) in enumerate(MATRICES.items())}


def grad_stream(steps, seed=100, template=None):
    template = template or matrix_params()
    return [
        jax.tree.map(lambda p, i=i: normal(seed + i * 7 + p.size % 5, p.shape), template)
        for i in range(steps)
    ]


@pytest.mark.reference  # optax is a runtime dependency, so this never skips
@pytest.mark.parametrize(
    "nesterov, consistent_rms, weight_decay", [(True, None, 0.0), (False, 0.2, 0.1)]
)
def test_parity_with_optax_contrib_muon(nesterov, consistent_rms, weight_decay):
    """Same options, 2-D params, four steps: equal to fp32 rounding (oracle §12.9)."""
    params = matrix_params()
    ref = optax.contrib.muon(
        0.05, eps=1e-8, nesterov=nesterov, consistent_rms=consistent_rms, weight_decay=weight_decay
    )
    ours = muon(
        0.05,
        eps=1e-8,
        nesterov=nesterov,
        bias_correction=True,
        scaling="shape" if consistent_rms is None else "rms_match",
        target_rms=consistent_rms or 0.2,
        weight_decay=weight_decay,
        labels=all_muon,
    )
    grads = grad_stream(4)
    for u_ref, u_ours in zip(
        run_steps(ref, params, grads), run_steps(ours, params, grads), strict=True
    ):
        for k in MATRICES:
            scale = float(jnp.max(jnp.abs(u_ref[k])))
            np.testing.assert_allclose(u_ours[k], u_ref[k], atol=2e-5 * scale, rtol=0)


def test_momentum_forms_give_the_same_direction():
    """EMA ([KJ]) and sum ([ML]) momentum differ by the factor (1-β), removed by NS; the sum-form
    momentum is 20x the EMA one at β=0.95 (oracle §12.11)."""
    params, grads = matrix_params(), grad_stream(3)
    kw = dict(eps=0.0, scaling="none")
    ema, total = scale_by_muon(momentum="ema", **kw), scale_by_muon(momentum="sum", **kw)
    s_ema, s_sum = ema.init(params), total.init(params)
    for g in grads:
        u_ema, s_ema = jax.jit(ema.update)(g, s_ema)
        u_sum, s_sum = jax.jit(total.update)(g, s_sum)
        for k in MATRICES:
            np.testing.assert_allclose(u_ema[k], u_sum[k], atol=2e-6)
            np.testing.assert_allclose(20 * s_ema.mu[k], s_sum.mu[k], rtol=2e-5, atol=1e-6)


def test_update_rms_matches_target():
    """Moonlight scaling: update RMS = 0.2 (±1%) for any full-rank shape, 0.18 if asked."""
    shapes = {"wide": (32, 128), "square": (64, 64), "tall": (96, 48)}
    grads = {k: normal(i, s) for i, (k, s) in enumerate(shapes.items())}
    for target in (0.2, 0.18):
        tx = scale_by_muon(scaling="rms_match", target_rms=target, ns_coeffs="deepseek_v4")
        updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
        for k in shapes:
            assert rms(updates[k]) == pytest.approx(target, rel=0.01), k


def test_width_scale_factors():
    """Oracle §12.7, optax (in, out) layout."""
    assert update_scale(1024, 4096, "shape") == 2.0
    assert update_scale(4096, 1024, "shape") == 1.0
    assert update_scale(1024, 4096, "rms_match", 0.2) == pytest.approx(12.8)
    assert update_scale(1024, 4096, "none") == 1.0


def decay_params():
    return {
        "w": normal(0, (8, 12)),
        "embed": {"embedding": normal(1, (20, 8))},
        "norm": {"scale": normal(2, (8,))},
    }


@pytest.mark.parametrize("adam_weight_decay", [None, 0.0])
def test_weight_decay_is_decoupled(adam_weight_decay):
    """Zero gradients: each step multiplies Muon weights by exactly (1 - ηλ) (η, λ powers of
    two, so the check is bitwise); AdamW leaves decay the same way, or stay unchanged with
    adam_weight_decay=0 (oracle §12.8)."""
    lr, wd = 2.0**-4, 2.0**-3
    tx = muon(lr, weight_decay=wd, adam_weight_decay=adam_weight_decay)
    params = decay_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(zeros, state, params)
        new = optax.apply_updates(params, updates)
        np.testing.assert_array_equal(new["w"], params["w"] * (1 - lr * wd))
        for leaf in ("embed", "norm"):
            expected = (
                params[leaf]
                if adam_weight_decay == 0.0
                else jax.tree.map(lambda p: p * (1 - lr * wd), params[leaf])
            )
            jax.tree.map(np.testing.assert_array_equal, new[leaf], expected)
        params = new


def test_learning_rate_schedule_scales_update_and_decay():
    """W_t = W_{t-1}(1 - η_t λ) - η_t s O_t with η_t from the schedule (Moonlight Eq. 3-4)."""
    schedule = optax.linear_schedule(0.1, 0.02, transition_steps=3)
    params, grads = matrix_params(), grad_stream(3)
    scheduled = run_steps(muon(schedule, weight_decay=0.1, labels=all_muon), params, grads)
    direction = run_steps(scale_by_muon(), params, grads)
    p = params
    for t, (u, d) in enumerate(zip(scheduled, direction, strict=True)):
        eta = float(schedule(t))
        for k in MATRICES:
            np.testing.assert_allclose(u[k], -eta * (d[k] + 0.1 * p[k]), atol=1e-6)
        p = optax.apply_updates(p, u)


def test_inject_hyperparams():
    params, grads = matrix_params(), grad_stream(2)
    tx = optax.inject_hyperparams(muon)(learning_rate=0.1, weight_decay=0.01, labels=None)
    plain = run_steps(muon(0.1, weight_decay=0.01), params, grads)
    injected = run_steps(tx, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), plain, injected)

    state = tx.init(params)
    update = jax.jit(tx.update)
    full, _ = update(grads[0], state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    half, _ = update(grads[0], state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 0.5 * a, rtol=1e-6), full, half)

    with pytest.raises(TypeError, match="static_args"):
        bad = optax.inject_hyperparams(muon)(learning_rate=0.1, ns_steps=5)
        jax.jit(bad.update)(grads[0], bad.init(params), params)
    ok = optax.inject_hyperparams(muon, static_args=("ns_steps",))(
        learning_rate=0.1, weight_decay=0.01, ns_steps=5
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
        run_steps(ok, params, grads[:1])[0],
        plain[0],
    )


def test_chain_with_clipping_and_masks():
    params, (g,) = matrix_params(), grad_stream(1)
    g = jax.tree.map(lambda x: 10 * x, g)
    tx = optax.chain(optax.clip_by_global_norm(1.0), muon(0.1, labels=all_muon, scaling="none"))
    (chained,) = run_steps(tx, params, [g])
    norm = optax.tree.norm(g)
    clipped = jax.tree.map(lambda x: x / norm, g)
    (manual,) = run_steps(muon(0.1, labels=all_muon, scaling="none"), params, [clipped])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), chained, manual)

    # A masked-out 3-D leaf never reaches Muon; it is passed through unchanged.
    tree = {**params, "conv": normal(9, (3, 4, 5))}
    grads = {**g, "conv": normal(10, (3, 4, 5))}
    masked = optax.masked(scale_by_muon(), lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
    (out,) = run_steps(masked, tree, [grads])
    np.testing.assert_array_equal(out["conv"], grads["conv"])
    assert rms(out["a"]) == pytest.approx(0.2, rel=0.1)


def test_stacked_weights_are_orthogonalised_per_layer():
    """A scanned [L, m, n] leaf gives the same updates as L separate 2-D leaves."""
    stacked = {"layers": {"mlp": {"kernel": normal(0, (3, 16, 40))}}}
    separate = {f"layer{i}": stacked["layers"]["mlp"]["kernel"][i] for i in range(3)}
    grads = grad_stream(3, template=stacked)
    sep_grads = [{f"layer{i}": g["layers"]["mlp"]["kernel"][i] for i in range(3)} for g in grads]
    for u_st, u_sep in zip(
        run_steps(scale_by_muon(), stacked, grads),
        run_steps(scale_by_muon(), separate, sep_grads),
        strict=True,
    ):
        for i in range(3):
            np.testing.assert_allclose(
                u_st["layers"]["mlp"]["kernel"][i], u_sep[f"layer{i}"], atol=1e-6
            )


def test_dimension_numbers_relayout_gives_the_same_update():
    """Oracle §12.10: a 4-D re-layout of a 2-D weight gives the same update as the 2-D weight."""
    w = normal(0, (6, 20))
    g = normal(1, (6, 20))
    w4 = w.reshape(2, 3, 4, 5).transpose(2, 0, 1, 3)  # axes (4, 2, 3, 5): in = (1, 2)
    g4 = g.reshape(2, 3, 4, 5).transpose(2, 0, 1, 3)
    dims = MuonDimensionNumbers(reduction_axes=(1, 2), output_axes=(0, 3))
    (u2,) = run_steps(scale_by_muon(), {"w": w}, [{"w": g}])
    (u4,) = run_steps(scale_by_muon(dimension_numbers={"w": dims}), {"w": w4}, [{"w": g4}])
    back = u4["w"].transpose(1, 2, 0, 3).reshape(6, 20)
    np.testing.assert_allclose(back, u2["w"], atol=1e-6)


def test_batching_choices_agree():
    """Stacking same-shape matrices across leaves and the NS loop choice change no value."""
    params = {**matrix_params(), "d": normal(5, (24, 16)), "e": normal(6, (2, 16, 24))}
    dims = lambda path, shape: MuonDimensionNumbers((len(shape) - 2,), (len(shape) - 1,))  # noqa: E731
    grads = grad_stream(2, template=params)
    base = run_steps(scale_by_muon(dimension_numbers=dims, ns_implementation="map"), params, grads)
    other = run_steps(
        scale_by_muon(dimension_numbers=dims, batch_leaves=False, ns_implementation="batched"),
        params,
        grads,
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), base, other)


def mixed_params():
    return {
        "params": {
            "embed": {"embedding": normal(0, (32, 16))},
            "layers": {
                "attn": {"q_proj": {"kernel": normal(1, (2, 16, 4, 8))}},
                "mlp": {"up": {"kernel": normal(2, (2, 16, 32))}},
            },
        }
    }


def test_jit_equals_eager():
    params = {
        "params": {
            "layers": {"mlp": {"up": {"kernel": normal(2, (2, 8, 12))}}},
            "norm": {"scale": normal(3, (8,))},
        }
    }
    grads = grad_stream(2, template=params)
    tx = muon(0.1, weight_decay=0.1)
    jitted = run_steps(tx, params, grads, jit=True)
    eager = run_steps(tx, params, grads, jit=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), jitted, eager)


def test_sharded_equals_unsharded():
    """Params and grads sharded over a (fsdp=2, tensor=4) mesh of 8 CPU devices."""
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params = mixed_params()
    specs = {
        "params": {
            "embed": {"embedding": P("tensor", "fsdp")},
            "layers": {
                "attn": {"q_proj": {"kernel": P(None, "fsdp", "tensor", None)}},
                "mlp": {"up": {"kernel": P(None, "fsdp", "tensor")}},
            },
        }
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    grads = grad_stream(2, template=params)
    tx = muon(0.1, weight_decay=0.1)
    expected = run_steps(tx, params, grads)
    sharded = run_steps(
        tx,
        jax.device_put(params, shardings),
        [jax.device_put(g, shardings) for g in grads],
    )
    leaf = sharded[0]["params"]["layers"]["mlp"]["up"]["kernel"]
    assert len(leaf.sharding.device_set) == 8
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), expected, sharded)


def test_bad_input_gives_clear_errors():
    params = {"w3": normal(0, (2, 3, 4))}
    tx = scale_by_muon()
    with pytest.raises(ValueError, match=r"'w3' with shape \(2, 3, 4\)"):
        tx.update(params, tx.init(params))
    conv = {"params": {"conv": {"kernel": normal(0, (3, 8, 16))}}}
    tx = muon(0.1, labels=all_muon)
    with pytest.raises(ValueError, match=r"params/conv/kernel' with shape \(3, 8, 16\)"):
        tx.update(conv, tx.init(conv), conv)
    with pytest.raises(ValueError, match="momentum"):
        scale_by_muon(momentum="adam")
    with pytest.raises(ValueError, match="scaling"):
        scale_by_muon(scaling="moonlight")
    with pytest.raises(ValueError, match="bias_correction"):
        scale_by_muon(momentum="sum", bias_correction=True)
    with pytest.raises(ValueError, match="unknown Newton-Schulz schedule"):
        muon(0.1, ns_coeffs="muon")


def test_nan_gradient_stays_in_its_matrix():
    """Documented behaviour: a NaN makes its own matrix's update NaN and nothing else; with
    `optax.apply_if_finite` the step is skipped."""
    params = {"a": normal(0, (8, 12)), "stack": {"layers": {"kernel": normal(1, (2, 8, 12))}}}
    (g,) = grad_stream(1, template=params)
    bad = jax.tree.map(lambda x: x, g)
    bad["a"] = g["a"].at[0, 0].set(jnp.nan)
    bad["stack"]["layers"]["kernel"] = g["stack"]["layers"]["kernel"].at[0, 1, 1].set(jnp.nan)
    tx = muon(0.1, labels=all_muon)
    (clean,) = run_steps(tx, params, [g])
    (dirty,) = run_steps(tx, params, [bad])
    assert np.all(np.isnan(dirty["a"]))
    stack_dirty, stack_clean = (
        dirty["stack"]["layers"]["kernel"],
        clean["stack"]["layers"]["kernel"],
    )
    assert np.all(np.isnan(stack_dirty[0]))
    np.testing.assert_allclose(stack_dirty[1], stack_clean[1], atol=1e-7)

    safe = optax.apply_if_finite(tx, max_consecutive_errors=3)
    state = safe.init(params)
    updates, state = jax.jit(safe.update)(bad, state, params)
    assert int(state.notfinite_count) == 1
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates)


def test_dtypes():
    """Momentum is kept in mu_dtype; each update comes back in its gradient's dtype."""
    params = {"a": normal(0, (8, 12)), "b": normal(1, (8, 12)).astype(jnp.bfloat16)}
    tx = scale_by_muon(mu_dtype="bfloat16", ns_dtype="bfloat16")
    updates, state = jax.jit(tx.update)(params, tx.init(params))
    updates, state = jax.jit(tx.update)(params, state)
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(state.mu))
    assert updates["a"].dtype == jnp.float32 and updates["b"].dtype == jnp.bfloat16
    assert rms(updates["a"]) == pytest.approx(0.2, rel=0.15)
