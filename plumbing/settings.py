"""Settings declared once: a frozen dataclass field's default, help and env name make its CLI flag.

A field made with `setting(default, "help")` becomes `--field-name` (or `flag=`), filled from the command
line first, then `RRP_<ENV>` (the field name upper-cased unless `env=` says otherwise), then the default.
A field whose type is itself a dataclass is flattened into the same parser, its defaults taken from the
parent's default instance, so a service can say "my port is 50051" once, in its own config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING: Any = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    help: str = "",
    *,
    env: str | None = None,
    flag: str | None = None,
    choices: tuple[Any, ...] | None = None,
    metavar: str | None = None,
    cli: bool = True,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that also describes its flag; `cli=False` keeps it out of the command line."""
    meta = {"help": help, "env": env, "flag": flag, "choices": choices, "metavar": metavar, "cli": cli}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(factory: Callable[[], Any], *, prefix: str = "", cli: bool = True) -> Any:
    """A sub-config flattened into the parent's flags, optionally under `--prefix-...`."""
    return dataclasses.field(default_factory=factory, metadata={"nested_prefix": prefix, "cli": cli})


def env_value(name: str) -> str | None:
    """`RRP_<NAME>` if set and not empty; read when flags are parsed, never at import."""
    raw = os.environ.get(f"RRP_{name.upper()}")
    return raw if raw else None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _parser_of(tp: Any) -> Callable[[str], Any]:
    """How one string becomes a value of the field's type: tuples are comma-separated."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        item = _parser_of(args[0]) if args else str

        def parse_tuple(text: str) -> tuple[Any, ...]:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())

        return parse_tuple
    if tp is Path:
        return Path
    if tp in (int, float, str):
        return typing.cast(Callable[[str], Any], tp)
    if typing.get_origin(tp) is typing.Literal:
        return str
    raise TypeError(f"no flag parser for type {tp!r}")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    if value is None:
        return "none"
    return str(value)


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}".replace("-", "_")


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    *,
    defaults: Any = None,
    prefix: str = "",
    skip: tuple[str, ...] = (),
) -> None:
    """Adds one flag per field of `cls` (recursing into nested configs); `defaults` is an instance to show."""
    hints = typing.get_type_hints(cls)
    instance = defaults
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        if _is_config(tp):
            sub_default = getattr(instance, f.name) if instance is not None else _field_default(f)
            sub_prefix = prefix + f.metadata.get("nested_prefix", "")
            add_flags(parser, tp, defaults=sub_default, prefix=sub_prefix)
            continue
        flag = f.metadata.get("flag") or (prefix + f.name).replace("_", "-")
        env_name = f.metadata.get("env") or (prefix + f.name).replace("-", "_")
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        required = default is _MISSING
        help_text = f.metadata.get("help", "")
        env_raw = env_value(env_name)
        kwargs: dict[str, Any] = {"dest": _dest(prefix, f.name)}
        if tp is bool:
            env_default = _parse_bool(env_raw) if env_raw is not None else default
            kwargs.update(action=argparse.BooleanOptionalAction, default=env_default)
            shown = "on" if default else "off"
        else:
            convert = _parser_of(tp)
            kwargs["type"] = convert
            if env_raw is not None:
                try:
                    kwargs["default"] = convert(env_raw)
                except ValueError as exc:
                    raise SystemExit(f"RRP_{env_name.upper()}={env_raw!r} is not valid: {exc}") from exc
                required = False
            elif not required:
                kwargs["default"] = default
            kwargs["required"] = required
            choices = f.metadata.get("choices")
            if typing.get_origin(tp) is typing.Literal:
                choices = typing.get_args(tp)
            if choices:
                kwargs["choices"] = choices
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
            shown = "required" if required else _shown(default)
            if optional and not required and default is None:
                shown = "none"
        kwargs["help"] = f"{help_text} (RRP_{env_name.upper()}; default {shown})"
        parser.add_argument(f"--{flag}", **kwargs)


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()  # type: ignore[operator]
    return _MISSING


def from_args(cls: type[T], args: argparse.Namespace, *, prefix: str = "", defaults: Any = None, **overrides: Any) -> T:
    """Builds `cls` from parsed flags; fields without a flag keep the default instance's value."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        base = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        if _is_config(tp) and f.metadata.get("cli", True):
            values[f.name] = from_args(tp, args, prefix=prefix + f.metadata.get("nested_prefix", ""), defaults=base)
            continue
        dest = _dest(prefix, f.name)
        if f.metadata.get("cli", True) and hasattr(args, dest):
            values[f.name] = getattr(args, dest)
        elif base is not _MISSING:
            values[f.name] = base
    return cls(**values)


def replace_nested(config: T, changes: Mapping[str, Any]) -> T:
    """`dataclasses.replace` for dotted paths: {"server.port": 0}."""
    direct: dict[str, Any] = {}
    deeper: dict[str, dict[str, Any]] = {}
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if rest:
            deeper.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in deeper.items():
        direct[head] = replace_nested(getattr(config, head), sub)
    return dataclasses.replace(config, **direct)  # type: ignore[type-var]
