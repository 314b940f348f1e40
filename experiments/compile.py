"""Plan a TPU pod run without a TPU: ahead-of-time compile the train step (and decode) for a real
TPU topology on a CPU machine and report memory per chip, FLOPs, MFU bounds and collectives.

    python -m experiments.compile --topology v5p:4x4x8 --preset deepseek-v3-attn \\
        --mesh fsdp=-1,tensor=4 --seq 4096 --batch 256 [--optimizer adamw|muon] [--decode] \\
        [--decode-tokens 128] [--out report.json] [--model.num_layers=8 ...]

Needs the `libtpu` package (the TPU compiler): `pip install -e ".[tpu]"`. Nothing is
initialised: parameters, optimizer state, batch and caches are `jax.ShapeDtypeStruct`s carrying
the mesh shardings of `sharding/` (`abstract_train_state`), and `jax.jit(...).lower(...)
.compile()` runs libtpu's compiler, whose `memory_analysis()` and `cost_analysis()` give the
per-chip numbers. Any `--SECTION.FIELD=VALUE` override of the main job works here too.

Report fields (per device; on v5p/v5e/v6e a device is a chip): bytes of parameters, optimizer
state, caches and batch (sum of shard shapes), XLA's temporaries and peak (arguments + outputs -
donated + temporaries + code) against the chip's HBM; XLA's FLOPs per step and the step time at
the bf16 peak; "model FLOPs" (6 x matmul parameters x tokens + causal attention) and the MFU
bound model/XLA FLOPs (remat recomputation lowers it), the step time and tokens/s at 50 % MFU;
collectives by kind, counted in the compiled HLO.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

import sharding
from experiments.compile_report import (
    CompilePlanError,
    count_collectives,
    count_params,
    flops_of,
    format_report,
    load_topology,
    memory_stats,
    shard_bytes,
)
from experiments.config import RunConfig
from jaxmodels import training
from jaxmodels.config import ModelConfig
from jaxmodels.model import Decoder, cache_logical_axes, init_caches
from jaxmodels.training import batch_shardings, build_trainer

DENSE_FFN_NOTE = (
    "feed-forward blocks are dense SwiGLU of intermediate_size (this library has no MoE layer "
    "yet): FLOPs follow the config, parameter and optimizer bytes do not include experts"
)
_ERROR_CHARS = 2000


def build_mesh(spec: str, devices: list[Any]) -> jax.sharding.Mesh:
    """`sharding.make_mesh(spec, devices=...)` with a CompilePlanError naming the device count."""
    try:
        return sharding.make_mesh(spec, devices=devices)
    except ValueError as e:
        raise CompilePlanError(
            f"mesh {spec!r} does not fit the topology's {len(devices)} devices: {e}. "
            f"Axis sizes must multiply to {len(devices)} (use -1 for one axis to take the rest)."
        ) from None


def _attention_flops_per_token(attention: Any, seq: int) -> float:
    """Forward FLOPs of one query token's scores + weighted values (causal average over `seq`).
    Counts the keys each kind actually attends to: all earlier tokens (gqa/mla/moba-free
    kinds), DSA's top-k, V4's window + compressed entries; 0 for unknown kinds."""
    kind = attention.kind
    causal = seq / 2
    if kind == "gqa":
        heads, qk, v, keys = attention.num_heads, attention.head_dim, attention.head_dim, causal
    elif kind in ("mla", "dsa"):
        heads, qk, v = attention.num_heads, attention.qk_head_dim, attention.v_head_dim
        keys = min(causal, attention.index_topk) if kind == "dsa" else causal
    elif kind == "v4":
        heads, qk, v = attention.num_attention_heads, attention.head_dim, attention.head_dim
        keys = min(causal, attention.sliding_window)
        if attention.ratio:
            entries = causal / attention.ratio
            keys += min(entries, attention.index_topk) if attention.is_csa else entries
    else:
        return 0.0
    return 2.0 * heads * (qk + v) * keys


def model_flops_per_token(config: ModelConfig, params: Any, seq: int) -> float:
    """Training FLOPs per token: 6 x (parameters except the embedding table) + 3 x attention."""
    embed = sum(
        math.prod(x.shape)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if any(getattr(k, "key", None) == "embed" for k in path)
    )
    matmul_params = count_params(params) - (0 if config.tie_word_embeddings else embed)
    attention = sum(_attention_flops_per_token(a, seq) for a in config.layer_attention)
    return 6.0 * matmul_params + 3.0 * attention


def _compile(fn, *args) -> tuple[Any, float, str | None]:
    start = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:  # the compiler's or the lowering's error, reported, not raised
        text = f"{type(e).__name__}: {e}".strip()
        if len(text) > _ERROR_CHARS:
            text = text[:_ERROR_CHARS] + " ..."
        return None, time.perf_counter() - start, text
    return compiled, time.perf_counter() - start, None


def _step_record(compiled, seconds, error, per_chip: dict[str, int], hbm: int, peak: float):
    record: dict[str, Any] = {
        "compiled": compiled is not None,
        "compile_seconds": seconds,
        "error": error,
        "per_chip": per_chip,
    }
    if compiled is None:
        resident = sum(per_chip.values())
        oom = error is not None and any(
            s in error for s in ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")
        )
        record["fits"] = (not oom) and resident <= hbm
        record["fits_basis"] = (
            "the compiler ran out of HBM"
            if oom
            else "resident arrays only (compile failed, temporaries unknown)"
        )
        return record
    mem = memory_stats(compiled)
    record["memory"] = mem
    record["fits"] = mem["peak_bytes"] <= hbm
    record["fits_basis"] = f"XLA peak {mem['peak_bytes'] / hbm:.1%} of {hbm / 2**30:.1f} GiB"
    flops = flops_of(compiled)
    record["flops_per_chip"] = flops
    record["step_seconds_at_peak"] = None if flops is None else flops / peak
    try:
        record["collectives"] = count_collectives(compiled.as_text())
    except Exception as e:  # XLA can fail to print large TPU programs (async-update RET_CHECK)
        record["collectives"] = None
        record["collectives_error"] = f"compiled HLO text unavailable: {str(e)[:300]}"
    return record


def plan(
    run: RunConfig,
    *,
    preset: str,
    topology: str,
    mesh_spec: str,
    seq: int | None = None,
    batch: int | None = None,
    optimizer: str | None = None,
    decode: bool = False,
    decode_tokens: int = 128,
    notes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Compiles the steps of `run` for `topology` under `mesh_spec`; returns the report dict.

    Raises CompilePlanError for a bad topology / mesh / missing libtpu; a compiler error is
    recorded in the report (`steps[name]["error"]`), not raised.
    """
    from experiments.optimizer import build_optimizer

    chip, shape, devices = load_topology(topology)
    mesh = build_mesh(mesh_spec, devices)
    chips = math.prod(shape)
    per_chip_devices = max(1, len(devices) // chips)
    hbm = chip.hbm_bytes // per_chip_devices
    peak = chip.peak_bf16_flops / per_chip_devices
    seq = seq or run.data.seq_len
    batch = batch or run.data.batch_size
    opt_config = run.optimizer
    if optimizer is not None:
        opt_config = dataclasses.replace(opt_config, name=optimizer)
    config = run.model
    tx = build_optimizer(opt_config, total_steps=run.train.steps, model=config)
    rules = sharding.current_rules()

    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % data_ways:
        raise CompilePlanError(
            f"--batch {batch} is not divisible by data x fsdp = {data_ways} of mesh "
            f"{dict(mesh.shape)}; use a multiple of {data_ways}"
        )

    state, state_shardings = training.abstract_train_state(
        config, tx, mesh, seq_len=seq, rules=rules
    )
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    example = {"inputs": tokens, "targets": tokens}
    batch_sh = batch_shardings(mesh, example, rules)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in example.items()
    }
    trainer = build_trainer(
        config,
        tx,
        mesh,
        state_shardings,
        example,
        rules=rules,
        track_max_logits=opt_config.qk_clip_threshold is not None,
    )
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        compiled, seconds, error = _compile(trainer.jitted, state, abstract_batch)
    per_chip = {
        "parameters": shard_bytes(state.params),
        "optimizer_state": shard_bytes(state.opt_state),
        "batch": shard_bytes(abstract_batch),
    }
    steps = {"train": _step_record(compiled, seconds, error, per_chip, hbm, peak)}
    train = steps["train"]
    model_flops = model_flops_per_token(config, state.params, seq) * batch * seq / len(devices)
    train["model_flops_per_chip"] = model_flops
    xla_flops = train.get("flops_per_chip")
    if xla_flops and xla_flops < model_flops:
        # XLA's cost analysis counts a while loop's body once, so a scanned layer stack
        # reports about one layer's FLOPs: the model count is the better lower bound.
        train["flops_note"] = (
            "XLA's FLOP count is below the model's (a scanned layer stack's loop body is "
            "counted once); the step-time bound uses the model FLOPs"
        )
        train["step_seconds_at_peak"] = model_flops / peak
    elif xla_flops:
        train["mfu_bound"] = model_flops / xla_flops
    step_at_50 = model_flops / (0.5 * peak)
    train["step_seconds_at_50pct_mfu"] = step_at_50
    train["tokens_per_second_per_chip_at_50pct_mfu"] = batch * seq / len(devices) / step_at_50

    if decode:
        steps.update(_plan_decode(config, state, mesh, rules, batch, seq, decode_tokens, hbm, peak))

    return {
        "preset": preset,
        "topology": topology,
        "num_devices": len(devices),
        "devices_per_chip": per_chip_devices,
        "chip": dataclasses.asdict(chip),
        "hbm_bytes_per_device": hbm,
        "peak_flops_per_device": peak,
        "mesh": dict(mesh.shape),
        "seq": seq,
        "batch": batch,
        "optimizer": opt_config.name,
        "model": {
            "num_params": count_params(state.params),
            "num_layers": config.num_layers,
            "layer_pattern": list(config.layer_pattern),
            "attention_kinds": sorted({a.kind for a in config.attention.values()}),
            "residual": config.residual.kind,
            "dtype": config.dtype,
            "param_dtype": config.param_dtype,
        },
        "notes": [*notes, DENSE_FFN_NOTE],
        "steps": steps,
    }


