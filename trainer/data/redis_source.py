"""Reads recorded runs from Redis as laid out in docs/redis-schema.md: protobuf values only, never pickle."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis

from plumbing.errors import NotFound
from rallyrobopilot.v1 import collector_pb2 as pb
from trainer.data.records import DataError, RunInfo, Sample, run_info_from_start, sample_from_record

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 256  # stream entries per XRANGE: ~10 MB of 128x96 raw frames, bounded memory per call


class RedisRuns:
    """The runs a collector stored, read page by page so a long run never sits in one Redis reply."""

    def __init__(
        self,
        client: str | redis.Redis,
        prefix: str = "rrp:",
        page_size: int = DEFAULT_PAGE_SIZE,
        password: str | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if isinstance(client, str):
            # A password from the environment or a file is passed separately, so it need not sit in the URL.
            extra = {} if password is None else {"password": password}
            client = redis.Redis.from_url(client, **extra)
        # redis-py types replies as unions over decode_responses and async clients; this client returns bytes.
        self._redis: Any = client
        self._prefix = prefix
        self._page_size = page_size

    def _meta_key(self, run_id: str) -> str:
        return f"{self._prefix}run:{run_id}:meta"

    def _frames_key(self, run_id: str) -> str:
        return f"{self._prefix}run:{run_id}:frames"

    def _info(self, run_id: str, meta: dict[bytes, bytes], score: float | None) -> RunInfo | None:
        raw_start = meta.get(b"start")
        if raw_start is None:
            return None
        start = pb.RunStart.FromString(raw_start)
        if start.run_id != run_id:
            raise DataError(f"run {run_id!r}: its meta holds the RunStart of {start.run_id!r}")
        raw_end = meta.get(b"end")
        end = None if raw_end is None else pb.RunEnd.FromString(raw_end)
        started = meta.get(b"started_unix_s")
        started_unix_s = float(started) if started is not None else (score or 0.0)
        return run_info_from_start(start, started_unix_s, end)

    def runs(self, track: str | None = None) -> list[RunInfo]:
        """Runs ordered by start time then id; a run indexed before its meta was written is skipped."""
        if track is None:
            index = self._redis.zrange(f"{self._prefix}runs", 0, -1, withscores=True)
            indexed: list[tuple[str, float | None]] = [(m.decode(), float(s)) for m, s in index]
        else:
            indexed = [(m.decode(), None) for m in self._redis.smembers(f"{self._prefix}track:{track}:runs")]
        pipe = self._redis.pipeline(transaction=False)
        for run_id, _ in indexed:
            pipe.hgetall(self._meta_key(run_id))
        infos = []
        for (run_id, score), meta in zip(indexed, pipe.execute(), strict=True):
            info = self._info(run_id, meta, score)
            if info is None:
                log.warning("run %s is indexed but has no RunStart yet; skipped", run_id)
            elif track is None or info.track == track:
                infos.append(info)
        return sorted(infos, key=lambda r: (r.started_unix_s, r.run_id))

    def run(self, run_id: str) -> RunInfo:
        info = self._info(run_id, self._redis.hgetall(self._meta_key(run_id)), None)
        if info is None:
            raise NotFound(f"run {run_id!r} is not stored")
        return info

    def frame_count(self, run_id: str) -> int:
        return int(self._redis.xlen(self._frames_key(run_id)))

    def records(self, run_id: str) -> Iterator[pb.FrameRecord]:
        """The run's records in stream order, which the schema makes tick order (entry ID = tick + 1)."""
        key = self._frames_key(run_id)
        low = "-"
        while True:
            page = self._redis.xrange(key, min=low, max="+", count=self._page_size)
            for entry_id, fields in page:
                raw = fields.get(b"pb")
                if raw is None:
                    raise DataError(f"run {run_id!r}: stream entry {entry_id.decode()} has no 'pb' field")
                yield pb.FrameRecord.FromString(raw)
            if len(page) < self._page_size:
                return
            low = "(" + page[-1][0].decode()  # exclusive start: the entry after the last one read

    def samples(self, run_id: str) -> Iterator[Sample]:
        info = self.run(run_id)
        for record in self.records(run_id):
            yield sample_from_record(record, info)
