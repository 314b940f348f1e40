"""Registries of attention kinds and residual kinds.

A new attention kind is one module file that defines a config (a frozen `AttentionConfig`
subclass with a `kind` name) and a Linen module, registered with `register_attention`, plus one
import line in `jaxmodels/attention/__init__.py`. The decoder never names a kind.

Attention module contract (constructed as `module_cls(config=..., settings=BlockSettings)`):
  `__call__(x_BTD, positions_BT, cache=None) -> (y_BTD, new_cache)`;
    cache None: full causal forward over the T tokens (training);
    cache given: the T new tokens (positions cache.index .. +T-1) are written to the cache and
    attend over it (prefill with an empty cache, then decode with T = 1).
  classmethod `init_cache(config, settings, batch_size, max_length, dtype) -> cache pytree`;
  classmethod `cache_logical_axes(config) -> pytree of logical-axis tuples` like the cache;
  optional: sow per-head max logits [N] as `("attn_stats", "max_logits")` when that collection
  is mutable (MuonClip).

Residual kind contract: three modules constructed as `cls(config=..., settings=...)`:
  expand: `__call__(x_BTD) -> state` (embedding -> residual state);
  sublayer: `read(state) -> (x_BTD, ctx)` gives a sub-layer its normalised input and
    `write(state, y_BTD, ctx) -> state` adds its output back;
  collapse: `__call__(state) -> x_BTD` (residual state -> final-norm input).
"""

import dataclasses

from jaxmodels.config import AttentionConfig, ConfigError, ResidualConfig


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    name: str
    config_cls: type
    module_cls: type


@dataclasses.dataclass(frozen=True)
class ResidualKind:
    name: str
    config_cls: type
    expand_cls: type
    sublayer_cls: type
    collapse_cls: type


_ATTENTION: dict[str, AttentionKind] = {}
_RESIDUAL: dict[str, ResidualKind] = {}


def register_attention(config_cls: type, module_cls: type) -> None:
    """Registers an attention kind under `config_cls.kind`."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, AttentionConfig)):
        raise TypeError(f"{config_cls!r} is not an AttentionConfig subclass")
    if not config_cls.kind:
        raise ValueError(f"{config_cls.__name__}.kind is empty")
    _ATTENTION[config_cls.kind] = AttentionKind(config_cls.kind, config_cls, module_cls)


def register_residual(
    config_cls: type, *, expand_cls: type, sublayer_cls: type, collapse_cls: type
) -> None:
    """Registers a residual kind under `config_cls.kind`."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, ResidualConfig)):
        raise TypeError(f"{config_cls!r} is not a ResidualConfig subclass")
    _RESIDUAL[config_cls.kind] = ResidualKind(
        config_cls.kind, config_cls, expand_cls, sublayer_cls, collapse_cls
    )


def _ensure_loaded() -> None:
    import jaxmodels.attention  # noqa: F401  (registers the built-in kinds)
    import jaxmodels.residual  # noqa: F401


def attention_kind(name: str) -> AttentionKind:
    _ensure_loaded()
    if name not in _ATTENTION:
        raise ConfigError(f"attention kind {name!r} is not registered; known: {sorted(_ATTENTION)}")
    return _ATTENTION[name]


def residual_kind(name: str) -> ResidualKind:
    _ensure_loaded()
    if name not in _RESIDUAL:
        raise ConfigError(f"residual kind {name!r} is not registered; known: {sorted(_RESIDUAL)}")
    return _RESIDUAL[name]


def attention_kinds() -> list[str]:
    _ensure_loaded()
    return sorted(_ATTENTION)


def residual_kinds() -> list[str]:
    _ensure_loaded()
    return sorted(_RESIDUAL)
