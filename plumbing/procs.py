"""Starting and stopping service processes: used by the main job, benchmarks and tests alike."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

_LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class ServiceProcess:
    """A child process running one `rrp` service, with the address it bound."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    lines: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def rrp_command() -> list[str]:
    return [sys.executable, "-m", "rrp.cli"]


def start_service(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    cwd: Path | None = None,
) -> ServiceProcess:
    """Runs `rrp <args>` and waits until it prints its address and reports SERVING."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        [*rrp_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    match = None
    while match is None:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise RuntimeError(f"rrp {' '.join(args)} exited with {proc.returncode}:\n{''.join(lines[-30:])}")
        lines.append(line)
        match = _LISTENING.search(line)
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"rrp {' '.join(args)} did not start in {timeout_s}s")
    service = ServiceProcess(proc, match.group(1), int(match.group(2)), lines)

    def drain() -> None:  # keep reading so the child never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            service.lines.append(line)
            if len(service.lines) > 2000:
                del service.lines[:1000]

    threading.Thread(target=drain, daemon=True).start()
    wait_serving(service.address, timeout_s=max(1.0, deadline - time.monotonic()))
    return service


def wait_serving(address: str, service: str = "", timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout_s}s")
            time.sleep(0.05)


def stop_on_signals(what: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT (logged as stopping `what`): the one way a command waits to stop.

    Call it from the main thread, which is the only one that may set signal handlers, and wait on the event with a
    timeout: the handler runs only when the main thread runs Python code."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping %s", signum, what)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop
