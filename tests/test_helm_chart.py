"""The Helm chart (deploy/helm/rallyrobopilot): rendered and linted by Helm's own engine (helm-python-sdk), every
manifest checked against the Kubernetes 1.33 schemas (kubernetes-validate, strict), and the operators' rules checked
over the rendered manifests, for the default, minimal and production values."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "rallyrobopilot"
KUBE_VERSION = "1.33.0"
VALUES = {
    "default": None,
    "minimal": ROOT / "deploy" / "helm" / "values-minimal.yaml",
    "production": ROOT / "deploy" / "helm" / "values-production.yaml",
}
RRP_IMAGES = ("rrp-services", "rrp-trainer")
RRP_ENTRYPOINT_IMAGES = (*RRP_IMAGES, "rrp-torchserve")  # images whose entry point is `rrp`: args are its command line
PROMETHEUS_URL = "http://prometheus.monitoring.svc.cluster.local:9090"
SERVING_ON: dict[str, Any] = {  # serving, the deployer and every Job on top of the default values
    "torchserve": {"enabled": True},
    "autopilot": {"enabled": True},
    "deployer": {"enabled": True, "prometheusUrl": PROMETHEUS_URL},
    "jobs": {name: {"enabled": True} for name in ("evolve", "collect", "train", "deployModel")},
}
TLS_ON: dict[str, Any] = {"enabled": True, "existingSecret": "rrp-tls", "mutual": True, "serverName": ""}
TLS_DIR = "/var/run/secrets/rrp/tls"
SERVER_GRACE_S = 5  # plumbing.bootstrap.ServerConfig.grace_s: NOT_SERVING, then this long for in-flight calls


def values(name: str) -> dict[str, Any] | None:
    path = VALUES[name]
    return yaml.safe_load(path.read_text()) if path else None


def render(vals: dict[str, Any] | None) -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values=vals, name="rrp", namespace="racing", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(values(request.param))


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for Deployments, StatefulSets, Jobs and the chart's test Pods."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]
        elif d["kind"] == "Pod":
            yield d, d


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def component(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"]["app.kubernetes.io/component"])


def is_rrp(container: dict[str, Any]) -> bool:
    return any(name in container["image"] for name in RRP_IMAGES)


def rrp_command_lines(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each container that runs `rrp` (an rrp image's entry point, no `command` of its own): its args by name."""
    lines = {}
    for workload, pod in workloads(docs):
        for c in containers(pod):
            if "command" not in c and any(name in c["image"] for name in RRP_ENTRYPOINT_IMAGES):
                lines[f"{workload['kind']}/{workload['metadata']['name']}/{c['name']}"] = [str(a) for a in c["args"]]
    return lines


def parse_rrp(args: list[str]) -> Any:
    """`args` parsed by the real `rrp` CLI (rrp.cli.build_parser); an unknown flag or a bad value fails the test."""
    from rrp.cli import build_parser

    try:
        return build_parser(args).parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"rrp refuses the chart's command line (exit {exc.code}): rrp {' '.join(args)}")


