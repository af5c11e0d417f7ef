"""The collector's Prometheus metrics (`rrp_collector_*`); served by `--metrics-port`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from plumbing.metrics import LATENCY_BUCKETS_S, LiveGauges

FRAMES_STORED = Counter("rrp_collector_frames_stored_total", "frames newly stored in Redis")
BYTES_STORED = Counter("rrp_collector_bytes_stored_total", "bytes of the frame records newly stored in Redis")
DUPLICATES = Counter("rrp_collector_duplicates_total", "frames resent that Redis already held (not stored again)")
ACKS = Counter("rrp_collector_acks_total", "acknowledgements sent to producers")
ERRORS = Counter("rrp_collector_errors_total", "Ingest streams ended by an error, by status code", ["code"])
STREAMS = Gauge("rrp_collector_streams_open", "Ingest streams open")
REDIS_WRITE = Histogram(
    "rrp_collector_redis_write_seconds", "one batch of frames written to Redis (one round trip)",
    buckets=LATENCY_BUCKETS_S,
)  # fmt: skip
# The collector's lag: bytes read from producers but not yet in Redis, against the limit that pauses reading.
INGESTORS = LiveGauges(
    {
        "rrp_collector_inflight_bytes": ("bytes read but not yet stored", lambda ingestor: ingestor.budget.used),
        "rrp_collector_inflight_limit_bytes": (
            "bytes read but not stored at which reading pauses",
            lambda ingestor: ingestor.budget.limit,
        ),
    }
)
