"""OptimizerConfig -> an optax chain: learning-rate schedule, gradient clipping, AdamW or Muon,
then QK-Clip if `qk_clip_threshold` is set.

tx = build_optimizer(config.optimizer, total_steps=config.train.steps, model=config.model)
# == optax.chain(optax.clip_by_global_norm(grad_clip),
#                optax.adamw(schedule, b1, b2, eps, weight_decay, mask=matrices))
# with qk_clip_threshold=τ: optax.chain(..., optimizers.qk_clip(qk_clip_module_targets(model), τ)),
# whose update needs `max_logits=` (the train step's `track_max_logits=True` passes them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import optimizers
from experiments.config import OptimizerConfig, qk_clip_targets, wsd_decay_steps
from jaxmodels.config import ModelConfig
from jaxmodels.training import attention_modules


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay, WSD, or a constant.

    cosine: `optax.warmup_cosine_decay_schedule` reaching `min_lr_ratio * learning_rate` at
    `total_steps`. wsd (warmup-stable-decay): warmup, constant peak, then a linear or cosine
    decay over the last `decay_fraction` of the run, joined with `optax.join_schedules`.
    """
    peak = config.learning_rate
    end = peak * config.min_lr_ratio
    warmup = config.warmup_steps
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=end,
        )
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if config.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
    decay_steps = max(wsd_decay_steps(config, total_steps), 1)
    stable_end = max(total_steps - decay_steps, warmup)
    if config.decay_shape == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    return optax.join_schedules([warm, optax.constant_schedule(peak), decay], [warmup, stable_end])


def decay_mask(params):
    """Weight decay on matrices only (ndim >= 2), not on norms' scales or biases."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def qk_clip_module_targets(
    model: ModelConfig,
) -> dict[tuple[str, ...], list[optimizers.QKClipTarget]]:
    """{attention module parameter path: QK-Clip targets} of every layer QK-Clip can clip.

    The paths come from `training.attention_modules`: they are the keys under which the train
    step passes each layer's max logits (`training.max_logits_by_module`).
    """
    targets = {path: qk_clip_targets(att) for path, att in attention_modules(model).items()}
    return {path: t for path, t in targets.items() if t}


def build_optimizer(
    config: OptimizerConfig, total_steps: int, model: ModelConfig | None = None
) -> optax.GradientTransformation:
    """The optax optimizer of a run (see the module docstring).

    `model` is needed only with `config.qk_clip_threshold` (QK-Clip's targets; see
    `qk_clip_stage`); the update of that optimizer takes `max_logits=`
    (`training.make_train_step(track_max_logits=True)` passes them).
    """
    schedule = learning_rate_schedule(config, total_steps)
    if config.name == "adamw":
        core = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    else:
        ratio = config.muon_adam_lr_ratio
        core = optimizers.muon(
            schedule,
            beta=config.muon_beta,
            nesterov=config.muon_nesterov,
            ns_coeffs=config.muon_ns_coeffs,
            ns_steps=config.muon_ns_steps,
            scaling=config.muon_scaling,
            target_rms=config.muon_target_rms,
            weight_decay=config.weight_decay,
            weight_decay_mask=decay_mask,
            adam_learning_rate=None if ratio == 1.0 else (lambda step: ratio * schedule(step)),
            adam_b1=config.b1,
            adam_b2=config.b2,
            adam_eps=config.eps,
        )
    stages = [core]
    if config.grad_clip > 0:
        stages.insert(0, optax.clip_by_global_norm(config.grad_clip))
    if config.qk_clip_threshold is not None:
        stages.append(qk_clip_stage(config.qk_clip_threshold, model))
    return optax.chain(*stages) if len(stages) > 1 else core


def qk_clip_stage(
    threshold: float, model: ModelConfig | None
) -> optax.GradientTransformationExtraArgs:
    """`optimizers.qk_clip` over the model's attention layers.

    Without `model` the stage still has QK-Clip's state (what restoring a run's checkpoint or
    shape-only planning needs, e.g. `experiments.generate`), but its update raises.
    """
    if model is not None:
        return optimizers.qk_clip(qk_clip_module_targets(model), threshold=threshold)
    clip = optimizers.qk_clip({}, threshold=threshold)

    def update_fn(updates, state, params=None, **extra_args):
        raise ValueError(
            f"optimizer.qk_clip_threshold={threshold} needs the model's attention layers to "
            "update: build the optimizer with build_optimizer(config.optimizer, steps, "
            "model=config.model)"
        )

    return optax.GradientTransformationExtraArgs(clip.init, update_fn)
