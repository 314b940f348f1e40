"""Study 2 (issue 11): associative recall (MQAR) across attention kinds.

Question: how well does each attention kind of the library learn multi-query associative recall
(Zoology's MQAR, `experiments/data/mqar.py`) as the sequence gets longer and the number of
key-value pairs grows, at matched parameter counts and an equal training budget? Kinds: dense
attention (MHA, the baseline), MLA, KDA, GDN, the Kimi-Linear hybrid (3 KDA : 1 NoPE MLA), MoBA,
NSA and DSA.

Published claim it checks (Kimi Linear §5.1, /work/shared/reference/attention.md §5.6): on MQAR
(and Palindrome, Stack) KDA is the best of the linear mixers, above GDN and Mamba2, and KDA
converges faster than GDN. The paper trains 2-layer models (2 heads of 128) for up to 20,000
steps at lengths 256-2048 and reports the best training accuracy over a learning-rate grid.

What is run (every run is the main job, `experiments.studies.training_runs.train_and_measure`,
i.e. `experiments.train.run` in a scratch workdir that is deleted afterwards):

  * models: width 64, SwiGLU 176, vocabulary 264 (the library's tokenizer), 2 layers of the
    kind, untied head. Per layer: MHA 4 heads x 16 (RoPE); MLA 4 heads, no query LoRA, latent
    32, nope 16 + rope 8, values 16; KDA / GDN 4 heads x 16, conv 4 (the recurrent form, which
    computes the chunked form's function and is faster on a CPU); MoBA the MHA layer with
    blocks of 16, top-3 (the current block included); NSA 4 query heads in 1 kv group of 16,
    compression l = 16 / d = 8 (MLP width 16), selection l' = 16, n = 4 (1 initial + 2 local +
    1 chosen), window 32; DSA the MLA layer with a query LoRA of 32 plus an indexer of 2 heads x
    16, top-32. The Kimi-Linear hybrid has 4 layers (KDA, KDA, KDA, NoPE MLA) with SwiGLU 32,
    so that its parameter count stays close. Every kind is within `PARAM_TOLERANCE` (15 %) of
    the baseline's 134,464 parameters (MLA +0.8 %, KDA +7.7 %, GDN +5.0 %, hybrid +4.6 %, MoBA
    0, NSA +11.9 %, DSA +2.6 %; `tests/experiments/test_study_mqar.py` checks it with
    `jax.eval_shape`).
  * sparsity at the last query (`attended_fraction`): MoBA reads 48 keys (3 blocks of 16), NSA
    96 raw keys (4 selected blocks of 16 and a 32-token window, overlapping) plus
    (T - 16) / 8 + 1 compressed blocks, DSA 32 tokens: at T = 256 that is 19 %, 38 % (+31
    summaries) and 12.5 % of the context, at T = 512 half of it. The context of K pairs is the
    first 2K tokens; NSA's forced initial block (16 tokens) holds 8 of the pairs.
  * DSA is trained in its sparse stage from scratch (`indexer_stage="sparse"`): top-k sparse
    attention from step 0, the indexer learning the KL to the main attention over the selected
    tokens (V3.2 §2.1). A dense warm-up first (V3.2's recipe) needs a trained dense model and a
    second run per cell; from scratch the indexer starts random and must find the keys itself.
  * data: MQAR with K key-value pairs per sequence, keys from `KEY_RANGE` and values from
    `VALUE_RANGE` (16 tokens each, so chance is 1/16), filler token 0 between queries
    (Zoology's `random_non_queries=False`), Zoology's power law for query positions
    (a = 0.01); a new example every step (`[seed, 0, i]`), 4 fixed validation batches of 16
    (`[seed, 1, i]`), i.e. 512 scored answers at K = 8.
  * optimizer: AdamW, the library default (b2 0.95, weight decay 0.1, clip 1), peak
    `LEARNING_RATE` 3e-3, cosine with 10 % warmup, batch 16. Seeds set both the
    initialisation and the data. (Quick checks at T = 64-128: 1e-2 learned no faster than
    3e-3 for MHA, 3e-2 did not learn.)
  * metrics: `val_accuracy` of the last evaluation (the share of held-out answer positions
    whose argmax is the right value); whether a run learned the task (final accuracy >=
    `LEARNED`, 0.5) and at which step it first reached it (interpolated between the 10
    evaluations of a run): MQAR is learned in a jump, and the step of the jump varies a lot
    from seed to seed, so the count of seeds that learned and their steps say more than a
    mean accuracy.

Budget: 500 steps of batch 16 per run, 40 times fewer steps than the paper's up to 20,000. At
that budget only the kinds with a short convolution (KDA, GDN, the hybrid) learn the task at
all; the attention kinds presumably still have to form the two-layer induction mechanism (a
previous-token head, then a match on it), which a short convolution gives for free. The default
grid trains all 8 kinds at T = 256 and the three convolutional ones also at T = 512
(`LONG_KINDS`), K = 8, seeds 0 and 1; the second command adds seeds 2 and 3 for KDA and GDN, the
pair the paper's claim is about; the next three widen the grid for that pair to K = 4 and 16
(T = 256) and to T = 1024 and 2048 (K = 8). On this 2-core CPU a run costs 90-160 s at T = 256
(the hybrid's 4 layers 170-190 s), twice that at 512, about 6.5 min at 1024 and 15 at 2048:
63 minutes for the default grid, then about 22, 12, 26 and 29 more. The issue's full grid is
the last command (about 190 runs of 2000 steps: days on this machine, a GPU job).

    python -m experiments.studies.mqar --out docs/results        # the default grid, ~63 min
    python -m experiments.studies.mqar --kinds kda,gdn --seeds 2,3 --append --out docs/results
    python -m experiments.studies.mqar --kinds kda,gdn --kv-pairs 4,16 --lengths 256 \\
        --seeds 0,1 --append --out docs/results
    python -m experiments.studies.mqar --kinds kda,gdn --lengths 1024 --seeds 0,1 \\
        --append --out docs/results
    python -m experiments.studies.mqar --kinds kda,gdn --lengths 2048 --seeds 0 \\
        --append --out docs/results
    python -m experiments.studies.mqar --quick                   # ~30 s (2 kinds, T = 64)
    python -m experiments.studies.mqar --lengths 256,512,1024,2048 --kv-pairs 4,16 \\
        --long-kinds all --seeds 0,1,2 --steps 2000 --out runs/mqar   # the issue's full grid

Writes `mqar.json` (the recipe, one record per kind, T, K and seed with the final accuracy,
the evaluation curve, the parameter count, steps and wall seconds, and the aggregate per cell)
and `mqar.png` (per K: accuracy against T, one line per kind, mean with min-max bars over seeds;
then every run's learning curve, one panel per T) under `--out`. `--append` adds runs to an
existing `mqar.json` of the same recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from experiments.config import OptimizerConfig, RunConfig, TrainConfig
from experiments.data import DataConfig
from experiments.plotting import pyplot, save_figure
from experiments.studies.output import write_results
from experiments.studies.training_runs import first_step_reaching, study_config, train_and_measure
from jaxmodels.attention.dsa import DSAConfig
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.attention.kda import GDNConfig, KDAConfig
from jaxmodels.attention.mla import MLAConfig
from jaxmodels.attention.moba import MoBAConfig
from jaxmodels.attention.nsa import NSAConfig
from jaxmodels.config import ModelConfig, RopeConfig
from jaxmodels.model import Decoder

KINDS = ("gqa", "mla", "kda", "gdn", "kimi_linear", "moba", "nsa", "dsa")
LABELS = {
    "gqa": "attention (MHA)",
    "mla": "MLA",
    "kda": "KDA",
    "gdn": "GDN",
    "kimi_linear": "KDA:MLA 3:1",
    "moba": "MoBA",
    "nsa": "NSA",
    "dsa": "DSA (sparse stage)",
}
BASELINE = "gqa"
PARAM_TOLERANCE = 0.15  # every kind's parameter count within 15 % of the baseline's

# The default grid (the one behind docs/results/mqar.json).
LENGTHS = (256, 512)
KV_PAIRS = (8,)
SEEDS = (0, 1)
STEPS = 500
# Kinds trained at the lengths after the first: the ones that learn the task at the first length
# within the step budget (probe at T = 256, K = 8, 600 steps, seed 0: KDA 0.98, GDN 0.19,
# MHA 0.16); the rest are at chance there already, and a longer T only costs time.
LONG_KINDS = ("kda", "gdn", "kimi_linear")

KEY_RANGE = (1, 17)
VALUE_RANGE = (128, 144)
LEARNING_RATE = 3e-3
BATCH_SIZE = 16
VAL_BATCHES = 4
EVALS_PER_RUN = 10
LEARNED = 0.5  # a run has learned the task once its validation accuracy reaches this


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model sizes shared by every kind (`quick` is for the test's end-to-end run)."""

    width: int = 64
    intermediate: int = 176
    hybrid_intermediate: int = 32  # 4 layers instead of 2: a narrower SwiGLU keeps the count
    layers: int = 2
    heads: int = 4
    head_dim: int = 16
    batch_size: int = BATCH_SIZE

    @classmethod
    def quick(cls) -> Dims:
        return cls(
            width=16, intermediate=32, hybrid_intermediate=8, heads=2, head_dim=8, batch_size=8
        )


