"""Benchmark: collector ingest from 4 concurrent streams of 128x96 frames, beside redis-benchmark's XADD rate.

redis-benchmark runs against the same private redis-server, with the same payload size (one serialised
FrameRecord) and the same fsync policy, in the same run; the target is 70% of its `-c 4` XADD rate.
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image

from collector.client import RunProducer
from collector.store import FrameStore, RedisConfig, stream_id
from plumbing.procs import ServiceProcess, start_service
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1.collector_pb2 import FrameRecord, ImageEncoding, RunEnd, RunSource, RunStart

W, H = 128, 96
STREAMS = 4
TARGET_RATIO = 0.70  # of redis-benchmark -c 4 XADD, same payload and fsync policy
ROUNDS = 3  # RAW: redis-benchmark, then the collector, this many times; the medians are compared
RSS_LIMIT_MB = 300.0


def real_frames(n: int) -> tuple[list[np.ndarray], str]:
    """Frames of the track scene when the renderer can run here, else synthetic ones with similar content."""
    try:
        from game_server.core.state import CarState, SimState
        from game_server.core.tracks import load_track
        from game_server.render import FrameSpec, shared_renderer
    except ImportError:
        return synthetic_frames(n), "synthetic"
    track = load_track("kidney")
    renderer = shared_renderer()
    spec = FrameSpec(width=W, height=H)
    frames = []
    for i in range(n + 1):
        k = int(i * track.n_points / n) % track.n_points
        heading = math.atan2(float(track.tangent[k, 1]), float(track.tangent[k, 0]))
        state = SimState(
            tick=i, car=CarState(float(track.centerline[k, 0]), float(track.centerline[k, 1]), heading, 20.0)
        )
        frames.append(renderer.render(track, state, spec))
    renderer.close()
    return frames[1:], "rendered kidney track"  # the first frame after a scene change can be empty


def synthetic_frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    sky = np.stack([x * 0 + 120, y + 140, x * 0 + 230], axis=-1)
    ground = np.stack([x * 0 + 60, 90 + (x + y) % 7, x * 0 + 50], axis=-1)
    base = np.where((y < H // 2)[..., None], sky, ground)
    return [np.clip(base + rng.integers(-4, 5, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def encode(frame: np.ndarray, encoding: ImageEncoding) -> bytes:
    if encoding == ImageEncoding.IMAGE_ENCODING_RAW_RGB:
        return np.ascontiguousarray(frame, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    if encoding == ImageEncoding.IMAGE_ENCODING_PNG:
        Image.fromarray(frame).save(buf, format="PNG")
    else:
        Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def run_start(run_id: str, encoding: ImageEncoding) -> RunStart:
    return RunStart(
        run_id=run_id,
        track="kidney",
        source=RunSource.RUN_SOURCE_DRIVER,
        width_px=W,
        height_px=H,
        encoding=encoding,
        jpeg_quality=90 if encoding == ImageEncoding.IMAGE_ENCODING_JPEG else 0,
    )


def records(run_id: str, images: list[bytes], frames: int) -> list[FrameRecord]:
    return [
        FrameRecord(
            run_id=run_id, tick=t, image=images[t % len(images)], applied_mask=1, label_mask=1, rays_m=[10.0] * 15
        )
        for t in range(frames)
    ]


def produce_concurrently(address: str, runs: dict[str, list[FrameRecord]], encoding: ImageEncoding) -> float:
    """Streams every run at once, one producer thread each; returns the wall time until all are stored."""
    errors: list[BaseException] = []

    def go(run_id: str, recs: list[FrameRecord]) -> None:
        try:
            with RunProducer(address, run_start(run_id, encoding), timeout_s=60.0) as producer:
                for rec in recs:
                    producer.send(rec)
                producer.finish(RunEnd(finished=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=item) for item in runs.items()]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - began


def verify(store: FrameStore, runs: dict[str, list[FrameRecord]]) -> tuple[int, int]:
    """Lost and duplicated frames, from Redis: a run is exact when it holds ticks 0..n-1, each once."""
    lost = duplicated = 0
    for run_id, recs in runs.items():
        key = f"{store.prefix}run:{run_id}:frames"
        count = store.frame_count(run_id)
        first = cast(list[tuple[bytes, object]], store.r.xrange(key, count=1))
        last = cast(list[tuple[bytes, object]], store.r.xrevrange(key, count=1))
        ids_exact = bool(first) and first[0][0] == b"1-0" and last[0][0] == stream_id(len(recs) - 1).encode()
        if count == len(recs) and ids_exact:  # increasing IDs from tick 0 to n-1 with n entries: each once
            continue
        ticks = [r.tick for r in store.iter_frames(run_id)]
        lost += len(set(range(len(recs))) - set(ticks))
        duplicated += len(ticks) - len(set(ticks))
    return lost, duplicated


def xadd_baseline(store: FrameStore, recs: list[FrameRecord]) -> float:
    """The same records written one XADD per round trip from one redis-py connection: frames per second."""
    key = f"{store.prefix}baseline:frames"
    store.r.delete(key)
    payloads = [r.SerializeToString() for r in recs]
    began = time.perf_counter()
    for rec, payload in zip(recs, payloads, strict=True):
        store.r.xadd(key, {"pb": payload}, id=stream_id(rec.tick))
    rate = len(recs) / (time.perf_counter() - began)
    store.r.delete(key)
    return rate


def redis_benchmark(redis_server: LocalRedis, payload_bytes: int, requests: int, pipeline: int) -> float:
    """`redis-benchmark -c 4` XADD of a payload_bytes field into one stream: requests per second."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark is not installed (apt-get install redis-tools)")
    key = "rrp:redis-benchmark:frames"
    cmd = [exe, "-h", "127.0.0.1", "-p", str(redis_server.port), "-c", str(STREAMS), "-n", str(requests)]
    cmd += ["-P", str(pipeline), "--csv", "XADD", key, "*", "pb", "x" * payload_bytes]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    redis_server.client().delete(key)
    # CSV: a header line, then "command","rps",...: the command echoes the payload, so read from the right.
    return float(out.strip().splitlines()[-1].rsplit('","', 7)[1].strip('"'))


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kb) / 1024


