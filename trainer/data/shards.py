"""Exported runs as checksummed safetensors shards with a JSON manifest: portable, no pickle, tamper-evident."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from plumbing.errors import NotFound
from trainer.data.records import RAY_COUNT, DataError, FrameSource, RunInfo, Sample

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "rrp-frame-shards"
VERSION = 1
DEFAULT_SHARD_FRAMES = 2048  # 128x96 frames: ~75 MB of pixels per shard
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")

# Per-frame arrays of a shard besides `images` (N, H, W, 3) uint8 and `run_index` (N,) int32, which points
# into the shard's run list in the manifest.
_SCALARS: dict[str, type[np.generic]] = {
    "tick": np.int64,
    "label_mask": np.uint8,
    "applied_mask": np.uint8,
    "wall_contact": np.uint8,
    "segment": np.int64,
    "speed_m_per_s": np.float64,
    "progress_fraction": np.float64,
    "x_m": np.float64,
    "y_m": np.float64,
    "heading_rad": np.float64,
}


class ShardError(DataError):
    """A shard or manifest that is missing, malformed or does not match its checksum."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write then rename, so an interrupted export never leaves a half-written file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _ShardWriter:
    """Buffers samples of one image size and writes a shard whenever it holds `shard_frames` frames."""

    def __init__(self, out_dir: Path, shard_frames: int) -> None:
        self._out_dir = out_dir
        self._shard_frames = shard_frames
        self._buffer: list[Sample] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, sample: Sample) -> None:
        if self._buffer and self._buffer[-1].image.shape != sample.image.shape:
            self.flush()
        self._buffer.append(sample)
        if len(self._buffer) >= self._shard_frames:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        samples, self._buffer = self._buffer, []
        run_ids = list(dict.fromkeys(s.run_id for s in samples))
        index = {run_id: i for i, run_id in enumerate(run_ids)}
        arrays: dict[str, np.ndarray] = {
            "images": np.stack([s.image for s in samples]),
            "run_index": np.array([index[s.run_id] for s in samples], dtype=np.int32),
            "rays_m": np.stack([s.rays_m for s in samples]).astype(np.float64),
        }
        for name, dtype in _SCALARS.items():
            arrays[name] = np.array([getattr(s, name) for s in samples], dtype=dtype)
        data = save_safetensors(arrays)
        name = f"shard-{len(self.shards):05d}.safetensors"
        _write_atomic(self._out_dir / name, data)
        runs = []
        for run_id in run_ids:
            ticks = [s.tick for s in samples if s.run_id == run_id]
            runs.append({"run_id": run_id, "frames": len(ticks), "first_tick": ticks[0], "last_tick": ticks[-1]})
        h, w, _ = samples[0].image.shape
        self.shards.append(
            {"file": name, "sha256": _sha256(data), "bytes": len(data), "frames": len(samples),
             "height_px": h, "width_px": w, "runs": runs}
        )  # fmt: skip
        log.info("wrote %s: %d frames of %d runs", name, len(samples), len(runs))


