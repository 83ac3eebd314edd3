"""What the pipeline schedules share: the pipeline axis, microbatches, and the model's pipelined
stacks split from its other parameters (`in_stack`) and run as one stage (`run_stage`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.models.attention import sequence_parts
from jaxscale.parallel import context_parallel

AXIS = "pipeline"


def loss_weight(mask: jax.Array) -> jax.Array:
    """The sum of the batch's `mask`, counted once across the devices a row's tokens are split
    over (context parallelism: on the first of them, 0 on the others), so that the data-parallel
    sum counts it once."""
    total = jnp.sum(mask)
    if sequence_parts() == 1:
        return total
    return jnp.where(jax.lax.axis_index(context_parallel.AXIS) == 0, total, 0.0)


def split_microbatches(a: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [m, B/m, ...] (microbatch i = rows [i B/m, (i+1) B/m))."""
    return None if a is None else a.reshape(m, a.shape[0] // m, *a.shape[1:])


def run_stage(graph: nnx.GraphDef, rest, model_kwargs: dict, w, x: jax.Array, side):
    """The model's `pipeline_stage` with the stage's layers `w` (the other parameters: `rest`,
    as shapes; a stage uses none of them): the output and the layers' stats."""
    return nnx.merge(graph, w, rest).pipeline_stage(x, side, **model_kwargs)


def zeros(shapes_tree):
    """Zeros of the `jax.eval_shape` results in `shapes_tree`, varying over the manual axes
    theirs vary over (what a `lax.cond` branch or scan carry standing in for them must be)."""
    def one(s):
        z = jnp.zeros(s.shape, s.dtype)
        axes = tuple(sorted(s.manual_axis_type.varying))
        return jax.lax.pcast(z, axes, to="varying") if axes else z

    return jax.tree.map(one, shapes_tree)


def gather_stats(summary, layer_axis: int = 0):
    """A stage's stats summary (`Decoder.stats_loss`) for the whole model: scalar sums added over
    the stages, per-layer arrays joined along `layer_axis` in stage order (the stages' layers)."""
    def one(a):
        if a.ndim == 0:
            return jax.lax.psum(a, AXIS)
        # placed in a [stages, ...] array and summed: the same on every stage (an all-gather's
        # result still varies over the axis)
        n = jax.lax.axis_size(AXIS)
        placed = jnp.zeros((n, *a.shape), a.dtype).at[jax.lax.axis_index(AXIS)].set(a)
        joined = jnp.moveaxis(jax.lax.psum(placed, AXIS), 0, layer_axis)
        return joined.reshape(*a.shape[:layer_axis], -1, *a.shape[layer_axis + 1:])

    return jax.tree.map(one, summary)


def shapes(tree):
    """`tree` with its arrays replaced by their shapes (what a merged module needs to exist)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def path_keys(path) -> tuple[str, ...]:
    """The keys of a jax tree path or an nnx variable path."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def under(path, paths: tuple[str, ...]) -> bool:
    """Whether `path` runs through one of `paths` ("llm/blocks": the keys llm, blocks in a row)."""
    keys = path_keys(path)
    for p in paths:
        want = tuple(p.split("/"))
        if any(keys[i:i + len(want)] == want for i in range(len(keys) - len(want) + 1)):
            return True
    return False


def in_stack(paths: tuple[str, ...]) -> Callable:
    """An nnx filter for the variables of the stacks at `paths` (see `nnx.split`)."""
    return functools.partial(_stack_filter, paths)


def _stack_filter(paths: tuple[str, ...], path, _) -> bool:
    return under(path, paths)


