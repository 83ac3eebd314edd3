"""Ring attention over the `context` mesh axis, in context parallelism's zig-zag layout
(`context_parallel.py`): each device's queries attend over the whole row's K/V as the blocks
travel around the axis, with an online softmax; the backward pass is a second ring the other way
carrying the blocks' K/V gradients home. Of each visiting block only the causally needed half is
computed, `QUERY_TILE` queries at a time, so no device holds the whole K/V or a [seq, seq] array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

AXIS = "context"
_NEG = -1e30  # the score of a masked pair (finite: a fully masked block stays finite)
QUERY_TILE = 512  # the ring computes a block's scores this many queries at a time


def local_positions(index: jax.Array, parts: int, local: int) -> jax.Array:
    """The row positions of device `index`'s `local` tokens (chunks `index` and
    `2 parts - 1 - index` of the row)."""
    half = local // 2
    first = index * half + jnp.arange(half)
    return jnp.concatenate([first, (2 * parts - 1 - index) * half + jnp.arange(half)])


def _scores(q, k, allowed):
    """q [b, tq, kv, g, d], k [b, tk, kv, d] -> float32 scores [b, kv, g, tq, tk], masked."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    return jnp.where(allowed[:, None, None], s * q.shape[-1] ** -0.5, _NEG)


def _tiles(x: jax.Array, n: int, axis: int) -> jax.Array:
    """`x` with its `axis` cut into `n` tiles, the tiles first."""
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _untile(x: jax.Array, axis: int) -> jax.Array:
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def query_tiles(tq: int) -> int:
    """How many equal tiles a block's `tq` queries are taken in: the fewest of at most
    `QUERY_TILE` queries each, or the block whole where every such tile would be under a quarter
    of `QUERY_TILE` (`tq` with no divisor in between)."""
    if tq <= QUERY_TILE:
        return 1
    fewest, most = -(-tq // QUERY_TILE), tq // max(1, QUERY_TILE // 4)
    return next((n for n in range(fewest, most + 1) if tq % n == 0), 1)


def _block(q, k, v, allowed):
    """Attention of q over one K/V block: output [b, tq, kv, g, d] normalised within the block
    and its log-sum-exp [b, kv, g, tq] (float32); `QUERY_TILE` queries at a time, so a block's
    scores exist one tile at a time."""
    n = query_tiles(q.shape[1])
    if n == 1:
        return _block_tile(q, k, v, allowed)
    o, lse = jax.lax.map(lambda a: _block_tile(a[0], k, v, a[1]),
                         (_tiles(q, n, 1), _tiles(allowed, n, 1)))
    return _untile(o, 1), _untile(lse, 3)


def _block_tile(q, k, v, allowed):
    s = _scores(q, k, allowed)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o / _rows(total), m[..., 0] + jnp.log(total)


def _rows(x):
    """[b, kv, g, tq] -> [b, tq, kv, g, 1] (to scale outputs)."""
    return jnp.transpose(x, (0, 3, 1, 2))[..., None]


def _merge(o, lse, o_b, lse_b):
    new = jnp.logaddexp(lse, lse_b)
    return o * _rows(jnp.exp(lse - new)) + o_b * _rows(jnp.exp(lse_b - new)), new


def _block_grads(q, k, v, allowed, d_out, lse, delta):
    """The gradients of q, k, v of one block's share of the attention (softmax over all blocks,
    whose log-sum-exp is `lse`; `delta` = rowsum(d_out * out)), a query tile at a time."""
    n = query_tiles(q.shape[1])
    if n == 1:
        return _grads_tile(q, k, v, allowed, d_out, lse, delta)

    def tile(carry, a):
        dq, dk, dv = _grads_tile(a[0], k, v, a[1], a[2], a[3], a[4])
        return (carry[0] + dk, carry[1] + dv), dq

    zeros = (k * 0).astype(jnp.float32), (v * 0).astype(jnp.float32)
    (dk, dv), dq = jax.lax.scan(tile, zeros, (_tiles(q, n, 1), _tiles(allowed, n, 1),
                                              _tiles(d_out, n, 1), _tiles(lse, n, 3),
                                              _tiles(delta, n, 3)))
    return _untile(dq, 1), dk, dv


def _grads_tile(q, k, v, allowed, d_out, lse, delta):
    scale = q.shape[-1] ** -0.5
    p = jnp.exp(_scores(q, k, allowed) - lse[..., None])
    dp = jnp.einsum("bqkgd,bskd->bkgqs", d_out, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    dv = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(d_out.dtype), d_out,
                    preferred_element_type=jnp.float32)
    return dq, dk, dv


class _Ring:
    """The ring's geometry on this device: its chunks' positions and which half of each visiting
    block it needs. Step s holds the K/V of device (c - s) mod n ((c + s) mod n in the backward
    pass): an earlier device's first chunk is before both of this device's chunks and its second
    after both (all queries x the first half of the block); a later device's chunks are both
    after this device's first chunk and before its second (the second half of the queries x the
    whole block)."""

    def __init__(self, t: int):
        self.n, self.c, self.t, self.h = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS), t, t // 2
        self.positions = local_positions(self.c, self.n, t)

    def source(self, step: int, back: bool = False) -> jax.Array:
        return (self.c + step if back else self.c - step) % self.n

    def pass_on(self, *xs, back: bool = False):
        """`xs` to the next device (the previous one with `back`: the backward ring runs the
        other way, so XLA cannot merge it with the forward's, which would keep every block
        received alive until the backward pass: all of K/V on every device)."""
        perm = [(i, (i - 1 if back else i + 1) % self.n) for i in range(self.n)]
        return tuple(jax.lax.ppermute(x, AXIS, perm) for x in xs)

    def own_allowed(self, segments):
        causal = self.positions[:, None] >= self.positions[None, :]
        return causal[None] & (segments[:, :, None] == segments[:, None, :])


