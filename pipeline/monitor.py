"""`rrp monitor`: a real Prometheus on loopback scraping the services' metrics endpoints, with the alert rules."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from plumbing.errors import FailedPrecondition, InvalidArgument, quote
from plumbing.procs import stop_on_signals
from plumbing.redis_local import free_port
from plumbing.settings import setting

log = logging.getLogger(__name__)

# The chart's rule file: one file for a cluster's Prometheus (a ConfigMap) and this one.
DEFAULT_RULES = Path("deploy/helm/rallyrobopilot/files/alert-rules.yml")
# The scrape job's name, as on a cluster (deploy/helm/rallyrobopilot/files/prometheus-scrape.yml): the rules
# and the dashboard select it.
JOB = "rallyrobopilot"


@dataclass(frozen=True)
class MonitorConfig:
    """`rrp monitor`: what to scrape, with which rules, where Prometheus keeps its data."""

    targets: tuple[str, ...] = setting(
        (),
        "metrics endpoints to scrape, [COMPONENT=]HOST:PORT,...; COMPONENT (game-server, scheduler, collector, "
        "autopilot, deployer, torchserve) becomes the `component` label the alert rules select on",
        metavar="[COMPONENT=]HOST:PORT[,...]",
        env="monitor_targets",
    )
    rules: Path = setting(DEFAULT_RULES, "alert rules file (Prometheus rule_files format)", env="monitor_rules")
    port: int = setting(0, "port of Prometheus's web UI and API on 127.0.0.1; 0 takes a free one", env="monitor_port")
    data_dir: Path | None = setting(
        None, "Prometheus's data folder; a private temporary one, removed on exit, if absent"
    )
    scrape_interval_s: float = setting(5.0, "seconds between scrapes of every target")
    evaluation_interval_s: float = setting(5.0, "seconds between evaluations of the rules")
    prometheus: str = setting("prometheus", "the Prometheus executable (Debian: apt-get install prometheus)")

    def __post_init__(self) -> None:
        for target in self.targets:
            parse_target(target)
        if self.scrape_interval_s <= 0 or self.evaluation_interval_s <= 0:
            raise InvalidArgument("scrape and evaluation intervals must be positive")


def parse_target(text: str) -> tuple[str, str]:
    """`[component=]host:port` -> (component or "", "host:port")."""
    component, _, address = text.rpartition("=")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"target {quote(text)}: expected [COMPONENT=]HOST:PORT")
    return component, address


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def prometheus_config(targets: tuple[str, ...], rules: Path, scrape_s: float, evaluate_s: float) -> dict[str, Any]:
    """The scrape job of the chart's, with static targets: one group per component, labelled with it."""
    groups: dict[str, list[str]] = {}
    for target in targets:
        component, address = parse_target(target)
        groups.setdefault(component, []).append(address)
    static = [
        {"targets": addresses, **({"labels": {"component": component}} if component else {})}
        for component, addresses in groups.items()
    ]
    return {
        "global": {"scrape_interval": _duration(scrape_s), "evaluation_interval": _duration(evaluate_s)},
        "rule_files": [str(rules.resolve())],
        "scrape_configs": [{"job_name": JOB, "static_configs": static}],
    }


def find_rules(path: Path) -> Path:
    """The rules file as given, else (a relative path) under the repository this package runs from."""
    if path.is_file():
        return path
    beside = Path(__file__).resolve().parents[1] / path
    if not path.is_absolute() and beside.is_file():
        return beside
    raise FailedPrecondition(f"rules file {path} not found")


@dataclass(frozen=True)
class Series:
    """One series of a query's answer: its labels and its (unix time, value) points."""

    labels: dict[str, str]
    points: list[tuple[float, float]]


class LocalPrometheus:
    """A Prometheus process on 127.0.0.1 with a generated config, its data in a folder of its own."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.rules = find_rules(config.rules)
        self.port = config.port or free_port()
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        self.data_dir = config.data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        """Starts Prometheus and returns once it reports ready."""
        exe = shutil.which(self.config.prometheus)
        if exe is None:
            raise FailedPrecondition(f"{self.config.prometheus} not found: apt-get install prometheus")
        if self.data_dir is None:
            self._temp = tempfile.TemporaryDirectory(prefix="rrp-prometheus-")
            self.data_dir = Path(self._temp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.data_dir / "prometheus.yml"
        c = self.config
        document = prometheus_config(c.targets, self.rules, c.scrape_interval_s, c.evaluation_interval_s)
        config_file.write_text(yaml.safe_dump(document, sort_keys=False))
        self.log_path = self.data_dir / "prometheus.log"
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [
                    exe,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=7d",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"prometheus on port {self.port} not ready after {timeout_s}s")
            time.sleep(0.1)
        log.info("Prometheus at %s (data in %s)", self.url, self.data_dir)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expr: str, timeout_s: float = 5.0) -> list[Series]:
        """An instant query's vector (`/api/v1/query`), one point per series; an invalid expression raises
        InvalidArgument."""
        return self._ask("query", {"query": expr}, timeout_s)

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[Series]:
        """A range query's matrix (`/api/v1/query_range`): one series per label set."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        return self._ask("query_range", params, 10.0)

    def _ask(self, endpoint: str, params: dict[str, str], timeout_s: float) -> list[Series]:
        url = f"{self.url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise InvalidArgument(f"query {quote(params['query'])}: {body.get('error', exc.reason)}") from None
        return [
            Series({str(k): str(v) for k, v in item["metric"].items()},
                   [(float(t), float(v)) for t, v in item.get("values") or [item["value"]]])
            for item in body["data"]["result"]
        ]  # fmt: skip

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Prometheus flushes and exits), SIGKILL if it does not in time; a private data folder goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_monitor(config: MonitorConfig) -> int:
    """Starts Prometheus, logs its address, and stops it on SIGTERM or Ctrl-C; 1 when Prometheus itself exits."""
    stop = stop_on_signals("Prometheus")
    prometheus = LocalPrometheus(config)
    try:
        prometheus.start()
        targets = ", ".join(config.targets) or "none"
        log.info("prometheus on %s (targets: %s; rules: %s)", prometheus.url, targets, prometheus.rules)
        while not stop.wait(1.0):
            if prometheus.proc is None or prometheus.proc.poll() is not None:
                log.error("Prometheus exited:\n%s", prometheus.log_tail())
                return 1
    finally:
        started = prometheus.proc is not None
        prometheus.stop()
        if started:
            log.info("Prometheus stopped")
    return 0
