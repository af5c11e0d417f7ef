"""Training data: records, the Redis reader, shards, the dataset, the split, validation and `rrp data`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from game_server.core.tracks import load_track
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1 import collector_pb2 as pb
from rrp.cli import main
from trainer.data.dataset import FrameDataset, resize_images, split_runs
from trainer.data.records import DataError, RunInfo, Sample, decode_image
from trainer.data.redis_source import RedisRuns
from trainer.data.shards import ShardError, ShardSet, export_shards
from trainer.data.validate import (
    DataRequirements,
    channel_moments,
    combination_of,
    load_requirements,
    spread_from_moments,
    validate_source,
)

W, H = 32, 24
# A lap's worth of varied keys: forward 6/8, left 2/8, right 2/8, back 1/8.
GOOD_MASKS = (1, 1 | 4, 1 | 8, 1, 0, 2, 1 | 4, 1 | 8)
ENCODINGS = {"raw": pb.IMAGE_ENCODING_RAW_RGB, "png": pb.IMAGE_ENCODING_PNG, "jpeg": pb.IMAGE_ENCODING_JPEG}


def synthetic_image(run_seed: int, tick: int) -> np.ndarray:
    """A gradient with a moving bar and noise: never blank, different per run and tick."""
    rng = np.random.default_rng(run_seed * 100_003 + tick)
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[..., 0] = np.linspace(0, 200, W, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(50, 150, H, dtype=np.uint8)[:, None]
    img[:, tick % W, 2] = 255
    return img + rng.integers(0, 30, size=img.shape, dtype=np.uint8)


def encode(img: np.ndarray, encoding: str) -> bytes:
    if encoding == "raw":
        return img.tobytes()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG" if encoding == "png" else "JPEG", quality=90)
    return buf.getvalue()


def write_run(
    r: redis.Redis,
    run_id: str,
    track: str,
    frames: int,
    encoding: str = "png",
    prefix: str = "rrp:",
    masks: tuple[int, ...] = GOOD_MASKS,
    skip: frozenset[int] = frozenset(),
    tick_of_entry: Callable[[int], int] | None = None,
    wall_every: int = 0,
    bad_image_at: int | None = None,
    started: float = 1000.0,
) -> None:
    """Writes a run as the collector would (docs/redis-schema.md), or with the given faults injected.

    `tick_of_entry` maps the i-th stream entry to the tick its record claims, to store duplicate ticks
    (which a schema-following writer cannot).
    """
    seed = sum(run_id.encode())
    n_points = load_track(track).n_points
    start = pb.RunStart(
        run_id=run_id, track=track, source=pb.RUN_SOURCE_DRIVER, driver_id="d1", width_px=W, height_px=H,
        encoding=ENCODINGS[encoding], jpeg_quality=90 if encoding == "jpeg" else 0,
    )  # fmt: skip
    pipe = r.pipeline(transaction=False)
    pipe.hset(f"{prefix}run:{run_id}:meta", mapping={"start": start.SerializeToString(), "started_unix_s": started})
    pipe.zadd(f"{prefix}runs", {run_id: started})
    pipe.sadd(f"{prefix}track:{track}:runs", run_id)
    for i in range(frames):
        tick = tick_of_entry(i) if tick_of_entry else i
        if i in skip:
            continue
        image = encode(synthetic_image(seed, tick), encoding) if i != bad_image_at else b"not an image"
        record = pb.FrameRecord(
            run_id=run_id, tick=tick, image=image, applied_mask=masks[i % len(masks)],
            label_mask=masks[i % len(masks)], rays_m=[float(k + tick % 7) for k in range(15)],
            progress_fraction=i / frames, wall_contact=bool(wall_every and i % wall_every == 0),
        )  # fmt: skip
        record.state.tick = tick
        record.state.car.x_m, record.state.car.y_m = 0.5 * tick, -0.25 * tick
        record.state.car.heading_rad = 0.01 * tick
        record.state.car.speed_m_per_s = 20.0 + (tick % 30)
        record.state.lap.segment = i * n_points // frames
        pipe.xadd(f"{prefix}run:{run_id}:frames", {"pb": record.SerializeToString()}, id=f"{i + 1}-0")
    end = pb.RunEnd(run_id=run_id, frames=frames, finished=True, lap_ticks=frames)
    pipe.hset(f"{prefix}run:{run_id}:meta", "end", end.SerializeToString())
    pipe.execute()


@pytest.fixture(scope="module")
def local_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with LocalRedis(tmp_path_factory.mktemp("redis")) as server:
        client = server.client()
        # Good data under rrp:, three encodings, two tracks; runs span shard boundaries at 50 frames.
        write_run(client, "oval-a", "oval", 120, "png", started=1000.0)
        write_run(client, "oval-b", "oval", 90, "raw", started=1001.0, wall_every=10)
        write_run(client, "kidney-a", "kidney", 110, "jpeg", started=1002.0)
        # Faulty data under bad: one fault per run.
        write_run(client, "gappy", "oval", 60, prefix="bad:", skip=frozenset({10, 11, 12}))
        write_run(client, "doubled", "oval", 40, prefix="bad:", tick_of_entry=lambda i: i - (i >= 20))
        write_run(client, "broken", "kidney", 30, prefix="bad:", bad_image_at=5)
        # Imbalanced labels: forward only.
        write_run(client, "forward-only", "oval", 200, prefix="fwd:", masks=(1,))
        client.close()
        yield server


@pytest.fixture()
def runs(local_redis: LocalRedis) -> RedisRuns:
    return RedisRuns(local_redis.url, page_size=16)


def test_decode_checks_encoding_and_size() -> None:
    img = synthetic_image(1, 3)
    for name, enc in (("raw_rgb", "raw"), ("png", "png")):
        run = RunInfo("r", "oval", "driver", "", W, H, name, 0, 0.0)
        np.testing.assert_array_equal(decode_image(encode(img, enc), run), img)
    jpeg_run = RunInfo("r", "oval", "driver", "", W, H, "jpeg", 90, 0.0)
    assert decode_image(encode(img, "jpeg"), jpeg_run).shape == (H, W, 3)
    wrong_size = RunInfo("r", "oval", "driver", "", W + 1, H, "png", 0, 0.0)
    with pytest.raises(DataError, match="expected 33x24"):
        decode_image(encode(img, "png"), wrong_size)
    with pytest.raises(DataError, match="cannot decode PNG"):
        decode_image(encode(img, "jpeg"), RunInfo("r", "oval", "driver", "", W, H, "png", 0, 0.0))
    with pytest.raises(DataError, match="raw image has"):
        decode_image(b"\0" * 10, RunInfo("r", "oval", "driver", "", W, H, "raw_rgb", 0, 0.0))


def test_redis_runs_lists_metadata_and_pages_in_tick_order(runs: RedisRuns) -> None:
    listed = runs.runs()
    assert [r.run_id for r in listed] == ["oval-a", "oval-b", "kidney-a"]
    assert [r.run_id for r in runs.runs("oval")] == ["oval-a", "oval-b"]
    first = listed[0]
    assert (first.track, first.encoding, first.end_frames) == ("oval", "png", 120)
    assert (first.width_px, first.height_px, first.started_unix_s) == (W, H, 1000.0)
    assert runs.frame_count("oval-a") == 120
    samples = list(runs.samples("oval-a"))  # 120 frames in pages of 16
    assert [s.tick for s in samples] == list(range(120))
    np.testing.assert_array_equal(samples[7].image, synthetic_image(sum(b"oval-a"), 7))
    assert samples[1].label_mask == 1 | 4 and samples[5].speed_m_per_s == 25.0


def test_dataset_reads_redis_and_shards_identically(runs: RedisRuns, tmp_path: Path) -> None:
    manifest = export_shards(runs, tmp_path / "export", shard_frames=50)
    assert [r["frames"] for r in manifest["runs"]] == [120, 90, 110]
    assert sum(s["frames"] for s in manifest["shards"]) == 320 and len(manifest["shards"]) == 7
    shards = ShardSet(tmp_path / "export")
    assert shards.runs() == runs.runs()
    from_redis, from_shards = FrameDataset(runs), FrameDataset(shards)
    assert len(from_redis) == len(from_shards) == 320
    for i in range(len(from_redis)):
        a, b = from_redis[i], from_shards[i]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)
    item = from_redis[1]
    assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert item["targets"].tolist() == [1.0, 0.0, 1.0, 0.0] and int(item["mask"]) == 5
    assert float(item["speed"]) == pytest.approx(21.0 / 50.0)
    assert from_redis.frame_key(125) == ("oval-b", 5)
    small = FrameDataset(shards, runs=shards.runs("kidney"), image_size=(12, 16))
    assert len(small) == 110 and small[0]["image"].shape == (3, 12, 16)


def test_frame_set_does_not_depend_on_the_order_runs_arrived(runs: RedisRuns) -> None:
    """Parallel collection stores runs in any order; the training set (and so a seeded model) is the same."""
    from trainer.vision.data import frames_from_source

    class Reversed:
        def runs(self, track: str | None = None) -> list[RunInfo]:
            return runs.runs(track)[::-1]

        def samples(self, run_id: str) -> Iterator[Sample]:
            return runs.samples(run_id)

    assert len(runs.runs()) > 1
    a, b = frames_from_source(runs, (W, H)), frames_from_source(Reversed(), (W, H))
    assert [r.run_id for r in a.runs] == sorted(r.run_id for r in runs.runs()) == [r.run_id for r in b.runs]
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_resize_averages_when_shrinking() -> None:
    images = torch.zeros(1, 3, 4, 4)
    images[..., ::2, ::2] = 1.0
    assert torch.allclose(resize_images(images, (2, 2)), torch.full((1, 3, 2, 2), 0.25))
    assert resize_images(images, (8, 8)).shape == (1, 3, 8, 8)


def test_tampered_shard_is_refused(runs: RedisRuns, tmp_path: Path) -> None:
    export_shards(runs, tmp_path, shard_frames=100, track="kidney")
    shard = tmp_path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one pixel of the last image
    shard.write_bytes(bytes(data))
    shards = ShardSet(tmp_path)
    with pytest.raises(ShardError, match=r"does not match the manifest.*refusing"):
        shards.verify()
    with pytest.raises(ShardError, match="SHA-256"):
        FrameDataset(shards)
    with pytest.raises(FileExistsError):
        export_shards(runs, tmp_path)


def test_shard_manifest_with_unsafe_file_name_is_refused(runs: RedisRuns, tmp_path: Path) -> None:
    export_shards(runs, tmp_path, track="kidney")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../elsewhere.safetensors"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="shard-NNNNN"):
        ShardSet(tmp_path)


def _infos(n_tracks: int, runs_per_track: int) -> list[RunInfo]:
    return [
        RunInfo(f"t{t}-r{r}", f"track-{t}", "driver", "", W, H, "png", 0, float(t * 100 + r))
        for t in range(n_tracks)
        for r in range(runs_per_track)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_split_by_run_and_by_track_never_leaks(seed: int) -> None:
    infos = _infos(5, 4)
    by_run = split_runs(infos, 0.25, seed)
    train_ids, val_ids = {r.run_id for r in by_run.train}, {r.run_id for r in by_run.val}
    assert not train_ids & val_ids and train_ids | val_ids == {r.run_id for r in infos} and len(val_ids) == 5
    assert split_runs(list(reversed(infos)), 0.25, seed).val == tuple(r for r in reversed(infos) if r in by_run.val)
    by_track = split_runs(infos, 0.4, seed, by="track")
    train_tracks, val_tracks = {r.track for r in by_track.train}, {r.track for r in by_track.val}
    assert not train_tracks & val_tracks and len(val_tracks) == 2
    assert not {r.run_id for r in by_track.train} & {r.run_id for r in by_track.val}
    assert split_runs(infos, 0.4, seed, by="track") == by_track


def test_split_needs_two_groups_and_varies_with_seed() -> None:
    infos = _infos(1, 6)
    with pytest.raises(ValueError, match="at least 2 tracks"):
        split_runs(infos, 0.5, 0, by="track")
    assert split_runs(infos, 0.0, 0).val == ()
    assert len({split_runs(_infos(4, 5), 0.2, seed).val for seed in range(6)}) > 1


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 16), st.just(3)), elements=st.integers(0, 255)))
def test_validation_moments_equal_float64_sums_over_every_value(image: np.ndarray) -> None:
    n, sums, squares = channel_moments(image)
    values = image.reshape(-1, 3).astype(np.float64)
    assert n == len(values)
    assert np.array_equal(sums, values.sum(axis=0)) and np.array_equal(squares, (values * values).sum(axis=0))
    assert spread_from_moments(3 * n, sums.sum(), squares.sum()) == pytest.approx(values.std(), abs=1e-5)


def test_label_combinations() -> None:
    assert combination_of(0) == "coast+straight"
    assert combination_of(1 | 8) == "forward+right"
    assert combination_of(2 | 4) == "back+left"
    assert combination_of(1 | 2) == "conflicting"


def test_validate_passes_on_good_data_and_writes_report(runs: RedisRuns, tmp_path: Path) -> None:
    requirements = DataRequirements(min_frames=300, min_runs=3, min_tracks=2, min_track_coverage=0.3)
    report = validate_source(runs, requirements, tmp_path)
    assert report.passed, report.failures
    s = report.summary
    assert s["frames"] == 320 and s["per_track"]["oval"]["frames"] == 210
    assert s["per_run"]["oval-b"]["offtrack_frames"] == 9 and s["offtrack_share"] == pytest.approx(9 / 320)
    assert s["per_track"]["kidney"]["coverage"] == pytest.approx(110 / 301, abs=0.01)
    assert s["label_share"]["forward"] == pytest.approx(0.75, abs=0.01)
    assert sum(s["combination_share"].values()) == pytest.approx(1.0)
    assert 0.0 < s["image"]["mean_rgb"][0] < 1.0 and s["image"]["blank_share"] == 0.0
    for name in ("validation.json", "validation.md", "label_balance.png", "frames_per_track.png", "coverage.png",
                 "samples.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "validation.json").read_text())["passed"] is True
    assert "**PASSED**" in (tmp_path / "validation.md").read_text()


def test_validate_names_each_fault(local_redis: LocalRedis) -> None:
    report = validate_source(RedisRuns(local_redis.url, prefix="bad:"), DataRequirements(min_track_coverage=0.0))
    failures = "\n".join(report.failures)
    assert "too few frames: 102 < 2000 required" in failures  # 57 + 40 + the 5 read before the broken image
    assert "run gappy: 3 missing ticks (gaps 10..12)" in failures
    assert "run doubled: 1 duplicate ticks" in failures
    assert "run doubled: 1 missing ticks (gaps 39..39)" in failures  # RunEnd said 40 frames, ticks end at 38
    assert "run broken: unreadable after 5 frames: run 'broken': cannot decode PNG image of 12 bytes" in failures
    assert len(report.failures) == 5, failures
    forward_only = RedisRuns(local_redis.url, prefix="fwd:")
    imbalanced = validate_source(forward_only, DataRequirements(min_runs=1, min_frames=100))
    assert [f for f in imbalanced.failures if "label" in f] == [
        "label 'left' is set in 0.0% of frames, below the 5.0% required (min_label_share left=0.05)",
        "label 'right' is set in 0.0% of frames, below the 5.0% required (min_label_share right=0.05)",
    ]
    assert len(imbalanced.failures) == 2, imbalanced.failures


def test_duplicate_ticks_from_a_test_double() -> None:
    """A source other than Redis (the FrameSource protocol) is validated the same way."""
    info = RunInfo("twice", "unknown-track", "driver", "", W, H, "raw_rgb", 0, 0.0)

    class Doubled:
        def runs(self, track: str | None = None) -> list[RunInfo]:
            return [info]

        def samples(self, run_id: str) -> Iterator[Sample]:
            for tick in (0, 1, 1, 2, 2, 3):
                yield Sample(run_id, info.track, tick, np.zeros((H, W, 3), np.uint8), 1.0, 1, 1, np.zeros(15),
                             0.0, False, 0.0, 0.0, 0.0, 0)  # fmt: skip

    report = validate_source(Doubled(), DataRequirements(min_frames=1, min_runs=1, min_label_share=()))
    assert report.summary["per_run"]["twice"]["duplicate_ticks"] == 2
    assert report.summary["per_track"]["unknown-track"]["coverage"] is None
    assert report.failures == (
        "run twice: 2 duplicate ticks, more than 0 allowed (max_duplicate_ticks)",
        "100.0% of frames are near-blank, above the 5.0% allowed (max_blank_share)",
    )


def test_requirements_merge_config_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "req.json"
    config.write_text(json.dumps({"min_frames": 10, "min_label_share": {"back": 0.1}}))
    req = load_requirements(config, {"min_runs": 5, "min_frames": None, "min_label_share": {"left": 0.2}})
    assert (req.min_frames, req.min_runs) == (10, 5)
    assert dict(req.min_label_share) == {"forward": 0.3, "left": 0.2, "right": 0.05, "back": 0.1}
    with pytest.raises(ValueError, match="unknown requirement"):
        DataRequirements.from_mapping({"min_framez": 1})
    with pytest.raises(ValueError, match="unknown key 'up'"):
        load_requirements(None, {"min_label_share": {"up": 0.1}})


def test_cli_data_validate_and_export(
    local_redis: LocalRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as help_exit:
        main(["data", "validate", "--help"])
    assert help_exit.value.code == 0 and "--min-label-share" in capsys.readouterr().out
    good = ["--min-frames", "300", "--min-runs", "3", "--min-tracks", "2", "--min-track-coverage", "0.3",
            "--min-label-share", "back=0.1"]  # fmt: skip
    assert main(["data", "validate", "--redis", local_redis.url, "--out", str(tmp_path / "v1"), *good]) == 0
    assert "data validation passed" in capsys.readouterr().out
    assert main(["data", "validate", "--redis", local_redis.url, "--out", str(tmp_path / "v2"), *good,
                 "--min-label-share", "back=0.5"]) == 1  # fmt: skip
    assert "label 'back' is set in 12.5% of frames, below the 50.0% required" in capsys.readouterr().err
    assert main(["data", "export", "--redis", local_redis.url, "--out", str(tmp_path / "x"), "--track", "oval"]) == 0
    assert "exported 2 runs, 210 frames in 1 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="KEY=SHARE"):
        main(["data", "validate", "--redis", local_redis.url, "--min-label-share", "left"])
    # The installed entry point, in its own process, on the export.
    done = subprocess.run(
        [str(Path(sys.executable).with_name("rrp")), "data", "validate", "--shards", str(tmp_path / "x"),
         "--out", str(tmp_path / "v3"), "--min-frames", "5000"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "too few frames: 210 < 5000 required (min_frames)" in done.stderr
    assert (tmp_path / "v3" / "validation.md").is_file()
