"""The vision autopilot: training, checkpoints, TorchScript export and closed-loop evaluation on a real server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from game_server import convert
from game_server.core.drivers import default_driver
from game_server.core.recovery import RecoveringDriver
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT
from game_server.core.tracks import load_track
from pipeline.evaluate import EvalConfig, run_evaluation
from pipeline.pools import PoolSpec
from plumbing import errors
from plumbing.procs import ServiceProcess, start_service
from rrp.cli import main
from trainer.vision.data import AugmentConfig, FrameSet, augment, class_weights, generate_samples, split_frames
from trainer.vision.model import (
    STEER_NONE,
    THROTTLE_BACK,
    THROTTLE_NONE,
    VisionConfig,
    build_model,
    decide,
    mask_targets,
)
from trainer.vision.pilot import VisionPilot
from trainer.vision.train import (
    TrainConfig,
    export_torchscript,
    load_model,
    native_bf16,
    resolve_device,
    resolve_precision,
    save_weights,
    train,
)

SMALL = VisionConfig(width=64, height=48, channels=(8, 16, 16, 16), hidden=32, seed=3)


@pytest.fixture(scope="module")
def frames() -> FrameSet:
    return generate_samples(["oval", "kidney"], 2, 40, default_driver(), 0.1, seed=5, size=(64, 48))


@pytest.fixture(scope="module")
def game_server() -> Iterator[ServiceProcess]:
    proc = start_service(["game-server", "--port", "0"])
    yield proc
    proc.stop()


def _probe(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 48, 64, 3), dtype=torch.uint8, generator=g), torch.rand(n, generator=g) * 50


def test_training_reduces_loss_and_is_reproducible(frames: FrameSet) -> None:
    config = TrainConfig(vision=SMALL, epochs=4, batch_size=32, lr=3e-3, patience=10, progress=False, seed=1)
    first = [h.train_loss for h in train(config, frames).history]
    second = [h.train_loss for h in train(config, frames).history]
    assert first == second
    assert first[-1] < first[0]


def test_checkpoint_loads_in_a_fresh_process_with_the_same_outputs(tmp_path: Path) -> None:
    model = build_model(SMALL).eval()
    save_weights(model, tmp_path / "m.safetensors")
    images, speeds = _probe()
    np.save(tmp_path / "images.npy", images.numpy())
    np.save(tmp_path / "speeds.npy", speeds.numpy())
    script = (
        "import sys, numpy as np, torch\n"
        "from trainer.vision.train import load_model\n"
        "d = sys.argv[1]\n"
        "m = load_model(d + '/m.safetensors')\n"
        "x, v = torch.from_numpy(np.load(d + '/images.npy')), torch.from_numpy(np.load(d + '/speeds.npy'))\n"
        "np.save(d + '/out.npy', m(x, v).detach().numpy())\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    with torch.no_grad():
        expected = model(images, speeds).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)
    assert load_model(tmp_path / "m.safetensors").config == SMALL


def test_torchscript_export_agrees_with_the_eager_model(tmp_path: Path) -> None:
    model = build_model(SMALL).eval()
    export_torchscript(model, tmp_path / "m.ts")
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    images, speeds = _probe()
    with torch.no_grad():
        eager, exported = model(images, speeds), scripted(images, speeds)
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(decide(exported), decide(eager))


def test_the_decision_offset_is_the_training_prior_and_travels_with_the_weights_and_export(
    frames: FrameSet, tmp_path: Path
) -> None:
    config = TrainConfig(vision=SMALL, epochs=1, batch_size=32, progress=False, seed=1)
    model = train(config, frames).model
    train_idx, _ = split_frames(frames, config.val_fraction, config.seed, config.split_by)
    expected = -torch.log(torch.cat(class_weights(frames.labels[train_idx])))
    torch.testing.assert_close(model.decision_offset, expected)
    assert float(expected.abs().max()) > 0.05  # the data's keys are unbalanced: the offset decides something
    images, speeds = _probe()
    with torch.no_grad():
        torch.testing.assert_close(model(images, speeds), model.raw_logits(images, speeds) + expected)
    save_weights(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    torch.testing.assert_close(loaded.decision_offset, expected)
    export_torchscript(loaded, tmp_path / "m.ts")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.ts"))(images, speeds), model(images, speeds))
    # A large offset on "back" makes every pilot brake: the offset is in what each consumer decides on.
    with torch.no_grad():
        loaded.decision_offset[THROTTLE_BACK] = 1e3
    export_torchscript(loaded, tmp_path / "back.ts")
    frame, speed = images[0].numpy(), float(speeds[0])
    for net in (loaded, torch.jit.load(str(tmp_path / "back.ts"))):
        assert VisionPilot(net, SMALL.width, SMALL.height).act(frame, speed) & (FORWARD | BACK) == BACK
    assert VisionPilot(torch.jit.load(str(tmp_path / "m.ts")), SMALL.width, SMALL.height).act(frame, speed) & BACK == 0
    plain = train(dataclasses.replace(config, decision_prior=0.0), frames).model
    assert torch.equal(plain.decision_offset, torch.zeros(6))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="decision_prior"):
            dataclasses.replace(config, decision_prior=bad)


def test_weights_saved_before_the_decision_offset_load_with_plain_argmax(tmp_path: Path) -> None:
    model = build_model(SMALL).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decision_offset"}
    save_weights(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file(state, str(tmp_path / "old.safetensors"), metadata=meta)
    old = load_model(tmp_path / "old.safetensors")
    assert torch.equal(old.decision_offset, torch.zeros(6))
    images, speeds = _probe()
    with torch.no_grad():
        torch.testing.assert_close(old(images, speeds), model(images, speeds))


def test_weights_saved_before_the_crawl_scale_speed_load_without_it(tmp_path: Path) -> None:
    """A file whose config predates `crawl_speed` has a head with one speed input: it loads as such."""
    model = build_model(dataclasses.replace(SMALL, crawl_speed=False)).eval()
    save_weights(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["rrp-vision"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del header["config"]["crawl_speed"]
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"rrp-vision": json.dumps(header)})
    old = load_model(tmp_path / "old.safetensors")
    assert not old.config.crawl_speed and build_model(SMALL).config.crawl_speed
    images, speeds = _probe()
    with torch.no_grad():
        torch.testing.assert_close(old(images, speeds), model(images, speeds))


def test_heads_and_flip_keep_masks_consistent() -> None:
    masks = torch.tensor([0, FORWARD, BACK | LEFT, FORWARD | RIGHT, FORWARD | BACK | LEFT | RIGHT])
    throttle, steer = mask_targets(masks)
    logits = torch.cat([torch.nn.functional.one_hot(throttle, 3), torch.nn.functional.one_hot(steer, 3)], 1)
    assert decide(logits.float()).tolist() == [0, FORWARD, BACK | LEFT, FORWARD | RIGHT, 0]
    images = torch.zeros(5, 48, 64, 3, dtype=torch.uint8)
    flipped = AugmentConfig(brightness=0, contrast=0, colour=0, shift_px=0, flip_prob=1.0)
    _, swapped = augment(images, masks, flipped, torch.Generator().manual_seed(0))
    assert swapped.tolist() == [0, FORWARD, BACK | RIGHT, FORWARD | LEFT, FORWARD | BACK | LEFT | RIGHT]


def _augmented(
    shape: tuple[int, int, int], config: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Random frames of `shape` (N, H, W), augmented; and a generator that repeats augment's draws in its order."""
    images = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    got, _ = augment(images, torch.zeros(shape[0], dtype=torch.long), config, torch.Generator().manual_seed(7))
    return images, got, torch.Generator().manual_seed(7)


