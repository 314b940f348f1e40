"""End-to-end tests of `python -m experiments.train` in subprocesses (tiny preset, 20 steps).

One module fixture runs, with a shared persistent compilation cache so that only the first
process compiles:
  straight  20 steps in one go (checkpoints 10 and 20);
  killed    paused by a hook right after checkpoint 10, SIGKILLed, then resumed to 20 on
            8 devices and, from a copy, on 4 devices;
  sigterm   SIGTERM after step 11, then resumed to 20;
  nan       the parameters poisoned after step 12, so step 13's loss is NaN;
  rerun     the straight command again, once complete.
The tests then compare checkpoints, metrics and outputs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import checkpoint as ckpt
from experiments import generate as generate_cli
from experiments import presets
from experiments.config import run_from_dict
from experiments.data import make_datasets
from experiments.metrics import read_metrics
from experiments.optimizer import build_optimizer
from jaxmodels import training
from sharding import make_mesh

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600

# Runs the CLI with a test hook chosen by TRAIN_TEST_HOOK:
#   pause_at=K   after step K (and its checkpoint), print PAUSED and sleep (to be SIGKILLed)
#   term_after=K from step K on, print READY once and sleep 1 s per step (to be SIGTERMed)
#   nan_at=K     after step K, replace the parameters by NaN
DRIVER = r"""
import os, sys, time
from experiments import train

kind, _, arg = os.environ.get("TRAIN_TEST_HOOK", "").partition("=")

def hook(step, state):
    if kind == "pause_at" and step == int(arg):
        print("PAUSED", step, flush=True)
        time.sleep(3600)
    if kind == "term_after" and step >= int(arg):
        if step == int(arg):
            print("READY", step, flush=True)
        time.sleep(1.0)
    if kind == "nan_at" and step == int(arg):
        import jax, jax.numpy as jnp
        return state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    return None

