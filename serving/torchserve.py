"""A real TorchServe (a Java process) on loopback: generated config, private key file, register, stop cleanly."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from plumbing.errors import (
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    quote,
)
from plumbing.settings import setting
from serving.torchserve_v1 import management_pb2, management_pb2_grpc

log = logging.getLogger(__name__)

KEY_FILE = "key_file.json"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


LOG_LEVELS = ("off", "error", "warn", "info", "debug")
# TorchServe's loggers and their files (log4j2.xml in its frontend jar); each writes once, to its own file.
OWN_LOGGERS = (
    ("MODEL_LOG", "model_log"),
    ("MODEL_METRICS", "model_metrics"),
    ("TS_METRICS", "ts_metrics"),
    ("org.pytorch.serve", "ts_log"),
)


def log4j2_xml(level: str) -> str:
    """TorchServe's log configuration: its files as its own default has them, at `level`, and nothing twice.

    Its default logs every request at info and debug, each line twice (its own logger and the root's), and the
    model worker's stdout line by line: ~18 lines a request."""
    if level not in LOG_LEVELS:
        raise InvalidArgument(f"TorchServe log level {quote(level)}: one of {', '.join(LOG_LEVELS)}")

    def rolling(name: str, where: str, pattern: str) -> str:
        return (
            f'<RollingFile name="{name}" fileName="${{env:{where}:-logs}}/{name}.log" '
            f'filePattern="${{env:{where}:-logs}}/{name}.%d{{dd-MMM}}.log.gz"><PatternLayout pattern="{pattern}"/>'
            '<Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>'
            '<DefaultRolloverStrategy max="5"/></RollingFile>'
        )

    full, short = "%d{ISO8601} [%-5p] %t %c - %m%n", "%d{ISO8601} - %m%n"
    appenders = [
        rolling("access_log", "LOG_LOCATION", short),
        rolling("model_log", "LOG_LOCATION", full),
        rolling("model_metrics", "METRICS_LOCATION", short),
        rolling("ts_log", "LOG_LOCATION", full),
        rolling("ts_metrics", "METRICS_LOCATION", short),
        f'<Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="{full}"/></Console>',
    ]
    loggers = [
        '<Logger name="ACCESS_LOG" level="info" additivity="false"><AppenderRef ref="access_log"/></Logger>',
        '<Logger name="io.netty" level="error"/>',
        '<Logger name="org.apache" level="off"/>',
        *(
            f'<Logger name="{name}" level="{level}" additivity="false"><AppenderRef ref="{name_ref}"/></Logger>'
            for name, name_ref in OWN_LOGGERS
        ),
        f'<Root level="{level}"><AppenderRef ref="STDOUT"/></Root>',
    ]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Configuration><Appenders>'
        + "".join(appenders)
        + "</Appenders><Loggers>"
        + "".join(loggers)
        + "</Loggers></Configuration>\n"
    )


@dataclass(frozen=True)
class TorchServeConfig:
    """Where TorchServe listens and how it runs; every port 0 means a free one."""

    host: str = setting("127.0.0.1", "address TorchServe binds: loopback keeps model management local", flag="ts-host")
    grpc_port: int = setting(0, "gRPC inference port (0: a free one)")
    grpc_management_port: int = setting(0, "gRPC management port, bound to loopback only (0: a free one)")
    metrics_port: int = setting(0, "Prometheus metrics port (0: a free one)")
    workdir: Path | None = setting(
        None, "private working directory (key file, logs, model store); a temporary one when not given"
    )
    model_store: Path | None = setting(
        None, "model store: archives and the registry, shared by replicas (default: <workdir>/model-store)"
    )
    token_auth: bool = setting(
        True,
        "TorchServe's token authorisation; off only where the network admits nobody else (a pod behind a "
        "NetworkPolicy): management stays on loopback either way",
    )
    netty_threads: int = setting(
        1, "TorchServe frontend threads (and backend client threads): one keeps the tail short on 2 cores"
    )
    jvm_options: str = setting(
        "-XX:+UseSerialGC -Xms512m -Xmx512m",
        "the JVM's options: a serial collector on a fixed heap pauses least on a small machine (docs/serving.md)",
    )
    job_queue_size: int = setting(64, "requests a model queues before answering 503/UNAVAILABLE")
    token_expiration_min: int = setting(60 * 24 * 30, "lifetime of the inference and management keys, minutes")
    worker_threads: int = setting(1, "torch threads per model worker")
    open_inference: bool = setting(
        False, "serve the Open Inference Protocol (KServe v2 ModelInfer) on the gRPC port instead of TorchServe's own"
    )
    startup_timeout_s: float = setting(120.0, "how long to wait for TorchServe to answer, s")
    log_level: str = setting(
        "",
        "level of TorchServe's own logs (ts_log.log, model_log.log, its per-request metric lines), written once "
        "each; empty: TorchServe's default configuration, which writes ~18 lines a request at info and debug "
        "(the access log keeps its line a request at any level)",
        choices=("", *LOG_LEVELS),
    )


