"""Command-line entry points; the only package that ties config, data, model and training together."""
