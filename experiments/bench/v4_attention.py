"""DeepSeek-V4 hybrid attention (CSA / HCA alternating) against MLA and dense GQA: prefill time,
decode-step time and KV-cache bytes per token, measured in the same run; plus the cache ratio of
our V4 layout against MLA / V3.2 at the published full-size dimensions (32K and 1M context).

Question: how much cache and time does V4's compressed attention save at long context?
DeepSeek's README claims V4 needs ~10 % of V3.2's KV cache at 1M tokens.

What is timed (one attention layer, batch 1, float32 on CPU, the library's own modules):
  * prefill: the whole context through the module's cache path in chunks of `--chunk` tokens
    (chunked prefill: memory bounded for every method; the dense baselines attend over all
    cache slots, masked, so their cost is O(T^2));
  * decode: one token per step at the last positions of a context of T with a cache of
    capacity T (costs do not depend on the cache contents, so the cache is not filled first);
    caches are donated (updated in place) in both measurements.
Times: median wall seconds and median process CPU seconds (the table's speed-ups use CPU time,
which other jobs on a shared machine disturb far less; both ratios are in the JSON).
The V4 hybrid row is the mean of one CSA layer (ratio 4, indexer top-k) and one HCA layer
(ratio 128): the per-layer average of a CSA/HCA-alternating stack. `*_ratio` fields compare
against dense GQA (speed-ups: GQA time / method time) and MLA (cache: method bytes / MLA bytes).

Cache bytes per token are exact byte counts of the cache pytrees (`init_cache` shapes, bf16
activations; V4's gate ring is float32) divided by the context length: V4's window ring and
partial-block rings are fixed-size, so they amortise.

Usage::

    python -m experiments.bench.v4_attention --out /tmp/v4.json
    python -m experiments.bench.v4_attention --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.attention.gqa import GQAConfig, GQAttention
from jaxmodels.attention.mla import MLAConfig, MLAttention
from jaxmodels.attention.v4 import V4Attention, V4Config
from jaxmodels.config import BlockSettings, RopeConfig


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Bench dimensions: V4-Flash / DeepSeek-V3 proportions scaled to a CPU.

    V4's single KV head is as wide as MLA's latent (V4-Flash 512 = V3's kv_lora_rank), its
    rope dims as MLA's; indexer top-k 512 and window 128 as V4-Flash.
    """

    hidden: int = 512
    heads: int = 8
    latent: int = 256  # MLA kv_lora_rank = V4 head_dim
    rope: int = 32
    head_dim: int = 64  # GQA head dim, MLA nope / v head dim
    gqa_kv_heads: int = 2
    q_lora: int = 256
    window: int = 128
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_heads: int = 8
    index_head_dim: int = 32
    index_topk: int = 512
    o_groups: int = 2
    chunk: int = 1024
    repeats: int = 3


def layer_configs(cfg: BenchConfig) -> dict[str, object]:
    v4 = V4Config(
        num_attention_heads=cfg.heads,
        head_dim=cfg.latent,
        qk_rope_head_dim=cfg.rope,
        q_lora_rank=cfg.q_lora,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.latent,
        sliding_window=cfg.window,
        index_n_heads=cfg.index_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        query_chunk=256,
    )
    return {
        "gqa": GQAConfig(num_heads=cfg.heads, num_kv_heads=cfg.gqa_kv_heads, head_dim=cfg.head_dim),
        "mla": MLAConfig(
            num_heads=cfg.heads,
            q_lora_rank=cfg.q_lora,
            kv_lora_rank=cfg.latent,
            qk_nope_head_dim=cfg.head_dim,
            qk_rope_head_dim=cfg.rope,
            v_head_dim=cfg.head_dim,
            rope=RopeConfig(layout="interleaved"),
        ),
        "v4_csa": dataclasses.replace(v4, compress_ratio=cfg.csa_ratio),
        "v4_hca": dataclasses.replace(v4, compress_ratio=cfg.hca_ratio),
    }


MODULES = {"gqa": GQAttention, "mla": MLAttention, "v4_csa": V4Attention, "v4_hca": V4Attention}


