"""Traces of a GA run (issue 18): one tree per generation holding all its evaluations, and no span for polls."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from trainer.evolve import GENERATION_ATTRIBUTE, GENERATION_SPAN

BIN = Path(sys.executable).parent
GENERATIONS = 2


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    attributes: dict[str, object]


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver, as Jaeger's collector port is, keeping every span whole."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        got = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value") or "") for a in s.attributes}
                    got.append(Span(service, s.name, s.trace_id, s.span_id, s.parent_span_id, attributes))
        with self.lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


def span_table(spans: list[Span]) -> dict[str, int]:
    """Span name -> count, the figure issue 18 asks for."""
    return dict(sorted(collections.Counter(f"{s.service} {s.name}" for s in spans).items()))


def test_a_traced_ga_run_is_one_tree_per_generation_without_polls(tmp_path: Path) -> None:
    receiver = _Receiver()
    otlp = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, otlp)
    port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        args = ["evolve", "--track", "oval", "--population", "6", "--generations", str(GENERATIONS)]
        result = subprocess.run(
            [str(BIN / "rrp"), *args, "--seed", "1", "--local-servers", "2", "--out", str(tmp_path)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        # The evolve process and its servers flush their spans as they stop; the last ones may still be in transit.
        deadline = time.monotonic() + 20
        while True:
            spans = receiver.snapshot()
            if sum(s.name == GENERATION_SPAN for s in spans) > GENERATIONS or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        otlp.stop(0)
    print(json.dumps(span_table(spans), indent=1))
    history = json.loads((tmp_path / "evolve_summary.json").read_text())["history"]

    polls = [s.name for s in spans if "grpc.health" in s.name or s.name.endswith(("GetServerInfo", "GetPoolStatus"))]
    assert polls == [], f"{len(polls)} poll spans: {collections.Counter(polls)}"

    generations = {s.attributes[GENERATION_ATTRIBUTE]: s for s in spans if s.name == GENERATION_SPAN}
    assert sorted(generations) == list(range(GENERATIONS + 1)), span_table(spans)
    assert all(g.parent_id == b"" for g in generations.values()), "a generation span is not a trace's root"
    assert len({g.trace_id for g in generations.values()}) == GENERATIONS + 1, "generations share a trace"

    by_id = {s.span_id: s for s in spans}
    evaluations = [s for s in spans if "GameService/Evaluate" in s.name]
    assert {s.service for s in evaluations} == {"rrp-evolve", "game-server"}, span_table(spans)
    for generation, root in generations.items():
        inside = [s for s in evaluations if s.trace_id == root.trace_id]
        client = [s for s in inside if s.service == "rrp-evolve"]
        server = [s for s in inside if s.service == "game-server"]
        # Every generation evaluates something: its calls are all children of its span, each answered on a server.
        assert history[generation]["evaluations"] > 0 and client, f"generation {generation} has no Evaluate span"
        assert all(s.parent_id == root.span_id for s in client), "an Evaluate call is not a child of its generation"
        assert len(server) == len(client)
        assert all(by_id[s.parent_id].service == "rrp-evolve" for s in server if s.parent_id in by_id)
    # No evaluation outside a generation: every Evaluate span, client or server, is in some generation's tree.
    traces = {g.trace_id for g in generations.values()}
    strays = [s for s in evaluations if s.trace_id not in traces]
    assert strays == [], f"{len(strays)} Evaluate spans outside every generation"
