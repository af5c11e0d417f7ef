"""The scheduler: a futures-style pool that spreads GA evaluations over game servers, and its gRPC service."""
