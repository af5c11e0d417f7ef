"""The evolved driver as a versioned JSON file that later stages (collection, labelling) load."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from game_server.core import drivers

DRIVER_FORMAT = "rrp-driver"
DRIVER_VERSION = 1


@dataclass(frozen=True)
class SavedDriver:
    """An open-loop program (masks from the base state of `track`) or closed-loop driver parameters."""

    kind: str  # "program" or a driver family such as "rays-v1"
    track: str
    lap_ticks: int
    cost: float
    generation: int
    masks: bytes = b""
    params: tuple[float, ...] = ()
    baseline_lap_ticks: int = 0

    @property
    def driver_id(self) -> str:
        """A content hash: two files with the same driver share it, whatever their names."""
        body = self.masks if self.kind == "program" else json.dumps(list(self.params)).encode()
        return hashlib.sha256(self.kind.encode() + b"\0" + body).hexdigest()[:12]

    def ray_driver(self) -> drivers.RayDriver:
        if self.kind == "program":
            raise ValueError("an open-loop program is not a closed-loop driver")
        return drivers.RayDriver(self.params, self.kind)


def save_driver(path: Path, d: SavedDriver) -> Path:
    doc: dict[str, Any] = {
        "format": DRIVER_FORMAT,
        "version": DRIVER_VERSION,
        "driver_id": d.driver_id,
        "kind": d.kind,
        "track": d.track,
        "lap_ticks": d.lap_ticks,
        "baseline_lap_ticks": d.baseline_lap_ticks,
        "cost": d.cost,
        "generation": d.generation,
    }
    if d.kind == "program":
        doc["masks_b64"] = base64.b64encode(d.masks).decode()
    else:
        doc["params"] = list(d.params)
        doc["param_names"] = [name for name, _, _ in drivers.PARAM_SPEC]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_driver(path: Path) -> SavedDriver:
    """Reads and checks a driver file; a wrong format, version or a tampered body is refused."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != DRIVER_FORMAT or doc.get("version") != DRIVER_VERSION:
        raise ValueError(f"{path}: not a version-{DRIVER_VERSION} {DRIVER_FORMAT} file")
    kind = str(doc["kind"])
    masks = base64.b64decode(doc["masks_b64"]) if kind == "program" else b""
    params = tuple(float(p) for p in doc.get("params", ()))
    if kind != "program":
        drivers.validate_params(kind, params)
    saved = SavedDriver(
        kind=kind,
        track=str(doc["track"]),
        lap_ticks=int(doc["lap_ticks"]),
        cost=float(doc["cost"]),
        generation=int(doc["generation"]),
        masks=masks,
        params=params,
        baseline_lap_ticks=int(doc.get("baseline_lap_ticks", 0)),
    )
    if saved.driver_id != doc.get("driver_id"):
        raise ValueError(f"{path}: driver_id does not match its content")
    return saved
