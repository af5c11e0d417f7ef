"""`rrp evaluate`: the trained model races the evaluation (or the suite); the report's Markdown comes back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from collector.store import RedisConfig
from game_server.core.tracks import BUILTIN_TRACKS, SUITE_TECH_TRACKS, SUITE_UNSEEN_TRACKS
from game_server.leaderboard import Leaderboard, LeaderboardConfig
from pipeline.evaluate import RUNTIMES, EvalConfig, load_pilot, markdown_report, run_evaluation
from pipeline.suite import run_suite, suite_markdown
from plumbing.settings import nested, setting
from serving.registry import content_id


@dataclass(frozen=True)
class EvaluateJobConfig:
    """`rrp evaluate`: which model drives, where, and where the report goes."""

    model: Path = setting(Path("out/vision/model/model.safetensors"), "weights (safetensors) of the model")
    runtime: str = setting(
        "eager",
        "what runs the model: eager PyTorch, the TorchScript export beside the weights, or onnx (exported now, "
        "run by onnxruntime, as the served archive)",
        choices=RUNTIMES,
    )
    eval: EvalConfig = nested(EvalConfig)
    out_dir: Path = setting(Path("out/vision/eval"), "folder for JSON, Markdown, maps", flag="out", env="out")
    suite: bool = setting(False, "run the suite instead: --suite-tracks, plain and domain-randomised frames")
    suite_tracks: tuple[str, ...] = setting(
        (*BUILTIN_TRACKS, *SUITE_UNSEEN_TRACKS, *SUITE_TECH_TRACKS),
        "the suite's tracks: every built-in, 20 smooth and 20 technical held-out generated ones",
    )
    suite_recovery: bool = setting(
        True, "with --suite, also start pinned against walls and facing the wrong way on the built-in tracks"
    )
    leaderboard: str = setting(
        "", "with --suite, Redis URL of a leaderboard: every finished lap is verified and submitted ('' = none)"
    )


def run_evaluate_job(config: EvaluateJobConfig) -> str:
    """Drives, writes the report's files in `out_dir`, and returns its Markdown for the CLI to show."""
    pilot = load_pilot(config.model, config.runtime)
    if config.suite:
        board = None
        if config.leaderboard:
            board = Leaderboard.connect(LeaderboardConfig(RedisConfig(url=config.leaderboard)))
        suite = run_suite(
            pilot, config.eval, config.suite_tracks, config.out_dir, recovery=config.suite_recovery, board=board,
            model_version=content_id(config.model), data_source=str(config.model.parent),
        )  # fmt: skip
        return suite_markdown(suite)
    return markdown_report(run_evaluation(pilot, config.eval, config.out_dir))
