"""A private redis-server process (AOF, fsync always) for the CLI, the main job, tests and benchmarks."""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel picks it; a race with other processes is unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _dying_with_parent(cmd: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """The command (and a pre-exec hook) that make the server die with its parent: a collector killed with SIGKILL
    must not leave its Redis behind. `setpriv --pdeathsig` sets it with no Python in the forked child, where a hook
    can deadlock or abort on a lock another thread (gRPC's) held at the fork; the hook is the fallback, its libc
    function looked up before the fork."""
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", *cmd], None
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return cmd, hook


class LocalRedis:
    """One redis-server bound to 127.0.0.1, its data (append-only file) in `data_dir`.

    The port is chosen once (port=0: a free one) and kept, so `stop()` then `start()` restarts the same
    server on the same data, as a crash-and-recover would. The password, if any, goes into a 0600 config
    file, never onto the command line where `ps` would show it.

    With `tls_cert_file` and `tls_key_file` it listens for TLS only (`--port 0 --tls-port PORT`, clients not
    asked for certificates) and `url` is `rediss://`; `tls_ca_file` is the CA that signed the server's
    certificate, used by `client()` to verify it.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        password: str | None = None,
        executable: str = "redis-server",
        appendfsync: str = "always",
        die_with_parent: bool = False,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        tls_ca_file: Path | None = None,
    ) -> None:
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.password = password
        self.executable = executable
        self.appendfsync = appendfsync  # "always": an acknowledged frame survives a power cut, not only a crash
        self.die_with_parent = die_with_parent
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
        self.tls_ca_file = tls_ca_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def client(self, **kwargs: object) -> redis.Redis:
        if self.tls:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls_ca_file) if self.tls_ca_file else None, **kwargs}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)  # type: ignore[arg-type]

    def _command(self) -> list[str]:
        exe = shutil.which(self.executable)
        if exe is None:
            raise FileNotFoundError(f"{self.executable} not found: install it (apt-get install redis-server)")
        cmd = [exe]
        if self.password is not None:
            conf = self.data_dir / "secret.conf"
            conf.touch(mode=0o600)
            conf.chmod(0o600)
            conf.write_text(f'requirepass "{self.password}"\n')
            cmd.append(str(conf))
        if self.tls:
            cmd += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls_cert_file),
                "--tls-key-file", str(self.tls_key_file),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
            if self.tls_ca_file is not None:
                cmd += ["--tls-ca-cert-file", str(self.tls_ca_file)]
        else:
            cmd += ["--port", str(self.port)]
        cmd += [
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        return cmd

    def start(self, timeout_s: float = 15.0) -> LocalRedis:
        """Starts the server and returns once it answers PING (it may first replay its append-only file)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd, hook = _dying_with_parent(self._command()) if self.die_with_parent else (self._command(), None)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=hook
        )
        deadline = time.monotonic() + timeout_s
        # The probe only asks "listening yet?": over TLS it does not verify the certificate (client() does).
        tls_probe = {"ssl_cert_reqs": "none"} if self.tls else {}
        probe = self.client(socket_connect_timeout=1.0, socket_timeout=1.0, **tls_probe)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self._log_tail()}")
                try:
                    if probe.ping():
                        break
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet, or still loading its data
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout_s}s")
                time.sleep(0.02)
        finally:
            probe.close()
        log.info("local Redis at %s (data in %s)", self.url, self.data_dir)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM: Redis flushes its append-only file and exits; SIGKILL if it does not in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
