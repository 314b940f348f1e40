"""Is the chunked gated delta rule (KDA) linear in T and faster than the alternatives?

Forward+backward time of ``delta_rule_chunked`` vs the reference ``delta_rule_recurrent`` vs
dense causal softmax attention at several sequence lengths (same batch, heads, head dim), plus
one decode step (delta-rule state update vs attention over a KV cache) and the bytes each keeps.

Targets on CPU (issue 5): chunked >= 10x faster than recurrent at T=4k; chunked
time(16k)/time(4k) <= 4.6; chunked faster than dense attention at 16k.

    python -m experiments.bench.linear_attention [--quick] [--out results.json]

Prints a table and, with ``--out``, writes JSON: one record per row; ratio fields end in
``_ratio`` (``recurrent_over_chunked_ratio`` > 1 means chunked is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxmodels.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step

# Kimi-Linear-48B (reference §5.4 and §1.5): KDA 32 heads x 128; MLA caches 512 latent + 64 key dims.
KIMI_KDA_HEADS, KIMI_KDA_HEAD_DIM, MLA_ELEMS_PER_TOKEN = 32, 128, 576


def dense_causal_attention(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array) -> jax.Array:
    """Baseline: ``softmax(q k^T / sqrt(H) + causal mask) v``, materialised scores, fp32."""
    h = q_BTNH.shape[-1]
    t, s = q_BTNH.shape[1], k_BSNH.shape[1]
    logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH) * h**-0.5
    causal_TS = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
    logits_BNTS = jnp.where(causal_TS, logits_BNTS, -jnp.inf)
    return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits_BNTS, axis=-1), v_BSNH)


def dense_per_head(q, k, v):
    """Dense attention one head at a time (``lax.map``) so 16k x 16k scores fit in memory."""
    o = jax.lax.map(
        lambda qkv: dense_causal_attention(*qkv),
        tuple(jnp.moveaxis(x, 2, 0)[:, :, :, None] for x in (q, k, v)),
    )
    return jnp.moveaxis(o[:, :, :, 0], 0, 2)


def make_inputs(key, b, t, n, h):
    kq, kk, kv, kg, kb = jax.random.split(key, 5)

    def unit(key):
        x = jax.random.normal(key, (b, t, n, h), jnp.float32)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    g = -4.0 * jax.nn.softplus(jax.random.normal(kg, (b, t, n, h)) - 4.0)
    beta = jax.nn.sigmoid(jax.random.normal(kb, (b, t, n)))
    return unit(kq), unit(kk), jax.random.normal(kv, (b, t, n, h)), g, beta


def fwd_bwd(fn: Callable, argnums: tuple[int, ...]) -> Callable:
    """jit(grad) of a scalar loss that touches every output element."""

    def loss(*args):
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out * out)

    return jax.jit(jax.grad(loss, argnums=argnums))


def time_ms(fn: Callable, args, *, min_runs: int = 3, max_runs: int = 10, budget_s: float = 4.0):
    """Median wall time (ms) of a jitted ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_training(lengths, b, n, h, chunk_size, skip_recurrent_above, skip_dense_above):
    chunked = fwd_bwd(
        lambda q, k, v, g, beta: delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size),
        (0, 1, 2, 3, 4),
    )
    recurrent = fwd_bwd(delta_rule_recurrent, (0, 1, 2, 3, 4))
    dense = fwd_bwd(dense_per_head, (0, 1, 2))
    rows = []
    for t in lengths:
        q, k, v, g, beta = make_inputs(jax.random.key(t), b, t, n, h)
        row = {"kind": "fwd_bwd", "B": b, "T": t, "N": n, "H": h, "chunk_size": chunk_size}
        row["chunked_ms"] = time_ms(chunked, (q, k, v, g, beta))
        row["recurrent_ms"] = (
            time_ms(recurrent, (q, k, v, g, beta), max_runs=3) if t <= skip_recurrent_above else None
        )
        row["dense_ms"] = time_ms(dense, (q, k, v), max_runs=3) if t <= skip_dense_above else None
        for name in ("recurrent", "dense"):
            other = row[f"{name}_ms"]
            row[f"{name}_over_chunked_ratio"] = None if other is None else other / row["chunked_ms"]
        prev = rows[-1] if rows else None
        row["chunked_growth_ratio"] = (
            row["chunked_ms"] / prev["chunked_ms"] if prev is not None else None
        )
        row["length_growth_ratio"] = t / prev["T"] if prev is not None else None
        rows.append(row)
        print(_fmt_train(row), flush=True)
    return rows


