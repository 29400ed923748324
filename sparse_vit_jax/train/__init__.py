"""Training: objective, optimizer, sharded steps, the trainer and its checkpoints."""
