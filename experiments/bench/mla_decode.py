"""Is MLA's absorbed decode over the latent cache faster and smaller than the alternatives?

One attention layer at matched model width (DeepSeek-V2-Lite's attention: D 2048, 16 heads,
nope 128 + rope 64, values 128, latent 512, no query compression), one jitted decode step with
the cache donated, at several context lengths:

  * `absorbed`: MLA, latent cache (C + R = 576 values per token), absorbed (MQA) form;
  * `per_head`: MLA, per-head cache (N (H + R + Hv) = 5,120 values per token), MHA form — the
    DeepSeek demo's `attn_impl="naive"`, MaxText's default;
  * `gqa`: grouped-query attention, 16 heads of 128 and 8 kv heads (2,048 values per token);
  * `per_head_hm`, `gqa_hm`: the same two with head-major caches [B, heads, S, dim], written
    here (same parameters, same function: checked on the first call). The library's caches are
    [B, S, heads, dim], over which XLA:CPU's decode step is slower; the twins keep the
    comparison honest.

The per-head MLA cache holds the up-projected latent cache, so all MLA rows compute the same
outputs (checked). Plus prefill (the full forward of T tokens) and chunked prefill (T tokens
appended to a filled latent cache) in the MHA and the absorbed form.

Targets on CPU (issue 4): absorbed decode at 32k context >= 3x faster than the per-head cache,
and a cache >= 8x smaller.

    python -m experiments.bench.mla_decode [--quick] [--out results.json]

Timings interleave the methods (one call of each in turn) and report medians of wall time and
of process CPU time (the machines are shared: ratios, not absolute times). JSON: one record per
row; `per_head_over_absorbed_ratio` > 1 means absorbed is faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.attention.gqa import GQAConfig, GQAttention
from jaxmodels.attention.mla import (
    REFERENCE_CONFIGS,
    MLAHeadCache,
    MLAttention,
    cache_bytes_per_token,
    mla_softmax_scale,
    rope_frequencies,
)
from jaxmodels.config import BlockSettings, RopeConfig
from jaxmodels.ops import mla as mla_ops
from jaxmodels.ops import rope as rope_ops
from jaxmodels.ops.norms import rms_norm

WIDTH = 2048
MLA = REFERENCE_CONFIGS["deepseek-v2-lite"]
GQA = GQAConfig(num_heads=16, num_kv_heads=8, head_dim=128, rope=RopeConfig())
# name -> (module class, config, parameter set, head-major twin of)
METHODS = {
    "absorbed": (MLAttention, MLA, "mla", None),
    "per_head": (MLAttention, dataclasses.replace(MLA, decode_form="mha"), "mla", None),
    "per_head_hm": (None, dataclasses.replace(MLA, decode_form="mha"), "mla", "per_head"),
    "gqa": (GQAttention, GQA, "gqa", None),
    "gqa_hm": (None, GQA, "gqa", "gqa"),
}
BASELINES = ("per_head", "per_head_hm", "gqa", "gqa_hm")


def cache_bytes(name: str, dtype) -> int:
    """Cache bytes per token per layer of a method."""
    config = METHODS[name][1]
    if isinstance(config, GQAConfig):
        return 2 * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize
    return cache_bytes_per_token(config, dtype)


def init_params(cls, config, settings):
    x = jnp.zeros((1, 1, settings.hidden_size), settings.dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda key: nn.meta.unbox(cls(config, settings).init(key, x, pos))["params"])
    return init(jax.random.key(0))


def filled_cache(cls, config, settings, batch, context, free, rng):
    """A library cache of `context` slots with random contents, `free` slots left at the end."""
    cache = cls.init_cache(config, settings, batch, context, settings.dtype)
    leaves, treedef = jax.tree.flatten(cache)
    filled = [
        jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32), x.dtype) if x.ndim else x
        for x in leaves
    ]
    cache = jax.tree.unflatten(treedef, filled)
    return cache.replace(index=jnp.asarray(context - free, jnp.int32))


def module_step(cls, config, settings):
    """Jitted decode step of a library module, the cache donated."""
    module = cls(config, settings)

    def step(params, x_B1D, cache):
        positions = jnp.broadcast_to(cache.index, x_B1D.shape[:2])
        return module.apply({"params": params}, x_B1D, positions, cache)

    return jax.jit(step, donate_argnums=(2,))


# Head-major per-head caches ([B, heads, S, dim]). The library's per-head caches (GQA's KVCache,
# MLA's decode_form="mha") are [B, S, heads, dim], like DeepSeek's demo; XLA:CPU runs the
# batched matrix-vector products of a decode step over that layout about 10x slower than over a
# head-major one, so these twins (same parameters, same function) keep the baselines honest.


def _write_head_major(buffer_BNSX, new_BTNX, index):
    new_BNTX = jnp.swapaxes(new_BTNX, 1, 2).astype(buffer_BNSX.dtype)
    return jax.lax.dynamic_update_slice(buffer_BNSX, new_BNTX, (0, 0, index, 0))


def _softmax_over_filled(logits_BNTS, index):
    visible_S = jnp.arange(logits_BNTS.shape[-1]) <= index
    return jax.nn.softmax(jnp.where(visible_S, logits_BNTS.astype(jnp.float32), -jnp.inf), -1)


def mla_head_major_step(config, settings):
    """MLA decode step (MHA form) over a head-major per-head cache (k [B,N,S,H+R], v [B,N,S,Hv])."""
    H, C = config.qk_nope_head_dim, config.kv_lora_rank
    inv_freq, rope_scaling = rope_frequencies(config)
    scale = mla_softmax_scale(config)
    rope = dict(layout=config.rope.layout, attention_scaling=rope_scaling)

    def step(params, x_B1D, cache):
        k_BNSX, v_BNSH, index = cache
        positions = jnp.broadcast_to(index, x_B1D.shape[:2])
        q_BTNX = jnp.einsum("BTD,DNX->BTNX", x_B1D, params["q_proj"]["kernel"])
        kv_a_BTX = x_B1D @ params["kv_a_proj"]["kernel"]
        c_kv_BTC = rms_norm(kv_a_BTX[..., :C], params["kv_a_norm"]["scale"])
        k_rope_BTR = rope_ops.apply_rope(kv_a_BTX[..., C:], positions, inv_freq, **rope)
        q_rope_BTNR = rope_ops.apply_rope(q_BTNX[..., H:], positions, inv_freq, **rope)
        q_BTNX = jnp.concatenate([q_BTNX[..., :H], q_rope_BTNR], -1)
        k_BTNX, v_BTNH = mla_ops.mha_keys_values(
            c_kv_BTC, k_rope_BTR, params["kv_b_proj"]["kernel"], H
        )
        k_BNSX = _write_head_major(k_BNSX, k_BTNX, index)
        v_BNSH = _write_head_major(v_BNSH, v_BTNH, index)
        logits_BNTS = jnp.einsum("BTNX,BNSX->BNTS", q_BTNX, k_BNSX) * scale
        probs_BNTS = _softmax_over_filled(logits_BNTS, index).astype(v_BNSH.dtype)
        out_BTNH = jnp.einsum("BNTS,BNSH->BTNH", probs_BNTS, v_BNSH)
        y_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, params["o_proj"]["kernel"])
        return y_BTD, (k_BNSX, v_BNSH, index + 1)

    return jax.jit(step, donate_argnums=(2,))


def gqa_head_major_step(config, settings):
    """GQA decode step over a head-major cache (k, v [B, K, S, H])."""
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    inv_freq = rope_ops.rope_inv_freq(H, config.rope.theta)

    def step(params, x_B1D, cache):
        k_BKSH, v_BKSH, index = cache
        positions = jnp.broadcast_to(index, x_B1D.shape[:2])
        proj = {
            n: jnp.einsum("BTD,DNH->BTNH", x_B1D, params[n]["kernel"])
            for n in ("q_proj", "k_proj", "v_proj")
        }
        rotate = dict(layout=config.rope.layout)
        q_BTNH = rope_ops.apply_rope(proj["q_proj"], positions, inv_freq, **rotate)
        k_BTKH = rope_ops.apply_rope(proj["k_proj"], positions, inv_freq, **rotate)
        k_BKSH = _write_head_major(k_BKSH, k_BTKH, index)
        v_BKSH = _write_head_major(v_BKSH, proj["v_proj"], index)
        B, T = x_B1D.shape[:2]
        q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
        logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH) * H**-0.5
        probs = _softmax_over_filled(logits, index).astype(v_BKSH.dtype)
        out_BTNH = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BKSH).reshape(B, T, N, H)
        y_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, params["o_proj"]["kernel"])
        return y_BTD, (k_BKSH, v_BKSH, index + 1)

    return jax.jit(step, donate_argnums=(2,))


@functools.partial(jax.jit, static_argnums=())
def up_project(c_kv_BSC, k_rope_BSR, kv_b_CNX):
    return mla_ops.mha_keys_values(c_kv_BSC, k_rope_BSR, kv_b_CNX, MLA.qk_nope_head_dim)


def interleaved_medians(calls: dict[str, Callable[[], object]], runs: int, budget_s: float):
    """Median wall / CPU ms of each (already warm) call, running them in turn."""
    wall = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    start = time.perf_counter()
    while min(map(len, wall.values())) < runs or (
        time.perf_counter() - start < budget_s and min(map(len, wall.values())) < 3 * runs
    ):
        for name, call in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(call())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: 1e3 * statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    return med, med_cpu


def _step_method(steps, params, x, state, name):
    """One decode step of method `name`; its (donated) cache in `state` is replaced."""
    y, state[name] = steps[name](params[METHODS[name][2]], x, state[name])
    return y


def bench_decode(contexts, batch, dtype, runs, budget_s):
    settings = BlockSettings(hidden_size=WIDTH, dtype=dtype, param_dtype=dtype)
    rng = np.random.default_rng(0)
    params = {
        "mla": init_params(MLAttention, MLA, settings),
        "gqa": init_params(GQAttention, GQA, settings),
    }
    steps = {}
    for name, (cls, config, _, twin) in METHODS.items():
        if twin is None:
            steps[name] = module_step(cls, config, settings)
        elif isinstance(config, GQAConfig):
            steps[name] = gqa_head_major_step(config, settings)
        else:
            steps[name] = mla_head_major_step(config, settings)
    x = jnp.asarray(rng.standard_normal((batch, 1, WIDTH), dtype=np.float32), dtype)
    rows = []
    for context in contexts:
        free = 3 * runs + 2  # slots for the warm-up and every timed step
        state = {
            "absorbed": filled_cache(MLAttention, MLA, settings, batch, context, free, rng),
            "gqa": filled_cache(GQAttention, GQA, settings, batch, context, free, rng),
        }
        # The per-head cache holds the up-projected latents, so all MLA rows compute one function.
        latent = state["absorbed"]
        k, v = up_project(latent.c_kv, latent.k_rope, params["mla"]["kv_b_proj"]["kernel"])
        state["per_head"] = MLAHeadCache(k=k, v=v, index=jnp.array(latent.index, copy=True))
        for name in ("per_head_hm", "gqa_hm"):  # the same contents, head-major
            library = state[METHODS[name][3]]
            heads_first = tuple(jnp.swapaxes(a, 1, 2) for a in (library.k, library.v))
            state[name] = heads_first + (jnp.array(library.index, copy=True),)

        call = functools.partial(_step_method, steps, params, x, state)
        first = {name: call(name) for name in METHODS}  # warm-up (compiles), then a check:
        for name, same_as in [
            ("per_head", "absorbed"),
            ("per_head_hm", "absorbed"),
            ("gqa_hm", "gqa"),
        ]:
            scale = float(jnp.max(jnp.abs(first[same_as])))
            np.testing.assert_allclose(first[name], first[same_as], atol=1e-3 * scale)
        calls = {name: functools.partial(call, name) for name in METHODS}
        wall, cpu = interleaved_medians(calls, runs, budget_s)
        row = {"kind": "decode", "B": batch, "context": context, "dtype": jnp.dtype(dtype).name}
        for name in METHODS:
            row[f"{name}_ms"], row[f"{name}_cpu_ms"] = wall[name], cpu[name]
            row[f"{name}_cache_bytes_per_token"] = cache_bytes(name, dtype)
            row[f"{name}_cache_bytes"] = cache_bytes(name, dtype) * context * batch
        for name in BASELINES:
            row[f"{name}_over_absorbed_ratio"] = wall[name] / wall["absorbed"]
            row[f"{name}_over_absorbed_cpu_ratio"] = cpu[name] / cpu["absorbed"]
            row[f"{name}_over_absorbed_cache_ratio"] = (
                row[f"{name}_cache_bytes_per_token"] / row["absorbed_cache_bytes_per_token"]
            )
        del state
        rows.append(row)
        print(_fmt_decode(row), flush=True)
    return rows


def _jitted_forward(module):
    return jax.jit(lambda p, x, pos: module.apply({"params": p}, x, pos)[0])


def bench_prefill(lengths, batch, dtype, runs, budget_s):
    """Full forward of T tokens (what prefill computes) in the MHA and the absorbed form."""
    settings = BlockSettings(hidden_size=WIDTH, dtype=dtype, param_dtype=dtype)
    configs = {form: dataclasses.replace(MLA, form=form) for form in ("mha", "absorbed")}
    params = init_params(MLAttention, MLA, settings)
    rng = np.random.default_rng(1)
    rows = []
    for length in lengths:
        x = jnp.asarray(rng.standard_normal((batch, length, WIDTH), dtype=np.float32), dtype)
        pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
        fns = {form: _jitted_forward(MLAttention(cfg, settings)) for form, cfg in configs.items()}
        calls = {form: functools.partial(f, params, x, pos) for form, f in fns.items()}
        out = {form: jax.block_until_ready(c()) for form, c in calls.items()}  # warm-up
        scale = float(jnp.max(jnp.abs(out["mha"])))
        np.testing.assert_allclose(out["absorbed"], out["mha"], atol=1e-3 * scale)
        wall, cpu = interleaved_medians(calls, runs, budget_s)
        row = {"kind": "prefill", "B": batch, "T": length, "dtype": jnp.dtype(dtype).name}
        row["mha_ms"], row["mha_cpu_ms"] = wall["mha"], cpu["mha"]
        row["absorbed_ms"], row["absorbed_cpu_ms"] = wall["absorbed"], cpu["absorbed"]
        row["absorbed_over_mha_ratio"] = wall["absorbed"] / wall["mha"]
        row["absorbed_over_mha_cpu_ratio"] = cpu["absorbed"] / cpu["mha"]
        rows.append(row)
        print(_fmt_prefill(row), flush=True)
    return rows


def bench_chunked_prefill(chunks, context, batch, dtype, runs, budget_s):
    """A T-token chunk appended to a latent cache already holding `context` tokens, in each form.

    The MHA form up-projects every cached latent for each chunk (S C N (H + Hv) MACs), the
    absorbed form only the chunk's queries, but its attention costs N (2C + R) MACs per
    (query, key) pair against N (H + R + Hv) for MHA: absorbed wins for short chunks.
    """
    settings = BlockSettings(hidden_size=WIDTH, dtype=dtype, param_dtype=dtype)
    params = init_params(MLAttention, MLA, settings)
    rng = np.random.default_rng(2)
    cache = filled_cache(MLAttention, MLA, settings, batch, context + max(chunks), 0, rng)
    cache = cache.replace(index=jnp.asarray(context, jnp.int32))
    rows = []
    for chunk in chunks:
        x = jnp.asarray(rng.standard_normal((batch, chunk, WIDTH), dtype=np.float32), dtype)
        pos = jnp.broadcast_to(context + jnp.arange(chunk), (batch, chunk))
        calls = {
            form: functools.partial(
                _jitted_cached_forward(MLAttention(dataclasses.replace(MLA, form=form), settings)),
                params, x, pos, cache,
            )
            for form in ("mha", "absorbed")
        }  # fmt: skip
        out = {form: jax.block_until_ready(c()) for form, c in calls.items()}  # warm-up
        scale = float(jnp.max(jnp.abs(out["mha"])))
        np.testing.assert_allclose(out["absorbed"], out["mha"], atol=1e-3 * scale)
        wall, cpu = interleaved_medians(calls, runs, budget_s)
        row = {"kind": "chunked_prefill", "B": batch, "T": chunk, "context": context,
               "dtype": jnp.dtype(dtype).name}  # fmt: skip
        row["mha_ms"], row["mha_cpu_ms"] = wall["mha"], cpu["mha"]
        row["absorbed_ms"], row["absorbed_cpu_ms"] = wall["absorbed"], cpu["absorbed"]
        row["absorbed_over_mha_ratio"] = wall["absorbed"] / wall["mha"]
        row["absorbed_over_mha_cpu_ratio"] = cpu["absorbed"] / cpu["mha"]
        rows.append(row)
        print(_fmt_prefill(row), flush=True)
    return rows


def _jitted_cached_forward(module):
    return jax.jit(lambda p, x, pos, cache: module.apply({"params": p}, x, pos, cache)[0])


DECODE_HEADER = (
    f"{'context':>7} | {'absorbed':>8} | {'per-head':>8} | {'per-head hm':>11} | {'gqa':>7} | "
    f"{'gqa hm':>7} | {'per-head/abs':>12} | {'per-head hm/abs':>15} | {'gqa/abs':>7} | "
    f"{'gqa hm/abs':>10}"
)
PREFILL_HEADER = f"{'T':>7} | {'mha ms':>9} | {'absorbed ms':>11} | {'absorbed/mha':>12}"


def _fmt_decode(r):
    times = " | ".join(
        f"{r[f'{n}_ms']:>{w}.1f}" for n, w in zip(METHODS, (8, 8, 11, 7, 7), strict=True)
    )
    ratios = " | ".join(
        f"{r[f'{n}_over_absorbed_ratio']:>{w - 1}.2f}x"
        for n, w in zip(BASELINES, (12, 15, 7, 10), strict=True)
    )
    return f"{r['context']:>7} | {times} | {ratios}"


def _fmt_prefill(r):
    return (
        f"{r['T']:>7} | {r['mha_ms']:>9.1f} | {r['absorbed_ms']:>11.1f} | "
        f"{r['absorbed_over_mha_ratio']:>11.2f}x"
    )


def cache_table(dtype) -> list[str]:
    lines = [f"cache bytes per token per layer ({jnp.dtype(dtype).name}), and over absorbed:"]
    for name in ("absorbed", "per_head", "gqa"):
        size = cache_bytes(name, dtype)
        ratio = size / cache_bytes("absorbed", dtype)
        lines.append(f"  {name:>9}: {size:>7,} B  ({ratio:.2f}x)")
    return lines


def check_targets(rows):
    lines = []
    for r in rows:
        if r["kind"] == "decode" and r["context"] >= 32768:
            for name in ("per_head", "per_head_hm"):
                speed = r[f"{name}_over_absorbed_ratio"]
                cpu = r[f"{name}_over_absorbed_cpu_ratio"]
                lines.append(
                    f"target absorbed >= 3x faster than {name} at {r['context']}: {speed:.2f}x "
                    f"wall, {cpu:.2f}x cpu ({'met' if speed >= 3 else 'NOT met'})"
                )
            cache = r["per_head_over_absorbed_cache_ratio"]
            lines.append(
                f"target cache >= 8x smaller: {cache:.2f}x ({'met' if cache >= 8 else 'NOT met'})"
            )
    for kind in ("prefill", "chunked_prefill"):
        prefill = [r for r in rows if r["kind"] == kind]
        if prefill:
            faster = [
                f"T={r['T']}: {'MHA' if r['absorbed_over_mha_ratio'] > 1 else 'absorbed'} "
                f"({max(r['absorbed_over_mha_ratio'], 1 / r['absorbed_over_mha_ratio']):.2f}x)"
                for r in prefill
            ]
            where = "" if kind == "prefill" else f" after {prefill[0]['context']} cached tokens"
            lines.append(f"{kind}{where}, faster form: " + "; ".join(faster))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--contexts", type=int, nargs="*", default=None)
    parser.add_argument("--prefill-lengths", type=int, nargs="*", default=None)
    parser.add_argument("--chunk-lengths", type=int, nargs="*", default=None)
    parser.add_argument("--chunk-context", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None, help="timed calls per method")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    contexts = args.contexts or ([1024, 4096] if args.quick else [1024, 8192, 32768])
    lengths = args.prefill_lengths or ([128, 256] if args.quick else [256, 1024])
    runs = args.runs or (3 if args.quick else 7)
    budget = 2.0 if args.quick else 10.0
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; B={args.batch}, {dtype.name}; "
        f"width {WIDTH}, MLA {MLA.num_heads} heads (latent {MLA.kv_lora_rank} + rope "
        f"{MLA.qk_rope_head_dim}), GQA {GQA.num_heads} heads / {GQA.num_kv_heads} kv heads"
    )
    for line in cache_table(dtype):
        print(line)
    print("decode step (one layer), median wall ms; hm = head-major cache layout")
    print(DECODE_HEADER)
    rows = bench_decode(contexts, args.batch, dtype, runs, budget)
    print("prefill (full forward of T tokens, one layer), median wall ms")
    print(PREFILL_HEADER)
    rows += bench_prefill(lengths, args.batch, dtype, max(3, runs // 2), budget)
    chunks = args.chunk_lengths or ([8, 64] if args.quick else [16, 128, 512])
    context = args.chunk_context or (1024 if args.quick else 8192)
    print(f"chunked prefill (T tokens after {context} cached ones, one layer), median wall ms")
    print(PREFILL_HEADER)
    rows += bench_chunked_prefill(chunks, context, args.batch, dtype, 3, budget)
    for line in check_targets(rows):
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
