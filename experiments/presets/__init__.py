"""Named run presets: `get_preset("small")` -> RunConfig.

Every module of this package is imported on first use (pkgutil), and registers its presets:

    # experiments/presets/my_hybrid.py
    from experiments.presets import register_preset

    def my_hybrid() -> RunConfig: ...
    register_preset("my-hybrid", my_hybrid)

So a new preset is one new file; nothing else changes. `python -m experiments.train --preset
my-hybrid` then runs it, and `--help` lists it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from experiments.config import RunConfig
from jaxmodels.config import ConfigError

DEFAULT_PRESET = "hybrid"

_PRESETS: dict[str, tuple[Callable[[], RunConfig], str]] = {}
_loaded = False


def register_preset(name: str, fn: Callable[[], RunConfig], description: str | None = None):
    """Registers `fn` (no arguments, returns a RunConfig) as preset `name`.

    `description` defaults to the first line of `fn`'s docstring. Registering a name twice
    with different functions is an error (two files would silently fight over it).
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"preset name must be a non-empty string, got {name!r}")
    if name in _PRESETS and _PRESETS[name][0] is not fn:
        raise ValueError(f"preset {name!r} is already registered by {_PRESETS[name][0]!r}")
    if description is None:
        lines = (fn.__doc__ or "").strip().splitlines()
        description = lines[0] if lines else ""
    _PRESETS[name] = (fn, description)
    return fn


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def preset_names() -> list[str]:
    _load_all()
    return sorted(_PRESETS)


def preset_description(name: str) -> str:
    _load_all()
    return _PRESETS[name][1]


def get_preset(name: str) -> RunConfig:
    """The RunConfig of preset `name` (ConfigError naming the known presets if unknown)."""
    _load_all()
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    config = _PRESETS[name][0]()
    if not isinstance(config, RunConfig):
        raise TypeError(f"preset {name!r} returned {type(config).__name__}, not a RunConfig")
    return config


__all__ = [
    "DEFAULT_PRESET",
    "get_preset",
    "preset_description",
    "preset_names",
    "register_preset",
]