def cache_nbytes(module_cls, config, length: int, dtype=jnp.bfloat16) -> int:
    """Exact bytes of one layer's decode cache for a context of `length` (no allocation)."""
    shapes = jax.eval_shape(lambda: module_cls.init_cache(config, None, 1, length, dtype))
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of `repeats` calls of `fn`.

    Process CPU time counts every thread of this process (XLA's included) and is far less
    sensitive than wall time to other jobs on a shared machine.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def bench_layer(name: str, config, cfg: BenchConfig, T: int) -> dict:
    """Prefill and decode times of one layer at context T, and its cache bytes per token."""
    module = MODULES[name](config, BlockSettings(hidden_size=cfg.hidden))
    rng = np.random.default_rng(0)
    chunk = min(cfg.chunk, T)
    x = jnp.asarray(rng.standard_normal((1, chunk, cfg.hidden)), jnp.float32)
    pos0 = jnp.arange(chunk)[None]
    params = nn.meta.unbox(module.init(jax.random.key(0), x[:, :8], pos0[:, :8]))
    step = jax.jit(module.apply, donate_argnums=3)  # the cache is updated in place

    def new_cache(index=0):
        cache = module.init_cache(config, None, 1, T, jnp.float32)
        return cache.replace(index=jnp.asarray(index, jnp.int32))

    def prefill():
        cache, out = new_cache(), None
        for start in range(0, T, chunk):
            out, cache = step(params, x, pos0 + start, cache)
        return out, cache

    jax.block_until_ready(step(params, x, pos0, new_cache()))  # compile
    prefill_s, prefill_cpu_s = _time(prefill, 1 if T >= 16384 else cfg.repeats)

    # decode: the last `repeats` positions of the context, one token per step
    n = max(cfg.repeats, 5)
    state = {"cache": new_cache(T - n - 1)}
    x1 = x[:, :1]

    def decode():
        index = int(state["cache"].index)
        out, state["cache"] = step(params, x1, jnp.full((1, 1), index), state["cache"])
        return out

    decode()  # compile
    decode_s, decode_cpu_s = _time(decode, n)
    return {
        "method": name,
        "T": T,
        "prefill_s": prefill_s,
        "prefill_cpu_s": prefill_cpu_s,
        "decode_s": decode_s,
        "decode_cpu_s": decode_cpu_s,
        "cache_bytes_per_token": cache_nbytes(MODULES[name], config, T) / T,
    }


def hybrid_row(csa: dict, hca: dict) -> dict:
    """The per-layer mean of a CSA/HCA-alternating stack."""
    row = {"method": "v4_hybrid", "T": csa["T"]}
    for key in ("prefill_s", "prefill_cpu_s", "decode_s", "decode_cpu_s", "cache_bytes_per_token"):
        row[key] = (csa[key] + hca[key]) / 2
    return row


def with_ratios(rows: list[dict]) -> list[dict]:
    by = {(r["method"], r["T"]): r for r in rows}
    for r in rows:
        gqa, mla = by[("gqa", r["T"])], by[("mla", r["T"])]
        r["prefill_speedup_ratio"] = gqa["prefill_s"] / r["prefill_s"]
        r["decode_speedup_ratio"] = gqa["decode_s"] / r["decode_s"]
        r["prefill_cpu_speedup_ratio"] = gqa["prefill_cpu_s"] / r["prefill_cpu_s"]
        r["decode_cpu_speedup_ratio"] = gqa["decode_cpu_s"] / r["decode_cpu_s"]
        r["cache_vs_mla_ratio"] = r["cache_bytes_per_token"] / mla["cache_bytes_per_token"]
        r["cache_vs_gqa_ratio"] = r["cache_bytes_per_token"] / gqa["cache_bytes_per_token"]
    return rows


# --------------------------------------------------------------------------------------------
# Full-size cache accounting (no allocation: shapes only)


def v4_flash_layers() -> list[V4Config]:
    """DeepSeek-V4-Flash's 43 attention layers (config.json: compress_ratios [0, 0, 4, 128,
    ..., 4], head 512 / rope 64, window 128, indexer 64 x 128), reference/attention.md §2.4."""
    base = V4Config(
        num_attention_heads=64,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=1024,
        o_groups=8,
        o_lora_rank=1024,
        sliding_window=128,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=512,
    )
    ratios = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(41)]
    return [dataclasses.replace(base, compress_ratio=r) for r in ratios]


