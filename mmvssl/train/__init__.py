"""The training loop, optimiser and schedule, checkpoints."""
