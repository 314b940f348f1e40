"""Rerun the studies of ``docs/results.md`` in order, one process per command, and time them.

    python -m experiments.studies.reproduce --out docs/results              # all six studies
    python -m experiments.studies.reproduce --only 1,5 --out docs/results   # the CPU part
    python -m experiments.studies.reproduce --dry-run                       # list the commands
    bash experiments/studies/gpu.sh                                         # on a CUDA machine

The commands are exactly the ones ``docs/results.md`` lists under each study
(``tests/experiments/test_reproduce.py`` keeps the two the same). Studies 1 (cache pytrees
traced with ``jax.eval_shape``) and 5 (attention timed on the CPU: the claim it checks is about
CPU cost, so it always runs with ``JAX_PLATFORMS=cpu``) take about 4 minutes on 2 idle CPU
cores. The training studies 2, 3, 4 and 6 take about 3.5 hours there (``cpu_minutes``); they are
what ``gpu.sh`` runs on an accelerator. Each command runs as
``python -m experiments.studies.<name>`` in its own process, so one study's compiled programs
and device memory never reach the next.

Writes ``<out>/reproduce.json``: the backend the training studies ran on, and per study its
commands, wall seconds and exit status. A failed study does not stop the others; the exit
status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from typing import Any

from experiments.studies.output import write_json

OUT = "{out}"  # placeholder for --out in a study's arguments


@dataclasses.dataclass(frozen=True)
class Study:
    """One study of ``docs/results.md``: ``python -m experiments.studies.<name> <arguments>``
    for each tuple of ``arguments`` (``OUT`` stands for the output folder)."""

    number: int
    name: str
    arguments: tuple[tuple[str, ...], ...]
    cpu_minutes: float  # wall time measured on the 2-core CPU machine (docs/results.md)
    cpu_only: bool = False  # runs on the CPU even where an accelerator is present


STUDIES = (
    Study(1, "kv_cache", (("--out", OUT),), cpu_minutes=0.1, cpu_only=True),
    Study(
        2,
        "mqar",
        (
            ("--out", OUT),
            ("--kinds", "kda,gdn", "--seeds", "2,3", "--append", "--out", OUT),
            (
                *("--kinds", "kda,gdn", "--kv-pairs", "4,16", "--lengths", "256"),
                *("--seeds", "0,1", "--append", "--out", OUT),
            ),
            ("--kinds", "kda,gdn", "--lengths", "1024", "--seeds", "0,1", "--append", "--out", OUT),
            ("--kinds", "kda,gdn", "--lengths", "2048", "--seeds", "0", "--append", "--out", OUT),
        ),
        cpu_minutes=152,
    ),
    Study(3, "residual_variants", (("--out", OUT),), cpu_minutes=21),
    Study(4, "muon_vs_adamw", (("--out", OUT),), cpu_minutes=13),
    Study(5, "long_context", (("--out", OUT),), cpu_minutes=4, cpu_only=True),
    Study(6, "hybrid_default", (("--out", OUT),), cpu_minutes=25),
)


def commands(study: Study, out: str, python: str = "python") -> list[list[str]]:
    """The command lines of ``study`` writing into ``out``."""
    return [
        [python, "-m", f"experiments.studies.{study.name}", *(a.replace(OUT, out) for a in args)]
        for args in study.arguments
    ]


def select(only: str | None) -> list[Study]:
    """The studies named in ``only`` (comma-separated numbers or names), in page order."""
    if not only:
        return list(STUDIES)
    wanted = set(only.split(","))
    known = {str(s.number) for s in STUDIES} | {s.name for s in STUDIES}
    if unknown := sorted(wanted - known):
        raise ValueError(f"--only: unknown studies {unknown}; allowed: {sorted(known)}")
    return [s for s in STUDIES if {str(s.number), s.name} & wanted]


def backend() -> str:
    """The JAX backend and device kind a training study would get, asked of a fresh process
    (initialising JAX here would hold device memory the studies need)."""
    probe = "import jax; print(jax.default_backend(), jax.devices()[0].device_kind)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() or f"unknown (exit {done.returncode})"


def run(studies: list[Study], out: str) -> dict[str, Any]:
    """Runs every command of ``studies`` in order, printing as it goes; returns the record that
    ``main`` writes to ``<out>/reproduce.json``."""
    records = []
    for study in studies:
        env = dict(os.environ, **({"JAX_PLATFORMS": "cpu"} if study.cpu_only else {}))
        shown = [" ".join(command) for command in commands(study, out)]
        start, status = time.perf_counter(), 0
        for line, command in zip(shown, commands(study, out, python=sys.executable), strict=True):
            print(f"[study {study.number}] {line}", flush=True)
            status = subprocess.run(command, env=env).returncode
            if status:
                break
        seconds = time.perf_counter() - start
        print(f"[study {study.number}] exit {status} after {seconds / 60:.1f} min", flush=True)
        records.append(
            {
                "number": study.number,
                "name": study.name,
                "commands": shown,
                "device": "cpu" if study.cpu_only else "default",
                "seconds": round(seconds, 1),
                "returncode": status,
            }
        )
    return {
        "backend": backend(),
        "studies": records,
        "total_seconds": round(sum(r["seconds"] for r in records), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results", help="folder every study writes into")
    parser.add_argument("--only", help="comma-separated study numbers or names (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    try:
        studies = select(args.only)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        for study in studies:
            print(f"# study {study.number}: ~{study.cpu_minutes:g} min on 2 CPU cores")
            cpu = "JAX_PLATFORMS=cpu " if study.cpu_only else ""
            for command in commands(study, args.out):
                print(cpu + " ".join(command))
        return 0
    os.makedirs(args.out, exist_ok=True)
    result = run(studies, args.out)
    write_json(os.path.join(args.out, "reproduce.json"), result)
    for r in result["studies"]:
        minutes, status = r["seconds"] / 60, r["returncode"]
        print(f"study {r['number']} {r['name']:<18} {minutes:7.1f} min  exit {status}")
    print(f"total {result['total_seconds'] / 60:.1f} min on {result['backend']}")
    return 1 if any(r["returncode"] for r in result["studies"]) else 0


if __name__ == "__main__":
    sys.exit(main())
