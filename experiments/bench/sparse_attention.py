"""Prefill time and memory of block-sparse attention (MoBA, NSA, ...) against dense causal
attention, measured in the same run.

Question: how much faster / smaller than dense causal attention is each sparse method's prefill
at long context? Issue target on CPU: MoBA (block 512, top-3) at least 4x faster than dense at
T = 32K (95.3 % sparsity, arXiv 2502.13189 §3.1).

Each method is one function ``bench_<method>(cfg, T, dense_row) -> list[dict]`` registered in
``METHODS``; ``main`` runs the dense baseline once per length and then every selected method, so
the ratios always compare numbers from the same process. Memory is the compiled function's
``memory_analysis().temp_size_in_bytes`` (XLA's peak scratch, inputs/outputs excluded).

Dense baseline: exact causal attention, flash-attention style (`dense_causal_flash`): query
chunk i visits key chunks 0..i only, with an online softmax. It does the causal half of the T^2
work, keeps its logits cache-sized (O(chunk^2) memory) and was the fastest dense form we found
on CPU — the fair comparison. (A materialised [T, T] XLA attention needs 16 GB of logits for 4
heads at 32K.)

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

from jaxmodels.ops import dsa as dsa_ops
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
    dense_chunk: int = 512
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


def dense_causal_flash(q, k, v, *, chunk: int):
    """Exact causal attention, flash-attention style, in plain JAX.

    Query chunk i (``chunk`` positions) visits key chunks 0..i only (a ``fori_loop`` with a
    data-dependent trip count: the causal half of the T^2 work) with an online softmax, so the
    live logits are one [chunk * G, chunk] tile per kv head — cache-resident on a CPU, and the
    fastest dense form we found there (about 2x a query-chunked form that materialises
    [chunk, T] logits). Rows are (position, head of the kv group): each tile is one plain
    matmul. Forward only (the loop is not reverse-differentiable); float32 softmax.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    C = chunk
    nc = -(-T // C)
    pad = ((0, 0), (0, nc * C - T), (0, 0), (0, 0))
    q_cBKYH = jnp.transpose(jnp.pad(q, pad).reshape(B, nc, C, K, G, H), (1, 0, 3, 2, 4, 5))
    q_cBKYH = q_cBKYH.reshape(nc, B, K, C * G, H)
    k_cBKCH = jnp.transpose(jnp.pad(k, pad).reshape(B, nc, C, K, H), (1, 0, 3, 2, 4))
    v_cBKCH = jnp.transpose(jnp.pad(v, pad).reshape(B, nc, C, K, H), (1, 0, 3, 2, 4))
    row_pos = jnp.repeat(jnp.arange(C), G)  # position inside the chunk of each row

    def one_chunk(_, xs):
        i, q_c = xs

        def body(j, state):
            m, l, acc = state
            s = (
                jnp.einsum("BKYH,BKCH->BKYC", q_c, k_cBKCH[j], preferred_element_type=jnp.float32)
                * H**-0.5
            )
            visible = (j * C + jnp.arange(C))[None, :] <= (i * C + row_pos)[:, None]
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "BKYC,BKCH->BKYH", p.astype(v.dtype), v_cBKCH[j], preferred_element_type=jnp.float32
            )
            return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

        rows = (B, K, C * G)
        init = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros(rows + (H,)))
        _, l, acc = jax.lax.fori_loop(0, i + 1, body, init)
        return None, acc / l[..., None]

    _, out = jax.lax.scan(one_chunk, None, (jnp.arange(nc), q_cBKYH))
    out = jnp.transpose(out.reshape(nc, B, K, C, G, H), (1, 0, 3, 2, 4, 5))
    return out.reshape(B, nc * C, N, H)[:, :T].astype(q.dtype)


def bench_dense(cfg: BenchConfig, T: int) -> dict:
    q, k, v = inputs(cfg, T)
    row = measure(
        lambda q, k, v: dense_causal_flash(q, k, v, chunk=cfg.dense_chunk), (q, k, v), cfg.repeats
    )
    row.update(
        method="dense",
        T=T,
        speedup_ratio=1.0,
        memory_ratio=1.0,
        decode_tokens=T,
        decode_tokens_ratio=1.0,
    )
    return row


def bench_moba(cfg: BenchConfig, T: int, dense_row: dict) -> list[dict]:
    q, k, v = inputs(cfg, T)
    bs, top_k = cfg.moba_block, cfg.moba_top_k

    def fn(q, k, v):
        return moba_attention(q, k, v, block_size=bs, top_k=top_k)

    row = measure(fn, (q, k, v), cfg.repeats)
    tokens = moba_decode_tokens(T, bs, top_k)
    row.update(
        method=f"moba(b{bs},k{top_k})",
        T=T,
        sparsity=moba_sparsity(T, bs, top_k),
        decode_tokens=tokens,
        decode_tokens_ratio=T / tokens,
    )
    return [with_ratios(row, dense_row)]


def bench_nsa(cfg: BenchConfig, T: int, dense_row: dict) -> list[dict]:
    q, k, v = inputs(cfg, T)
    hp = dict(cmp_block=cfg.nsa_cmp_block, cmp_stride=cfg.nsa_cmp_stride)
    gates = jnp.full(q.shape[:3] + (3,), 0.5, q.dtype)

    def fn(q, k, v):  # one k/v for all branches (fla's simplification), mean-pooled phi
        k_cmp, v_cmp = nsa_compress(k, **hp), nsa_compress(v, **hp)
        return nsa_attention(
            q,
            k_cmp_BMKH=k_cmp,
            v_cmp_BMKH=v_cmp,
            k_slc_BSKH=k,
            v_slc_BSKH=v,
            k_win_BSKH=k,
            v_win_BSKH=v,
            gates_BTN3=gates,
            slc_block=cfg.nsa_slc_block,
            num_selected=cfg.nsa_selected,
            window=cfg.nsa_window,
            **hp,
        )

    row = measure(fn, (q, k, v), cfg.repeats)
    tokens = nsa_decode_tokens(
        T,
        slc_block=cfg.nsa_slc_block,
        num_selected=cfg.nsa_selected,
        window=cfg.nsa_window,
        **hp,
    )
    row.update(method="nsa", T=T, decode_tokens=tokens, decode_tokens_ratio=T / tokens)
    return [with_ratios(row, dense_row)]


