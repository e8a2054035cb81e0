"""Training: corpus → documents → tokens → batches, and the training loop (one process or DDP)."""
