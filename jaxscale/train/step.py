"""The training step: loss, gradients (with accumulation), optimizer update, step metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxscale.models import moe
from jaxscale.parallel import compression, diloco
from jaxscale.sharding import constrain

Batch = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything that changes from step to step (what a checkpoint holds, with the data state)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    local: Any = None  # DiLoCo's replicas: (their parameters, their inner optimizer state)
    residual: Any = None  # compressed reduction's error feedback, per replica (`compression.py`)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int,
                    grad_shardings, bias_rate: float = 0.0, outer: diloco.Outer | None = None,
                    reduce: compression.Reduce | None = None,
                    partition: tuple[Callable, Callable] | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build `step(state, batch) -> (state, metrics)`, ready for `jax.jit`.

    `loss_fn(params, batch) -> (loss_sum, count, stats)` is the model's `loss_sums` as
    `parallel.parallelize` lays it out on the mesh. An MoE model's `stats` (summed over the
    micro-batches) become metrics (`moe.summarize`), and with `bias_rate` its routers' balancing
    biases move once per step by the step's expert load (`moe.balance_bias`).

    With accumulation the global batch is split into `grad_accum_steps` micro-batches of
    interleaved rows, so every micro-batch stays spread over all data-parallel devices; the
    gradient is that of the mean loss over the whole batch, as without accumulation.
    `grad_shardings` pins the (accumulated) gradients to the parameters' layout.
    A step whose loss or gradient norm is not finite applies no update and reports
    `nonfinite=1` in its metrics.

    With DiLoCo's `outer` step, `loss_fn` takes the replicas' parameters (`state.local`) and
    returns each replica's loss and token sums; each replica's gradient is that of its own mean
    loss, `tx` updates each replica apart, and `outer` runs after every `inner_steps`-th step.

    With `partition = (split, join)` (LoRA's, `train/lora.py`) only the first part of
    `split(params)` is differentiated, updated and has optimizer state (`grad_shardings` is
    its layout); the second stays as it is.
    """
    update = diloco.per_replica(tx.update) if outer else tx.update
    split_params, join_params = partition or (lambda p: (p, None), lambda p, _: p)
    grad_fn = jax.value_and_grad(_with_aux(lambda p, b, frozen: loss_fn(join_params(p, frozen), b)),
                                 has_aux=True)

    def pin(grads):
        return jax.lax.with_sharding_constraint(grads, grad_shardings)

    def compute_grads(params, batch, frozen):
        if grad_accum_steps == 1:
            (_, (loss_sum, count, stats)), grads = grad_fn(params, batch, frozen)
            return loss_sum, count, stats, pin(grads)

        def split(x):  # [B, ...] -> [accum, B/accum, ...], micro-batch i = rows i, i+accum, ...
            x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
            return constrain(jnp.swapaxes(x, 0, 1), (None, "batch") + (None,) * (x.ndim - 2))

        def body(carry, micro):
            loss_sum, count, stats, grads = carry
            (_, (ls, c, s)), g = grad_fn(params, micro, frozen)
            return (loss_sum + ls, count + c, jax.tree.map(jnp.add, stats, s),
                    pin(jax.tree.map(jnp.add, grads, g))), None

        micros = jax.tree.map(split, batch)
        zeros = pin(jax.tree.map(jnp.zeros_like, params))
        sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            jax.eval_shape(loss_fn, join_params(params, frozen),
                                           jax.tree.map(lambda a: a[0], micros)))
        (loss_sum, count, stats, grads), _ = jax.lax.scan(body, (*sums, zeros), micros)
        return loss_sum, count, stats, grads

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        old_params, old_opt = state.local if outer else (state.params, state.opt_state)
        old_params, frozen = split_params(old_params)
        residual = state.residual
        if reduce:
            stacked = jax.lax.with_sharding_constraint(
                diloco.stack(old_params, reduce.replicas), grad_shardings)
            loss_sum, count, stats, grads = compute_grads(stacked, batch, frozen)
            count = jnp.maximum(jnp.sum(count), 1.0)
            grads, residual = reduce(jax.tree.map(lambda g: g / count, grads), residual)
        else:
            loss_sum, count, stats, grads = compute_grads(old_params, batch, frozen)
            count = jnp.maximum(count, 1.0)  # each replica's, under DiLoCo
            grads = jax.tree.map(
                lambda g: g / count.reshape(count.shape + (1,) * (g.ndim - count.ndim)), grads)
        loss = jnp.sum(loss_sum) / jnp.sum(count)
        grad_norm = optax.tree.norm(grads) / math.sqrt(max(count.size, 1))  # replicas' RMS
        updates, opt_state = update(grads, old_opt, old_params)
        params = optax.apply_updates(old_params, updates)
        if bias_rate and stats:
            params = moe.balance_bias(params, stats["load"], bias_rate)
        # a non-finite loss or gradient leaves parameters and optimizer state as they were (the
        # training loop decides whether the run stops); the step counter moves on with the data
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, residual = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                   (params, opt_state, residual),
                                                   (old_params, old_opt, state.residual))
        params = join_params(params, frozen)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "tokens": jnp.sum(count), "nonfinite": 1.0 - finite.astype(jnp.float32)}
        if stats:
            metrics.update(moe.summarize(stats))
        if outer:
            global_params, outer_state, params = outer(state.params, state.opt_state, params,
                                                       state.step)
            state = state.replace(params=global_params, opt_state=outer_state,
                                  local=(params, opt_state))
        else:
            state = state.replace(params=params, opt_state=opt_state, residual=residual)
        return state.replace(step=state.step + 1), metrics

    return step


def _with_aux(loss_fn: Callable) -> Callable:
    """`loss_fn` as `jax.value_and_grad(has_aux=True)` takes it: the loss sum (over DiLoCo's
    replicas too) and `(loss_sum, count, stats)`."""
    def fn(params, batch, frozen):
        loss_sum, count, stats = loss_fn(params, batch, frozen)
        return jnp.sum(loss_sum), (loss_sum, count, stats)

    return fn
