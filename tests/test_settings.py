"""Settings declared once: dataclass fields make the flags, env names and defaults of every command."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from plumbing.settings import add_flags, from_args, nested, setting
from rrp.cli import build_parser, main
from rrp.command import command_path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ["game-server"], ["scheduler"], ["collector"], ["play"], ["evolve"], ["collect"], ["run"],
    ["data", "validate"], ["data", "export"], ["train"], ["evaluate"], ["dagger"], ["package"], ["serve"],
    ["autopilot"], ["deploy"], ["models"], ["monitor"], ["lap", "record"], ["lap", "verify"], ["lap", "submit"],
    ["leaderboard"], ["watch"],
]  # fmt: skip


@dataclass(frozen=True)
class Inner:
    port: int = setting(0, "port")
    timeout_s: float = setting(2.0, "seconds")
    seed: int = setting(0, "seed")


@dataclass(frozen=True)
class Outer:
    inner: Inner = nested(lambda: Inner(port=50051))
    names: tuple[str, ...] = setting(("a", "b"), "names")
    fast: bool = setting(True, "go fast")
    seed: int = setting(0, "seed")
    secret: str | None = setting(None, "never a flag", cli=False, env="test_secret")


def parse(argv: list[str]) -> Outer:
    parser = argparse.ArgumentParser()
    add_flags(parser, Outer)
    return from_args(Outer, parser.parse_args(argv))


def test_defaults_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse([]) == Outer()  # the nested default instance's port, 50051, not the class's 0
    assert parse([]).inner.port == 50051
    got = parse(["--port", "7", "--timeout", "0.5", "--names", "x,y,z", "--no-fast", "--seed", "3"])
    assert got == Outer(inner=Inner(port=7, timeout_s=0.5, seed=3), names=("x", "y", "z"), fast=False, seed=3)
    monkeypatch.setenv("RRP_PORT", "9")
    monkeypatch.setenv("RRP_FAST", "false")
    monkeypatch.setenv("RRP_TEST_SECRET", "s3cret")
    got = parse([])
    assert (got.inner.port, got.fast, got.secret) == (9, False, "s3cret")
    assert parse(["--port", "10"]).inner.port == 10  # a flag beats the environment


def test_a_secret_is_never_a_flag() -> None:
    with pytest.raises(SystemExit):
        parse(["--secret", "x"])


@dataclass(frozen=True)
class SeededOne:
    seed: int = setting(1, "seed")


@dataclass(frozen=True)
class SeededTwo:
    one: SeededOne = nested(SeededOne)
    seed: int = setting(2, "seed")


def test_nested_configs_that_disagree_on_a_shared_default_fail_loudly() -> None:
    with pytest.raises(TypeError, match="disagree"):
        add_flags(argparse.ArgumentParser(), SeededTwo)


@dataclass(frozen=True)
class WithFile:
    record: Path = setting(help="a record file", positional=True)
    game: str = setting("", "address")


@dataclass(frozen=True)
class PositionalWithDefault:
    record: Path = setting(Path("x"), "a record file", positional=True)


def test_a_positional_setting_is_an_argument_without_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, WithFile)
    assert from_args(WithFile, parser.parse_args(["lap.json", "--game", "a:1"])) == WithFile(Path("lap.json"), "a:1")
    with pytest.raises(SystemExit):
        parser.parse_args(["--game", "a:1"])  # the argument is required
    with pytest.raises(TypeError, match="required"):
        add_flags(argparse.ArgumentParser(), PositionalWithDefault)


def test_bad_env_value_is_a_clear_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRP_PORT", "many")
    with pytest.raises(SystemExit, match="RRP_PORT"):
        parse([])


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_flag_has_help_an_env_name_and_its_default(path: list[str]) -> None:
    parser = build_parser([*path, "--help"])
    sub: argparse.ArgumentParser = parser
    for word in path:
        action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        sub = action.choices[word]
    # Switches (--realtime | --lockstep) are shorthands for a flag that has all of this.
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help" and a.const is None]
    assert flags, path
    for action in flags:
        assert action.help and re.search(r"\(RRP_[A-Z0-9_]+; default ", action.help), (path, action.dest)


def test_no_flag_is_declared_by_hand() -> None:
    """Flags come from config fields alone: add_argument is called by the settings helper, for the one
    global flag (--log-level) and by `make protos`' own tools, and nowhere else; so no default is written twice."""
    callers = subprocess.run(
        ["grep", "-rln", "add_argument(", "rrp", "pipeline", "plumbing", "game_server", "scheduler", "collector",
         "trainer", "serving"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert sorted(callers) == ["plumbing/protogen.py", "plumbing/settings.py", "rrp/cli.py", "serving/protogen.py"]
    assert (ROOT / "rrp/cli.py").read_text().count("add_argument(") == 1


def test_only_the_selected_command_imports_its_component() -> None:
    code = (
        "import sys; from rrp.cli import build_parser; build_parser(['--help']);"
        "heavy = [m for m in ('torch', 'grpc', 'redis', 'ursina', 'numpy') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_command_path() -> None:
    assert command_path(["--log-level", "DEBUG", "data", "validate", "--redis", "x"]) == ("data", "validate")
    assert command_path(["train", "--epochs", "1"]) == ("train",)
    assert command_path(["--help"]) == ()


def test_a_bad_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["scheduler", "--servers", "a:1", "--discover", "b"])
    assert exit_info.value.code == 2
    assert "give either servers or a DNS name" in capsys.readouterr().err