def _mla(d: Dims, **overrides) -> MLAConfig:
    return MLAConfig(
        num_heads=d.heads,
        q_lora_rank=None,
        kv_lora_rank=2 * d.head_dim,
        qk_nope_head_dim=d.head_dim,
        qk_rope_head_dim=d.head_dim // 2,
        v_head_dim=d.head_dim,
        **overrides,
    )


def attention_configs(kind: str, d: Dims = Dims()) -> dict[str, Any]:
    """Label -> attention config of `kind`'s layers (one label, two for the hybrid)."""
    heads, hd = d.heads, d.head_dim
    if kind == "gqa":
        return {"gqa": GQAConfig(num_heads=heads, num_kv_heads=heads, head_dim=hd)}
    if kind == "mla":
        return {"mla": _mla(d)}
    if kind in ("kda", "gdn", "kimi_linear"):
        cls = GDNConfig if kind == "gdn" else KDAConfig
        delta = cls(num_heads=heads, head_dim=hd, conv_kernel_size=4, implementation="recurrent")
        if kind != "kimi_linear":
            return {kind: delta}
        nope = _mla(d, use_nope=True, rope=RopeConfig(layout="half"))
        return {"kda": delta, "mla": nope}
    if kind == "moba":
        return {
            "moba": MoBAConfig(
                num_heads=heads, num_kv_heads=heads, head_dim=hd, block_size=16, top_k=3
            )
        }
    if kind == "nsa":
        return {
            "nsa": NSAConfig(
                num_heads=heads,
                num_kv_heads=1,
                head_dim=hd,
                cmp_block=16,
                cmp_stride=8,
                compress_hidden=hd,
                slc_block=16,
                num_selected=4,
                num_init=1,
                num_local=2,
                window=32,
                query_chunk=256,
            )
        }
    if kind == "dsa":
        return {
            "dsa": DSAConfig.from_mla(
                _mla(d),
                q_lora_rank=2 * hd,
                index_n_heads=2,
                index_head_dim=hd,
                index_topk=32,
                indexer_stage="sparse",
                index_block_q=128,
                index_prefix_chunks=2,
            )
        }
    raise ValueError(f"unknown attention kind {kind!r} for the MQAR study; choose from {KINDS}")


