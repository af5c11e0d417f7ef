"""Does the student trail its teacher because of how it decides? Argmax against prior-corrected keys, one model.

Training weights rare keys up (`class_weights`: (n / (k n_c)) ** 0.5), and a net trained with a weighted loss
learns q(y|x) proportional to w_y p(y|x): its argmax presses rare keys (coast, brake, a steering side) more
often than the teacher does. Subtracting log w_y from the logits undoes that (logit adjustment), so the keys
are the teacher's most likely ones. Training stores that offset in the model (`decision_offset`,
`--decision-prior`); this races the same net both ways over the evaluation suite, side by side: with its
offset set to zero (argmax) and with the offset (the stored one, or, for a model trained before it was
stored or with `--strength`, recomputed from the run's training labels exactly as training computes it).

    python benchmarks/bench_decision.py --run out/run                 # the main job's model and data
    python benchmarks/bench_decision.py --run out/run --tracks kidney,oval,alpine --strength 0.5
"""

from __future__ import annotations

import argparse
import copy as copy_module
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainer.vision.model import DrivingNet


def with_offset(model: DrivingNet, offset: torch.Tensor) -> DrivingNet:
    """A copy of the model deciding with `offset`: the decision changes, the net does not."""
    copy = copy_module.deepcopy(model)
    with torch.no_grad():
        copy.decision_offset.copy_(offset)
    return copy


def training_offsets(run: Path, strength: float) -> torch.Tensor:
    """-strength * log(w) per logit, w the class weights of the run's training split (as `train` computes them)."""
    from plumbing.redis_local import LocalRedis
    from trainer.vision.data import class_weights, split_frames
    from trainer.vision.train import DataConfig, TrainConfig, decision_offset, load_frames

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
    return decision_offset(class_weights(frames.labels[train_idx]), strength)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("out/run"), help="a finished main-job run")
    parser.add_argument("--tracks", default="", help="suite tracks (default: the whole suite)")
    parser.add_argument(
        "--strength", type=float, default=None, help="share of the correction, recomputed (default: the stored one)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench/decision"))
    args = parser.parse_args()

    from game_server.core.tracks import BUILTIN_TRACKS, SUITE_UNSEEN_TRACKS
    from pipeline.evaluate import EvalConfig
    from pipeline.pools import PoolSpec, local_game_servers
    from pipeline.suite import run_suite
    from trainer.vision.pilot import VisionPilot
    from trainer.vision.train import load_model

    torch.set_num_threads(1)
    tracks = tuple(t for t in args.tracks.split(",") if t) or (*BUILTIN_TRACKS, *SUITE_UNSEEN_TRACKS)
    model = load_model(args.run / "model" / "model.safetensors")
    stored = model.decision_offset.clone()
    if args.strength is not None or not bool(stored.any()):
        offset = training_offsets(args.run, 1.0 if args.strength is None else args.strength)
    else:
        offset = stored
    print(f"logit offsets (throttle none/fwd/back, steer none/left/right): {offset.numpy().round(3).tolist()}")
    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    with local_game_servers(2) as servers:
        pool = PoolSpec(servers=tuple(s.address for s in servers))
        config = EvalConfig(driver_path=args.run / "evolve" / "best_driver.json", pool=pool)
        variants = (("argmax (baseline)", torch.zeros_like(offset)), ("prior-corrected", offset))
        for name, variant in variants:
            net = with_offset(model, variant)
            pilot = VisionPilot(net, model.config.width, model.config.height)
            suite = run_suite(pilot, config, tracks, args.out / name.split()[0], recovery=True)
            found = suite.to_json()
            rows[name] = {"summary": found["summary"], "recovery": found["recovery_summary"]}
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
    result = {"offset": offset.tolist(), "strength": args.strength, "rows": rows}
    (args.out / "bench_decision.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
