"""Command line of the main job: a preset plus dotted overrides of any config field.

    python -m experiments.train --preset small --workdir runs/x \\
        --model.num_layers=4 --optimizer.learning_rate=3e-3 \\
        --model.attention.gqa.num_heads=8 --data.seq_len=256

Every field of `RunConfig` can be set: `--SECTION.FIELD=VALUE` (or `--SECTION.FIELD VALUE`),
nested configs by their path (`--model.attention.gqa.rope.theta=5e5`), entries of the
attention mapping by their label. `--model.attention.LABEL.kind=KIND` adds an entry (or
replaces one) with that kind's defaults; `--model.residual.kind=KIND` likewise. Values are
parsed by the field's type: int, float (`nan`/`inf` too), bool (true/false/1/0/yes/no), str,
`none` for optional fields, comma-separated tuples (`--model.layer_pattern=kda,kda,kda,mla`).

Unknown fields, unparsable values and invalid combinations raise `CLIError` naming the flag,
the value and the rule, before JAX compiles anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from experiments import presets
from experiments.config import RunConfig, run_from_dict, run_to_dict
from jaxmodels import registry
from jaxmodels.config import AttentionConfig, ConfigError, ResidualConfig

TOP_LEVEL_FLAGS = ("--preset", "--workdir", "--distributed", "--help")
_TRUE = ("1", "true", "yes", "on", "t", "y")
_FALSE = ("0", "false", "no", "off", "f", "n")


class CLIError(ValueError):
    """A bad command line: the message names the flag, the value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Args:
    """A parsed command line.

    Attributes:
      preset: the preset name.
      workdir: the run directory.
      distributed: call `jax.distributed.initialize()` first.
      config: the preset with the overrides applied (validated).
      overrides: the dotted overrides as given (path -> text).
      help: `--help` was given (`help_text` holds the text).
    """

    preset: str
    workdir: str
    distributed: bool
    config: RunConfig
    overrides: dict[str, str]
    help: bool = False
    help_text: str = ""


