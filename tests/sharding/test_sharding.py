"""Meshes, the rules table, sharded init and the sharded train step on 8 fake CPU devices."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import sharding
from jaxmodels import training
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.config import ModelConfig

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    scan_layers=True,
    attention={"gqa": GQAConfig(num_heads=8, num_kv_heads=8, head_dim=8)},
)


def test_mesh_sizes_resolve_and_errors_are_clear():
    assert sharding.resolve_axis_sizes({"fsdp": -1, "tensor": 2}, 8) == {
        "data": 1,
        "fsdp": 4,
        "tensor": 2,
        "expert": 1,
    }
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        sharding.resolve_axis_sizes({"model": 2}, 8)
    with pytest.raises(ValueError, match="8 is not divisible by 3"):
        sharding.resolve_axis_sizes({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="multiply to 4, but there are 8 devices"):
        sharding.resolve_axis_sizes({"data": 2, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        sharding.resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="not of the form axis=size"):
        sharding.parse_mesh_spec("data")


def test_rules_first_match_wins_and_collisions_raise():
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    rules = (("embed", "fsdp"), ("embed", "tensor"), ("mlp", "tensor"), ("heads", "fsdp"))
    spec = sharding.logical_to_spec(("embed", "mlp"), rules, mesh=mesh, shape=(8, 8))
    assert spec == jax.P("fsdp", "tensor")
    with pytest.raises(ValueError, match="'embed' and 'heads' both map to mesh axis 'fsdp'"):
        sharding.logical_to_spec(("embed", "heads"), rules, mesh=mesh)
    with pytest.raises(ValueError, match="dimension 1 \\('mlp', size 6\\) is not divisible"):
        sharding.logical_to_spec(("embed", "mlp"), rules, mesh=mesh, shape=(8, 6))
    # Axes of size 1 are dropped, unknown names are replicated.
    assert sharding.logical_to_spec(
        ("embed", "other"), rules, mesh=sharding.make_mesh("tensor=8")
    ) == jax.P(None, None)


def test_parameters_are_born_sharded_per_the_rules():
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    state, shardings = training.init_train_state(
        CONFIG, optax.adam(1e-3), jax.random.key(0), mesh, seq_len=8
    )
    q = state.params["params"]["layers"]["layer_0"]["attention"]["q_proj"]["kernel"]
    assert q.shape == (2, 32, 8, 8)  # [layers, D, N, H]
    assert q.sharding.spec == jax.P(None, "fsdp", "tensor", None)
    mu = state.opt_state[0].mu["params"]["layers"]["layer_0"]["attention"]["q_proj"]["kernel"]
    assert mu.sharding == q.sharding  # optimizer state follows its parameter
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 8)


def _run(mesh_spec: str, steps: int = 3):
    devices = jax.devices()[:1] if mesh_spec == "data=1" else None
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    optimizer = optax.adamw(3e-3)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 13)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, shardings = training.init_train_state(
        CONFIG, optimizer, jax.random.key(0), mesh, seq_len=12
    )
    step = training.build_trainer(CONFIG, optimizer, mesh, shardings, batch)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses, step


@pytest.fixture(scope="module")
def single_device_run():
    return _run("data=1")


@pytest.mark.parametrize("mesh_spec", ["data=8", "data=2,fsdp=2,tensor=2", "tensor=8"])
def test_sharded_train_step_equals_single_device(mesh_spec, single_device_run):
    ref_state, ref_losses, _ = single_device_run
    state, losses, step = _run(mesh_spec)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    assert step.jitted._cache_size() == 1  # compiled once across steps
    assert int(state.step) == 3


def test_model_dims_that_do_not_divide_the_mesh_raise_at_init():
    config = dataclasses.replace(
        CONFIG, attention={"gqa": GQAConfig(num_heads=4, num_kv_heads=2, head_dim=8)}
    )
    mesh = sharding.make_mesh("tensor=8")
    with pytest.raises(
        ValueError, match="size 2\\) is not divisible by mesh axes \\('tensor',\\) of total size 8"
    ):
        training.init_train_state(config, optax.adam(1e-3), jax.random.key(0), mesh, seq_len=8)
