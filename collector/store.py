"""Runs and frames in Redis Streams (schema in docs/redis-schema.md), with Redis errors turned into domain errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from plumbing.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable, quote
from plumbing.settings import setting
from rallyrobopilot.v1.collector_pb2 import FrameRecord, ImageEncoding, RunEnd, RunSource, RunStart

log = logging.getLogger(__name__)

MAX_LIST_RUNS = 10_000
DEFAULT_LIST_RUNS = 1_000
MAX_NAME_CHARS = 256  # no run id or track name is longer (collector.ingest refuses them)
_DUPLICATE_ID = "equal or smaller than the target stream top item"


@dataclass(frozen=True)
class RedisConfig:
    """Where Redis is and how to log in; secrets come from the environment or files, filled in by main()."""

    url: str = setting(
        "", "Redis URL, redis:// or rediss:// for TLS; none: a private redis-server", flag="redis", env="redis_url"
    )
    username: str | None = setting(None, "Redis ACL user")
    password: str | None = field(default=None, repr=False, metadata={"cli": False, "env": "redis_password"})
    # Read when the client is made, so a rotated secret is picked up.
    password_file: Path | None = setting(None, "file holding the Redis password (or set RRP_REDIS_PASSWORD)")
    tls_ca_file: Path | None = setting(None, "CA bundle for rediss://", flag="redis-tls-ca", env="redis_tls_ca")
    tls_cert_file: Path | None = setting(None, "client certificate", flag="redis-tls-cert", env="redis_tls_cert")
    tls_key_file: Path | None = setting(None, "client key", flag="redis-tls-key", env="redis_tls_key")
    prefix: str = setting("rrp:", "key prefix of every stream and set")
    connect_timeout_s: float = setting(2.0, "seconds to connect to Redis")
    socket_timeout_s: float = setting(10.0, "seconds one Redis command may take")
    max_connections: int = setting(64, "Redis connections at most")

    @property
    def safe_url(self) -> str:
        """The URL without any password it may carry, for logs and error messages."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise Unavailable(f"cannot read the Redis password file {self.password_file}: {exc}") from exc
        return self.password

    def client(self) -> redis.Redis:
        """A client whose pool reconnects by itself: a dead connection is dropped and retried, never reused."""
        kwargs: dict[str, object] = {
            "socket_connect_timeout": self.connect_timeout_s,
            "socket_timeout": self.socket_timeout_s,
            "socket_keepalive": True,
            "health_check_interval": 15,
            "max_connections": self.max_connections,
            # A restarted Redis leaves every pooled socket dead: retry once or twice on a fresh connection.
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        }
        password = self.resolved_password()
        if password is not None:
            kwargs["password"] = password
        if self.username is not None:
            kwargs["username"] = self.username
        if self.url.startswith("rediss://"):
            for key, path in (
                ("ssl_ca_certs", self.tls_ca_file),
                ("ssl_certfile", self.tls_cert_file),
                ("ssl_keyfile", self.tls_key_file),
            ):
                if path is not None:
                    kwargs[key] = str(path)
        elif any(p is not None for p in (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)):
            raise ValueError("TLS files were given but the Redis URL is not rediss://")
        return redis.Redis.from_url(self.url, **kwargs)


@dataclass(frozen=True)
class RunInfo:
    """What Redis holds about one run."""

    start: RunStart
    stored_frames: int
    started_unix_s: float
    end: RunEnd | None


@dataclass(frozen=True)
class AppendResult:
    """Outcome of one batch: records newly stored, records Redis already held, the last tick of the batch."""

    stored: int
    duplicates: int
    last_tick: int
    stored_frames: int  # XLEN after the batch: every frame of the run, across reconnections
    stored_bytes: int = 0  # serialised size of the records newly stored


def stream_id(tick: int) -> str:
    """Entry ID of a tick; +1 because Redis refuses the ID 0-0."""
    return f"{tick + 1}-0"


