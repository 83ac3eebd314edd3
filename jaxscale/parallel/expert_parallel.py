"""Expert parallelism over the `expert` mesh axis: each device holds and runs its share of the
experts, and tokens travel to them and back by all-to-all.

What it shards: the `experts` axis of the MoE layers' expert weights over `expert` (each device
holds `E / X` of them), and, as DeepSpeed-MoE and MaxText do, the batch over `expert` too
(EP folded into data parallelism): outside the MoE layers `expert` is one more data-parallel axis,
whose parameters are replicated over it and whose gradients are summed over it. An expert's
hidden dimension (`mlp`) stays on `tensor`, its width (`embed`) on `fsdp`.

Formulation: the loss already runs in a `shard_map` manual over the batch's axes
(`data_parallel.py`), so each device routes its own tokens; `ExpertShards` (handed to the
models through `moe.expert_shards`) writes the exchange out:
- dropless: the assignments, sorted by expert, go to the devices of their experts with a ragged
  all-to-all (`jaxscale.cpu.ragged_all_to_all`: padded on XLA:CPU, which has none), after an
  all-to-all of the per-expert counts; each device sorts what it received by its own experts,
  runs its grouped matmuls, and the outputs return by the reverse ragged all-to-all. The
  receiving buffer holds everything the axis could send a device (X times its own rows), unless
  `parallel.expert_buffer` caps it (then what overflows is dropped and counted).
- capacity: the static [experts, slots, embed] buffers are exchanged with `all_to_all`.
The backward pass is the transpose of the same exchanges.

Collectives per MoE layer and step, for A bytes of routed activations per device (tokens x top_k
x embed x dtype bytes): dropless, two ragged all-to-alls forward and two backward, each moving
(X-1)/X A on average (all of A when the router sends everything elsewhere), plus all-to-alls of
X x E/X counts; capacity, the same four with A = experts x slots x embed x bytes (padded slots
included).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxscale import cpu
from jaxscale.models import moe
from jaxscale.sharding import Layout, Rules

AXIS = "expert"
# the batch over `expert` as well as data parallelism's axes (this rule replaces theirs)
RULES: Rules = (("experts", AXIS), ("batch", ("data", "fsdp", AXIS)))


def batch_axes(layout: Layout) -> tuple[str, ...]:
    """`expert` when the mesh splits the experts: the batch is split over it too."""
    return (AXIS,) if layout.mesh.shape[AXIS] > 1 else ()


def _exchange(x: jax.Array, out_rows: int, offsets, sizes, dest_offsets, recv_sizes) -> jax.Array:
    out = jnp.zeros((out_rows, *x.shape[1:]), x.dtype)
    out = jax.lax.pcast(out, tuple(sorted(jax.typeof(x).manual_axis_type.varying)), to="varying")
    return cpu.ragged_all_to_all(x, out, offsets, sizes, dest_offsets, recv_sizes, axis_name=AXIS)


def _starts(sizes: jax.Array) -> jax.Array:
    return jnp.cumsum(sizes) - sizes


def _admitted(sizes: jax.Array, room: int) -> jax.Array:
    """`sizes` [...] cut, in order, to the first `room` rows they hold together."""
    flat = sizes.reshape(-1)
    return jnp.clip(room - _starts(flat), 0, flat).reshape(sizes.shape)


class ExpertShards:
    """`moe.ExpertShards` over the `expert` axis (inside a `shard_map` manual over it).

    A device receives its experts' rows into a buffer of `buffer_factor` times the rows it
    sends (0: as many as the whole axis could send it, so nothing is ever dropped); when more
    arrive, the sources' rows are taken in order of source, then expert, and the rest are
    dropped: they come back as zeros and are counted.
    """

    def __init__(self, buffer_factor: float = 0.0):
        self.buffer_factor = buffer_factor

    def ragged(self, rows: jax.Array, sizes: jax.Array,
               apply: Callable[[jax.Array, jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        n = jax.lax.axis_size(AXIS)
        capacity = n * rows.shape[0]  # everything every device holds could come here
        if self.buffer_factor:
            capacity = min(capacity, math.ceil(self.buffer_factor * rows.shape[0]))
        counts = sizes.reshape(n, -1)  # [device, its experts]: what goes where
        local = counts.shape[1]
        received = _admitted(jax.lax.all_to_all(counts, AXIS, 0, 0, tiled=True), capacity)
        recv = jnp.sum(received, axis=1)  # [source]: the rows taken from each
        send = jax.lax.all_to_all(recv, AXIS, 0, 0, tiled=True)  # the first rows of each chunk
        dropped = jnp.sum(counts) - jnp.sum(send)
        # where each source's rows land here, and where mine land on each device
        recv_starts, send_starts = _starts(recv), _starts(jnp.sum(counts, axis=1))
        dest = jax.lax.all_to_all(recv_starts, AXIS, 0, 0, tiled=True)
        got = _exchange(rows, capacity, send_starts, send, dest, recv)
        # by source, then expert; sort by expert (rows past the received ones last)
        expert = jnp.repeat(jnp.tile(jnp.arange(local), n), received.reshape(-1),
                            total_repeat_length=capacity)
        expert = jnp.where(jnp.arange(capacity) < jnp.sum(recv), expert, local)
        order = jnp.argsort(expert, stable=True)
        out = apply(jnp.take(got, order, axis=0), jnp.sum(received, axis=0))
        out = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
        back = jax.lax.all_to_all(send_starts, AXIS, 0, 0, tiled=True)  # my rows' places there
        return _exchange(out, rows.shape[0], recv_starts, recv, back, send), dropped

    def buffers(self, slots: jax.Array, apply: Callable[[jax.Array], jax.Array]) -> jax.Array:
        mine = jax.lax.all_to_all(slots, AXIS, 0, 1, tiled=True)  # [my experts, n * slots, d]
        return jax.lax.all_to_all(apply(mine), AXIS, 1, 0, tiled=True)


class ExpertParallelLoss:
    """`model_loss(graphdef, params, batch, **kwargs)` with the MoE layers' experts split over
    `expert` (`ExpertShards`)."""

    def __init__(self, model_loss: Callable, buffer_factor: float = 0.0):
        self.model_loss, self.buffer_factor = model_loss, buffer_factor

    def __call__(self, graphdef, params, batch, **kwargs):
        with moe.expert_shards(ExpertShards(self.buffer_factor)):
            return self.model_loss(graphdef, params, batch, **kwargs)
