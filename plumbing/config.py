"""Reading settings: flags first, then `RRP_*` environment variables, then the built-in default."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def env(name: str, default: T, cast: Callable[[str], T]) -> T:
    """The value of `RRP_<NAME>` cast to the default's type, or the default; read in main(), never at import."""
    raw = os.environ.get(f"RRP_{name.upper()}")
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError as exc:
        raise SystemExit(f"RRP_{name.upper()}={raw!r} is not valid: {exc}") from exc