def _plan_decode(config, state, mesh, rules, batch, seq, decode_tokens, hbm, peak):
    """Prefill of `seq` tokens and one decode step, caches of `seq + decode_tokens` entries."""
    model = Decoder(config)
    max_length = seq + decode_tokens
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        cache_shapes = jax.eval_shape(lambda: init_caches(config, batch, max_length))
        cache_sh = sharding.axes_tree_shardings(
            cache_logical_axes(config), cache_shapes, mesh, rules
        )
    caches = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache_shapes, cache_sh
    )
    param_sh = jax.tree.map(lambda x: x.sharding, state.params)
    tok_sh = sharding.named_sharding(("batch", None), mesh, rules, (batch, seq))
    logits_shape = (batch, config.vocab_size)
    out_sh = sharding.named_sharding(("batch", "act_vocab"), mesh, rules, logits_shape)

    def step(params, tokens_BT, positions_BT, caches):
        logits_BTV, caches = model.apply(params, tokens_BT, positions_BT, caches)
        return logits_BTV[:, -1], caches

    jitted = jax.jit(
        step,
        in_shardings=(param_sh, tok_sh, tok_sh, cache_sh),
        out_shardings=(out_sh, cache_sh),
        donate_argnums=(3,),
    )
    steps = {}
    for name, length in (("prefill", seq), ("decode", 1)):
        toks = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=tok_sh)
        with jax.set_mesh(mesh), sharding.use_rules(rules):
            compiled, seconds, error = _compile(jitted, state.params, toks, toks, caches)
        per_chip = {"parameters": shard_bytes(state.params), "caches": shard_bytes(caches)}
        steps[name] = _step_record(compiled, seconds, error, per_chip, hbm, peak)
    return steps


