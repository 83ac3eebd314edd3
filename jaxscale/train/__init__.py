"""Training: optimizer, train step, trainer (parallelism applied from the config), loop."""