def model_config(kind: str, d: Dims = Dims()) -> ModelConfig:
    """The model of one kind: `d.layers` layers of it (the hybrid: KDA, KDA, KDA, NoPE MLA)."""
    attention = attention_configs(kind, d)
    if kind == "kimi_linear":
        pattern, layers, intermediate = ("kda", "kda", "kda", "mla"), 4, d.hybrid_intermediate
    else:
        pattern, layers, intermediate = tuple(attention), d.layers, d.intermediate
    return ModelConfig(
        hidden_size=d.width,
        intermediate_size=intermediate,
        num_layers=layers,
        layer_pattern=pattern,
        attention=attention,
    )


def param_count(config: ModelConfig) -> int:
    """Parameters of `config`'s decoder, traced with `jax.eval_shape` (nothing allocated)."""
    shapes = jax.eval_shape(
        lambda: Decoder(config).init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))
    )
    return int(sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])))


def attended_fraction(kind: str, seq_len: int, d: Dims = Dims()) -> float | None:
    """Share of the T raw keys that the last query of a length-T sequence reads; None for the
    kinds that read a constant-size state instead (KDA, GDN). The hybrid's MLA layer is dense;
    NSA also reads (T - l) / d + 1 compressed blocks, not counted here."""
    if kind in ("gqa", "mla", "kimi_linear"):
        return 1.0
    if kind in ("kda", "gdn"):
        return None
    cfg = next(iter(attention_configs(kind, d).values()))
    if kind == "moba":
        keys = cfg.block_size * cfg.top_k
    elif kind == "nsa":
        keys = cfg.slc_block * cfg.num_selected + cfg.window
    else:  # dsa
        keys = cfg.index_topk
    return min(1.0, keys / seq_len)


