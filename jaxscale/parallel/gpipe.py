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
The stages' layer stats (an MoE model's router statistics) are summed over the ticks a stage
works, which `pipeline.py` joins across stages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxscale.parallel.stages import AXIS, split_microbatches


def _not_sliced(prim, *_, **__) -> bool:
    """Remat policy: save everything but slices (and their reshapes) of arrays from outside."""
    return prim.name not in ("dynamic_slice", "reshape", "squeeze")


def _run_chunk(stage_fn: Callable, v: int, w, chunk, inp, side):
    """The stage's layers of virtual-stage chunk `chunk` on `inp`."""
    if v > 1:
        w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, chunk, 0, False), w)
    return stage_fn(w, inp, side)


class CircularSchedule:
    """`schedule(stage_fn, w, x, side)`: the pipelined layers on `x` under GPipe (`virtual=1`)
    or the interleaved schedule, where `stage_fn(w, x, side)` runs the layers `w` (a stage's, or
    a chunk's) and `side` holds per-example inputs ([batch, ...] leaves) every stage uses. Call
    it where `pipeline` is manual and `w` holds this stage's layers (`[V, L/(P V), ...]` with
    `virtual > 1`, see `pipeline.virtualize`).

    Microbatches go in groups of P: stage `s` at tick `t` works on `u = t - s`, chunk
    `(u mod PV) // P`, microbatch `(u // PV) P + u mod P`; the last stage's output for chunk c is
    the first stage's input for chunk c + 1 at the next tick, so one ring `ppermute` serves both.
    """

    def __init__(self, microbatches: int, stages: int, virtual: int = 1):
        self.m, self.p, self.v = microbatches, stages, virtual

    def __call__(self, stage_fn: Callable, w, x: jax.Array, side):
        """The last stage's outputs (on every stage), and this stage's layers' stats summed over
        the microbatches (`[V, layers per chunk, ...]` with `virtual > 1`)."""
        m, p, v = self.m, self.p, self.v
        run = functools.partial(_run_chunk, stage_fn, v)
        if v > 1:  # slice the chunk's weights again in the backward instead of keeping them per tick
            run = jax.checkpoint(run, policy=_not_sliced)
        xs = split_microbatches(x, m)
        sides = jax.tree.map(functools.partial(split_microbatches, m=m), side)
        tick = functools.partial(self._tick, run, w, xs, sides, jax.lax.axis_index(AXIS))
        init = (xs[0] * 0, xs * 0)  # zeros of the same type (varying over the manual axes)
        (_, outputs), (stats, chunks) = jax.lax.scan(tick, init, jnp.arange(m * v + p - 1))
        # the last stage's outputs to every stage; summed in float32 (XLA:CPU cannot all-reduce bf16)
        last = jax.lax.axis_index(AXIS) == p - 1
        outputs = jax.lax.psum(jnp.where(last, outputs, 0).astype(jnp.float32), AXIS)
        if v == 1:
            stats = jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)
        else:  # each tick's stats to its chunk
            to_chunk = jax.nn.one_hot(chunks, v, dtype=jnp.float32).T  # [V, ticks]
            stats = jax.tree.map(lambda a: jnp.tensordot(to_chunk, a, axes=1), stats)
        return outputs.astype(x.dtype).reshape(x.shape), stats

    def _tick(self, run, w, xs, sides, stage, carry, t):
        m, p, v = self.m, self.p, self.v
        held, outputs = carry
        u = t - stage
        chunk = jnp.clip((u % (p * v)) // p, 0, v - 1)
        i = jnp.clip((u // (p * v)) * p + u % p, 0, m - 1)
        inp = jnp.where((stage == 0) & (chunk == 0), xs[i], held)
        out, stats = run(w, chunk, inp, jax.tree.map(lambda a: a[i], sides))
        busy = (u >= 0) & (u < m * v)  # else the stage computes on a stand-in: its stats are dropped
        done = (stage == p - 1) & (chunk == v - 1) & busy
        outputs = outputs.at[i].set(jnp.where(done, out, outputs[i]))
        ring = [(j, (j + 1) % p) for j in range(p)]
        stats = jax.tree.map(lambda a: jnp.where(busy, a, 0), stats)
        return (jax.lax.ppermute(out, AXIS, ring), outputs), (stats, chunk)
