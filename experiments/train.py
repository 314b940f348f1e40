"""The main job: `python -m experiments.train [--preset NAME] [--workdir DIR] [--FIELD=VALUE ...]`.

Trains a decoder (the jitted, sharded train step of `jaxmodels.training` on the mesh of
`--train.mesh`), evaluates bits per byte on the held-out split, and writes into the workdir:

    config.json      the resolved RunConfig (read back by experiments.generate)
    checkpoints/     orbax checkpoints (state, grain iterator, meta), the newest K kept
    metrics.jsonl    one JSON record per log / eval event
    loss.png         train and validation bits per byte, rewritten at every evaluation
    sample.txt       a text sample generated with the KV cache at the end

Re-running the same command resumes from the newest checkpoint; `--train.init_from=RUN` starts a
fresh workdir from another run's parameters instead of a random init (stage chaining; the
workdir's own checkpoints take precedence). SIGTERM / SIGINT finish the current step, save a
checkpoint and exit (status 0). A non-finite loss or gradient stops the run (status 1) naming
the step; that state is never saved. `--help` lists every config field.

In Python, `run(config, workdir)` does the same and returns a `RunResult`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import sharding
from experiments import checkpoint as ckpt
from experiments import cli
from experiments.config import RunConfig, run_from_dict, run_to_dict
from experiments.data import NUM_BYTES, make_datasets
from experiments.generate import sample_text
from experiments.metrics import MetricsLog
from experiments.optimizer import build_optimizer, learning_rate_schedule
from experiments.plotting import plot_loss_curve
from jaxmodels import training
from jaxmodels.model import Decoder

# Data fields that may change when a run is resumed (they do not alter the training stream).
RESUMABLE_DATA_FIELDS = ("num_threads", "val_batches")

Hook = Callable[[int, Any], Any]


class SetupError(RuntimeError):
    """The run cannot start: the config does not match the workdir, the mesh or the devices."""


@dataclasses.dataclass
class RunResult:
    """What `run` returns.

    Attributes:
      status: "completed", "interrupted" (by a signal; checkpoint saved) or "nonfinite".
      step: the last step computed.
      start_step: the step the run started or resumed from.
      state: the final train state (for "nonfinite", the last finite state is on disk only).
      val_bpb: the last validation bits per byte (None before any evaluation).
      sample: the generated text sample ("" if none).
      message: the closing message.
    """

    status: str
    step: int
    start_step: int
    state: Any
    val_bpb: float | None
    sample: str
    message: str


class _StopFlag:
    """SIGTERM / SIGINT handler: records the signal; the loop stops after the current step.

    A second SIGINT raises KeyboardInterrupt (for an impatient Ctrl-C).
    """

    def __init__(self, log: Callable[[str], None]):
        self.signum: int | None = None
        self._log = log
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self._log(
            f"received {signal.Signals(signum).name}: finishing this step, then saving a "
            "checkpoint (Ctrl-C again aborts without saving)"
        )

    def requested(self) -> bool:
        requested = self.signum is not None
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils

            requested = bool(np.max(multihost_utils.process_allgather(np.int32(requested))))
        return requested


def check_resumable(saved: RunConfig, config: RunConfig, workdir: str) -> list[str]:
    """Raises SetupError if `config` cannot continue the run saved in `workdir`.

    Model, data and optimizer must match (except `RESUMABLE_DATA_FIELDS`); returns the
    changed `train.*` fields, which are allowed (e.g. more steps).
    """
    old, new = run_to_dict(saved), run_to_dict(config)
    for name in RESUMABLE_DATA_FIELDS:
        old["data"].pop(name, None)
        new["data"].pop(name, None)
    diffs = []
    for section in ("model", "data", "optimizer"):
        diffs += _diff(old[section], new[section], section)
    if diffs:
        raise SetupError(
            f"{workdir} holds a run with a different configuration ({'; '.join(diffs[:6])}). "
            "Re-run with the same --preset and flags to resume it, or use another --workdir."
        )
    return _diff(old["train"], new["train"], "train")


def _diff(old: Any, new: Any, where: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{where}.{key}")
        return out
    return [] if old == new else [f"{where}: saved {old!r}, now {new!r}"]


def make_run_mesh(config: RunConfig) -> jax.sharding.Mesh:
    """The mesh of `train.mesh` over all devices; SetupError if it or the batch does not fit."""
    try:
        mesh = sharding.make_mesh(config.train.mesh)
    except ValueError as e:
        raise SetupError(
            f"train.mesh={config.train.mesh!r} does not fit the {jax.device_count()} devices: {e}"
        ) from None
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % ways:
        raise SetupError(
            f"data.batch_size={config.data.batch_size} is not divisible by the mesh's "
            f"data x fsdp size {ways} (train.mesh={config.train.mesh!r}: {dict(mesh.shape)}); "
            f"use a multiple of {ways}"
        )
    return mesh


def make_eval_step(config: RunConfig, mesh, param_shardings, batch_shardings):
    """Jitted `(params, batch) -> {nats, tokens, bytes, correct}`, each summed over the batch."""
    model = Decoder(config.model)

    def eval_step(params, batch):
        logits_BTV, _ = model.apply(params, batch["inputs"])
        targets_BT, mask_BT = batch["targets"], batch["mask"]
        nats, tokens = training.cross_entropy(logits_BTV, targets_BT, mask_BT)
        correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT) * mask_BT
        return {
            "nats": nats,
            "tokens": tokens,
            "bytes": jnp.sum(mask_BT * (targets_BT < NUM_BYTES)),
            "correct": jnp.sum(correct_BT),
        }

    return sharding.sharded_jit(
        eval_step,
        mesh=mesh,
        in_shardings=(param_shardings, batch_shardings),
        out_shardings=jax.sharding.NamedSharding(mesh, jax.P()),
    )


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """This host's rows of a batch -> global arrays sharded over the batch mesh axes."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


