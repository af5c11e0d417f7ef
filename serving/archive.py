"""Packages a trained vision model as a TorchServe model archive (.mar) with `torch-model-archiver`."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plumbing.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from plumbing.settings import setting

log = logging.getLogger(__name__)

HANDLER = Path(__file__).with_name("handler.py")
ONNX_HANDLER = Path(__file__).with_name("handler_onnx.py")
FORMATS = ("eager", "onnx")
WEIGHTS = "model.safetensors"
CARD_FILES = ("model_card.json", "model_card.md")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.\-_]{0,31}$")


@dataclass(frozen=True)
class ArchiveConfig:
    """What goes into the model config of the archive: batching, workers and timeouts."""

    name: str = setting("rrp-vision", "model name in the archive and on the model server", flag="name")
    batch_size: int = setting(1, "server-side batch: up to this many requests run as one forward pass")
    max_batch_delay_ms: int = setting(5, "how long TorchServe waits to fill a batch, ms")
    workers: int = setting(1, "worker processes of the model (each ~300 MB)")
    response_timeout_s: int = setting(10, "TorchServe restarts a worker that takes longer than this, s")
    format: str = setting(
        "eager",
        "eager: safetensors run by PyTorch; onnx: the torch.export program as ONNX, run by onnxruntime",
        choices=FORMATS,
    )

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InvalidArgument(f"model name {quote(self.name)}: letters, digits, '-' and '_', at most 64")
        if not 1 <= self.batch_size <= 64:
            raise InvalidArgument(f"batch size must be 1..64, got {self.batch_size}")
        if not 0 <= self.max_batch_delay_ms <= 1000 or not 1 <= self.workers <= 16 or self.response_timeout_s < 1:
            raise InvalidArgument("max batch delay 0..1000 ms, 1..16 workers, a response timeout of at least 1 s")
        if self.format not in FORMATS:
            raise InvalidArgument(f"archive format must be one of {', '.join(FORMATS)}, got {quote(self.format)}")

    def model_config_yaml(self) -> str:
        return (
            f"minWorkers: {self.workers}\n"
            f"maxWorkers: {self.workers}\n"
            f"batchSize: {self.batch_size}\n"
            f"maxBatchDelay: {self.max_batch_delay_ms}\n"
            f"responseTimeout: {self.response_timeout_s}\n"
        )


def check_version(version: str) -> str:
    if not _VERSION.match(version):
        raise InvalidArgument(f"version {quote(version)}: letters, digits, '.', '-' and '_', at most 32")
    return version


def archiver_command() -> list[str]:
    """`torch-model-archiver` from the same environment as this Python."""
    exe = Path(sys.executable).with_name("torch-model-archiver")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("torch-model-archiver")
    if found is None:
        raise FailedPrecondition("torch-model-archiver not found: install the project (make setup)")
    return [found]


def build_archive(model_dir: Path, version: str, out_dir: Path, config: ArchiveConfig | None = None) -> Path:
    """`out_dir/<name>-<version>.mar` from a trained model directory (weights + model card); returns its path."""
    config = config or ArchiveConfig()
    check_version(version)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise NotFound(f"{model_dir}: no {WEIGHTS} (train a model first: rrp train)")
    from trainer.vision.train import load_model

    try:
        model = load_model(weights)  # refuses anything that is not an rrp-vision safetensors file
    except Exception as exc:  # safetensors raises its own error type for a file that is not one
        raise InvalidArgument(f"{weights}: not an rrp-vision safetensors file ({exc})") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{config.name}-{version}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        (staging / "model-config.yaml").write_text(config.model_config_yaml())
        extras = [str(model_dir / f) for f in CARD_FILES if (model_dir / f).is_file()]
        serving_info = {
            "name": config.name,
            "version": version,
            "input": {"width": model.config.width, "height": model.config.height},
            "model_config": config.model_config_yaml(),
            "format": config.format,
        }
        (staging / "serving.json").write_text(json.dumps(serving_info, indent=2) + "\n")
        extras.append(str(staging / "serving.json"))
        serialized, handler = weights, HANDLER
        if config.format == "onnx":
            from trainer.vision.export import ONNX_FILE, export_onnx

            # The ONNX file is what the handler runs; the weights travel beside it, as the model's source.
            serialized, handler = export_onnx(model, staging / ONNX_FILE), ONNX_HANDLER
            extras.append(str(weights))
        cmd = [
            *archiver_command(),
            "--model-name", config.name,
            "--version", version,
            "--serialized-file", str(serialized),
            "--handler", str(handler),
            "--config-file", str(staging / "model-config.yaml"),
            "--extra-files", ",".join(extras),
            "--export-path", str(staging),
            "--force",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise FailedPrecondition(f"torch-model-archiver failed: {done.stderr.strip()[-2000:]}")
        built = staging / f"{config.name}.mar"
        tmp_target = target.with_suffix(".mar.tmp")
        shutil.copyfile(built, tmp_target)
        tmp_target.replace(target)
    log.info("model archive %s (%d KB)", target, target.stat().st_size // 1024)
    return target


def archive_info(archive: Path) -> dict[str, Any]:
    """What `build_archive` recorded in the archive: name, version and the model's input size."""
    import zipfile

    try:
        with zipfile.ZipFile(archive) as z:
            return dict(json.loads(z.read("serving.json")))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InvalidArgument(f"{archive}: not an archive built by rrp package ({exc})") from None
