"""The genetic algorithm (DEAP): open-loop control programs or closed-loop ray drivers, evaluated through
any `map` (the builtin one, or a pool of game servers), checkpointed every generation as JSON."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from deap import base, creator, tools

from game_server.core import drivers
from game_server.core.pilot import drive_lap
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT, TICK_HZ
from game_server.core.tracks import load_track
from plumbing import telemetry
from plumbing.settings import setting
from trainer.fitness import DriverLap, ProgramCost, relative_cost

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "rrp-evolve-checkpoint"
CHECKPOINT_VERSION = 1
KIND_PROGRAM: Final = "program"
KIND_DRIVER: Final = "driver"
GENERATION_SPAN = "ga.generation"
GENERATION_ATTRIBUTE = "rrp.ga.generation"
# The nine key combinations a driver would press (forward+back together is just coasting).
SENSIBLE_MASKS = tuple(t | s for t in (0, FORWARD, BACK) for s in (0, LEFT, RIGHT))

MapFn = Callable[..., Iterable[Any]]

if not hasattr(creator, "RRPFitness"):
    creator.create("RRPFitness", base.Fitness, weights=(-1.0,))
    creator.create("RRPGenome", list, fitness=creator.RRPFitness)


@dataclass(frozen=True)
class EvolveConfig:
    """Settings of one evolution; stored in the checkpoint so that a resumed run is the same run."""

    track: str = setting("kidney", "training track: a built-in or gen-<seed>")
    kind: Literal["program", "driver"] = setting(KIND_PROGRAM, "individuals: open-loop programs or ray drivers")
    population: int = setting(32, "individuals per generation")
    generations: int = setting(10, "generations after the initial one")
    seed: int = setting(0, "seed of the whole run")
    # Closed-loop drivers are also scored on these tracks, so that they generalise.
    extra_tracks: tuple[str, ...] = setting((), "driver kind: more tracks to average over, a,b,...")
    crossover_prob: float = setting(0.5, "probability that a pair is crossed over")
    mutation_prob: float = setting(0.6, "probability that an individual mutates")
    elite: int = setting(2, "best individuals kept unchanged each generation")
    tournament: int = setting(3, "tournament size of the selection")
    budget_factor: float = setting(1.6, "tick budget of a lap as a multiple of the reference lap")

    def __post_init__(self) -> None:
        if self.kind not in (KIND_PROGRAM, KIND_DRIVER):
            raise ValueError(f"kind must be {KIND_PROGRAM!r} or {KIND_DRIVER!r}")
        if self.population < 4 or self.generations < 1:
            raise ValueError("population >= 4 and generations >= 1")
        if not 0 <= self.elite < self.population:
            raise ValueError("elite must be below the population size")

    @property
    def tracks(self) -> tuple[str, ...]:
        return (self.track, *(t for t in self.extra_tracks if t != self.track))


@dataclass
class Generation:
    """One generation's statistics, as printed and plotted."""

    generation: int
    evaluations: int
    best_cost: float
    median_cost: float
    worst_cost: float
    best_lap_ticks: int  # on the training track; 0 when the best did not finish
    seconds: float


@dataclass
class Reference:
    """The non-learned baseline lap on each track: the reference driver (pure pursuit)."""

    lap_ticks: dict[str, int]
    masks: bytes  # on the training track

    @classmethod
    def compute(cls, tracks: Sequence[str]) -> Reference:
        laps: dict[str, int] = {}
        masks = b""
        for i, name in enumerate(tracks):
            program, result = drive_lap(load_track(name))
            if not result.finished:
                raise RuntimeError(f"the reference driver does not finish {name}")
            laps[name] = result.lap_ticks
            if i == 0:
                masks = program
        return cls(laps, masks)


@dataclass
class EvolveState:
    """Everything a generation boundary holds; what a checkpoint saves."""

    config: EvolveConfig
    generation: int
    population: list[Any]
    best: Any
    history: list[Generation] = field(default_factory=list)


