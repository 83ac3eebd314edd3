"""DiLoCo / local SGD over the replicas of the `data` mesh axis (`diloco.*`).

What it shards: each of the R = `mesh.data` replicas keeps its own copy of the parameters and of
the inner optimizer state, stacked on a leading dimension split over `data` (`replicated`); fsdp,
tensor and pipeline parallelism work inside each replica as without DiLoCo. The replicas train H
= `diloco.inner_steps` steps on their own batches with no gradient exchange over `data`; then an
outer step averages the pseudo-gradient, the global parameters minus each replica's, and moves
the global parameters by an outer optimizer (SGD with Nesterov momentum, `diloco.outer_lr` and
`outer_momentum`), and every replica restarts from them (Douillard et al., 2023, DiLoCo).
With H = 1, outer learning rate 1 and no momentum, and an inner optimizer linear in the gradient
(SGD), this is synchronous data parallelism.

The train state's `params` are the global parameters (what evaluation, generation and export
read: the replicas' average as of the last outer step) and `opt_state` the outer optimizer's;
the replicas' parameters and inner optimizer state are its `local` part.

Collectives: none over `data` in an inner step (the loss and token sums of the metrics aside);
an outer step all-reduces the parameters once over `data`: 2 (R-1)/R x their bytes per device in
a ring, every H steps instead of the gradients every step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.parallel import zero
from jaxscale.sharding import Layout

AXIS = "data"


def replicas(config, layout: Layout) -> int:
    """How many replicas train apart (1: DiLoCo off), with clear errors for what cannot work."""
    cfg = config.diloco
    if not cfg.enabled:
        return 1
    n = layout.mesh.shape[AXIS]
    if n == 1:
        raise UserError("diloco.enabled needs replicas to train apart: set mesh.data > 1 (their "
                        "number), or diloco.enabled=False")
    if config.parallel.zero_stage:
        raise UserError(f"parallel.zero_stage={config.parallel.zero_stage} shards over `data`, "
                        "across DiLoCo's replicas; use mesh.fsdp inside them and zero_stage=0")
    if config.pipeline.virtual_stages > 1 and layout.mesh.shape["pipeline"] > 1:
        raise NotImplementedError("DiLoCo with the interleaved schedule (virtual_stages > 1); use "
                                  "pipeline.schedule gpipe or 1f1b")
    if layout.mesh.shape["expert"] > 1 or config.model.moe.bias_rate:
        raise NotImplementedError("DiLoCo with expert parallelism or MoE bias balancing; set "
                                  "mesh.expert=1 and model.moe.bias_rate=0")
    return n


def replicated(specs):
    """Specs of a tree stacked over the replicas: a leading dimension split over `data`."""
    return jax.tree.map(lambda s: PartitionSpec(AXIS, *s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def outer_optimizer(config) -> optax.GradientTransformation:
    """SGD on the averaged pseudo-gradient, with (Nesterov) momentum unless it is 0."""
    cfg = config.diloco
    return optax.sgd(cfg.outer_lr, momentum=cfg.outer_momentum or None, nesterov=cfg.nesterov)


def outer_specs(layout: Layout, outer_state):
    """The outer optimizer state's specs: those of the parameters it mirrors."""
    return zero.specs(layout, outer_state, 0, from_stage=1)


def stack(tree, n: int):
    """`n` copies of every leaf, stacked on a new leading dimension."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (n, *a.shape)), tree)


class Outer:
    """`outer(global_params, outer_state, local_params, step) -> the three, updated`: after every
    `inner_steps`-th step, the outer step and the replicas reset to its result; else unchanged.

    `local_shardings` pins the replicas' parameters to their layout when they are reset."""

    def __init__(self, tx: optax.GradientTransformation, inner_steps: int, local_shardings):
        self.tx, self.h, self.local_shardings = tx, inner_steps, local_shardings

    def __call__(self, params, state, local, step: jax.Array):
        return jax.lax.cond((step + 1) % self.h == 0, self.sync, _unchanged, params, state, local)

    def sync(self, params, state, local):
        n = jax.tree.leaves(local)[0].shape[0]
        delta = jax.tree.map(lambda g, r: g - jnp.mean(r, axis=0, dtype=jnp.float32).astype(g.dtype),
                             params, local)  # the all-reduce over `data`
        updates, state = self.tx.update(delta, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, jax.lax.with_sharding_constraint(stack(params, n), self.local_shardings)


def _unchanged(params, state, local):
    return params, state, local


def per_replica(update: Callable) -> Callable:
    """The inner optimizer's `update(grads, state, params)` on each replica's slice alone (its
    gradient clipping sees that replica's norm)."""
    return jax.vmap(update, spmd_axis_name=AXIS)