class _Run:
    """One invocation of the training job (see `run`)."""

    def __init__(self, config: RunConfig, workdir: str, hooks: Sequence[Hook], log):
        self.config = config
        self.tc = config.train
        self.workdir = os.path.abspath(workdir)
        self.hooks = tuple(hooks)
        self.is_main = jax.process_index() == 0
        self._log = log
        self.val_bpb: float | None = None
        self.bar = None
        self.postfix: dict[str, str] = {}

    # -- messages and files --------------------------------------------------------------------

    def emit(self, message: str) -> None:
        if not self.is_main:
            return
        if self._log is not None:
            self._log(message)
        else:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    # -- setup ---------------------------------------------------------------------------------

    def setup(self, checkpointer: ckpt.Checkpointer) -> None:
        config, tc = self.config, self.tc
        self.checkpointer = checkpointer
        self.mesh = make_run_mesh(config)
        self.train_iter, self.val_batches_fn, self.info = make_datasets(config.data)
        self.tx = build_optimizer(config.optimizer, tc.steps, config.model)
        self.schedule = learning_rate_schedule(config.optimizer, tc.steps)
        if checkpointer.steps() and os.path.exists(self.path("config.json")):
            with open(self.path("config.json")) as f:
                saved = run_from_dict(json.load(f))
            changed = check_resumable(saved, config, self.workdir)
            if changed:
                self.emit(f"resuming with changed loop settings: {'; '.join(changed)}")
        try:
            abstract, self.shardings = training.abstract_train_state(
                config.model, self.tx, self.mesh, seq_len=config.data.seq_len
            )
        except ValueError as e:
            if "mesh ax" not in str(e):  # not a sharding-rule error (sharding/rules.py)
                raise
            raise SetupError(f"the model does not fit train.mesh={tc.mesh!r}: {e}") from None
        if self.is_main:
            with open(self.path("config.json"), "w") as f:
                json.dump(run_to_dict(config), f, indent=2)

        initial_position = self.train_iter.get_state()
        restored = checkpointer.restore_latest(abstract, self.train_iter)
        if restored is None:
            # A failed restore may have moved the iterator before its state failed to load.
            self.train_iter.set_state(initial_position)
            self.rng = jax.random.key(tc.seed)
            if tc.init_from is None:
                self.state, _ = training.init_train_state(
                    config.model, self.tx, self.rng, self.mesh, seq_len=config.data.seq_len
                )
            else:
                self.state = self.state_from_run(tc.init_from, abstract.params)
            self.start_step, self.tokens_seen, self.elapsed0 = 0, 0, 0.0
        else:
            self.start_step, self.state, meta = restored
            if tc.init_from is not None:
                self.emit(
                    f"resuming this run's own checkpoint (step {self.start_step}); "
                    f"train.init_from={tc.init_from!r} applies only to a fresh run"
                )
            self.rng = ckpt.rng_from_json(meta["rng"])
            self.tokens_seen = int(meta.get("tokens", 0))
            self.elapsed0 = float(meta.get("elapsed_s", 0.0))
        self.last_saved = self.start_step if restored is not None else None
        self.metrics = MetricsLog(
            self.path("metrics.jsonl"),
            keep_until_step=self.start_step if restored is not None else None,
            write=self.is_main,
        )

        B, T = config.data.batch_size, config.data.seq_len
        example = {
            "inputs": np.zeros((B, T), np.int32),
            "targets": np.zeros((B, T), np.int32),
            "mask": np.zeros((B, T), np.float32),
        }
        self.batch_shardings = training.batch_shardings(self.mesh, example)
        self.train_step = training.build_trainer(
            config.model,
            self.tx,
            self.mesh,
            self.shardings,
            example,
            track_max_logits=config.optimizer.qk_clip_threshold is not None,
        )
        self.eval_step = make_eval_step(
            config, self.mesh, self.shardings.params, self.batch_shardings
        )
        self.tokens_per_step = B * T
        self._describe(restored is not None)

    def state_from_run(self, source: str, abstract_params: Any) -> training.TrainState:
        """Step 0 with the parameters of `source`'s checkpoint and a fresh optimizer state."""
        try:
            step, params, where = ckpt.restore_params(source, abstract_params)
        except ckpt.CheckpointError as e:
            raise SetupError(f"train.init_from={source!r}: {e}") from None
        self.emit(f"parameters initialised from {where} (step {step}); optimizer state is fresh")
        return training.train_state_from_params(params, self.tx, self.shardings, self.mesh)

    def _describe(self, resumed: bool) -> None:
        cfg, info = self.config, self.info
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
        data = f"{info.name}: {info.train_bytes / 1e6:.1f} MB train"
        data += f", {info.val_bytes / 1e3:.0f} kB val"
        if info.unigram_bpb is not None:
            data += f", unigram baseline {info.unigram_bpb:.2f} bits/byte"
        where = f"resuming from step {self.start_step}" if resumed else "starting from step 0"
        tau = cfg.optimizer.qk_clip_threshold
        qk_clip = "" if tau is None else f", QK-Clip at max logit {tau:g}"
        self.emit(
            f"run {self.workdir}: {where} of {self.tc.steps}\n"
            f"  model: {n_params / 1e6:.2f}M parameters, {cfg.model.num_layers} layers, width "
            f"{cfg.model.hidden_size}, pattern {','.join(cfg.model.layer_pattern)}\n"
            f"  data: {data}; batch {cfg.data.batch_size} x {cfg.data.seq_len} tokens\n"
            f"  optimizer: {cfg.optimizer.name}, lr {cfg.optimizer.learning_rate:g} "
            f"({cfg.optimizer.schedule}, warmup {cfg.optimizer.warmup_steps}){qk_clip}\n"
            f"  mesh: {dict(self.mesh.shape)} over {jax.device_count()} "
            f"{jax.devices()[0].platform} devices"
        )

    # -- pieces of the loop --------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    def flush(self, pending: list, window_start: float, steps: int) -> int | None:
        """Fetches the pending steps' metrics, returns the first non-finite step (or None),
        else writes one train record averaging them. Tokens/s counts the `steps` steps
        dispatched since `window_start` (the fetch waits for them to finish)."""
        fetched = jax.device_get([m for _, m, _ in pending])
        seconds = time.perf_counter() - window_start
        for (step, _, _), m in zip(pending, fetched, strict=True):
            if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
                self.bad_metrics = m
                return step
        step = pending[-1][0]
        loss = float(np.mean([m["loss"] for m in fetched]))
        bytes_per_token = float(np.mean([b for _, _, b in pending]))
        record = {
            "event": "train",
            "step": step,
            "loss": loss,
            "bpb": loss / math.log(2) / max(bytes_per_token, 1e-9),
            "grad_norm": float(fetched[-1]["grad_norm"]),
            "param_norm": float(fetched[-1]["param_norm"]),
            "learning_rate": float(self.schedule(step - 1)),
            "tokens": self.tokens_seen,
            "time_s": round(self.elapsed(), 3),
        }
        if "max_logit" in fetched[-1]:  # QK-Clip: the largest pre-clip logit of the window
            record["max_logit"] = float(np.max([m["max_logit"] for m in fetched]))
        if steps > 0 and seconds > 0:
            record["tokens_per_s"] = steps * self.tokens_per_step / seconds
        self.metrics.add(record)
        self.postfix.update(loss=f"{loss:.3f}", bpb=f"{record['bpb']:.2f}")
        if "tokens_per_s" in record:
            self.postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
        return None

    def evaluate(self, step: int) -> None:
        totals = {"nats": 0.0, "tokens": 0.0, "bytes": 0.0, "correct": 0.0}
        for batch in self.val_batches_fn():
            batch = to_global(batch, self.batch_shardings)
            out = jax.device_get(self.eval_step(self.state.params, batch))
            for k in totals:
                totals[k] += float(out[k])
        bits = totals["nats"] / math.log(2)
        self.val_bpb = bits / max(totals["bytes"], 1.0)
        record = {
            "event": "eval",
            "step": step,
            "val_loss": totals["nats"] / max(totals["tokens"], 1.0),
            "val_bpb": self.val_bpb,
            "val_accuracy": totals["correct"] / max(totals["tokens"], 1.0),
            "time_s": round(self.elapsed(), 3),
        }
        if self.info.unigram_bpb is not None:
            record["unigram_bpb"] = self.info.unigram_bpb
        self.metrics.add(record)
        self.postfix["val"] = f"{self.val_bpb:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
        baseline = (
            f" (unigram {self.info.unigram_bpb:.2f})" if self.info.unigram_bpb is not None else ""
        )
        self.emit(
            f"step {step}: validation {self.val_bpb:.3f} bits/byte{baseline}, "
            f"accuracy {record['val_accuracy']:.3f}"
        )
        if self.tc.plot and self.is_main:
            plot_loss_curve(
                self.metrics.records,
                self.path("loss.png"),
                baseline=self.info.unigram_bpb,
                title=os.path.basename(self.workdir),
            )

    def save(self, step: int) -> bool:
        """Saves a checkpoint of the current state; False (nothing saved) if it is not finite."""
        if not ckpt.tree_is_finite(self.state.params):
            return False
        meta = {
            "rng": ckpt.rng_to_json(self.rng),
            "seed": self.tc.seed,
            "tokens": self.tokens_seen,
            "elapsed_s": round(self.elapsed(), 3),
        }
        self.checkpointer.save(step, self.state, self.train_iter, meta)
        self.last_saved = step
        return True

    def write_sample(self) -> str:
        tc = self.tc
        if not tc.sample_prompt or tc.sample_tokens == 0:
            return ""
        text = sample_text(
            self.state.params,
            self.config.model,
            tc.sample_prompt,
            max_new_tokens=tc.sample_tokens,
            temperature=tc.sample_temperature,
            top_k=tc.sample_top_k,
            top_p=tc.sample_top_p,
            seed=tc.seed,
        )[0]
        full = tc.sample_prompt + text
        if self.is_main:
            with open(self.path("sample.txt"), "w") as f:
                f.write(full + "\n")
        self.emit(f"sample ({tc.sample_tokens} tokens, temperature {tc.sample_temperature}):")
        self.emit(full)
        return full

    def nonfinite(self, step: int) -> RunResult:
        m = getattr(self, "bad_metrics", {})
        detail = ", ".join(f"{k}={float(m[k])}" for k in ("loss", "grad_norm") if k in m)
        kept = (
            f"the last good checkpoint is step {self.last_saved} in {self.checkpointer.directory}"
            if self.last_saved is not None
            else "no checkpoint was written"
        )
        message = (
            f"non-finite loss at step {step} ({detail or 'parameters not finite'}); stopping "
            f"without saving this state: {kept}. Lower optimizer.learning_rate or raise "
            "optimizer.warmup_steps, then re-run to resume from that checkpoint."
        )
        self.emit(message)
        return RunResult("nonfinite", step, self.start_step, self.state, self.val_bpb, "", message)

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> RunResult:
        tc = self.tc
        step = self.start_step
        self.t_start = time.perf_counter()
        if step >= tc.steps:
            message = (
                f"run already complete at step {step} of {tc.steps}: nothing to train "
                f"(raise --train.steps to continue it; outputs in {self.workdir})"
            )
            self.emit(message)
            return RunResult("completed", step, self.start_step, self.state, None, "", message)
        self.bar = tqdm(
            total=tc.steps,
            initial=step,
            unit="step",
            disable=not (tc.progress and self.is_main),
            dynamic_ncols=True,
            mininterval=0.5,
            file=sys.stderr,
        )
        pending: list = []
        window_start, window_steps = time.perf_counter(), 0
        first = True
        with self.bar, _StopFlag(self.emit) as stop:
            while step < tc.steps:
                host_batch = next(self.train_iter)
                batch = to_global(host_batch, self.batch_shardings)
                self.state, metrics = self.train_step(self.state, batch)
                step += 1
                self.tokens_seen += self.tokens_per_step
                mask = host_batch["mask"]
                byte_ratio = float((mask * (host_batch["targets"] < NUM_BYTES)).sum()) / max(
                    float(mask.sum()), 1.0
                )
                pending.append((step, metrics, byte_ratio))
                if first:  # the first step includes compilation: keep it out of tokens/s
                    jax.block_until_ready(metrics)
                    seconds = time.perf_counter() - window_start
                    self.emit(f"first step (compilation included) took {seconds:.1f} s")
                    window_start, window_steps, first = time.perf_counter(), 0, False
                else:
                    window_steps += 1
                self.bar.update(1)

                stopping = stop.requested()
                last = step == tc.steps
                do_eval = step % tc.eval_every == 0 or last
                do_save = step % tc.checkpoint_every == 0 or last or stopping
                flush = step % tc.log_every == 0 or do_eval or do_save
                if flush:
                    bad = self.flush(pending, window_start, window_steps)
                    pending = []
                    if bad is not None:
                        return self.nonfinite(bad)
                if do_eval:
                    self.evaluate(step)
                if do_save and self.last_saved != step and not self.save(step):
                    return self.nonfinite(step)
                if flush:  # the next tokens/s window starts after evaluation and saving
                    window_start, window_steps = time.perf_counter(), 0
                if stopping:
                    self.checkpointer.wait()
                    name = signal.Signals(stop.signum).name if stop.signum else "stop request"
                    message = (
                        f"stopped by {name} at step {step}: checkpoint saved in "
                        f"{self.checkpointer.directory}; re-run the same command to resume"
                    )
                    self.emit(message)
                    return RunResult(
                        "interrupted", step, self.start_step, self.state, self.val_bpb, "", message
                    )
                for hook in self.hooks:  # after this step's checkpoint
                    replaced = hook(step, self.state)
                    if replaced is not None:
                        self.state = replaced
        self.checkpointer.wait()
        sample = self.write_sample()
        baseline = self.info.unigram_bpb
        vs = f" vs unigram {baseline:.3f}" if baseline is not None else ""
        message = (
            f"done: {step} steps in {self.elapsed():.0f} s, validation {self.val_bpb:.3f} "
            f"bits/byte{vs}; outputs in {self.workdir}"
        )
        self.emit(message)
        return RunResult(
            "completed", step, self.start_step, self.state, self.val_bpb, sample, message
        )


def run(
    config: RunConfig,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

    Args:
      config: the run configuration.
      workdir: the run directory (created if needed).
      hooks: each called as `hook(step, state)` after every step, after that step's
        checkpoint if any; a hook that returns a train state replaces the state (tests use
        this to inject faults).
      log: message sink (default: stdout on process 0).

    Raises:
      SetupError: the config does not fit the workdir, the mesh or the devices.
    """
    job = _Run(config, workdir, hooks, log)
    os.makedirs(job.workdir, exist_ok=True)
    checkpointer = ckpt.Checkpointer(
        job.workdir,
        keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpointing,
        log=job.emit,
    )
    try:
        job.setup(checkpointer)
        return job.train()
    finally:
        checkpointer.close()


def main(argv: list[str] | None = None, *, hooks: Sequence[Hook] = ()) -> int:
    """The command line (see the module docstring); returns the exit status."""
    try:
        args = cli.parse_args(argv)
    except cli.CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.help:
        print(args.help_text)
        return 0
    if args.distributed:
        import sharding.distributed

        sharding.distributed.initialize()
    try:
        result = run(args.config, args.workdir, hooks=hooks)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if result.status == "nonfinite" else 0


if __name__ == "__main__":
    sys.exit(main())
