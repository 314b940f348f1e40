"""Study 5 (issue 11): long-context cost — prefill and decode time against context length.

Question: how do the prefill time of T tokens and the time of one decode step at context T grow
with T for dense attention, MLA, the Kimi Linear hybrid (KDA:MLA 3:1), DSA (MLA + lightning
indexer top-k), the DeepSeek-V4 hybrid (CSA / HCA) and MoBA, measured on a CPU? The growth is
summarised by the exponent p of a least-squares fit time ~ c T^p on log-log axes.

Published claims it checks (/work/shared/reference/attention.md): dense softmax attention costs
O(T^2) to prefill and O(T) per decode step (it reads every cached key); the linear-attention
hybrid and the sparse methods cost less: KDA is O(T) to prefill and O(1) per decode step (so
the 3:1 hybrid keeps a quarter of MLA's growing part), MoBA attends top-k blocks (O(T·k·block)
plus an O(T^2 / block) gate), DSA attends top-k tokens (its lightning indexer still scores
every past token, O(T^2) with a small constant), V4 compresses the keys 4x (CSA, indexer
top-k) or 128x (HCA) beside a fixed sliding window.

What is timed: the library's own attention modules (the registry's `module_cls`, float32,
batch 1), one layer at a time, all at model width D = 256 with 4 query heads, in the same run:

  * dense: MHA, 4 heads x 64 (`GQAConfig`, XLA `dot_product_attention`, [T, T] logits);
  * mla: 4 heads, nope 64 + rope 32, values 64, latent 128, query LoRA 128 ("mha" prefill
    form, absorbed decode over the latent cache);
  * kda_hybrid: the per-layer mean of a 4-layer pattern (3 KDA + 1 MLA), i.e.
    (3 x KDA + 1 x mla) / 4, the MLA layer being the `mla` row's (Kimi Linear's MLA has no
    RoPE and no query LoRA: O(T) differences that do not change the growth); KDA: 4 heads x 64,
    conv 4, chunk 64;
  * dsa: the `mla` layer plus an indexer of 4 heads x 32, top-512 (gather form, query blocks of
    128, 8 causal prefix chunks);
  * v4_hybrid: the per-layer mean of one CSA layer (ratio 4, indexer 4 x 32, top-512) and one HCA
    layer (ratio 128), (CSA + HCA) / 2: 41 of V4-Flash's 43 layers alternate the two (the two
    window-only layers are left out); head 128 (the single KV head as wide as MLA's latent, as
    V4-Flash's 512 = V3's kv_lora_rank), rope 32, query LoRA 128, 2 output groups of 128,
    window 128;
  * moba: the dense layer's projections (4 heads x 64, 4 kv heads) with MoBA attention, block
    512, top-3 (the paper's 8K-32K setting).

Phases:
  * prefill: the cache-free forward of T tokens (`module.apply(params, x, positions)`), the
    training path; MoBA's and NSA's cached prefill runs token by token in this library, so the
    cache-free forward is the one every method has. Median of up to 3 runs after a warm-up
    (`experiments.bench.linear_attention.time_ms`: one run only when a run exceeds 4 s);
  * decode: one token through the layer with its cache of capacity T (`init_cache`) filled with
    random values and its fill counter set to T - n - 1: one untimed (compiling) step, then n
    timed steps at positions T - n .. T - 1 (n = 48, context ~T), median; the cache is donated
    (updated in place, as a real decode loop does). The steps of all lengths are interleaved
    (one step of each length in turn), so that the drifting load of other jobs hits every
    length alike. Filling the cache by a real prefill would cost minutes at 16K and does not
    change the work of a step.

Reference (prefill only): the dense layer's attention core alone (q, k, v of 4 heads x 64, no
projections) in the flash form of `experiments.bench.sparse_attention.dense_causal_flash`
(causal key chunks of 512, online softmax): the same O(T^2) work without materialising the
[N, T, T] logits that the layer's XLA form writes (4 GiB at 16K), to tell the algorithmic
exponent from the memory traffic's.

Times: median wall ms and median process CPU ms (every thread of this process): the machine is
shared with other jobs, so the exponents are fitted to CPU time; wall times are in the JSON.
Hybrid rows combine the component layers' times (wall with wall, CPU with CPU); the component
layers (kda, v4_csa, v4_hca) are recorded too. Exponent: least squares of log(cpu ms) on log(T)
over the lengths >= 4096 (`--fit-from`; all lengths in `--quick`). Decode times at short
contexts are dominated by the fixed cost of a step (projections, dispatch), so decode exponents
are the growth over 4K-16K, not the asymptotic order.

    python -m experiments.studies.long_context --out docs/results    # ~10-12 min on 2 CPU cores
    python -m experiments.studies.long_context --quick               # seconds (the test's run)

Writes `long_context.json` (`records`: one per method, phase and T, with wall_ms and cpu_ms;
`exponents`; the same for the component layers and the reference) and `long_context.png`
(prefill and decode, log-log, one line per method) under `--out`. Peak memory ~9.5 GB (the
dense and MLA layers' [N, T, T] logits at 16K); 32K would need 4x that, so it is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.linear_attention import time_ms
from experiments.bench.sparse_attention import dense_causal_flash
from experiments.plotting import pyplot, save_figure
from experiments.studies.output import write_results
from jaxmodels import registry
from jaxmodels.attention.dsa import DSAConfig
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.attention.kda import KDAConfig
from jaxmodels.attention.mla import MLAConfig
from jaxmodels.attention.moba import MoBAConfig
from jaxmodels.attention.v4 import V4Config
from jaxmodels.config import AttentionConfig, BlockSettings, RopeConfig

LENGTHS = (1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (128, 256)
# --quick compiles without LLVM optimisation and without XLA:CPU's fusion emitters: a few times
# less compile time, which dominates a smoke run; its times are not meaningful, only that every
# method and phase runs.
QUICK_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
PHASES = ("prefill", "decode")

# method -> ((layer, weight), ...): the method's per-layer time is the weighted mean.
METHODS: dict[str, tuple[tuple[str, int], ...]] = {
    "dense": (("gqa", 1),),
    "mla": (("mla", 1),),
    "kda_hybrid": (("kda", 3), ("mla", 1)),
    "dsa": (("dsa", 1),),
    "v4_hybrid": (("v4_csa", 1), ("v4_hca", 1)),
    "moba": (("moba", 1),),
}
REFERENCE = "dense_flash_core"
LABELS = {
    REFERENCE: "dense core, flash form (ref.)",
    "dense": "dense (MHA)",
    "mla": "MLA",
    "kda_hybrid": "KDA:MLA 3:1",
    "dsa": "DSA (MLA + top-k)",
    "v4_hybrid": "V4 CSA/HCA",
    "moba": "MoBA",
}


@dataclasses.dataclass(frozen=True)
class Dims:
    """Common width of every layer (module docstring); `quick` shrinks it for the test."""

    hidden: int = 256
    heads: int = 4
    head_dim: int = 64
    rope: int = 32
    latent: int = 128  # MLA kv_lora_rank
    q_lora: int = 128
    v4_head_dim: int = 128
    window: int = 128
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 512
    dsa_block_q: int = 128
    kda_chunk: int = 64
    moba_block: int = 512
    moba_top_k: int = 3
    flash_chunk: int = 512
    decode_steps: int = 48

    @classmethod
    def quick(cls) -> Dims:
        return cls(
            hidden=64,
            heads=2,
            head_dim=16,
            rope=8,
            latent=32,
            q_lora=32,
            v4_head_dim=32,
            window=16,
            hca_ratio=16,
            index_heads=2,
            index_head_dim=16,
            index_topk=32,
            dsa_block_q=32,
            kda_chunk=16,
            moba_block=32,
            flash_chunk=64,
            decode_steps=3,
        )


def layer_config(layer: str, dims: Dims) -> AttentionConfig:
    """The attention config of one timed layer (`gqa`, `mla`, `kda`, `dsa`, `v4_csa`, ...)."""
    d = dims
    mla = MLAConfig(
        num_heads=d.heads,
        q_lora_rank=d.q_lora,
        kv_lora_rank=d.latent,
        qk_nope_head_dim=d.head_dim,
        qk_rope_head_dim=d.rope,
        v_head_dim=d.head_dim,
        rope=RopeConfig(layout="interleaved"),
    )
    v4 = V4Config(
        num_attention_heads=d.heads,
        head_dim=d.v4_head_dim,
        qk_rope_head_dim=d.rope,
        q_lora_rank=d.q_lora,
        o_groups=2,
        o_lora_rank=d.v4_head_dim,
        sliding_window=d.window,
        index_n_heads=d.index_heads,
        index_head_dim=d.index_head_dim,
        index_topk=d.index_topk,
        query_chunk=256,
    )
    builders = {
        "gqa": lambda: GQAConfig(num_heads=d.heads, num_kv_heads=d.heads, head_dim=d.head_dim),
        "mla": lambda: mla,
        "kda": lambda: KDAConfig(
            num_heads=d.heads, head_dim=d.head_dim, conv_kernel_size=4, chunk_size=d.kda_chunk
        ),
        "dsa": lambda: DSAConfig.from_mla(
            mla,
            index_n_heads=d.index_heads,
            index_head_dim=d.index_head_dim,
            index_topk=d.index_topk,
            index_block_q=d.dsa_block_q,
            index_prefix_chunks=8,
        ),
        "v4_csa": lambda: dataclasses.replace(v4, compress_ratio=d.csa_ratio),
        "v4_hca": lambda: dataclasses.replace(v4, compress_ratio=d.hca_ratio),
        "moba": lambda: MoBAConfig(
            num_heads=d.heads,
            num_kv_heads=d.heads,
            head_dim=d.head_dim,
            block_size=d.moba_block,
            top_k=d.moba_top_k,
        ),
    }
    if layer not in builders:
        raise ValueError(f"unknown layer {layer!r}; choose from {sorted(builders)}")
    return builders[layer]()


def method_layers(method: str, dims: Dims) -> dict[str, tuple[AttentionConfig, int]]:
    """Layer name -> (attention config, weight) of a method; ValueError naming an unknown one."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    return {layer: (layer_config(layer, dims), w) for layer, w in METHODS[method]}


