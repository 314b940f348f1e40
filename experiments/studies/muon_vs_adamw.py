"""Study 4 (issue 11): Muon vs AdamW on the default corpus, learning rates tuned for both.

Question: at a fixed step budget, how many steps (and how much wall time) does AdamW need to
reach the loss Muon reaches, and vice versa, each optimizer at its best learning rate of a
sweep, at two model sizes?

Published claim it checks: Moonlight (arXiv 2502.16982, Fig. 3 and §3): Muon reaches AdamW's
loss with about half the training FLOPs ("~2x computational efficiency") in compute-optimal
training; Muon here is the library's Muon with Moonlight's RMS matching (one learning rate for
its Muon and AdamW groups), everything else the preset's (cosine schedule, warmup, weight decay
0.1, clipping 1.0).

Model sizes (``SIZES``): ``small`` (the default run: 4 layers of width 128, 0.87M parameters)
and ``narrow`` (the same with width 64 and two heads of 32). Sweeps (``SWEEPS``, factor ~3):
AdamW 1e-3 .. 1e-2, Muon 3e-3 .. 3e-2 (the README's first sweep at ``small`` also ran AdamW
at 3e-4: 0.6 bits worse than at 1e-3). Each run is the main job (``training_runs``) for
``--steps`` steps, evaluated every ``--eval-every`` steps.

Reported per size: each optimizer's best final validation bits per byte; the step at which
the better optimizer's curve first reaches the other's final value (linear interpolation
between evaluations), and the resulting step ratio; the wall-time ratio of the best runs.

    python -m experiments.studies.muon_vs_adamw --sizes narrow --out docs/results   # ~15 min

Writes ``muon_vs_adamw.json`` and ``muon_vs_adamw.png`` under ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from experiments.config import RunConfig
from experiments.plotting import pyplot, save_figure
from experiments.presets import get_preset
from experiments.studies.output import write_results
from experiments.studies.training_runs import (
    first_step_reaching,
    study_config,
    study_parser,
    train_and_measure,
)
from jaxmodels.attention.gqa import GQAConfig

SWEEPS = {"adamw": (1e-3, 3e-3, 1e-2), "muon": (3e-3, 1e-2, 3e-2)}


def _narrow() -> RunConfig:
    base = get_preset("small")
    model = dataclasses.replace(
        base.model,
        hidden_size=64,
        intermediate_size=176,
        attention={"gqa": GQAConfig(num_heads=2, num_kv_heads=2, head_dim=32)},
    )
    return dataclasses.replace(base, model=model)


SIZES = {"small": lambda: get_preset("small"), "narrow": _narrow}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best run of each optimizer and the steps each needs to reach the other's loss."""
    best = {
        name: min((r for r in runs if r["optimizer"] == name), key=lambda r: r["final_val_bpb"])
        for name in ("adamw", "muon")
    }
    adamw, muon = best["adamw"], best["muon"]
    steps = adamw["steps"]
    muon_to_adamw = first_step_reaching(muon["curve"], adamw["final_val_bpb"])
    adamw_to_muon = first_step_reaching(adamw["curve"], muon["final_val_bpb"])
    return {
        "best_lr": {name: r["learning_rate"] for name, r in best.items()},
        "best_final_val_bpb": {name: r["final_val_bpb"] for name, r in best.items()},
        "muon_steps_to_adamw_final": muon_to_adamw,
        "adamw_steps_to_muon_final": adamw_to_muon,
        "step_ratio_adamw_over_muon": None if muon_to_adamw is None else steps / muon_to_adamw,
        "wall_ratio_muon_over_adamw": muon["wall_s"] / adamw["wall_s"],
        "cpu_ratio_muon_over_adamw": muon["cpu_s"] / adamw["cpu_s"],
    }


def run(sizes: list[str], steps: int, eval_every: int) -> dict[str, Any]:
    results = {}
    for size in sizes:
        base = study_config(SIZES[size](), steps=steps, eval_every=eval_every)
        runs = []
        for optimizer, lrs in SWEEPS.items():
            for lr in lrs:
                opt = dataclasses.replace(base.optimizer, name=optimizer, learning_rate=lr)
                result = train_and_measure(dataclasses.replace(base, optimizer=opt))
                runs.append(
                    {
                        "optimizer": optimizer,
                        "learning_rate": lr,
                        "steps": steps,
                        "final_val_bpb": result["final"]["val_bpb"],
                        **{k: result[k] for k in ("curve", "params", "wall_s", "cpu_s")},
                    }
                )
                print(
                    f"{size:<7} {optimizer:<6} lr {lr:<7g} val bpb {runs[-1]['final_val_bpb']:.3f}"
                    f"  {result['wall_s']:.0f} s",
                    flush=True,
                )
        results[size] = {"runs": runs, "comparison": compare(runs)}
        print(f"{size}: {json.dumps(results[size]['comparison'])}", flush=True)
    return results


def plot(results: dict[str, Any], path: str) -> None:
    """One panel per size: validation curves of every run (best of each optimizer bold)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.6), dpi=100)
    axes = [axes] if len(results) == 1 else axes
    colors = {"adamw": "tab:blue", "muon": "tab:red"}
    for ax, (size, result) in zip(axes, results.items(), strict=True):
        best = result["comparison"]["best_lr"]
        for r in result["runs"]:
            is_best = r["learning_rate"] == best[r["optimizer"]]
            ax.plot(
                [p["step"] for p in r["curve"]],
                [p["val_bpb"] for p in r["curve"]],
                "o-" if is_best else "-",
                color=colors[r["optimizer"]],
                lw=2.2 if is_best else 0.9,
                alpha=1.0 if is_best else 0.45,
                ms=3,
                label=f"{r['optimizer']} lr {r['learning_rate']:g}",
            )
        ratio = result["comparison"]["step_ratio_adamw_over_muon"]
        ratio = "n/a" if ratio is None else f"{ratio:.2f}x"
        ax.set(
            xlabel="step",
            ylabel="validation bits per byte",
            title=f"{size} ({result['runs'][0]['params']:,} params): AdamW/Muon steps {ratio}",
        )
        ax.set_ylim(top=min(5.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = study_parser(__doc__, "muon_vs_adamw")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args(argv)
    results = run(args.sizes, args.steps, args.eval_every)
    if args.out:
        write_results(args.out, "muon_vs_adamw", results, lambda path: plot(results, path))
    return results


if __name__ == "__main__":
    main()
