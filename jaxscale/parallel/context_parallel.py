"""Context parallelism over the `context` mesh axis: each row's sequence split across devices.

What it shards: the sequence of every activation inside the model (the residual stream, q, k,
v, the MLP's) over `context`; parameters are unaffected (replicated over `context`, their
gradients summed over it like data parallelism's). Each row is cut into 2C chunks and device c
holds chunks c and 2C-1-c (the zig-zag layout): under the causal mask every device then has the
same attention work. RoPE positions and document ids are those of the unsplit row, so packed
documents of any lengths keep apart.

Formulation: the loss runs in the `shard_map` manual over the batch's axes (`data_parallel.py`),
manual over `context` too, with the batch whole along the sequence; the models cut their
sequences where they form them (`attention.split_sequence`: after an early-fusion model joins image
and text tokens, say) and attend through `SequenceShards` (handed to them through
`attention.sequence_shards`), which writes the exchange out, `parallel.context_attention` choosing:
- `ring` (`ring_attention.py`): K/V (with their document ids) travel around the axis with
  `ppermute` while each device accumulates an online softmax over the blocks it has seen; the
  backward pass is a second ring that carries the blocks' K/V gradients home. Of each block
  only the causally needed half is computed (zig-zag: earlier chunks whole, later ones not at
  all). No device holds the whole K/V or any [seq, seq] array.
- `all_gather`: K/V gathered over the axis (cheap with grouped-query attention; Llama 3), each
  device's queries attend over them; the backward reduce-scatters their gradients.
- `all_to_all` (Ulysses, DeepSpeed): q, k, v go from sequence-split to head-split and back
  (heads divisible by C; K/V heads repeated up to a multiple of C), and each device runs the
  model's own attention (`model.attention`, cuDNN's and splash's included) over whole rows of its
  heads. `ring` and `all_gather` attend with their own XLA code whatever `model.attention` says.

Collectives per attention layer and step (`collective_bytes`), for a device's K (or V) of A
bytes (tokens/C x kv_heads x head_dim x dtype bytes) and Q of Q bytes: `ring`, 2(C-1)
collective-permutes of A forward; backward, 2(C-1) of A (K/V again) and 2(C-1) + 2 of the
float32 K/V gradients; `all_gather`, all-gathers of K and V (C x A each) forward and
reduce-scatters of their gradients backward; `all_to_all`, all-to-alls of q, k, v and the
output forward and of their gradients backward (each moving (C-1)/C of Q or of A, K/V heads
repeated). The document ids (int32, one per token) travel once per step for all layers (twice
around the ring).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxscale.errors import UserError
from jaxscale.models import attention
from jaxscale.parallel.ring_attention import AXIS, local_positions, ring_attention
from jaxscale.sharding import Layout

KINDS = ("ring", "all_gather", "all_to_all")


def token_axes(layout: Layout) -> tuple[str, ...]:
    """`context` when the mesh splits sequences: the loss's token sums are added over it."""
    return (AXIS,) if layout.mesh.shape[AXIS] > 1 else ()


def order(length: int, parts: int) -> np.ndarray:
    """The zig-zag layout: the positions of a row of `length` tokens in the order the devices
    hold them (device c: chunks c and 2 parts - 1 - c of 2 parts chunks)."""
    chunks = np.arange(length).reshape(2 * parts, -1)
    return np.concatenate([np.concatenate([chunks[c], chunks[2 * parts - 1 - c]])
                           for c in range(parts)])


def collective_bytes(kind: str, model, seq_len: int, rows: int,
                     parts: int) -> dict[str, tuple[int, int]]:
    """The attention exchanges of one step, as `jaxscale.hlo.collective_stats` counts them
    (`{op: (count, bytes)}`, bytes of the results), for `rows` rows per device of `seq_len`
    tokens split into `parts` and the decoder `model` (its config section)."""
    t, layers, item = seq_len // parts, model.n_layers, jnp.dtype(model.dtype).itemsize
    a = rows * t * model.n_kv_heads * model.head_dim * item  # this device's K (or V)
    ids = rows * t * 4  # its document ids
    if kind == "ring":
        grads = a * 4 // item  # float32
        hops = parts - 1
        # the backward ring re-sends K, V and the ids; with two devices its permutation is the
        # forward's, and XLA merges those re-sends with the forward's sends of the same arrays
        resends = hops if parts > 2 else 0
        return {"collective-permute": (layers * (4 * hops + 2 * resends + 2) + hops + resends,
                                       layers * (2 * (hops + resends) * a + (2 * hops + 2) * grads)
                                       + (hops + resends) * ids)}
    if kind == "all_gather":
        return {"all-gather": (2 * layers + 1, 2 * layers * parts * a + parts * ids),
                "reduce-scatter": (2 * layers, 2 * layers * a)}
    q = rows * t * model.n_heads * model.head_dim * item
    kv = a * parts // math.gcd(model.n_kv_heads, parts)  # heads repeated up to a multiple of C
    return {"all-to-all": (8 * layers, layers * (4 * q + 4 * kv)), "all-gather": (1, parts * ids)}


