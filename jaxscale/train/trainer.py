"""Put a model, its optimizer and a train step on a mesh: shardings, sharded init, compiled step.

This is where the parallelism strategy is applied, from the config alone: parameters follow
the logical-axis rules (FSDP over `fsdp`, Megatron TP over `tensor`), the batch is split over
`data` x `fsdp`, and `parallel.zero_stage` adds sharding over `data`: 1 the optimizer state;
2 also parameters and gradients between steps (gathered once per step, like PyTorch FSDP's
SHARD_GRAD_OP); 3 also re-gathers each parameter in the backward pass (FULL_SHARD).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.data.loader import batch_shapes
from jaxscale.errors import UserError
from jaxscale.models import DECODERS, build_model
from jaxscale.models.fusion import FREEZE_GROUPS
from jaxscale.parallel.data_parallel import data_parallel_loss
from jaxscale.parallel.pipeline import check_pipeline, pipeline_loss, virtualize
from jaxscale.sharding import (
    DEFAULT_RULES,
    PIPELINE_RULES,
    SEQUENCE_PARALLEL_RULES,
    Layout,
    merge_rules,
    use_layout,
)
from jaxscale.train.optim import make_optimizer
from jaxscale.train.step import Batch, TrainState, loss_sums, make_train_step


def make_layout(config, mesh: Mesh) -> Layout:
    """The Layout a config asks for: default rules, sequence parallelism, user overrides."""
    rules = DEFAULT_RULES
    if mesh.shape["pipeline"] > 1:
        rules = merge_rules(rules, PIPELINE_RULES)
    if config.parallel.sequence_parallel:
        rules = merge_rules(rules, SEQUENCE_PARALLEL_RULES)
    rules = merge_rules(rules, config.parallel.rules)
    known = [name for name, _ in DEFAULT_RULES]
    for name, _ in config.parallel.rules:
        if name not in known:  # every logical axis the models name has a default rule
            raise UserError(f"parallel.rules names logical axis {name!r}, which no model names; "
                            f"use one of {', '.join(known)}")
    return Layout(mesh, rules, config.parallel.zero_stage)


def abstract_model(model_cfg) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and parameter shapes of the model, without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0))))


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
    loss_fn: Callable = dataclasses.field(repr=False, default=None)
    _step: Callable = dataclasses.field(repr=False, default=None)
    _compiled: object = dataclasses.field(repr=False, default=None)
    _converters: dict = dataclasses.field(repr=False, default_factory=dict)

    @property
    def mesh(self) -> Mesh:
        return self.layout.mesh

    @property
    def state_shardings(self) -> TrainState:
        return self.layout.shardings(self.state_specs)

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.layout.sharding(self.batch_spec)

    def init(self, seed: int | None = None) -> TrainState:
        """Initialise parameters and optimizer state directly in their shards (never whole)."""
        seed = self.config.seed if seed is None else seed

        @partial(jax.jit, out_shardings=self.state_shardings)
        def init_fn(key):
            model = build_model(self.config.model, nnx.Rngs(params=key))
            params = virtualize(nnx.state(model), self.virtual_stages)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=self.tx.init(params))

        with use_layout(self.layout):
            return init_fn(jax.random.key(seed))

    def abstract_state(self, canonical: bool = False) -> TrainState:
        """ShapeDtypeStructs of the state, with shardings (for AOT compiles and restores).

        `canonical`: the form checkpoints hold, stacked layers `[L, ...]` whatever the schedule.
        """
        v = 1 if canonical else self.virtual_stages
        shapes = jax.eval_shape(
            lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
            virtualize(abstract_model(self.config.model)[1], v))
        leaves, treedef = jax.tree.flatten(shapes)
        specs = virtualize(self.state_specs, self.virtual_stages, inverse=True) if canonical else (
            self.state_specs)
        shardings = jax.tree.leaves(self.layout.shardings(specs))
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
                partial(virtualize, virtual=self.virtual_stages, inverse=inverse),
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
            with use_layout(self.layout):
                self._compiled = self._step.lower(self.abstract_state(),
                                                  self.abstract_batch()).compile(compiler_options)
        return self._compiled

    def loss(self, params, batch: Batch) -> jax.Array:
        """The mean loss of `batch` at `params` (the state's layout), without gradients."""
        with use_layout(self.layout):
            loss_sum, count = jax.jit(self.loss_fn)(params, batch)
        return loss_sum / jnp.maximum(count, 1.0)

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
    _check_batch(config, layout)
    tx, schedule = make_optimizer(config.optim, config.train.steps, frozen_groups(config.model))

    opt_shapes = jax.eval_shape(tx.init, params)
    param_specs = layout.param_specs(params, zero_from_stage=2)
    state_specs = TrainState(step=PartitionSpec(), params=param_specs,
                             opt_state=layout.param_specs(opt_shapes, zero_from_stage=1))
    batch_spec = layout.spec(("batch",))

    regather = layout.mesh.shape["fsdp"] > 1 or layout.zero_stage == 3
    stages, pipe = layout.mesh.shape["pipeline"], config.pipeline
    virtual = pipe.virtual_stages if stages > 1 and pipe.schedule == "interleaved" else 1
    state_specs = virtualize(state_specs, virtual)
    param_specs = state_specs.params
    model_loss = (pipeline_loss(pipe.schedule, pipe.microbatches, stages, virtual) if stages > 1
                  else loss_sums)
    vocab_tables = {key: p.get_metadata()["logical_axes"].index("vocab")
                    for key, p in params.items()
                    if isinstance(p, nnx.Variable) and "vocab" in p.get_metadata()["logical_axes"]}
    loss_fn = data_parallel_loss(
        graphdef, layout, param_specs, regather=regather, model_loss=model_loss,
        stacked_dims=1 + (virtual > 1),
        vocab_tables=vocab_tables if config.model.family in DECODERS and stages == 1 else None)
    step_fn = make_train_step(loss_fn, tx, schedule, config.train.grad_accum_steps,
                              layout.shardings(param_specs))
    shardings = layout.shardings(state_specs)
    jitted = jax.jit(step_fn, in_shardings=(shardings, layout.sharding(batch_spec)),
                     out_shardings=(shardings, None), donate_argnums=0)
    return Trainer(config, layout, graphdef, tx, schedule, state_specs, batch_spec, virtual,
                   loss_fn, jitted)


def frozen_groups(model_cfg) -> tuple[str, ...]:
    """The top-level parameter keys that `model.fusion.freeze` leaves untrained, checked."""
    groups = tuple(g.strip() for g in model_cfg.fusion.freeze.split(",") if g.strip())
    allowed = FREEZE_GROUPS.get(model_cfg.family, {})
    bad = [g for g in groups if g not in allowed]
    if bad:
        raise UserError(f"model.fusion.freeze names {bad[0]!r}; model.family={model_cfg.family!r} "
                        f"can freeze {', '.join(allowed) or 'nothing'}")
    return tuple(key for g in groups for key in allowed[g])


def _check_batch(config, layout: Layout) -> None:
    batch, accum = config.train.global_batch_size, config.train.grad_accum_steps
    dp = layout.size([a for a in ("data", "fsdp") if layout.mesh.shape[a] > 1])
    if accum < 1 or batch % accum:
        raise UserError(f"train.global_batch_size={batch} is not divisible by "
                        f"train.grad_accum_steps={accum}")
    if (batch // accum) % dp:
        raise UserError(f"micro-batch {batch // accum} (train.global_batch_size / "
                        f"grad_accum_steps) is not divisible by the data-parallel size {dp} "
                        f"(data x fsdp); change the batch size or the mesh")
    if layout.mesh.shape["pipeline"] > 1 and config.model.family not in DECODERS:
        raise NotImplementedError(f"pipeline parallelism for model.family={config.model.family!r} "
                                  f"(pipelines run {', '.join(DECODERS)}); set mesh.pipeline=1")
    check_pipeline(config, layout.mesh.shape["pipeline"], batch // accum // dp)
    if config.data.seq_len > config.model.max_seq_len:
        raise UserError(f"data.seq_len={config.data.seq_len} exceeds "
                        f"model.max_seq_len={config.model.max_seq_len}")


def bytes_per_device(specs, shapes, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of arrays with these specs (works for abstract meshes too)."""
    total = 0
    for spec, s in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
                       jax.tree.leaves(shapes), strict=True):
        shard = list(s.shape)
        for i, axes in enumerate(spec):
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                shard[i] = -(-shard[i] // mesh_shape[a])
        total += int(np.prod(shard)) * jnp.dtype(s.dtype).itemsize
    return total
