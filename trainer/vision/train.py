"""Supervised training of the vision model: seeded, early-stopped, saved as safetensors + TorchScript + model card."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional
from tqdm import tqdm

from game_server.core import drivers
from game_server.core.driver_file import load_driver
from game_server.core.tracks import TRAINING_TRACKS
from plumbing.errors import FailedPrecondition
from plumbing.settings import nested, setting
from trainer.vision.data import (
    AugmentConfig,
    FrameSet,
    augment,
    class_weights,
    frames_from_source,
    generate_samples,
    split_frames,
)
from trainer.vision.model import N_CLASSES, N_LOGITS, DrivingNet, VisionConfig, build_model, decide, mask_targets

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.ts"
MODEL_CARD_MD = "model_card.md"
MODEL_CARD_JSON = "model_card.json"
HISTORY_PNG = "training_curve.png"


@dataclass(frozen=True)
class DataConfig:
    """Where training frames come from: Redis, exported shards, or rolled out in this process (the fallback)."""

    redis_url: str | None = setting(
        None, "read recorded runs from this Redis URL (password from RRP_REDIS_PASSWORD)", flag="redis", env="redis_url"
    )
    redis_prefix: str = setting("rrp:", "key prefix of the collector's Redis data")
    shards: Path | None = setting(None, "read runs exported by `rrp data export` from this folder")
    generate: bool = setting(False, "roll the driver out in this process (the source when no other is given)")
    # In-process generation: the same episode loop and perturbation model as recording on a game server.
    tracks: tuple[str, ...] = setting(TRAINING_TRACKS, "generated data: tracks to drive (never the unseen ones)")
    episodes: int = setting(3, "generated data: episodes per track (the first from the start line)")
    ticks: int = setting(500, "generated data: ticks per episode at most")
    perturb_prob: float = setting(0.04, "generated data: per-tick probability that a perturbation starts")
    randomize: bool = setting(True, "generated data: domain randomisation of the frames")
    # The evolved driver labels and drives; the hand-set default driver otherwise.
    driver_path: Path | None = setting(None, "evolved driver file (best_driver.json)", flag="driver")
    seed: int = setting(0, "seed of data, initialisation, order and augmentation")

    def __post_init__(self) -> None:
        if sum((bool(self.redis_url), self.shards is not None, self.generate)) > 1:
            raise ValueError("give one data source: --redis, --shards or --generate")

    def driver(self) -> drivers.RayDriver:
        return load_driver(self.driver_path).ray_driver() if self.driver_path else drivers.default_driver()

    def describe(self) -> str:
        if self.redis_url:
            return f"redis {self.redis_url} (prefix {self.redis_prefix})"
        if self.shards:
            return f"shards {self.shards}"
        return (
            f"generated in process: {len(self.tracks)} tracks x {self.episodes} episodes x <= {self.ticks} ticks, "
            f"perturbation {self.perturb_prob}, randomised {self.randomize}, driver {self.driver_path or 'default'}"
        )


def load_frames(
    config: DataConfig, size: tuple[int, int], progress: bool = True, redis_password: str | None = None
) -> FrameSet:
    """All frames of the configured source at the model's resolution; the password is passed apart from the
    config so that it never reaches the model card."""
    if config.redis_url:
        from trainer.data.redis_source import RedisRuns

        return frames_from_source(
            RedisRuns(config.redis_url, config.redis_prefix, password=redis_password), size, progress=progress
        )
    if config.shards:
        from trainer.data.shards import ShardSet

        return frames_from_source(ShardSet(config.shards), size, progress=progress)
    return generate_samples(
        config.tracks,
        config.episodes,
        config.ticks,
        config.driver(),
        config.perturb_prob,
        config.seed,
        size,
        config.randomize,
        progress=progress,
    )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; the defaults train on 2 CPU cores in a few minutes."""

    vision: VisionConfig = nested(VisionConfig)
    epochs: int = setting(12, "epochs at most")
    batch_size: int = setting(128, "frames per step")
    lr: float = setting(2e-3, "peak learning rate (one-cycle)")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    # Epochs without a better validation exact-mask accuracy before stopping. Accuracy, not loss: the loss
    # rises as the net grows confident on ambiguous bang-bang frames while the keys it picks still improve.
    patience: int = setting(4, "epochs without a better validation exact-mask accuracy before stopping")
    # "best": the epoch with the best validation exact-mask accuracy; "last": the end of the schedule, for
    # fine-tuning (DAgger), where a mid-schedule epoch at peak learning rate drives worse than the end.
    keep: Literal["best", "last"] = setting("best", "weights kept: the best validation epoch, or the last")
    val_fraction: float = setting(0.2, "share of runs (or tracks) held out for validation")
    split_by: Literal["run", "track"] = setting("run", "hold out whole runs or whole tracks")
    augment: bool = setting(True, "photometric and geometric jitter of training batches")
    augmentation: AugmentConfig = nested(AugmentConfig, prefix="augment_")
    balance: bool = setting(True, "class weights in the loss, so rare keys count")
    decision_prior: float = setting(
        1.0,
        "share of the class weights' log taken off the logits when deciding (logit adjustment: the keys the "
        "teacher most likely pressed; 0: argmax of the weighted net)",
    )
    threads: int = setting(2, "torch threads (fixed, for reproducibility)")
    # The same seed gives the same model on the same device; a GPU's kernels round differently from the CPU's.
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train: auto (CUDA when present), cpu or cuda")
    # bfloat16 autocast of the training steps (weights, optimiser, loss and validation stay float32; the served
    # model is float32 either way). On this project's AVX512-BF16 CPUs an epoch takes ~26% less time, but in two
    # paired main-job trainings (seeds 0 and 1) the bf16 models finished fewer suite tracks (technical 35/80
    # against 46/80, built-in 10/12 against 12/12), so float32 stays the default. "auto": bf16 where the device
    # computes it natively (AVX512-BF16 or AMX CPUs, Ampere and later GPUs), float32 elsewhere.
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "fp32", "training steps' arithmetic: fp32, bf16 (autocast) or auto (bf16 where the device has it natively)"
    )
    # Batches are gathered and augmented on a background thread while the device trains on earlier ones.
    prefetch_batches: int = setting(2, "batches prepared ahead of training (0: prepare each in turn)")
    seed: int = setting(0, "seed of data, initialisation, order and augmentation")
    # Off by default: a model must depend on its seed and data, never on how busy the machine was.
    time_limit_s: float | None = setting(None, "optional: stop after the epoch that crosses this many seconds")
    progress: bool = setting(True, "progress bars", cli=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.decision_prior) or self.decision_prior < 0:
            raise ValueError(f"decision_prior must be a finite share >= 0, got {self.decision_prior}")
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {self.prefetch_batches}")


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    throttle_acc: float
    steer_acc: float
    exact_acc: float  # both heads right: the decided mask equals the expert's
    seconds: float


