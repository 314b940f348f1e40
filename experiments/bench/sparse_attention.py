"""Prefill time and memory of block-sparse attention (MoBA, NSA, ...) against dense causal
attention, measured in the same run.

Question: how much faster / smaller than dense causal attention is each sparse method's prefill
at long context? Issue target on CPU: MoBA (block 512, top-3) at least 4x faster than dense at
T = 32K (95.3 % sparsity, arXiv 2502.13189 §3.1).

Each method is one function ``bench_<method>(cfg, T, dense_row) -> list[dict]`` registered in
``METHODS``; ``main`` runs the dense baseline once per length and then every selected method, so
the ratios always compare numbers from the same process. Memory is the compiled function's
``memory_analysis().temp_size_in_bytes`` (XLA's peak scratch, inputs/outputs excluded).

Dense baseline: exact causal attention computed query-chunk by query-chunk, each chunk against
the keys up to its end only (``attention_reference`` per chunk). It does the causal half of the
T^2 work — the fair comparison on CPU — and its memory is O(chunk * T), so T = 32K fits where a
materialised [T, T] XLA attention (16 GB of logits for 4 heads) would not.

Usage::

    python -m experiments.bench.sparse_attention --out /tmp/sparse.json
    python -m experiments.bench.sparse_attention --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxmodels.ops.attention import attention_reference
from jaxmodels.ops.moba import moba_attention, moba_decode_tokens, moba_sparsity
from jaxmodels.ops.nsa import nsa_attention, nsa_compress, nsa_decode_tokens


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch: int = 1
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 64
    dtype: str = "float32"
    repeats: int = 3
    dense_chunk: int = 1024
    # MoBA (paper: block 512, top-3 at 8K-32K)
    moba_block: int = 512
    moba_top_k: int = 3
    # NSA (paper defaults; compression by mean pooling, as fla)
    nsa_cmp_block: int = 32
    nsa_cmp_stride: int = 16
    nsa_slc_block: int = 64
    nsa_selected: int = 16
    nsa_window: int = 512


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def inputs(cfg: BenchConfig, T: int, seed: int = 0):
    """Random q [B, T, N, H], k and v [B, T, K, H]."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    dt = jnp.dtype(cfg.dtype)
    q = jax.random.normal(kq, (cfg.batch, T, cfg.heads, cfg.head_dim), dt)
    k = jax.random.normal(kk, (cfg.batch, T, cfg.kv_heads, cfg.head_dim), dt)
    v = jax.random.normal(kv, (cfg.batch, T, cfg.kv_heads, cfg.head_dim), dt)
    return q, k, v


def measure(fn: Callable, args: tuple, repeats: int) -> dict:
    """Compile ``fn``, read its temp memory, warm up, and time the median of ``repeats`` runs."""
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "temp_bytes": temp}


def with_ratios(row: dict, dense_row: dict) -> dict:
    row["speedup_ratio"] = dense_row["time_s"] / row["time_s"]
    row["memory_ratio"] = row["temp_bytes"] / max(dense_row["temp_bytes"], 1)
    return row


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def dense_causal_chunked(q, k, v, *, chunk: int):
    """Exact causal attention, query chunk i against keys [0, (i + 1) * chunk) only."""
    T, H = q.shape[1], q.shape[-1]
    outs = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        q_pos = jnp.arange(start, end)
        mask = (jnp.arange(end)[None, :] <= q_pos[:, None])[None]
        outs.append(
            attention_reference(q[:, start:end], k[:, :end], v[:, :end], mask, scale=H**-0.5)
        )
    return jnp.concatenate(outs, axis=1)


def bench_dense(cfg: BenchConfig, T: int) -> dict:
    q, k, v = inputs(cfg, T)
    row = measure(lambda q, k, v: dense_causal_chunked(q, k, v, chunk=cfg.dense_chunk),
                  (q, k, v), cfg.repeats)
    row.update(method="dense", T=T, speedup_ratio=1.0, memory_ratio=1.0, decode_tokens=T,
               decode_tokens_ratio=1.0)
    return row


