"""The racing game: a deterministic 25 Hz simulation, an ursina renderer and its gRPC service."""
