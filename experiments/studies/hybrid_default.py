"""Study 6 (issue 11): does the `hybrid` preset train at least as well as `small` at equal wall
time (the condition for it to become the main job's default)?

`hybrid` (experiments/presets/hybrid.py) combines the mission's pieces: 3 KDA : 1 NoPE MLA
(Kimi Linear), mHC residuals with 4 streams (DeepSeek-V4) and Muon (Moonlight). The baseline is
`small` (GQA, pre-norm, AdamW; the main job's default before this study made `hybrid` the
default), at the same width, depth and data. Both run at the baseline's ``--steps`` (the
hybrid's schedule stretched to them) for the equal-steps comparison.

Equal wall time, fairly: the two compiled train steps (each with its own optimizer) are timed
interleaved in one process (``experiments.bench.timing.time_interleaved``), so load from other
processes slows both alike; the baseline keeps its ``--steps`` and the hybrid gets
``steps * t_baseline / t_hybrid`` steps (its whole schedule, warmup and cosine decay included,
fits the same time). Both are then trained by the main job and their final validation bits per
byte compared; the equal-steps comparison (both ``--steps``) is reported beside it.

    python -m experiments.studies.hybrid_default --out docs/results     # ~20 min, 2 CPU cores

Writes ``hybrid_default.json`` and ``hybrid_default.png`` under ``--out``.
"""

from __future__ import annotations

import json
from typing import Any

from experiments.bench.residuals import build
from experiments.bench.timing import time_interleaved
from experiments.optimizer import build_optimizer
from experiments.plotting import pyplot, save_figure
from experiments.presets import get_preset
from experiments.studies.output import write_results
from experiments.studies.training_runs import study_config, study_parser, train_and_measure


def step_times_ms(configs: dict[str, Any], runs: int = 15, budget_s: float = 60.0) -> dict:
    """Median train-step time (ms) of each run config's model and optimizer, interleaved."""
    fns, args = {}, {}
    for name, config in configs.items():
        tx = build_optimizer(config.optimizer, config.train.steps, config.model)
        compiled, state, batch = build(
            config.model, config.data.batch_size, config.data.seq_len, tx
        )
        fns[name], args[name] = compiled, (state, batch)
    return time_interleaved(fns, args, runs=runs, budget_s=budget_s)


BASELINE = "small"  # the main job's default before study 6 (GQA, pre-norm, AdamW)


def run(steps: int, eval_every: int, candidate: str = "hybrid") -> dict[str, Any]:
    configs = {
        name: study_config(get_preset(name), steps=steps, eval_every=eval_every)
        for name in (BASELINE, candidate)
    }
    times = step_times_ms(configs)
    equal_time_steps = max(1, round(steps * times[BASELINE] / times[candidate]))
    print(f"step ms {times}; {candidate} gets {equal_time_steps} steps at equal time", flush=True)
    plans = {
        f"{BASELINE} ({steps} steps)": configs[BASELINE],
        f"{candidate} ({steps} steps)": configs[candidate],
    }
    if equal_time_steps != steps:
        plans[f"{candidate} ({equal_time_steps} steps, equal time)"] = study_config(
            get_preset(candidate), steps=equal_time_steps, eval_every=eval_every
        )
    runs = {}
    for label, config in plans.items():
        result = train_and_measure(config)
        runs[label] = {
            "preset": BASELINE if label.startswith(BASELINE) else candidate,
            "steps": config.train.steps,
            "final_val_bpb": result["final"]["val_bpb"],
            **{k: result[k] for k in ("curve", "params", "wall_s", "cpu_s")},
        }
        print(f"{label:<40} val bpb {runs[label]['final_val_bpb']:.3f}", flush=True)
    baseline = runs[f"{BASELINE} ({steps} steps)"]
    equal_time = list(runs.values())[-1]
    return {
        "step_ms": times,
        "equal_time_steps": equal_time_steps,
        "runs": runs,
        "equal_time_delta_bpb": equal_time["final_val_bpb"] - baseline["final_val_bpb"],
        "equal_steps_delta_bpb": runs[f"{candidate} ({steps} steps)"]["final_val_bpb"]
        - baseline["final_val_bpb"],
        "candidate_trains_at_least_as_well": equal_time["final_val_bpb"]
        <= baseline["final_val_bpb"],
    }


def plot(result: dict[str, Any], path: str) -> None:
    """Validation bits per byte against step (left) and against the step time x steps (right)."""
    plt = pyplot()

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=100)
    for label, r in result["runs"].items():
        ms = result["step_ms"][r["preset"]]
        steps = [p["step"] for p in r["curve"]]
        bpb = [p["val_bpb"] for p in r["curve"]]
        ax_step.plot(steps, bpb, "o-", ms=3, label=label)
        ax_time.plot([s * ms / 1e3 for s in steps], bpb, "o-", ms=3, label=label)
    ax_step.set(xlabel="step", ylabel="validation bits per byte", title="equal steps")
    ax_time.set(
        xlabel="train-step seconds (interleaved step time x steps)",
        ylabel="validation bits per byte",
        title="equal wall time",
    )
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = study_parser(__doc__, "hybrid_default")
    parser.add_argument("--candidate", default="hybrid", help="preset compared to the default")
    args = parser.parse_args(argv)
    result = run(args.steps, args.eval_every, args.candidate)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if args.out:
        write_results(args.out, "hybrid_default", result, lambda path: plot(result, path))
    return result


if __name__ == "__main__":
    main()