class SequenceShards:
    """`attention.SequenceShards` over the `context` axis (inside a `shard_map` manual over it),
    attending as `kind` (one of `KINDS`) says."""

    def __init__(self, kind: str, parts: int):
        self.kind, self.parts = kind, parts

    def split(self, x: jax.Array) -> jax.Array:
        n, length = jax.lax.axis_size(AXIS), x.shape[1]
        if length % (2 * n):
            raise UserError(f"sequence length {length} is not divisible by 2 x mesh.context={n} "
                            f"(context parallelism's zig-zag chunks); change data.seq_len or the mesh")
        c = jax.lax.axis_index(AXIS)
        chunks = x.reshape(x.shape[0], 2 * n, length // (2 * n), *x.shape[2:])
        mine = jnp.take(chunks, jnp.stack([c, 2 * n - 1 - c]), axis=1)
        return mine.reshape(x.shape[0], length // n, *x.shape[2:])

    def row_mean(self, x: jax.Array) -> jax.Array:
        return jax.lax.psum(jnp.sum(x, axis=1), AXIS) / (x.shape[1] * jax.lax.axis_size(AXIS))

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                  kind: str) -> jax.Array:
        if segments is None:
            segments = jnp.zeros(q.shape[:2], jnp.int32)
        if self.kind == "ring":
            return ring_attention(q, k, v, segments)
        if self.kind == "all_gather":
            return _all_gather_attention(q, k, v, segments)
        return _all_to_all_attention(q, k, v, segments, kind)


def _all_gather_attention(q, k, v, segments):
    n, t = jax.lax.axis_size(AXIS), q.shape[1]
    keys, values, key_segments = (jax.lax.all_gather(a, AXIS, axis=1, tiled=True)
                                  for a in (k, v, segments))
    mine = local_positions(jax.lax.axis_index(AXIS), n, t)
    allowed = (mine[:, None] >= jnp.asarray(order(t * n, n))[None, :])[None, None]
    allowed = allowed & (segments[:, :, None] == key_segments[:, None, :])[:, None]
    return attention.grouped_attention(q, keys, values, allowed)


def _all_to_all_attention(q, k, v, segments, kind):
    n, (t, h) = jax.lax.axis_size(AXIS), q.shape[1:3]
    if h % n:
        raise UserError(f"parallel.context_attention='all_to_all' needs the heads ({h}) divisible "
                        f"by mesh.context={n}; use ring or all_gather")
    repeat = n // math.gcd(k.shape[2], n)  # K/V heads up to a multiple of n (GQA groups kept)
    k, v = (jnp.repeat(a, repeat, axis=2) for a in (k, v))
    place = order(t * n, n)
    unsplit = np.argsort(place)

    def to_heads(a):  # [b, t, heads, d] -> whole rows of heads / n, in row order
        a = jax.lax.all_to_all(a, AXIS, 2, 1, tiled=True)
        return jnp.take(a, unsplit, axis=1)

    row_segments = jnp.take(jax.lax.all_gather(segments, AXIS, axis=1, tiled=True), unsplit, axis=1)
    out = attention.full_attention(*(to_heads(a) for a in (q, k, v)), row_segments, kind)
    return jax.lax.all_to_all(jnp.take(out, place, axis=1), AXIS, 1, 2, tiled=True)


class ContextParallelLoss:
    """`model_loss(graphdef, params, batch, **kwargs)` with each row's sequence split over
    `context` (`SequenceShards`)."""

    def __init__(self, model_loss: Callable, kind: str, parts: int):
        self.model_loss, self.kind, self.parts = model_loss, kind, parts

    def __call__(self, graphdef, params, batch, **kwargs):
        with attention.sequence_shards(SequenceShards(self.kind, self.parts)):
            return self.model_loss(graphdef, params, batch, **kwargs)


class WholeRowForward:
    """`forward(model, tokens, positions, mask) -> (x, ks, vs)` (a prefill's: the last block's
    output [batch, seq, embed] and every layer's K/V [layers, batch, seq, ...]) run with each
    row's sequence split over `context`, attending as `kind`; the outputs are gathered back into
    whole rows in row order (what a KV cache holds)."""

    def __init__(self, forward: Callable, mesh, kind: str):
        self.forward, self.mesh, self.kind = forward, mesh, kind

    def __call__(self, model, tokens: jax.Array, positions: jax.Array, mask: jax.Array | None):
        if mask is not None:
            raise NotImplementedError("the prefill of a sliding-window KV cache under context "
                                      "parallelism; set infer.window=0 or mesh.context=1")
        graph, state = nnx.split(model)
        parts = self.mesh.shape[AXIS]
        shards = SequenceShards(self.kind, parts)
        unsplit = np.argsort(order(tokens.shape[1], parts))

        def local(state, tokens, positions):
            with attention.sequence_shards(shards):
                return self.forward(nnx.merge(graph, state), shards.split(tokens),
                                    shards.split(positions), None)

        by_device = jax.shard_map(local, mesh=self.mesh, in_specs=jax.P(), axis_names={AXIS},
                                  out_specs=(jax.P(None, AXIS), jax.P(None, None, AXIS),
                                             jax.P(None, None, AXIS)))(state, tokens, positions)
        return tuple(jnp.take(a, unsplit, axis=axis) for a, axis in zip(by_device, (1, 2, 2),
                                                                         strict=True))


def check(config, layout: Layout) -> int:
    """How many ways sequences are split (1: no `context` axis), with clear errors for what
    cannot work."""
    n, kind = layout.mesh.shape[AXIS], config.parallel.context_attention
    if kind not in KINDS:
        raise UserError(f"parallel.context_attention={kind!r}; use {', '.join(KINDS)}")
    if n == 1:
        return 1
    model = config.model
    if model.family == "clip":
        raise NotImplementedError("context parallelism for the clip family (its captions are "
                                  "short); set mesh.context=1")
    if model.get("moe") and model.moe.n_experts and model.moe.dispatch == "capacity":
        raise NotImplementedError("model.moe.dispatch='capacity' under context parallelism (a "
                                  "row's capacity spans devices); use dispatch='dropless'")
    return n


def spans_stages(config, layout: Layout) -> bool:
    """Whether attention holds collectives that are one operation across every pipeline stage's
    devices (the ring's collective-permutes), which a 1F1B schedule must run in lockstep."""
    return layout.mesh.shape[AXIS] > 1 and config.parallel.context_attention == "ring"