# ---------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.compile",
        description="AOT-compile a preset for a TPU topology (no TPU needed; needs libtpu) and "
        "report HBM per chip, FLOPs, MFU bounds and collectives. Extra --SECTION.FIELD=VALUE "
        "flags override the preset as in experiments.train.",
    )
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x8, v6e:16x16, v5e:8x8")
    p.add_argument("--preset", required=True, help="a preset name (experiments.presets)")
    p.add_argument("--mesh", default="fsdp=-1", help="mesh axes, e.g. fsdp=-1,tensor=4")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: preset's)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: preset's)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default=None)
    p.add_argument("--decode", action="store_true", help="also compile prefill and decode")
    p.add_argument("--decode-tokens", type=int, default=128, help="cache room beyond --seq")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    from experiments import cli, presets

    args, rest = _parser().parse_known_args(argv)
    try:
        overrides = dict((name[2:], value) for name, value in cli._split_argv(rest))
        bad = [k for k in overrides if "." not in k]
        if bad:
            raise cli.CLIError(f"unknown flags {['--' + b for b in bad]} (see --help)")
        run = cli.apply_overrides(presets.get_preset(args.preset), overrides)
        from experiments.presets import full_size

        report = plan(
            run,
            preset=args.preset,
            topology=args.topology,
            mesh_spec=args.mesh,
            seq=args.seq,
            batch=args.batch,
            optimizer=args.optimizer,
            decode=args.decode,
            decode_tokens=args.decode_tokens,
            notes=tuple(full_size.NOTES.get(args.preset, ())),
        )
    except (CompilePlanError, cli.CLIError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0 if all(s["compiled"] for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
