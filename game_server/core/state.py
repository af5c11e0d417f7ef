"""Immutable simulation state: what a tick reads and writes, and what Reset restores bit for bit."""

from __future__ import annotations

from dataclasses import dataclass, field

TICK_HZ = 25
TICK_S = 1.0 / TICK_HZ

# Control mask bits, one byte per tick in a control program.
FORWARD = 1
BACK = 2
LEFT = 4
RIGHT = 8
VALID_MASK_BITS = FORWARD | BACK | LEFT | RIGHT


def mask_of(forward: bool = False, back: bool = False, left: bool = False, right: bool = False) -> int:
    return (FORWARD if forward else 0) | (BACK if back else 0) | (LEFT if left else 0) | (RIGHT if right else 0)


@dataclass(frozen=True, slots=True)
class CarState:
    """Position (m), heading (rad, CCW from +x, in [-pi, pi)) and signed speed (m/s)."""

    x: float
    y: float
    heading: float
    speed: float = 0.0


@dataclass(frozen=True, slots=True)
class LapState:
    """Lap bookkeeping carried with the car so that a restored state continues identically."""

    next_checkpoint: int = 0
    checkpoints_passed: int = 0
    progress_m: float = 0.0
    arc_m: float = 0.0
    segment: int = 0
    wall_contacts: int = 0
    finished: bool = False
    finish_tick: int = 0


@dataclass(frozen=True, slots=True)
class SimState:
    tick: int
    car: CarState
    lap: LapState = field(default_factory=LapState)


@dataclass(frozen=True, slots=True)
class Gate:
    """Directed segment a->b; crossed when moving from its right side to its left side."""

    ax: float
    ay: float
    bx: float
    by: float