def test_augment_shifts_with_replicated_edges_and_flips_as_a_per_frame_reference_does() -> None:
    """The batched gather equals padding each frame (edges repeated), cropping it and mirroring it (red and
    blue swapped with the mirror)."""
    config = AugmentConfig(brightness=0, contrast=0, colour=0, shift_px=3, flip_prob=0.5)
    images, got, draws = _augmented((9, 12, 16), config)
    (
        torch.rand(9, 1, 1, 1, generator=draws),
        torch.rand(9, 1, 1, 1, generator=draws),
        torch.rand(9, 1, 1, 3, generator=draws),
    )
    dx, dy = torch.randint(0, 7, (9,), generator=draws), torch.randint(0, 7, (9,), generator=draws)
    flip = torch.rand(9, generator=draws) < 0.5
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (3, 3, 3, 3), mode="replicate")
    for i in range(9):
        want = padded[i, :, dy[i] : dy[i] + 12, dx[i] : dx[i] + 16].permute(1, 2, 0).to(torch.uint8)
        assert torch.equal(got[i], want.flip(1).flip(2) if flip[i] else want), i  # mirrored: red and blue swap
    assert 0 < int(flip.sum()) < 9 and bool((dx != 3).any())  # the case covers shifts and both flip outcomes


def test_augment_photometric_jitter_is_contrast_about_the_frame_mean_then_brightness_and_colour() -> None:
    config = AugmentConfig(brightness=0.3, contrast=0.3, colour=0.1, shift_px=0, flip_prob=0.0)
    images, got, draws = _augmented((6, 8, 12), config)
    contrast, brightness = (1 + 0.3 * (2 * torch.rand(6, 1, 1, 1, generator=draws) - 1) for _ in range(2))
    colour = 1 + 0.1 * (2 * torch.rand(6, 1, 1, 3, generator=draws) - 1)
    x = images.double()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    want = (((x - mean) * contrast + mean) * brightness * colour).round().clamp(0, 255)
    assert (got.double() - want).abs().max() <= 1  # float32 against float64 rounding
    assert (got != images).float().mean() > 0.5  # the jitter changed the frames


