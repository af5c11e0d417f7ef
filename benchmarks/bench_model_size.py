"""Model sizes and input resolutions side by side: lap quality against inference cost per frame (issue 14).

Each candidate is trained on the same frames of a finished main-job run (same seed, same epochs), raced over
the evaluation suite (every built-in track and the 20 held-out ones, plain and randomised frames) on two local
game servers beside the run's evolved driver, and timed per frame in process and through TorchServe.

    python benchmarks/bench_model_size.py --quick                 # 2 epochs, 3 tracks, fewer timed frames
    python benchmarks/bench_model_size.py --run out/run           # the full comparison (~20 min on 2 cores)
    python benchmarks/bench_model_size.py --candidates 128x96/16,32,48,64/128 96x64/16,32,48,64/128
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_inference import latencies_ms

from trainer.vision.model import VisionConfig

# Today's default, the same net at half the resolution, and a slim net at half the resolution.
DEFAULT_CANDIDATES = ("128x96/16,32,48,64/128", "64x48/16,32,48,64/128", "64x48/8,16,24,32/64")
TICK_BUDGET_MS = 1000.0 / 25


@dataclass(frozen=True)
class Candidate:
    """One network shape to compare: `WxH/c1,c2,.../hidden`."""

    spec: str
    vision: VisionConfig

    @classmethod
    def parse(cls, text: str) -> Candidate:
        try:
            size, channels, hidden = text.split("/")
            width, height = (int(v) for v in size.lower().split("x"))
            chans = tuple(int(c) for c in channels.split(","))
            vision = VisionConfig(width=width, height=height, channels=chans, hidden=int(hidden), seed=0)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: expected WxH/c1,c2,.../hidden ({exc})") from None
        return cls(text, vision)

    @property
    def slug(self) -> str:
        c = self.vision
        return f"{c.width}x{c.height}-c{'-'.join(map(str, c.channels))}-h{c.hidden}"


def percentiles(values: np.ndarray | list[float]) -> tuple[float, float]:
    return round(float(np.percentile(values, 50)), 3), round(float(np.percentile(values, 99)), 3)


@contextlib.contextmanager
def run_data(run_dir: Path) -> Iterator[str]:
    """A Redis on a copy of the run's append-only data (the run's own files are never written); yields its URL."""
    from plumbing.redis_local import LocalRedis

    source = run_dir / "redis"
    if not (source / "appendonlydir").is_dir():
        raise SystemExit(f"{source}: no Redis append-only data (run the main job first: rrp run)")
    with tempfile.TemporaryDirectory(prefix="bench-model-size-redis-") as tmp:
        copy = Path(tmp) / "redis"
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("redis.log", "secret.conf"))
        with LocalRedis(copy) as redis:
            yield redis.url


def serving_latency(model_dir: Path, workdir: Path, frames: int) -> tuple[float, float]:
    """p50 and p99 of sequential TorchServe gRPC `Predictions` calls, one frame at the model's size each."""
    from serving.archive import ArchiveConfig, build_archive
    from serving.client import ModelRef, TorchServeClient
    from serving.torchserve import LocalTorchServe, TorchServeConfig
    from trainer.vision.train import load_model

    config = load_model(model_dir / "model.safetensors").config
    frame = np.random.default_rng(0).integers(0, 256, (config.height, config.width, 3), dtype=np.uint8)
    archive = build_archive(model_dir, "1", workdir / "model-store", ArchiveConfig(batch_size=1))
    with LocalTorchServe(TorchServeConfig(workdir=workdir / "torchserve")) as server:
        server.register(archive)
        assert server.keys is not None
        client = TorchServeClient(server.inference_address, ModelRef("rrp-vision"), server.keys.inference)
        try:
            for _ in range(20):  # warm-up: the worker's first calls allocate
                client.infer(frame, 10.0, 5.0)
            times = []
            for _ in range(frames):
                t0 = time.perf_counter()
                client.infer(frame, 10.0, 5.0)
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            client.close()
    return percentiles(times)


@dataclass(frozen=True)
class Bench:
    """What every candidate shares: the data, the epochs, the tracks, the game servers and the frame counts."""

    run: Path
    data: Any  # trainer.vision.train.DataConfig
    epochs: int
    tracks: tuple[str, ...]
    pool: Any  # scheduler.executor.EvaluationPool
    servers: tuple[str, ...]
    in_process_frames: int
    served_frames: int


