"""Pipeline parallelism over the `pipeline` mesh axis: GPipe, 1F1B and interleaved schedules.

The stacked blocks' `layers` axis is sharded over `pipeline`, so stage `s` holds layers
`[s*L/P, (s+1)*L/P)`. Inside the manual region (see `data_parallel.py`, which makes `pipeline`
manual too) every stage runs the same program, one tick at a time; activations move one stage on
per tick with a `ppermute`.

- `gpipe`: `M + P - 1` forward ticks; stage `s` runs microbatch `t - s` at tick `t`. The last
  stage's outputs are summed over the axis (an all-reduce of activations) so that every stage
  continues with the head, and `jax.grad` through the ticks gives the backward: every microbatch's
  activations are kept until their backward. Bubble `(P - 1) / (M + P - 1)`.
- `1f1b`: forward and backward interleaved per tick (`one_f_one_b.py`); a stage keeps at most
  `2P - 1` microbatches' activations whatever `M` is.
- `interleaved`: each stage holds `V` chunks of `L/(P V)` layers, chunk `c` of stage `s` being
  virtual stage `c P + s`; activations go round the ring `V` times. `V M + P - 1` ticks of `1/V`
  of a stage's work: bubble `(P - 1) / (V M + P - 1)`. The stacked layers are stored as
  `[V, L/V, ...]` with the second axis on `pipeline` (`virtualize`), so that each device holds its
  chunks; checkpoints keep the `[L, ...]` form.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.models.llama import scan_blocks
from jaxscale.train.step import loss_sums

AXIS = "pipeline"
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


def pipeline_loss(schedule: str, microbatches: int, stages: int, virtual_stages: int = 1) -> Callable:
    """`loss(graphdef, params, batch, **model_kwargs) -> (loss_sum, count)` under a schedule.

    Runs where `pipeline` is manual; returns the same sums on every stage.
    """
    if schedule == "1f1b":
        from jaxscale.parallel.one_f_one_b import one_f_one_b_loss

        return one_f_one_b_loss(microbatches, stages)
    if schedule == "gpipe":
        run = gpipe_blocks(microbatches, stages)
    else:
        run = interleaved_blocks(microbatches, stages, virtual_stages)

    def loss(graphdef, params, batch, **model_kwargs):
        loss_sum, count = loss_sums(graphdef, params, batch, run_blocks=run, **model_kwargs)
        # every stage computed the same loss from the broadcast last-stage output
        return jax.lax.pmean(loss_sum, AXIS), jax.lax.pmean(count, AXIS)

    return loss


def split_microbatches(a: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [m, B/m, ...] (microbatch i = rows [i B/m, (i+1) B/m))."""
    return None if a is None else a.reshape(m, a.shape[0] // m, *a.shape[1:])


def gpipe_blocks(microbatches: int, stages: int) -> Callable[..., jax.Array]:
    """A `run_blocks(blocks, x, positions, mask, apply_block)` running the GPipe schedule.

    Call it inside a region where `pipeline` is manual and `blocks` holds this stage's layers.
    """
    return interleaved_blocks(microbatches, stages, 1)


def interleaved_blocks(microbatches: int, stages: int, virtual: int) -> Callable[..., jax.Array]:
    """`run_blocks` for the circular schedule; `virtual=1` is GPipe.

    With `virtual > 1` the local blocks are `[V, L/(P V), ...]` (see `virtualize`). Microbatches go
    in groups of P: stage `s` at tick `t` works on `u = t - s`, chunk `(u mod PV) // P`,
    microbatch `(u // PV) P + u mod P`; the last stage's output for chunk c is the first
    stage's input for chunk c + 1 at the next tick, so one ring `ppermute` serves both.
    """
    m, p, v = microbatches, stages, virtual

    def run(blocks, x, positions, mask, apply_block):
        stage = jax.lax.axis_index(AXIS)
        graph, stacked = nnx.split(blocks)

        def run_chunk(stacked, chunk, inp, positions, mask):
            if v > 1:
                stacked = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, chunk, 0, False),
                                       stacked)
            return scan_blocks(nnx.merge(graph, stacked), inp, positions, mask, apply_block)

        if v > 1:  # slice the chunk's weights again in the backward instead of keeping them per tick
            run_chunk = jax.checkpoint(run_chunk, policy=_not_sliced)

        xs, ps, masks = (split_microbatches(a, m) for a in (x, positions, mask))
        ring = [(i, (i + 1) % p) for i in range(p)]

        def tick(carry, t):
            held, outputs = carry
            u = t - stage
            chunk = jnp.clip((u % (p * v)) // p, 0, v - 1)
            i = jnp.clip((u // (p * v)) * p + u % p, 0, m - 1)
            inp = jnp.where((stage == 0) & (chunk == 0), xs[i], held)
            out = run_chunk(stacked, chunk, inp, ps[i], None if masks is None else masks[i])
            done = (stage == p - 1) & (chunk == v - 1) & (u >= 0) & (u < m * v)
            outputs = outputs.at[i].set(jnp.where(done, out, outputs[i]))
            return (jax.lax.ppermute(out, AXIS, ring), outputs), None

        init = (xs[0] * 0, xs * 0)  # zeros of the same type (varying over the manual axes)
        (_, outputs), _ = jax.lax.scan(tick, init, jnp.arange(m * v + p - 1))
        # the last stage's outputs to every stage; summed in float32 (XLA:CPU cannot all-reduce bf16)
        outputs = jax.lax.psum(jnp.where(stage == p - 1, outputs, 0).astype(jnp.float32), AXIS)
        return outputs.astype(x.dtype).reshape(x.shape)

    return run


def _not_sliced(prim, *_, **__) -> bool:
    """Remat policy: save everything but slices (and their reshapes) of arrays from outside."""
    return prim.name not in ("dynamic_slice", "reshape", "squeeze")


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