def test_same_seed_same_weights_on_cpu_with_or_without_background_augmentation(frames: FrameSet) -> None:
    config = TrainConfig(vision=SMALL, epochs=2, batch_size=32, progress=False, seed=4, device="cpu")
    runs = [train(dataclasses.replace(config, prefetch_batches=ahead), frames) for ahead in (2, 2, 0)]
    states = [r.model.state_dict() for r in runs]
    for other in states[1:]:
        assert states[0].keys() == other.keys()
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
    assert all(t.device.type == "cpu" for t in states[0].values())
    changed = train(dataclasses.replace(config, seed=5), frames).model.state_dict()
    assert not all(torch.equal(states[0][k], changed[k]) for k in states[0])  # the seed matters


def test_bf16_steps_keep_float32_weights_and_the_same_seed_gives_the_same_model(frames: FrameSet) -> None:
    config = TrainConfig(vision=SMALL, epochs=1, batch_size=32, progress=False, seed=4, device="cpu", precision="bf16")
    runs = [train(config, frames) for _ in range(2)]
    fp32 = train(dataclasses.replace(config, precision="fp32"), frames)
    assert [r.precision for r in (*runs, fp32)] == ["bf16", "bf16", "fp32"]
    states = [r.model.state_dict() for r in (*runs, fp32)]
    assert all(t.dtype == torch.float32 for t in states[0].values() if t.is_floating_point())  # served as float32
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # bit for bit
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # bf16 steps round differently
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert resolve_precision("fp32", cpu) == torch.float32
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        resolve_precision("fp16", cpu)