@dataclass
class TrainResult:
    model: DrivingNet
    history: list[EpochMetrics]
    best_epoch: int
    train_frames: int
    val_frames: int
    seconds: float
    frames_per_s: float
    device: str = "cpu"  # where it trained: "cpu", or the GPU's name
    precision: str = "fp32"  # the training steps' arithmetic: "fp32" or "bf16" (autocast)

    @property
    def best(self) -> EpochMetrics:
        return self.history[self.best_epoch - 1]


def resolve_device(choice: str) -> torch.device:
    """The device a training run uses: CUDA when asked for or, with "auto", when present; CPU otherwise."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        raise FailedPrecondition(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, CUDA {built}); "
            "train with --device auto or --device cpu, or install a CUDA build of PyTorch on a machine with a GPU"
        )
    # cuBLAS picks deterministic kernels only with a fixed workspace, set before its first use.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.device("cuda")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (elsewhere autocast emulates it, slower than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(choice: str, device: torch.device) -> torch.dtype:
    """The dtype of the training steps' autocast: float32 (no autocast) or bfloat16."""
    if choice not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {choice!r}")
    if choice == "bf16" or (choice == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def seed_everything(seed: int, threads: int, device: torch.device | None = None) -> None:
    """The one seeding block: Python, NumPy and torch, deterministic kernels, a fixed thread count (reductions
    split over another number of threads round differently).

    On CUDA an operation without a deterministic kernel warns instead of failing: a GPU run is reproducible
    as far as its kernels allow, a CPU run bit for bit."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator
    on_cuda = device is not None and device.type == "cuda"
    torch.use_deterministic_algorithms(True, warn_only=on_cuda)
    if on_cuda:
        torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)


def head_losses(
    logits: torch.Tensor, masks: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    throttle, steer = mask_targets(masks)
    wt, ws = weights if weights is not None else (None, None)
    return functional.cross_entropy(logits[:, :N_CLASSES], throttle, weight=wt) + functional.cross_entropy(
        logits[:, N_CLASSES:], steer, weight=ws
    )


@torch.inference_mode()
def evaluate_offline(model: DrivingNet, frames: FrameSet, batch_size: int = 512) -> dict[str, float]:
    """Unweighted loss and accuracies of both heads on held-out frames, on the model's device."""
    model.eval()
    device = model.decision_offset.device
    n = len(frames)
    loss = 0.0
    right = np.zeros(3)
    for start in range(0, n, batch_size):
        images = torch.from_numpy(frames.images[start : start + batch_size]).to(device)
        speeds = torch.from_numpy(frames.speeds[start : start + batch_size]).to(device)
        masks = torch.from_numpy(frames.labels[start : start + batch_size].astype(np.int64)).to(device)
        logits = model(images, speeds)
        loss += float(head_losses(logits, masks, None)) * len(masks)
        throttle, steer = mask_targets(masks)
        ok_t = logits[:, :N_CLASSES].argmax(1) == throttle
        ok_s = logits[:, N_CLASSES:].argmax(1) == steer
        right += [int(ok_t.sum()), int(ok_s.sum()), int((ok_t & ok_s).sum())]
    d = max(n, 1)
    return {
        "loss": loss / d,
        "throttle_acc": float(right[0] / d),
        "steer_acc": float(right[1] / d),
        "exact_acc": float(right[2] / d),
    }


def train(
    config: TrainConfig, frames: FrameSet, init: DrivingNet | None = None, val: FrameSet | None = None
) -> TrainResult:
    """Trains on a run-wise split of `frames`; keeps the weights of the epoch with the best validation accuracy.

    `init` continues from existing weights (DAgger); otherwise the net starts from `config.vision.seed`.
    `val`, when given, is the validation set and all of `frames` is trained on (learning curves hold it fixed).
    The model trains on `config.device` and is returned on the CPU.
    """
    device = resolve_device(config.device)
    seed_everything(config.seed, config.threads, device)
    dtype = resolve_precision(config.precision, device)
    log.info("training on %s in %s", device_name(device), "bfloat16 autocast" if dtype == torch.bfloat16 else "float32")
    if val is None:
        train_idx, val_idx = split_frames(frames, config.val_fraction, config.seed, config.split_by)
        train_set, val_set = frames.take(train_idx), frames.take(val_idx)
    else:
        train_set, val_set = frames, val
    model = build_model(config.vision)
    if init is not None:
        model.load_state_dict(init.state_dict())
    weights = class_weights(train_set.labels) if config.balance else None
    # Set before the first epoch, so validation (and the choice of the best epoch) measures the decisions the
    # car will make; the loss reads the raw logits and never sees it.
    with torch.no_grad():
        model.decision_offset.copy_(decision_offset(weights, config.decision_prior))
    model.to(device)
    device_weights = None if weights is None else (weights[0].to(device), weights[1].to(device))
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, -(-len(train_set) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _Batches(train_set, config, generator, pin=device.type == "cuda")
    history: list[EpochMetrics] = []
    best_score, best_epoch, best_state = -1.0, 0, model.state_dict()
    t_start = time.perf_counter()
    trained = 0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        bar = tqdm(
            batches.epoch(), total=batches.per_epoch, desc=f"epoch {epoch}", disable=not config.progress, leave=False
        )
        for x, v, m in bar:
            x, v, m = (t.to(device, non_blocking=True) for t in (x, v, m))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = head_losses(model.raw_logits(x, v), m, device_weights)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            batch_loss = loss.item()
            total += batch_loss * len(m)
            trained += len(m)
            bar.set_postfix(loss=f"{batch_loss:.3f}")
        metrics = evaluate_offline(model, val_set) if len(val_set) else evaluate_offline(model, train_set)
        history.append(
            EpochMetrics(
                epoch,
                total / max(len(train_set), 1),
                metrics["loss"],
                metrics["throttle_acc"],
                metrics["steer_acc"],
                metrics["exact_acc"],
                time.perf_counter() - t0,
            )
        )
        h = history[-1]
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, throttle %.3f, steering %.3f, exact %.3f (%.1f s)",
            epoch,
            h.train_loss,
            h.val_loss,
            h.throttle_acc,
            h.steer_acc,
            h.exact_acc,
            h.seconds,
        )
        if h.exact_acc > best_score:
            best_score, best_epoch = h.exact_acc, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        elif config.keep == "best" and epoch - best_epoch >= config.patience:
            log.info("early stop: no better validation exact-mask accuracy for %d epochs", config.patience)
            break
        if config.time_limit_s is not None and time.perf_counter() - t_start > config.time_limit_s:
            log.warning("time limit of %.0f s reached after epoch %d", config.time_limit_s, epoch)
            break
    if config.keep == "best":
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    model.to("cpu").eval()
    seconds = time.perf_counter() - t_start
    return TrainResult(
        model,
        history,
        best_epoch,
        len(train_set),
        len(val_set),
        seconds,
        trained / seconds,
        device_name(device),
        "bf16" if dtype == torch.bfloat16 else "fp32",
    )


class _Batches:
    """An epoch's training batches (frames, speeds, masks), gathered and augmented on a background thread.

    One worker thread prepares batches in order, `prefetch_batches` ahead of the training step, so
    augmentation runs beside the forward and backward passes instead of between them. The epoch's order
    and every augmentation draw come from one generator, used by one thread at a time in the same sequence
    as preparing each batch in turn: the batches, and the model, are the same with or without prefetching.
    """

    def __init__(self, frames: FrameSet, config: TrainConfig, generator: torch.Generator, pin: bool) -> None:
        self.images, self.speeds = torch.from_numpy(frames.images), torch.from_numpy(frames.speeds)
        self.labels = torch.from_numpy(frames.labels.astype(np.int64))
        self.config = config
        self.generator = generator
        self.pin = pin  # page-locked batches copy to a GPU asynchronously
        self.per_epoch = -(-len(frames) // config.batch_size)

    def _prepare(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, m = self.images[idx], self.labels[idx]
        if self.config.augment:
            x, m = augment(x, m, self.config.augmentation, self.generator)
        batch = (x, self.speeds[idx], m)
        return tuple(t.pin_memory() for t in batch) if self.pin else batch  # type: ignore[return-value]

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # Drawn here, after the previous epoch's batches were all prepared: the generator's sequence is fixed.
        order = torch.randperm(len(self.images), generator=self.generator)
        slices = (
            order[start : start + self.config.batch_size] for start in range(0, len(order), self.config.batch_size)
        )
        ahead = self.config.prefetch_batches
        if ahead == 0:
            yield from map(self._prepare, slices)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="augment") as worker:
            pending: deque[Future[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = deque()
            for idx in slices:
                pending.append(worker.submit(self._prepare, idx))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def decision_offset(weights: tuple[torch.Tensor, torch.Tensor] | None, share: float) -> torch.Tensor:
    """-share * log w per logit (throttle then steering); zeros when training used no class weights."""
    if weights is None or share == 0.0:
        return torch.zeros(N_LOGITS)
    return -share * torch.log(torch.cat(weights))


# -- artefacts ------------------------------------------------------------------------------------------------


def save_weights(model: DrivingNet, path: Path) -> None:
    """safetensors with the network config in its metadata, written atomically (no half-written weights)."""
    tmp = path.with_suffix(".tmp")
    # One metadata entry: safetensors writes its metadata map in a per-process order, so several entries
    # would make the same weights different bytes, and a content hash of the file would not identify them.
    header = {"format": "rrp-vision", "version": "1", "config": dataclasses.asdict(model.config)}
    meta = {"rrp-vision": json.dumps(header, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_model(path: Path) -> DrivingNet:
    """A model from its safetensors file, in eval mode; refuses files of another format."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        # The one-entry header; files written before it carry the same fields as separate entries.
        header = json.loads(meta["rrp-vision"]) if "rrp-vision" in meta else dict(meta)
        if header.get("format") != "rrp-vision":
            raise ValueError(f"{path}: not an rrp-vision weights file")
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    raw = header["config"] if isinstance(header["config"], dict) else json.loads(header["config"])
    # Files written before the crawl-scale speed input have a head without it.
    config = VisionConfig(**{"crawl_speed": False, **raw, "channels": tuple(raw["channels"])})
    model = DrivingNet(config)
    # Files written before the decision offset existed decide by plain argmax.
    state.setdefault("decision_offset", torch.zeros(N_LOGITS))
    model.load_state_dict(state)
    return model.eval()


def export_torchscript(model: DrivingNet, path: Path) -> torch.jit.ScriptModule:
    """A traced TorchScript module for serving: (N, H, W, 3) uint8 frames and (N,) speeds -> (N, 6) logits."""
    model.eval()
    c = model.config
    example = (torch.zeros(1, c.height, c.width, 3, dtype=torch.uint8), torch.zeros(1))
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    tmp = path.with_suffix(".tmp")
    torch.jit.save(traced, str(tmp))
    os.replace(tmp, path)
    return traced


def save_training_run(
    result: TrainResult, config: TrainConfig, data: DataConfig, frames: FrameSet, out_dir: Path
) -> dict[str, Any]:
    """Weights, TorchScript, learning curve and the model card beside them; returns the card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(result.model, out_dir / WEIGHTS)
    traced = export_torchscript(result.model, out_dir / TORCHSCRIPT)
    c = config.vision
    probe = (torch.from_numpy(frames.images[:8]), torch.from_numpy(frames.speeds[:8]))
    with torch.no_grad():
        agree = bool(torch.equal(decide(traced(*probe)), decide(result.model(*probe))))
    card: dict[str, Any] = {
        "model": "rrp-vision DrivingNet",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seed": config.seed,
        "input": f"frames (N, {c.height}, {c.width}, 3) uint8 RGB + speed (N,) m/s",
        "output": "logits (N, 6): throttle [none, forward, back], steering [none, left, right]",
        "decision_offset": [round(float(v), 6) for v in result.model.decision_offset],
        "data": {
            "source": data.describe(),
            **frames.summary(),
            "train_frames": result.train_frames,
            "val_frames": result.val_frames,
            "split_by": config.split_by,
        },
        "metrics": {"best_epoch": result.best_epoch, **dataclasses.asdict(result.best)},
        "training": {
            "seconds": round(result.seconds, 1),
            "frames_per_s": round(result.frames_per_s, 1),
            "epochs_run": len(result.history),
            "device": result.device,
            "precision": result.precision,
            "torch": torch.__version__,
            "torchscript_agrees": agree,
        },
        "settings": _jsonable(dataclasses.asdict(config)),
        "data_settings": _jsonable(dataclasses.asdict(data)),
        "history": [dataclasses.asdict(h) for h in result.history],
        "files": {"weights": WEIGHTS, "torchscript": TORCHSCRIPT},
    }
    (out_dir / MODEL_CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / MODEL_CARD_MD).write_text(_card_markdown(card))
    plot_history(result.history, out_dir / HISTORY_PNG)
    return card


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _card_markdown(card: dict[str, Any]) -> str:
    d, m, t = card["data"], card["metrics"], card["training"]
    rows = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h['throttle_acc']:.3f} | "
        f"{h['steer_acc']:.3f} | {h['exact_acc']:.3f} |"
        for h in card["history"]
    )
    return f"""# Model card: {card["model"]}

- Date: {card["date"]}; seed {card["seed"]}; torch {t["torch"]}
- Input: {card["input"]}
- Output: {card["output"]}; keys = argmax of each head
- Decision offset (-{card["settings"]["decision_prior"]} x log of the training class weights, in the logits):
  {card["decision_offset"]}

## Data
- Source: {d["source"]}
- {d["frames"]} frames in {d["runs"]} runs on {len(d["tracks"])} tracks ({", ".join(d["tracks"])}), {d["resolution"]}
- Split by {d["split_by"]}: {d["train_frames"]} training frames, {d["val_frames"]} validation frames

## Metrics (validation, best epoch {m["best_epoch"]})
- Throttle accuracy {m["throttle_acc"]:.3f}, steering accuracy {m["steer_acc"]:.3f}, exact mask {m["exact_acc"]:.3f}
- Training: {t["seconds"]} s, {t["frames_per_s"]} frames/s, {t["epochs_run"]} epochs;
  TorchScript export agrees with the eager model: {t["torchscript_agrees"]}

| epoch | train loss | val loss | throttle acc | steering acc | exact acc |
| --- | --- | --- | --- | --- | --- |
{rows}

## Settings
```json
{json.dumps(card["settings"], indent=2)}
```
"""


def plot_history(history: Sequence[EpochMetrics], path: Path) -> None:
    epochs = [h.epoch for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h.train_loss for h in history], marker="o", label="train (weighted, augmented)")
    a.plot(epochs, [h.val_loss for h in history], marker="o", label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    for name in ("throttle_acc", "steer_acc", "exact_acc"):
        b.plot(epochs, [getattr(h, name) for h in history], marker="o", label=name)
    b.set_xlabel("epoch")
    b.set_ylabel("validation accuracy")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
