"""`parallelize`: a model and a mesh in, the sharded loss and the state's layouts out.

The one place where the strategies of this package are put together, from the config and the
mesh alone (like torchtitan's `parallelize_llama`): the logical-axis rules of data parallelism,
ZeRO/FSDP, tensor (+ sequence), expert and pipeline parallelism (`make_layout`), the layouts of
the parameters and optimizer state (`zero.specs`), and the loss run manual over the
data-parallel, expert, context and pipeline axes with the gathers ZeRO/FSDP need, the schedule
pipelining needs and the exchanges of expert and context parallelism.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxscale.cpu import order_collectives
from jaxscale.errors import UserError
from jaxscale.models import DECODERS, loss_sums
from jaxscale.parallel import (
    compression,
    context_parallel,
    data_parallel,
    diloco,
    expert_parallel,
    pipeline,
    tensor_parallel,
    vocab_parallel,
    zero,
)
from jaxscale.sharding import UNSHARDED, Layout, merge_rules

DEFAULT_RULES = merge_rules(UNSHARDED, data_parallel.RULES + zero.RULES + tensor_parallel.RULES
                            + expert_parallel.RULES)


def make_layout(config, mesh: Mesh) -> Layout:
    """The Layout a config asks for: every strategy's rules, then the user's `parallel.rules`."""
    known = {name for name, _ in UNSHARDED}
    for name, _ in config.parallel.rules:
        if name not in known:
            raise UserError(f"parallel.rules names logical axis {name!r}, which no model names; "
                            f"use one of {', '.join(n for n, _ in UNSHARDED)}")
    rules = DEFAULT_RULES
    if mesh.shape["pipeline"] > 1:
        rules = merge_rules(rules, pipeline.RULES)
    if config.parallel.sequence_parallel:
        rules = merge_rules(rules, tensor_parallel.SEQUENCE_PARALLEL_RULES)
    return Layout(mesh, merge_rules(rules, config.parallel.rules))


@dataclasses.dataclass(frozen=True)
class Parallelized:
    """What `parallelize` returns.

    `loss(params, batch) -> (loss_sum, count)`: the global sums, differentiable in `params`;
    `param_specs`, `opt_specs`: the stored layouts of parameters (and gradients) and optimizer
    state; `batch_spec`: the batch's; `virtual_stages`: chunks of layers per pipeline stage (the
    parameters' pipelined stacks are `[V, L/V, ...]` when > 1, see `pipeline.virtualize`);
    `pipelined`: the paths of those stacks (none without a pipeline); `replicas`: DiLoCo's
    (`diloco.py`; 1 when off), over which `loss` takes the parameters stacked and returns each
    replica's sums; `compressed`: whether the gradients' reduction over `data` is compressed
    (`compression.py`), for which `loss` takes them stacked over the `data` replicas too.
    """

    loss: Callable
    param_specs: object
    opt_specs: object
    batch_spec: PartitionSpec
    virtual_stages: int
    pipelined: tuple[str, ...]
    replicas: int = 1
    compressed: bool = False


def parallelize(graphdef: nnx.GraphDef, params: nnx.State, opt_state, layout: Layout,
                config) -> Parallelized:
    """Lay the model (`graphdef`, abstract `params`) and its optimizer state out on `layout`."""
    stage = config.parallel.zero_stage
    if stage not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero_stage={stage} is invalid; use 0, 1, 2 or 3")
    stages = layout.mesh.shape["pipeline"]
    check_batch(config, layout)
    experts = _experts(config, layout)
    virtual = pipeline.virtual_stages(config, stages)
    paths = pipeline.pipelined(nnx.merge(graphdef, params), params, config, stages, virtual)
    param_specs = pipeline.virtualize(zero.specs(layout, params, stage, from_stage=2), virtual, paths)
    opt_specs = pipeline.virtualize(zero.specs(layout, opt_state, stage, from_stage=1), virtual, paths)
    model_loss = (pipeline.pipeline_loss(config.pipeline.schedule, config.pipeline.microbatches,
                                         stages, virtual, paths,
                                         lockstep=context_parallel.spans_stages(config, layout))
                  if stages > 1 else loss_sums)
    if experts > 1:
        model_loss = expert_parallel.ExpertParallelLoss(model_loss, config.parallel.expert_buffer)
    if (parts := context_parallel.check(config, layout)) > 1:
        model_loss = context_parallel.ContextParallelLoss(model_loss,
                                                          config.parallel.context_attention, parts)
    batch_axes = data_parallel.dp_axes(layout) + expert_parallel.batch_axes(layout)
    token_axes = context_parallel.token_axes(layout)
    manual_axes = batch_axes + token_axes + (("pipeline",) if stages > 1 else ())
    replicas = diloco.replicas(config, layout)
    compressed = compression.kind(config, layout) != "none"
    loss = _sharded_loss(graphdef, params, config, layout, param_specs, model_loss, manual_axes,
                         batch_axes, token_axes, virtualized=paths if virtual > 1 else (),
                         replica_axis=diloco.AXIS if replicas > 1 or compressed else None)
    return Parallelized(loss, param_specs, opt_specs, layout.spec(("batch",)), virtual, paths,
                        replicas, compressed)


def _sharded_loss(graphdef, params, config, layout: Layout, param_specs, model_loss: Callable,
                  manual_axes: tuple[str, ...], batch_axes: tuple[str, ...],
                  token_axes: tuple[str, ...], virtualized: tuple[str, ...],
                  replica_axis: str | None) -> Callable:
    """The loss run manual over `manual_axes`, or the model's own where there are none."""
    gather = zero.gather_dtype(config)  # checked where nothing is gathered too
    if not manual_axes:
        return lambda p, batch: model_loss(graphdef, p, batch)
    manual = jax.tree.map(lambda s: data_parallel.manual_part(s, manual_axes, "a parameter rule"),
                          param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    decoder = config.model.family in DECODERS and layout.mesh.shape["pipeline"] == 1
    local = zero.LocalLoss(
        graphdef, model_loss, layout, manual, param_specs, manual_axes,
        regather=zero.regathers(layout, config.parallel.zero_stage), virtualized=virtualized,
        tables=vocab_parallel.vocab_tables(params) if decoder else {},
        order=order_collectives, towers=_takes(graphdef, params, "order"),
        gather=gather)
    return data_parallel.DataParallelLoss(local, layout, manual, manual_axes, batch_axes,
                                          token_axes, replica_axis)


def _experts(config, layout: Layout) -> int:
    """How many ways the MoE layers' experts are split (1: a dense model or no `expert` axis),
    with clear errors for splits that cannot work."""
    n, experts = layout.mesh.shape["expert"], config.model.moe.n_experts
    if n == 1 or not experts:
        return 1
    if experts % n:
        raise UserError(f"model.moe.n_experts={experts} is not divisible by mesh.expert={n}")
    return n


def _takes(graphdef: nnx.GraphDef, params: nnx.State, keyword: str) -> bool:
    """Whether the model's `loss_sums` takes `keyword`."""
    model = nnx.merge(graphdef, params)
    return keyword in inspect.signature(model.loss_sums).parameters


def check_batch(config, layout: Layout) -> None:
    """Clear errors, before anything compiles, for a batch the mesh cannot split."""
    batch, accum = config.train.global_batch_size, config.train.grad_accum_steps
    dp = layout.size(data_parallel.dp_axes(layout) + expert_parallel.batch_axes(layout))
    if accum < 1 or batch % accum:
        raise UserError(f"train.global_batch_size={batch} is not divisible by "
                        f"train.grad_accum_steps={accum}")
    if (batch // accum) % dp:
        raise UserError(f"micro-batch {batch // accum} (train.global_batch_size / "
                        f"grad_accum_steps) is not divisible by the data-parallel size {dp} "
                        f"(data x fsdp x expert); change the batch size or the mesh")
    pipeline.check_pipeline(config, layout.mesh.shape["pipeline"], batch // accum // dp)
