"""Settings declared once: a frozen dataclass field's default, help and env name make its CLI flag.

A field made with `setting(default, "help")` becomes `--field-name` (or `flag=`), filled from the command
line first, then `RRP_<ENV>` (the field name upper-cased unless `env=` says otherwise), then the default.
A unit suffix `_s` is left out of both names (`idle_timeout_s` is `--idle-timeout`, `RRP_IDLE_TIMEOUT`).
A field whose type is itself a dataclass is flattened into the same parser, its defaults taken from the
parent's default instance, so a service can say "my port is 50051" once, in its own config. Fields of the
same name in several nested configs share one flag (one `--seed` seeds data, model and training alike);
they must then agree on their default. A field with `cli=False` and an `env=` (a secret) is read from the
environment only, never from a flag.
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
    repeat: bool = False,
    switches: bool = False,
    positional: bool = False,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that also describes its flag; `cli=False` keeps it out of the command line, and
    `repeat=True` makes a tuple field a repeatable flag (`--x a --x b`) instead of a comma-separated one, and
    `switches=True` gives each choice of a Literal field a flag of its own (`--realtime | --lockstep`), and
    `positional=True` makes a required field an argument without a flag (`rrp lap verify FILE`)."""
    meta = {"help": help, "env": env, "flag": flag, "choices": choices, "metavar": metavar, "cli": cli}
    meta["repeat"] = repeat
    meta["switches"] = switches
    meta["positional"] = positional
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(factory: Callable[[], Any] | None = None, *, prefix: str = "", cli: bool = True) -> Any:
    """A sub-config flattened into the parent's flags, optionally under `--prefix-...`; without a factory
    the sub-config is required (it has required settings of its own)."""
    meta = {"nested_prefix": prefix, "cli": cli}
    if factory is None:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default_factory=factory, metadata=meta)


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


def _dest(prefix: str, f: dataclasses.Field[Any]) -> str:
    """The parsed-args attribute of a field: its flag's name, so that one flag is one setting."""
    flag = f.metadata.get("flag")
    return flag.replace("-", "_") if flag else f"{prefix}{f.name}".replace("-", "_")


def _base_name(prefix: str, name: str) -> str:
    """The flag and env stem of a field: its prefixed name without a trailing unit `_s`."""
    full = prefix + name
    return full[:-2] if full.endswith("_s") else full


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
            sub_default = None if sub_default is _MISSING else sub_default  # a required sub-config
            sub_prefix = prefix + f.metadata.get("nested_prefix", "")
            add_flags(parser, tp, defaults=sub_default, prefix=sub_prefix)
            continue
        flag = f.metadata.get("flag") or _base_name(prefix, f.name).replace("_", "-")
        env_name = f.metadata.get("env") or flag.replace("-", "_")
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        dest = _dest(prefix, f)
        shared = next((a for a in parser._actions if a.dest == dest), None)
        if shared is not None:  # the same setting in two nested configs: one flag sets both
            if shared.default != default and not (env_value(env_name) is not None):
                raise TypeError(f"--{flag}: nested configs disagree on its default ({shared.default!r}, {default!r})")
            continue
        required = default is _MISSING
        help_text = f.metadata.get("help", "")
        env_raw = env_value(env_name)
        kwargs: dict[str, Any] = {"dest": dest}
        if f.metadata.get("repeat"):
            item = _parser_of(typing.get_args(tp)[0])
            kwargs.update(action="append", type=item, default=None)
            if f.metadata.get("metavar"):
                kwargs["metavar"] = f.metadata["metavar"]
            shown = " ".join(str(v) for v in default) or "none"
        elif tp is bool:
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
            kwargs["metavar"] = f.metadata.get("metavar") or flag.upper().replace("-", "_")
            shown = "required" if required else _shown(default)
            if optional and not required and default is None:
                shown = "none"
        kwargs["help"] = f"{help_text} (RRP_{env_name.upper()}; default {shown})"
        if f.metadata.get("positional"):
            if default is not _MISSING:
                raise TypeError(f"{f.name}: a positional setting is required (it has no default)")
            del kwargs["dest"], kwargs["required"]
            kwargs["help"] = help_text
            parser.add_argument(dest, **kwargs)
        elif f.metadata.get("switches"):
            group = parser.add_mutually_exclusive_group()
            group.add_argument(f"--{flag}", **kwargs)
            for choice in kwargs["choices"]:
                group.add_argument(
                    f"--{choice}", dest=dest, action="store_const", const=choice, help=f"--{flag} {choice}"
                )
        else:
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
            sub_prefix = prefix + f.metadata.get("nested_prefix", "")
            values[f.name] = from_args(tp, args, prefix=sub_prefix, defaults=None if base is _MISSING else base)
            continue
        dest = _dest(prefix, f)
        secret_env = f.metadata.get("env") if not f.metadata.get("cli", True) else None
        if f.metadata.get("cli", True) and hasattr(args, dest):
            value = getattr(args, dest)
            if f.metadata.get("repeat"):
                value = tuple(value) if value is not None else base
            values[f.name] = value
        elif secret_env and env_value(secret_env) is not None:
            values[f.name] = env_value(secret_env)
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