def bench_moba(cfg: BenchConfig, T: int, dense_row: dict) -> list[dict]:
    q, k, v = inputs(cfg, T)
    bs, top_k = cfg.moba_block, cfg.moba_top_k

    def fn(q, k, v):
        return moba_attention(q, k, v, block_size=bs, top_k=top_k)

    row = measure(fn, (q, k, v), cfg.repeats)
    tokens = moba_decode_tokens(T, bs, top_k)
    row.update(method=f"moba(b{bs},k{top_k})", T=T, sparsity=moba_sparsity(T, bs, top_k),
               decode_tokens=tokens, decode_tokens_ratio=T / tokens)
    return [with_ratios(row, dense_row)]


def bench_nsa(cfg: BenchConfig, T: int, dense_row: dict) -> list[dict]:
    q, k, v = inputs(cfg, T)
    hp = dict(cmp_block=cfg.nsa_cmp_block, cmp_stride=cfg.nsa_cmp_stride)
    gates = jnp.full(q.shape[:3] + (3,), 0.5, q.dtype)

    def fn(q, k, v):  # one k/v for all branches (fla's simplification), mean-pooled phi
        k_cmp, v_cmp = nsa_compress(k, **hp), nsa_compress(v, **hp)
        return nsa_attention(
            q, k_cmp_BMKH=k_cmp, v_cmp_BMKH=v_cmp, k_slc_BSKH=k, v_slc_BSKH=v, k_win_BSKH=k,
            v_win_BSKH=v, gates_BTN3=gates, slc_block=cfg.nsa_slc_block,
            num_selected=cfg.nsa_selected, window=cfg.nsa_window, **hp,
        )

    row = measure(fn, (q, k, v), cfg.repeats)
    tokens = nsa_decode_tokens(
        T, slc_block=cfg.nsa_slc_block, num_selected=cfg.nsa_selected, window=cfg.nsa_window,
        **hp,
    )
    row.update(method="nsa", T=T, decode_tokens=tokens, decode_tokens_ratio=T / tokens)
    return [with_ratios(row, dense_row)]


METHODS: dict[str, Callable[[BenchConfig, int, dict], list[dict]]] = {
    "moba": bench_moba,
    "nsa": bench_nsa,
}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    head = f"{'method':<16}{'T':>7}{'time ms':>11}{'temp MiB':>10}{'speedup':>9}{'mem':>7}"
    head += f"{'dec tok':>9}{'dec ratio':>10}"
    print(head)
    for r in rows:
        print(
            f"{r['method']:<16}{r['T']:>7}{r['time_s'] * 1e3:>11.1f}"
            f"{r['temp_bytes'] / 2**20:>10.1f}{r['speedup_ratio']:>8.2f}x"
            f"{r['memory_ratio']:>7.3f}{r['decode_tokens']:>9}{r['decode_tokens_ratio']:>9.1f}x"
        )


def run(cfg: BenchConfig, lengths: list[int], methods: list[str]) -> list[dict]:
    rows = []
    for T in lengths:
        dense_row = bench_dense(cfg, T)
        rows.append(dense_row)
        for name in methods:
            rows.extend(METHODS[name](cfg, T, dense_row))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                   default=[4096, 16384, 32768])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="small sizes, sub-minute smoke run")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    a = p.parse_args(argv)
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    cfg = BenchConfig(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                      repeats=a.repeats, dtype=a.dtype)
    lengths = a.lengths
    if a.quick:
        cfg = dataclasses.replace(cfg, repeats=2, moba_block=128, nsa_window=128,
                                  dense_chunk=512)
        lengths = [1024, 2048]
    print(f"backend={jax.default_backend()} B={cfg.batch} N={cfg.heads} K={cfg.kv_heads} "
          f"H={cfg.head_dim} dtype={cfg.dtype}")
    rows = run(cfg, lengths, a.methods)
    print_table(rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
