"""What do the materialised gradients buy? Train-step time with and without them, per preset.

``jaxmodels.ops.reductions.materialize_gradient`` is the identity whose backward pass writes the
cotangent to memory once, so that XLA:CPU does not recompute an expensive gradient expression
inside each of its consumers. The SwiGLU block (gate and up activations) and KDA's short
convolutions use it. The baseline is the same code with the identity in its place (patched in
``jaxmodels.layers`` and ``jaxmodels.attention.kda`` while that step is traced); both steps
are compiled in the same process and timed interleaved.

    python -m experiments.bench.materialized_gradients [--presets tiny small kimi-linear hybrid]

Prints a table and, with ``--out``, writes JSON: one record per preset with both times (ms,
median) and ``after_over_before_ratio`` (< 1: the materialised form is faster).
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

from experiments.bench.residuals import build
from experiments.bench.timing import time_interleaved
from experiments.presets import get_preset

USERS = ("jaxmodels.layers.materialize_gradient", "jaxmodels.attention.kda.materialize_gradient")


def build_without_materialized_gradients(model, batch_size, seq_len):
    """``build`` (AdamW train step) with the identity in place of ``materialize_gradient``."""
    with mock.patch(USERS[0], lambda x: x), mock.patch(USERS[1], lambda x: x):
        return build(model, batch_size, seq_len)


def bench_preset(name: str, runs: int, budget_s: float) -> dict:
    preset = get_preset(name)
    shape = (preset.model, preset.data.batch_size, preset.data.seq_len)
    steps = {"before": build_without_materialized_gradients(*shape), "after": build(*shape)}
    ms = time_interleaved(
        {k: compiled for k, (compiled, _, _) in steps.items()},
        {k: (state, batch) for k, (_, state, batch) in steps.items()},
        runs=runs,
        budget_s=budget_s,
    )
    return {
        "preset": name,
        "batch": f"{preset.data.batch_size}x{preset.data.seq_len}",
        "before_ms": ms["before"],
        "after_ms": ms["after"],
        "after_over_before_ratio": ms["after"] / ms["before"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "kimi-linear", "hybrid"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--out", help="write JSON records here")
    args = parser.parse_args(argv)
    print("| preset | batch | before ms | after ms | after / before |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for name in args.presets:
        row = bench_preset(name, args.runs, args.budget_s)
        rows.append(row)
        print(
            f"| {name} | {row['batch']} | {row['before_ms']:.1f} | {row['after_ms']:.1f} | "
            f"{row['after_over_before_ratio']:.3f} |",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
