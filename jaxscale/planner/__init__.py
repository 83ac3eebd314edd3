"""Plan a model's layout on a cluster before renting it."""
