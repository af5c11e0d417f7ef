"""The game server's Prometheus metrics (`rrp_game_server_*`); served by `--metrics-port`."""

from __future__ import annotations

from prometheus_client import Counter

from plumbing.metrics import LiveGauges

TICKS = Counter("rrp_game_server_ticks_simulated_total", "ticks simulated, by the call that asked for them", ["call"])
FRAMES = Counter("rrp_game_server_frames_rendered_total", "camera frames rendered")
LATE_COMMANDS = Counter(
    "rrp_game_server_drive_late_commands_total", "real-time Drive commands that arrived after their tick"
)
MISSED_TICKS = Counter(
    "rrp_game_server_drive_missed_ticks_total", "real-time Drive ticks simulated without a command of their own"
)
# Read from the live Game objects when scraped.
GAMES = LiveGauges(
    {
        "rrp_game_server_sessions_open": ("sessions open", lambda game: len(game.sessions)),
        "rrp_game_server_sessions_max": ("sessions allowed at once", lambda game: game.config.max_sessions),
        "rrp_game_server_evaluate_slots_busy": (
            "evaluation slots in use (Evaluate, EvaluateBatch, Record)",
            lambda game: game.evaluate_running,
        ),
        "rrp_game_server_evaluate_slots": ("evaluation slots", lambda game: game.config.evaluate_slots),
    }
)
