"""Does the student trail its teacher because of how it decides? Argmax against prior-corrected keys, one model.

Training weights rare keys up (`class_weights`: (n / (k n_c)) ** 0.5), and a net trained with a weighted loss
learns q(y|x) proportional to w_y p(y|x): its argmax presses rare keys (coast, brake, a steering side) more
often than the teacher does. Subtracting log w_y from the logits undoes that (logit adjustment), so the keys
are the teacher's most likely ones. This races the same model both ways over the evaluation suite, side by
side, with the weights recomputed from the run's training labels exactly as training computed them.

    python benchmarks/bench_decision.py --run out/run                 # the main job's model and data
    python benchmarks/bench_decision.py --run out/run --tracks kidney,oval,alpine --strength 0.5
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainer.vision.model import N_CLASSES


class AdjustedModel(torch.nn.Module):
    """The model with `offset` added to its logits: the decision changes, the net does not."""

    def __init__(self, model: torch.nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.model, self.offset = model, offset

    def forward(self, frames: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
        return self.model(frames, speed) + self.offset


def training_offsets(run: Path, strength: float) -> torch.Tensor:
    """-strength * log(w) per logit, w the class weights of the run's training split (as `train` computes them)."""
    from plumbing.redis_local import LocalRedis
    from trainer.vision.data import class_weights, split_frames
    from trainer.vision.train import DataConfig, TrainConfig, load_frames

    card = json.loads((run / "model" / "model_card.json").read_text())
    settings = card["settings"]
    config = TrainConfig(val_fraction=settings["val_fraction"], split_by=settings["split_by"], seed=settings["seed"])
    width, height = settings["vision"]["width"], settings["vision"]["height"]

    with tempfile.TemporaryDirectory(prefix="bench-decision-") as tmp:
        copy = Path(tmp) / "redis"
        shutil.copytree(run / "redis", copy, ignore=shutil.ignore_patterns("redis.log", "secret.conf"))
        with LocalRedis(copy) as redis:
            frames = load_frames(DataConfig(redis_url=redis.url, seed=config.seed), (width, height), progress=False)
    train_idx, _ = split_frames(frames, config.val_fraction, config.seed, config.split_by)
    throttle, steer = class_weights(frames.labels[train_idx])
    offset = -strength * torch.log(torch.cat([throttle, steer]))
    assert offset.shape == (2 * N_CLASSES,)
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("out/run"), help="a finished main-job run")
    parser.add_argument("--tracks", default="", help="suite tracks (default: the whole suite)")
    parser.add_argument("--strength", type=float, default=1.0, help="share of the correction (1: full)")
    parser.add_argument("--out", type=Path, default=Path("out/bench/decision"))
    args = parser.parse_args()

    from game_server.core.tracks import BUILTIN_TRACKS, SUITE_UNSEEN_TRACKS
    from pipeline.evaluate import EvalConfig, run_suite
    from pipeline.pools import PoolSpec, local_game_servers
    from trainer.vision.pilot import VisionPilot
    from trainer.vision.train import load_model

    torch.set_num_threads(1)
    tracks = tuple(t for t in args.tracks.split(",") if t) or (*BUILTIN_TRACKS, *SUITE_UNSEEN_TRACKS)
    model = load_model(args.run / "model" / "model.safetensors")
    offset = training_offsets(args.run, args.strength)
    print(f"logit offsets (throttle none/fwd/back, steer none/left/right): {offset.numpy().round(3).tolist()}")
    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    with local_game_servers(2) as servers:
        pool = PoolSpec(servers=tuple(s.address for s in servers))
        config = EvalConfig(driver_path=args.run / "evolve" / "best_driver.json", pool=pool)
        for name, net in (("argmax (baseline)", model), ("prior-corrected", AdjustedModel(model, offset))):
            pilot = VisionPilot(net, model.config.width, model.config.height)
            suite = run_suite(pilot, config, tracks, args.out / name.split()[0], recovery=True)
            rows[name] = {"summary": suite["summary"], "recovery": suite["recovery_summary"]}
    print(f"\nmodel {args.run / 'model'}, {len(tracks)} tracks x plain/randomised ({time.perf_counter() - t0:.0f} s)")
    print("| decision | condition | built-in | held-out | median vs driver | median vs reference | wall contacts |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        for condition, s in r["summary"].items():
            print(
                f"| {name} | {condition} | {s['builtin_completed']}/{s['builtin_tracks']} | "
                f"{s['unseen_completed']}/{s['unseen_tracks']} | {s['median_vs_driver']} | "
                f"{s['median_vs_reference']} | {s['wall_contacts']} |"
            )
    for name, r in rows.items():
        rec = r["recovery"]
        finished = ", ".join(f"{k} {v['model_finished']}/{v['starts']}" for k, v in rec.items())
        print(f"{name}: recovery starts finished {finished}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_decision.json").write_text(json.dumps({"strength": args.strength, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
