"""Compressed gradient reduction over the `data` mesh axis, with error feedback
(`parallel.grad_compression`: bf16, int8 or topk).

What it changes: the gradients' reduction over `data` (typically the axis whose `dcn` part spans
slices or sites, where bytes are dear); fsdp, tensor, pipeline and context parallelism inside each
`data` replica reduce as without it. The loss runs as under DiLoCo (`diloco.py`): the parameters
are stacked over the R = `mesh.data` replicas, a local broadcast, so each replica's gradient
comes out unreduced, `[R, ...]` split over `data`.

Formulation (`Reduce`), on every device's shards, all leaves as one flat float32 buffer: add the
residual `e` the device kept from the last step, x = g + e; split x into R chunks and encode them
(`Codec`); an all-to-all sends chunk j to replica j, which decodes what it received and sums it in
float32 (a reduce-scatter); it encodes its summed chunk again and an all-gather brings every
replica every chunk (ZeRO++'s quantized reduction). What encoding loses stays behind: the device
keeps x - decode(encode(x)) as its next residual, and chunk j's owner adds the error of
re-encoding the sum, so sum over replicas of x = the reduced gradient + sum of the new residuals
(error feedback: nothing is dropped, only delayed). The residuals, one float32 copy of each
device's gradient shards, are in the train state (`TrainState.residual`) and checkpointed.

Codecs and bytes per value on the wire (float32 all-reduce: 4): bf16 2; int8 1 + 4 / 256 (codes
and a float32 scale per block of 256, absmax); topk 8 x `parallel.topk_fraction` (the largest
values of each chunk with their int32 indices). Per device per step, each of the two collectives
moves (R-1)/R x the encoded buffer, as a ring all-reduce's two halves move the float32 one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.sharding import Layout

AXIS = "data"
KINDS = ("none", "bf16", "int8", "topk")
BLOCK = 256  # int8: values per scale


class Codec(Protocol):
    """`encode(x [n, C] float32) -> payload` (a tuple of arrays with leading dim n) and its
    inverse up to the compression's loss, `decode(payload) -> [n, C] float32`."""

    def encode(self, x: jax.Array) -> tuple[jax.Array, ...]: ...
    def decode(self, payload: tuple[jax.Array, ...]) -> jax.Array: ...


class BF16:
    """bfloat16, sent as its bits (uint16): collectives only move it, and no backend's pass may
    widen a uint16 exchange as XLA:CPU widens bfloat16 ones to float32."""

    def encode(self, x):
        return (jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16),)

    def decode(self, payload):
        return jax.lax.bitcast_convert_type(payload[0], jnp.bfloat16).astype(jnp.float32)


class Int8:
    """Absmax int8 codes with a float32 scale per block of `BLOCK` values."""

    def encode(self, x):
        blocks = x.reshape(*x.shape[:-1], -1, BLOCK)
        scale = jnp.max(jnp.abs(blocks), axis=-1) / 127.0
        safe = jnp.where(scale > 0, scale, 1.0)
        codes = jnp.clip(jnp.round(blocks / safe[..., None]), -127, 127).astype(jnp.int8)
        return codes.reshape(x.shape), scale

    def decode(self, payload):
        codes, scale = payload
        blocks = codes.reshape(*codes.shape[:-1], -1, BLOCK).astype(jnp.float32)
        return (blocks * scale[..., None]).reshape(codes.shape)


class TopK:
    """The `k` values of largest magnitude of each row, with their indices."""

    def __init__(self, k: int, width: int):
        self.k, self.width = k, width

    def encode(self, x):
        _, index = jax.lax.top_k(jnp.abs(x), self.k)
        return jnp.take_along_axis(x, index, axis=-1), index.astype(jnp.int32)

    def decode(self, payload):
        values, index = payload
        rows = jnp.zeros((*values.shape[:-1], self.width), jnp.float32)
        return jax.vmap(lambda r, i, v: r.at[i].set(v))(
            rows.reshape(-1, self.width), index.reshape(-1, self.k), values.reshape(-1, self.k)
        ).reshape(rows.shape)


