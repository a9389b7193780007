"""Training: run plan, optimizer and schedule, loss, loop, checkpoints, logging."""