@dataclass
class TorchServeKeys:
    """The tokens TorchServe generated; never logged."""

    inference: str
    management: str

    def __repr__(self) -> str:
        return "TorchServeKeys(<hidden>)"


@dataclass
class LocalTorchServe:
    """A TorchServe started here; `with LocalTorchServe(config) as ts:` starts it and stops it, workers included."""

    config: TorchServeConfig = field(default_factory=TorchServeConfig)
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path = Path()
    ports: dict[str, int] = field(default_factory=dict)
    keys: TorchServeKeys | None = None
    _own_workdir: bool = False

    # -- addresses ------------------------------------------------------------------------------
    @property
    def inference_address(self) -> str:
        return f"{self.config.host}:{self.ports['grpc']}"

    @property
    def management_address(self) -> str:
        return f"{self.config.host}:{self.ports['grpc_management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.ports['metrics']}/metrics"

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    @property
    def model_store(self) -> Path:
        return self.config.model_store.resolve() if self.config.model_store else self.workdir / "model-store"

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> LocalTorchServe:
        c = self.config
        if c.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="rrp-torchserve-"))
            self._own_workdir = True
        else:
            # Absolute: TorchServe runs in the working directory, and reads TEMP and the model store from it.
            self.workdir = c.workdir.resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)  # the key file is written here
        self.model_store.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        self.ports = {
            "grpc": c.grpc_port or free_port(c.host),
            "grpc_management": c.grpc_management_port or free_port(c.host),
            "metrics": c.metrics_port or free_port(c.host),
            "http": free_port(c.host),
            "http_management": free_port(c.host),
        }
        properties = self.workdir / "config.properties"
        properties.write_text(self._properties())
        log_config: list[str] = []
        if c.log_level:
            (self.workdir / "log4j2.xml").write_text(log4j2_xml(c.log_level))
            log_config = ["--log-config", str(self.workdir / "log4j2.xml")]
        env = {
            **os.environ,
            # The launcher keeps its pid file in TMPDIR, the JVM its worker sockets in TEMP: private to this instance.
            "TMPDIR": str(self.workdir / "tmp"),
            "TEMP": str(self.workdir / "tmp"),
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
            "RRP_SERVING_THREADS": str(c.worker_threads),
        }
        env.pop("TS_CONFIG_FILE", None)
        cmd = [
            _torchserve_exe(),
            "--start", "--foreground",
            "--ts-config", str(properties),
            "--model-store", str(self.model_store),
            "--no-config-snapshots",
            "--enable-model-api",
            *log_config,
        ]  # fmt: skip
        log_file = (self.workdir / "logs" / "torchserve.out").open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        try:
            self._wait_started()
        except BaseException:
            self.stop()
            raise
        log.info(
            "TorchServe up: gRPC inference %s, management %s, metrics %s; key file %s (mode 0600)",
            self.inference_address,
            self.management_address,
            self.metrics_url,
            self.key_file,
        )
        return self

    def _properties(self) -> str:
        c, p, h = self.config, self.ports, self.config.host
        return "\n".join(
            [
                f"inference_address=http://{h}:{p['http']}",
                f"management_address=http://127.0.0.1:{p['http_management']}",
                f"metrics_address=http://{h}:{p['metrics']}",
                f"grpc_inference_address={h}",
                f"grpc_inference_port={p['grpc']}",
                "grpc_management_address=127.0.0.1",
                f"grpc_management_port={p['grpc_management']}",
                "enable_grpc_ssl=false",
                f"model_store={self.model_store}",
                "enable_model_api=true",
                f"disable_token_authorization={'false' if c.token_auth else 'true'}",
                f"token_expiration_min={c.token_expiration_min}",
                f"number_of_netty_threads={c.netty_threads}",
                f"netty_client_threads={c.netty_threads}",
                *([f"vmargs={c.jvm_options}"] if c.jvm_options else []),
                f"job_queue_size={c.job_queue_size}",
                "default_workers_per_model=1",
                "install_py_dep_per_model=false",
                "enable_envvars_config=false",
                "disable_system_metrics=true",
                f"ts_open_inference_protocol={'true' if c.open_inference else 'false'}",
                "",
            ]
        )

    def _wait_started(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        # The key file appears (empty at first) inside the 0700 working directory; read it once it is whole.
        while self.keys is None and self.config.token_auth:
            self._check_alive()
            if self.key_file.is_file():
                self.key_file.chmod(0o600)
                with contextlib.suppress(ValueError, KeyError):
                    self.keys = read_keys(self.key_file)
            if time.monotonic() > deadline:
                raise Unavailable(f"TorchServe wrote no key file in {self.config.startup_timeout_s:.0f} s")
            time.sleep(0.1)
        from serving.client import ping

        while True:
            self._check_alive()
            try:
                if ping(self.inference_address, self.inference_key, timeout_s=2.0):
                    return
            except DomainError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"TorchServe not answering on {self.inference_address} after startup")
            time.sleep(0.2)

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise Unavailable(f"TorchServe exited while starting:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            path = self.workdir / "logs" / name
            if path.is_file():
                out += [f"--- {name}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)

    def processes(self) -> list[Any]:
        """The launcher, the JVM and the model workers (psutil processes)."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def memory_mb(self) -> dict[str, float]:
        """Resident memory of the JVM and of the model workers, MB."""
        import psutil

        jvm = workers = 0.0
        for p in self.processes():
            try:
                rss = p.memory_info().rss / 2**20
                name = p.name()
            except psutil.Error:
                continue
            if name == "java":
                jvm += rss
            elif "model_service_worker" in " ".join(p.cmdline()):
                workers += rss
        return {"jvm_mb": round(jvm, 1), "workers_mb": round(workers, 1), "total_mb": round(jvm + workers, 1)}

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the whole process group (launcher, JVM, workers), SIGKILL if it lingers."""
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: the launcher leads its own group
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.1)
            if _group_alive(pgid):
                log.warning("TorchServe did not stop in %.0f s: killing it", timeout_s)
                _signal_group(pgid, signal.SIGKILL)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        if self._own_workdir and self.workdir.is_dir():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalTorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- management -----------------------------------------------------------------------------
    @property
    def inference_key(self) -> str | None:
        return self.keys.inference if self.keys is not None else None

    def admin(self) -> ModelServerAdmin:
        key = self.keys.management if self.keys is not None else ""
        return ModelServerAdmin(self.management_address, key, self.model_store)

    def register(self, archive: Path, *, workers: int | None = None, timeout_s: float = 120.0) -> str:
        """Copies the archive into the model store and registers it, waiting until its workers are up."""
        return self.admin().register(archive, workers=workers, timeout_s=timeout_s)

    def wait_model(self, name: str, version: str, width: int, height: int, timeout_s: float = 60.0) -> None:
        """Returns once the model answers a real inference (a black frame); its errors otherwise."""
        wait_model(self.inference_address, self.inference_key or "", name, version, width, height, timeout_s)

    def set_default(self, name: str, version: str) -> str:
        return self.admin().set_default(name, version)

    def describe(self, name: str, version: str = "") -> list[dict[str, Any]]:
        return self.admin().describe(name, version)


@dataclass(frozen=True)
class ModelServerAdmin:
    """TorchServe's management API (gRPC, loopback or the pod's network): what the deployer and `rrp serve` need."""

    address: str
    key: str = field(repr=False)
    model_store: Path

    def register(self, archive: Path, *, workers: int | None = None, timeout_s: float = 120.0) -> str:
        """Copies the archive into the model store and registers it, waiting until its workers are up."""
        if not archive.is_file():
            raise NotFound(f"model archive {archive} not found (build one: rrp package)")
        if archive.parent.resolve() != self.model_store.resolve():
            shutil.copyfile(archive, self.model_store / archive.name)
        return management_call(
            self.address,
            self.key,
            "RegisterModel",
            management_pb2.RegisterModelRequest(
                url=archive.name, initial_workers=workers or 1, synchronous=True, startup_timeout=int(timeout_s)
            ),
            timeout_s=timeout_s,
        )

    def unregister(self, name: str, version: str, timeout_s: float = 60.0) -> str:
        return management_call(
            self.address,
            self.key,
            "UnregisterModel",
            management_pb2.UnregisterModelRequest(model_name=name, model_version=version),
            timeout_s=timeout_s,
        )

    def set_default(self, name: str, version: str) -> str:
        return management_call(
            self.address,
            self.key,
            "SetDefault",
            management_pb2.SetDefaultRequest(model_name=name, model_version=version),
        )

    def describe(self, name: str, version: str = "") -> list[dict[str, Any]]:
        text = management_call(
            self.address,
            self.key,
            "DescribeModel",
            management_pb2.DescribeModelRequest(model_name=name, model_version=version),
        )
        return list(json.loads(text))

    def versions(self, name: str) -> dict[str, bool]:
        """The registered versions of `name`, each with whether it is TorchServe's default; {} when none."""
        try:
            described = self.describe(name, "all")
            default = str(self.describe(name)[0].get("modelVersion"))  # no version: the default's description
        except NotFound:
            return {}
        return {str(d.get("modelVersion")): str(d.get("modelVersion")) == default for d in described}


def wait_model(
    address: str, key: str, name: str, version: str, width: int, height: int, timeout_s: float = 60.0
) -> None:
    """Returns once the model answers a real inference (a black frame); its errors otherwise."""
    import numpy as np

    from serving.client import ModelRef, TorchServeClient

    client = TorchServeClient(address, ModelRef(name, version), key)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.infer(np.zeros((height, width, 3), np.uint8), 0.0, timeout_s=10.0)
                return
            except (Unavailable, DeadlineExceeded):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        client.close()


def management_call(address: str, key: str, method: str, request: Any, timeout_s: float = 30.0) -> str:
    """One ManagementAPIsService call; TorchServe's odd statuses become domain errors with a clear message."""
    with grpc.insecure_channel(address) as channel:
        stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
        try:
            metadata = (("authorization", f"Bearer {key}"),) if key else ()
            response = getattr(stub, method)(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            raise _management_error(exc, method, request) from None
    return str(response.msg)


def _management_error(exc: grpc.RpcError, method: str, request: Any) -> DomainError:
    code, details = exc.code(), exc.details() or ""
    name = getattr(request, "model_name", "") or getattr(request, "url", "")
    if code == grpc.StatusCode.NOT_FOUND or "not found" in details.lower():
        return NotFound(f"{method}: {quote(name)} not found on the model server: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{method}: model server unreachable: {details}")
    if method == "RegisterModel" and code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        # A duplicate registration answers UNKNOWN with an empty message.
        return FailedPrecondition(f"RegisterModel {quote(name)}: already registered or not loadable ({details})")
    return FailedPrecondition(f"{method} {quote(name)}: {code.name} {details}")


def read_keys(path: Path) -> TorchServeKeys:
    data = json.loads(path.read_text())
    return TorchServeKeys(inference=data["inference"]["key"], management=data["management"]["key"])


def _torchserve_exe() -> str:
    exe = Path(sys.executable).with_name("torchserve")
    if exe.is_file():
        return str(exe)
    found = shutil.which("torchserve")
    if found is None:
        raise FailedPrecondition("torchserve not found: install the project (make setup)")
    return found


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies of our own launcher count as gone once reaped; poll the live members through /proc.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
