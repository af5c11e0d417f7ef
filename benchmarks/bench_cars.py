"""Many cars per core: real-time laps of N cars through one TorchServe, and what each component costs.

Two game servers (--games) and one TorchServe on this machine; for each car count, `rrp autopilot --realtime` processes
race one lap per car (their frames batched per round, see serving/batching.py). Per car count: fallbacks %,
late and missed ticks, each lap against the same model's lockstep lap, p50/p99 per hop, the CPU seconds per
car-second of each component (game servers, TorchServe's JVM, its worker, the autopilots: every process
tree's user + system time over the run), and the floor: the same model in process at the same batch size.

    python benchmarks/bench_cars.py                        # 1, 2, 4, 8, 16, 32 cars, the main job's model
    python benchmarks/bench_cars.py --cars 4,16            # a short run
    python benchmarks/bench_cars.py --cars 32 --procs 2    # two autopilot processes of 16 cars each
    python benchmarks/bench_cars.py --unbatched            # one request per car per tick (the old client)
    python benchmarks/bench_cars.py --paths race           # only races (default: races, then per-car streams)
    python benchmarks/bench_cars.py --format onnx          # the model as ONNX, run by onnxruntime in the worker

Paths: `race` drives each game server's cars through one Race stream on one clock, one request a tick for
all of them; `streams` is a Drive stream and a thread per car, their frames batched by serving.batching.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

MAIN_JOB_MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "main-job-model"
TICK_S = 0.04


def tree_cpu_s(pids: list[int]) -> float:
    """User + system seconds of these processes and their live descendants."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
    return total


def torchserve_cpu_s(ts: Any) -> dict[str, float]:
    """TorchServe's CPU seconds: the JVM, and its Python model workers."""
    jvm = workers = 0.0
    for p in ts.processes():
        try:
            t = p.cpu_times()
            name = p.name()
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if name == "java":
            jvm += t.user + t.system
        elif "model_service_worker" in cmd:
            workers += t.user + t.system
    return {"jvm": jvm, "worker": workers}


def run_autopilots(
    args: argparse.Namespace,
    cars: int,
    procs: int,
    games: tuple[str, ...],
    address: str,
    key_file: Path,
    out: Path,
    path: str = "race",
) -> tuple[list[dict[str, Any]], float]:
    """`procs` `rrp autopilot` processes sharing `cars`; their laps, and their CPU seconds (from wait4)."""
    from plumbing.procs import rrp_command

    out.mkdir(parents=True, exist_ok=True)
    running = []
    for k in range(procs):
        n = cars // procs + (1 if k < cars % procs else 0)
        if n == 0:
            continue
        cmd = [*rrp_command(), "autopilot", "--game", ",".join(games), "--model-server", address,
               "--token-file", str(key_file), "--track", args.track, "--laps", "1", "--cars", str(n),
               "--max-ticks", str(args.max_ticks), "--width", str(args.width), "--height", str(args.height),
               "--out", str(out / f"p{k}"),
               "--lockstep" if args.lockstep_all else "--realtime"]  # fmt: skip
        if path != "race":
            cmd.append("--no-race")
        else:
            cmd += ["--race-cars", str(args.race_cars), "--race-fallback-ticks", str(args.race_fallback_ticks)]
        if args.unbatched:
            cmd.append("--no-batched")
        else:
            cmd += ["--batch-window-ms", str(args.window_ms), "--batch-in-flight", str(args.in_flight)]
        log = open(out / f"p{k}.log", "w")  # noqa: SIM115 - closed once the process is waited for
        running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, k))
    cpu = 0.0
    laps: list[dict[str, Any]] = []
    for proc, log, k in running:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        cpu += usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            raise RuntimeError(f"autopilot {k} exited {proc.returncode}: {(out / f'p{k}.log').read_text()[-2000:]}")
        report = json.loads((out / f"p{k}" / "autopilot.json").read_text())
        laps.extend({**lap, "_proc": k} for lap in report["laps"])
        laps[-1]["_totals"] = report["totals"]
    return laps, cpu