def test_device_auto_is_cuda_when_present_and_cuda_absent_is_a_clear_error() -> None:
    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        return
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(errors.FailedPrecondition, match="no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(errors.FailedPrecondition, match="no CUDA device"):
        train(TrainConfig(vision=SMALL, epochs=1, progress=False, device="cuda"), _tiny_frames())


def test_rrp_train_device_cuda_without_a_gpu_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    args = ["train", "--generate", "--tracks", "oval", "--episodes", "1", "--ticks", "10", "--width", "64"]
    code = main([*args, "--height", "48", "--epochs", "1", "--device", "cuda", "--out", str(tmp_path / "m")])
    assert code != 0
    assert "no CUDA device is available" in capsys.readouterr().err


def _tiny_frames() -> FrameSet:
    from trainer.data.records import RunInfo

    rng = np.random.default_rng(0)
    return FrameSet(
        rng.integers(0, 256, (8, 48, 64, 3), dtype=np.uint8),
        np.zeros(8, np.float32),
        np.ones(8, np.uint8),
        (np.arange(8) % 2).astype(np.int32),
        tuple(RunInfo(f"r{i}", "oval", "driver", "", 64, 48, "raw_rgb", 0, 0.0) for i in range(2)),
    )


def test_closed_loop_reports_a_model_that_never_drives_as_failed(game_server: ServiceProcess) -> None:
    model = build_model(SMALL).eval()
    last = model.head[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():  # always "no keys": the car never leaves the start line
        last.weight.zero_()
        last.bias.zero_()
        last.bias[THROTTLE_NONE] = 1.0
        last.bias[3 + STEER_NONE] = 1.0
    config = EvalConfig(
        training_tracks=("oval",), unseen_tracks=("gen-1001",), pool=PoolSpec(servers=(game_server.address,))
    )
    report = run_evaluation(VisionPilot(model, SMALL.width, SMALL.height), config)
    assert report["unseen_laps_completed"] == 0
    for row in report["tracks"]:
        assert row["finished"] is False
        assert row["lap_ticks"] == 0
        assert row["progress_fraction"] < 0.01
        assert "no progress" in row["stop_reason"]
        assert row["reference_lap_ticks"] > 0


@pytest.mark.parametrize("command", ["train", "evaluate", "dagger"])
def test_cli_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--seed" in capsys.readouterr().out or command == "evaluate"


def test_dagger_labels_the_learners_states_collects_them_and_retrains(
    game_server: ServiceProcess, frames: FrameSet, tmp_path: Path
) -> None:
    """One DAgger iteration: the model drives, the expert labels what it sees, the collector stores the
    labelled run like any other (source DAGGER), the model is retrained on the union and raced again."""
    from collector.store import FrameStore
    from game_server.core.driver_file import SavedDriver, save_driver
    from pipeline.dagger import DaggerConfig, run_dagger
    from plumbing.redis_local import LocalRedis
    from rallyrobopilot.v1 import collector_pb2
    from scheduler.executor import EvaluationPool, PoolConfig

    expert = default_driver()
    driver_path = save_driver(
        tmp_path / "driver.json",
        SavedDriver(kind=expert.kind, track="oval", lap_ticks=0, cost=0.0, generation=0, params=expert.params),
    )
    model = build_model(SMALL)
    train_config = TrainConfig(vision=SMALL, epochs=1, batch_size=32, progress=False, seed=2)
    with LocalRedis(tmp_path / "redis") as redis:
        collector = start_service(["collector", "--port", "0"], env={"RRP_REDIS_URL": redis.url})
        try:
            config = DaggerConfig(
                driver_path=driver_path,
                tracks=("oval",),
                iterations=1,
                epochs_per_iteration=1,
                budget_factor=0.3,
                collector=collector.address,
                recovering=True,
                recovery_drives=True,
            )
            eval_config = EvalConfig(training_tracks=("oval",), unseen_tracks=(), budget_factor=0.3)
            with EvaluationPool(PoolConfig(servers=(game_server.address,))) as pool:
                pool.wait_ready(1)
                retrained, rows = run_dagger(model, frames, train_config, config, eval_config, pool, tmp_path / "d")
        finally:
            collector.stop()
        store = FrameStore(redis.client(), "rrp:", redis.url)
        runs = store.list_runs()
        # A lap from the start line and one from a recovery start, both of source DAGGER.
        assert len(runs) == 2 and {r.start.source for r in runs} == {collector_pb2.RUN_SOURCE_DAGGER}
        records = [rec for r in runs for rec in store.iter_frames(r.start.run_id)]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[1]["dagger_frames_added"] == len(records) > 0
    assert rows[1]["training_frames"] == len(frames.labels) + len(records)
    # Every stored label is the recovering teacher's keys on the state the learner reached: its decision is a
    # function of the state alone, so it can be checked from what Redis holds.
    teacher = RecoveringDriver(load_track("oval"), base=expert.act)
    for record in records:
        assert record.label_mask == teacher.act(convert.state_from_pb(record.state))
    assert retrained is not model and (tmp_path / "d" / "dagger.json").exists()


def test_lap_ratios_leave_out_baselines_without_a_lap() -> None:
    from pipeline.evaluate import lap_ratios

    base = {"reference_lap_ticks": 500, "driver_lap_ticks": 0, "driver_finished": False}
    # a tiny GA budget can end with no finishing lap (lap_ticks 0): nothing to divide by, nothing reported
    assert lap_ratios(550, base, 0) == {"vs_reference": 1.1}
    assert lap_ratios(550, {**base, "driver_lap_ticks": 440, "driver_finished": True}, 500) == {
        "vs_reference": 1.1,
        "vs_driver": 1.25,
        "vs_ga_best": 1.1,
    }
    assert lap_ratios(None, base, 500) == {}


@pytest.mark.slow
def test_cli_train_evaluate_and_dagger_on_a_tiny_budget(game_server: ServiceProcess, tmp_path: Path) -> None:
    """The installed `rrp train`, `rrp evaluate` and `rrp dagger`, each in its own process, chained by files."""
    from game_server.core.driver_file import SavedDriver, save_driver

    rrp = str(Path(sys.executable).with_name("rrp"))
    expert = default_driver()
    driver = save_driver(
        tmp_path / "driver.json",
        SavedDriver(kind=expert.kind, track="oval", lap_ticks=0, cost=0.0, generation=0, params=expert.params),
    )
    tiny = ["--generate", "--tracks", "oval", "--episodes", "2", "--ticks", "60", "--width", "64", "--height", "48"]
    race = ["--eval-tracks", "oval", "--servers", game_server.address, "--budget-factor", "0.1"]

    def rrp_ok(*args: str) -> str:
        done = subprocess.run([rrp, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    assert "training frames" in rrp_ok("train", *tiny, "--epochs", "1", "--out", str(tmp_path / "m"))
    model = tmp_path / "m" / "model.safetensors"
    assert {"model.safetensors", "model.ts", "model_card.json", "model_card.md"} <= {
        p.name for p in (tmp_path / "m").iterdir()
    }
    rrp_ok(
        "evaluate",
        "--model",
        str(model),
        "--runtime",
        "torchscript",
        *race,
        "--unseen",
        "gen-1001",
        "--out",
        str(tmp_path / "e"),
    )
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert [r["track"] for r in report["tracks"]] == ["oval", "gen-1001"] and report["unseen_tracks"] == 1
    rrp_ok(
        *("dagger", *tiny, "--epochs", "1", "--model", str(model), "--driver", str(driver), *race, "--unseen", ""),
        *("--iterations", "1", "--epochs-per-iteration", "1", "--dagger-tracks", "oval", "--out", str(tmp_path / "d")),
    )
    assert (tmp_path / "d" / "dagger.json").exists()
    # A user's mistake is one clear line, not a traceback.
    failed = subprocess.run([rrp, "evaluate", "--model", str(tmp_path / "missing.safetensors"), *race],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert failed.returncode == 1
    assert "rrp evaluate: error:" in failed.stderr and "missing.safetensors" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.slow
def test_same_seed_same_weights_with_the_other_core_kept_busy(tmp_path: Path) -> None:
    """Training ends by epochs and early stopping, never by the clock: a seeded `rrp train` writes the same
    bytes whether the machine is idle or both cores are busy."""
    rrp = str(Path(sys.executable).with_name("rrp"))
    tiny = ["--generate", "--tracks", "oval", "--episodes", "2", "--ticks", "80", "--width", "64", "--height", "48"]

    def train(out: Path) -> str:
        done = subprocess.run([rrp, "train", *tiny, "--epochs", "2", "--seed", "5", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    idle = train(tmp_path / "idle")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = train(tmp_path / "busy")
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert idle == busy
