"""Language-model loss, train state and the train step (model-agnostic, optax-based).

`make_train_step` returns a pure function `(state, batch) -> (state, metrics)`; `build_trainer`
places it under `jax.jit` with the shardings of `sharding/` and donation of the old state.
"""

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

import sharding
from jaxmodels.config import AttentionConfig, ModelConfig
from jaxmodels.model import Decoder, group_sizes
from optimizers import collect_max_logits

PARAMS = "params"  # the parameter collection: `TrainState.params` is `{"params": ...}`


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: the `{"params": ...}` variables; opt_state: the optimizer's."""

    step: jax.Array
    params: Any
    opt_state: Any


def cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (nats) and the number of counted tokens, in float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    loss_BT = log_z_BT - target_logit_BT
    if mask_BT is None:
        mask_BT = jnp.ones_like(loss_BT)
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.sum(loss_BT * mask_BT), jnp.sum(mask_BT)


def bits_per_token(loss_nats: float) -> float:
    """Nats per token -> bits per token (= bits per byte for byte-level tokens)."""
    return loss_nats / math.log(2.0)


def max_logits_by_module(attn_stats: Any) -> dict[tuple[str, ...], jax.Array]:
    """Flattens the sown `attn_stats` collection to {attention module path: max logits}.

    The keys are the modules' parameter paths in the `{"params": ...}` variables, e.g.
    `("params", "group_0", "layer_0", "attention")` — the keys of `attention_modules` and of
    `optimizers.qk_clip`'s targets. Scanned stacks keep their leading layer axis ([L, N]);
    unrolled layers give [N].
    """
    return collect_max_logits(attn_stats, name="max_logits", prefix=(PARAMS,))


def attention_modules(config: ModelConfig) -> dict[tuple[str, ...], AttentionConfig]:
    """{parameter path of every attention module of `Decoder(config)`: its attention config}.

    Paths follow the decoder's naming (`model.py`): `("params", "layers", "layer_<i>",
    "attention")` for a scanned stack (one entry per pattern position, leaves with a leading
    layer axis), `("params", "group_<g>", "layer_<i>", "attention")` when unrolled, and
    `("params", "tail", "layer_<i>", "attention")` for the layers of a partial repetition.
    """
    pattern = config.layer_pattern
    num_groups, remainder = group_sizes(config)
    if config.scan_layers:
        groups = [("layers", pattern)] if num_groups else []
    else:
        groups = [(f"group_{g}", pattern) for g in range(num_groups)]
    if remainder:
        groups.append(("tail", pattern[:remainder]))
    return {
        (PARAMS, group, f"layer_{i}", "attention"): config.attention[label]
        for group, labels in groups
        for i, label in enumerate(labels)
    }


def auxiliary_loss(losses: Any) -> jax.Array:
    """Sum of every scalar a module sowed into the `losses` collection (e.g. DSA's indexer KL),
    each already weighted by its module; scanned stacks sum over layers."""
    leaves = jax.tree.leaves(losses)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in leaves)


def make_train_step(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    track_max_logits: bool = False,
):
    """The train step: forward, loss, gradients, optimizer update.

    The loss is the token cross-entropy plus `auxiliary_loss` of the `losses` collection; the
    metrics report both (`loss` is the cross-entropy alone).

    With `track_max_logits`, attention modules sow their per-head max logits, which are passed
    to the optimizer as `update(..., max_logits={module path: [N] or [L, N]})` (MuonClip). The
    optimizer must then accept extra args (`optax.GradientTransformationExtraArgs`).
    """
    model = Decoder(config)

    def loss_fn(params, batch):
        mutable = ["losses"] + (["attn_stats"] if track_max_logits else [])
        (logits_BTV, _), collections = model.apply(params, batch["inputs"], mutable=mutable)
        loss_sum, count = cross_entropy(logits_BTV, batch["targets"], batch.get("mask"))
        lm_loss = loss_sum / jnp.maximum(count, 1.0)
        aux_loss = auxiliary_loss(collections.get("losses", {}))
        return lm_loss + aux_loss, (lm_loss, aux_loss, count, collections.get("attn_stats", {}))

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (loss, aux_loss, count, attn_stats)), grads = grad_fn(state.params, batch)
        extra = {"max_logits": max_logits_by_module(attn_stats)} if track_max_logits else {}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "aux_loss": aux_loss,
            "tokens": count,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        if track_max_logits:
            metrics["max_logit"] = jnp.max(
                jnp.stack([jnp.max(v) for v in extra["max_logits"].values()])
            )
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(config: ModelConfig):
    """`(params, batch) -> (summed loss nats, token count)` for held-out evaluation."""
    model = Decoder(config)

    def eval_step(params, batch):
        logits_BTV, _ = model.apply(params, batch["inputs"])
        return cross_entropy(logits_BTV, batch["targets"], batch.get("mask"))

    return eval_step


