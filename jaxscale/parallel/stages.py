"""What the pipeline schedules share: the pipeline axis, microbatches, and the model's pipelined
stacks split from its other parameters (`in_stack`) and run as one stage (`run_stage`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

AXIS = "pipeline"


def split_microbatches(a: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [m, B/m, ...] (microbatch i = rows [i B/m, (i+1) B/m))."""
    return None if a is None else a.reshape(m, a.shape[0] // m, *a.shape[1:])


def run_stage(graph: nnx.GraphDef, rest, model_kwargs: dict, w, x: jax.Array, side) -> jax.Array:
    """The model's `pipeline_stage` with the stage's layers `w` (the other parameters: `rest`,
    as shapes; a stage uses none of them)."""
    return nnx.merge(graph, w, rest).pipeline_stage(x, side, **model_kwargs)


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


