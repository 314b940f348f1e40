"""The run configuration of the main job: model + data + optimizer + training loop.

    RunConfig(model=ModelConfig(...), data=DataConfig(...), optimizer=OptimizerConfig(...),
              train=TrainConfig(...))

All four are frozen dataclasses validated at construction; `RunConfig` also checks the rules that
tie two of them together (vocabulary vs tokenizer, warmup vs run length). `run_to_dict` /
`run_from_dict` give the JSON form saved as `config.json` beside the checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from experiments.data import VOCAB_SIZE, DataConfig
from jaxmodels.attention.gqa import GQAConfig
from jaxmodels.attention.mla import MLAConfig
from jaxmodels.config import (
    AttentionConfig,
    ConfigError,
    ModelConfig,
    check,
    check_choice,
    from_dict,
    to_dict,
)
from optimizers import SCHEDULES as NS_SCHEDULES
from optimizers import QKClipTarget, mha_targets, mla_targets
from sharding.mesh import MESH_AXES, parse_mesh_spec

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine")


def _check_count(owner: str, name: str, value: Any, minimum: int) -> None:
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{owner}.{name}={value!r} must be an integer >= {minimum}",
    )


def _check_finite(owner: str, name: str, value: Any, low: float, high: float = math.inf) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    check(ok and low <= value <= high, f"{owner}.{name}={value!r} must be in [{low}, {high}]")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
      name: "adamw" (optax.adamw) or "muon" (optimizers.muon: Muon for hidden matrices, AdamW
        for embeddings, head, norms).
      learning_rate: peak learning rate.
      warmup_steps: linear warmup from 0 to the peak.
      schedule: "cosine" (cosine decay to the end of the run), "wsd" (warmup-stable-decay) or
        "constant" (after warmup).
      decay_fraction: WSD only: share of the run spent decaying at the end.
      decay_shape: WSD only: "linear" or "cosine" decay.
      min_lr_ratio: final learning rate as a fraction of the peak (cosine and WSD).
      weight_decay: decoupled weight decay, applied to matrices (ndim >= 2) only.
      b1, b2, eps: Adam moments (also Muon's AdamW group).
      grad_clip: clip gradients to this global norm (0 disables).
      muon_beta: Muon momentum.
      muon_nesterov: Nesterov direction for Muon.
      muon_ns_coeffs: Newton-Schulz coefficient schedule ("standard", "polar_express", ...).
      muon_ns_steps: Newton-Schulz iterations (None: the schedule's default).
      muon_scaling: "rms_match" (Moonlight, update RMS = muon_target_rms), "shape" or "none".
      muon_target_rms: update RMS of Muon matrices with muon_scaling="rms_match".
      muon_adam_lr_ratio: learning rate of Muon's AdamW group as a fraction of learning_rate.
      qk_clip_threshold: QK-Clip's τ (Kimi K2: 100), or None (off). When set, the train step
        tracks every attention layer's per-head max logit and `optimizers.qk_clip` rescales,
        after the optimizer step, the query/key weights of each head whose max logit exceeded
        τ (with name="muon" this is MuonClip). Needs a layer kind that QK-Clip knows (see
        `qk_clip_targets`).
    """

    name: str = "adamw"
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    muon_beta: float = 0.95
    muon_nesterov: bool = True
    muon_ns_coeffs: str = "standard"
    muon_ns_steps: int | None = None
    muon_scaling: str = "rms_match"
    muon_target_rms: float = 0.2
    muon_adam_lr_ratio: float = 1.0
    qk_clip_threshold: float | None = None

    def __post_init__(self):
        check_choice("optimizer", "name", self.name, OPTIMIZERS)
        check_choice("optimizer", "schedule", self.schedule, SCHEDULES)
        check_choice("optimizer", "decay_shape", self.decay_shape, DECAY_SHAPES)
        check_choice("optimizer", "muon_scaling", self.muon_scaling, ("rms_match", "shape", "none"))
        check_choice("optimizer", "muon_ns_coeffs", self.muon_ns_coeffs, NS_SCHEDULES)
        check(
            isinstance(self.learning_rate, int | float)
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0,
            f"optimizer.learning_rate={self.learning_rate!r} must be a positive finite number",
        )
        _check_count("optimizer", "warmup_steps", self.warmup_steps, 0)
        _check_finite("optimizer", "decay_fraction", self.decay_fraction, 0.0, 1.0)
        _check_finite("optimizer", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_finite("optimizer", "weight_decay", self.weight_decay, 0.0)
        _check_finite("optimizer", "b1", self.b1, 0.0, 1.0)
        _check_finite("optimizer", "b2", self.b2, 0.0, 1.0)
        _check_finite("optimizer", "eps", self.eps, 0.0)
        _check_finite("optimizer", "grad_clip", self.grad_clip, 0.0)
        _check_finite("optimizer", "muon_beta", self.muon_beta, 0.0, 1.0)
        _check_finite("optimizer", "muon_target_rms", self.muon_target_rms, 0.0)
        _check_finite("optimizer", "muon_adam_lr_ratio", self.muon_adam_lr_ratio, 0.0)
        if self.muon_ns_steps is not None:
            _check_count("optimizer", "muon_ns_steps", self.muon_ns_steps, 1)
        if self.qk_clip_threshold is not None:
            threshold = self.qk_clip_threshold
            ok = isinstance(threshold, int | float) and not isinstance(threshold, bool)
            check(
                ok and math.isfinite(threshold) and threshold > 0,
                f"optimizer.qk_clip_threshold={threshold!r} must be a positive finite number "
                "(the max attention logit allowed, e.g. 100), or none to turn QK-Clip off",
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    Attributes:
      steps: optimizer steps of the whole run (the schedule spans them).
      eval_every: evaluate on the validation split every this many steps (and at the end).
      checkpoint_every: save a checkpoint every this many steps (and at the end).
      keep_checkpoints: how many of the newest checkpoints to keep.
      log_every: write a metrics.jsonl record and refresh the progress bar every this many steps.
      seed: seeds parameter init and sampling (data.seed seeds the data order).
      mesh: device mesh, e.g. "data=-1" or "data=2,fsdp=-1,tensor=2" (-1: the remaining devices).
      async_checkpointing: write checkpoints in a background thread.
      progress: show a progress bar.
      plot: rewrite loss.png at every evaluation.
      sample_prompt: prompt of the text sample generated at the end ("" skips it).
      sample_tokens: tokens generated for that sample.
      sample_temperature: sampling temperature (0 = greedy).
      sample_top_k: keep the k most likely tokens (None: all).
      sample_top_p: nucleus sampling mass (None: off).
      init_from: a run's workdir or its `checkpoints/` directory (newest checkpoint), or one
        `checkpoints/<step>` directory, whose parameters initialise a new run — not the
        optimizer state, the step or the data position (stage chaining, e.g. DSA's dense
        warm-up then sparse stage). A run that resumes from its own checkpoint ignores it.
        None: random initialisation.
    """

    steps: int = 1000
    eval_every: int = 250
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    mesh: str = "data=-1"
    async_checkpointing: bool = True
    progress: bool = True
    plot: bool = True
    sample_prompt: str = "def "
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    sample_top_k: int | None = None
    sample_top_p: float | None = 0.95
    init_from: str | None = None

    def __post_init__(self):
        _check_count("train", "steps", self.steps, 1)
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            _check_count("train", name, getattr(self, name), 1)
        _check_count("train", "seed", self.seed, 0)
        _check_count("train", "sample_tokens", self.sample_tokens, 0)
        _check_finite("train", "sample_temperature", self.sample_temperature, 0.0)
        if self.sample_top_k is not None:
            _check_count("train", "sample_top_k", self.sample_top_k, 1)
        if self.sample_top_p is not None:
            check(
                isinstance(self.sample_top_p, int | float) and 0.0 < self.sample_top_p <= 1.0,
                f"train.sample_top_p={self.sample_top_p!r} must be None or in (0, 1]",
            )
        check(
            self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
            f"train.init_from={self.init_from!r} must be a run's workdir or checkpoint "
            "directory, or none",
        )
        try:
            parse_mesh_spec(self.mesh)
        except ValueError as e:
            raise ConfigError(f"train.mesh={self.mesh!r}: {e}") from None
        unknown = sorted(set(parse_mesh_spec(self.mesh)) - set(MESH_AXES))
        check(
            not unknown,
            f"train.mesh={self.mesh!r} names unknown axes {unknown}; allowed: {list(MESH_AXES)}",
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one run of `python -m experiments.train` needs."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        for name, cls in (
            ("model", ModelConfig),
            ("data", DataConfig),
            ("optimizer", OptimizerConfig),
            ("train", TrainConfig),
        ):
            check(
                isinstance(getattr(self, name), cls),
                f"run.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}",
            )
        check(
            self.model.vocab_size >= VOCAB_SIZE,
            f"model.vocab_size={self.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({VOCAB_SIZE}); use model.vocab_size >= {VOCAB_SIZE}",
        )
        opt, steps = self.optimizer, self.train.steps
        check(
            opt.warmup_steps < steps,
            f"optimizer.warmup_steps={opt.warmup_steps} must be smaller than train.steps={steps}",
        )
        if opt.qk_clip_threshold is not None:
            labels = dict.fromkeys(self.model.layer_pattern)
            uses = ", ".join(
                f"{label!r} (kind {self.model.attention[label].kind})" for label in labels
            )
            check(
                any(qk_clip_targets(self.model.attention[label]) for label in labels),
                f"optimizer.qk_clip_threshold={opt.qk_clip_threshold} needs a softmax attention "
                f"layer whose per-head max logits QK-Clip can clip (kinds gqa, mla, or kinds "
                f"extending them such as dsa), but model.layer_pattern uses {uses}; set "
                "--optimizer.qk_clip_threshold=none or add such a layer",
            )
        if opt.schedule == "wsd":
            decay = wsd_decay_steps(opt, steps)
            check(
                opt.warmup_steps + decay <= steps,
                f"optimizer.warmup_steps={opt.warmup_steps} + WSD decay steps {decay} "
                f"(optimizer.decay_fraction={opt.decay_fraction} of train.steps={steps}) "
                f"exceed train.steps",
            )


def qk_clip_targets(attention: AttentionConfig) -> list[QKClipTarget]:
    """QK-Clip's weight slices of one attention layer (`optimizers.qk_clip`); [] if none.

    MHA/GQA (`gqa`, sliding-window layers included): q_proj and k_proj by sqrt(γ), a kv head
    by its group's smallest γ. MLA (`mla` and the kinds that extend it, e.g. `dsa`): q_nope and
    k_nope (in kv_b_proj) by sqrt(γ), q_rope by γ, the shared rope key (kv_a_proj) untouched.
    Other kinds (linear attention, DeepSeek-V4's) sow no max logits and are not clipped.
    """
    if isinstance(attention, MLAConfig):
        return mla_targets(
            attention.qk_nope_head_dim, attention.qk_rope_head_dim, attention.has_q_lora
        )
    if isinstance(attention, GQAConfig):
        return mha_targets(attention.num_heads, attention.num_kv_heads)
    return []


def wsd_decay_steps(opt: OptimizerConfig, steps: int) -> int:
    """Steps of the WSD decay phase."""
    return int(round(opt.decay_fraction * steps))


def run_to_dict(config: RunConfig) -> dict[str, Any]:
    """JSON-able dict of a RunConfig (attention/residual configs carry their `kind`)."""
    return to_dict(config)


def run_from_dict(data: dict[str, Any]) -> RunConfig:
    """Inverse of `run_to_dict`; validates like the constructors do."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ConfigError(f"unknown run config sections {unknown}")
    return from_dict(RunConfig, data)
