"""Model configuration: frozen dataclasses validated at construction.

A model is a layer pattern: `layer_pattern` names, for each layer (cycled over `num_layers`), an
entry of `attention`, a mapping from a label to the attention kind's own config. Hybrids such as
Kimi Linear (three KDA layers for every MLA layer) are therefore data:

    ModelConfig(num_layers=8, layer_pattern=("kda", "kda", "kda", "mla"),
                attention={"kda": KDAConfig(...), "mla": MLAConfig(use_nope=True, ...)})

The residual kind (`residual`) is model-wide: kinds with several streams (hyper-connections)
change the shape of the residual state, which every layer must share.
Field names follow the Hugging Face / DeepSeek config keys where one exists.
"""

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
from flax.core import FrozenDict

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the rule."""


def check(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def check_positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        check(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{owner}.{name}={value!r} must be a positive integer",
        )


def check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    check(value in allowed, f"{owner}.{name}={value!r} is not one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (Hugging Face `rope_theta` / `rope_scaling` keys).

    Attributes:
      theta: base of the frequencies (`rope_theta`).
      layout: "interleaved" (DeepSeek's adjacent pairs) or "half" (rotate-half).
      yarn_factor: YaRN scaling factor (`rope_scaling.factor`); None disables YaRN.
      original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim: YaRN keys.
    """

    theta: float = 10000.0
    layout: str = "half"
    yarn_factor: float | None = None
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        check(self.theta > 1, f"rope.theta={self.theta!r} must be > 1")
        check_choice("rope", "layout", self.layout, ("interleaved", "half"))
        check(
            self.yarn_factor is None or self.yarn_factor >= 1,
            f"rope.yarn_factor={self.yarn_factor!r} must be None or >= 1",
        )
        check_positive(
            "rope", original_max_position_embeddings=self.original_max_position_embeddings
        )


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Base of every attention kind's config. Subclasses set `kind` and validate their fields."""

    kind: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class ResidualConfig:
    """Base of every residual kind's config."""

    kind: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """What every sub-module needs to know about the model besides its own config."""

    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02
    norm_eps: float = 1e-6
    num_layers: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only language model.

    Attributes:
      vocab_size: token vocabulary (V).
      hidden_size: model width (D).
      intermediate_size: SwiGLU hidden width (F).
      num_layers: decoder layers (L).
      layer_pattern: labels into `attention`, cycled over the layers.
      attention: label -> attention-kind config.
      residual: the residual kind's config (model-wide).
      tie_word_embeddings: output head shares the embedding matrix.
      rms_norm_eps, init_std: norm epsilon; normal init std of weights.
      dtype: compute dtype of activations ("float32" or "bfloat16"); softmax, norms and
        recurrent states stay float32 whatever this is.
      param_dtype: storage dtype of parameters.
      scan_layers: `nn.scan` over repetitions of `layer_pattern` (one compiled body).
      remat: rematerialisation of each scanned/unrolled group: "none", "full" or "dots"
        (save matmul outputs only).
    """

    vocab_size: int = 264
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    layer_pattern: tuple[str, ...] = ("gqa",)
    attention: Mapping[str, AttentionConfig] = dataclasses.field(default_factory=dict)
    residual: ResidualConfig | None = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self):
        from jaxmodels import registry  # the registry imports this module

        if not self.attention:
            from jaxmodels.attention.gqa import GQAConfig

            object.__setattr__(self, "attention", {"gqa": GQAConfig()})
        if self.residual is None:
            from jaxmodels.residual.prenorm import PrenormConfig

            object.__setattr__(self, "residual", PrenormConfig())
        object.__setattr__(self, "attention", FrozenDict(self.attention))
        object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
        check_positive(
            "model",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
        )
        check(len(self.layer_pattern) > 0, "model.layer_pattern must name at least one layer")
        for label in self.layer_pattern:
            check(
                label in self.attention,
                f"model.layer_pattern names {label!r}, which is not a key of model.attention "
                f"{sorted(self.attention)}",
            )
        for label, attention in self.attention.items():
            check(
                isinstance(attention, AttentionConfig),
                f"model.attention[{label!r}] must be an AttentionConfig, got {attention!r}",
            )
            registry.attention_kind(attention.kind)
        check(
            isinstance(self.residual, ResidualConfig),
            f"model.residual must be a ResidualConfig, got {self.residual!r}",
        )
        registry.residual_kind(self.residual.kind)
        check_choice("model", "dtype", self.dtype, tuple(DTYPES))
        check_choice("model", "param_dtype", self.param_dtype, tuple(DTYPES))
        check_choice("model", "remat", self.remat, REMAT_POLICIES)
        check(self.init_std > 0, f"model.init_std={self.init_std!r} must be positive")
        check(self.rms_norm_eps > 0, f"model.rms_norm_eps={self.rms_norm_eps!r} must be positive")
        if self.scan_layers:
            check(
                self.num_layers % len(self.layer_pattern) == 0,
                f"model.num_layers={self.num_layers} must be a multiple of "
                f"len(model.layer_pattern)={len(self.layer_pattern)} when model.scan_layers=True",
            )

    @property
    def layer_attention(self) -> tuple[AttentionConfig, ...]:
        """The attention config of each of the `num_layers` layers."""
        pattern = self.layer_pattern
        return tuple(self.attention[pattern[i % len(pattern)]] for i in range(self.num_layers))

    @property
    def settings(self) -> BlockSettings:
        return BlockSettings(
            hidden_size=self.hidden_size,
            dtype=DTYPES[self.dtype],
            param_dtype=DTYPES[self.param_dtype],
            init_std=self.init_std,
            norm_eps=self.rms_norm_eps,
            num_layers=self.num_layers,
        )


# ---------------------------------------------------------------------------------------------
# Plain-data round trip (JSON-able dicts), used to save the resolved config beside checkpoints.


def to_dict(config: Any) -> Any:
    """Nested dataclasses -> dicts; attention/residual configs carry their `kind`."""
    if dataclasses.is_dataclass(config):
        out = {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
        if isinstance(config, AttentionConfig | ResidualConfig):
            out = {"kind": config.kind, **out}
        return out
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    return config


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Inverse of `to_dict` for dataclass `cls` (kinds looked up in the registry)."""
    from jaxmodels import registry

    data = dict(data)
    if cls in (AttentionConfig, ResidualConfig) or (
        isinstance(cls, type) and issubclass(cls, AttentionConfig | ResidualConfig)
    ):
        kind = data.pop("kind")
        is_attention = issubclass(cls, AttentionConfig)
        entry = registry.attention_kind(kind) if is_attention else registry.residual_kind(kind)
        cls = entry.config_cls
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except (TypeError, ValueError, KeyError):
                continue
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_dict(hint, value)
    if origin in (Mapping, dict, typing.Mapping) or hint is Mapping:
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _convert(value_hint, v) for k, v in value.items()}
    if origin is tuple:
        item_hint = args[0] if args else Any
        return tuple(_convert(item_hint, v) for v in value)
    if isinstance(hint, type) and issubclass(hint, AttentionConfig | ResidualConfig):
        return from_dict(hint, value)
    return value
