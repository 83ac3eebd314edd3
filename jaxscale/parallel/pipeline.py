"""Pipeline parallelism over the `pipeline` mesh axis: the GPipe schedule in SPMD form.

The stacked blocks' `layers` axis is sharded over `pipeline`, so stage `s` holds layers
`[s*L/P, (s+1)*L/P)`. Inside the manual region (see `data_parallel.py`, which makes `pipeline`
manual too) every stage runs the same program: for `M + P - 1` ticks, stage 0 takes the next
microbatch, every stage runs its layers on what it holds, and the results move one stage on with
a `ppermute`. The last stage's outputs are summed over the axis (an all-reduce of activations) so
that every stage continues with the head. `jax.grad` through the ticks gives GPipe's backward:
all microbatches' activations are kept until their backward, and the bubble is
(P - 1) / (M + P - 1) of the step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxscale.errors import UserError
from jaxscale.models.llama import scan_blocks

AXIS = "pipeline"
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def check_pipeline(config, stages: int, local_batch: int) -> None:
    """Clear errors for a pipeline config that cannot run, before anything compiles."""
    p = config.pipeline
    if p.schedule not in SCHEDULES:
        raise UserError(f"pipeline.schedule={p.schedule!r}; use one of {', '.join(SCHEDULES)}")
    if stages == 1:
        return
    if p.schedule != "gpipe" or p.virtual_stages != 1:
        raise NotImplementedError(f"the {p.schedule} pipeline schedule (virtual_stages="
                                  f"{p.virtual_stages}) is not implemented yet; use "
                                  f"pipeline.schedule=gpipe with virtual_stages=1")
    layers = config.model.n_layers
    if layers % stages:
        raise UserError(f"model.n_layers={layers} is not divisible by mesh.pipeline={stages}")
    if p.microbatches < 1 or local_batch % p.microbatches:
        raise UserError(f"the batch per data-parallel shard ({local_batch}) is not divisible by "
                        f"pipeline.microbatches={p.microbatches}")


def gpipe_blocks(microbatches: int, stages: int) -> Callable[..., jax.Array]:
    """A `run_blocks(blocks, x, positions, mask, apply_block)` running the GPipe schedule.

    Call it inside a region where `pipeline` is manual and `blocks` holds this stage's layers.
    """
    m, p = microbatches, stages

    def run(blocks, x, positions, mask, apply_block):
        stage = jax.lax.axis_index(AXIS)

        def split(a):
            return None if a is None else a.reshape(m, a.shape[0] // m, *a.shape[1:])

        xs, ps, masks = split(x), split(positions), split(mask)
        shift = [(i, (i + 1) % p) for i in range(p)]

        def tick(carry, t):
            held, outputs = carry
            i = jnp.clip(t - stage, 0, m - 1)  # the microbatch this stage works on at tick t
            inp = jnp.where(stage == 0, xs[jnp.clip(t, 0, m - 1)], held)
            out = scan_blocks(blocks, inp, ps[i], None if masks is None else masks[i], apply_block)
            done = t - (p - 1)  # the microbatch leaving the last stage
            j = jnp.clip(done, 0, m - 1)
            keep = (stage == p - 1) & (done >= 0)
            outputs = outputs.at[j].set(jnp.where(keep, out, outputs[j]))
            return (jax.lax.ppermute(out, AXIS, shift), outputs), None

        init = (xs[0] * 0, xs * 0)  # zeros of the same type (varying over the manual axes)
        (_, outputs), _ = jax.lax.scan(tick, init, jnp.arange(m + p - 1))
        outputs = jax.lax.psum(jnp.where(stage == p - 1, outputs, 0), AXIS)
        return outputs.reshape(x.shape)

    return run
