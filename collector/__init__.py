"""Frame collection: a gRPC ingest service that stores the game servers' camera frames in Redis Streams."""
