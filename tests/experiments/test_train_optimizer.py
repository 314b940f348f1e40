"""The main job's optimizer (experiments/optimizer.py): schedules, the optax chain, Muon."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.config import OptimizerConfig
from experiments.optimizer import build_optimizer, decay_mask, learning_rate_schedule


def lrs(config, total, steps):
    schedule = learning_rate_schedule(config, total)
    return np.array([float(schedule(s)) for s in steps])


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    got = lrs(config, 100, [0, 5, 10, 55, 100, 150])
    np.testing.assert_allclose(got, [0.0, 5e-3, 1e-2, 5.5e-3, 1e-3, 1e-3], rtol=1e-5)


@pytest.mark.parametrize("shape, mid", [("linear", 5.5e-3), ("cosine", 5.5e-3)])
def test_wsd_schedule_is_warmup_stable_decay(shape, mid):
    config = OptimizerConfig(
        learning_rate=1e-2,
        warmup_steps=10,
        schedule="wsd",
        decay_fraction=0.2,
        decay_shape=shape,
        min_lr_ratio=0.1,
    )
    # 100 steps: warmup 0..10, stable 10..80, decay 80..100 to 1e-3.
    got = lrs(config, 100, [5, 10, 50, 80, 90, 100])
    np.testing.assert_allclose(got, [5e-3, 1e-2, 1e-2, 1e-2, mid, 1e-3], rtol=1e-5)
    quarter = lrs(config, 100, [85])[0]
    expected = 1e-3 + 9e-3 * (0.75 if shape == "linear" else 0.5 * (1 + np.cos(np.pi / 4)))
    np.testing.assert_allclose(quarter, expected, rtol=1e-5)


def test_constant_schedule():
    config = OptimizerConfig(learning_rate=2e-3, warmup_steps=4, schedule="constant")
    np.testing.assert_allclose(lrs(config, 50, [0, 2, 4, 49]), [0, 1e-3, 2e-3, 2e-3], rtol=1e-6)


def toy_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "params": {
            "layer": {"kernel": jax.random.normal(k1, (16, 32))},
            "norm": {"scale": jnp.ones((16,))},
            "embed": {"embedding": jax.random.normal(k2, (24, 16))},
        }
    }


def test_adamw_chain_matches_a_hand_built_optax_chain():
    config = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, grad_clip=0.5, weight_decay=0.1)
    params = toy_params()
    grads = jax.tree.map(lambda p: 3.0 * jnp.sin(p) + 0.1, params)
    manual = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.adamw(
            learning_rate_schedule(config, 20),
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
        ),
    )
    ours = build_optimizer(config, 20)
    s1, s2 = ours.init(params), manual.init(params)
    ours_update, manual_update = jax.jit(ours.update), jax.jit(manual.update)
    for _ in range(3):
        u1, s1 = ours_update(grads, s1, params)
        u2, s2 = manual_update(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_array_equal(a, b)


def test_weight_decay_skips_vectors_and_clipping_bounds_the_step():
    params = toy_params()
    mask = decay_mask(params)["params"]
    assert not mask["norm"]["scale"] and mask["layer"]["kernel"] and mask["embed"]["embedding"]
    config = OptimizerConfig(learning_rate=1.0, warmup_steps=0, weight_decay=0.5, grad_clip=1.0)
    tx = build_optimizer(config, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradients: vectors do not move, matrices shrink by lr * weight_decay.
    np.testing.assert_array_equal(updates["params"]["norm"]["scale"], 0.0)
    np.testing.assert_allclose(
        updates["params"]["layer"]["kernel"], -0.5 * params["params"]["layer"]["kernel"], rtol=1e-6
    )
    # Huge gradients are clipped to global norm 1 before Adam (first Adam step is +-lr anyway,
    # so check the clipped gradient through the chain's first stage).
    huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(huge, optax.EmptyState())
    np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-5)


def test_muon_is_wired_with_rms_matching():
    config = OptimizerConfig(name="muon", learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
    params = toy_params()
    tx = build_optimizer(config, 10)
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    kernel = updates["params"]["layer"]["kernel"]
    # Moonlight RMS matching: the orthogonalised update has RMS 0.2 x lr (Newton-Schulz is
    # approximate, so within 25%).
    rms = float(jnp.sqrt(jnp.mean(kernel**2)))
    assert 0.75 * 0.2 * 1e-2 < rms < 1.25 * 0.2 * 1e-2
    # The embedding goes to AdamW: its first update is lr * sign(g) elementwise.
    embedding = updates["params"]["embed"]["embedding"]
    np.testing.assert_allclose(jnp.abs(embedding), 1e-2, rtol=1e-3)


def test_muon_state_shardings_follow_fsdp_parameters():
    """Muon + AdamW (optax.partition) hold MaskedNode placeholders; the train state's
    shardings must keep them and shard the momentum like its parameter."""
    from experiments import presets
    from jaxmodels import training
    from sharding import make_mesh

    config = presets.get_preset("tiny")
    tx = build_optimizer(OptimizerConfig(name="muon", warmup_steps=0), 10)
    mesh = make_mesh("fsdp=-1")
    abstract, shardings = training.abstract_train_state(config.model, tx, mesh, seq_len=8)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    masked = [x for x in jax.tree.leaves(abstract.opt_state, is_leaf=is_masked) if is_masked(x)]
    assert masked  # the routing placeholders survived
    specs = {
        jax.tree_util.keystr(path): leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]
        if "q_proj" in jax.tree_util.keystr(path)
    }
    assert specs and all(spec[0] == "fsdp" for spec in specs.values()), specs
