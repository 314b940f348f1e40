"""What do the residual kinds cost? Train-step time and memory of prenorm vs HC vs mHC vs AttnRes.

The same decoder (a preset's model: ``small`` by default, ``tiny`` with ``--quick``) with each
residual kind: pre-norm (the baseline), Hyper-Connections (dynamic, n = 4), mHC (n = 4, V4
form; ``--unrolled-sinkhorn`` adds a row with the Sinkhorn loop fully unrolled; ``--ablation``
adds rows that take mHC apart: static HC with 1 and 4 streams, mHC with 1 stream, mHC with one
Sinkhorn iteration), AttnRes full
and block (one decoder layer = two sub-layer outputs per block). For each: the jitted AdamW
train step (forward, backward, update) timed after warm-up, median of interleaved runs, and the
compiled step's temporary memory (``compiled.memory_analysis().temp_size_in_bytes``, the
activations XLA keeps), both as ratios to pre-norm measured in the same run.

Target (issue 9): mHC step time within 1.3x of pre-norm on CPU at the tiny / small presets
(the mHC paper reports 6.7% at n = 4 with fused kernels and recomputation).

    python -m experiments.bench.residuals [--quick] [--preset small] [--ablation] [--out FILE]

Prints a table and, with ``--out``, writes JSON: one record per row with ``step_time_ratio``,
``temp_memory_ratio`` and ``param_ratio`` (each over pre-norm).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench.timing import time_interleaved
from jaxmodels import training
from jaxmodels.config import ModelConfig
from jaxmodels.model import Decoder
from jaxmodels.residual.attn_res import AttnResConfig
from jaxmodels.residual.hyper_connections import HyperConnectionsConfig
from jaxmodels.residual.mhc import MHCConfig
from jaxmodels.residual.prenorm import PrenormConfig


def residual_variants(unrolled_sinkhorn: bool = False, ablation: bool = False) -> dict[str, object]:
    """Row name -> residual config (same model otherwise)."""
    rows = {
        "prenorm": PrenormConfig(),
        "hc (n=4, dynamic)": HyperConnectionsConfig(hc_mult=4, dynamic=True),
        "mhc (n=4)": MHCConfig(hc_mult=4),
        "attn_res full": AttnResConfig(mode="full"),
        "attn_res block (2)": AttnResConfig(mode="block", block_size=2),
    }
    if unrolled_sinkhorn:
        rows["mhc (n=4, unrolled sinkhorn)"] = MHCConfig(hc_mult=4, sinkhorn_unroll=True)
    if ablation:  # what each part of mHC costs: stream traffic, coefficients, Sinkhorn
        rows["hc static (n=1)"] = HyperConnectionsConfig(hc_mult=1, dynamic=False)
        rows["hc static (n=4)"] = HyperConnectionsConfig(hc_mult=4, dynamic=False)
        rows["mhc (n=1)"] = MHCConfig(hc_mult=1)
        rows["mhc (n=4, 1 sinkhorn iteration)"] = MHCConfig(hc_mult=4, hc_sinkhorn_iters=1)
    return rows


def build(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    optimizer: optax.GradientTransformation | None = None,
):
    """(compiled train step, state, batch) for `config`, with AdamW unless `optimizer` is given."""
    optimizer = optax.adamw(1e-3) if optimizer is None else optimizer
    model = Decoder(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch["inputs"]))
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )
    step = jax.jit(training.make_train_step(config, optimizer))
    compiled = step.lower(state, batch).compile()
    return compiled, state, batch


def run(
    model: ModelConfig,
    batch_size: int,
    seq_len: int,
    runs: int,
    budget_s: float,
    unrolled_sinkhorn: bool = False,
    ablation: bool = False,
):
    fns, args, rows = {}, {}, []
    for name, residual in residual_variants(unrolled_sinkhorn, ablation).items():
        config = dataclasses.replace(model, residual=residual)
        t0 = time.perf_counter()
        compiled, state, batch = build(config, batch_size, seq_len)
        compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        fns[name], args[name] = compiled, (state, batch)
        rows.append(
            {
                "residual": name,
                "kind": residual.kind,
                "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
                "temp_mib": round(memory.temp_size_in_bytes / 2**20, 2) if memory else None,
                "build_s": round(compile_s, 1),
            }
        )
    times = time_interleaved(fns, args, runs=runs, budget_s=budget_s)
    base = rows[0]
    for row in rows:
        row["step_ms"] = round(times[row["residual"]], 2)
        row["step_time_ratio"] = round(row["step_ms"] / times[base["residual"]], 3)
        if row["temp_mib"] is not None and base["temp_mib"]:
            row["temp_memory_ratio"] = round(row["temp_mib"] / base["temp_mib"], 3)
        row["param_ratio"] = round(row["params"] / base["params"], 4)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset, under a minute")
    parser.add_argument("--preset", help="model preset (default small; quick: tiny)")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--seq-len", type=int, help="default: the preset's")
    parser.add_argument("--layers", type=int, help="default: the preset's")
    parser.add_argument("--runs", type=int, help="timed runs per row (default 15; quick 5)")
    parser.add_argument(
        "--unrolled-sinkhorn",
        action="store_true",
        help="add an mHC row with the Sinkhorn loop fully unrolled (slow to compile on CPU)",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="add rows for static HC (n=1, 4), mHC with n=1 and mHC with one Sinkhorn iteration",
    )
    parser.add_argument("--out", help="write JSON records here")
    args = parser.parse_args(argv)

    from experiments.presets import get_preset

    preset_name = args.preset or ("tiny" if args.quick else "small")
    preset = get_preset(preset_name)
    model = preset.model
    if args.layers:
        model = dataclasses.replace(model, num_layers=args.layers)
    batch_size = args.batch_size or preset.data.batch_size
    seq_len = args.seq_len or preset.data.seq_len
    runs = args.runs or (5 if args.quick else 15)
    budget_s = 10.0 if args.quick else 60.0
    rows = run(model, batch_size, seq_len, runs, budget_s, args.unrolled_sinkhorn, args.ablation)

    print(
        f"backend={jax.default_backend()} preset={preset_name}"
        f" L={model.num_layers} D={model.hidden_size} F={model.intermediate_size}"
        f" B={batch_size} T={seq_len} dtype={model.dtype} scan={model.scan_layers}"
    )
    cols = ["residual", "step_ms", "step_time_ratio", "temp_mib", "temp_memory_ratio"]
    cols += ["params", "param_ratio", "build_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    mhc = next(r for r in rows if r["residual"] == "mhc (n=4)")
    verdict = "meets" if mhc["step_time_ratio"] <= 1.3 else "misses"
    print(f"mHC step time {mhc['step_time_ratio']}x pre-norm: {verdict} the 1.3x target")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