def pod_spec(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return dict(by_kind(docs, kind)[name]["spec"]["template"]["spec"])


def job_of(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The one Job of a pipeline step (its name ends with a hash of its pod template)."""
    (job,) = [d for d in docs if d["kind"] == "Job" and component(d["spec"]["template"]) == name]
    return job


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


# -- Helm's engine and the Kubernetes schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUES))
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(str(CHART), values=values(name), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_every_manifest_is_valid_for_kubernetes_1_33_strict(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    assert len(docs) >= 8
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_strict_validation_does_refuse_an_unknown_field() -> None:
    """The check above can fail: a field Kubernetes does not know is refused."""
    deployment = next(d for d in render(None) if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_the_cli_validates_the_rendered_files_too(tmp_path: Path) -> None:
    """`kubernetes-validate -k 1.33.0 --strict`, as an operator would run it on `helm template` output."""
    exe = shutil.which("kubernetes-validate", path=str(Path(__import__("sys").executable).parent))
    assert exe, "kubernetes-validate is not installed"
    files = []
    for i, doc in enumerate(render(values("production"))):
        path = tmp_path / f"{i:02d}-{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    proc = subprocess.run(
        [exe, "-k", KUBE_VERSION, "--strict", "--quiet", *files], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(
    "bad",
    [
        {"gameServer": {"replicas": "three"}},
        {"gameServer": {"replica": 3}},
        {"redis": {"appendfsync": "sometimes"}},
        {"metrics": {"port": 70000}},
        {"jobs": {"evolve": {"kind": "neural"}}},
        {"autopilot": {"enabled": True}},  # needs TorchServe
        {"torchserve": {"enabled": True}, "deployer": {"enabled": True}},  # needs deployer.prometheusUrl
        {"torchserve": {"enabled": True}, "jobs": {"deployModel": {"enabled": True}}},  # the same
        {"torchserve": {"auth": {"token": "in-values"}}},  # a token comes from a Secret, never from values
        {"autopilot": {"model": "rrp-pilot"}},  # the routing names the model
        {"tls": {"enabled": True}},  # TLS needs the Secret of its certificate
        {"tls": {"enabled": True, "existingSecret": "rrp-tls", "ca": "in-values"}},
    ],
)
def test_values_schema_and_guards_refuse_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError):
        render(bad)


# -- what operators expect ----------------------------------------------------------------------------------------


def test_game_servers_sit_behind_a_headless_service_that_the_scheduler_discovers(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    service = by_kind(docs, "Service")["rrp-rallyrobopilot-game-server"]
    assert service["spec"]["clusterIP"] == "None"
    port = service["spec"]["ports"][0]["port"]
    deployments = by_kind(docs, "Deployment")
    assert "rrp-rallyrobopilot-game-server" in deployments
    if "rrp-rallyrobopilot-scheduler" in deployments:
        args = deployments["rrp-rallyrobopilot-scheduler"]["spec"]["template"]["spec"]["containers"][0]["args"]
        target = args[args.index("--discover") + 1]
        assert target == f"rrp-rallyrobopilot-game-server.racing.svc.cluster.local:{port}"


def test_rrp_servers_have_native_grpc_probes_and_resources(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """Kubernetes' own gRPC probes on plaintext ports; over TLS (production), the image's check in the container."""
    name, docs = rendered
    servers = {"game-server": "GameService", "scheduler": "SchedulerService", "collector": "CollectorService"}
    for workload, pod in workloads(docs):
        for c in containers(pod):
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{workload['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= res["limits"].keys()
        if component(pod) in servers and workload["kind"] == "Deployment":
            c = pod["spec"]["containers"][0]
            port, service = c["ports"][0]["containerPort"], f"rallyrobopilot.v1.{servers[component(pod)]}"
            if name == "production":
                assert _flag(c["livenessProbe"]["exec"]["command"], "--address") == f"127.0.0.1:{port}"
                assert _flag(c["readinessProbe"]["exec"]["command"], "--service") == service
                assert "exec" in c["startupProbe"]
                continue
            assert c["livenessProbe"]["grpc"]["port"] == port
            assert c["readinessProbe"]["grpc"]["service"] == service
            assert "grpc" in c["startupProbe"]


def test_every_pod_is_locked_down(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for workload, pod in workloads(docs):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        assert spec.get("automountServiceAccountToken") is False
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert ":" in c["image"] and not c["image"].endswith(":latest")


def test_termination_grace_outlasts_the_servers_sigterm_drain(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for workload, pod in workloads(docs):
        if workload["kind"] == "Deployment" and any(is_rrp(c) for c in pod["spec"]["containers"]):
            assert pod["spec"]["terminationGracePeriodSeconds"] > SERVER_GRACE_S + 2, workload["metadata"]["name"]


def test_every_rrp_container_carries_the_opentelemetry_settings(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    for workload, pod in workloads(docs):
        for c in containers(pod):
            if not is_rrp(c) or workload["kind"] == "Pod" or "command" in c:  # a Job's wait for its inputs: sh
                continue
            env = {e["name"]: e for e in c["env"]}
            assert env["OTEL_SERVICE_NAME"]["value"] == component(pod)
            assert {"OTEL_TRACES_SAMPLER", "OTEL_PROPAGATORS", "OTEL_RESOURCE_ATTRIBUTES"} <= env.keys()
            if name == "production":
                assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith("http://otel-collector.")


def test_jaeger_is_optional_and_receives_every_pods_spans() -> None:
    docs = render({"jaeger": {"enabled": True}})
    assert "rrp-rallyrobopilot-jaeger" in by_kind(docs, "Deployment")
    for workload, pod in workloads(docs):
        for c in containers(pod):
            if is_rrp(c) and workload["kind"] != "Pod":
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://rrp-rallyrobopilot-jaeger:4317"


def test_disruption_budgets_and_autoscalers() -> None:
    docs = render(values("production"))
    pdbs = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    assert {"game-server", "scheduler", "collector", "torchserve"} <= pdbs
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"rrp-rallyrobopilot-game-server", "rrp-rallyrobopilot-torchserve"}
    for name in hpas:  # an autoscaled Deployment leaves replicas to the HPA
        assert "replicas" not in by_kind(docs, "Deployment")[name]["spec"]


def test_redis_is_a_statefulset_with_aof_on_a_volume_and_a_password_from_a_secret(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    sets = by_kind(docs, "StatefulSet")
    if name == "minimal":
        assert not sets
        return
    redis = sets["rrp-rallyrobopilot-redis"]
    pod = redis["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--dir") + 1] == "/data"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "requirepass" not in " ".join(command)  # the password is read from the Secret into a file
    secret = "rrp-redis-auth" if name == "production" else "rrp-rallyrobopilot-redis"
    assert any(v.get("secret", {}).get("secretName") == secret for v in pod["volumes"])
    if name == "default":
        assert len(by_kind(docs, "Secret")["rrp-rallyrobopilot-redis"]["data"]["password"]) > 20
    collector = by_kind(docs, "Deployment")["rrp-rallyrobopilot-collector"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in collector["containers"][0]["env"] if "value" in e}
    assert env["RRP_REDIS_URL"] == "redis://rrp-rallyrobopilot-redis:6379/0"
    assert env["RRP_REDIS_PASSWORD_FILE"].startswith("/var/run/secrets/")


# -- the rrp command lines the chart renders ------------------------------------------------------------------


@pytest.mark.parametrize(
    "vals",
    [
        values("default"),
        values("minimal"),
        values("production"),
        SERVING_ON,
        {
            **(values("minimal") or {}),
            **SERVING_ON,
            "collector": {"enabled": True},
            "redis": {"enabled": True},
            "serving": {"allowInsecure": True},
        },
        {**(values("production") or {}), "tls": TLS_ON},
    ],
    ids=["default", "minimal", "production", "serving-on", "serving-on-no-metrics", "production-mutual-tls"],
)
def test_every_rrp_command_line_the_chart_renders_parses_with_the_real_cli(vals: dict[str, Any] | None) -> None:
    lines = rrp_command_lines(render(vals))
    assert lines
    for where, args in lines.items():
        assert args, f"{where}: no command"
        parsed = parse_rrp(args)
        assert parsed.command == args[0], where


def test_the_cli_check_does_refuse_a_flag_rrp_does_not_have() -> None:
    """The check above can fail: the flags the chart used before the CLI existed are refused."""
    for args in (
        ["serve", "--model-store", "/models", "--host", "0.0.0.0"],
        ["serve", "--token-file", "/var/run/secrets/rrp/torchserve/token"],
        ["package", "--model", "/artifacts/model", "--version", "1.0", "--bogus"],
    ):
        with pytest.raises(pytest.fail.Exception, match="rrp refuses"):
            parse_rrp(args)


TOKEN_FILE = "/var/run/secrets/rrp/model-token/token"


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c["name"] == name)


def test_serving_command_lines_mean_what_the_cluster_needs() -> None:
    """TorchServe follows the registry on the shared store, on the pod's loopback behind the token front; every
    model client asks the front's port with the token; the canary reads Prometheus; the autopilots drive on the
    store's routing."""
    docs = render(SERVING_ON)
    lines = {where.split("/", 1)[1]: parse_rrp(args) for where, args in rrp_command_lines(docs).items()}
    serve = lines["rrp-rallyrobopilot-torchserve/torchserve"]
    assert (serve.command, serve.ts_host, serve.token_auth) == ("serve", "127.0.0.1", False)
    assert (serve.grpc_port, serve.metrics_port) == (7080, 8082)
    assert str(serve.model_store) == "/models" and str(serve.workdir).startswith("/tmp/")
    front = lines["rrp-rallyrobopilot-torchserve/auth-proxy"]
    assert (front.command, front.host, front.port) == ("auth-proxy", "0.0.0.0", 7070)
    assert front.upstream == "127.0.0.1:7080" and str(front.token_file) == TOKEN_FILE
    inference = "rrp-rallyrobopilot-torchserve:7070"
    game = "rrp-rallyrobopilot-game-server:50051"
    deployer = lines["rrp-rallyrobopilot-deployer/deployer"]
    job = parse_rrp(job_of(docs, "deploy-model")["spec"]["template"]["spec"]["containers"][0]["args"])
    for deploy in (deployer, job):
        assert deploy.command == "deploy" and str(deploy.model_store) == "/models"
        assert deploy.model_server == inference and deploy.game == (game,)
        assert deploy.canary_prometheus == PROMETHEUS_URL and str(deploy.token_file) == TOKEN_FILE
    assert str(deployer.watch) == "/artifacts/model" and deployer.model is None
    assert (deployer.metrics_port, deployer.metrics_host) == (9100, "0.0.0.0")
    train_out = parse_rrp(job_of(docs, "train")["spec"]["template"]["spec"]["containers"][0]["args"]).out
    assert job.model == train_out and str(job.model).startswith("/artifacts/model/")  # the model this pipeline trains
    assert job.watch is None and job.version is None
    autopilot = lines["rrp-rallyrobopilot-autopilot/autopilot"]
    assert autopilot.model_server == (inference,) and autopilot.game == (game,)
    assert [str(t) for t in autopilot.token_file] == [TOKEN_FILE]
    assert autopilot.mode == "realtime" and autopilot.laps >= 100_000
    assert str(autopilot.routing) == "/models/registry/routing.json"
    versioned = render({**SERVING_ON, "jobs": {"deployModel": {"enabled": True, "version": "7"}}})
    args = next(a for w, a in rrp_command_lines(versioned).items() if "deploy-model" in w)
    assert parse_rrp(args).version == "7"
    # Auth off on purpose: TorchServe on the pod's port, no token anywhere.
    plain = render({**SERVING_ON, "torchserve": {"enabled": True, "auth": {"enabled": False}}})
    plain_lines = {w.split("/", 1)[1]: parse_rrp(a) for w, a in rrp_command_lines(plain).items()}
    assert (plain_lines["rrp-rallyrobopilot-torchserve/torchserve"].ts_host, plain_lines[
        "rrp-rallyrobopilot-torchserve/torchserve"].grpc_port) == ("0.0.0.0", 7070)  # fmt: skip
    assert "rrp-rallyrobopilot-torchserve/auth-proxy" not in plain_lines
    assert plain_lines["rrp-rallyrobopilot-autopilot/autopilot"].token_file == ()
    assert not any(d["kind"] == "Secret" and "model-token" in d["metadata"]["name"] for d in plain)


def test_model_store_and_token_mounts() -> None:
    """Autopilots read the routing from the store read-only; TorchServe, the deployer and the deploy Job write
    it. The token Secret reaches the front and every model client as a 0400 file, never TorchServe itself nor an
    environment variable."""
    docs = render(values("production"))
    claim = "rrp-rallyrobopilot-model-store"
    specs = {
        "torchserve": pod_spec(docs, "Deployment", "rrp-rallyrobopilot-torchserve"),
        "deployer": pod_spec(docs, "Deployment", "rrp-rallyrobopilot-deployer"),
        "autopilot": pod_spec(docs, "Deployment", "rrp-rallyrobopilot-autopilot"),
        "deploy-model": job_of(docs, "deploy-model")["spec"]["template"]["spec"],
    }
    secret = by_kind(docs, "Secret")["rrp-rallyrobopilot-model-token"]
    assert len(secret["data"]["token"]) > 40
    for name, spec in specs.items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] == claim, name
        main = container(spec, name)
        store = mounts(main)["model-store"]
        assert store["mountPath"] == "/models", name
        read_only = name == "autopilot"
        assert bool(store.get("readOnly")) is read_only, name
        assert bool(volumes["model-store"]["persistentVolumeClaim"].get("readOnly")) is read_only, name
        assert volumes["model-token"]["secret"]["secretName"] == "rrp-rallyrobopilot-model-token", name
        assert volumes["model-token"]["secret"]["defaultMode"] == 0o400, name
        holder = container(spec, "auth-proxy") if name == "torchserve" else main
        assert mounts(holder)["model-token"]["mountPath"] == str(Path(TOKEN_FILE).parent), name
        assert all(c["name"] == "wait-inputs" for c in spec.get("initContainers", [])), name
        env = {e["name"] for c in spec["containers"] for e in c["env"]}
        assert not {"RRP_MODEL_SERVER_TOKEN_FILE", "RRP_TOKEN_FILE"} & env, name
    assert "model-token" not in mounts(container(specs["torchserve"], "torchserve"))
    autopilot_args = specs["autopilot"]["containers"][0]["args"]
    routing = autopilot_args[autopilot_args.index("--routing") + 1]
    assert routing.startswith(mounts(specs["autopilot"]["containers"][0])["model-store"]["mountPath"] + "/")
    assert mounts(specs["deployer"]["containers"][0])["artifacts"]["readOnly"] is True
    assert "--no-token-auth" in container(specs["torchserve"], "torchserve")["args"]
    # GitOps: with an existing Secret the chart makes none.
    given = render({**SERVING_ON, "torchserve": {"enabled": True, "auth": {"existingSecret": "model-token"}}})
    assert not any(d["kind"] == "Secret" and "model-token" in d["metadata"]["name"] for d in given)


def test_torchserve_is_reachable_only_through_its_token_front() -> None:
    docs = render(values("production"))
    service = by_kind(docs, "Service")["rrp-rallyrobopilot-torchserve"]
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("grpc", "grpc")]
    spec = pod_spec(docs, "Deployment", "rrp-rallyrobopilot-torchserve")
    front, serve = container(spec, "auth-proxy"), container(spec, "torchserve")
    assert {p["name"] for p in front["ports"]} == {"grpc"} and "ports" not in serve  # TorchServe: loopback only
    # Production serves TLS: the front's probe checks its port over TLS, for the Service's name.
    probe = front["readinessProbe"]["exec"]["command"]
    assert _flag(probe, "--address") == "127.0.0.1:7070"
    assert _flag(probe, "--tls-server-name") == "rrp-rallyrobopilot-torchserve"
    assert "127.0.0.1', 7080" in serve["livenessProbe"]["exec"]["command"][-1]
    ready = serve["readinessProbe"]["exec"]["command"]  # ready once this replica serves the default version
    assert "/models/registry/replicas/" in ready[-1] and "-7080.json" in ready[-1]
    policy = by_kind(docs, "NetworkPolicy")["rrp-rallyrobopilot-torchserve"]
    rules = {tuple(p["port"] for p in r["ports"]): r["from"] for r in policy["spec"]["ingress"]}
    assert rules.keys() == {("grpc",)}
    assert rules[("grpc",)] == [{"podSelector": {"matchLabels": {"rallyrobopilot.io/model-client": "true"}}}]