def measure(candidate: Candidate, frames: Any, bench: Bench, out_dir: Path) -> dict[str, Any]:
    """Trains one candidate, races the suite with it, and times it in process and through TorchServe."""
    from pipeline.evaluate import EvalConfig
    from pipeline.pools import PoolSpec
    from pipeline.suite import run_suite
    from trainer.vision.pilot import VisionPilot
    from trainer.vision.train import TrainConfig, save_training_run, train

    train_config = TrainConfig(epochs=bench.epochs, seed=0, progress=False, vision=candidate.vision)
    result = train(train_config, frames)
    model_dir = out_dir / "model"
    card = save_training_run(result, train_config, bench.data, frames, model_dir)
    model = result.model.eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"  trained in {result.seconds:.0f} s ({params:,} parameters, best epoch {result.best_epoch})", flush=True)

    torch.set_num_threads(1)  # as the main job evaluates: the game servers need the other core
    t0 = time.perf_counter()
    pilot = VisionPilot(model, candidate.vision.width, candidate.vision.height)
    driver = bench.run / "evolve" / "best_driver.json"
    eval_config = EvalConfig(driver_path=driver, pool=PoolSpec(servers=bench.servers))
    suite = run_suite(pilot, eval_config, bench.tracks, out_dir / "suite", pool=bench.pool)
    suite_s = time.perf_counter() - t0
    found = suite.to_json()
    failed = [f"{r['track']} ({r['condition']}, {r['progress_fraction']:.0%})" for r in suite.rows if not r["finished"]]
    print(f"  suite in {suite_s:.0f} s: {found['summary']}; not finished: {failed or 'none'}", flush=True)

    in_process = percentiles(latencies_ms(model, candidate.vision, bench.in_process_frames))
    served = serving_latency(model_dir, out_dir, bench.served_frames)
    print(f"  per frame: in process p50/p99 {in_process} ms, TorchServe {served} ms", flush=True)
    m = card["metrics"]
    return {
        "candidate": candidate.spec,
        "width": candidate.vision.width,
        "height": candidate.vision.height,
        "channels": list(candidate.vision.channels),
        "hidden": candidate.vision.hidden,
        "params": params,
        "train_s": round(result.seconds, 1),
        "best_epoch": result.best_epoch,
        "val_exact_acc": round(m["exact_acc"], 4),
        "val_steer_acc": round(m["steer_acc"], 4),
        "val_throttle_acc": round(m["throttle_acc"], 4),
        "suite_s": round(suite_s, 1),
        "suite": found["summary"],
        "recovery": found["recovery_summary"],
        "not_finished": failed,
        "in_process_ms": in_process,
        "torchserve_ms": served,
        "model_dir": str(model_dir),
    }


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The side-by-side comparison as Markdown table lines (printed and written alike)."""

    def pair(p: Sequence[float]) -> str:
        return f"{p[0]:.2f} / {p[1]:.2f}"

    def recovered(summary: dict[str, Any]) -> str:
        kinds = [summary[k] for k in ("pinned", "wrong-way") if k in summary and summary[k]["starts"]]
        return " / ".join(f"{k['model_finished']}/{k['starts']}" for k in kinds) or "-"

    def vs(s: dict[str, Any]) -> str:
        return f"{s['median_vs_driver']}" if s["median_vs_driver"] is not None else "-"

    lines = [
        "| candidate | params | train s | in-process ms p50/p99 | TorchServe ms p50/p99 | plain built-in/held-out "
        "completed | randomised built-in/held-out completed | median vs driver (plain/rand.) | wall contacts "
        "(plain/rand.) | pinned / wrong-way starts finished |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        plain, rand = r["suite"]["plain"], r["suite"]["randomised"]
        lines.append(
            f"| {r['candidate']} | {r['params']:,} | {r['train_s']:.0f} | {pair(r['in_process_ms'])} | "
            f"{pair(r['torchserve_ms'])} | {plain['builtin_completed']}/{plain['builtin_tracks']}, "
            f"{plain['unseen_completed']}/{plain['unseen_tracks']} | {rand['builtin_completed']}/"
            f"{rand['builtin_tracks']}, {rand['unseen_completed']}/{rand['unseen_tracks']} | "
            f"{vs(plain)} / {vs(rand)} | "
            f"{plain['wall_contacts']} / {rand['wall_contacts']} | {recovered(r.get('recovery', {}))} |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    rows = results["candidates"]
    notes = [
        f"- {r['candidate']}: validation exact {r['val_exact_acc']}, best epoch {r['best_epoch']}, suite "
        f"{r['suite_s']:.0f} s; not finished: {', '.join(r['not_finished']) or 'none'}"
        for r in rows
    ]
    return "\n".join(
        [
            "# Model size and input resolution: lap quality against inference cost",
            "",
            f"Run data: `{results['run']}` ({results['frames']} frames); {results['epochs']} epochs, seed 0; "
            f"suite on {len(results['tracks'])} tracks x plain/randomised on 2 local game servers, vs the run's "
            f"evolved driver. In process: batch 1, eager, 1 thread, {results['in_process_frames']} frames; "
            f"TorchServe: {results['served_frames']} sequential gRPC `Predictions`, batch 1, 1 worker. "
            f"Load average before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f} "
            f"(2 cores, shared); total {results['wall_s']:.0f} s.",
            "",
            *table(rows),
            "",
            *notes,
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("out/run"), help="a finished main-job run (its redis/)")
    parser.add_argument(
        "--candidates",
        nargs="+",
        type=Candidate.parse,
        default=[Candidate.parse(c) for c in DEFAULT_CANDIDATES],
        help=f"network shapes WxH/c1,c2,.../hidden (default: {' '.join(DEFAULT_CANDIDATES)})",
    )
    parser.add_argument("--epochs", type=int, help="training epochs of every candidate (default 12, quick 2)")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 3 tracks, fewer timed frames")
    parser.add_argument("--out", type=Path, default=Path("out/bench/model_size"), help="results folder")
    args = parser.parse_args()
    from game_server.core.tracks import BUILTIN_TRACKS, SUITE_UNSEEN_TRACKS
    from pipeline.pools import PoolSpec, local_game_servers, open_pool
    from trainer.vision.data import resize_frames
    from trainer.vision.train import DataConfig, load_frames

    epochs = args.epochs or (2 if args.quick else 12)
    tracks = (BUILTIN_TRACKS[0], *SUITE_UNSEEN_TRACKS[:2]) if args.quick else (*BUILTIN_TRACKS, *SUITE_UNSEEN_TRACKS)
    candidates: list[Candidate] = args.candidates
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    torch.set_num_threads(1)  # training sets its own threads; the rest shares the cores with game servers
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(run_data(args.run))
        servers = stack.enter_context(local_game_servers(2))
        addresses = tuple(s.address for s in servers)
        pool, _ = stack.enter_context(open_pool(PoolSpec(servers=addresses)))
        data = DataConfig(redis_url=redis_url, seed=0)
        bench = Bench(
            args.run, data, epochs, tracks, pool, addresses, 100 if args.quick else 500, 50 if args.quick else 300
        )
        # Read once at the recorded size through the main job's path, then area-resized per candidate in
        # batches: the same `resize_frames` that `load_frames` applies frame by frame (far slower on 2 cores).
        recorded = load_frames(data, (VisionConfig().width, VisionConfig().height), progress=False)
        n_frames = len(recorded.labels)
        print(f"{n_frames} frames read from the run's Redis in {time.perf_counter() - t_start:.0f} s", flush=True)
        for i, candidate in enumerate(candidates):
            c = candidate.vision
            print(f"[{i + 1}/{len(candidates)}] {candidate.spec}", flush=True)
            frames = dataclasses.replace(recorded, images=resize_frames(recorded.images, c.width, c.height))
            rows.append(measure(candidate, frames, bench, args.out / candidate.slug))
    results: dict[str, Any] = {
        "quick": args.quick,
        "run": str(args.run),
        "frames": n_frames,
        "epochs": epochs,
        "tracks": list(tracks),
        "in_process_frames": bench.in_process_frames,
        "served_frames": bench.served_frames,
        "tick_budget_ms": TICK_BUDGET_MS,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "candidates": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_model_size.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "bench_model_size.md").write_text(text)
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
