"""CollectorService over gRPC: converts messages to ingest and store calls; errors carry their status codes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from collector.ingest import Ingestor
from collector.store import FrameStore, RunInfo
from rallyrobopilot.v1 import collector_pb2, collector_pb2_grpc


def run_summary(info: RunInfo) -> collector_pb2.RunSummary:
    summary = collector_pb2.RunSummary(
        start=info.start, stored_frames=info.stored_frames, started_unix_s=info.started_unix_s
    )
    if info.end is not None:
        summary.end.CopyFrom(info.end)
    return summary


class CollectorServicer(collector_pb2_grpc.CollectorServiceServicer):
    def __init__(self, ingestor: Ingestor, store: FrameStore, max_message_bytes: int = 4 * 1024 * 1024) -> None:
        self.ingestor = ingestor
        self.store = store
        # Room kept for the reply's own framing: a reply never exceeds the message limit.
        self.max_reply_bytes = max_message_bytes - 64 * 1024

    def Ingest(
        self, request_iterator: Iterator[collector_pb2.IngestRequest], context: grpc.ServicerContext
    ) -> Iterator[collector_pb2.IngestResponse]:
        yield from self.ingestor.run(request_iterator, context.is_active)

    def ListRuns(
        self, request: collector_pb2.ListRunsRequest, context: grpc.ServicerContext
    ) -> collector_pb2.ListRunsResponse:
        reply = collector_pb2.ListRunsResponse()
        used = 0
        for run in self.store.list_runs(request.track, request.limit):
            summary = run_summary(run)
            used += summary.ByteSize() + 8
            if used > self.max_reply_bytes:
                break  # the newest runs that fit; ask by track, or with a smaller limit, for the rest
            reply.runs.append(summary)
        return reply

    def GetRun(
        self, request: collector_pb2.GetRunRequest, context: grpc.ServicerContext
    ) -> collector_pb2.GetRunResponse:
        return collector_pb2.GetRunResponse(run=run_summary(self.store.get_run(request.run_id)))
