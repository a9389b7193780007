"""After training: merge adapters into standalone models."""
