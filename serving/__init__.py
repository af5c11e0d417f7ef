"""Serving: the vision model packaged for TorchServe, its inference client, and the real-time autopilot."""
