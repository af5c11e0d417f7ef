"""The `rrp` command: one entry point, one module per command group; it parses, sets up logging and delegates."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import logging
import signal
import sys
from types import ModuleType

from plumbing.settings import env_value
from rrp import data, evolve, laps, monitor, play, run, services, serving, vision
from rrp.command import Commands, command_path


def _groups() -> tuple[ModuleType, ...]:
    return (services, play, evolve, run, data, vision, serving, laps, monitor)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command that `argv` selects gets its flags (and imports its component)."""
    parser = argparse.ArgumentParser(prog="rrp", description="RallyRoboPilot: race, evolve, collect, train, serve.")
    parser.add_argument(
        "--log-level", default=env_value("log_level") or "INFO", help="logging level (RRP_LOG_LEVEL; default INFO)"
    )
    commands = Commands(parser.add_subparsers(dest="command", required=True), command_path(argv or []))
    for group in _groups():
        group.register(commands)
    return parser


def _user_error(exc: BaseException) -> str | None:
    """The message of an error the user can act on (bad input, a missing file, a server that is down);
    None for anything else, which is a bug and keeps its traceback."""
    import grpc

    from plumbing.errors import DomainError
    from scheduler.tasks import EvaluationError

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, (ValueError, OSError, DomainError, EvaluationError)):
        return str(exc) or type(exc).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    _setup_logging(args.log_level)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a hung service waits. Not
    # where stderr is no file (a caller capturing it in memory).
    with contextlib.suppress(io.UnsupportedOperation, ValueError, AttributeError):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    try:
        result: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if message is None or logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        command = " ".join(a for a in (args.command, getattr(args, "subcommand", None)) if a)
        print(f"rrp {command}: error: {message} (--log-level DEBUG shows where)", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    raise SystemExit(main())
