"""The tiny vision model the serving tests serve: trained for a few seconds, so that its keys change along a lap."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from game_server.core.drivers import default_driver
from trainer.vision.data import generate_samples
from trainer.vision.model import VisionConfig
from trainer.vision.train import TrainConfig, save_weights, train

# One speed input, as models saved before the crawl-scale one (which the main job's snapshot has): so the
# serving stack is tested with both heads. Three epochs on 240 frames give a net that barely drives, and with
# the second input this one pressed forward and back in turn at the start line instead.
SMALL = VisionConfig(width=64, height=48, channels=(8, 16, 16, 16), hidden=32, seed=3, crawl_speed=False)
TINY_OFFSET = torch.tensor([0.5, 0.5, 0.5, -0.25, -0.25, -0.25])


def train_tiny(out: Path, epochs: int = 3, card: dict[str, object] | None = None) -> Path:
    """`out/model.safetensors` and a model card; returns `out`."""
    frames = generate_samples(["oval", "kidney"], 2, 60, default_driver(), 0.1, seed=5, size=(64, 48))
    # Barely trained, the prior-corrected decisions would press the same keys all lap, so it decides by argmax;
    # its offset moves each head's logits by one constant, which shows in the logits a server answers (the
    # offset travels with the weights) and leaves every decision as it was.
    config = TrainConfig(
        vision=SMALL, epochs=epochs, batch_size=32, lr=3e-3, patience=10, progress=False, seed=1, decision_prior=0.0
    )
    model = train(config, frames).model
    with torch.no_grad():
        model.decision_offset.copy_(TINY_OFFSET)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    (out / "model_card.json").write_text(json.dumps(card or {"model": "test"}) + "\n")
    (out / "model_card.md").write_text("# test model\n")
    return out
