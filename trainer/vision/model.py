"""The vision autopilot network: a small CNN from a raw uint8 camera frame and the speed to two 3-way key heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from game_server.core.physics import TOP_SPEED
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT
from plumbing.settings import setting

# Head classes. Two 3-way heads instead of four independent keys: the net cannot ask for forward and
# back (or left and right) at once, and "no key" is a class of its own rather than the absence of two.
THROTTLE_NONE, THROTTLE_FORWARD, THROTTLE_BACK = 0, 1, 2
STEER_NONE, STEER_LEFT, STEER_RIGHT = 0, 1, 2
N_CLASSES = 3
N_LOGITS = 2 * N_CLASSES  # [throttle logits (3), steering logits (3)]
CRAWL_SCALE_M_PER_S = 5.0


@dataclass(frozen=True)
class VisionConfig:
    """The network's shape: input resolution, conv channel widths, hidden units and the init seed."""

    width: int = setting(128, "model input width, pixels")
    height: int = setting(96, "model input height, pixels")
    channels: tuple[int, ...] = setting((16, 32, 48, 64), "channels of each conv layer")
    hidden: int = setting(128, "hidden units of the head")
    # At a scale of 50 m/s, crawling forward and backing out differ by ~0.02: a net read them alike and dithered
    # between forward and back while turning round. The same speed at crawl scale tells them apart.
    crawl_speed: bool = setting(True, "the speed also enters at crawl scale (m/s / 5, clipped to +-1)")
    seed: int = setting(0, "seed of data, initialisation, order and augmentation")

    def __post_init__(self) -> None:
        stride = 2 ** len(self.channels)
        if self.width % stride or self.height % stride:
            raise ValueError(f"width and height must be multiples of {stride} (one halving per conv layer)")
        if not self.channels or min(self.channels) < 1 or self.hidden < 1:
            raise ValueError("channels and hidden units must be positive")


class DrivingNet(nn.Module):
    """frames (N, H, W, 3) uint8 RGB as the renderer gives them, speed (N,) m/s -> logits (N, 6).

    Normalisation happens inside, so the exported TorchScript model takes the renderer's bytes as they are:
    each frame is standardised by its own mean and spread, which makes the net indifferent to the global
    brightness and contrast that domain randomisation varies. Convolutions keep the layout (flattened, not
    pooled) because where the road edges are in the picture is what decides the steering.

    `forward` adds `decision_offset` to the logits the net computes (`raw_logits`). A net trained with class
    weights w_y learns scores proportional to w_y p(y|x), so its argmax presses rare keys more often than the
    teacher did; training stores -log w_y here (logit adjustment), and every consumer of the model (the
    pilot, TorchScript, the model server) then decides on the teacher's most likely keys. It is a buffer, so it
    travels in the weights file and the export.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(config.channels):
            kernel = 5 if i == 0 else 3
            layers += [nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        stride = 2 ** len(config.channels)
        flat = c_in * (config.height // stride) * (config.width // stride)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(flat, config.hidden), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(config.hidden + 1 + int(config.crawl_speed), config.hidden // 2),
            nn.ReLU(),
            nn.Linear(config.hidden // 2, N_LOGITS),
        )
        self.decision_offset: torch.Tensor
        self.register_buffer("decision_offset", torch.zeros(N_LOGITS))

    def forward(self, frames: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
        return self.raw_logits(frames, speed) + self.decision_offset

    def raw_logits(self, frames: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
        """The net's own scores, without the decision offset: what the training loss sees."""
        x = frames.permute(0, 3, 1, 2).float()
        centred = x - _frame_mean(x)
        x = centred / (_frame_mean(centred.square()).sqrt() + 1.0)
        z = self.trunk(self.features(x))
        v = speed.float().reshape(-1, 1)
        inputs = [z, v / TOP_SPEED]
        if self.config.crawl_speed:
            inputs.append((v / CRAWL_SCALE_M_PER_S).clamp(-1.0, 1.0))
        return self.head(torch.cat(inputs, dim=1))


def _frame_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of each (C, H, W) frame, in three short reductions: one reduction over the 36,864 values of a
    128x96 frame sums them in float32 one by one in some runtimes (onnxruntime), whose rounding then moves the
    logits by ~1e-4; short sums keep every runtime within ~5e-6 of PyTorch."""
    return x.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)


def build_model(config: VisionConfig) -> DrivingNet:
    """A freshly initialised network; the same config (seed included) gives the same weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    model = DrivingNet(config)
    torch.random.set_rng_state(generator_state)
    return model


def mask_targets(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Control masks -> (throttle class, steering class); pressing both keys of a pair counts as neither."""
    m = masks.long()
    fwd, back = (m & FORWARD) > 0, (m & BACK) > 0
    left, right = (m & LEFT) > 0, (m & RIGHT) > 0
    throttle = torch.where(fwd & ~back, THROTTLE_FORWARD, torch.where(back & ~fwd, THROTTLE_BACK, THROTTLE_NONE))
    steer = torch.where(left & ~right, STEER_LEFT, torch.where(right & ~left, STEER_RIGHT, STEER_NONE))
    return throttle, steer


def decide(logits: torch.Tensor) -> torch.Tensor:
    """The keys to press: the most likely class of each head, as (N,) int64 control masks."""
    throttle = logits[:, :N_CLASSES].argmax(dim=1)
    steer = logits[:, N_CLASSES:].argmax(dim=1)
    throttle_bits = torch.where(throttle == THROTTLE_FORWARD, FORWARD, torch.where(throttle == THROTTLE_BACK, BACK, 0))
    steer_bits = torch.where(steer == STEER_LEFT, LEFT, torch.where(steer == STEER_RIGHT, RIGHT, 0))
    return throttle_bits | steer_bits