def kind(config, layout: Layout) -> str:
    """`parallel.grad_compression`, checked against the mesh and the other settings."""
    name = config.parallel.grad_compression
    if name not in KINDS:
        raise UserError(f"parallel.grad_compression={name!r}; use one of {', '.join(KINDS)}")
    if name == "none":
        return name
    if layout.mesh.shape[AXIS] == 1:
        raise UserError(f"parallel.grad_compression={name!r} compresses the gradients' reduction "
                        "over mesh.data, which is 1 here; set mesh.data > 1 or grad_compression='none'")
    if config.diloco.enabled:
        raise NotImplementedError("compressed reduction of DiLoCo's outer step; use "
                                  "parallel.grad_compression='none' with diloco.enabled")
    if config.parallel.zero_stage >= 2:
        raise NotImplementedError(f"compressed reduction with parallel.zero_stage="
                                  f"{config.parallel.zero_stage} (gradients sharded over data); "
                                  "use zero_stage 0 or 1, and mesh.fsdp inside the replicas")
    if config.pipeline.virtual_stages > 1 and layout.mesh.shape["pipeline"] > 1:
        raise NotImplementedError("compressed reduction with the interleaved schedule; use "
                                  "pipeline.schedule gpipe or 1f1b")
    if layout.mesh.shape["expert"] > 1:
        raise NotImplementedError("compressed reduction with expert parallelism; set mesh.expert=1")
    return name


def codec(config, width: int) -> Codec:
    """The codec of `parallel.grad_compression` for chunks of `width` values."""
    name = config.parallel.grad_compression
    if name == "bf16":
        return BF16()
    if name == "int8":
        return Int8()
    return TopK(max(1, round(width * config.parallel.topk_fraction)), width)


class Reduce:
    """`reduce(grads, residual) -> (the sum over replicas, the new residual)`.

    `grads` and `residual` are stacked over the replicas, `[R, ...]` with the specs of
    `param_specs` after the replica axis; the sum comes out with `param_specs` (whole on every
    replica). `make_codec(width)` gives the codec of chunks of `width` values."""

    def __init__(self, make_codec: Callable[[int], Codec], layout: Layout, param_specs):
        self.make_codec, self.layout, self.param_specs = make_codec, layout, param_specs
        self.replicas = layout.mesh.shape[AXIS]

    def __call__(self, grads, residual):
        is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
        stacked = jax.tree.map(lambda s: PartitionSpec(AXIS, *s), self.param_specs, is_leaf=is_spec)
        return jax.shard_map(self._local, mesh=self.layout.mesh, in_specs=(stacked, stacked),
                             out_specs=(self.param_specs, stacked), check_vma=False)(grads, residual)

    def _local(self, grads, residual):
        leaves, treedef = jax.tree.flatten(grads)
        sizes = [g.size for g in leaves]
        flat = jnp.concatenate([(g.astype(jnp.float32) + e).reshape(-1)
                                for g, e in zip(leaves, jax.tree.leaves(residual), strict=True)])
        n = self.replicas
        width = math.ceil(flat.size / (n * BLOCK)) * BLOCK
        x = jnp.pad(flat, (0, n * width - flat.size)).reshape(n, width)
        total, left = exchange(x, self.make_codec(width), AXIS)
        out, res = [], []
        for g, size, start in zip(leaves, sizes, itertools.accumulate([0, *sizes]), strict=False):
            out.append(total[start:start + size].reshape(g.shape[1:]).astype(g.dtype))
            res.append(left[start:start + size].reshape(g.shape))
        return treedef.unflatten(out), treedef.unflatten(res)


def exchange(x: jax.Array, codec: Codec, axis: str) -> tuple[jax.Array, jax.Array]:
    """The sum over `axis` of every device's `x` [n, C] (chunk j summed on device j), flat, and
    this device's residual, flat: what encoding lost of `x`, and on its own chunk what encoding
    the sum lost."""
    sent = codec.encode(x)
    received = [jax.lax.all_to_all(p, axis, 0, 0, tiled=False) for p in sent]
    chunk = jnp.sum(codec.decode(tuple(received)), axis=0, keepdims=True)
    reduced = codec.encode(chunk)
    chunk_error = chunk - codec.decode(reduced)
    gathered = tuple(jax.lax.all_gather(p, axis, axis=0, tiled=True) for p in reduced)
    left = (x - codec.decode(sent)).at[jax.lax.axis_index(axis)].add(chunk_error[0])
    return codec.decode(gathered).reshape(-1), left.reshape(-1)
