"""Sizing a run before it starts: the memory estimator."""
