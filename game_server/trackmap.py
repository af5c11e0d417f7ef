"""Pictures of tracks and laps: the map with a driven line, and strips of camera frames."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection

from game_server.core.track import Track


def draw_track(ax: Axes, track: Track) -> None:
    def closed(a: np.ndarray) -> np.ndarray:
        return np.vstack([a, a[:1]])

    left, right = closed(track.left_wall), closed(track.right_wall)
    ax.fill(
        np.concatenate([left[:, 0], right[::-1, 0]]),
        np.concatenate([left[:, 1], right[::-1, 1]]),
        color="0.85",
        zorder=0,
    )
    ax.plot(left[:, 0], left[:, 1], color="0.2", lw=1.2)
    ax.plot(right[:, 0], right[:, 1], color="0.2", lw=1.2)
    c = closed(track.centerline)
    ax.plot(c[:, 0], c[:, 1], color="0.6", lw=0.6, ls="--")
    for gate in track.checkpoints:
        ax.plot([gate.ax, gate.bx], [gate.ay, gate.by], color="tab:blue", lw=0.6, alpha=0.6)
    s = track.start_line
    ax.plot([s.ax, s.bx], [s.ay, s.by], color="tab:red", lw=2.5, label="start/finish")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_laps(
    track: Track,
    laps: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    path: Path,
    title: str,
) -> None:
    """Each lap is (label, x, y, speed); the first is coloured by speed, the others drawn as plain lines."""
    fig, ax = plt.subplots(figsize=(9, 7))
    draw_track(ax, track)
    for i, (label, x, y, speed) in enumerate(laps):
        if i == 0:
            pts = np.stack([x, y], axis=1)
            segs = np.stack([pts[:-1], pts[1:]], axis=1)
            lc = LineCollection(list(segs), cmap="viridis", linewidths=2.0)
            lc.set_array(np.asarray(speed[1:]))
            ax.add_collection(lc)
            fig.colorbar(lc, ax=ax, shrink=0.7, label=f"{label}: speed (m/s)")
        else:
            ax.plot(x, y, lw=1.2, label=label)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lap_grid(
    panels: Sequence[tuple[Track, Sequence[tuple[str, np.ndarray, np.ndarray]]]],
    path: Path,
    title: str,
    columns: int = 6,
) -> None:
    """One small map per track with its driven lines (label, x, y), so a whole suite is seen at a glance."""
    rows = max(1, (len(panels) + columns - 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (track, laps) in zip(axes.flat, panels, strict=False):
        draw_track(ax, track)
        for label, x, y in laps:
            ax.plot(x, y, lw=1.0, label=label)
        ax.set_title(track.name, fontsize=9)
        ax.legend(loc="upper right", fontsize=5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_frame_strip(frames: Sequence[np.ndarray], captions: Sequence[str], path: Path, columns: int = 6) -> None:
    rows = (len(frames) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, frame, caption in zip(axes.flat, frames, captions, strict=False):
        ax.imshow(frame)
        ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