def bench_decode(contexts, b, n, h):
    """One decode token: delta-rule step on a [B,N,H,H] state vs attention over a KV cache."""
    step = jax.jit(delta_rule_step)
    attend = jax.jit(dense_causal_attention)
    rows = []
    for ctx in contexts:
        key = jax.random.key(ctx)
        q, k, v, g, beta = make_inputs(key, b, 1, n, h)
        state = jax.random.normal(key, (b, n, h, h), jnp.float32)
        kv_cache = jax.random.normal(key, (2, b, ctx, n, h), jnp.float32)
        step_args = (q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
        row = {"kind": "decode", "B": b, "context": ctx, "N": n, "H": h}
        row["delta_step_ms"] = time_ms(step, step_args, min_runs=20, max_runs=200, budget_s=1.0)
        row["attention_step_ms"] = time_ms(
            attend, (q, kv_cache[0], kv_cache[1]), min_runs=20, max_runs=200, budget_s=1.0
        )
        row["attention_over_delta_step_ratio"] = row["attention_step_ms"] / row["delta_step_ms"]
        row["delta_state_bytes"] = state.size * state.dtype.itemsize
        row["kv_cache_bytes"] = kv_cache.size * kv_cache.dtype.itemsize
        row["kv_cache_over_state_bytes_ratio"] = row["kv_cache_bytes"] / row["delta_state_bytes"]
        # Kimi-Linear-48B per layer and sequence: fp32 KDA state vs bf16 MLA latent cache.
        row["kimi_kda_state_bytes"] = KIMI_KDA_HEADS * KIMI_KDA_HEAD_DIM**2 * 4
        row["kimi_mla_cache_bytes"] = MLA_ELEMS_PER_TOKEN * ctx * 2
        row["kimi_mla_over_kda_bytes_ratio"] = (
            row["kimi_mla_cache_bytes"] / row["kimi_kda_state_bytes"]
        )
        rows.append(row)
    return rows


def _ms(x):
    return "—" if x is None else f"{x:9.1f}"


def _ratio(x):
    return "—" if x is None else f"{x:6.2f}"


TRAIN_HEADER = (
    f"{'T':>6} | {'chunked ms':>10} | {'recurrent ms':>12} | {'dense ms':>9} | "
    f"{'rec/chunk':>9} | {'dense/chunk':>11} | {'chunk growth (T x)':>18}"
)


def _fmt_train(r):
    growth = (
        "—"
        if r["chunked_growth_ratio"] is None
        else f"{r['chunked_growth_ratio']:.2f} ({r['length_growth_ratio']:.0f}x)"
    )
    return (
        f"{r['T']:>6} | {_ms(r['chunked_ms']):>10} | {_ms(r['recurrent_ms']):>12} | "
        f"{_ms(r['dense_ms']):>9} | {_ratio(r['recurrent_over_chunked_ratio']):>9} | "
        f"{_ratio(r['dense_over_chunked_ratio']):>11} | {growth:>18}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", help="write JSON records here")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="*", help="override the sequence lengths")
    parser.add_argument("--skip-recurrent-above", type=int, default=1 << 30)
    parser.add_argument("--skip-dense-above", type=int, default=1 << 30)
    args = parser.parse_args(argv)

    lengths = args.lengths or ([256, 1024] if args.quick else [1024, 4096, 16384])
    contexts = [1024] if args.quick else [4096, 32768]
    b, n, h = args.batch, args.heads, args.head_dim
    print(f"backend={jax.default_backend()} devices={jax.device_count()} B={b} N={n} H={h} fp32")
    print("forward+backward, median ms")
    print(TRAIN_HEADER)
    rows = bench_training(
        lengths, b, n, h, args.chunk_size, args.skip_recurrent_above, args.skip_dense_above
    )
    decode = bench_decode(contexts, b, n, h)
    print("\ndecode, one token, median ms; bytes per sequence per layer")
    print(
        f"{'context':>7} | {'delta step':>10} | {'attn step':>9} | {'attn/delta':>10} | "
        f"{'state B':>8} | {'KV cache B':>11} | {'Kimi KDA B':>10} | {'Kimi MLA B':>11}"
    )
    for r in decode:
        print(
            f"{r['context']:>7} | {r['delta_step_ms']:>10.3f} | {r['attention_step_ms']:>9.3f} | "
            f"{r['attention_over_delta_step_ratio']:>10.1f} | {r['delta_state_bytes']:>8} | "
            f"{r['kv_cache_bytes']:>11} | {r['kimi_kda_state_bytes']:>10} | "
            f"{r['kimi_mla_cache_bytes']:>11}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows + decode, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
