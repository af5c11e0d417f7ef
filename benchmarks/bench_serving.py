"""Serving figures side by side: in-process inference, TorchServe over gRPC (its own API and the Open
Inference Protocol), server-side batching under concurrent clients, real-time autopilot runs, TorchServe's memory.

    python benchmarks/bench_serving.py           # the full run: a 5-minute real-time race, then car counts
    python benchmarks/bench_serving.py --quick   # seconds per part
    python benchmarks/bench_serving.py --model out/run/model   # a trained model instead of a fresh one
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def latency(call: Callable[[], object], n: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def concurrent(make: Callable[[], Any], clients: int, seconds: float, frame: np.ndarray) -> dict[str, float]:
    """`clients` threads, each its own channel, calling as fast as answers come for `seconds`."""
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def run() -> None:
        client = make()
        mine = []
        for _ in range(3):
            client.infer(frame, 10.0, 10.0)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            client.infer(frame, 10.0, 10.0)
            mine.append((time.perf_counter() - t0) * 1e3)
        client.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    p50, p99 = percentiles(lat)
    return {"clients": clients, "per_s": len(lat) / wall, "p50": p50, "p99": p99}


@contextlib.contextmanager
def game_servers(n: int) -> Iterator[tuple[str, ...]]:
    from plumbing.procs import start_service

    procs = [start_service(["game-server", "--port", "0", "--max-sessions", "32"]) for _ in range(n)]
    try:
        yield tuple(p.address for p in procs)
    finally:
        for p in procs:
            p.stop()


MANY_LAPS = 10_000  # the runs end on the clock, not on a lap count


def after(seconds: float) -> threading.Event:
    """An event set `seconds` from now: a timed run ends when it is set, in the middle of a lap or not."""
    event = threading.Event()
    timer = threading.Timer(seconds, event.set)
    timer.daemon = True
    timer.start()
    return event


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds per part instead of minutes")
    parser.add_argument("--model", type=Path, help="a trained model directory (default: a fresh 128x96 model)")
    parser.add_argument("--track", default="kidney")
    parser.add_argument("--realtime-s", type=float, help="seconds of the 1-car real-time run (default 300, quick 8)")
    parser.add_argument("--cars-s", type=float, help="seconds of each car-count run (default 30, quick 6)")
    parser.add_argument("--max-cars", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write bench_serving.json here")
    args = parser.parse_args()
    import torch

    from serving.archive import ArchiveConfig, build_archive
    from serving.autopilot import AutopilotConfig, run_autopilot
    from serving.client import ModelRef, OpenInferenceClient, TorchServeClient
    from serving.inprocess import InProcessClient
    from serving.torchserve import LocalTorchServe, TorchServeConfig
    from trainer.vision.model import VisionConfig, build_model
    from trainer.vision.train import load_model, save_weights

    quick = args.quick
    realtime_s = args.realtime_s or (8.0 if quick else 300.0)
    cars_s = args.cars_s or (6.0 if quick else 30.0)
    n_lat = 200 if quick else 1000
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    if args.model is None:
        model_dir = tmp / "model"
        model_dir.mkdir()
        save_weights(build_model(VisionConfig()).eval(), model_dir / "model.safetensors")
    else:
        model_dir = args.model
    net = load_model(model_dir / "model.safetensors")
    w, h = net.config.width, net.config.height
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    results: dict[str, Any] = {
        "quick": quick,
        "load_before": load_before,
        "resolution": f"{w}x{h}",
        "max_cars": args.max_cars,
    }

    torch.set_num_threads(1)
    local = InProcessClient(net)
    results["in_process"] = percentiles(latency(lambda: local.infer(frame, 10.0, 1.0), n_lat))

    store = tmp / "store"
    single = build_archive(model_dir, "1", store, ArchiveConfig(batch_size=1))
    batched = build_archive(
        model_dir, "1", store, ArchiveConfig(name="rrp-vision-b8", batch_size=8, max_batch_delay_ms=4)
    )
    print(f"TorchServe logs in {tmp}/torchserve*/logs", flush=True)
    with LocalTorchServe(TorchServeConfig(netty_threads=4, workdir=tmp / "torchserve")) as ts:
        ts.register(single)
        ts.register(batched)
        assert ts.keys is not None
        key, address = ts.keys.inference, ts.inference_address
        one = TorchServeClient(address, ModelRef("rrp-vision"), key)
        results["torchserve_1_client"] = percentiles(latency(lambda: one.infer(frame, 10.0, 5.0), n_lat))
        one.close()
        results["batching"] = {}
        for name, label in (("rrp-vision", "batch 1"), ("rrp-vision-b8", "batch 8, 4 ms")):
            rows = []
            for clients in (1, 4, 8, 16):
                rows.append(
                    concurrent(
                        lambda name=name: TorchServeClient(address, ModelRef(name), key),
                        clients,
                        2.0 if quick else 10.0,
                        frame,
                    )
                )
            results["batching"][label] = rows
        results["memory_after_load"] = ts.memory_mb()

        # Lap after lap until the clock runs out: a trained model finishes a lap in ~20 s, the run lasts minutes.
        pilot = AutopilotConfig(
            track=args.track, mode="realtime", width=w, height=h, max_ticks=int(realtime_s * 25), stuck_ticks=0,
            laps=MANY_LAPS,
        )  # fmt: skip
        with game_servers(2) as games:
            one_car = run_autopilot(
                pilot, games[:1], lambda: TorchServeClient(address, ModelRef("rrp-vision"), key), stop=after(realtime_s)
            )
            results["realtime_1_car"] = one_car.totals()
            counts = []
            for cars in range(2, args.max_cars + 1):
                cfg = AutopilotConfig(
                    track=args.track,
                    mode="realtime",
                    width=w,
                    height=h,
                    cars=cars,
                    max_ticks=int(cars_s * 25),
                    stuck_ticks=0,
                    laps=MANY_LAPS,
                )
                client = lambda: TorchServeClient(address, ModelRef("rrp-vision-b8"), key)  # noqa: E731
                run = run_autopilot(cfg, games, client, stop=after(cars_s))
                counts.append(run.totals())
                print(
                    f"  {cars} cars: missed {run.totals()['missed_ticks']}, late {run.totals()['late_commands']}, "
                    f"fallbacks {run.totals()['fallbacks']} of {run.totals()['ticks']} ticks",
                    flush=True,
                )
                if run.totals()["missed_ticks"] > 0:
                    break
            results["car_counts"] = counts
        results["memory_after_race"] = ts.memory_mb()

    with LocalTorchServe(TorchServeConfig(open_inference=True, workdir=tmp / "torchserve-oip")) as oip:
        oip.register(single)
        assert oip.keys is not None
        client = OpenInferenceClient(oip.inference_address, ModelRef("rrp-vision"), oip.keys.inference)
        results["oip_1_client"] = percentiles(latency(lambda: client.infer(frame, 10.0, 10.0), n_lat // 4, 5))
        client.close()
    results["load_after"] = os.getloadavg()
    report(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_serving.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(r: dict[str, Any]) -> None:
    def ms(pair: tuple[float, float]) -> str:
        return f"p50 {pair[0]:6.2f} ms  p99 {pair[1]:6.2f} ms"

    print(f"\nserving benchmark ({'quick' if r['quick'] else 'full'}), model input {r['resolution']}, 1 torch thread")
    print(f"load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f} (2 cores, shared)")
    p99 = r["torchserve_1_client"][1]
    print("\ninference, one frame at a time")
    print(f"  in process (baseline)             {ms(r['in_process'])}")
    print(f"  TorchServe gRPC Predictions       {ms(r['torchserve_1_client'])}   target p99 <= 15 ms: "
          f"{'met' if p99 <= 15 else 'NOT met'}")  # fmt: skip
    print(f"  TorchServe gRPC OIP ModelInfer    {ms(r['oip_1_client'])}")
    print("\nconcurrent clients (throughput, latency)")
    for label, rows in r["batching"].items():
        for row in rows:
            print(
                f"  {label:14s} {row['clients']:2d} clients: {row['per_s']:7.1f} frames/s  "
                f"p50 {row['p50']:6.2f} ms  p99 {row['p99']:6.2f} ms"
            )
    one = r["realtime_1_car"]
    print("\nreal time, 25 Hz (baseline: every tick on time)")
    print(
        f"  1 car, {one['ticks']} ticks ({one['ticks'] / 25:.0f} s): missed {one['missed_ticks']} (target 0), "
        f"late {one['late_commands']}, fallbacks {one['fallbacks']}, laps finished {one['laps_finished']}; "
        f"inference p50 {one['inference_ms_p50']} p99 {one['inference_ms_p99']} ms, frame p99 {one['frame_ms_p99']} ms"
    )
    best = 1
    for row in r["car_counts"]:
        print(
            f"  {row['cars']} cars, batch 8: missed {row['missed_ticks']}, late {row['late_commands']}, fallbacks "
            f"{row['fallbacks']} of {row['ticks']} ticks; inference p50 {row['inference_ms_p50']} "
            f"p99 {row['inference_ms_p99']} ms"
        )
        if row["missed_ticks"] == 0 and best == row["cars"] - 1:
            best = row["cars"]
    print(f"  largest car count with 0 missed ticks in the car-count runs: {best} (1 car: the 5-minute run above)")
    m = r["memory_after_race"]
    print(f"\nTorchServe memory: JVM {m['jvm_mb']} MB, workers {m['workers_mb']} MB (2 models, 1 worker each)")


if __name__ == "__main__":
    raise SystemExit(main())
