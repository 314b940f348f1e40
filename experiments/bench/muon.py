"""Is our Muon update at least as fast as optax.contrib.muon at equal settings?

Optimizer update time (jitted ``tx.update``, median of runs) of ``optimizers.muon`` vs
``optax.contrib.muon`` vs ``optax.adamw`` on the same parameters: L transformer layers of
q/k/v/o [D, D], gate/up [D, F] and down [F, D] matrices, held either as separate 2-D leaves per
layer ("2d") or as [L, ...] stacks as ``nn.scan`` produces them ("stacked"; optax gets
``MuonDimensionNumbers(1, 2)`` so it also orthogonalises per layer).

Equal settings: every leaf gets Muon, standard quintic x 5, Nesterov with optax's bias
correction, eps 1e-8, optax's width scaling (``scaling="shape"``), no weight decay, and the
Newton-Schulz matmuls in the parameter dtype (float32 unless ``--dtype``); ``--ns-dtype
bfloat16`` adds rows where only ours runs Newton-Schulz in bf16 (the fast path on
accelerators; slower than float32 on CPUs without bf16 units), optax staying in the
parameter dtype.

Target (issue 10): ours <= 1.0x optax.contrib.muon on CPU, <= 0.5x on a GPU.

    python -m experiments.bench.muon [--quick] [--out results.json]

Prints a table and, with ``--out``, writes JSON: one record per row; ``ours_over_optax_ratio``
< 1 means ours is faster, ``ours_over_adamw_ratio`` is the cost relative to AdamW.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

import optimizers
from experiments.bench.timing import time_interleaved


def make_params(key, layers: int, d: int, f: int, stacked: bool, dtype) -> dict:
    """Transformer-shaped matrices: per layer q, k, v, o [D, D], gate, up [D, F], down [F, D]."""
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d)}
    shapes |= {"gate": (d, f), "up": (d, f), "down": (f, d)}
    keys = iter(jax.random.split(key, len(shapes) * layers))
    if stacked:
        return {
            name: jax.random.normal(next(keys), (layers, *s), dtype) * 0.02
            for name, s in shapes.items()
        }
    return {
        f"layer_{i}": {
            name: jax.random.normal(next(keys), s, dtype) * 0.02 for name, s in shapes.items()
        }
        for i in range(layers)
    }


def optimizers_under_test(stacked: bool, ns_dtype: str | None, lr: float = 0.02):
    all_muon = lambda p: jax.tree.map(lambda _: "muon", p)  # noqa: E731
    ours = optimizers.muon(
        lr,
        scaling="shape",
        bias_correction=True,
        eps=1e-8,
        ns_dtype=ns_dtype,
        labels=all_muon,
        dimension_numbers=optimizers.MuonDimensionNumbers((1,), (2,)) if stacked else None,
    )
    ref_dims = optax.contrib.MuonDimensionNumbers(1, 2) if stacked else None
    ref = optax.contrib.muon(lr, eps=1e-8, muon_weight_dimension_numbers=ref_dims)
    return {"ours": ours, "optax_muon": ref, "adamw": optax.adamw(lr)}


def run(layers, d, f, stacked, dtype, ns_dtype) -> dict:
    params = make_params(jax.random.key(0), layers, d, f, stacked, dtype)
    grads = jax.tree.map(lambda p: p * 0.5 + 1e-3, params)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    row = {
        "layout": "stacked" if stacked else "2d",
        "layers": layers,
        "d_model": d,
        "d_ff": f,
        "params_M": round(n_params / 1e6, 2),
        "dtype": jnp.dtype(dtype).name,
        "ns_dtype": ns_dtype or jnp.dtype(dtype).name,
        "backend": jax.default_backend(),
    }
    fns, args = {}, {}
    for name, tx in optimizers_under_test(stacked, ns_dtype).items():
        fns[name] = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
        args[name] = (grads, tx.init(params), params)
    for name, ms in time_interleaved(fns, args, runs=5, budget_s=20.0).items():
        row[f"{name}_ms"] = round(ms, 3)
    # Same settings => same numbers: largest difference relative to the update's max.
    ours, _ = fns["ours"](*args["ours"])
    ref, _ = fns["optax_muon"](*args["optax_muon"])
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), ours, ref)))
    top = max(jax.tree.leaves(jax.tree.map(lambda b: jnp.max(jnp.abs(b)), ref)))
    row["max_rel_diff_vs_optax"] = float(f"{float(diff / top):.2e}")
    row["ours_over_optax_ratio"] = round(row["ours_ms"] / row["optax_muon_ms"], 3)
    row["ours_over_adamw_ratio"] = round(row["ours_ms"] / row["adamw_ms"], 3)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", help="write JSON records here")
    parser.add_argument("--layers", type=int, help="default 2 (quick: 2)")
    parser.add_argument("--d-model", type=int, help="default 512 (quick: 128)")
    parser.add_argument("--d-ff", type=int, help="default 1408 (quick: 352)")
    parser.add_argument("--dtype", default="float32", help="parameter dtype")
    parser.add_argument("--ns-dtype", help="also time ours with this Newton-Schulz dtype")
    args = parser.parse_args(argv)
    layers = args.layers or 2
    d = args.d_model or (128 if args.quick else 512)
    f = args.d_ff or (352 if args.quick else 1408)
    dtype = jnp.dtype(args.dtype)

    rows = []
    for stacked in (False, True):
        for ns_dtype in (None, args.ns_dtype) if args.ns_dtype else (None,):
            rows.append(run(layers, d, f, stacked, dtype, ns_dtype))

    cols = ["layout", "params_M", "ns_dtype", "ours_ms", "optax_muon_ms", "adamw_ms"]
    cols += ["ours_over_optax_ratio", "ours_over_adamw_ratio", "max_rel_diff_vs_optax"]
    print(f"backend={jax.default_backend()} L={layers} D={d} F={f} dtype={dtype.name}")
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
