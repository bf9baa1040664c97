"""Self-supervised pre-training on Ray Train (or, for one local worker, in the driver process): config,
data stream, worker loop, checkpoints, driver."""
