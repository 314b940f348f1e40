"""The decoder: embedding -> residual expand -> layer groups -> collapse -> norm -> head.

Layers are built from `ModelConfig.layer_pattern`; one repetition of the pattern is a
`DecoderGroup`. With `scan_layers`, the groups are an `nn.scan` (parameters gain a leading
`layers` axis, one compiled body); otherwise they are unrolled. `remat` wraps each group in
`nn.remat`. The decoder never names an attention or residual kind: it asks the registry.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels import registry
from jaxmodels.config import AttentionConfig, BlockSettings, ModelConfig, ResidualConfig
from jaxmodels.layers import Embed, RMSNorm, SwiGLU, dense
from sharding.rules import constrain

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# Collections that hold one entry per layer (stacked along the scan axis).
PER_LAYER_COLLECTIONS = ("params", "attn_stats", "intermediates", "losses")


class DecoderLayer(nn.Module):
    """One layer: residual-wrapped attention, then residual-wrapped SwiGLU."""

    attention: AttentionConfig
    residual: ResidualConfig
    settings: BlockSettings
    intermediate_size: int

    @nn.compact
    def __call__(self, state: Any, positions_BT: jax.Array, cache: Any):
        attention_kind = registry.attention_kind(self.attention.kind)
        residual_kind = registry.residual_kind(self.residual.kind)
        wrap_attention = residual_kind.sublayer_cls(
            config=self.residual, settings=self.settings, name="attention_residual"
        )
        wrap_mlp = residual_kind.sublayer_cls(
            config=self.residual, settings=self.settings, name="mlp_residual"
        )
        x_BTD, ctx = wrap_attention.read(state)
        y_BTD, cache = attention_kind.module_cls(
            config=self.attention, settings=self.settings, name="attention"
        )(x_BTD, positions_BT, cache)
        state = wrap_attention.write(state, y_BTD, ctx)
        x_BTD, ctx = wrap_mlp.read(state)
        y_BTD = SwiGLU(self.intermediate_size, self.settings, name="mlp")(x_BTD)
        state = wrap_mlp.write(state, y_BTD, ctx)
        return state, cache


class DecoderGroup(nn.Module):
    """One repetition of the layer pattern; carry = residual state, xs = the group's caches."""

    config: ModelConfig

    @nn.compact
    def __call__(self, state: Any, positions_BT: jax.Array, caches: tuple | None):
        cfg = self.config
        pattern = cfg.layer_pattern
        new_caches = []
        for i, label in enumerate(pattern):
            state, cache = DecoderLayer(
                attention=cfg.attention[label],
                residual=cfg.residual,
                settings=cfg.settings,
                intermediate_size=cfg.intermediate_size,
                name=f"layer_{i}",
            )(state, positions_BT, None if caches is None else caches[i])
            new_caches.append(cache)
        return state, (None if caches is None else tuple(new_caches))


def _group_cls(config: ModelConfig):
    cls = DecoderGroup
    if config.remat != "none":
        cls = nn.remat(
            cls, policy=_REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers
        )
    return cls


def group_sizes(config: ModelConfig) -> tuple[int, int]:
    """(number of full pattern repetitions, number of trailing layers of a partial one)."""
    return divmod(config.num_layers, len(config.layer_pattern))


class Decoder(nn.Module):
    """Decoder-only language model.

    `__call__(tokens_BT, positions_BT=None, caches=None) -> (logits_BTV float32, caches)`.
    Without caches: a full causal forward pass. With caches (from `init_caches`): prefill or
    decode, writing the new tokens into the caches.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, caches=None):
        cfg = self.config
        settings = cfg.settings
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        embed = Embed(cfg.vocab_size, settings, name="embed")
        residual_kind = registry.residual_kind(cfg.residual.kind)
        state = residual_kind.expand_cls(config=cfg.residual, settings=settings, name="expand")(
            embed(tokens_BT)
        )
        num_groups, remainder = group_sizes(cfg)
        group_caches = None if caches is None else caches["groups"]
        if cfg.scan_layers:
            scanned = nn.scan(
                _group_cls(cfg),
                variable_axes={c: 0 for c in PER_LAYER_COLLECTIONS},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0),
                length=num_groups,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            state, group_caches = scanned(cfg, name="layers")(state, positions_BT, group_caches)
        else:
            outs = []
            for g in range(num_groups):
                state, c = _group_cls(cfg)(cfg, name=f"group_{g}")(
                    state, positions_BT, None if group_caches is None else group_caches[g]
                )
                outs.append(c)
            group_caches = None if caches is None else tuple(outs)
        tail_caches = None if caches is None else caches["tail"]
        if remainder:
            tail_cfg = _tail_config(cfg, remainder)
            state, tail_caches = DecoderGroup(tail_cfg, name="tail")(
                state, positions_BT, tail_caches
            )
        x_BTD = residual_kind.collapse_cls(config=cfg.residual, settings=settings, name="collapse")(
            state
        )
        x_BTD = RMSNorm(eps=cfg.rms_norm_eps, param_dtype=settings.param_dtype, name="final_norm")(
            x_BTD
        )
        if cfg.tie_word_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = dense(cfg.vocab_size, ("embed", "vocab"), settings, name="lm_head")(x_BTD)
        logits_BTV = constrain(logits_BTV.astype(jnp.float32), ("batch", "length", "act_vocab"))
        new_caches = None if caches is None else {"groups": group_caches, "tail": tail_caches}
        return logits_BTV, new_caches


def _tail_config(config: ModelConfig, remainder: int) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(
        config,
        layer_pattern=config.layer_pattern[:remainder],
        num_layers=remainder,
        scan_layers=False,
    )


def _pattern_caches(config: ModelConfig, pattern, batch_size, max_length, dtype, fn):
    out = []
    for label in pattern:
        attention = config.attention[label]
        kind = registry.attention_kind(attention.kind)
        out.append(fn(kind.module_cls, attention))
    return tuple(out)


def init_caches(config: ModelConfig, batch_size: int, max_length: int, dtype=None):
    """Empty decode caches for every layer, laid out as `Decoder` expects them.

    Scanned models stack each pattern position's cache over the groups (leading axis).
    """
    dtype = config.settings.dtype if dtype is None else dtype

    def one(module_cls, attention):
        return module_cls.init_cache(attention, config.settings, batch_size, max_length, dtype)

    num_groups, remainder = group_sizes(config)
    group = _pattern_caches(config, config.layer_pattern, batch_size, max_length, dtype, one)
    if config.scan_layers:
        groups = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_groups,) + x.shape), group)
    else:
        groups = tuple(group for _ in range(num_groups))
    tail = _pattern_caches(
        config, config.layer_pattern[:remainder], batch_size, max_length, dtype, one
    )
    return {"groups": groups, "tail": tail if remainder else None}


def cache_logical_axes(config: ModelConfig):
    """Logical axes of `init_caches(config, ...)`, leaf for leaf (tuples of names)."""

    def one(module_cls, attention):
        return module_cls.cache_logical_axes(attention)

    num_groups, remainder = group_sizes(config)
    group = _pattern_caches(config, config.layer_pattern, None, None, None, one)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    if config.scan_layers:
        groups = jax.tree.map(lambda axes: ("layers",) + axes, group, is_leaf=is_axes)
    else:
        groups = tuple(group for _ in range(num_groups))
    tail = _pattern_caches(config, config.layer_pattern[:remainder], None, None, None, one)
    return {"groups": groups, "tail": tail if remainder else None}
