"""Text samples from a model, and `python -m experiments.generate`, which samples from a saved run.

    python -m experiments.generate --workdir runs/small --prompt "def " \\
        [--max_new_tokens 200] [--temperature 0.8] [--top_k K] [--top_p 0.95] [--seed 0]
        [--num_samples 1] [--step STEP]

It reads `<workdir>/config.json`, restores the newest readable checkpoint (parameters only are
used) onto this machine's devices, and decodes with the KV cache (`jaxmodels.generate`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from experiments.checkpoint import CheckpointError
from experiments.data import BOS, EOS, decode, encode
from jaxmodels.config import ModelConfig
from jaxmodels.generate import generate


def sample_text(
    params,
    config: ModelConfig,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_samples: int = 1,
) -> list[str]:
    """Continuations of `prompt` (one per sample), decoded to text.

    The prompt is encoded as a document start (BOS + UTF-8 bytes), as in training; a
    continuation stops at the first end-of-document token.
    """
    if max_new_tokens <= 0:
        return [""] * num_samples
    prompt_ids = encode(prompt, bos=True)
    prompt_BT = np.broadcast_to(prompt_ids, (num_samples, len(prompt_ids))).astype(np.int32)
    tokens_BN = generate(
        params,
        prompt_BT,
        jax.random.key(seed),
        config=config,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    texts = []
    for row in np.asarray(jax.device_get(tokens_BN)):
        stops = np.flatnonzero((row == EOS) | (row == BOS))
        texts.append(decode(row[: stops[0]] if len(stops) else row))
    return texts


def load_params(workdir: str, step: int | None = None, log=print):
    """(model config, params, step) of a saved run: its config.json and newest good checkpoint."""
    from experiments import checkpoint as ckpt
    from experiments.config import run_from_dict
    from experiments.optimizer import build_optimizer
    from jaxmodels import training
    from sharding import make_mesh

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the --workdir of a run?")
    with open(path) as f:
        config = run_from_dict(json.load(f))
    tx = build_optimizer(config.optimizer, config.train.steps)
    mesh = make_mesh("data=-1")
    abstract, _ = training.abstract_train_state(config.model, tx, mesh, seq_len=config.data.seq_len)
    checkpointer = ckpt.Checkpointer(workdir, keep=config.train.keep_checkpoints, log=log)
    try:
        if step is not None:
            state, _ = checkpointer.restore(step, abstract)
            restored = (step, state)
        else:
            found = checkpointer.restore_latest(abstract)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
            restored = found[:2]
    finally:
        checkpointer.close()
    return config.model, restored[1].params, restored[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.generate",
        description="Sample text from a run saved by python -m experiments.train.",
    )
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        parser.error("--max_new_tokens must be >= 0 and --num_samples >= 1")
    try:
        model_config, params, step = load_params(
            args.workdir, args.step, log=lambda m: print(m, file=sys.stderr)
        )
        texts = sample_text(
            params,
            model_config,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            num_samples=args.num_samples,
        )
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[{args.workdir} at step {step}]", file=sys.stderr)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
