"""Pipeline parallelism over the `pipeline` mesh axis: GPipe, 1F1B and interleaved schedules.

What it shards: the stacked blocks' `layers` axis over `pipeline`, so stage `s` holds layers
`[s L/P, (s+1) L/P)`; with the interleaved schedule the stacked layers are stored as
`[V, L/V, ...]` with the second axis on `pipeline` (`virtualize`), so that each device holds its
`V` chunks. Checkpoints keep the `[L, ...]` form. Everything outside the blocks is replicated
over `pipeline`.

Formulation: explicit collectives, in the schedules' own files (`gpipe.py`: GPipe and
interleaved, `one_f_one_b.py`: 1F1B), run inside the data-parallel `shard_map` with `pipeline`
manual too: a schedule is an order of sends between neighbours, which no partitioner derives.
Each schedule's docstring gives its collectives and bubble.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.models import loss_sums
from jaxscale.parallel.gpipe import AXIS, CircularSchedule
from jaxscale.parallel.one_f_one_b import OneFOneB
from jaxscale.sharding import Rules

RULES: Rules = (("layers", AXIS),)
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def check_pipeline(config, stages: int, local_batch: int) -> None:
    """Clear errors for a pipeline config that cannot run, before anything compiles."""
    p = config.pipeline
    if p.schedule not in SCHEDULES:
        raise UserError(f"pipeline.schedule={p.schedule!r}; use one of {', '.join(SCHEDULES)}")
    if p.virtual_stages < 1 or (p.virtual_stages > 1 and p.schedule != "interleaved"):
        raise UserError(f"pipeline.virtual_stages={p.virtual_stages} needs "
                        f"pipeline.schedule=interleaved (and is >= 1)")
    if stages == 1:
        return
    layers, v = config.model.n_layers, p.virtual_stages
    if layers % (stages * v):
        raise UserError(f"model.n_layers={layers} is not divisible by mesh.pipeline={stages} x "
                        f"pipeline.virtual_stages={v}")
    if p.microbatches < 1 or local_batch % p.microbatches:
        raise UserError(f"the batch per data-parallel shard ({local_batch}) is not divisible by "
                        f"pipeline.microbatches={p.microbatches}")
    if p.schedule == "interleaved" and p.microbatches % stages:
        raise UserError(f"the interleaved schedule runs microbatches in groups of mesh.pipeline="
                        f"{stages}; set pipeline.microbatches={p.microbatches} to a multiple of it")


def virtual_stages(config, stages: int) -> int:
    """Chunks of layers per stage: `pipeline.virtual_stages` under the interleaved schedule."""
    pipe = config.pipeline
    return pipe.virtual_stages if stages > 1 and pipe.schedule == "interleaved" else 1


class _CircularLoss:
    """The model's `loss_sums` with its blocks run by a `CircularSchedule`; the same sums on every
    stage (each computed the loss from the broadcast last-stage output)."""

    def __init__(self, schedule: CircularSchedule):
        self.schedule = schedule

    def __call__(self, graphdef, params, batch, **model_kwargs):
        loss_sum, count = loss_sums(graphdef, params, batch, run_blocks=self.schedule, **model_kwargs)
        return jax.lax.pmean(loss_sum, AXIS), jax.lax.pmean(count, AXIS)


def pipeline_loss(schedule: str, microbatches: int, stages: int, virtual: int = 1) -> Callable:
    """`loss(graphdef, params, batch, **model_kwargs) -> (loss_sum, count)` under a schedule.

    Runs where `pipeline` is manual; returns the same sums on every stage.
    """
    if schedule == "1f1b":
        return OneFOneB(microbatches, stages)
    return _CircularLoss(CircularSchedule(microbatches, stages, virtual if schedule == "interleaved"
                                          else 1))


def _is_block_path(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "blocks" for k in path)


def virtualize(tree, virtual: int, *, inverse: bool = False):
    """Stacked-block leaves `[L, ...]` <-> `[V, L/V, ...]` (specs gain / lose a leading None).

    Applies to every leaf under a `blocks` key (parameters and optimizer state alike), for arrays,
    ShapeDtypeStructs and PartitionSpecs; other leaves pass through.
    """
    if virtual == 1:
        return tree

    def convert(path, leaf):
        if not _is_block_path(path):
            return leaf
        if isinstance(leaf, PartitionSpec):
            return PartitionSpec(*leaf[1:]) if inverse else PartitionSpec(None, *leaf)
        shape = leaf.shape
        new = (shape[0] * shape[1], *shape[2:]) if inverse else (virtual, shape[0] // virtual,
                                                                 *shape[1:])
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(new, leaf.dtype)
        return leaf.reshape(new)

    return jax.tree_util.tree_map_with_path(
        convert, tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
