"""Parallelism strategies applied from outside the models, one module per strategy."""
