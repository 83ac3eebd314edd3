"""Held-out evaluation of a trained model, optionally blind to the images (the fusion check)."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxscale.data.loader import make_global_batch, scene_examples
from jaxscale.data.tokenizer import load_tokenizer
from jaxscale.errors import UserError
from jaxscale.sharding import use_layout

BLIND = ("none", "zero", "shuffle")


def evaluate(trainer, params: nnx.State, batches: Iterable[dict[str, np.ndarray]],
             blind: str = "none") -> dict[str, float]:
    """Means over `batches` of the model's `evaluate` outputs (e.g. `answer_correct`).

    `blind="zero"` replaces the images by zeros and `"shuffle"` gives each example another one's
    (a rotation of the batch): the same model, with the information its images carry removed.
    """
    if blind not in BLIND:
        raise UserError(f"blind={blind!r}; use one of {', '.join(BLIND)}")
    params = trainer.to_canonical(params)

    @jax.jit
    def run(params, batch):
        if blind == "zero":
            batch = {**batch, "images": jnp.zeros_like(batch["images"])}
        elif blind == "shuffle":
            batch = {**batch, "images": jnp.roll(batch["images"], 1, axis=0)}
        return nnx.merge(trainer.graphdef, params).evaluate(batch)

    sums: dict[str, float] = {}
    count = 0
    with use_layout(trainer.layout):
        for host_batch in batches:
            out = jax.device_get(run(params, make_global_batch(host_batch, trainer.batch_sharding)))
            for k, v in out.items():  # per-example values
                sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v, np.float64)))
            count += len(host_batch["inputs"])
    if not count:
        raise UserError("no held-out batches to evaluate")
    return {k: v / count for k, v in sums.items()}


def heldout_batches(config, n: int) -> list[dict[str, np.ndarray]]:
    """`n` held-out scenes (a seed training never uses) in batches of `train.global_batch_size`."""
    b = config.train.global_batch_size
    examples = scene_examples(config, n, load_tokenizer(config.data.tokenizer), heldout=True)
    return [examples.rows(np.arange(i, i + b)) for i in range(0, n - b + 1, b)]