def floor_ms(model_dir: Path, batch: int, n: int = 30) -> dict[str, float]:
    """The same model in this process, one forward pass of `batch` frames: ms per pass and per frame (p50)."""
    import torch

    from serving.inprocess import InProcessClient

    torch.set_num_threads(1)
    local = InProcessClient.load(model_dir / "model.safetensors")
    cfg = local.net.config
    frames = [np.random.default_rng(k).integers(0, 256, (cfg.height, cfg.width, 3), np.uint8) for k in range(batch)]
    speeds = [10.0] * batch
    for _ in range(3):
        local.infer_batch(frames, speeds, 1.0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        local.infer_batch(frames, speeds, 1.0)
        times.append((time.perf_counter() - t0) * 1e3)
    p50 = float(np.percentile(times, 50))
    return {"batch_ms": round(p50, 2), "frame_ms": round(p50 / batch, 3)}


def render_floor_ms(track_name: str, width: int, height: int, n: int = 60) -> float:
    """One frame drawn in this process (the game server's renderer, no gRPC): ms p50, over a moving car."""
    from game_server.core import physics
    from game_server.core.tracks import load_track
    from game_server.render import FrameSpec, shared_renderer

    track, spec, renderer = load_track(track_name), FrameSpec(width=width, height=height), shared_renderer()
    state, times = track.base_state, []
    renderer.render(track, state, spec)
    for _ in range(n):
        state, _ = physics.step(track, state, 1)
        t0 = time.perf_counter()
        renderer.render(track, state, spec)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.percentile(times, 50)), 3)


@contextmanager
def services(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[list[Any], Any]]:
    from plumbing.procs import start_service
    from serving.archive import ArchiveConfig, build_archive
    from serving.torchserve import LocalTorchServe, TorchServeConfig

    # The autopilot batches its cars; TorchServe's own batching could only merge several autopilot processes'
    # requests, and waits up to its delay for them (--server-batch, --server-delay-ms).
    archive_config = ArchiveConfig(
        batch_size=args.server_batch, max_batch_delay_ms=args.server_delay_ms, workers=args.workers, format=args.format
    )
    archive = build_archive(args.model, "1", tmp / "store", archive_config)
    games = [start_service(["game-server", "--port", "0", "--max-sessions", "64"]) for _ in range(args.games)]
    try:
        with LocalTorchServe(TorchServeConfig(workdir=tmp / "torchserve", log_level=args.ts_log_level)) as ts:
            ts.register(archive)
            yield games, ts
    finally:
        for g in games:
            g.stop()


