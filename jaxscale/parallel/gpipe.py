"""The GPipe and interleaved (circular) pipeline schedules, in SPMD form.

Every stage runs the same program, one tick at a time, where `pipeline` is a manual axis;
activations move one stage on per tick with a `ppermute`.

- GPipe: `M + P - 1` forward ticks; stage `s` runs microbatch `t - s` at tick `t`. The last
  stage's outputs are summed over the axis (an all-reduce of activations) so that every stage
  continues with the head, and `jax.grad` through the ticks gives the backward: every
  microbatch's activations are kept until their backward. Bubble `(P - 1) / (M + P - 1)`.
- Interleaved: each stage holds `V` chunks of `L/(P V)` layers, chunk `c` of stage `s` being
  virtual stage `c P + s`; activations go round the ring `V` times. `V M + P - 1` ticks of `1/V`
  of a stage's work: bubble `(P - 1) / (V M + P - 1)`. GPipe is the case `V = 1`.

Collectives per step, for microbatches of `A` activation bytes: one `ppermute` of `A` per tick
forward and its transpose backward, and one all-reduce of the `M` outputs (`M A`, float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.models.decoder import scan_blocks

AXIS = "pipeline"


def split_microbatches(a: jax.Array | None, m: int) -> jax.Array | None:
    """[B, ...] -> [m, B/m, ...] (microbatch i = rows [i B/m, (i+1) B/m))."""
    return None if a is None else a.reshape(m, a.shape[0] // m, *a.shape[1:])


def _not_sliced(prim, *_, **__) -> bool:
    """Remat policy: save everything but slices (and their reshapes) of arrays from outside."""
    return prim.name not in ("dynamic_slice", "reshape", "squeeze")


def _run_chunk(graph, v: int, apply_block, stacked, chunk, inp, positions, mask):
    """The stage's layers of virtual-stage chunk `chunk` on `inp`."""
    if v > 1:
        stacked = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, chunk, 0, False), stacked)
    return scan_blocks(nnx.merge(graph, stacked), inp, positions, mask, apply_block)


class CircularSchedule:
    """`run_blocks(blocks, x, positions, mask, apply_block)` under GPipe (`virtual=1`) or the
    interleaved schedule; call it where `pipeline` is manual and `blocks` holds this stage's
    layers (`[V, L/(P V), ...]` with `virtual > 1`, see `pipeline.virtualize`).

    Microbatches go in groups of P: stage `s` at tick `t` works on `u = t - s`, chunk
    `(u mod PV) // P`, microbatch `(u // PV) P + u mod P`; the last stage's output for chunk c is
    the first stage's input for chunk c + 1 at the next tick, so one ring `ppermute` serves both.
    """

    def __init__(self, microbatches: int, stages: int, virtual: int = 1):
        self.m, self.p, self.v = microbatches, stages, virtual

    def __call__(self, blocks, x, positions, mask, apply_block) -> jax.Array:
        m, p, v = self.m, self.p, self.v
        graph, stacked = nnx.split(blocks)
        run = functools.partial(_run_chunk, graph, v, apply_block)
        if v > 1:  # slice the chunk's weights again in the backward instead of keeping them per tick
            run = jax.checkpoint(run, policy=_not_sliced)
        xs, ps, masks = (split_microbatches(a, m) for a in (x, positions, mask))
        tick = functools.partial(self._tick, run, stacked, xs, ps, masks, jax.lax.axis_index(AXIS))
        init = (xs[0] * 0, xs * 0)  # zeros of the same type (varying over the manual axes)
        (_, outputs), _ = jax.lax.scan(tick, init, jnp.arange(m * v + p - 1))
        # the last stage's outputs to every stage; summed in float32 (XLA:CPU cannot all-reduce bf16)
        last = jax.lax.axis_index(AXIS) == p - 1
        outputs = jax.lax.psum(jnp.where(last, outputs, 0).astype(jnp.float32), AXIS)
        return outputs.astype(x.dtype).reshape(x.shape)

    def _tick(self, run, stacked, xs, ps, masks, stage, carry, t):
        m, p, v = self.m, self.p, self.v
        held, outputs = carry
        u = t - stage
        chunk = jnp.clip((u % (p * v)) // p, 0, v - 1)
        i = jnp.clip((u // (p * v)) * p + u % p, 0, m - 1)
        inp = jnp.where((stage == 0) & (chunk == 0), xs[i], held)
        out = run(stacked, chunk, inp, ps[i], None if masks is None else masks[i])
        done = (stage == p - 1) & (chunk == v - 1) & (u >= 0) & (u < m * v)
        outputs = outputs.at[i].set(jnp.where(done, out, outputs[i]))
        ring = [(j, (j + 1) % p) for j in range(p)]
        return (jax.lax.ppermute(out, AXIS, ring), outputs), None
