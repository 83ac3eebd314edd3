"""Put a model, its optimizer and a train step on a mesh: sharded init, compiled step.

`parallel.parallelize` decides how the model is laid out and how its loss runs on the mesh; the
Trainer binds that to the optimizer, initialises the state in its shards and compiles the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.data.loader import batch_shapes
from jaxscale.errors import UserError
from jaxscale.models import abstract_model, build_model
from jaxscale.models.fusion import FREEZE_GROUPS
from jaxscale.parallel import compression, diloco, make_layout, parallelize
from jaxscale.parallel.pipeline import virtualize
from jaxscale.sharding import Layout, use_layout
from jaxscale.train import lora, offload
from jaxscale.train.optim import make_optimizer
from jaxscale.train.step import Batch, TrainState, make_train_step


@dataclasses.dataclass
class Trainer:
    """A model, optimizer and mesh bound together; `step` is jitted with explicit shardings."""

    config: object
    layout: Layout
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_specs: TrainState
    batch_spec: PartitionSpec
    virtual_stages: int = 1
    pipelined: tuple[str, ...] = ()  # the paths of the stacks split into pipeline stages
    offload: tuple[str, ...] = ()  # the state parts kept in host memory (`train.offload`)
    replicas: int = 1  # DiLoCo's (`parallel/diloco.py`); 1: off
    outer_tx: optax.GradientTransformation | None = None  # DiLoCo's outer optimizer
    reduce: compression.Reduce | None = None  # the compressed gradient reduction, if any
    lora: bool = False  # only the adapters train and have optimizer state (`train/lora.py`)
    loss_fn: Callable = dataclasses.field(repr=False, default=None)
    _step: Callable = dataclasses.field(repr=False, default=None)
    _compiled: object = dataclasses.field(repr=False, default=None)
    _converters: dict = dataclasses.field(repr=False, default_factory=dict)

    @property
    def mesh(self) -> Mesh:
        return self.layout.mesh

    @property
    def state_shardings(self) -> TrainState:
        return self._shardings(self.state_specs)

    def _shardings(self, specs: TrainState) -> TrainState:
        return offload.placed(self.layout.shardings(specs), self.offload)

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.layout.sharding(self.batch_spec)

    def init(self, seed: int | None = None) -> TrainState:
        """Initialise parameters and optimizer state directly in their shards (never whole)."""
        seed = self.config.seed if seed is None else seed

        @partial(jax.jit, out_shardings=self.state_shardings)
        def init_fn(key):
            model = build_model(self.config.model, nnx.Rngs(params=key))
            return self._fresh(virtualize(nnx.state(model), self.virtual_stages, self.pipelined))

        with use_layout(self.layout):
            return init_fn(jax.random.key(seed))

    def _fresh(self, params) -> TrainState:
        """The state at step 0 from `params` (under DiLoCo every replica starts from them)."""
        step = jnp.zeros((), jnp.int32)
        if self.reduce:  # error feedback starts empty, one residual per replica
            residual = diloco.stack(jax.tree.map(jnp.zeros_like, params), self.reduce.replicas)
            return TrainState(step, params, self.tx.init(params), residual=residual)
        if self.replicas == 1:
            return TrainState(step, params, self.tx.init(lora.split(params)[0] if self.lora else params))
        local = diloco.stack(params, self.replicas)
        return TrainState(step, params, self.outer_tx.init(params),
                          local=(local, jax.vmap(self.tx.init)(local)))

    def with_params(self, state: TrainState, params) -> TrainState:
        """`state` with other parameters (this trainer's layout), every DiLoCo replica's too."""
        if self.replicas == 1:
            return state.replace(params=params)

        @partial(jax.jit, out_shardings=self.state_shardings)
        def reset(state, params):
            return self._fresh(params).replace(step=state.step)

        with use_layout(self.layout):
            return reset(state, params)

    def abstract_state(self, canonical: bool = False) -> TrainState:
        """ShapeDtypeStructs of the state, with shardings (for AOT compiles and restores).

        `canonical`: the form checkpoints hold, stacked layers `[L, ...]` whatever the schedule.
        """
        v = 1 if canonical else self.virtual_stages
        shapes = jax.eval_shape(self._fresh,
                                virtualize(abstract_model(self.config.model)[1], v, self.pipelined))
        leaves, treedef = jax.tree.flatten(shapes)
        specs = virtualize(self.state_specs, self.virtual_stages, self.pipelined, inverse=True) if (
            canonical) else (
            self.state_specs)
        shardings = jax.tree.leaves(self._shardings(specs))
        return treedef.unflatten([jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
                                  for s, sh in zip(leaves, shardings, strict=True)])

    def to_canonical(self, tree):
        """A state (or its params) in checkpoint form: stacked layers `[L, ...]`."""
        return self._convert(tree, inverse=True)

    def from_canonical(self, tree):
        """The inverse of `to_canonical`: the layout this trainer's step runs on."""
        return self._convert(tree, inverse=False)

    def _convert(self, tree, inverse: bool):
        if self.virtual_stages == 1:
            return tree
        key = (inverse, isinstance(tree, TrainState))
        if key not in self._converters:  # built once: every checkpoint save converts the state
            target = self.abstract_state(canonical=inverse)
            target = target if key[1] else target.params
            self._converters[key] = jax.jit(
                partial(virtualize, virtual=self.virtual_stages, paths=self.pipelined, inverse=inverse),
                out_shardings=jax.tree.map(lambda s: s.sharding, target))
        with use_layout(self.layout):
            return self._converters[key](tree)

    def abstract_batch(self) -> Batch:
        return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
                for k, (shape, dtype) in batch_shapes(self.config).items()}

    def compile(self, compiler_options: dict[str, str | bool | int | float] | None = None):
        """Ahead-of-time compile of one step (memory analysis, HLO); `step` then runs it.

        `compiler_options`: XLA flags for this compile alone (names without `--`), as
        `jax.jit`'s; they apply to the first call only, which compiles."""
        if self._compiled is None:
            self._compiled = self.lower().compile(compiler_options)
        return self._compiled

    def trace(self) -> jax.stages.Traced:
        """One step traced for the abstract state and batch (its program: `.jaxpr`)."""
        with use_layout(self.layout):
            return self._step.trace(self.abstract_state(), self.abstract_batch())

    def lower(self, platform: str | None = None) -> jax.stages.Lowered:
        """One step lowered to StableHLO, for this mesh's platform or for `platform` ("cpu",
        "cuda", "rocm", "tpu"): what a program built here looks like on other devices."""
        return self.trace().lower(lowering_platforms=(platform,) if platform else None)

    def loss(self, params, batch: Batch) -> jax.Array:
        """The mean loss of `batch` at `params` (the state's layout), without gradients."""
        if self.replicas > 1 or self.reduce:
            params = diloco.stack(params, self.mesh.shape[diloco.AXIS])
        with use_layout(self.layout):
            loss_sum, count, _ = jax.jit(self.loss_fn)(params, batch)
        return jnp.sum(loss_sum) / jnp.maximum(jnp.sum(count), 1.0)

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        """One optimizer step; `state` is donated."""
        if self._compiled is not None:
            return self._compiled(state, batch)
        with use_layout(self.layout):
            return self._step(state, batch)


