"""Training data: recorded runs read from Redis or shards, checked, split by run or track, served as tensors."""
