"""Hosts on one machine for tests: network namespaces on a private bridge, each with its own address.

The bridge lives in a namespace of its own (the "switch"), so the test never adds an interface, address or route to
the machine's own namespace: traffic flows only between the namespaces made here and on their loopbacks. Names
resolve through `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over `/etc/hosts`; one name listed with
several addresses resolves to all of them, as a Kubernetes headless Service does.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NETNS_ETC = Path("/etc/netns")


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class Host:
    name: str  # short name, e.g. "gs1"
    netns: str
    address: str
    port_if: str  # its cable's end on the switch


@dataclass
class Proc:
    """A process in a namespace; its output is kept (bounded) for diagnostics."""

    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    seen: queue.Queue[str] = field(default_factory=queue.Queue)
    reader: threading.Thread | None = None

    def start_reader(self) -> None:
        def read() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                self.lines.append(line)
                del self.lines[:-500]
                self.seen.put(line)

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def finish(self, timeout_s: float) -> int:
        """The exit code, once the process has exited and its reader has taken all of its output."""
        code = self.popen.wait(timeout_s)
        if self.reader is not None:
            self.reader.join(timeout_s)
        return code

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.popen.poll() is not None:
                raise TimeoutError(f"no {pattern!r} (exit {self.popen.poll()}):\n{''.join(self.lines[-40:])}")
            try:
                line = self.seen.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            match = rx.search(line)
            if match:
                return match

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


class Agent:
    """A netns_agent.py in one namespace: `call` sends a command and returns its reply."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self._buffer = ""
        self._read(timeout_s=60.0)  # the "ready" event

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while "\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"agent gave no answer in {timeout_s}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20).decode()
                if not chunk:
                    raise RuntimeError(f"agent exited with {self.popen.wait()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split("\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def call(
        self,
        op: str,
        *,
        timeout_s: float = 120.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.popen.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._read(max(0.1, deadline - time.monotonic()))
            if message["event"] == "reply":
                return message
            if on_event is not None:
                on_event(message)

    def close(self) -> None:
        if self.popen.poll() is None:
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.write('{"op": "quit"}\n')
                self.popen.stdin.flush()
                self.popen.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait(5)


class NetLab:
    """A switch (a bridge in its own namespace) and hosts plugged into it, all removed by `close`."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.subnet = f"10.213.{secrets.randbelow(200) + 20}"
        self.switch = f"rrp{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self.procs: list[Proc] = []
        self.agents: list[Agent] = []
        self.names: dict[str, list[str]] = {}  # name -> addresses, written to every host's hosts file
        self._netns: list[str] = []
        ip("netns", "add", self.switch)
        self._netns.append(self.switch)
        ip("-n", self.switch, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str, last_octet: int) -> Host:
        netns = f"rrp{self.tag}-{name}"
        port_if = f"p-{name}"[:15]
        ip("netns", "add", netns)
        self._netns.append(netns)
        ip("-n", self.switch, "link", "add", port_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("-n", self.switch, "link", "set", port_if, "master", "br0", "up")
        address = f"{self.subnet}.{last_octet}"
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        host = Host(name, netns, address, port_if)
        self.hosts[name] = host
        etc = NETNS_ETC / netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("# no DNS server: names come from hosts\noptions timeout:1 attempts:1\n")
        self._write_hosts(host)
        return host

    def _write_hosts(self, host: Host) -> None:
        lines = ["127.0.0.1 localhost", f"{host.address} {host.name}"]
        lines += [f"{h.address} {h.name}" for h in self.hosts.values() if h is not host]
        lines += [f"{a} {name}" for name, addresses in self.names.items() for a in addresses]
        # Written in place (same inode): a process that already runs sees the new contents through its bind mount.
        with open(NETNS_ETC / host.netns / "hosts", "r+" if (NETNS_ETC / host.netns / "hosts").exists() else "w") as f:
            f.seek(0)
            f.truncate()
            f.write("\n".join(lines) + "\n")

    def set_name(self, name: str, hosts: Iterable[Host]) -> None:
        """One name for several hosts' addresses, on every host (a headless Service's A records)."""
        self.names[name] = [h.address for h in hosts]
        for host in self.hosts.values():
            self._write_hosts(host)

    def link(self, host: Host, up: bool) -> None:
        """Plugs the host's cable in or out at the switch."""
        ip("-n", self.switch, "link", "set", host.port_if, "up" if up else "down")

    def run(self, host: Host, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            start_new_session=True,
        )
        proc = Proc(popen)
        proc.start_reader()
        self.procs.append(proc)
        return proc

    def rrp(self, host: Host, *args: str, timeout_s: float = 60.0) -> tuple[Proc, int]:
        """Starts `rrp ARGS` on the host; returns it and its port once it logs "listening on"."""
        proc = self.run(host, [sys.executable, "-m", "rrp.cli", *args])
        match = proc.wait_for(r"listening on \S+:(\d+)", timeout_s)
        return proc, int(match.group(1))

    def agent(self, host: Host) -> Agent:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, str(ROOT / "tests" / "netns_agent.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
        agent = Agent(popen)
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.close()
        for proc in reversed(self.procs):
            proc.stop()
        for netns in reversed(self._netns):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)
            shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
