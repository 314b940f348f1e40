"""Pieces of the TPU planning report of `python -m experiments.compile`: chip specifications,
topology loading (libtpu), per-chip byte counts of sharded trees, collectives in compiled HLO,
and the printed table.

Chip figures (per chip, bf16 peak; Google Cloud TPU system-architecture pages):
  v4  275 TFLOP/s, 32 GiB HBM2   https://cloud.google.com/tpu/docs/v4
  v5e 197 TFLOP/s, 16 GB HBM2    https://cloud.google.com/tpu/docs/v5e
  v5p 459 TFLOP/s, 95 GB HBM2e   https://cloud.google.com/tpu/docs/v5p
  v6e 918 TFLOP/s, 32 GB HBM     https://cloud.google.com/tpu/docs/v6e
The pages write "GB" for v5e/v5p/v6e and "GiB" for v4; we count all four in GiB (the runtimes
report 16 / 95 / 32 GiB limits), so "fits" is a planning figure: leave a few percent of headroom.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

import jax
import numpy as np

GiB = 1024**3
INSTALL_HINT = 'pip install -e ".[tpu]"   (or: pip install libtpu)'


class CompilePlanError(ValueError):
    """A bad request (topology, mesh, missing libtpu); the message says what would be right."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation: per-chip HBM and bf16 peak, and where the figures come from."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    source: str


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32 * GiB, 275e12, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": ChipSpec("v5e", 16 * GiB, 197e12, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("v5p", 95 * GiB, 459e12, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("v6e", 32 * GiB, 918e12, "https://cloud.google.com/tpu/docs/v6e"),
}
# Names libtpu accepts for the same generation.
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = type[...] all-gather-start(` or `... all-reduce(`: one op per sync op or async start.
_COLLECTIVE_RE = re.compile(
    r"=\s*[^=]*?\b(" + "|".join(COLLECTIVES) + r")(-start)?\(",
)


def parse_topology_name(topology: str) -> tuple[ChipSpec, tuple[int, ...]]:
    """ "v5p:4x4x8" -> (the v5p ChipSpec, (4, 4, 8)); CompilePlanError for anything else."""
    generation, sep, dims = topology.partition(":")
    generation = _ALIASES.get(generation.lower(), generation.lower())
    known = ", ".join(f"{k}:AxB[xC]" for k in CHIPS)
    if not sep or generation not in CHIPS:
        raise CompilePlanError(
            f"unknown TPU topology {topology!r}; expected GENERATION:DIMS with a generation of "
            f"{sorted(CHIPS)} (e.g. v5p:4x4x8, v6e:16x16, v5e:8x8, v4:2x2x2); known forms: {known}"
        )
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise CompilePlanError(
            f"topology {topology!r}: dimensions {dims!r} must be integers joined by 'x', e.g. 4x4x8"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise CompilePlanError(f"topology {topology!r}: every dimension must be >= 1")
    return CHIPS[generation], shape


def require_libtpu() -> None:
    """CompilePlanError with the install hint unless the `libtpu` package is importable."""
    if importlib.util.find_spec("libtpu") is None:
        raise CompilePlanError(
            "compiling for a TPU topology needs the `libtpu` package (the TPU compiler; no TPU "
            f"is required). Install it with: {INSTALL_HINT}"
        )


def load_topology(topology: str) -> tuple[ChipSpec, tuple[int, ...], list[Any]]:
    """(chip spec, chip grid, the topology's TPU devices) for e.g. "v5p:4x4x8".

    Works on a CPU-only machine. libtpu takes a lock file for real TPU use; AOT compilation
    touches no TPU, so ALLOW_MULTIPLE_LIBTPU_LOAD=1 is set (unless the user set it) so that
    several planning processes can run at once.
    """
    chip, shape = parse_topology_name(topology)
    require_libtpu()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental.topologies import get_topology_desc

    canonical = f"{chip.name}:{'x'.join(map(str, shape))}"
    try:
        desc = get_topology_desc(platform="tpu", topology_name=canonical)
    except Exception as e:  # libtpu's errors are JaxRuntimeError / RuntimeError
        raise CompilePlanError(
            f"libtpu rejected topology {topology!r}: {str(e).strip().splitlines()[-1]}. "
            "Use a slice shape the generation supports (v5p/v4: 3-D like 2x2x2, 4x4x8; "
            "v5e/v6e: 2-D like 4x4, 16x16)."
        ) from None
    return chip, shape, list(desc.devices)


def shard_bytes(tree: Any) -> int:
    """Bytes that one device holds of a tree of sharded `ShapeDtypeStruct`s (or arrays): for each
    leaf, the shard shape of its sharding times the item size (replicated leaves count fully).
    Assumes shardings that split evenly (the rules table refuses uneven ones)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def global_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops by kind in compiled (optimised, SPMD-partitioned) HLO text. An async pair
    (`all-gather-start` / `-done`) counts once; ops inside loop bodies count once (static)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_RE.search(line)
        if match:
            counts[match.group(1)] += 1
    return counts


def memory_stats(compiled: Any) -> dict[str, int]:
    """Per-device bytes from `compiled.memory_analysis()` and the implied peak:
    arguments + outputs - aliased (donated) + temporaries + generated code."""
    m = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f"{f}_bytes": int(getattr(m, f"{f}_size_in_bytes", 0) or 0) for f in fields}
    out["peak_bytes"] = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["generated_code_bytes"]
    )
    return out


def flops_of(compiled: Any) -> float | None:
    """FLOPs of one call of the per-device program (XLA's cost analysis), None if unknown."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def human_bytes(n: float | None) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (e.g. ' 12.34 GiB')."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n:8.0f} B  "


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table printed by `python -m experiments.compile`."""
    chip = report["chip"]
    hbm = chip["hbm_bytes"]
    lines = [
        f"preset {report['preset']} on {report['topology']} ({report['num_devices']} devices, "
        f"{chip['name']}: {hbm / GiB:.0f} GiB HBM, {chip['peak_bf16_flops'] / 1e12:.0f} "
        f"TFLOP/s bf16 per chip), mesh {report['mesh']}",
        f"model: {report['model']['num_params'] / 1e9:.2f}B parameters, "
        f"{report['model']['num_layers']} layers, pattern {report['model']['layer_pattern']}; "
        f"batch {report['batch']} x seq {report['seq']}, optimizer {report['optimizer']}",
    ]
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    for name, step in report["steps"].items():
        lines.append("")
        lines.append(
            f"[{name}] compile {'OK' if step['compiled'] else 'FAILED'}"
            f" in {step['compile_seconds']:.1f}s"
        )
        if not step["compiled"]:
            lines.append(f"  compiler error: {step['error']}")
        per = step["per_chip"]
        rows = [(k, per.get(k)) for k in ("parameters", "optimizer_state", "caches", "batch")]
        rows = [(k, v) for k, v in rows if v is not None]
        mem = step.get("memory")
        if mem:
            rows += [("temporaries", mem["temp_bytes"]), ("peak (XLA)", mem["peak_bytes"])]
        for k, v in rows:
            lines.append(f"  {k:<16}{human_bytes(v)}  {100 * v / hbm:6.1f}% of HBM")
        fits = step["fits"]
        lines.append(f"  fits in HBM: {'yes' if fits else 'NO'} ({step['fits_basis']})")
        if step.get("flops_per_chip") is not None:
            lines.append(
                f"  FLOPs/step/chip {step['flops_per_chip']:.3e} (XLA); "
                f"step >= {step['step_seconds_at_peak'] * 1e3:.1f} ms at peak"
            )
        if step.get("model_flops_per_chip") is not None:
            lines.append(
                f"  model FLOPs/chip {step['model_flops_per_chip']:.3e} (6N + attention); "
                + (
                    f"MFU bound {100 * step['mfu_bound']:.1f}% (model/XLA FLOPs); "
                    if step.get("mfu_bound") is not None
                    else ""
                )
                + f"at 50% MFU: {step['step_seconds_at_50pct_mfu'] * 1e3:.1f} ms/step, "
                f"{step['tokens_per_second_per_chip_at_50pct_mfu']:.0f} tokens/s/chip"
            )
        if step.get("flops_note"):
            lines.append(f"  note: {step['flops_note']}")
        if step.get("collectives_error"):
            lines.append(f"  collectives: unknown ({step['collectives_error']})")
        if step.get("collectives"):
            text = ", ".join(f"{k} {v}" for k, v in step["collectives"].items())
            lines.append(f"  collectives: {text}")
    return "\n".join(lines)
