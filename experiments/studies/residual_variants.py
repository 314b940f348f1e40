"""Study 3 (issue 11): residual variants trained on the default corpus, with their diagnostics.

Question: on the default run (the ``small`` preset: 4 layers of width 128 on the Python standard
library), how do pre-norm, Hyper-Connections, mHC and Attention Residuals (full and block)
compare at equal steps, and do their diagnostics behave as the papers say?

Published claims it checks (reference/optimizers_and_residuals.md):
  * mHC (arXiv 2512.24880 §3.1, Figs. 3b / 7b): the composite residual mapping of unconstrained
    HC drifts away from gain 1 as depth accumulates (up to ~3000 at 27B), while mHC's
    doubly stochastic mixing keeps the composite forward gain at 1 (exactly, in V4's form:
    its rows sum to 1) and the backward gain near 1;
  * mHC / HC / AttnRes train at least as well as pre-norm (the papers report lower loss at
    scale; at 0.9M parameters and 320 steps we only ask whether they match or beat it);
  * AttnRes (arXiv 2603.15031): the learned depth attention departs from the uniform average
    it starts from (zero pseudo-queries) and concentrates on a few sources.

The residual kinds are the benchmark's rows (``experiments.bench.residuals.residual_variants``),
each trained by the main job (``experiments.studies.training_runs``) with everything else the
preset's. After training, one validation batch is run with ``mutable=["intermediates"]``:
HC/mHC give the Amax composite gain per sub-layer (forward and backward,
``composite_gain_from_intermediates``), AttnRes its depth-attention weights averaged over the
batch's tokens (``collect_depth_weights``).

    python -m experiments.studies.residual_variants --out docs/results    # ~20 min, 2 CPU cores

Writes ``residual_variants.json`` and ``residual_variants.png`` (loss curves, composite gains,
AttnRes heatmaps) under ``--out``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.residuals import residual_variants
from experiments.data import make_datasets
from experiments.plotting import pyplot, save_figure
from experiments.presets import get_preset
from experiments.studies.output import write_results
from experiments.studies.training_runs import study_config, study_parser, train_and_measure
from jaxmodels.model import Decoder
from jaxmodels.residual.attn_res import AttnResConfig, collect_depth_weights
from jaxmodels.residual.hyper_connections import composite_gain_from_intermediates


def diagnostics(config, params, batch) -> dict[str, Any]:
    """The residual kind's diagnostics on one batch (empty for pre-norm).

    Returns ``gain_forward`` / ``gain_backward`` (lists over sub-layers) for HC and mHC, or
    ``depth_weights`` (``[reads][sources]``, the mean over the batch's tokens; row ``l`` is
    sub-layer ``l``'s read, the last row the final read) for AttnRes.
    """
    residual = config.model.residual
    if residual.kind not in ("hyper_connections", "mhc", "attn_res"):
        return {}
    model = Decoder(config.model)
    _, diag = jax.jit(lambda p, x: model.apply(p, x, mutable=["intermediates"]))(
        params, jnp.asarray(batch["inputs"])
    )
    if isinstance(residual, AttnResConfig):
        weights = collect_depth_weights(diag["intermediates"])  # [reads, sources, B, T]
        return {"depth_weights": np.asarray(jnp.mean(weights, axis=(2, 3))).tolist()}
    forward, backward = composite_gain_from_intermediates(diag["intermediates"])
    return {
        "gain_forward": np.asarray(forward).tolist(),
        "gain_backward": np.asarray(backward).tolist(),
    }


def run(preset: str, steps: int, eval_every: int, kinds: list[str] | None = None) -> list[dict]:
    """Trains the preset once per residual kind; one record per kind."""
    base = study_config(get_preset(preset), steps=steps, eval_every=eval_every)
    batch = make_datasets(base.data)[1]()[0]
    records = []
    for name, residual in residual_variants().items():
        if kinds and name.split(" ")[0] not in kinds:
            continue
        config = dataclasses.replace(base, model=dataclasses.replace(base.model, residual=residual))
        result = train_and_measure(config)
        record = {
            "residual": name,
            "kind": residual.kind,
            "preset": preset,
            "steps": steps,
            **{k: result[k] for k in ("curve", "params", "wall_s", "cpu_s")},
            "final_val_bpb": result["final"]["val_bpb"],
            **diagnostics(config, result["state"].params, batch),
        }
        print(
            f"{name:<20} val bpb {record['final_val_bpb']:.3f}  params {record['params']:,}  "
            f"{record['wall_s']:.0f} s",
            flush=True,
        )
        records.append(record)
    return records


def plot(records: list[dict], path: str) -> None:
    """Loss curves, HC/mHC composite gains, and one heatmap per AttnRes run."""
    plt = pyplot()

    heatmaps = [r for r in records if "depth_weights" in r]
    fig, axes = plt.subplots(
        1, 2 + len(heatmaps), figsize=(5.2 * (2 + len(heatmaps)), 4.4), dpi=100
    )
    ax_loss, ax_gain = axes[0], axes[1]
    for r in records:
        steps = [p["step"] for p in r["curve"]]
        ax_loss.plot(steps, [p["val_bpb"] for p in r["curve"]], "o-", ms=3, label=r["residual"])
        if "gain_forward" in r:
            sub = np.arange(1, len(r["gain_forward"]) + 1)
            (line,) = ax_gain.plot(sub, r["gain_forward"], "o-", label=f"{r['residual']} fwd")
            ax_gain.plot(sub, r["gain_backward"], "s--", color=line.get_color(), label="  bwd")
    ax_loss.set(xlabel="step", ylabel="validation bits per byte", title="loss at equal steps")
    ax_gain.set(
        xlabel="sub-layer l", ylabel="Amax gain of composite mapping", title="mHC stability (§3.1)"
    )
    for ax in (ax_loss, ax_gain):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, r in zip(axes[2:], heatmaps, strict=True):
        weights = np.asarray(r["depth_weights"])
        image = ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set(
            xlabel="source (0 = embedding)",
            ylabel="read (sub-layer; last = final)",
            title=f"{r['residual']}: depth attention",
        )
        fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = study_parser(__doc__, "residual_variants")
    parser.add_argument("--preset", default="small", help="model and data preset (default small)")
    parser.add_argument("--kinds", nargs="*", help="subset: prenorm hc mhc attn_res")
    args = parser.parse_args(argv)
    records = run(args.preset, args.steps, args.eval_every, args.kinds)
    if args.out:
        write_results(args.out, "residual_variants", records, lambda path: plot(records, path))
    return records


if __name__ == "__main__":
    main()