# --------------------------------------------------------------------------------------------
# Measuring one layer


def _index_field(cache, value: int) -> dict:
    """`replace` keywords setting a cache's fill counter (DSA keeps it in `latent`)."""
    index = jnp.asarray(np.int32(value))
    if hasattr(cache, "latent"):
        return {"latent": cache.latent.replace(index=index)}
    return {"index": index}


def _random_like(shapes, scale: float, seed: int):
    """Arrays shaped as the `jax.eval_shape` tree `shapes`: floating leaves scale * N(0, 1),
    the others zero. Drawn by numpy and transferred: no per-shape compilation."""
    rng = np.random.default_rng(seed)

    def draw(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray((scale * rng.standard_normal(x.shape)).astype(x.dtype))
        return jnp.asarray(np.zeros(x.shape, x.dtype))

    return jax.tree.map(draw, shapes)


def random_cache(module_cls, config, length: int, fill: int, seed: int = 0):
    """`init_cache` of capacity `length` with random float leaves and the counter at `fill`."""
    shapes = jax.eval_shape(lambda: module_cls.init_cache(config, None, 1, length, jnp.float32))
    cache = _random_like(shapes, 0.1, seed)
    return cache.replace(**_index_field(cache, fill))


def build_layer(config: AttentionConfig, dims: Dims, compiler_options=None, random_params=False):
    """(module, parameters) of one layer; the parameters do not depend on the length.

    `random_params`: N(0, 0.02) draws in the shapes of `module.init` instead of the module's
    own initialisers (`--quick`: saves compiling the initialisation; the times do not depend
    on the values)."""
    module_cls = registry.attention_kind(config.kind).module_cls
    module = module_cls(config=config, settings=BlockSettings(hidden_size=dims.hidden))
    args = (jax.random.key(0), np.zeros((1, 8, dims.hidden), np.float32), np.arange(8)[None])
    if random_params:
        return module, _random_like(nn.meta.unbox(jax.eval_shape(module.init, *args)), 0.02, 0)
    params = jax.jit(module.init, compiler_options=compiler_options)(*args)
    return module, nn.meta.unbox(params)


def _inputs(dims: Dims, T: int):
    """x [1, T, D] (N(0, 1), seeded by T) as a numpy array, and positions [1, T]."""
    x_np = np.random.default_rng(T).standard_normal((1, T, dims.hidden)).astype(np.float32)
    return x_np, jnp.asarray(np.arange(T, dtype=np.int32)[None])


def measure_prefill(module, params, dims: Dims, T: int, compiler_options=None):
    """(wall ms, CPU ms) of the cache-free forward of T tokens through a layer.

    `compiler_options`: XLA options of every compilation (`--quick`: a fast, unoptimised
    compile; the default run compiles as usual)."""
    x_np, pos_BT = _inputs(dims, T)
    forward = jax.jit(
        lambda p, x, pos: module.apply(p, x, pos)[0], compiler_options=compiler_options
    )
    return time_ms(forward, (params, jnp.asarray(x_np), pos_BT), max_runs=3, budget_s=4.0)


def measure_decode(module, params, dims: Dims, lengths, compiler_options=None) -> dict:
    """T -> (median wall ms, median CPU ms) of one donated decode step at context ~T.

    Each length gets a random cache of capacity T with its counter at T - n - 1 and one
    untimed (compiling) step; then the n timed steps (positions T - n .. T - 1) of all lengths
    are interleaved, one step of each length in turn, so that the load of other jobs, which
    drifts over seconds, hits every length alike (steps take ~1 ms)."""
    step = jax.jit(module.apply, donate_argnums=3, compiler_options=compiler_options)
    state, samples = {}, {T: [] for T in lengths}

    def once(T):
        pos = jnp.asarray(np.full((1, 1), state[T]["position"], np.int32))
        c0, t0 = time.process_time(), time.perf_counter()
        out, state[T]["cache"] = step(params, state[T]["x"], pos, state[T]["cache"])
        jax.block_until_ready(out)
        state[T]["position"] += 1
        return time.perf_counter() - t0, time.process_time() - c0

    for T in lengths:
        n = min(dims.decode_steps, T // 2)
        x_np, _ = _inputs(dims, T)
        cache = random_cache(type(module), module.config, T, T - n - 1)
        state[T] = {"cache": cache, "x": jnp.asarray(x_np[:, -1:]), "position": T - n - 1}
        once(T)  # compile
    while any(state[T]["position"] < T for T in lengths):
        for T in lengths:
            if state[T]["position"] < T:
                samples[T].append(once(T))
    return {
        T: (
            1e3 * statistics.median(r[0] for r in runs),
            1e3 * statistics.median(r[1] for r in runs),
        )
        for T, runs in samples.items()
    }


# --------------------------------------------------------------------------------------------
# The study


def fit_exponent(lengths, times) -> float:
    """Slope p of the least-squares line log(time) = log(c) + p log(T)."""
    lengths, times = np.asarray(lengths, float), np.asarray(times, float)
    if len(lengths) < 2 or np.any(times <= 0):
        raise ValueError(f"need >= 2 positive times to fit an exponent, got {times.tolist()}")
    slope, _ = np.polyfit(np.log(lengths), np.log(times), 1)
    return float(slope)


def measure_flash_reference(dims: Dims, T: int, compiler_options=None):
    """(wall ms, CPU ms) of the prefill reference: the dense layer's attention core alone (q, k,
    v of 4 heads x 64, no projections) in the flash form of `experiments.bench.sparse_attention`
    (causal key chunks only, online softmax, O(chunk^2) live logits): the O(T^2) work without
    the materialised [N, T, T] logits of the layer's XLA form."""
    rng = np.random.default_rng(T)
    shape = (1, T, dims.heads, dims.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(3))
    chunk = min(dims.flash_chunk, T)
    fn = jax.jit(
        lambda q, k, v: dense_causal_flash(q, k, v, chunk=chunk), compiler_options=compiler_options
    )
    return time_ms(fn, (q, k, v), max_runs=3, budget_s=4.0)


def run(
    methods, lengths, dims: Dims, *, quick: bool = False, log=print
) -> tuple[list[dict], list[dict], list[dict]]:
    """Measures every layer the methods need at each length (one layer after the other:
    prefill at each length, then the decode steps of all lengths interleaved), then the flash
    reference.

    Returns (layer rows, method rows, reference rows). Layer rows: {layer, T, phase, wall_ms,
    cpu_ms}; method rows: the same for each method, its layers' times combined by weight
    (per-layer mean of the method's layer pattern); reference rows: prefill of
    `measure_flash_reference`, method "dense_flash_core".
    """
    specs = {m: method_layers(m, dims) for m in methods}
    layers = {}
    for spec in specs.values():
        layers.update({name: config for name, (config, _) in spec.items()})
    options = QUICK_COMPILER_OPTIONS if quick else None
    layer_rows, method_rows, reference_rows = [], [], []
    for name, config in layers.items():
        t0 = time.perf_counter()
        module, params = build_layer(config, dims, options, random_params=quick)
        times = {}
        for T in lengths:
            times[T] = {"prefill": measure_prefill(module, params, dims, T, options)}
        decode = measure_decode(module, params, dims, lengths, options)
        for T in lengths:
            times[T]["decode"] = decode[T]
            (pw, pc), (dw, dc) = times[T]["prefill"], times[T]["decode"]
            log(
                f"  {name:<7} T={T:>6} prefill {pw:9.1f} ms (cpu {pc:9.1f})  "
                f"decode {dw:7.3f} ms (cpu {dc:7.3f})",
                flush=True,
            )
            for phase in PHASES:
                wall, cpu = times[T][phase]
                layer_rows.append(
                    {"layer": name, "T": T, "phase": phase, "wall_ms": wall, "cpu_ms": cpu}
                )
        log(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    for T in lengths:
        wall, cpu = measure_flash_reference(dims, T, options)
        log(f"  flash   T={T:>6} prefill {wall:9.1f} ms (cpu {cpu:9.1f})  (reference)", flush=True)
        reference_rows.append(
            {"method": REFERENCE, "T": T, "phase": "prefill", "wall_ms": wall, "cpu_ms": cpu}
        )
    by = {(r["layer"], r["phase"], r["T"]): r for r in layer_rows}
    for method, spec in specs.items():
        total = sum(w for _, w in spec.values())
        for T in lengths:
            for phase in PHASES:
                row = {"method": method, "T": T, "phase": phase}
                for unit in ("wall_ms", "cpu_ms"):
                    parts = (w * by[(n, phase, T)][unit] for n, (_, w) in spec.items())
                    row[unit] = sum(parts) / total
                method_rows.append(row)
    return layer_rows, method_rows, reference_rows


def exponents(rows: list[dict], key: str, fit_from: int, phases=PHASES) -> list[dict]:
    """Fitted exponents per (method or layer: `key`, phase), over the lengths >= `fit_from`
    (all lengths when fewer than two reach it): `exponent` from CPU time, `wall_exponent` from
    wall time; None with a single length."""
    out = []
    for name in dict.fromkeys(r[key] for r in rows):
        for phase in phases:
            pts = sorted(
                (r["T"], r["cpu_ms"], r["wall_ms"])
                for r in rows
                if r[key] == name and r["phase"] == phase
            )
            used = [p for p in pts if p[0] >= fit_from]
            used = used if len(used) >= 2 else pts
            lengths = [p[0] for p in used]
            fit = {key: name, "phase": phase, "fit_lengths": lengths}
            for field, i in (("exponent", 1), ("wall_exponent", 2)):
                fit[field] = fit_exponent(lengths, [p[i] for p in used]) if len(used) > 1 else None
            out.append(fit)
    return out


def _slope_label(value) -> str:
    return "n/a" if value is None else f"{round(value, 2) + 0.0:.2f}"  # + 0.0: no "-0.00"


def plot(rows: list[dict], fits: list[dict], path: str, title: str = "") -> None:
    """Two log-log panels (prefill, decode): CPU ms against T, one line per method (the flash
    reference dashed, prefill only), the fitted exponent in the legend; gray dotted guides of
    slope 1 and 2 (prefill) or 0 and 1 (decode)."""
    plt = pyplot()

    slope = {(f["method"], f["phase"]): f["exponent"] for f in fits}
    lengths = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 5), dpi=110)
    for ax, phase, guides in zip(axes, PHASES, ((1, 2), (0, 1)), strict=True):
        firsts = []
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted(
                (r["T"], r["cpu_ms"]) for r in rows if r["method"] == method and r["phase"] == phase
            )
            if not pts:
                continue
            label = f"{LABELS.get(method, method)}  ~T^{_slope_label(slope[(method, phase)])}"
            style = dict(ls="--", color="black", lw=1.2) if method == REFERENCE else dict(lw=1.6)
            if method != REFERENCE:
                firsts.append(pts[0][1])
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, label=label, **style)
        anchor = float(np.median(firsts))
        for p in guides:
            end = anchor * (lengths[-1] / lengths[0]) ** p
            ax.plot([lengths[0], lengths[-1]], [anchor, end], ls=":", color="gray", lw=0.9)
            ax.annotate(f"T^{p}", (lengths[-1], end), color="gray", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{T // 1024}K" if T >= 1024 else str(T) for T in lengths])
        ax.set_yscale("log")
        ax.set_xlabel("context length T (tokens)")
        ax.set_ylabel("process CPU ms per layer")
        what = "prefill of T tokens" if phase == "prefill" else "one decode step at context T"
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        fit_from = min(f["fit_lengths"][0] for f in fits)
        ax.legend(fontsize=7.5, title=f"exponent fitted over T >= {fit_from}", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def _fmt(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def print_table(rows: list[dict], fits: list[dict]) -> None:
    """Markdown table: CPU ms per method and phase at each length, and the fitted exponents."""
    lengths = sorted({r["T"] for r in rows})
    fit = {(f["method"], f["phase"]): f for f in fits}
    cpu = {(r["method"], r["phase"], r["T"]): r["cpu_ms"] for r in rows}
    head = " | ".join(f"{T // 1024}K" if T >= 1024 else str(T) for T in lengths)
    print(f"| method | phase | {head} | exponent (CPU) | exponent (wall) |")
    print("| --- | --- |" + " ---: |" * (len(lengths) + 2))
    for phase in PHASES:
        for method in dict.fromkeys(r["method"] for r in rows):
            if (method, phase) not in fit:
                continue
            cells = " | ".join(_fmt(cpu[(method, phase, T)]) for T in lengths)
            f = fit[(method, phase)]
            print(
                f"| {LABELS.get(method, method)} | {phase} | {cells} | "
                f"{_slope_label(f['exponent'])} | {_slope_label(f['wall_exponent'])} |"
            )
    print("(process CPU ms per layer; wall ms in the JSON)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for long_context.json and long_context.png")
    p.add_argument("--quick", action="store_true", help="tiny width and lengths (seconds)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--fit-from", type=int, default=4096, help="fit over lengths >= this")
    a = p.parse_args(argv)
    for m in a.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    dims = Dims.quick() if a.quick else Dims()
    lengths = a.lengths or list(QUICK_LENGTHS if a.quick else LENGTHS)
    fit_from = 0 if a.quick else a.fit_from
    print(f"backend={jax.default_backend()} lengths={lengths} {dims}", flush=True)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    layer_rows, rows, reference_rows = run(a.methods, lengths, dims, quick=a.quick)
    fits = exponents(rows, "method", fit_from)
    result = {
        "config": dataclasses.asdict(dims),
        "quick": a.quick,
        "lengths": lengths,
        "fit_from": fit_from,
        "methods": {m: dict(METHODS[m]) for m in a.methods},
        "records": rows,
        "exponents": fits,
        "layer_records": layer_rows,
        "layer_exponents": exponents(layer_rows, "layer", fit_from),
        "reference_records": reference_rows,
        "reference_exponents": exponents(reference_rows, "method", fit_from, ("prefill",)),
        "study_wall_s": time.perf_counter() - start_wall,
        "study_cpu_s": time.process_time() - start_cpu,
    }
    print_table(rows + reference_rows, fits + result["reference_exponents"])
    print(f"study: {result['study_wall_s']:.0f} s wall, {result['study_cpu_s']:.0f} s CPU")
    if a.out:
        title = (
            f"Long-context cost on CPU: one attention layer, width {dims.hidden}, "
            f"{dims.heads} heads, batch 1, float32"
        )
        write_results(
            a.out,
            "long_context",
            result,
            lambda path: plot(
                rows + reference_rows, fits + result["reference_exponents"], path, title=title
            ),
        )
    return result


if __name__ == "__main__":
    main()
