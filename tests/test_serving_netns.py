"""Model server replicas across network-namespace hosts: the load shared round robin, one killed, one joining.

Three TorchServe hosts (two behind the name `models` at first), two game hosts and an autopilot host, each a
network namespace on a private bridge (tests/netlab.py); the name resolves through the hosts' hosts files, as a
headless Service's name does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from serving.archive import ArchiveConfig, build_archive

from .netlab import Host, NetLab, Proc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed (scripts/setup.sh installs it)"),
]

MODEL = Path(__file__).parent / "data" / "main-job-model"  # finishes a kidney lap
TS_PORT, GAME_PORT = 7070, 50051
RRP = [sys.executable, "-m", "rrp.cli"]


def _kill_host(host: Host) -> None:
    """SIGKILL to every process of the host (the serve command, TorchServe's JVM and its worker)."""
    pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=10).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _race(lab: NetLab, pilot: Host, games: list[Host], out: Path, *args: str) -> Proc:
    return lab.run(
        pilot,
        [*RRP, "autopilot", "--game", ",".join(f"{g.address}:{GAME_PORT}" for g in games),
         "--model-server", f"models:{TS_PORT}", "--cars", "2", "--track", "kidney",
         "--realtime", "--out", str(out), *args],
    )  # fmt: skip


def _report(proc: Proc, out: Path, timeout_s: float) -> dict[str, Any]:
    code = proc.popen.wait(timeout_s)
    assert code == 0, "".join(proc.lines[-30:])
    report: dict[str, Any] = json.loads((out / "autopilot.json").read_text())
    return report


def test_replicas_share_the_load_and_a_replica_killed_or_joining_costs_no_tick(tmp_path: Path) -> None:
    archive = build_archive(MODEL, "1", tmp_path / "store", ArchiveConfig())
    lab = NetLab()
    try:
        models = [lab.add_host(f"ts{i}", 20 + i) for i in (1, 2, 3)]
        games = [lab.add_host(f"gs{i}", 10 + i) for i in (1, 2)]
        pilot = lab.add_host("pilot", 2)
        lab.set_name("models", models[:2])
        serves = [
            lab.run(host, [*RRP, "serve", "--archive", str(archive), "--ts-host", "0.0.0.0", "--grpc-port",
                           str(TS_PORT), "--no-token-auth", "--workdir", str(tmp_path / host.name)])
            for host in models
        ]  # fmt: skip  # the JVMs start in parallel: each takes seconds
        for host in games:
            lab.run(host, [*RRP, "game-server", "--host", "0.0.0.0", "--port", str(GAME_PORT)])
        for proc in serves:
            proc.wait_for(r"torchserve listening on", timeout_s=150)
        first, second, third = (f"{h.address}:{TS_PORT}" for h in models)

        # The load, shared: two cars for 5 s, every request to one replica or the other, in turn.
        spread = _report(_race(lab, pilot, games, tmp_path / "spread", "--max-ticks", "125"), tmp_path / "spread", 60)
        counts = {target: row["requests"] for target, row in spread["replicas"].items()}
        assert set(counts) == {first, second}, counts
        assert abs(counts[first] - counts[second]) <= 0.2 * max(counts.values()), counts

        # A lap each, while a third replica joins the name and the first is killed.
        race = _race(lab, pilot, games, tmp_path / "lap", "--max-ticks", "1000")
        race.wait_for(r"racing 2 car", timeout_s=60)
        joined = time.time()
        lab.set_name("models", models)
        race.wait_for(rf"model server replicas now .*{third}", timeout_s=5)
        _kill_host(models[0])
        killed = time.time()
        report = _report(race, tmp_path / "lap", 90)
    finally:
        lab.close()
    laps = report["laps"]
    print(f"\nreplicas spread {counts}; lap race: {report['replicas']}, laps "
          f"{[(lap['lap_ticks'], lap['fallbacks'], lap['missed_ticks']) for lap in laps]}")  # fmt: skip
    log_tail = "".join(race.lines[-40:])  # the autopilot's warnings: failovers, stuck calls, safe mode
    assert [lap["finished"] for lap in laps] == [True, True], (laps, log_tail)
    assert sum(lap["missed_ticks"] for lap in laps) == 0, (laps, log_tail)
    replicas = report["replicas"]
    assert replicas[third]["first_answer"] - joined < 5.0, replicas
    assert replicas[third]["requests"] > 50 and replicas[second]["requests"] > 50, replicas
    assert replicas[first]["first_answer"] < killed, replicas