def build_trainer(config, mesh: Mesh) -> Trainer:
    """Check the config against the mesh (clear errors before any compile) and build a Trainer."""
    layout = make_layout(config, mesh)
    graphdef, params = abstract_model(config.model)
    if config.data.seq_len > config.model.max_seq_len:
        raise UserError(f"data.seq_len={config.data.seq_len} exceeds "
                        f"model.max_seq_len={config.model.max_seq_len}")
    tx, schedule = make_optimizer(config.optim, config.train.steps, frozen_groups(config.model))
    lora.check(config)
    adapters = lora.enabled(config.model)
    trained = lora.split(params)[0] if adapters else params
    par = parallelize(graphdef, params, jax.eval_shape(tx.init, trained), layout, config)
    state_specs = TrainState(step=PartitionSpec(), params=par.param_specs, opt_state=par.opt_specs)
    grad_specs = lora.split(par.param_specs)[0] if adapters else par.param_specs
    outer_tx, outer = None, None
    if par.replicas > 1:  # DiLoCo: the replicas' state stacked over `data`, the outer optimizer's
        grad_specs, outer_tx = diloco.replicated(par.param_specs), diloco.outer_optimizer(config)
        state_specs = TrainState(
            PartitionSpec(), par.param_specs,
            diloco.outer_specs(layout, jax.eval_shape(outer_tx.init, params)),
            local=(grad_specs, diloco.replicated(par.opt_specs)))
        outer = diloco.Outer(outer_tx, config.diloco.inner_steps, layout.shardings(grad_specs))
    reduce = None
    if par.compressed:  # each replica's gradient apart, summed by the compressed reduction
        grad_specs = diloco.replicated(par.param_specs)
        state_specs = state_specs.replace(residual=grad_specs)
        reduce = compression.Reduce(partial(compression.codec, config), layout, par.param_specs)
    step_fn = make_train_step(par.loss, tx, schedule, config.train.grad_accum_steps,
                              layout.shardings(grad_specs), config.model.moe.bias_rate, outer, reduce,
                              lora.PARTITION if adapters else None)
    on_host = offload.parts(config, mesh.devices.flat)
    shardings = layout.shardings(state_specs)
    if on_host:
        step_fn = offload.fetched(step_fn, shardings)
        shardings = offload.placed(shardings, on_host)
    jitted = jax.jit(step_fn, in_shardings=(shardings, layout.sharding(par.batch_spec)),
                     out_shardings=(shardings, None), donate_argnums=0)
    return Trainer(config, layout, graphdef, tx, schedule, state_specs, par.batch_spec,
                   par.virtual_stages, par.pipelined, on_host, par.replicas, outer_tx, reduce,
                   adapters, par.loss, jitted)


def frozen_groups(model_cfg) -> tuple[str, ...]:
    """The top-level parameter keys that `model.fusion.freeze` leaves untrained, checked."""
    groups = tuple(g.strip() for g in model_cfg.fusion.freeze.split(",") if g.strip())
    allowed = FREEZE_GROUPS.get(model_cfg.family, {})
    bad = [g for g in groups if g not in allowed]
    if bad:
        raise UserError(f"model.fusion.freeze names {bad[0]!r}; model.family={model_cfg.family!r} "
                        f"can freeze {', '.join(allowed) or 'nothing'}")
    return tuple(key for g in groups for key in allowed[g])
