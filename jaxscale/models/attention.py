"""Attention the models share: causal attention within packed documents (XLA's, einsum, cuDNN or
the Pallas TPU splash kernel), grouped-query attention under an arbitrary mask, and the hook
through which a parallelism strategy holds a row's sequence in parts across devices
(`SequenceShards`)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Protocol

import jax
import jax.numpy as jnp

from jaxscale import cpu
from jaxscale.errors import UserError
from jaxscale.sharding import parts, per_shard, platform

ATTENTION = ("dot_product", "einsum", "cudnn", "splash")
SPLASH_BLOCK = 128  # the splash kernel's smallest block along the sequence (a TPU vreg's lanes)
SPLASH_MAX_BLOCK = 512  # its blocks when the sequence allows (MaxText's default)


class SequenceShards(Protocol):
    """A row's sequence held in parts across devices (context parallelism): what a parallelism
    strategy hands the models (`jaxscale.parallel.context_parallel.SequenceShards`, which holds
    the collectives) through `sequence_shards`. The models call `split` where a full-length
    sequence meets the layers, and attention and per-row means go through it."""

    def split(self, x: jax.Array) -> jax.Array:
        """This device's part of a full sequence `x` [batch, seq, ...]."""
        ...

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                  kind: str) -> jax.Array:
        """`causal_attention` of this device's q, k, v parts over the whole row."""
        ...

    def row_mean(self, x: jax.Array) -> jax.Array:
        """The mean over a row's tokens of this device's part `x` [batch, seq, ...]."""
        ...


_SEQUENCE: contextvars.ContextVar[SequenceShards | None] = contextvars.ContextVar(
    "sequence_shards", default=None)


@contextlib.contextmanager
def sequence_shards(shards: SequenceShards | None) -> Iterator[None]:
    """Within this block (while tracing), sequences are split as `shards` says."""
    token = _SEQUENCE.set(shards)
    try:
        yield
    finally:
        _SEQUENCE.reset(token)


def split_sequence(x: jax.Array | None) -> jax.Array | None:
    """This device's part of the full sequence `x` [batch, seq, ...] (all of it unless a
    strategy splits sequences; None stays None)."""
    shards = _SEQUENCE.get()
    return x if shards is None or x is None else shards.split(x)


def sequence_parts() -> int:
    """How many parts each row's sequence is split into (1: held whole)."""
    shards = _SEQUENCE.get()
    return 1 if shards is None else shards.parts


def row_mean(x: jax.Array) -> jax.Array:
    """The mean of `x` [batch, seq, ...] over each row's tokens, wherever they are held."""
    shards = _SEQUENCE.get()
    return jnp.mean(x, axis=1) if shards is None else shards.row_mean(x)


