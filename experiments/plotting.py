"""The loss-curve figure of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from experiments.files import write_atomically


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lays out `fig`, writes it to `path` (PNG) through a temporary file renamed into place, so
    a crash mid-write never leaves a truncated figure, and closes it."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, fig.savefig, suffix=".png")
    pyplot().close(fig)


def plot_loss_curve(
    records: Sequence[dict[str, Any]],
    path: str,
    *,
    baseline: float | None = None,
    title: str = "",
) -> None:
    """Writes train and validation bits per byte against step to `path` (PNG).

    Args:
      records: metrics records (`event` "train" with `bpb`, `event` "eval" with `val_bpb`).
      baseline: drawn as a dashed line (the unigram bits per byte of the training split).
    """
    plt = pyplot()
    train = [(r["step"], r["bpb"]) for r in records if r.get("event") == "train" and "bpb" in r]
    val = [
        (r["step"], r["val_bpb"]) for r in records if r.get("event") == "eval" and "val_bpb" in r
    ]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", color="tab:blue", lw=1.2, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", color="tab:orange", lw=1.8)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label=f"unigram {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