class Evolution:
    """Runs the GA with `toolbox.map` registered by the caller: DEAP's plug-and-play map."""

    def __init__(self, config: EvolveConfig, map_fn: MapFn, reference: Reference | None = None) -> None:
        self.config = config
        self.reference = reference or Reference.compute(config.tracks)
        ref_ticks = self.reference.lap_ticks
        self.budgets = {t: math.ceil(ref_ticks[t] * config.budget_factor) for t in config.tracks}
        self.toolbox = base.Toolbox()
        self.toolbox.register("map", map_fn)
        self.toolbox.register("select", tools.selTournament, tournsize=config.tournament)
        if config.kind == KIND_PROGRAM:
            self.toolbox.register("evaluate", ProgramCost(config.track, self.budgets[config.track]))
            self.toolbox.register("mate", tools.cxTwoPoint)
            self.toolbox.register("mutate", mutate_program)
        else:
            self.toolbox.register("evaluate", DriverLap(drivers.RAYS_V1, self.budgets))
            self.toolbox.register("mate", mate_driver)
            self.toolbox.register("mutate", mutate_driver)

    # -- population -----------------------------------------------------------------------------
    def initial_population(self) -> list[Any]:
        if self.config.kind == KIND_PROGRAM:
            seed = list(self.reference.masks)
            pop = [creator.RRPGenome(seed)]
            while len(pop) < self.config.population:
                (child,) = mutate_program(creator.RRPGenome(seed))
                pop.append(child)
            return pop
        seed_params = list(drivers.default_driver().params)
        pop = [creator.RRPGenome(seed_params)]
        while len(pop) < self.config.population:
            (child,) = mutate_driver(creator.RRPGenome(seed_params), indpb=0.6)
            pop.append(child)
        return pop

    def evaluate(self, individuals: list[Any]) -> int:
        """Scores the individuals without a valid fitness through `toolbox.map`; returns how many."""
        todo = [ind for ind in individuals if not ind.fitness.valid]
        if not todo:
            return 0
        if self.config.kind == KIND_PROGRAM:
            for ind, cost in zip(todo, self.toolbox.map(self.toolbox.evaluate, todo), strict=True):
                ind.fitness.values = (cost,)
            return len(todo)
        tracks = self.config.tracks
        # Track by track: a batch of drivers on one track runs as one population on the game server (its rays and
        # decisions vectorised across cars), where drivers of mixed tracks would run one at a time.
        genomes = [ind for _ in tracks for ind in todo]
        names = [t for t in tracks for _ in todo]
        results = list(self.toolbox.map(self.toolbox.evaluate, genomes, names))
        for i, ind in enumerate(todo):
            costs = [
                relative_cost(results[j * len(todo) + i], self.reference.lap_ticks[t], self.budgets[t])
                for j, t in enumerate(tracks)
            ]
            ind.fitness.values = (sum(costs) / len(costs),)
        return len(todo) * len(tracks)

    def next_generation(self, population: list[Any]) -> list[Any]:
        cfg = self.config
        elite = [self.toolbox.clone(ind) for ind in tools.selBest(population, cfg.elite)]
        offspring = [self.toolbox.clone(ind) for ind in self.toolbox.select(population, len(population) - cfg.elite)]
        for a, b in zip(offspring[::2], offspring[1::2], strict=False):
            if random.random() < cfg.crossover_prob:
                self.toolbox.mate(a, b)
                del a.fitness.values, b.fitness.values
        for ind in offspring:
            if random.random() < cfg.mutation_prob:
                self.toolbox.mutate(ind)
                del ind.fitness.values
        return elite + offspring

    # -- the loop -------------------------------------------------------------------------------
    def start(self) -> EvolveState:
        random.seed(self.config.seed)
        with telemetry.root_span(GENERATION_SPAN, {GENERATION_ATTRIBUTE: 0}):
            population = self.initial_population()
            t0 = time.perf_counter()
            n = self.evaluate(population)
            best = self.toolbox.clone(tools.selBest(population, 1)[0])
            state = EvolveState(self.config, 0, population, best)
            state.history.append(self._stats(0, population, best, n, time.perf_counter() - t0))
        return state

    def run(self, state: EvolveState, until: int | None = None) -> Iterator[EvolveState]:
        """Advances generation by generation up to `until` (default: the configured count)."""
        last = self.config.generations if until is None else until
        while state.generation < last:
            # One trace per generation: its evaluations, on whichever pool threads and servers, are its children.
            with telemetry.root_span(GENERATION_SPAN, {GENERATION_ATTRIBUTE: state.generation + 1}):
                t0 = time.perf_counter()
                population = self.next_generation(state.population)
                n = self.evaluate(population)
                champion = tools.selBest(population, 1)[0]
                best = (
                    self.toolbox.clone(champion)
                    if champion.fitness.values[0] < state.best.fitness.values[0]
                    else state.best
                )
                state = EvolveState(self.config, state.generation + 1, population, best, state.history)
                state.history.append(self._stats(state.generation, population, best, n, time.perf_counter() - t0))
            yield state

    def best_lap_ticks(self, best: Any) -> int:
        cost = best.fitness.values[0]
        if self.config.kind == KIND_PROGRAM:
            return int(cost) if cost < self.budgets[self.config.track] else 0
        result = self.toolbox.evaluate(best, self.config.track)  # in process: the same result as the pool's
        return int(result.lap_ticks) if result.finished else 0

    def _stats(self, gen: int, population: list[Any], best: Any, evaluations: int, seconds: float) -> Generation:
        costs = sorted(ind.fitness.values[0] for ind in population)
        return Generation(
            generation=gen,
            evaluations=evaluations,
            best_cost=best.fitness.values[0],
            median_cost=statistics.median(costs),
            worst_cost=costs[-1],
            best_lap_ticks=self.best_lap_ticks(best),
            seconds=round(seconds, 3),
        )


