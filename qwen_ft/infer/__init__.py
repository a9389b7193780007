"""Inference on trained outputs: chat rendering and generation."""