@dataclasses.dataclass(frozen=True)
class DSABench:
    """DSA (DeepSeek-V3.2) settings: a small lightning indexer (V3.2: 64 heads x 128) and the
    gather form over query blocks, causal key prefixes in ``prefix_chunks`` chunks."""

    topks: tuple[int, ...] = (512, 2048)
    index_heads: int = 4
    index_head_dim: int = 32
    block_q: int = 128
    prefix_chunks: int = 8


DSA = DSABench()


def dsa_rows(cfg: BenchConfig, T: int, dense_row: dict, dsa: DSABench = DSA) -> list[dict]:
    """DSA prefill (indexer + shared top-k + gather attention) at each top-k, and the indexer's
    share of the time (selection alone, same blocking).

    The latent entry is the single kv head's key (MQA form, the entry doubles as the value as
    MLA's c_kv does): the same q·k and p·v work per selected key as the dense baseline per key.
    """
    q, k, _ = inputs(cfg, T)
    kv = k[:, :, 0]
    ki, kw, kk = jax.random.split(jax.random.PRNGKey(1), 3)
    J, I = dsa.index_heads, dsa.index_head_dim
    dt = jnp.dtype(cfg.dtype)
    iq = jax.random.normal(ki, (cfg.batch, T, J, I), dt)
    iw = dsa_ops.indexer_head_weights(jax.random.normal(kw, (cfg.batch, T, J), dt), I)
    ik = jax.random.normal(kk, (cfg.batch, T, I), dt)
    blocking = dict(block_q=dsa.block_q, num_prefix_chunks=dsa.prefix_chunks)
    rows = []
    for topk in dsa.topks:

        def attend(q, kv, iq, iw, ik, topk=topk):
            return dsa_ops.dsa_attention(
                q,
                kv,
                iq,
                iw,
                ik,
                topk=topk,
                value_dim=cfg.head_dim,
                scale=cfg.head_dim**-0.5,
                **blocking,
            )

        def select(iq, iw, ik, topk=topk):
            return dsa_ops.dsa_select(iq, iw, ik, topk=topk, **blocking)[0]

        row = measure(attend, (q, kv, iq, iw, ik), cfg.repeats)
        indexer = measure(select, (iq, iw, ik), cfg.repeats)
        tokens = min(topk, T)
        row.update(
            method=f"dsa(k{topk})",
            T=T,
            topk=topk,
            index_heads=J,
            index_head_dim=I,
            indexer_time_s=indexer["time_s"],
            indexer_temp_bytes=indexer["temp_bytes"],
            indexer_share_ratio=indexer["time_s"] / row["time_s"],
            decode_tokens=tokens,
            decode_tokens_ratio=T / tokens,
        )
        print(
            f"  dsa(k{topk}) T={T}: indexer+top-k {indexer['time_s'] * 1e3:.0f} ms of "
            f"{row['time_s'] * 1e3:.0f} ms ({row['indexer_share_ratio']:.0%})",
            flush=True,
        )
        rows.append(with_ratios(row, dense_row))
    return rows


METHODS: dict[str, Callable[[BenchConfig, int, dict], list[dict]]] = {
    "moba": bench_moba,
    "nsa": bench_nsa,
    "dsa": dsa_rows,
}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


TABLE_HEAD = (
    f"{'method':<16}{'T':>7}{'time ms':>11}{'temp MiB':>10}{'speedup':>9}{'mem':>7}"
    f"{'dec tok':>9}{'dec ratio':>10}"
)


def format_row(r: dict) -> str:
    return (
        f"{r['method']:<16}{r['T']:>7}{r['time_s'] * 1e3:>11.1f}"
        f"{r['temp_bytes'] / 2**20:>10.1f}{r['speedup_ratio']:>8.2f}x"
        f"{r['memory_ratio']:>7.3f}{r['decode_tokens']:>9}{r['decode_tokens_ratio']:>9.1f}x"
    )


def print_table(rows: list[dict]) -> None:
    print(TABLE_HEAD)
    for r in rows:
        print(format_row(r))


def run(cfg: BenchConfig, lengths: list[int], methods: list[str]) -> list[dict]:
    """Dense baseline then each method, per length; rows are printed as they are measured."""
    rows = []
    print(TABLE_HEAD, flush=True)
    for T in lengths:
        new = [bench_dense(cfg, T)]
        print(format_row(new[0]), flush=True)
        for name in methods:
            for row in METHODS[name](cfg, T, new[0]):
                print(format_row(row), flush=True)
                new.append(row)
        rows.extend(new)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 32768]
    )
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
    cfg = BenchConfig(
        heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, repeats=a.repeats, dtype=a.dtype
    )
    lengths = a.lengths
    if a.quick:
        cfg = dataclasses.replace(cfg, repeats=2, moba_block=128, nsa_window=128, dense_chunk=256)
        lengths = [1024, 2048]
    print(
        f"backend={jax.default_backend()} B={cfg.batch} N={cfg.heads} K={cfg.kv_heads} "
        f"H={cfg.head_dim} dtype={cfg.dtype}"
    )
    rows = run(cfg, lengths, a.methods)
    print()
    print_table(rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
