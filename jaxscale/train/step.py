"""The training step: loss, gradients (with accumulation), optimizer update, step metrics."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxscale.sharding import constrain

Batch = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything that changes from step to step (what a checkpoint holds, with the data state)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int,
                    grad_shardings) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build `step(state, batch) -> (state, metrics)`, ready for `jax.jit`.

    `loss_fn(params, batch) -> (loss_sum, count)` is the model's `loss_sums` as
    `parallel.parallelize` lays it out on the mesh.

    With accumulation the global batch is split into `grad_accum_steps` micro-batches of
    interleaved rows, so every micro-batch stays spread over all data-parallel devices; the
    gradient is that of the mean loss over the whole batch, as without accumulation.
    `grad_shardings` pins the (accumulated) gradients to the parameters' layout.
    A step whose loss or gradient norm is not finite applies no update and reports
    `nonfinite=1` in its metrics.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def pin(grads):
        return jax.lax.with_sharding_constraint(grads, grad_shardings)

    def compute_grads(params, batch):
        if grad_accum_steps == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
            return loss_sum, count, pin(grads)

        def split(x):  # [B, ...] -> [accum, B/accum, ...], micro-batch i = rows i, i+accum, ...
            x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
            return constrain(jnp.swapaxes(x, 0, 1), (None, "batch") + (None,) * (x.ndim - 2))

        def body(carry, micro):
            loss_sum, count, grads = carry
            (ls, c), g = grad_fn(params, micro)
            return (loss_sum + ls, count + c, pin(jax.tree.map(jnp.add, grads, g))), None

        zeros = pin(jax.tree.map(jnp.zeros_like, params))
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (loss_sum, count, grads), _ = jax.lax.scan(body, init, jax.tree.map(split, batch))
        return loss_sum, count, grads

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        loss_sum, count, grads = compute_grads(state.params, batch)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss, grad_norm = loss_sum / count, optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # a non-finite loss or gradient leaves parameters and optimizer state as they were (the
        # training loop decides whether the run stops); the step counter moves on with the data
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "tokens": count, "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step