class FrameStore:
    """Reads and writes the collector's keys; every method turns Redis failures into `plumbing.errors`."""

    def __init__(self, client: redis.Redis, prefix: str = "rrp:", where: str = "Redis") -> None:
        self.r = client
        self.prefix = prefix
        self.where = where

    @classmethod
    def connect(cls, config: RedisConfig) -> FrameStore:
        return cls(config.client(), config.prefix, config.safe_url)

    # keys
    def _runs(self) -> str:
        return f"{self.prefix}runs"

    def _track_runs(self, track: str) -> str:
        return f"{self.prefix}track:{track}:runs"

    def _meta(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:meta"

    def _frames(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:frames"

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError) as exc:
            raise Unavailable(f"Redis at {self.where} refused the collector's credentials ({what}): {exc}") from exc
        except redis.exceptions.NoPermissionError as exc:
            raise Unavailable(f"Redis at {self.where} denies the collector's user ({what}): {exc}") from exc
        except redis.exceptions.BusyLoadingError as exc:
            raise Unavailable(f"Redis at {self.where} is loading its data ({what}); retry shortly") from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(f"Redis at {self.where} is unreachable ({what}): {exc}") from exc
        except redis.ResponseError as exc:
            domain = _classified(exc, self.where, what)
            if domain is None:
                raise  # WRONGTYPE and the like: a bug or a foreign key, reported as INTERNAL
            raise domain from exc

    def ping(self) -> None:
        with self._translated("ping"):
            self.r.ping()

    def start_run(self, start: RunStart, now_unix_s: float | None = None) -> int:
        """Records the run's metadata once; a producer reconnecting resends the same start, which is accepted.

        Returns the frames Redis already holds for the run (0 for a new run).
        """
        meta = self._meta(start.run_id)
        now = time.time() if now_unix_s is None else now_unix_s
        with self._translated("start_run"):
            existing = self.r.hget(meta, "start")
            if existing is not None:
                if RunStart.FromString(cast(bytes, existing)) != start:
                    raise FailedPrecondition(
                        f"run {start.run_id!r} already exists with different metadata; choose a new run_id"
                    )
                return int(self.r.xlen(self._frames(start.run_id)))
            pipe = self.r.pipeline(transaction=True)
            pipe.hsetnx(meta, "start", start.SerializeToString())
            pipe.hsetnx(meta, "started_unix_s", repr(now))
            pipe.hset(
                meta,
                mapping={
                    "track": start.track,
                    "source": RunSource.Name(start.source),
                    "encoding": ImageEncoding.Name(start.encoding),
                    "width_px": start.width_px,
                    "height_px": start.height_px,
                    "driver_id": start.driver_id,
                },
            )
            pipe.zadd(self._runs(), {start.run_id: now}, nx=True)
            pipe.sadd(self._track_runs(start.track), start.run_id)
            pipe.xlen(self._frames(start.run_id))
            results = pipe.execute()
        return int(results[-1])

    def append(self, run_id: str, records: list[FrameRecord]) -> AppendResult:
        """Stores records (in increasing tick order) in one round trip; those Redis already holds are skipped.

        Idempotent on (run_id, tick): the entry ID comes from the tick and Redis refuses an ID that is not
        above the stream's last one, so a resent record is counted as a duplicate instead of stored twice.

        The batch is one MULTI/EXEC transaction, for speed and atomicity: Redis applies and appends the whole
        batch to its append-only file at EXEC, so with `appendfsync always` a batch costs one fsync instead of
        one per record (or per event-loop turn), and a batch is stored whole or not at all (a refused batch,
        out of memory, stores nothing; a batch resent after a lost reply comes back as duplicates).
        """
        if not records:
            raise ValueError("append needs at least one record")
        key = self._frames(run_id)
        with self._translated("append"):
            pipe = self.r.pipeline(transaction=True)
            sizes = []
            for record in records:
                data = record.SerializeToString()
                sizes.append(len(data))
                pipe.xadd(key, {"pb": data}, id=stream_id(record.tick))
            pipe.xlen(key)
            results = pipe.execute(raise_on_error=False)
            stored = stored_bytes = 0
            refused: list[int] = []
            for record, size, result in zip(records, sizes, results, strict=False):
                if isinstance(result, redis.ResponseError) and _DUPLICATE_ID in str(result):
                    refused.append(record.tick)
                elif isinstance(result, Exception):
                    raise result  # classified by _translated: OOM, read-only, ...
                else:
                    stored += 1
                    stored_bytes += size
            stored_frames = int(results[-1])
            if refused:
                self._require_stored(run_id, refused)
        return AppendResult(stored, len(refused), records[-1].tick, int(stored_frames), stored_bytes)

    def _require_stored(self, run_id: str, ticks: list[int]) -> None:
        """Redis refuses an entry at or below the stream's last one: a duplicate only if that tick is there.

        A record for a tick the run skipped (below its last stored tick, but never stored) cannot be inserted
        into a Redis stream; it is refused, never acknowledged as if stored."""
        key = self._frames(run_id)
        pipe = self.r.pipeline(transaction=False)
        for tick in ticks:
            pipe.xrange(key, min=stream_id(tick), max=stream_id(tick), count=1)
        missing = [tick for tick, found in zip(ticks, pipe.execute(), strict=True) if not found]
        if missing:
            last = cast(list[tuple[bytes, Any]], self.r.xrevrange(key, count=1))
            top = int(_text(last[0][0]).split("-")[0]) - 1 if last else -1
            raise FailedPrecondition(
                f"run {run_id}: tick {missing[0]} was never stored and the run already holds tick {top}; "
                "a run's ticks are stored in increasing order, so a skipped tick cannot be filled in later "
                "(resend only from the tick after the last acknowledged one, or start a new run)"
            )

    def end_run(self, end: RunEnd) -> int:
        """Stores the run's end and returns the frames Redis holds for it."""
        with self._translated("end_run"):
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(self._meta(end.run_id), "end", end.SerializeToString())
            pipe.xlen(self._frames(end.run_id))
            stored = int(pipe.execute()[-1])
        if stored != end.frames:
            log.warning("run %s ended with %d frames sent but %d stored", end.run_id, end.frames, stored)
        return stored

    def frame_count(self, run_id: str) -> int:
        with self._translated("frame_count"):
            return int(self.r.xlen(self._frames(run_id)))

    def get_run(self, run_id: str) -> RunInfo:
        runs = self._load([run_id]) if 0 < len(run_id) <= MAX_NAME_CHARS else []
        if not runs:
            raise NotFound(f"no run {quote(run_id)} in Redis")
        return runs[0]

    def list_runs(self, track: str = "", limit: int = 0) -> list[RunInfo]:
        """Runs newest first, optionally of one track only."""
        limit = DEFAULT_LIST_RUNS if limit <= 0 else min(limit, MAX_LIST_RUNS)
        if len(track) > MAX_NAME_CHARS:
            return []  # no run's track is that long: ask Redis nothing
        with self._translated("list_runs"):
            if track:
                ids = [_text(m) for m in cast(set[bytes], self.r.smembers(self._track_runs(track)))]
                scores = self.r.zmscore(self._runs(), ids) if ids else []
                ranked = sorted(zip(ids, scores, strict=True), key=lambda p: -(p[1] or 0.0))
                run_ids = [run_id for run_id, _ in ranked[:limit]]
            else:
                run_ids = [_text(m) for m in cast(list[bytes], self.r.zrevrange(self._runs(), 0, limit - 1))]
        return self._load(run_ids)

    def _load(self, run_ids: list[str]) -> list[RunInfo]:
        if not run_ids:
            return []
        with self._translated("read runs"):
            pipe = self.r.pipeline(transaction=False)
            for run_id in run_ids:
                pipe.hmget(self._meta(run_id), "start", "started_unix_s", "end")
                pipe.xlen(self._frames(run_id))
            results = pipe.execute()
        runs = []
        for (start, started, end), count in zip(results[::2], results[1::2], strict=True):
            if start is None:
                continue
            runs.append(
                RunInfo(
                    start=RunStart.FromString(start),
                    stored_frames=int(count),
                    started_unix_s=float(started or 0.0),
                    end=RunEnd.FromString(end) if end is not None else None,
                )
            )
        return runs

    def iter_frames(self, run_id: str, batch: int = 256) -> Iterator[FrameRecord]:
        """Every frame of a run in tick order, read in pages of `batch` entries (for the dataset code)."""
        key = self._frames(run_id)
        low = "-"
        while True:
            with self._translated("iter_frames"):
                entries = cast(
                    list[tuple[bytes, dict[bytes, bytes]]], self.r.xrange(key, min=low, max="+", count=batch)
                )
            for _entry_id, fields in entries:
                yield FrameRecord.FromString(fields[b"pb"])
            if len(entries) < batch:
                return
            low = "(" + _text(entries[-1][0])


def _text(value: Any) -> str:
    """A Redis reply (bytes, since the client does not decode) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _classified(exc: redis.ResponseError, where: str, what: str) -> Exception | None:
    """A refusal from Redis as a domain error (out of memory is a limit; read-only means not usable), else None."""
    # A pipeline's error quotes the whole command, image bytes included: keep only Redis's own words.
    message = str(exc).rpartition("caused error: ")[2][:300]
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or message.startswith("OOM") or "maxmemory" in message:
        return ResourceExhausted(
            f"Redis is full (maxmemory reached at {where}); {what} was refused, nothing more is stored: {message}"
        )
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return Unavailable(f"Redis at {where} is a read-only replica ({what}): {message}")
    return None
