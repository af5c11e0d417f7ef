"""A model rollout's time (register, gate, canary, decision) and what the racing cars felt during it.

Cars race in real time in their own process (`rrp autopilot --routing`), TorchServe serves the default version;
first the cars race for a while with no rollout (the baseline), then `Deployer.deploy` rolls the candidate out,
reading the canary's live figures from the cars' metrics endpoint. Printed side by side: the cars' ticks, missed
ticks and fallbacks in the baseline window and during the rollout (target: 0 missed ticks).

    python benchmarks/bench_rollout.py              # two fresh (untrained) models, 2 cars
    python benchmarks/bench_rollout.py --model out/run/model --candidate out/run/deployment/model-2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def scrape(url: str) -> dict[str, float]:
    """The cars' counters, summed over versions."""
    from serving.rollout.live import parse_exposition

    with urllib.request.urlopen(url, timeout=5.0) as r:
        per_version = parse_exposition(r.read().decode())
    keys = ("ticks", "missed_ticks", "fallbacks", "inference_errors", "laps")
    return {k: sum(getattr(v, k) for v in per_version.values()) for k in keys}


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    d = {k: b[k] - a[k] for k in a}
    d["fallback_rate"] = round(d["fallbacks"] / d["ticks"], 4) if d["ticks"] else 0.0
    return d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="the default version's model directory (default: a fresh one)")
    parser.add_argument("--candidate", type=Path, help="the candidate's model directory (default: a fresh one)")
    parser.add_argument("--cars", type=int, default=2)
    parser.add_argument("--track", default="kidney")
    parser.add_argument("--baseline-s", type=float, default=45.0, help="seconds the cars race before the rollout")
    parser.add_argument("--gate-tracks", default="gen-1001")
    parser.add_argument("--gate-max-ticks", type=int, default=1500)
    parser.add_argument("--canary-laps", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write bench_rollout.json here")
    args = parser.parse_args()

    from pipeline.pools import local_game_servers
    from pipeline.serve import ServeConfig, follow_registry
    from plumbing.redis_local import free_port
    from serving.endpoints import Endpoints, write_endpoints
    from serving.registry import Registry
    from serving.rollout.config import CanaryConfig, GateConfig
    from serving.rollout.deployer import Deployer, RolloutConfig
    from serving.torchserve import LocalTorchServe, TorchServeConfig
    from trainer.vision.model import VisionConfig, build_model
    from trainer.vision.train import load_model, save_weights

    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))

    def model_dir(given: Path | None, name: str, seed: int) -> Path:
        if given is not None:
            return given
        out = tmp / name
        out.mkdir()
        save_weights(build_model(VisionConfig(seed=seed)).eval(), out / "model.safetensors")
        return out

    default, candidate = model_dir(args.model, "default", 1), model_dir(args.candidate, "candidate", 2)
    vision = load_model(default / "model.safetensors").config
    load_before = os.getloadavg()
    results: dict[str, Any] = {"cars": args.cars, "track": args.track, "load_before": load_before}
    with local_game_servers(2) as servers, LocalTorchServe(TorchServeConfig(workdir=tmp / "serve")) as server:
        games = tuple(s.address for s in servers)
        following = threading.Event()
        follow_registry(ServeConfig(models_root=default), server, following)
        write_endpoints(server.workdir, server)
        port = free_port()
        metrics = f"http://127.0.0.1:{port}/metrics"
        cars = subprocess.Popen(
            [sys.executable, "-m", "rrp.cli", "autopilot", "--game", ",".join(games),
             "--model-server", server.inference_address, "--token-file", str(server.key_file),
             "--routing", str(Registry(server.model_store).routing_path), "--cars", str(args.cars),
             "--laps", "100000", "--realtime", "--track", args.track, "--metrics-port", str(port),
             "--width", str(vision.width), "--height", str(vision.height)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if scrape(metrics)["ticks"] > 50:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or cars.poll() is not None:
                    raise SystemExit("the cars did not start")
                time.sleep(0.5)
            a = scrape(metrics)
            time.sleep(args.baseline_s)
            b = scrape(metrics)
            results["baseline"] = {"seconds": args.baseline_s, **delta(a, b)}
            config = RolloutConfig(
                game=games[:1],
                gate=GateConfig(tracks=tuple(args.gate_tracks.split(",")), max_ticks=args.gate_max_ticks),
                canary=CanaryConfig(share=0.5, laps=args.canary_laps, live=(metrics,), max_s=600),
            )  # fmt: skip
            deployer = Deployer(config, Endpoints.resolve(server.workdir, None, "", None))
            t0 = time.monotonic()
            record = deployer.deploy(candidate)
            rollout_s = time.monotonic() - t0
            time.sleep(2.0)  # the laps in flight report their last ticks
            c = scrape(metrics)
            results["rollout"] = {"seconds": round(rollout_s, 1), **delta(b, c)}
            results["decision"] = record.decision
            results["reason"] = record.reason
            results["stages"] = {s.stage: s.seconds for s in record.steps}
        finally:
            cars.send_signal(signal.SIGTERM)
            try:
                cars.wait(30)
            except subprocess.TimeoutExpired:
                cars.kill()
            following.set()
    results["load_after"] = os.getloadavg()

    print(f"rollout of a candidate while {args.cars} cars race {args.track} in real time (load before "
          f"{load_before[0]:.1f}, after {results['load_after'][0]:.1f})")  # fmt: skip
    print(f"  decision: {results['decision']} ({results['reason']})")
    stages = ", ".join(f"{k} {v} s" for k, v in results["stages"].items())
    print(f"  rollout time: {results['rollout']['seconds']} s  ({stages})")
    print(f"  {'':24}{'baseline (no rollout)':>24}{'during the rollout':>24}")
    for key in ("seconds", "ticks", "laps", "missed_ticks", "fallbacks", "fallback_rate", "inference_errors"):
        base, roll = results["baseline"][key], results["rollout"][key]
        print(f"  {key:24}{base:>24g}{roll:>24g}")
    target = "met" if results["rollout"]["missed_ticks"] == 0 else "NOT met"
    print(f"  target: 0 missed ticks during the rollout: {target}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