def _same(seg_q, seg_k):
    return seg_q[:, :, None] == seg_k[:, None, :]


@jax.custom_vjp
def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """Causal attention of this device's q [b, t, heads, d] over the whole row's K/V (this
    device's k, v [b, t, kv_heads, d] and the others' around the ring), within documents
    (`segments` [b, t]), in the zig-zag layout; see the module docstring."""
    return _ring_fwd(q, k, v, segments)[0]


def _ring_fwd(q, k, v, segments):
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    ring = _Ring(t)
    o, lse = _block(qg, k, v, ring.own_allowed(segments))
    seg_k = segments
    for step in range(1, ring.n):
        k, v, seg_k = ring.pass_on(k, v, seg_k)
        earlier = ring.source(step) < ring.c
        o_b, lse_b = jax.lax.cond(earlier, functools.partial(_earlier_block, half=ring.h),
                                  functools.partial(_later_block, half=ring.h),
                                  qg, k, v, segments, seg_k)
        o, lse = _merge(o, lse, o_b, lse_b)
    return o.astype(q.dtype).reshape(b, t, h, d), lse


def _earlier_block(qg, k, v, seg_q, seg_k, half):
    return _block(qg, k[:, :half], v[:, :half], _same(seg_q, seg_k[:, :half]))


def _later_block(qg, k, v, seg_q, seg_k, half):
    o, lse = _block(qg[:, half:], k, v, _same(seg_q[:, half:], seg_k))
    o = jnp.concatenate([jnp.zeros_like(o), o], axis=1)
    return o, jnp.concatenate([jnp.full_like(lse, _NEG), lse], axis=-1)


def _ring_fwd_rule(q, k, v, segments):
    out, lse = _ring_fwd(q, k, v, segments)
    return out, (q, k, v, segments, out, lse)


def _ring_bwd(res, d_out):
    q, k, v, segments, out, lse = res
    b, t, h, d = q.shape
    kv = k.shape[2]
    shape = (b, t, kv, h // kv, d)
    qg, dog = q.reshape(shape), d_out.reshape(shape)
    delta = jnp.transpose(jnp.sum(dog.astype(jnp.float32) * out.reshape(shape), axis=-1), (0, 2, 3, 1))
    ring = _Ring(t)
    dq, dk, dv = _block_grads(qg, k, v, ring.own_allowed(segments), dog, lse, delta)
    seg_k = segments
    for step in range(1, ring.n):
        k, v, seg_k, dk, dv = ring.pass_on(k, v, seg_k, dk, dv, back=True)
        earlier = ring.source(step, back=True) < ring.c
        dq_b, dk_b, dv_b = jax.lax.cond(earlier, functools.partial(_earlier_grads, half=ring.h),
                                        functools.partial(_later_grads, half=ring.h),
                                        qg, k, v, segments, seg_k, dog, lse, delta)
        dq, dk, dv = dq + dq_b, dk + dk_b, dv + dv_b
    if ring.n > 1:  # the K/V gradients return to their devices
        dk, dv = ring.pass_on(dk, dv, back=True)
    return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)


def _earlier_grads(qg, k, v, seg_q, seg_k, d_out, lse, delta, half):
    dq, dk, dv = _block_grads(qg, k[:, :half], v[:, :half], _same(seg_q, seg_k[:, :half]),
                              d_out, lse, delta)
    return dq, _pad_rows(dk, half, 0), _pad_rows(dv, half, 0)


def _later_grads(qg, k, v, seg_q, seg_k, d_out, lse, delta, half):
    dq, dk, dv = _block_grads(qg[:, half:], k, v, _same(seg_q[:, half:], seg_k),
                              d_out[:, half:], lse[..., half:], delta[..., half:])
    return _pad_rows(dq, half, 1), dk, dv


def _pad_rows(x, n, before):
    """`x` [b, rows, ...] with `n` zero rows added after it (`before=0`) or before it."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (n, 0) if before else (0, n)
    return jnp.pad(x, pad)


ring_attention.defvjp(_ring_fwd_rule, _ring_bwd)