def test_pipeline_jobs_are_all_there_in_production() -> None:
    docs = render(values("production"))
    jobs = {component(d["spec"]["template"]): d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Job"}
    assert set(jobs) == {"evolve", "collect", "train", "deploy-model"}
    assert jobs["evolve"]["containers"][0]["args"][:3] == [
        "evolve",
        "--discover",
        "rrp-rallyrobopilot-game-server.racing.svc.cluster.local:50051",
    ]
    assert jobs["deploy-model"]["containers"][0]["args"][:2] == ["deploy", "--model"]
    # rrp deploy builds the archive into the store itself: its only init container waits for the trained model
    assert [c["name"] for c in jobs["deploy-model"]["initContainers"]] == ["wait-inputs"]
    train_env = {e["name"] for e in jobs["train"]["containers"][0]["env"]}
    assert "RRP_REDIS_PASSWORD" in train_env


# -- NetworkPolicies: who reaches whom ----------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "In" and (not present or labels[expr["key"]] not in expr["values"]):
            return False
        if expr["operator"] == "NotIn" and present and labels[expr["key"]] in expr["values"]:
            return False
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "DoesNotExist" and present:
            return False
    return True


def reachable(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(from component, to component) pairs the NetworkPolicies allow, same namespace, pod peers only."""
    pods = {component(pod): pod["metadata"]["labels"] for w, pod in workloads(docs) if w["kind"] != "Pod"}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    allowed = set()
    for target, target_labels in pods.items():
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], target_labels)]
        assert selecting, f"{target} is not covered by any NetworkPolicy"
        for source, source_labels in pods.items():
            for policy in selecting:
                for rule in policy["spec"].get("ingress", []):
                    if any(
                        "podSelector" in peer
                        and "namespaceSelector" not in peer
                        and _selects(peer["podSelector"], source_labels)
                        for peer in rule.get("from", [])
                    ):
                        allowed.add((source, target))
    return allowed


def test_network_policies_open_exactly_the_meshs_edges() -> None:
    docs = render(values("production"))
    allowed = reachable(docs)
    into = lambda target: {s for s, t in allowed if t == target}  # noqa: E731
    assert into("game-server") == {"scheduler", "autopilot", "deployer", "evolve", "collect", "deploy-model"}
    assert into("collector") == {"game-server"}
    assert into("redis") == {"collector", "train"}
    assert into("torchserve") == {"autopilot", "deployer", "deploy-model"}
    for quiet in ("scheduler", "autopilot", "deployer", "evolve", "collect", "train", "deploy-model"):
        assert into(quiet) == set(), quiet  # the scheduler's clients come from outside (networkPolicy.schedulerFrom)


def test_prometheus_may_scrape_the_metrics_ports() -> None:
    docs = render(values("production"))
    policy = by_kind(docs, "NetworkPolicy")["rrp-rallyrobopilot-game-server"]
    metrics_rules = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
    assert metrics_rules[0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    for workload, pod in workloads(docs):  # long-running services; Jobs end before a scrape would matter
        if workload["kind"] == "Deployment" and any(is_rrp(c) for c in pod["spec"]["containers"]):
            annotations = pod["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9100"
            args = pod["spec"]["containers"][0]["args"]
            assert args[args.index("--metrics-port") + 1] == "9100"


# -- monitoring files ---------------------------------------------------------------------------------------------


def _configmap_file(docs: list[dict[str, Any]], name: str, key: str) -> str:
    return str(by_kind(docs, "ConfigMap")[name]["data"][key])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus package (setup)")
def test_alert_rules_and_scrape_config_pass_promtool(tmp_path: Path) -> None:
    docs = render(None)
    rules = tmp_path / "rallyrobopilot.rules.yml"
    text = _configmap_file(docs, "rrp-rallyrobopilot-prometheus-rules", "rallyrobopilot.rules.yml")
    rules.write_text(text)
    count = sum(len(group["rules"]) for group in yaml.safe_load(text)["groups"])
    assert count >= 18
    proc = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"SUCCESS: {count} rules found" in proc.stdout, proc.stdout + proc.stderr
    config = yaml.safe_load(_configmap_file(docs, "rrp-rallyrobopilot-prometheus-scrape", "prometheus.yml"))
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["racing"]}}]
    # Debian builds Prometheus without Kubernetes service discovery: check the rest of the job (relabelling
    # included) with a static target in its place.
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:9100"]}]
    config["rule_files"] = [str(rules)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_dashboard_ships_as_a_labelled_configmap() -> None:
    docs = render(None)
    cm = by_kind(docs, "ConfigMap")["rrp-rallyrobopilot-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["rallyrobopilot.json"])
    assert dashboard["uid"] == "rallyrobopilot"
    assert all(t["expr"] for p in dashboard["panels"] for t in p["targets"])


def test_chart_tests_check_every_service_health() -> None:
    docs = render(None)
    tests = [d for d in docs if d["kind"] == "Pod"]
    assert {t["metadata"]["annotations"]["helm.sh/hook"] for t in tests} == {"test"}
    checked = {t["spec"]["containers"][0]["args"][1].split(":")[0] for t in tests}
    assert checked == {"rrp-rallyrobopilot-game-server", "rrp-rallyrobopilot-scheduler", "rrp-rallyrobopilot-collector"}


# -- TLS on every gRPC port ---------------------------------------------------------------------------------------

TLS_SERVERS = {"game-server", "scheduler", "collector", "auth-proxy"}  # containers serving a gRPC port of the mesh
TLS_CLIENTS = {"game-server", "scheduler", "autopilot", "deployer", "evolve", "collect", "deploy-model", "health"}


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_tls_on_mounts_the_secret_into_every_grpc_server_and_client_with_their_flags() -> None:
    docs = render({**(values("production") or {}), "tls": TLS_ON})
    seen: set[str] = set()
    for _, pod in workloads(docs):
        spec = pod["spec"]
        for c in containers(pod):
            args = [str(a) for a in c.get("args", [])]
            name = c["name"]
            server, client = name in TLS_SERVERS, name in TLS_CLIENTS
            if server:
                assert _flag(args, "--tls-cert") == f"{TLS_DIR}/tls.crt", name
                assert _flag(args, "--tls-key") == f"{TLS_DIR}/tls.key", name
                assert _flag(args, "--tls-client-ca") == f"{TLS_DIR}/ca.crt", name  # mutual
            if client:
                assert _flag(args, "--tls-ca") == f"{TLS_DIR}/ca.crt", name
                assert _flag(args, "--tls-client-cert") == f"{TLS_DIR}/tls.crt", name
                assert _flag(args, "--tls-client-key") == f"{TLS_DIR}/tls.key", name
            if server or client:
                seen.add(name)
                assert mounts(c)["tls"] == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}, name
                (volume,) = [v for v in spec["volumes"] if v["name"] == "tls"]
                assert volume["secret"]["secretName"] == "rrp-tls"
                assert {i["key"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
            else:  # Redis, TorchServe itself (loopback), the training Job, Jaeger: no TLS files
                assert not any(a.startswith("--tls") for a in args) and "tls" not in mounts(c), name
            # The kubelet's gRPC probe speaks plaintext: with TLS, the probes run the health check over TLS.
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in c:
                    assert "grpc" not in c[probe], (name, probe)
                    if server:
                        command = c[probe]["exec"]["command"]
                        assert _flag(command, "--tls-ca") == f"{TLS_DIR}/ca.crt", (name, probe)
                        assert _flag(command, "--tls-client-cert") == f"{TLS_DIR}/tls.crt", (name, probe)
    assert seen == TLS_SERVERS | TLS_CLIENTS
    game = container(pod_spec(docs, "Deployment", "rrp-rallyrobopilot-game-server"), "game-server")
    readiness = game["readinessProbe"]["exec"]["command"]
    # The pod's own port on loopback, its certificate checked for its Service's name, the game service asked.
    assert _flag(readiness, "--address") == "127.0.0.1:50051"
    assert _flag(readiness, "--tls-server-name") == "rrp-rallyrobopilot-game-server"
    assert _flag(readiness, "--service") == "rallyrobopilot.v1.GameService"


def test_tls_off_renders_no_tls_flag_or_mount() -> None:
    for vals in (values("default"), {**(values("production") or {}), "tls": {**TLS_ON, "enabled": False}}):
        for _, pod in workloads(render(vals)):
            assert all(v["name"] != "tls" for v in pod["spec"].get("volumes", []))
            for c in containers(pod):
                assert not any(str(a).startswith("--tls") for a in c.get("args", [])), c["name"]


def test_tls_one_server_name_and_server_only_tls() -> None:
    docs = render({**(values("production") or {}), "tls": {**TLS_ON, "mutual": False, "serverName": "rrp.mesh"}})
    scheduler = container(pod_spec(docs, "Deployment", "rrp-rallyrobopilot-scheduler"), "scheduler")
    args = [str(a) for a in scheduler["args"]]
    assert _flag(args, "--tls-server-name") == "rrp.mesh" and "--tls-client-ca" not in args
    assert "--tls-client-cert" not in args and _flag(args, "--tls-cert") == f"{TLS_DIR}/tls.crt"