def document_mask(segments: jax.Array | None) -> jax.Array | None:
    """[batch, 1, seq, seq]: True where query and key are in the same document (`segments`
    [batch, seq]: each token's document); None for unpacked rows."""
    if segments is None:
        return None
    return (segments[:, :, None] == segments[:, None, :])[:, None]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                     kind: str = "dot_product", max_documents: int = 8) -> jax.Array:
    """Causal attention of q [batch, seq, heads, head_dim] over k, v [batch, seq, kv_heads,
    head_dim]; with `segments` [batch, seq] (each token's document in a packed row, contiguous)
    each token sees only its own document's. Under context parallelism (`sequence_shards`) the
    arrays are this device's parts and the strategy's attention sees the whole row.

    "dot_product" is `jax.nn.dot_product_attention` as XLA writes it; "cudnn" is the same call
    run as cuDNN's fused (flash) attention, for NVIDIA GPUs in bfloat16, which on Hopper and
    later takes the documents of a packed row as lengths and offsets (its packed layout, at most
    `max_documents` per row; the data pipeline refuses rows with more) instead of a
    [batch, 1, seq, seq] bias; "einsum" writes it out with heads-major batched matmuls (query
    groups of a KV head stacked as rows), a float32 softmax and a hand-written backward, which
    XLA:CPU runs about twice as fast (docs/throughput.md); "splash" is the Pallas TPU splash
    (flash) attention kernel (`splash_attention`), for TPUs, which keeps no [seq, seq] scores.
    """
    shards = _SEQUENCE.get()
    if shards is not None:
        return shards.attention(q, k, v, segments, kind)
    return full_attention(q, k, v, segments, kind, max_documents)


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                   kind: str = "dot_product", max_documents: int = 8) -> jax.Array:
    """`causal_attention` of whole rows held on this device."""
    mask = document_mask(segments)
    if kind == "cudnn":
        if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
            raise UserError(f"model.attention='cudnn' needs an NVIDIA GPU and model.dtype=bfloat16 "
                            f"(found {jax.default_backend()}, {q.dtype.name}); use dot_product")
        if mask is None or float(getattr(jax.devices()[0], "compute_capability", 0)) < 9.0:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                                implementation="cudnn")
        return _cudnn_documents_attention(q, k, v, *documents(segments, max_documents))
    if kind == "dot_product":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    if kind == "splash":
        return splash_attention(q, k, v, segments)
    t, s = q.shape[1], k.shape[1]
    allowed = jnp.tril(jnp.ones((t, s), bool))
    return grouped_attention(q, k, v, allowed if mask is None else allowed & mask)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax attention of q [batch, t, heads, head_dim] over k, v [batch, s, kv_heads,
    head_dim] where `allowed` ([t, s] or [batch, 1, t, s]) with heads-major batched matmuls
    (`_grouped_attention`), in any order of the tokens."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    qt = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    if allowed.ndim == 4:
        allowed = allowed[:, :, None]
    out = _grouped_attention(qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed)
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def documents(segments: jax.Array, max_documents: int) -> tuple[jax.Array, jax.Array]:
    """The documents of each row of `segments` [batch, seq] in cuDNN's packed layout: lengths
    [batch, max_documents] and start offsets [batch, max_documents + 1], -1 where a row has
    fewer. A row's documents after its `max_documents`-th count as part of that one."""
    b, t = segments.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    index = jnp.minimum(jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1, max_documents - 1)
    member = index[:, :, None] == jnp.arange(max_documents, dtype=jnp.int32)  # [b, t, docs]
    lengths = jnp.sum(member, axis=1, dtype=jnp.int32)
    col = jnp.arange(t, dtype=jnp.int32)[:, None]
    offsets = jnp.min(jnp.where(member, col, t), axis=1)
    present = lengths > 0
    offsets = jnp.pad(jnp.where(present, offsets, -1), ((0, 0), (0, 1)), constant_values=-1)
    return jnp.where(present, lengths, -1), offsets


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segments: jax.Array | None) -> jax.Array:
    """`full_attention` with the Pallas TPU splash kernel: causal, within each row's documents
    (its segment ids), grouped-query heads read from their K/V head in the kernel (no repeated
    K/V). The kernel has no partitioning rule, so it runs on each device's rows and heads as the
    layout splits them (`sharding.per_shard`), each row's sequence whole; K/V heads are repeated
    only up to a multiple of the devices the heads are split over. Off TPUs only inside
    `cpu.interpret_kernels` (the tests')."""
    b, t, h, d = q.shape
    found = platform()
    interpret = found != "tpu" and cpu.kernels_interpreted()
    if found != "tpu" and not interpret:
        raise UserError(f"model.attention='splash' needs a TPU (found {found}); use dot_product")
    if t % SPLASH_BLOCK:
        raise UserError(f"model.attention='splash' needs the sequence length ({t}) to be a multiple "
                        f"of {SPLASH_BLOCK} (its smallest block); change data.seq_len or use dot_product")
    n = parts("heads", h)
    if k.shape[2] % n:  # each device's K/V heads: those of its query heads
        k, v = (jnp.repeat(a, n // math.gcd(k.shape[2], n), axis=2) for a in (k, v))
    if segments is None:
        segments = jnp.zeros((b, t), jnp.int32)
    return _splash(q * d**-0.5, k, v, segments.astype(jnp.int32), interpret)


_ROWS = ("batch", None, "heads", None)  # q, k, v, out [batch, seq, heads, head_dim] for `per_shard`
_SEGMENTS = ("batch", None)
_STATS = ("batch", "heads", None)  # the softmax's log-sum-exp [batch, heads, seq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _splash(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
            interpret: bool) -> jax.Array:
    """The splash kernel's attention of scaled q over k, v: forward and backward passes each run
    through `per_shard` (a Pallas kernel cannot be differentiated inside a region manual over
    the batch's axes: its outputs' types name none of them)."""
    return _splash_fwd(q, k, v, segments, interpret)[0]


def _splash_fwd(q, k, v, segments, interpret):
    run = functools.partial(_splash_rows, interpret=interpret)
    out, lse = per_shard(run, (_ROWS, _ROWS, _ROWS, _SEGMENTS), (_ROWS, _STATS))(q, k, v, segments)
    return out, (q, k, v, segments, out, lse)


def _splash_bwd(interpret, res, d_out):
    run = functools.partial(_splash_rows_bwd, interpret=interpret)
    grads = per_shard(run, (_ROWS, _ROWS, _ROWS, _SEGMENTS, _ROWS, _STATS, _ROWS),
                      (_ROWS, _ROWS, _ROWS))(*res, d_out)
    return (*grads, None)


_splash.defvjp(_splash_fwd, _splash_bwd)


def _splash_rows(q, k, v, segments, *, interpret):
    """Output [batch, seq, heads, head_dim] and log-sum-exp [batch, heads, seq] of the kernel on
    rows held whole here."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    out, (lse,) = jax.vmap(lambda q, k, v, s: kernel(q, k, v, SegmentIds(s, s)))(q, k, v, segments)
    return out.transpose(0, 2, 1, 3), lse


def _splash_rows_bwd(q, k, v, segments, out, lse, d_out, *, interpret):
    """dq, dk, dv [batch, seq, heads, head_dim] of `_splash_rows` through the kernel's own backward
    (`splash_attention_kernel._splash_attention_bwd`: jax has no public name for it)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
    kw = kernel.kwargs

    def row(q, k, v, s, out, lse, d_out):
        res = (q, k, v, SegmentIds(s, s), None, out, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
        grads = sk._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"],
                                         None, kw["mask_function"], kw["attn_logits_soft_cap"],
                                         interpret, res, d_out)
        return grads[3:6]

    q, k, v, out, d_out = (a.transpose(0, 2, 1, 3) for a in (q, k, v, out, d_out))
    grads = jax.vmap(row)(q, k, v, segments, out, lse, d_out)
    return tuple(g.transpose(0, 2, 1, 3) for g in grads)


def _splash_kernel(seq: int, heads: int, interpret: bool):
    """The causal splash kernel for one row of `heads` query heads [heads, seq, head_dim], its
    log-sum-exp kept for the backward pass: blocks of `SPLASH_MAX_BLOCK` where they divide the
    sequence, else the largest power of two that does (`SPLASH_BLOCK` at least), the same for
    the backward pass's kernels."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = math.gcd(seq, SPLASH_MAX_BLOCK)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  save_residuals=True, interpret=interpret)


def _cudnn_documents_attention(q, k, v, lengths, offsets):
    """Causal attention within each document, cuDNN's packed layout (jax.nn has no such API)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
    return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                 kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                 mask_type=MaskType.PADDING_CAUSAL)


