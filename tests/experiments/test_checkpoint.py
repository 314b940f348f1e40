"""Checkpoints of the main job (experiments/checkpoint.py), in process, without training:
round trip with the grain iterator, restore onto a different mesh, corrupt and partial
checkpoints, non-finite states."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoint as ckpt
from experiments import presets
from experiments.data import make_datasets
from experiments.optimizer import build_optimizer
from jaxmodels import training
from sharding import make_mesh


@pytest.fixture(scope="module")
def setup():
    """The tiny preset's train state on an 8-device data mesh and its data config."""
    config = presets.get_preset("tiny")
    tx = build_optimizer(config.optimizer, config.train.steps)
    mesh = make_mesh("data=-1")
    state, _ = training.init_train_state(
        config.model, tx, jax.random.key(0), mesh, seq_len=config.data.seq_len
    )
    return config, tx, mesh, state


def at_step(state, step, scale=1.0):
    """`state` with its step counter set (and parameters scaled) — a stand-in for training."""
    params = jax.tree.map(lambda x: x * scale, state.params)
    return state.replace(step=jax.device_put(jnp.int32(step), state.step.sharding), params=params)


def abstract_on(setup, mesh):
    config, tx, _, _ = setup
    return training.abstract_train_state(config.model, tx, mesh, seq_len=config.data.seq_len)[0]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(workdir, setup, steps, data_iter):
    """Saves checkpoints at `steps` (parameters scaled by the step), draining the iterator."""
    _, _, _, state = setup
    checkpointer = ckpt.Checkpointer(str(workdir), keep=5)
    saved = {}
    consumed = 0
    for step in steps:
        while consumed < step:
            next(data_iter)
            consumed += 1
        saved[step] = at_step(state, step, scale=1.0 + step / 100)
        checkpointer.save(
            step, saved[step], data_iter, {"rng": ckpt.rng_to_json(jax.random.key(7))}
        )
    checkpointer.close()
    return saved


def test_round_trip_restores_state_meta_and_data_position(setup, tmp_path):
    config = setup[0]
    it, _, _ = make_datasets(config.data)
    saved = save_steps(tmp_path, setup, [3], it)
    expected_next = [next(it) for _ in range(2)]

    fresh, _, _ = make_datasets(config.data)
    checkpointer = ckpt.Checkpointer(str(tmp_path))
    step, state, meta = checkpointer.restore_latest(abstract_on(setup, setup[2]), fresh)
    checkpointer.close()
    assert step == 3 and meta["step"] == 3
    assert_trees_equal(state, saved[3])
    key = ckpt.rng_from_json(meta["rng"])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(7)))
    for want in expected_next:  # the restored iterator continues the exact sequence
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_restore_onto_a_different_mesh(setup, tmp_path):
    """Saved replicated over 8 devices, restored fsdp-sharded over 4 of them."""
    config = setup[0]
    it, _, _ = make_datasets(config.data)
    saved = save_steps(tmp_path, setup, [2], it)
    mesh4 = make_mesh("fsdp=-1", devices=jax.devices()[:4])
    abstract = abstract_on(setup, mesh4)
    checkpointer = ckpt.Checkpointer(str(tmp_path))
    _, state, _ = checkpointer.restore_latest(abstract)
    checkpointer.close()
    assert_trees_equal(state, saved[2])
    embedding = state.params["params"]["embed"]["embedding"]
    assert embedding.sharding.mesh.devices.size == 4
    assert embedding.sharding == abstract.params["params"]["embed"]["embedding"].sharding
    assert any("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params))
    assert len(embedding.addressable_shards) == 4


def _garble(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            size = max(os.path.getsize(path), 16)
            with open(path, "wb") as f:
                f.write(np.random.default_rng(0).bytes(size))


# A failed tensorstore read may finish its asyncio callback after the loop closed: harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage",
    ["garbled_state", "missing_data", "missing_array_files"],
)
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(setup, tmp_path, damage):
    config = setup[0]
    it, _, _ = make_datasets(config.data)
    saved = save_steps(tmp_path, setup, [1, 2], it)
    latest = tmp_path / "checkpoints" / "2"
    if damage == "garbled_state":
        _garble(latest / "state")
    elif damage == "missing_data":
        shutil.rmtree(latest / "data")
    else:
        shutil.rmtree(latest / "state" / "d")
    messages = []
    checkpointer = ckpt.Checkpointer(str(tmp_path), log=messages.append)
    step, state, _ = checkpointer.restore_latest(abstract_on(setup, setup[2]), it)
    assert step == 1
    assert_trees_equal(state, saved[1])
    assert len(messages) == 1 and "checkpoint at step 2 is corrupt or incomplete" in messages[0]
    assert not latest.exists() and len(os.listdir(tmp_path / ckpt.CORRUPT_DIR)) == 1
    # The step number is free again: the resumed run can save step 2.
    checkpointer.save(2, at_step(setup[3], 2), it, {"rng": [0, 0]})
    checkpointer.wait()
    assert checkpointer.steps() == [1, 2]
    checkpointer.close()


def test_nonfinite_parameters_are_refused_on_restore(setup, tmp_path):
    config = setup[0]
    it, _, _ = make_datasets(config.data)
    checkpointer = ckpt.Checkpointer(str(tmp_path))
    checkpointer.save(1, at_step(setup[3], 1, scale=jnp.nan), it, {"rng": [0, 0]})
    checkpointer.close()
    assert not ckpt.tree_is_finite(at_step(setup[3], 1, scale=jnp.nan).params)
    assert ckpt.tree_is_finite(setup[3].params)
    checkpointer = ckpt.Checkpointer(str(tmp_path), log=lambda m: None)
    with pytest.raises(ckpt.CheckpointError, match="not finite"):
        checkpointer.restore(1, abstract_on(setup, setup[2]))
    assert checkpointer.restore_latest(abstract_on(setup, setup[2])) is None
    checkpointer.close()


def test_keeps_only_the_newest_checkpoints(setup, tmp_path):
    config = setup[0]
    it, _, _ = make_datasets(config.data)
    checkpointer = ckpt.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, at_step(setup[3], step), it, {"rng": [0, 0]})
    checkpointer.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]


