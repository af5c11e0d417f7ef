"""How a command is declared: its config dataclass makes its flags, and `run` gets the built config.

Only the command being run imports its config (and so its component): `rrp --help` and every other
command's `--help` stay fast however heavy the components are.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from plumbing.settings import add_flags, from_args

Loader = Callable[[], tuple[type[Any], Callable[[Any], int]]]


@dataclass
class Commands:
    """The `rrp` subcommands being declared, and the command path the command line selected."""

    sub: argparse._SubParsersAction[argparse.ArgumentParser]
    path: tuple[str, ...]  # e.g. ("data", "validate"); empty for `rrp --help`

    def add(
        self,
        name: str,
        load: Loader,
        *,
        help: str,
        description: str | None = None,
        defaults: Callable[[], Any] | None = None,
    ) -> argparse.ArgumentParser:
        """A subcommand whose flags come from the config class `load` returns, with the function to run."""
        parser = self.sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".")
        if self.path[:1] != (name,):
            return parser  # never parsed in this process: no flags, no imports
        config, run = load()
        default = defaults() if defaults is not None else None
        add_flags(parser, config, defaults=default)

        def call(args: argparse.Namespace) -> int:
            try:
                built = from_args(config, args, defaults=default)
            except (ValueError, TypeError) as exc:
                parser.error(str(exc))
            return run(built)

        parser.set_defaults(run=call)
        return parser

    def group(self, name: str, help: str) -> Commands:
        """A command with subcommands of its own (`rrp data validate`)."""
        parser = self.sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
        inner = parser.add_subparsers(dest="subcommand", required=True)
        return Commands(inner, self.path[1:] if self.path[:1] == (name,) else ())


def command_path(argv: list[str]) -> tuple[str, ...]:
    """The command words of a command line: the first word that is not a global flag, and the one after it."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            following = next(words, "")
            return (word, following) if following and not following.startswith("-") else (word,)
    return ()