sys.exit(train.main(sys.argv[1:], hooks=[hook]))
"""


class Job:
    """A training subprocess whose output is collected by a reader thread."""

    def __init__(self, workdir, *, cache, devices=8, hook="", quiet=True):
        env = dict(os.environ)
        # the suite's XLA flags (tests/conftest.py: unoptimised LLVM code unless overridden),
        # with this run's device count
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
            TRAIN_TEST_HOOK=hook,
            PYTHONUNBUFFERED="1",
        )
        args = ["--preset", "tiny", "--workdir", str(workdir), "--train.progress=false"]
        if quiet:  # no plot, no sample: the straight run checks those outputs
            args += ["--train.plot=false", "--train.sample_tokens=0"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate, what: str):
        deadline = time.monotonic() + TIMEOUT
        while not predicate():
            if self.proc.poll() is not None:
                self.reader.join(5)
                raise AssertionError(f"process exited before {what}:\n{self.output}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output}")
            time.sleep(0.05)

    def finish(self) -> int:
        rc = self.proc.wait(TIMEOUT)
        self.reader.join(10)
        return rc


def committed(workdir, step) -> bool:
    """Orbax renames the temporary directory to `<step>` only once the save is complete."""
    return (Path(workdir) / "checkpoints" / str(step) / "commit_success.txt").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_job")
    cache = root / "xla_cache"
    dirs = {n: root / n for n in ("straight", "killed", "killed4", "sigterm", "nan")}
    out = {"dirs": dirs}

    straight = Job(dirs["straight"], cache=cache, quiet=False)
    out["straight_rc"] = straight.finish()
    out["straight_out"] = straight.output
    assert out["straight_rc"] == 0, straight.output

    killed = Job(dirs["killed"], cache=cache, hook="pause_at=10")
    sigterm = Job(dirs["sigterm"], cache=cache, hook="term_after=11")
    nan = Job(dirs["nan"], cache=cache, hook="nan_at=12")

    killed.wait_for(lambda: "PAUSED 10" in killed.output and committed(dirs["killed"], 10), "ckpt")
    killed.proc.send_signal(signal.SIGKILL)
    out["killed_rc"] = killed.finish()
    shutil.copytree(dirs["killed"], dirs["killed4"])

    sigterm.wait_for(lambda: "READY 11" in sigterm.output, "step 11")
    sigterm.proc.send_signal(signal.SIGTERM)
    out["sigterm_rc"], out["sigterm_out"] = sigterm.finish(), sigterm.output
    out["sigterm_steps"] = sorted(
        int(p.name) for p in (dirs["sigterm"] / "checkpoints").iterdir() if p.name.isdigit()
    )
    out["nan_rc"], out["nan_out"] = nan.finish(), nan.output

    resumes = {
        "killed": Job(dirs["killed"], cache=cache),
        "killed4": Job(dirs["killed4"], cache=cache, devices=4),
        "sigterm": Job(dirs["sigterm"], cache=cache),
        "rerun": Job(dirs["straight"], cache=cache),
    }
    for name, job in resumes.items():
        out[f"{name}_resume_rc"] = job.finish()
        out[f"{name}_resume_out"] = job.output
    return out


def load_state(workdir, step, mesh=None):
    with open(Path(workdir) / "config.json") as f:
        config = run_from_dict(json.load(f))
    tx = build_optimizer(config.optimizer, config.train.steps)
    mesh = mesh or make_mesh("data=-1")
    abstract, _ = training.abstract_train_state(config.model, tx, mesh, seq_len=config.data.seq_len)
    checkpointer = ckpt.Checkpointer(str(workdir))
    try:
        state, meta = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    return state, meta


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def train_losses(workdir):
    return {
        r["step"]: r["loss"]
        for r in read_metrics(Path(workdir) / "metrics.jsonl")
        if r["event"] == "train"
    }


def test_outputs_of_a_run(runs):
    workdir = runs["dirs"]["straight"]
    assert "done: 20 steps" in runs["straight_out"]
    saved = run_from_dict(json.loads((workdir / "config.json").read_text()))
    assert saved.model == presets.get_preset("tiny").model
    assert saved.train.progress is False
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == [5, 10, 15, 20]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[1]["val_bpb"] < evals[0]["val_bpb"] < 8.0  # learning, from log2(264) = 8.04
    train = [r for r in records if r["event"] == "train"]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = (workdir / "sample.txt").read_text()
    assert sample.startswith("def ") and len(sample) > len("def ")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]


def test_rerun_of_a_finished_run_resumes_instead_of_restarting(runs):
    out = runs["rerun_resume_out"]
    assert runs["rerun_resume_rc"] == 0, out
    assert "resuming from step 20 of 20" in out and "already complete" in out
    assert "first step" not in out  # nothing was trained again


def test_resume_after_sigkill_is_bitwise_exact(runs):
    assert runs["killed_rc"] == -signal.SIGKILL
    out = runs["killed_resume_out"]
    assert runs["killed_resume_rc"] == 0, out
    assert "resuming from step 10 of 20" in out
    straight, _ = load_state(runs["dirs"]["straight"], 20)
    resumed, meta = load_state(runs["dirs"]["killed"], 20)
    assert_trees_equal(straight, resumed)  # params, optimizer state and step, bit for bit
    assert meta["tokens"] == 20 * 8 * 32
    # The resumed iterator continued the exact batch sequence: the same loss at every step.
    assert train_losses(runs["dirs"]["killed"]) == train_losses(runs["dirs"]["straight"])


def test_sigterm_saves_a_restorable_checkpoint_and_resume_is_exact(runs):
    out = runs["sigterm_out"]
    assert runs["sigterm_rc"] == 0, out
    stopped = [s for s in runs["sigterm_steps"] if s not in (10, 20)]
    assert len(stopped) == 1 and 11 <= stopped[0] < 20, runs["sigterm_steps"]
    k = stopped[0]
    assert f"stopped by SIGTERM at step {k}" in out
    # Restorable: state at step k, and the data iterator positioned after k batches.
    with open(runs["dirs"]["sigterm"] / "config.json") as f:
        config = run_from_dict(json.load(f))
    it, _, _ = make_datasets(config.data)
    tx = build_optimizer(config.optimizer, config.train.steps)
    abstract, _ = training.abstract_train_state(
        config.model, tx, make_mesh("data=-1"), seq_len=config.data.seq_len
    )
    checkpointer = ckpt.Checkpointer(str(runs["dirs"]["sigterm"]))
    try:
        state, meta = checkpointer.restore(k, abstract, data_iterator=it)
    finally:
        checkpointer.close()
    assert int(state.step) == k == meta["step"]
    fresh, _, _ = make_datasets(config.data)
    for _ in range(k):
        next(fresh)
    for _ in range(2):
        expected, got = next(fresh), next(it)
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key])
    # And the resumed run ends exactly where the straight one did.
    assert runs["sigterm_resume_rc"] == 0, runs["sigterm_resume_out"]
    assert f"resuming from step {k} of 20" in runs["sigterm_resume_out"]
    assert_trees_equal(
        load_state(runs["dirs"]["straight"], 20)[0], load_state(runs["dirs"]["sigterm"], 20)[0]
    )


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(runs):
    out = runs["nan_out"]
    assert runs["nan_rc"] == 1, out
    assert "non-finite loss at step 13" in out
    assert "last good checkpoint is step 10" in out
    ckpt_dir = runs["dirs"]["nan"] / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["10"]  # nothing newer, no tmp dirs
    good, _ = load_state(runs["dirs"]["nan"], 10)
    assert_trees_equal(good, load_state(runs["dirs"]["straight"], 10)[0])
    steps = [r["step"] for r in read_metrics(runs["dirs"]["nan"] / "metrics.jsonl")]
    assert max(steps) <= 12  # no record was written from the poisoned steps


def test_resume_on_a_different_mesh(runs):
    """Saved on 8 devices (data=8), resumed on 4 (data=4): restore reshards the state."""
    out = runs["killed4_resume_out"]
    assert runs["killed4_resume_rc"] == 0, out
    assert "resuming from step 10 of 20" in out and "over 4 cpu devices" in out
    straight, _ = load_state(runs["dirs"]["straight"], 20)
    resumed, _ = load_state(runs["dirs"]["killed4"], 20)
    # Different device counts sum gradients in a different order: equal to fp32 tolerance.
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
    a, b = train_losses(runs["dirs"]["straight"]), train_losses(runs["dirs"]["killed4"])
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-4 for s in a)


def test_generate_cli_samples_from_a_saved_run(runs, capsys):
    workdir = str(runs["dirs"]["straight"])
    args = ["--workdir", workdir, "--prompt", "import ", "--max_new_tokens", "12"]
    assert generate_cli.main([*args, "--temperature", "0"]) == 0
    first = capsys.readouterr()
    assert generate_cli.main([*args, "--temperature", "0"]) == 0
    second = capsys.readouterr()
    assert first.out == second.out and first.out.startswith("import ")
    assert f"{workdir} at step 20" in first.err
    assert generate_cli.main(["--workdir", str(runs["dirs"]["straight"] / "nope")]) == 1
    assert "config.json not found" in capsys.readouterr().err
