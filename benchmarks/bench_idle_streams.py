"""A server with 200 idle streams open: health p99 against the 100 ms target, beside the same calls with none open.

Game server (200 idle Drive streams) and collector (200 idle Ingest streams), each a real process on a free port.
The tests check only that idle streams starve nothing (`tests/latency.py`); the absolute figure is this one's,
to be read on an idle machine."""

from __future__ import annotations

import contextlib
import queue
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plumbing.procs import start_service
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1 import collector_pb2, collector_pb2_grpc, game_pb2, game_pb2_grpc

TARGET_MS = 100.0
STREAMS = 200


def times_ms(fn: Callable[[], object], n: int = 200) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)


def p99(values: list[float]) -> float:
    return values[int(0.99 * (len(values) - 1))]


@contextlib.contextmanager
def idle_streams(open_one: Callable[[Iterator[Any]], Any], first: Callable[[], Any]) -> Iterator[None]:
    inboxes: list[queue.Queue[Any]] = []
    calls = []
    for _ in range(STREAMS):
        inbox: queue.Queue[Any] = queue.Queue()
        inbox.put(first())

        def requests(inbox: queue.Queue[Any] = inbox) -> Iterator[Any]:
            while (item := inbox.get()) is not None:
                yield item

        inboxes.append(inbox)
        calls.append(open_one(requests()))
    try:
        time.sleep(1.0)  # every stream reached the server and waits there
        yield
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for call in calls:
            call.cancel()


def measure(name: str, channel: grpc.Channel, streams: contextlib.AbstractContextManager[None]) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    def check() -> None:
        health.Check(health_pb2.HealthCheckRequest(), timeout=2)

    idle = times_ms(check)
    with streams:
        loaded = times_ms(check)
    verdict = "met" if p99(loaded) <= TARGET_MS else "NOT met"
    print(
        f"{name:<12} health p50/p99 {statistics.median(loaded):6.2f} / {p99(loaded):6.2f} ms with {STREAMS} idle "
        f"streams, {statistics.median(idle):6.2f} / {p99(idle):6.2f} ms with none (target p99 <= {TARGET_MS:.0f} ms: "
        f"{verdict})"
    )


def main() -> None:
    with contextlib.ExitStack() as stack:
        game = start_service(["game-server", "--port", "0", "--max-sessions", str(STREAMS)])
        stack.callback(game.stop)
        channel = stack.enter_context(grpc.insecure_channel(game.address))
        stub = game_pb2_grpc.GameServiceStub(channel)
        sessions = [
            stub.CreateSession(game_pb2.CreateSessionRequest(track="oval"), timeout=10).session_id
            for _ in range(STREAMS)
        ]
        it = iter(sessions)
        measure(
            "game server",
            channel,
            idle_streams(
                lambda reqs: stub.Drive(reqs),
                lambda: game_pb2.DriveRequest(
                    start=game_pb2.DriveStart(session_id=next(it), mode=game_pb2.DRIVE_MODE_LOCKSTEP)
                ),
            ),
        )
        redis = stack.enter_context(LocalRedis(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        collector = start_service(["collector", "--port", "0"], env={"RRP_REDIS_URL": redis.url})
        stack.callback(collector.stop)
        cchannel = stack.enter_context(grpc.insecure_channel(collector.address))
        cstub = collector_pb2_grpc.CollectorServiceStub(cchannel)
        runs = iter(range(STREAMS))
        measure(
            "collector",
            cchannel,
            idle_streams(
                lambda reqs: cstub.Ingest(reqs),
                lambda: collector_pb2.IngestRequest(
                    start=collector_pb2.RunStart(
                        run_id=f"idle-{next(runs)}",
                        track="oval",
                        source=collector_pb2.RUN_SOURCE_DRIVER,
                        width_px=4,
                        height_px=4,
                        encoding=collector_pb2.IMAGE_ENCODING_RAW_RGB,
                    )
                ),
            ),
        )


if __name__ == "__main__":
    main()
