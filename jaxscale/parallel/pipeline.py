"""Pipeline parallelism over the `pipeline` mesh axis: GPipe, 1F1B and interleaved schedules.

What it shards: the `layers` axis of the stacks a model names in `PIPELINED` (a decoder's
blocks; a cross-attention model's blocks and cross-attention layers alike) over `pipeline`, so
stage `s` holds layers `[s L/P, (s+1) L/P)`; with the interleaved schedule those stacks are
stored as `[V, L/V, ...]` with the second axis on `pipeline` (`virtualize`), so that each device
holds its `V` chunks. Checkpoints keep the `[L, ...]` form. Everything else is replicated over
`pipeline` and runs on every stage (an encoder before the pipeline, the head after it).

Formulation: explicit collectives, in the schedules' own files (`gpipe.py`: GPipe and
interleaved, `one_f_one_b.py`: 1F1B), run inside the data-parallel `shard_map` with `pipeline`
manual too: a schedule is an order of sends between neighbours, which no partitioner derives.
Each schedule's docstring gives its collectives and bubble.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.parallel.gpipe import CircularSchedule
from jaxscale.parallel.one_f_one_b import OneFOneB
from jaxscale.parallel.stages import (
    AXIS,
    gather_stats,
    in_stack,
    loss_weight,
    run_stage,
    shapes,
    under,
)
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
    if layers % (stages * v) and not config.model.moe.n_experts:  # MoE stacks: `pipelined` checks
        raise UserError(f"model.n_layers={layers} is not divisible by mesh.pipeline={stages} x "
                        f"pipeline.virtual_stages={v}")
    if p.microbatches < 1 or local_batch % p.microbatches:
        raise UserError(f"the batch per data-parallel shard ({local_batch}) is not divisible by "
                        f"pipeline.microbatches={p.microbatches}")
    if p.schedule == "interleaved" and p.microbatches % stages:
        raise UserError(f"the interleaved schedule runs microbatches in groups of mesh.pipeline="
                        f"{stages}; set pipeline.microbatches={p.microbatches} to a multiple of it")


def pipelined(model: nnx.Module, params, config, stages: int, virtual: int) -> tuple[str, ...]:
    """The paths of the model's stacks a pipeline of `stages` splits (`PIPELINED`; none when
    `stages == 1`), with clear errors for a model or a stack the pipeline cannot split."""
    if stages == 1:
        return ()
    paths = getattr(model, "PIPELINED", ())
    if not paths:
        raise NotImplementedError(f"pipeline parallelism for model.family={config.model.family!r} "
                                  f"(it has no stack of decoder layers to split into stages); set "
                                  f"mesh.pipeline=1")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        stack = next((p for p in paths if under(path, (p,))), None)
        if stack and leaf.shape[0] % (stages * virtual):
            raise UserError(f"the pipelined stack {stack!r} holds {leaf.shape[0]} layers, which "
                            f"mesh.pipeline={stages} x pipeline.virtual_stages={virtual} does not "
                            f"divide")
    return paths


def virtual_stages(config, stages: int) -> int:
    """Chunks of layers per stage: `pipeline.virtual_stages` under the interleaved schedule."""
    pipe = config.pipeline
    return pipe.virtual_stages if stages > 1 and pipe.schedule == "interleaved" else 1


class _CircularLoss:
    """The model's loss with its pipelined layers run by a `CircularSchedule`; the same sums on
    every stage (each computed the loss from the broadcast last-stage output and added the
    stages' router losses), and the stats of every stage's layers."""

    def __init__(self, schedule: CircularSchedule, paths: tuple[str, ...]):
        self.schedule, self.paths = schedule, paths

    def __call__(self, graphdef, params, batch, **model_kwargs):
        model = nnx.merge(graphdef, params)
        x, side = model.pipeline_input(batch, **model_kwargs)
        graph, w, rest = nnx.split(model, in_stack(self.paths), ...)
        stage = functools.partial(run_stage, graph, shapes(rest), model_kwargs)
        y, stats = self.schedule(stage, w, x, side)
        extra, summary = model.stats_loss(stats)  # this stage's layers'
        loss_sum = jax.lax.pmean(model.pipeline_loss(y, batch), AXIS) + jax.lax.psum(extra, AXIS)
        return (loss_sum, jax.lax.pmean(loss_weight(batch["loss_mask"]), AXIS),
                gather_stats(summary, layer_axis=1 if self.schedule.v > 1 else 0))


def pipeline_loss(schedule: str, microbatches: int, stages: int, virtual: int,
                  paths: tuple[str, ...], lockstep: bool = False) -> Callable:
    """`loss(graphdef, params, batch, **model_kwargs) -> (loss_sum, count, stats)` under a schedule,
    for a model with the pipeline interface of `models.decoder.Decoder` whose stacks at `paths`
    are split into stages; `lockstep`: 1F1B's stages run each tick's work together (`OneFOneB`).

    Runs where `pipeline` is manual; returns the same sums on every stage.
    """
    if schedule == "1f1b":
        return OneFOneB(microbatches, stages, paths, lockstep)
    return _CircularLoss(CircularSchedule(microbatches, stages, virtual if schedule == "interleaved"
                                          else 1), paths)


def virtualize(tree, virtual: int, paths: tuple[str, ...], *, inverse: bool = False):
    """Stacked-layer leaves `[L, ...]` <-> `[V, L/V, ...]` (specs gain / lose a leading None).

    Applies to every leaf under one of the pipelined `paths` (parameters and optimizer state
    alike), for arrays, ShapeDtypeStructs and PartitionSpecs; other leaves pass through.
    """
    if virtual == 1:
        return tree

    def convert(path, leaf):
        if not under(path, paths):
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