def test_restore_params_reads_only_the_parameters_of_another_run(setup, tmp_path):
    """`train.init_from`: the newest (or a named) step's parameters onto another mesh; the
    source directory is only read."""
    config = setup[0]
    it, _, _ = make_datasets(config.data)
    saved = save_steps(tmp_path, setup, [2, 5], it)
    mesh4 = make_mesh("fsdp=-1", devices=jax.devices()[:4])
    abstract = abstract_on(setup, mesh4).params
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    for source, step in (
        (tmp_path, 5),
        (tmp_path / "checkpoints", 5),
        (tmp_path / "checkpoints" / "2", 2),
    ):
        got_step, params, where = ckpt.restore_params(str(source), abstract)
        assert got_step == step and where == str(tmp_path / "checkpoints" / str(step))
        assert_trees_equal(params, saved[step].params)
        kernel = params["params"]["group_0"]["layer_0"]["attention"]["q_proj"]["kernel"]
        assert (
            kernel.sharding
            == abstract["params"]["group_0"]["layer_0"]["attention"]["q_proj"]["kernel"].sharding
        )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    with pytest.raises(ckpt.CheckpointError, match="is not a directory"):
        ckpt.restore_params(str(tmp_path / "missing"), abstract)


def test_first_mismatch_names_the_first_differing_path():
    a = {"params": {"x": jnp.zeros((2, 3)), "y": jnp.zeros(4)}}
    assert ckpt.first_mismatch(a, a) is None
    assert ckpt.first_mismatch(a, {"params": {"x": jnp.zeros((2, 3))}}) == (
        "params/y: in the checkpoint (shape (4,)) but not in this model"
    )
    assert ckpt.first_mismatch({"params": {"y": jnp.zeros(4)}}, a) == (
        "params/x: not in the checkpoint (this model has shape (2, 3))"
    )
    b = {"params": {"x": jnp.zeros((2, 5)), "y": jnp.zeros(5)}}
    assert ckpt.first_mismatch(a, b) == (
        "params/x: shape (2, 3) in the checkpoint, (2, 5) in this model"
    )