def export_shards(
    source: FrameSource,
    out_dir: Path,
    shard_frames: int = DEFAULT_SHARD_FRAMES,
    track: str | None = None,
    run_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Writes the runs (all, one track's, or the named ones) as shards plus manifest; returns the manifest."""
    if shard_frames < 1:
        raise ValueError("shard_frames must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).exists():
        raise FileExistsError(f"{out_dir} already holds an export ({MANIFEST}); choose an empty folder")
    runs = source.runs(track)
    if run_ids is not None:
        wanted = set(run_ids)
        runs = [r for r in runs if r.run_id in wanted]
    writer = _ShardWriter(out_dir, shard_frames)
    run_entries = []
    for run in runs:
        frames = 0
        for sample in source.samples(run.run_id):
            writer.add(sample)
            frames += 1
        run_entries.append({**dataclasses.asdict(run), "frames": frames})
    writer.flush()
    manifest = {"format": FORMAT, "version": VERSION, "runs": run_entries, "shards": writer.shards}
    _write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


_RUN_FIELDS = {f.name for f in dataclasses.fields(RunInfo)}


def _run_from_json(entry: Any) -> tuple[RunInfo, int]:
    if not isinstance(entry, dict) or set(entry) != {*_RUN_FIELDS, "frames"}:
        raise ShardError(f"{MANIFEST}: a run entry must have exactly the fields {sorted({*_RUN_FIELDS, 'frames'})}")
    try:
        info = RunInfo(
            run_id=str(entry["run_id"]),
            track=str(entry["track"]),
            source=str(entry["source"]),
            driver_id=str(entry["driver_id"]),
            width_px=int(entry["width_px"]),
            height_px=int(entry["height_px"]),
            encoding=str(entry["encoding"]),
            jpeg_quality=int(entry["jpeg_quality"]),
            started_unix_s=float(entry["started_unix_s"]),
            end_frames=None if entry["end_frames"] is None else int(entry["end_frames"]),
            finished=bool(entry["finished"]),
            lap_ticks=int(entry["lap_ticks"]),
        )
        return info, int(entry["frames"])
    except (TypeError, ValueError) as exc:
        raise ShardError(f"{MANIFEST}: malformed run entry: {exc}") from exc


class ShardSet:
    """An export opened for reading; every shard is checked against the manifest's SHA-256 as it is loaded."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        path = directory / MANIFEST
        if not path.is_file():
            raise ShardError(f"{path} does not exist: not an export folder")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ShardError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ShardError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ShardError(f"{path} is not a {FORMAT} version {VERSION} manifest")
        self._runs: dict[str, tuple[RunInfo, int]] = {}
        for entry in manifest.get("runs", []):
            info, frames = _run_from_json(entry)
            self._runs[info.run_id] = (info, frames)
        self._shards: list[dict[str, Any]] = manifest.get("shards", [])
        for shard in self._shards:
            if not isinstance(shard, dict) or not _SHARD_NAME.fullmatch(str(shard.get("file", ""))):
                raise ShardError(f"{path}: shard entries need a file named shard-NNNNN.safetensors")
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def runs(self, track: str | None = None) -> list[RunInfo]:
        infos = [r for r, _ in self._runs.values() if track is None or r.track == track]
        return sorted(infos, key=lambda r: (r.started_unix_s, r.run_id))

    def run(self, run_id: str) -> RunInfo:
        if run_id not in self._runs:
            raise NotFound(f"run {run_id!r} is not in {self.directory}")
        return self._runs[run_id][0]

    def frame_count(self, run_id: str) -> int:
        self.run(run_id)
        return self._runs[run_id][1]

    def _load(self, i: int) -> dict[str, np.ndarray]:
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        entry = self._shards[i]
        path = self.directory / entry["file"]
        if not path.is_file():
            raise ShardError(f"{path} is listed in {MANIFEST} but missing")
        data = path.read_bytes()
        digest = _sha256(data)
        if digest != entry.get("sha256"):
            raise ShardError(
                f"{path}: SHA-256 {digest} does not match the manifest's {entry.get('sha256')}; "
                "the shard was modified or corrupted, refusing to load it"
            )
        arrays = load_safetensors(data)
        self._check(path, entry, arrays)
        self._cached = (i, arrays)
        return arrays

    @staticmethod
    def _check(path: Path, entry: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Shapes and dtypes as written, so a reader can index without further checks."""
        n = int(entry["frames"])
        expected: dict[str, tuple[tuple[int, ...], Any]] = {
            "images": ((n, int(entry["height_px"]), int(entry["width_px"]), 3), np.uint8),
            "run_index": ((n,), np.int32),
            "rays_m": ((n, RAY_COUNT), np.float64),
            **{name: ((n,), dtype) for name, dtype in _SCALARS.items()},
        }
        if set(arrays) != set(expected):
            raise ShardError(f"{path}: arrays {sorted(arrays)} differ from {sorted(expected)}")
        for name, (shape, dtype) in expected.items():
            if arrays[name].shape != shape or arrays[name].dtype != dtype:
                raise ShardError(f"{path}: {name} is {arrays[name].dtype}{arrays[name].shape}, expected {shape}")
        if n and not 0 <= int(arrays["run_index"].min()) <= int(arrays["run_index"].max()) < len(entry["runs"]):
            raise ShardError(f"{path}: run_index points outside the shard's run list")

    def verify(self) -> None:
        """Checks every shard now, instead of when it is first read."""
        for i in range(len(self._shards)):
            self._load(i)

    def samples(self, run_id: str) -> Iterator[Sample]:
        info = self.run(run_id)
        for i, entry in enumerate(self._shards):
            local = [j for j, r in enumerate(entry["runs"]) if r["run_id"] == run_id]
            if not local:
                continue
            arrays = self._load(i)
            for row in np.flatnonzero(arrays["run_index"] == local[0]):
                yield Sample(
                    run_id=run_id,
                    track=info.track,
                    tick=int(arrays["tick"][row]),
                    image=arrays["images"][row],
                    speed_m_per_s=float(arrays["speed_m_per_s"][row]),
                    label_mask=int(arrays["label_mask"][row]),
                    applied_mask=int(arrays["applied_mask"][row]),
                    rays_m=arrays["rays_m"][row],
                    progress_fraction=float(arrays["progress_fraction"][row]),
                    wall_contact=bool(arrays["wall_contact"][row]),
                    x_m=float(arrays["x_m"][row]),
                    y_m=float(arrays["y_m"][row]),
                    heading_rad=float(arrays["heading_rad"][row]),
                    segment=int(arrays["segment"][row]),
                )