# ---------------------------------------------------------------------------------------------
# Types and fields.


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> type hint of a config dataclass (ClassVars such as `kind` excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _kind_base(hint: Any) -> type | None:
    """AttentionConfig / ResidualConfig if `hint` is (a subclass of) one of them."""
    hint = _strip_optional(hint)
    for base in (AttentionConfig, ResidualConfig):
        if isinstance(hint, type) and issubclass(hint, base):
            return base
    return None


def _is_mapping(hint: Any) -> bool:
    hint = _strip_optional(hint)
    return typing.get_origin(hint) in (Mapping, dict, typing.Mapping) or hint in (Mapping, dict)


def _kinds(base: type) -> list[str]:
    return registry.attention_kinds() if base is AttentionConfig else registry.residual_kinds()


def _kind_config_cls(base: type, kind: str) -> type:
    if base is AttentionConfig:
        return registry.attention_kind(kind).config_cls
    return registry.residual_kind(kind).config_cls


def _node_cls(hint: Any, node: Any) -> type | None:
    """The dataclass type of a config node: the registered kind's config for attention and
    residual configs, the hint itself for plain nested dataclasses, None for plain values."""
    base = _kind_base(hint)
    if base is not None:
        return _kind_config_cls(base, node["kind"]) if isinstance(node, dict) else None
    hint = _strip_optional(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    return None


def describe_type(hint: Any) -> str:
    """Short human description of a field type ("int", "float or none", "str,str,...")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or none" if type(None) in args else "")
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{describe_type(args[0])},..."
        return ",".join(describe_type(a) for a in args) or "()"
    return getattr(hint, "__name__", str(hint))


def parse_value(text: str, hint: Any, flag: str) -> Any:
    """Parses the command-line text of one field by its type hint (CLIError if it does not fit).

    `flag` is the flag as the user wrote it, for the message.
    """

    def fail(rule: str) -> CLIError:
        return CLIError(f"{flag}={text!r}: {rule}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    stripped = text.strip()
    if hint is Any:
        return text
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and stripped.lower() in ("none", "null"):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(text, arg, flag)
            except CLIError:
                continue
        raise fail(f"expected {describe_type(hint)}")
    if origin is Literal:
        for arg in args:
            if str(arg) == stripped:
                return arg
        raise fail(f"expected one of {list(args)}")
    if hint is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise fail("expected a boolean (true/false, 1/0, yes/no)")
    if hint is int:
        try:
            return int(stripped.replace("_", ""))
        except ValueError:
            pass
        try:
            value = float(stripped)
        except ValueError:
            raise fail("expected an integer") from None
        if value.is_integer():
            return int(value)
        raise fail("expected an integer")
    if hint is float:
        try:
            return float(stripped.replace("_", ""))
        except ValueError:
            raise fail("expected a number") from None
    if hint is str:
        return text
    if origin is tuple:
        inner = stripped
        if inner[:1] in "([" and inner[-1:] in ")]":
            inner = inner[1:-1]
        items = [s.strip() for s in inner.split(",")] if inner.strip() else []
        if items and items[-1] == "":
            items = items[:-1]
        if len(args) == 2 and args[1] is Ellipsis:
            item_hints = [args[0]] * len(items)
        else:
            if len(items) != len(args):
                raise fail(f"expected {len(args)} comma-separated values ({describe_type(hint)})")
            item_hints = list(args)
        return tuple(parse_value(s, h, flag) for s, h in zip(items, item_hints, strict=True))
    raise fail(f"a field of type {describe_type(hint)} cannot be set from the command line")


# ---------------------------------------------------------------------------------------------
# Overrides.


def _unknown(flag: str, where: str, name: str, allowed: list[str]) -> CLIError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    owner = f"{where} has" if where else "the config has"
    return CLIError(
        f"unknown flag {flag}: {owner} no field {name!r}{hint} Allowed: {', '.join(allowed)}"
    )


def _set(node: dict, cls: type, parts: list[str], text: str | None, flag: str, where: str) -> None:
    """Sets `parts` (a dotted path below `node`, a dict of dataclass `cls`) to `text`."""
    fields = _fields(cls)
    name, rest = parts[0], parts[1:]
    here = f"{where}.{name}" if where else name
    if name not in fields:
        extra = ["kind"] if _kind_base(cls) is not None else []
        raise _unknown(flag, where, name, sorted(fields) + extra)
    hint = fields[name]
    if _is_mapping(hint):
        entries = node.setdefault(name, {})
        value_hint = typing.get_args(_strip_optional(hint))[1]
        base = _kind_base(value_hint)
        if not rest or (len(rest) == 1 and rest[0] != "kind"):
            example = f"--{here}.{next(iter(entries), 'LABEL')}.FIELD=VALUE"
            raise CLIError(
                f"{flag}: {here} maps labels to configs; set a field of an entry ({example}) "
                f"or add an entry with --{here}.LABEL.kind=KIND"
            )
        label, rest = rest[0], rest[1:]
        if rest == ["kind"] and base is not None:
            kind = (text or "").strip()
            if kind not in _kinds(base):
                raise CLIError(f"{flag}={text!r}: unknown kind; known kinds: {_kinds(base)}")
            if not (isinstance(entries.get(label), dict) and entries[label].get("kind") == kind):
                entries[label] = {"kind": kind}  # a new kind starts from its defaults
            return
        if label not in entries:
            kinds = f" (kinds: {', '.join(_kinds(base))})" if base else ""
            raise CLIError(
                f"unknown flag {flag}: {here} has no entry {label!r} (entries: "
                f"{', '.join(entries) or 'none'}); add one with --{here}.{label}.kind=KIND{kinds}"
            )
        child_cls = _node_cls(value_hint, entries[label])
        if child_cls is None:
            entries[label] = parse_value(text or "", value_hint, flag)
            return
        _set(entries[label], child_cls, rest, text, flag, f"{here}.{label}")
        return
    child_cls = _node_cls(hint, node.get(name))
    base = _kind_base(hint)
    if rest == ["kind"] and base is not None:
        kind = (text or "").strip()
        if kind not in _kinds(base):
            raise CLIError(f"{flag}={text!r}: unknown kind; known kinds: {_kinds(base)}")
        if not (isinstance(node.get(name), dict) and node[name].get("kind") == kind):
            node[name] = {"kind": kind}
        return
    if not rest:
        if child_cls is not None:
            names = sorted(_fields(child_cls))
            raise CLIError(
                f"{flag}: {here} is a group of settings, not a value; set one of its fields "
                f"(--{here}.FIELD=VALUE): {', '.join(names)}"
            )
        if text is None:  # a bare flag: only booleans may omit the value
            if _strip_optional(hint) is not bool:
                raise CLIError(f"{flag} needs a value ({describe_type(hint)}): {flag}=VALUE")
            node[name] = True
            return
        node[name] = parse_value(text, hint, flag)
        return
    if child_cls is None:
        raise CLIError(
            f"unknown flag {flag}: {here} is a value of type {describe_type(hint)}, "
            "it has no fields"
        )
    _set(node[name], child_cls, rest, text, flag, here)


def apply_overrides(config: RunConfig, overrides: Mapping[str, str | None]) -> RunConfig:
    """`config` with dotted overrides (path without `--` -> text) applied, validated once.

    `kind` overrides are applied first, so `--model.attention.x.kind=gqa
    --model.attention.x.num_heads=8` works in any order.
    """
    tree = run_to_dict(config)
    ordered = sorted(overrides.items(), key=lambda kv: (kv[0].split(".")[-1] != "kind", 0))
    for path, text in ordered:
        flag = f"--{path}"
        parts = path.split(".")
        if any(not p for p in parts):
            raise CLIError(f"malformed flag {flag}: empty name between dots")
        try:
            _set(tree, RunConfig, parts, text, flag, "")
        except ConfigError as e:  # a registry lookup
            raise CLIError(f"{flag}={text!r}: {e}") from None
    try:
        return run_from_dict(tree)
    except (ConfigError, ValueError, TypeError, FileNotFoundError) as e:
        given = " ".join(f"--{k}" + ("" if v is None else f"={v}") for k, v in overrides.items())
        suffix = f" (with {given})" if given else ""
        raise CLIError(f"invalid configuration{suffix}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Help.


def _field_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the `Attributes:` section of a class docstring."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return docs
    indent = None
    current: list[str] = []
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        match = re.match(r"\s*([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_]\w*)*):\s*(.*)$", line)
        if indent is None and match:
            indent = depth
        if indent is not None and depth < indent:
            break
        if match and depth == indent:
            current = [n.strip() for n in match.group(1).split(",")]
            for name in current:
                docs[name] = match.group(2).strip()
        elif current:
            for name in current:
                docs[name] += " " + line.strip()
    return docs


def _format_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_format_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, str) and (value == "" or value != value.strip()):
        return repr(value)
    return str(value)


def _help_rows(node: dict, cls: type, where: str, rows: list[tuple[str, str, str]]) -> None:
    docs = _field_docs(cls)
    for name, hint in _fields(cls).items():
        here = f"{where}.{name}" if where else name
        value = node.get(name)
        if _is_mapping(hint):
            value_hint = typing.get_args(_strip_optional(hint))[1]
            base = _kind_base(value_hint)
            for label, entry in (value or {}).items():
                child = _node_cls(value_hint, entry)
                if base is not None:
                    rows.append((f"--{here}.{label}.kind={entry['kind']}", "kind", ""))
                _help_rows(entry, child, f"{here}.{label}", rows)
            if base is not None:
                rows.append(
                    (f"--{here}.LABEL.kind=KIND", "kind", f"add an entry; kinds: {_kinds(base)}")
                )
            continue
        child = _node_cls(hint, value)
        if child is not None:
            if _kind_base(hint) is not None:
                rows.append((f"--{here}.kind={value['kind']}", "kind", docs.get(name, "")))
            _help_rows(value, child, here, rows)
            continue
        rows.append((f"--{here}={_format_value(value)}", describe_type(hint), docs.get(name, "")))


def help_text(preset: str, config: RunConfig, prog: str = "python -m experiments.train") -> str:
    """The `--help` text: top-level flags, presets, then every field with its current value."""
    names = presets.preset_names()
    labels = {n: n + (" (default)" if n == presets.DEFAULT_PRESET else "") for n in names}
    label_width = max(len(label) for label in labels.values()) + 2
    preset_lines = [f"  {labels[n]:<{label_width}}{presets.preset_description(n)}" for n in names]
    rows: list[tuple[str, str, str]] = []
    _help_rows(run_to_dict(config), RunConfig, "", rows)
    width = min(max(len(r[0]) for r in rows), 52)
    type_width = min(max(len(r[1]) for r in rows), 16)
    field_lines = []
    section = None
    for flag, type_name, doc in rows:
        top = flag[2:].split(".")[0]
        if top != section:
            section = top
            field_lines.append(f"\n {section}:")
        pad = " " * max(width - len(flag), 0)
        field_lines.append(f"  {flag}{pad}  {type_name:<{type_width}}  {doc}".rstrip())
    return "\n".join(
        [
            f"usage: {prog} [--preset NAME] [--workdir DIR] [--distributed] "
            "[--SECTION.FIELD=VALUE ...]",
            "",
            "Trains a decoder language model, evaluates bits per byte on held-out data, saves",
            "checkpoints, a loss curve and a text sample. Re-running with the same --workdir",
            "resumes from the newest checkpoint.",
            "",
            "flags:",
            f"  --preset NAME         a preset (default {presets.DEFAULT_PRESET!r}):",
            *["    " + line for line in preset_lines],
            "  --workdir DIR         run directory: checkpoints/, config.json, metrics.jsonl,",
            "                        loss.png, sample.txt (default runs/<preset>)",
            "  --distributed         call jax.distributed.initialize() first (multi-host pods;",
            "                        every host runs the same command)",
            "  -h, --help            this text",
            "",
            f"config fields, with the values of preset {preset!r} and these flags",
            "(set any with --FIELD=VALUE; tuples are comma-separated; 'none' for optional):",
            *field_lines,
        ]
    )


# ---------------------------------------------------------------------------------------------
# The command line.


def _split_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """[(flag, value or None)] from `--a=b`, `--a b` and bare `--a` forms."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            out.append(("--help", None))
            i += 1
            continue
        if not token.startswith("--") or token == "--":
            raise CLIError(
                f"unexpected argument {token!r}: every argument is a flag such as "
                "--workdir DIR or --model.num_layers=4 (see --help)"
            )
        if "=" in token:
            name, value = token.split("=", 1)
            out.append((name, value))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append((token, argv[i + 1]))
            i += 2
        else:
            out.append((token, None))
            i += 1
    return out


def parse_args(argv: list[str] | None = None, *, prog: str = "python -m experiments.train"):
    """Parses the main job's command line (see the module docstring).

    Returns:
      `Args`; with `--help`, `Args.help` is True and `Args.help_text` holds the text.

    Raises:
      CLIError: unknown flags, bad values or an invalid resulting config.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    preset, workdir, distributed, want_help = presets.DEFAULT_PRESET, None, False, False
    overrides: dict[str, str | None] = {}
    for name, value in _split_argv(argv):
        if name == "--help":
            want_help = True
        elif name == "--distributed":
            if value is not None and value.lower() not in _TRUE + _FALSE:
                raise CLIError(f"--distributed={value!r}: expected no value or true/false")
            distributed = value is None or value.lower() in _TRUE
        elif name in ("--preset", "--workdir"):
            if value is None or value == "":
                raise CLIError(f"{name} needs a value, e.g. {name}=small")
            if name == "--preset":
                preset = value
            else:
                workdir = value
        elif "." in name:
            overrides[name[2:]] = value  # None: a bare boolean flag
        else:
            close = difflib.get_close_matches(name, TOP_LEVEL_FLAGS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise CLIError(
                f"unknown flag {name}{hint} Flags are {', '.join(TOP_LEVEL_FLAGS)} and "
                "config fields such as --model.num_layers=4 (see --help)"
            )
    try:
        base = presets.get_preset(preset)
    except ConfigError as e:
        raise CLIError(f"--preset={preset!r}: {e}") from None
    config = apply_overrides(base, overrides)
    workdir = workdir or f"runs/{preset}"
    text = help_text(preset, config, prog) if want_help else ""
    return Args(preset, workdir, distributed, config, overrides, want_help, text)
