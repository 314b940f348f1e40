"""Stage chaining: `--train.init_from=<run>` starts a new run from another run's parameters
(tiny preset, in process).

Run A trains 4 steps with AdamW on a data mesh. Run B starts from A with Muon on an fsdp mesh;
its warmup starts the learning rate at 0, so B's parameters after step 1 are its initial ones,
which must be A's final parameters bit for bit, while B's step, optimizer state and data start
fresh. Re-running B resumes B's own checkpoint, not A's.
"""

import dataclasses

import jax
import numpy as np
import pytest

from experiments import presets, train
from experiments.metrics import read_metrics

pytestmark = pytest.mark.slow


def tiny(steps: int, **train_fields):
    base = presets.get_preset("tiny")
    return dataclasses.replace(
        base,
        optimizer=dataclasses.replace(base.optimizer, warmup_steps=1),
        train=dataclasses.replace(
            base.train,
            steps=steps,
            log_every=1,
            eval_every=steps,
            checkpoint_every=2,
            progress=False,
            plot=False,
            sample_prompt="",
            **train_fields,
        ),
    )


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_a")
    result = train.run(tiny(4), str(workdir), log=lambda _: None)
    assert result.status == "completed" and result.step == 4
    return workdir, jax.device_get(result.state.params)


def test_a_new_run_starts_from_the_other_runs_parameters_only(run_a, tmp_path):
    workdir_a, params_a = run_a
    config = tiny(2, init_from=str(workdir_a), mesh="fsdp=-1")
    config = dataclasses.replace(
        config, optimizer=dataclasses.replace(config.optimizer, name="muon")
    )
    after = {}
    messages = []

    def hook(step, state):
        after[step] = (jax.device_get(state.params), int(state.step))

    result = train.run(config, str(tmp_path), hooks=[hook], log=messages.append)
    assert result.status == "completed" and result.start_step == 0
    assert_trees_equal(after[1][0], params_a)  # learning rate 0 at step 1: the initial params
    assert after[1][1] == 1  # the step counts from 0, not from A's 4
    assert any(f"parameters initialised from {workdir_a}/checkpoints/4" in m for m in messages)
    records = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["event"] == "train"]
    assert [r["step"] for r in records] == [1, 2] and records[0]["learning_rate"] == 0.0
    assert records[0]["tokens"] == 8 * 32  # tokens seen by B alone (A saw 4 batches)

    # Re-running resumes B's own checkpoint (step 2); init_from is ignored.
    messages.clear()
    resumed = train.run(
        dataclasses.replace(config, train=dataclasses.replace(config.train, steps=3)),
        str(tmp_path),
        log=messages.append,
    )
    assert resumed.start_step == 2 and resumed.step == 3
    assert any("resuming this run's own checkpoint (step 2)" in m for m in messages)
    assert not any("parameters initialised from" in m for m in messages)


def test_init_from_errors_name_the_path_or_the_first_differing_parameter(run_a, tmp_path):
    workdir_a, _ = run_a
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(train.SetupError, match=r"train.init_from=.*no checkpoint in"):
        train.run(tiny(2, init_from=str(empty)), str(tmp_path / "b1"), log=lambda _: None)

    base = tiny(2, init_from=str(workdir_a / "checkpoints"))
    gqa = dataclasses.replace(base.model.attention["gqa"], num_kv_heads=4)
    other = dataclasses.replace(base, model=dataclasses.replace(base.model, attention={"gqa": gqa}))
    with pytest.raises(
        train.SetupError,
        match=r"params/group_0/layer_0/attention/k_proj/kernel: shape \(32, 2, 8\) in the "
        r"checkpoint, \(32, 4, 8\) in this model",
    ):
        train.run(other, str(tmp_path / "b2"), log=lambda _: None)

    status = train.main(
        ["--preset=tiny", f"--workdir={tmp_path / 'b3'}", f"--train.init_from={tmp_path / 'no'}"]
    )
    assert status == 2