@jax.custom_vjp
def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax attention of q [b, kv_heads, rows, d] (each KV head's query groups stacked as
    rows) over k, v [b, kv_heads, s, d] where `allowed` [.., groups, t, s]. The backward is
    written out (softmax's in one expression, from the saved probabilities): 2-3% of the
    reference step on XLA:CPU against autodiff's (docs/throughput.md)."""
    return _grouped_attention_fwd(q, k, v, allowed)[0]


def _grouped_attention_fwd(q, k, v, allowed):
    b, kv, r, d = q.shape
    t, s = allowed.shape[-2:]
    scores = jnp.einsum("bkrd,bksd->bkrs", q, k, preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(allowed, scores.reshape(b, kv, r // t, t, s), jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, axis=-1).reshape(b, kv, r, s)
    return jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), v), (q, k, v, p)


def _grouped_attention_bwd(res, d_out):
    q, k, v, p = res  # p is 0 where not allowed, so is the gradient
    dp = jnp.einsum("bkrd,bksd->bkrs", d_out, v, preferred_element_type=jnp.float32)
    dv = jnp.einsum("bkrs,bkrd->bksd", p.astype(d_out.dtype), d_out)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * q.shape[-1] ** -0.5
    dq = jnp.einsum("bkrs,bksd->bkrd", ds.astype(k.dtype), k)
    dk = jnp.einsum("bkrs,bkrd->bksd", ds.astype(q.dtype), q)
    return dq, dk, dv, None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)
