"""The ground every package stands on: errors and their status codes, config, bootstrap, telemetry, processes."""

__version__ = "0.1.0"