def hop(values: list[dict[str, Any]], key: str) -> float | None:
    got = [v[key] for v in values if v.get(key) is not None]
    return round(float(np.median(got)), 2) if got else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cars", default="1,2,4,8,16,32", help="car counts, comma-separated")
    parser.add_argument("--procs", type=int, default=1, help="autopilot processes sharing the cars")
    parser.add_argument("--model", type=Path, default=MAIN_JOB_MODEL, help="trained model directory")
    parser.add_argument("--track", default="kidney")
    parser.add_argument("--max-ticks", type=int, default=1500, help="tick budget of a lap")
    parser.add_argument("--unbatched", action="store_true", help="one request per car per tick")
    parser.add_argument("--window-ms", type=float, default=2.0, help="batch window of the autopilots, ms")
    parser.add_argument("--server-batch", type=int, default=1, help="TorchServe's batch size")
    parser.add_argument("--server-delay-ms", type=int, default=0, help="TorchServe's max batch delay, ms")
    parser.add_argument("--in-flight", type=int, default=2, help="batched requests in flight per autopilot")
    parser.add_argument("--paths", default="race,streams", help="race (one stream per server), streams (per car)")
    parser.add_argument("--format", default="eager", choices=("eager", "onnx"), help="the served model's format")
    parser.add_argument("--race-cars", type=int, default=8, help="races: at most this many cars per race (8)")
    parser.add_argument("--race-fallback-ticks", type=int, default=10, help="races: ticks ahead holding the fallback")
    parser.add_argument("--ts-log-level", default="warn", help="TorchServe's log level ('': its default config)")
    parser.add_argument("--games", type=int, default=2, help="game server processes")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe's workers of the model")
    parser.add_argument("--out", type=Path, help="write bench_cars.json here")
    args = parser.parse_args()
    args.lockstep_all = False
    from trainer.vision.train import load_model

    vision = load_model(args.model / "model.safetensors").config
    args.width, args.height = vision.width, vision.height
    counts = [int(c) for c in args.cars.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-cars-"))
    results: dict[str, Any] = {"load_before": os.getloadavg(), "procs": args.procs, "batched": not args.unbatched,
                               "window_ms": args.window_ms, "in_flight": args.in_flight,
                               "model": str(args.model), "track": args.track, "rows": []}  # fmt: skip
    print(f"logs in {tmp}", flush=True)
    paths = [p for p in args.paths.split(",") if p]
    results["render_floor_ms"] = render_floor_ms(args.track, args.width, args.height)
    results.update(format=args.format, workers=args.workers, games=args.games, race_cars=args.race_cars)
    with services(args, tmp) as (game_procs, ts):
        games, game_pids = tuple(g.address for g in game_procs), [g.proc.pid for g in game_procs]
        address = ts.inference_address
        lockstep = argparse.Namespace(**{**vars(args), "lockstep_all": True})
        laps, _ = run_autopilots(lockstep, 1, 1, games, address, ts.key_file, tmp / "lockstep")
        base = laps[0]["lap_ticks"] if laps[0]["finished"] else None
        results["lockstep_lap_ticks"] = base
        print(f"lockstep lap: {base} ticks", flush=True)
        for cars, path in [(c, p) for c in counts for p in paths]:
            out = tmp / f"cars-{cars}-{path}"
            games_before, ts_before = tree_cpu_s(game_pids), torchserve_cpu_s(ts)
            t0 = time.monotonic()
            laps, pilot_cpu = run_autopilots(args, cars, args.procs, games, address, ts.key_file, out, path)
            wall = time.monotonic() - t0
            games_cpu, ts_after = tree_cpu_s(game_pids) - games_before, torchserve_cpu_s(ts)
            totals = [lap.pop("_totals") for lap in laps if "_totals" in lap]
            ticks = sum(lap["ticks"] for lap in laps)
            car_s = ticks * TICK_S
            ratios = [lap["lap_ticks"] / base for lap in laps if base and lap["finished"]]
            row = {
                "cars": cars,
                "path": path,
                "ticks": ticks,
                "fallbacks_pct": round(100 * sum(lap["fallbacks"] for lap in laps) / max(ticks, 1), 2),
                "late": sum(lap["late_commands"] for lap in laps),
                "missed": sum(lap["missed_ticks"] for lap in laps),
                "safe_ticks": sum(lap["safe_ticks"] for lap in laps),
                "laps_finished": f"{sum(lap['finished'] for lap in laps)}/{len(laps)}",
                "lap_ratio_min": round(min(ratios), 4) if ratios else None,
                "lap_ratio_max": round(max(ratios), 4) if ratios else None,
                "frame_ms_p50": hop(totals, "frame_ms_p50"),
                "frame_ms_p99": hop(totals, "frame_ms_p99"),
                "inference_ms_p50": hop(totals, "inference_ms_p50"),
                "inference_ms_p99": hop(totals, "inference_ms_p99"),
                "slack_ms_p1": hop(totals, "slack_ms_p1"),
                "batch_frames_mean": hop(totals, "batch_frames_mean"),
                "cpu_per_car_s": {
                    "game_servers": round(games_cpu / car_s, 4),
                    "torchserve_jvm": round((ts_after["jvm"] - ts_before["jvm"]) / car_s, 4),
                    "worker": round((ts_after["worker"] - ts_before["worker"]) / car_s, 4),
                    "autopilot": round(pilot_cpu / car_s, 4),
                },
                "floor": floor_ms(args.model, max(1, cars // args.procs)),
                "wall_s": round(wall, 1),
            }
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    results["load_after"] = os.getloadavg()
    report(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_cars.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['track']}, lockstep lap {r['lockstep_lap_ticks']} ticks; {r['procs']} autopilot process(es), "
          f"{'batched' if r['batched'] else 'one request per car'}; {r['games']} game servers, "
          f"races of {r['race_cars']}, model {r['format']}, {r['workers']} worker(s); "
          f"load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}")  # fmt: skip
    print(f"floors in this process: a frame drawn {r['render_floor_ms']} ms; the model, per batch below")
    print("| cars | path | fallbacks | late | missed | safe | laps | lap / lockstep | frame p50/p99 | "
          "inference p50/p99 | CPU ms per car-tick: games / JVM / worker / autopilot = total | "
          "floor ms per batch (per frame) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in r["rows"]:
        c = {k: round(v * 1e3 * TICK_S, 2) for k, v in x["cpu_per_car_s"].items()}  # CPU s per car-s -> ms a tick
        print(f"| {x['cars']} | {x['path']} | {x['fallbacks_pct']}% | {x['late']} | {x['missed']} | "
              f"{x['safe_ticks']} | {x['laps_finished']} | {x['lap_ratio_min']}-{x['lap_ratio_max']} | "
              f"{x['frame_ms_p50']} / "
              f"{x['frame_ms_p99']} | {x['inference_ms_p50']} / {x['inference_ms_p99']} | {c['game_servers']} / "
              f"{c['torchserve_jvm']} / {c['worker']} / {c['autopilot']} = {round(sum(c.values()), 2)} | "
              f"{x['floor']['batch_ms']} "
              f"({x['floor']['frame_ms']}) |")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
