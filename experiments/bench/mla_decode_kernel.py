"""MLA decode over the latent cache on TPU: the Pallas kernel vs XLA's form, from the compiler.

Question: what does the Pallas kernel (`jaxmodels/kernels/mla_decode.py`) save over XLA's own
code for the absorbed decode attention core, on a TPU we do not have? Both are compiled ahead
of time for one v5p chip (`jax.experimental.topologies`, needs `libtpu`; no TPU) at bf16,
C = 512, R = 64 (DeepSeek-V3's latent), full cache visible, and compared in the same run by
the compiler's `memory_analysis()` (temporaries), `cost_analysis()` (bytes accessed, FLOPs: for
the kernel these are its own `CostEstimate`, a model, not a measurement) and the scoped VMEM
Mosaic reserves for the kernel. No timings: nothing runs.

    python -m experiments.bench.mla_decode_kernel [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxmodels.kernels.mla_decode import mla_decode, vmem_bytes  # noqa: E402
from jaxmodels.ops import mla as mla_ops  # noqa: E402

LATENT, ROPE, SCALE, BLOCK = 512, 64, 0.1352338, 512
SHAPES = ((4, 128, 4096), (16, 32, 8192), (8, 16, 32768))  # (B, N, S)


def xla_core(q_latent, q_rope, c_kv, k_rope, lengths):
    """The pure-JAX absorbed attention core with a length mask (the reference)."""
    mask = (jnp.arange(c_kv.shape[1])[None, :] < lengths[:, None])[:, None]
    out = mla_ops.absorbed_latent_attention(
        q_latent[:, None], q_rope[:, None], c_kv, k_rope, mask, scale=SCALE
    )
    return out[:, :, 0]


def kernel_core(q_latent, q_rope, c_kv, k_rope, lengths):
    return mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, scale=SCALE)


def scoped_vmem(hlo_text: str) -> int | None:
    """Scoped VMEM bytes Mosaic reserved for the kernel's custom call, if the HLO records it."""
    for line in hlo_text.splitlines():
        if "tpu_custom_call" in line:
            found = re.findall(r'"used_scoped_memory_configs":\[\{[^}]*"size":"(\d+)"', line)
            if found:
                return int(found[0])
    return None


def measure(fn, args) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    return {
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "bytes_accessed": cost["bytes accessed"],
        "flops": cost["flops"],
        "vmem_bytes": scoped_vmem(compiled.as_text()),
    }


def run() -> list[dict]:
    from jax.experimental.topologies import get_topology_desc

    device = get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    rows = []
    for B, N, S in SHAPES:
        args = (
            spec((B, N, LATENT)),
            spec((B, N, ROPE)),
            spec((B, S, LATENT)),
            spec((B, S, ROPE)),
            spec((B,), jnp.int32),
        )
        xla = measure(xla_core, args)
        kernel = measure(kernel_core, args)
        rows.append(
            {
                "B": B,
                "N": N,
                "S": S,
                "cache_bytes": B * S * (LATENT + ROPE) * 2,
                "xla": xla,
                "kernel": kernel,
                "vmem_estimate_bytes": vmem_bytes(N, LATENT, ROPE, BLOCK, jnp.bfloat16),
                "bytes_accessed_ratio": kernel["bytes_accessed"] / xla["bytes_accessed"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write JSON records here")
    args = parser.parse_args(argv)
    rows = run()
    mib = 2**20
    print("| B | N | S | cache MiB | form | temp MiB | bytes accessed MiB | FLOPs | VMEM MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for form in ("xla", "kernel"):
            m = r[form]
            vmem = "" if m["vmem_bytes"] is None else f"{m['vmem_bytes'] / mib:.2f}"
            print(
                f"| {r['B']} | {r['N']} | {r['S']} | {r['cache_bytes'] / mib:.1f} | {form} | "
                f"{m['temp_bytes'] / mib:.2f} | {m['bytes_accessed'] / mib:.1f} | "
                f"{m['flops']:.3g} | {vmem} |"
            )
        print(f"  kernel / xla bytes accessed: {r['bytes_accessed_ratio']:.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
