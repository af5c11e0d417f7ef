"""The vision autopilot: a CNN that drives from the camera frame (and the dashboard speed) alone."""