# -- variation operators ----------------------------------------------------------------------------
def mutate_program(genome: Any, windows: int = 3, max_len: int = 12) -> tuple[Any]:
    """Rewrites a few short windows of ticks: new keys, steering released, or throttle instead of braking."""
    n = len(genome)
    for _ in range(random.randint(1, windows)):
        start = random.randrange(n)
        end = min(n, start + random.randint(1, max_len))
        op = random.random()
        if op < 0.5:
            mask = random.choice(SENSIBLE_MASKS)
            for i in range(start, end):
                genome[i] = mask
        elif op < 0.75:
            for i in range(start, end):
                genome[i] &= ~(LEFT | RIGHT)
        else:
            for i in range(start, end):
                genome[i] = (genome[i] & ~BACK) | FORWARD
    return (genome,)


def _clip(genome: Any) -> None:
    for i, (_, lo, hi) in enumerate(drivers.PARAM_SPEC):
        genome[i] = min(hi, max(lo, genome[i]))


def mutate_driver(genome: Any, indpb: float = 0.3, scale: float = 0.08) -> tuple[Any]:
    for i, (_, lo, hi) in enumerate(drivers.PARAM_SPEC):
        if random.random() < indpb:
            genome[i] += random.gauss(0.0, scale * (hi - lo))
    _clip(genome)
    return (genome,)


def mate_driver(a: Any, b: Any) -> tuple[Any, Any]:
    tools.cxBlend(a, b, alpha=0.3)
    _clip(a)
    _clip(b)
    return a, b


# -- checkpoints: JSON only ---------------------------------------------------------------------------
def _rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(saved: list[Any]) -> None:
    version, internal, gauss = saved
    random.setstate((version, tuple(internal), gauss))


def _genome_json(ind: Any) -> dict[str, Any]:
    return {"genes": list(ind), "cost": ind.fitness.values[0] if ind.fitness.valid else None}


def _genome_from(d: dict[str, Any], kind: str) -> Any:
    genes = [int(g) for g in d["genes"]] if kind == KIND_PROGRAM else [float(g) for g in d["genes"]]
    ind = creator.RRPGenome(genes)
    if d["cost"] is not None:
        ind.fitness.values = (float(d["cost"]),)
    return ind


def save_checkpoint(path: Path, state: EvolveState) -> None:
    """Atomically writes the generation boundary, with the RNG state, so that resuming changes nothing."""
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": {**asdict(state.config), "extra_tracks": list(state.config.extra_tracks)},
        "generation": state.generation,
        "population": [_genome_json(ind) for ind in state.population],
        "best": _genome_json(state.best),
        "history": [asdict(g) for g in state.history],
        "random_state": _rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> EvolveState:
    doc = json.loads(path.read_text())
    if doc.get("format") != CHECKPOINT_FORMAT or doc.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a version-{CHECKPOINT_VERSION} evolve checkpoint")
    raw = dict(doc["config"])
    raw["extra_tracks"] = tuple(raw["extra_tracks"])
    config = EvolveConfig(**raw)
    _set_rng_state(doc["random_state"])
    return EvolveState(
        config=config,
        generation=int(doc["generation"]),
        population=[_genome_from(d, config.kind) for d in doc["population"]],
        best=_genome_from(doc["best"], config.kind),
        history=[Generation(**g) for g in doc["history"]],
    )


def describe(g: Generation, total: int, kind: str) -> str:
    lap = f"{g.best_lap_ticks} ticks ({g.best_lap_ticks / TICK_HZ:.2f} s)" if g.best_lap_ticks else "no finish"
    unit = "ticks" if kind == KIND_PROGRAM else "x reference"
    rate = g.evaluations / g.seconds if g.seconds > 0 else float("nan")
    return (
        f"gen {g.generation:>3}/{total}  best lap {lap}  cost best {g.best_cost:.3f} median {g.median_cost:.3f}"
        f" {unit}  {g.evaluations} evals in {g.seconds:.1f} s ({rate:.0f}/s)"
    )
