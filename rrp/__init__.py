"""RallyRoboPilot: the `rrp` command and the plumbing every service shares."""

__version__ = "0.1.0"
