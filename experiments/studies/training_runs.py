"""Training runs for the studies: run the main job on a config, return its evaluation curve.

Every training study (residual variants, Muon vs AdamW, the hybrid preset, MQAR) trains through
the same path as ``python -m experiments.train`` (:func:`experiments.train.run`) in a scratch
workdir and reads the ``eval`` records of its ``metrics.jsonl``, so a study measures exactly
what the main job does. Checkpoints and the text sample are switched off (a study keeps only
its JSON); the workdir is deleted afterwards unless the caller keeps it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any

import jax

from experiments import train
from experiments.config import RunConfig


def study_parser(doc: str, name: str, *, steps: int = 320) -> argparse.ArgumentParser:
    """The command line every training study shares: ``--steps`` (per run), ``--eval-every`` and
    ``--out`` (the folder for ``<name>.json`` and ``<name>.png``); the study adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps, help=f"steps per run (default {steps})")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--out", help=f"write {name}.json and {name}.png in this folder")
    return parser


def study_config(config: RunConfig, *, steps: int | None = None, eval_every: int | None = None):
    """``config`` set up for a study: no sample, no progress bar or plot, one checkpoint at the
    end only (the job always writes one), and optionally another step budget / eval interval.
    With another step budget the warmup keeps its share of the run (the schedule is the same
    shape, compressed or stretched)."""
    steps = config.train.steps if steps is None else steps
    warmup = round(config.optimizer.warmup_steps * steps / config.train.steps)
    eval_every = config.train.eval_every if eval_every is None else eval_every
    train_config = dataclasses.replace(
        config.train,
        steps=steps,
        eval_every=eval_every,
        checkpoint_every=steps,
        keep_checkpoints=1,
        async_checkpointing=False,
        progress=False,
        plot=False,
        sample_prompt="",
    )
    optimizer = dataclasses.replace(config.optimizer, warmup_steps=warmup)
    return dataclasses.replace(config, train=train_config, optimizer=optimizer)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``<workdir>/metrics.jsonl``, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_curve(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation records: ``step``, ``val_bpb``, ``val_loss``, ``val_accuracy``, ``time_s``."""
    keys = ("step", "val_bpb", "val_loss", "val_accuracy", "time_s")
    return [{k: r[k] for k in keys if k in r} for r in records if r.get("event") == "eval"]


def first_step_reaching(
    curve: list[dict[str, Any]], target: float, key: str = "val_bpb", higher_is_better=False
) -> float | None:
    """First step at which ``point[key]`` reaches ``target`` (at or below it for a loss, at or
    above it with ``higher_is_better``, e.g. an accuracy), linear between evaluations; None if it
    never does. When the first evaluation already reaches it, that evaluation's step (an upper
    bound)."""
    sign = -1.0 if higher_is_better else 1.0
    prev = None
    for point in curve:
        value = sign * point[key]
        if value <= sign * target:
            if prev is None:
                return float(point["step"])
            before = sign * prev[key]
            frac = (before - sign * target) / (before - value)
            return prev["step"] + frac * (point["step"] - prev["step"])
        prev = point
    return None


def train_and_measure(
    config: RunConfig, *, workdir: str | None = None, keep_workdir: bool = False
) -> dict[str, Any]:
    """Trains ``config`` from scratch with the main job and returns what a study reports.

    Returns:
      ``{"curve": eval records, "final": the last eval record, "params": parameter count,
      "wall_s": wall seconds, "cpu_s": process CPU seconds, "status": the run's status,
      "state": the final train state}``. Wall and CPU time include compilation.
    """
    scratch = workdir is None
    workdir = tempfile.mkdtemp(prefix="study-") if scratch else workdir
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = train.run(config, workdir, log=lambda message: None)
        curve = eval_curve(read_metrics(workdir))
    finally:
        if scratch and not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if result.status != "completed":
        raise RuntimeError(f"the study run stopped early: {result.status}: {result.message}")
    return {
        "curve": curve,
        "final": curve[-1],
        "params": int(sum(x.size for x in jax.tree.leaves(result.state.params))),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "status": result.status,
        "state": result.state,
    }