def run_config(
    kind: str, seq_len: int, kv_pairs: int, seed: int, steps: int, d: Dims = Dims()
) -> RunConfig:
    """The main job's config of one MQAR run."""
    eval_every = max(1, steps // EVALS_PER_RUN)
    config = RunConfig(
        model=model_config(kind, d),
        data=DataConfig(
            name="mqar",
            seq_len=seq_len,
            batch_size=d.batch_size,
            seed=seed,
            val_batches=VAL_BATCHES,
            mqar_num_kv_pairs=kv_pairs,
            mqar_key_range=KEY_RANGE,
            mqar_value_range=VALUE_RANGE,
            mqar_random_non_queries=False,
        ),
        optimizer=OptimizerConfig(
            learning_rate=LEARNING_RATE, warmup_steps=max(1, steps // 10), schedule="cosine"
        ),
        train=TrainConfig(steps=steps, seed=seed, log_every=max(1, min(50, steps))),
    )
    return study_config(config, steps=steps, eval_every=eval_every)


def run(
    kinds: Sequence[str] = KINDS,
    lengths: Sequence[int] = LENGTHS,
    kv_pairs: Sequence[int] = KV_PAIRS,
    seeds: Sequence[int] = SEEDS,
    steps: int = STEPS,
    d: Dims = Dims(),
    log: Callable[[str], None] = print,
    long_kinds: Collection[str] | None = None,
) -> list[dict]:
    """Trains every (kind, T, K, seed) once; one record each. With `long_kinds` given, only
    those kinds also run at the lengths after the first; None runs every kind at every length."""
    for kind in kinds:
        attention_configs(kind, d)  # unknown kinds fail before any training
    params = {kind: param_count(model_config(kind, d)) for kind in kinds}
    records = []
    for kind in kinds:
        for seq_len in lengths:
            if seq_len != lengths[0] and long_kinds is not None and kind not in long_kinds:
                continue
            for k in kv_pairs:
                for seed in seeds:
                    config = run_config(kind, seq_len, k, seed, steps, d)
                    out = train_and_measure(config)
                    final = out["final"]
                    record = {
                        "kind": kind,
                        "label": LABELS[kind],
                        "seq_len": seq_len,
                        "kv_pairs": k,
                        "seed": seed,
                        "val_accuracy": float(final["val_accuracy"]),
                        "val_loss": float(final["val_loss"]),
                        "curve": [
                            {"step": p["step"], "val_accuracy": p["val_accuracy"]}
                            for p in out["curve"]
                        ],
                        "params": out["params"],
                        "steps": steps,
                        "wall_s": round(out["wall_s"], 2),
                        "cpu_s": round(out["cpu_s"], 2),
                        "attended_fraction": attended_fraction(kind, seq_len, d),
                    }
                    assert record["params"] == params[kind], (kind, record["params"])
                    records.append(record)
                    log(
                        f"{kind:12s} T={seq_len:5d} K={k:3d} seed={seed}: accuracy "
                        f"{record['val_accuracy']:.3f} ({record['wall_s']:.0f} s)"
                    )
    return records


def steps_to_learn(record: dict) -> float | None:
    """The first step (interpolated between evaluations) at which a run's validation accuracy
    reaches `LEARNED`; None if it never does within the run."""
    return first_step_reaching(record["curve"], LEARNED, "val_accuracy", higher_is_better=True)


def aggregate(records: Sequence[dict]) -> list[dict]:
    """One row per (kind, T, K): mean, min and max of the final accuracy over the seeds, how
    many seeds learned the task (final accuracy >= `LEARNED`) and each seed's steps to learn."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["kind"], r["seq_len"], r["kv_pairs"]), []).append(r)
    rows = []
    for (kind, seq_len, k), group in cells.items():
        accs = [r["val_accuracy"] for r in group]
        learn_steps = [steps_to_learn(r) for r in group]
        rows.append(
            {
                "kind": kind,
                "seq_len": seq_len,
                "kv_pairs": k,
                "seeds": len(group),
                "mean": statistics.fmean(accs),
                "min": min(accs),
                "max": max(accs),
                "learned": sum(a >= LEARNED for a in accs),
                "steps_to_learn": [None if s is None else round(s) for s in learn_steps],
                "params": group[0]["params"],
            }
        )
    return rows


def plot(records: Sequence[dict], path: str, title: str = "") -> None:
    """One row per K. First panel: final accuracy against T, one line per kind (mean, min-max
    bars over seeds). Then one panel per T: every seed's evaluation curve (accuracy against
    step; one colour per kind), which shows when each run learns the task; panels of (K, T)
    cells without runs are left out."""
    plt = pyplot()

    rows = aggregate(records)
    ks = sorted({r["kv_pairs"] for r in rows})
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lengths = sorted({r["seq_len"] for r in rows})
    colors = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    chance = 1 / (VALUE_RANGE[1] - VALUE_RANGE[0])
    top = min(1.02, 1.1 * max([r["max"] for r in rows] + [0.3]))
    fig, axes = plt.subplots(
        len(ks),
        1 + len(lengths),
        figsize=(5 * (1 + len(lengths)), 4.4 * len(ks)),
        dpi=100,
        squeeze=False,
    )
    for ax_row, k in zip(axes, ks, strict=True):
        ax, curve_axes = ax_row[0], dict(zip(lengths, ax_row[1:], strict=True))
        for i, kind in enumerate(kinds):
            cell = sorted(
                (r for r in rows if r["kind"] == kind and r["kv_pairs"] == k),
                key=lambda r: r["seq_len"],
            )
            # A small horizontal offset per kind keeps overlapping error bars readable.
            xs = [r["seq_len"] * 2 ** ((i - (len(kinds) - 1) / 2) * 0.025) for r in cell]
            mean = [r["mean"] for r in cell]
            err = [[r["mean"] - r["min"] for r in cell], [r["max"] - r["mean"] for r in cell]]
            ax.errorbar(
                xs,
                mean,
                yerr=err,
                marker="o",
                ms=4,
                capsize=3,
                color=colors[kind],
                label=LABELS[kind],
            )
            runs = [r for r in records if r["kind"] == kind and r["kv_pairs"] == k]
            for j, r in enumerate(runs):
                steps = [p["step"] for p in r["curve"]]
                accuracy = [p["val_accuracy"] for p in r["curve"]]
                curve_axes[r["seq_len"]].plot(
                    steps,
                    accuracy,
                    "-",
                    lw=1.2,
                    alpha=0.8,
                    color=colors[kind],
                    label=LABELS[kind] if j == 0 else None,
                )
        for a in ax_row:
            a.axhline(chance, ls="--", color="gray", lw=1, label=f"chance {chance:.3f}")
            a.grid(alpha=0.3)
            a.set_ylim(0, top)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(t) for t in lengths])
        ax.set_xlim(lengths[0] / 1.3, lengths[-1] * 1.3)
        ax.set(xlabel="sequence length T", ylabel="final validation accuracy", title=f"K = {k}")
        for seq_len, a in curve_axes.items():
            if not any(r["kv_pairs"] == k and r["seq_len"] == seq_len for r in records):
                a.set_visible(False)  # a cell of the grid that was not run
                continue
            a.set(
                xlabel="training step",
                ylabel="validation accuracy (one line per seed)",
                title=f"K = {k}, T = {seq_len}: learning curves",
            )
    axes[0][0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def print_table(rows: Sequence[dict]) -> None:
    print(
        "| kind | params | T | K | accuracy mean | min - max | learned / seeds "
        f"| steps to {LEARNED:.0%} per seed |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        steps = ", ".join("—" if s is None else str(s) for s in r["steps_to_learn"])
        print(
            f"| {LABELS[r['kind']]} | {r['params']:,} | {r['seq_len']} | {r['kv_pairs']} | "
            f"{r['mean']:.3f} | {r['min']:.3f} - {r['max']:.3f} | {r['learned']} / {r['seeds']} "
            f"| {steps} |"
        )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


@contextlib.contextmanager
def compile_cache():
    """A persistent XLA compilation cache in a scratch folder for the duration: the runs of one
    (kind, T) differ only in K and the seed (data), so their init, train and eval programs are
    identical and compile once (about 20 s of each later run). The previous settings are
    restored and the folder deleted afterwards."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {name: getattr(jax.config, name) for name in names}
    directory = tempfile.mkdtemp(prefix="mqar-xla-cache-")
    try:
        for name, value in zip(names, (directory, 0.0, 0), strict=True):
            jax.config.update(name, value)
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        try:  # forget the cache object bound to the deleted folder (private API)
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
        except (ImportError, AttributeError):
            pass
        shutil.rmtree(directory, ignore_errors=True)


def recipe(d: Dims, steps: int, quick: bool) -> dict:
    """What every run of one results file shares: model sizes, data, optimizer and steps."""
    return {
        "quick": quick,
        "dims": dataclasses.asdict(d),
        "data": {
            "key_range": list(KEY_RANGE),
            "value_range": list(VALUE_RANGE),
            "random_non_queries": False,
            "chance_accuracy": 1 / (VALUE_RANGE[1] - VALUE_RANGE[0]),
        },
        "optimizer": {"name": "adamw", "learning_rate": LEARNING_RATE, "schedule": "cosine"},
        "steps": steps,
    }


def load_for_append(path: str, new_recipe: dict) -> dict:
    """The study saved at `path`, checked to share `new_recipe`; ValueError naming the
    difference otherwise (so `--append` fails before any training)."""
    if not os.path.exists(path):
        raise ValueError(f"--append: {path} does not exist; run once without --append first")
    with open(path) as f:
        saved = json.load(f)
    for key, value in new_recipe.items():
        if saved["recipe"][key] != value:
            raise ValueError(
                f"--append: {key} {value} differs from {path}'s {saved['recipe'][key]}"
            )
    return saved


def merged(saved: dict, new: dict) -> dict:
    """`saved` with `new`'s runs added: a run of the same (kind, T, K, seed) replaces the saved
    one, `new`'s grid goes under "appended", the study times add up."""

    def cell(r: dict) -> tuple:
        return r["kind"], r["seq_len"], r["kv_pairs"], r["seed"]

    replaced = {cell(r) for r in new["records"]}
    records = [r for r in saved["records"] if cell(r) not in replaced] + new["records"]
    return {
        **saved,
        "appended": saved.get("appended", []) + [new["grid"]],
        "records": records,
        "aggregate": aggregate(records),
        "study_wall_s": round(saved["study_wall_s"] + new["study_wall_s"], 1),
        "study_cpu_s": round(saved["study_cpu_s"] + new["study_cpu_s"], 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for mqar.json and mqar.png")
    p.add_argument("--quick", action="store_true", help="2 kinds, T=64, few steps (seconds)")
    p.add_argument("--kinds", type=lambda s: s.split(","), default=None, help=",".join(KINDS))
    p.add_argument("--lengths", type=_ints, default=None, help=f"default {LENGTHS}")
    p.add_argument("--kv-pairs", type=_ints, default=None, help=f"default {KV_PAIRS}")
    p.add_argument("--seeds", type=_ints, default=None, help=f"default {SEEDS}")
    p.add_argument("--steps", type=int, default=None, help=f"steps per run (default {STEPS})")
    p.add_argument(
        "--long-kinds",
        type=lambda s: s.split(","),
        default=None,
        help=f"kinds run at every length (default {','.join(LONG_KINDS)}; 'all' for all)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add these runs to <out>/mqar.json (same recipe and steps) instead of replacing it",
    )
    a = p.parse_args(argv)
    if a.append and not a.out:
        p.error("--append needs --out (the folder whose mqar.json gets the runs)")
    quick = a.quick
    kinds = a.kinds or (["gqa", "kda"] if quick else list(KINDS))
    for kind in kinds:
        if kind not in KINDS:
            p.error(f"unknown kind {kind!r}; choose from {','.join(KINDS)}")
    lengths = a.lengths or ([64] if quick else list(LENGTHS))
    kv_pairs = a.kv_pairs or ([4] if quick else list(KV_PAIRS))
    seeds = a.seeds or ([0] if quick else list(SEEDS))
    steps = a.steps or (4 if quick else STEPS)
    long_kinds = a.long_kinds or ([] if quick else list(LONG_KINDS))
    if long_kinds == ["all"]:
        long_kinds = None
    for kind in long_kinds or ():
        if kind not in KINDS:
            p.error(f"unknown kind {kind!r} in --long-kinds; choose from {','.join(KINDS)},all")
    d = Dims.quick() if quick else Dims()
    shared = recipe(d, steps, quick)
    saved = None
    if a.append:
        try:
            saved = load_for_append(os.path.join(a.out, "mqar.json"), shared)
        except ValueError as error:
            p.error(str(error))
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    with contextlib.nullcontext() if quick else compile_cache():
        records = run(kinds, lengths, kv_pairs, seeds, steps, d, long_kinds=long_kinds)
    grid = {
        "kinds": kinds,
        "lengths": lengths,
        "kv_pairs": kv_pairs,
        "seeds": seeds,
        "long_kinds": long_kinds,
    }
    result = {
        "recipe": shared,
        "grid": grid,
        "records": records,
        "aggregate": aggregate(records),
        "study_wall_s": round(time.perf_counter() - start_wall, 1),
        "study_cpu_s": round(time.process_time() - start_cpu, 1),
    }
    if saved is not None:
        result = merged(saved, result)
    rows = result["aggregate"]
    print_table(rows)
    print(f"study: {result['study_wall_s']:.0f} s wall, {result['study_cpu_s']:.0f} s CPU")
    if a.out:
        counts = sorted({r["seeds"] for r in rows})
        span = f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"
        title = (
            f"MQAR after {steps} steps (batch {d.batch_size}, width {d.width}), "
            f"{span} seed(s) per cell: mean and min-max"
        )
        records = result["records"]
        write_results(a.out, "mqar", result, lambda path: plot(records, path, title=title))
    return result


if __name__ == "__main__":
    main()