def _init_params(model: nn.Module, key: jax.Array, tokens: Any) -> dict[str, Any]:
    """`{"params": ...}` of `model.init`: collections that modules sow while initialising
    (`attn_stats`, `losses`) are outputs of a forward pass, not parameters to train or save."""
    return {"params": model.init(key, tokens)["params"]}


def init_train_state(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    *,
    seq_len: int,
    rules: sharding.rules.Rules | None = None,
) -> tuple[TrainState, TrainState]:
    """A train state whose parameters and optimizer state are born sharded.

    Returns:
      (state, state_shardings).
    """
    model = Decoder(config)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params, param_shardings = sharding.init_sharded(
        lambda key: _init_params(model, key, tokens), rng, mesh=mesh, rules=rules
    )
    opt_shardings = sharding.optimizer_state_shardings(optimizer, params, param_shardings, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    return train_state_from_params(params, optimizer, shardings, mesh), shardings


def train_state_from_params(
    params: Any,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """Step 0 and a fresh optimizer state for `params` (placed with `shardings.params`), e.g.
    parameters restored from another run."""
    with jax.set_mesh(mesh):
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def abstract_train_state(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    seq_len: int,
    rules: sharding.rules.Rules | None = None,
) -> tuple[TrainState, TrainState]:
    """Shape-only train state (`jax.ShapeDtypeStruct` leaves carrying their shardings) and its
    shardings: the orbax restore target and the input of ahead-of-time compilation."""
    model = Decoder(config)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    key = jax.random.key(0)  # created outside the mesh context (AOT meshes have no executable)
    with sharding.use_rules(rules or sharding.current_rules()), jax.set_mesh(mesh):
        boxed = jax.eval_shape(lambda key: _init_params(model, key, tokens), key)
        param_shardings = sharding.tree_shardings(boxed, mesh, rules)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed),
        param_shardings,
    )
    opt_shardings = sharding.optimizer_state_shardings(optimizer, params, param_shardings, mesh)
    opt_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(optimizer.init, params),
        opt_shardings,
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=params,
        opt_state=opt_state,
    )
    return state, TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)


def batch_shardings(mesh: jax.sharding.Mesh, batch_example: dict[str, Any], rules=None):
    """Every batch array is [B, T, ...] sharded over the `batch` rule's mesh axes."""
    return {
        k: sharding.named_sharding(("batch",) + (None,) * (v.ndim - 1), mesh, rules, v.shape)
        for k, v in batch_example.items()
    }


def build_trainer(
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    state_shardings: TrainState,
    batch_example: dict[str, Any],
    *,
    rules=None,
    track_max_logits: bool = False,
    donate: bool = True,
):
    """The jitted sharded train step `(state, batch) -> (state, metrics)`."""
    step_fn = make_train_step(config, optimizer, track_max_logits=track_max_logits)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    return sharding.sharded_jit(
        step_fn,
        mesh=mesh,
        rules=rules,
        in_shardings=(state_shardings, batch_shardings(mesh, batch_example, rules)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
    )