def slowed_redis_phase(
    collector: ServiceProcess, redis_server: LocalRedis, runs: dict[str, list[FrameRecord]]
) -> tuple[float, float]:
    """Ingests while Redis refuses writes 80% of the time (CLIENT PAUSE WRITE): returns frames/s and peak RSS."""
    stop = threading.Event()
    pauser = redis_server.client()

    def pause_loop() -> None:
        while not stop.is_set():
            pauser.execute_command("CLIENT", "PAUSE", 200, "WRITE")
            time.sleep(0.25)

    thread = threading.Thread(target=pause_loop, daemon=True)
    thread.start()
    try:
        wall = produce_concurrently(collector.address, runs, ImageEncoding.IMAGE_ENCODING_RAW_RGB)
    finally:
        stop.set()
        thread.join()
        pauser.execute_command("CLIENT", "UNPAUSE")
    frames = sum(len(r) for r in runs.values())
    return frames / wall, peak_rss_mb(collector.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer frames, for CI")
    parser.add_argument("--raw-always-only", action="store_true", help="only RAW frames with fsync always")
    args = parser.parse_args()
    per_stream = 1500 if args.quick else 6000
    slow_per_stream = 500 if args.quick else 2000

    frames, origin = real_frames(16)
    sizes = {
        name: float(np.mean([len(encode(f, enc)) for f in frames]))
        for name, enc in (
            ("RAW", ImageEncoding.IMAGE_ENCODING_RAW_RGB),
            ("PNG", ImageEncoding.IMAGE_ENCODING_PNG),
            ("JPEG q90", ImageEncoding.IMAGE_ENCODING_JPEG),
        )
    }
    raw = [encode(f, ImageEncoding.IMAGE_ENCODING_RAW_RGB) for f in frames]
    png = [encode(f, ImageEncoding.IMAGE_ENCODING_PNG) for f in frames]
    record_bytes = len(records("size", raw, 1)[0].SerializeToString())

    results = []
    references: dict[str, tuple[float, float, float]] = {}  # fsync -> redis-benchmark, pipelined 8, redis-py
    slow = None
    with tempfile.TemporaryDirectory() as tmp:
        for fsync in ("always",) if args.raw_always_only else ("always", "everysec"):
            with LocalRedis(Path(tmp) / fsync, appendfsync=fsync) as redis_server:
                store = FrameStore.connect(RedisConfig(url=redis_server.url))
                collector = start_service(
                    ["--log-level", "WARNING", "collector", "--port", "0", "--redis", redis_server.url]
                )
                try:
                    phases = [("RAW", ImageEncoding.IMAGE_ENCODING_RAW_RGB, raw)]
                    if fsync == "always" and not args.raw_always_only:
                        phases.append(("PNG", ImageEncoding.IMAGE_ENCODING_PNG, png))
                    bench_rates: list[float] = []
                    for name, encoding, images in phases:
                        warm = {f"warm-{name}-{i}": records(f"warm-{name}-{i}", images, 100) for i in range(STREAMS)}
                        produce_concurrently(collector.address, warm, encoding)  # connections and pools up
                        # RAW: redis-benchmark and the collector take turns, so that both see the same load.
                        rates, mbs, lost, duplicated = [], [], 0, 0
                        for round_ in range(ROUNDS if name == "RAW" else 1):
                            if name == "RAW":
                                bench_rates.append(redis_benchmark(redis_server, record_bytes, 2 * per_stream, 1))
                            runs = {
                                f"bench-{name}-{round_}-{i}": records(f"bench-{name}-{round_}-{i}", images, per_stream)
                                for i in range(STREAMS)
                            }
                            wall = produce_concurrently(collector.address, runs, encoding)
                            rates.append(STREAMS * per_stream / wall)
                            mbs.append(sum(len(r.image) for recs in runs.values() for r in recs) / 1e6 / wall)
                            round_lost, round_duplicated = verify(store, runs)
                            lost, duplicated = lost + round_lost, duplicated + round_duplicated
                        results.append(
                            (name, fsync, statistics.median(rates), statistics.median(mbs), lost, duplicated)
                        )
                    references[fsync] = (
                        statistics.median(bench_rates),
                        redis_benchmark(redis_server, record_bytes, 2 * per_stream, 8),
                        xadd_baseline(store, records("baseline", raw, per_stream // 2)),
                    )
                    if fsync == "always" and not args.raw_always_only:
                        rss_before = peak_rss_mb(collector.pid)
                        slow_runs = {f"slow-{i}": records(f"slow-{i}", raw, slow_per_stream) for i in range(STREAMS)}
                        slow_fps, rss_peak = slowed_redis_phase(collector, redis_server, slow_runs)
                        slow = (slow_fps, rss_before, rss_peak, *verify(store, slow_runs))
                finally:
                    collector.stop()

    print(f"collector ingest, {STREAMS} concurrent streams of {W}x{H} frames ({origin}), Redis AOF on local disk")
    print(f"payload: one serialised FrameRecord, {record_bytes:,} bytes with a RAW image; RAW figures: medians of")
    print(f"{ROUNDS} rounds of redis-benchmark then the collector, taking turns so that both see the same load")
    for fsync, (bench, bench_p8, redis_py) in references.items():
        print(f"  fsync {fsync}:")
        print(f"    {f'redis-benchmark -c {STREAMS} XADD, same payload':<52s} {bench:7.0f} requests/s")
        print(f"    {f'redis-benchmark -c {STREAMS} -P 8 XADD, same payload':<52s} {bench_p8:7.0f} requests/s")
        print(f"    {'raw redis-py XADD loop, 1 connection':<52s} {redis_py:7.0f} frames/s")
        for name, fsync_, fps, mbps, lost, duplicated in results:
            if fsync_ != fsync:
                continue
            verdict = f"lost {lost}  duplicated {duplicated}"
            if name == "RAW" and fsync == "always":  # the target's setting: every write fsynced
                ok = fps >= TARGET_RATIO * bench and lost == duplicated == 0
                verdict += f"  {fps / bench:.2f}x redis-benchmark (target >= {TARGET_RATIO:.2f}x, exact): "
                verdict += "OK" if ok else "MISSED"
            elif name == "RAW":
                verdict += f"  {fps / bench:.2f}x redis-benchmark (no target without fsync on every write)"
            line = f"    collector, {name}, {STREAMS} streams"
            print(f"{line:<56s} {fps:7.0f} frames/s {mbps:6.1f} MB/s  {verdict}")
    print("bytes per image: " + ", ".join(f"{k} {v:,.0f}" for k, v in sizes.items()))
    if slow is not None:
        slow_fps, rss_before, rss_peak, slow_lost, slow_dup = slow
        verdict = "OK" if rss_peak < RSS_LIMIT_MB and slow_lost == slow_dup == 0 else "MISSED"
        print(
            f"Redis slowed (CLIENT PAUSE WRITE 200 ms of every 250 ms): {slow_fps:.0f} frames/s, collector peak RSS"
            f" {rss_peak:.0f} MB (peak before this phase {rss_before:.0f} MB), lost {slow_lost}, duplicated {slow_dup};"
            f" target < {RSS_LIMIT_MB:.0f} MB: {verdict}"
        )


if __name__ == "__main__":
    main()
