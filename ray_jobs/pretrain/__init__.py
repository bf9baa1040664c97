"""Distributed self-supervised pre-training on Ray Train: config, data stream, worker loop, driver."""