def full_size_rows(lengths=(32768, 1 << 20)) -> list[dict]:
    """Cache bytes per token of V4-Flash (our layout, bf16) vs DeepSeek-V3 MLA (61 layers of
    576 values) and V3.2 (MLA + the DSA indexer's 128-value key), all bf16."""
    layers = v4_flash_layers()
    mla_v3 = 61 * (512 + 64) * 2
    v32 = 61 * (512 + 64 + 128) * 2
    rows = []
    for T in lengths:
        v4 = sum(cache_nbytes(V4Attention, c, T) for c in layers) / T
        entries = sum(
            (c.head_dim + (c.index_head_dim if c.is_csa else 0)) * 2 / c.ratio
            for c in layers
            if c.ratio
        )
        rows.append(
            {
                "method": "v4_flash_full_size",
                "T": T,
                "cache_bytes_per_token": v4,
                "entries_only_bytes_per_token": entries,
                "mla_v3_bytes_per_token": mla_v3,
                "v3_2_bytes_per_token": v32,
                "cache_vs_mla_ratio": v4 / mla_v3,
                "cache_vs_v3_2_ratio": v4 / v32,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------


def run(cfg: BenchConfig, lengths: list[int]) -> list[dict]:
    configs = layer_configs(cfg)
    rows = []
    for T in lengths:
        per = {}
        for name, config in configs.items():
            per[name] = bench_layer(name, config, cfg, T)
            r = per[name]
            print(
                f"  T={T:>6} {name:<7} prefill {r['prefill_s']:8.3f}s (cpu "
                f"{r['prefill_cpu_s']:8.3f}s)  decode {1e3 * r['decode_s']:8.2f}ms (cpu "
                f"{1e3 * r['decode_cpu_s']:8.2f}ms)  "
                f"cache {r['cache_bytes_per_token']:8.1f} B/token",
                flush=True,
            )
        rows += [per["gqa"], per["mla"], hybrid_row(per["v4_csa"], per["v4_hca"])]
        rows += [per["v4_csa"], per["v4_hca"]]
    return with_ratios(rows)


def print_table(rows: list[dict], full: list[dict]) -> None:
    head = (
        f"{'method':<10} {'T':>6} {'prefill s':>10} {'(cpu s)':>9} {'decode ms':>10} "
        f"{'(cpu ms)':>9} {'cache B/tok':>12} {'prefill x':>10} {'decode x':>9} {'cache/MLA':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['method']:<10} {r['T']:>6} {r['prefill_s']:>10.3f} {r['prefill_cpu_s']:>9.2f} "
            f"{1e3 * r['decode_s']:>10.2f} {1e3 * r['decode_cpu_s']:>9.2f} "
            f"{r['cache_bytes_per_token']:>12.1f} {r['prefill_cpu_speedup_ratio']:>10.2f} "
            f"{r['decode_cpu_speedup_ratio']:>9.2f} {r['cache_vs_mla_ratio']:>10.3f}"
        )
    print("(x: speed-up against GQA in process CPU time; wall-time ratios are in the JSON)")
    print("\nfull size (V4-Flash, 43 layers, our layout in bf16) vs DeepSeek-V3 MLA / V3.2:")
    for r in full:
        print(
            f"  T={r['T']:>8}: V4 {r['cache_bytes_per_token']:>8.0f} B/token "
            f"(entries alone {r['entries_only_bytes_per_token']:.0f}), MLA-V3 "
            f"{r['mla_v3_bytes_per_token']}, V3.2 {r['v3_2_bytes_per_token']} -> "
            f"{100 * r['cache_vs_mla_ratio']:.1f} % of MLA, "
            f"{100 * r['cache_vs_v3_2_ratio']:.1f} % of V3.2"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 32768]
    )
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens per call)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small sizes, sub-minute smoke run")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    a = p.parse_args(argv)
    cfg = BenchConfig(chunk=a.chunk, repeats=a.repeats)
    lengths = a.lengths
    if a.quick:
        cfg = dataclasses.replace(
            cfg,
            hidden=128,
            heads=4,
            latent=64,
            head_dim=32,
            q_lora=64,
            index_topk=64,
            hca_ratio=64,
            chunk=512,
            repeats=2,
        )
        lengths = [1024]
    print(f"backend={jax.default_backend()} {cfg}")
    rows = run(cfg, lengths)
    full = full_size_rows()
    print_table(rows, full)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "rows": rows + full}, f, indent=2)
    return rows + full


if __name__ == "__main__":
    main()
