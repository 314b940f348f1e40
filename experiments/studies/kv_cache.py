"""Study 1 (issue 11): decode-cache bytes per token at published model dimensions.

Question: how much memory per token of context does each attention design keep for decoding,
at DeepSeek-V3, DeepSeek-V3.2, Kimi K2, Kimi-Linear-48B and DeepSeek-V4-Flash dimensions, at
4K, 128K and 1M tokens? Every number is the byte size of the library's own `init_caches`
pytree for the whole layer stack (batch 1, bf16 activations, caches sized to the context),
divided by the context length. Nothing is allocated: the caches are traced with
`jax.eval_shape`, so 1M-token caches of 61-layer models cost nothing.

Published figures it checks (/work/shared/reference/attention.md §1.5, §8.1, §5.7, §2.4):
  * MLA at DeepSeek-V3 dims in bf16: 576 values x 2 B x 61 layers = 70,272 B/token; Kimi K2 the
    same (independent of the head count);
  * MHA with V3's 128 heads of 128 (the 2·n_h·d_h convention): 3,997,696 B/token;
  * Kimi Linear: "KV cache reduced up to 75 %" (7 of 27 layers keep a KV cache: 74.1 % fewer
    bytes than an all-MLA stack at long context);
  * DeepSeek-V4: about 10 % of V3.2's KV cache at 1M context (reported for V4-Pro).

    python -m experiments.studies.kv_cache --out docs/results     # JSON + PNG, < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from experiments.plotting import pyplot, save_figure
from experiments.presets import get_preset
from experiments.studies.output import write_results
from jaxmodels.attention.dsa import DSAConfig
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.config import ModelConfig
from jaxmodels.model import init_caches

CONTEXTS = (4096, 131072, 1 << 20)


def _full_size(name: str) -> ModelConfig:
    return get_preset(name).model


def _v3_with(attention) -> ModelConfig:
    """DeepSeek-V3's 61-layer stack with every layer's attention replaced by `attention`."""
    v3 = _full_size("deepseek-v3-attn")
    return dataclasses.replace(v3, layer_pattern=("attn",), attention={"attn": attention})


def _v32() -> ModelConfig:
    """DeepSeek-V3.2: V3's MLA plus the lightning indexer (64 heads x 128, top-2048)."""
    mla = _full_size("deepseek-v3-attn").attention["mla"]
    dsa = DSAConfig.from_mla(mla, index_n_heads=64, index_head_dim=128, index_topk=2048)
    return _v3_with(dsa)


def architectures() -> dict[str, Callable[[], ModelConfig]]:
    """Row name -> full-size model config (shape only)."""
    return {
        "MHA (V3 dims, 128 heads x 128)": lambda: _v3_with(
            GQAConfig(num_heads=128, num_kv_heads=128, head_dim=128)
        ),
        "GQA (V3 dims, 8 kv heads x 128)": lambda: _v3_with(
            GQAConfig(num_heads=128, num_kv_heads=8, head_dim=128)
        ),
        "MLA (DeepSeek-V3)": lambda: _full_size("deepseek-v3-attn"),
        "MLA (Kimi K2)": lambda: _full_size("kimi-k2-attn"),
        "MLA + DSA indexer (DeepSeek-V3.2)": _v32,
        "KDA:MLA 3:1 (Kimi-Linear-48B)": lambda: _full_size("kimi-linear-48b-attn"),
        "all-MLA (Kimi-Linear-48B dims)": _kimi_linear_all_mla,
        "V4 hybrid (DeepSeek-V4-Flash)": lambda: _full_size("deepseek-v4-flash-attn"),
    }


def _kimi_linear_all_mla() -> ModelConfig:
    """Kimi-Linear-48B's stack with its MLA in every layer: the paper's "full MLA" baseline."""
    hybrid = _full_size("kimi-linear-48b-attn")
    mla_label = next(k for k, v in hybrid.attention.items() if v.kind == "mla")
    return dataclasses.replace(
        hybrid, layer_pattern=(mla_label,), attention={mla_label: hybrid.attention[mla_label]}
    )


def cache_bytes(config: ModelConfig, context: int) -> int:
    """Bytes of `init_caches(config, batch 1, context)` in bf16, traced, never allocated."""
    caches = jax.eval_shape(lambda: init_caches(config, 1, context, jnp.bfloat16))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(caches))


def run(contexts=CONTEXTS) -> list[dict]:
    rows = []
    for name, build in architectures().items():
        config = build()
        for context in contexts:
            total = cache_bytes(config, context)
            rows.append(
                {
                    "architecture": name,
                    "layers": config.num_layers,
                    "context": context,
                    "cache_bytes": total,
                    "bytes_per_token": total / context,
                }
            )
    by_key = {(r["architecture"], r["context"]): r["bytes_per_token"] for r in rows}
    for r in rows:
        mla_v3 = by_key[("MLA (DeepSeek-V3)", r["context"])]
        v3_2 = by_key[("MLA + DSA indexer (DeepSeek-V3.2)", r["context"])]
        r["vs_mla_v3"] = r["bytes_per_token"] / mla_v3
        r["vs_v3_2"] = r["bytes_per_token"] / v3_2
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Grouped log-scale bars: bytes per token per architecture at each context length."""
    plt = pyplot()

    names = list(dict.fromkeys(r["architecture"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    value = {(r["architecture"], r["context"]): r["bytes_per_token"] for r in rows}
    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=110)
    width = 0.8 / len(contexts)
    for j, context in enumerate(contexts):
        xs = [i + (j - (len(contexts) - 1) / 2) * width for i in range(len(names))]
        label = f"{context // 1024}K" if context < 1 << 20 else f"{context >> 20}M"
        ax.bar(xs, [value[(n, context)] for n in names], width, label=f"context {label}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("decode cache, bytes per token (bf16)")
    ax.set_title("Decode cache per token of context, whole layer stack")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def print_table(rows: list[dict]) -> None:
    print("| architecture | layers | context | bytes/token | vs MLA (V3) | vs V3.2 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['architecture']} | {r['layers']} | {r['context']:,} | "
            f"{r['bytes_per_token']:,.0f} | {r['vs_mla_v3']:.3f} | {r['vs_v3_2']:.3f} |"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for kv_cache.json and kv_cache.png")
    args = parser.parse_args(argv)
    rows = run()
    print_table(rows)
    if args.out:
        write_results(args.out, "kv_cache", rows, lambda path: plot(rows, path))
    return rows


if __name__ == "__main__":
    main()
