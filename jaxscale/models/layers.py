"""Building blocks shared by the models: parameters with logical axes, norms, RoPE, remat."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxscale.errors import UserError
from jaxscale.sharding import constrain


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], std: float) -> nnx.Param:
    """A float32 parameter drawn from N(0, std²) (truncated at 2σ) that names its logical axes."""
    init = jax.nn.initializers.truncated_normal(std)
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), logical_axes=tuple(axes))


def dense(x: jax.Array, w: jax.Array, n_in: int = 1,
          preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """`x` [..., *in] times `w` [*in, *out] (the last `n_in` dims of `x` contracted) as one 2-D
    matmul. XLA:CPU runs a contraction over several dimensions, and the weight gradient of a
    [batch, seq, in] input (which contracts batch and seq), 2-3x slower than the same 2-D GEMM;
    on accelerators the reshapes are free."""
    lead, k = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    out = jax.lax.dot_general(x.reshape(-1, k), w.reshape(k, -1), (((1,), (0,)), ((), ())),
                              preferred_element_type=preferred_element_type)
    return out.reshape(*lead, *w.shape[n_in:])


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm, computed in float32."""

    def __init__(self, dim: int, eps: float, axis: str = "embed"):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(axis,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer norm with a scale and a bias (GPT-2), computed in float32."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def token_loss_sums(logits: jax.Array, targets: jax.Array,
                    mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies weighted by `mask`, and the sum of the weights."""
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(xent * mask), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling (`kind="llama3"`), or none (`kind="none"`)."""

    kind: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self):
        if self.kind not in ("none", "llama3"):
            raise UserError(f"model.rope_scaling={self.kind!r}; use none or llama3")


class VocabShards(Protocol):
    """Vocabulary tables held as slices across devices: what a parallelism strategy hands the
    embedding lookup and the chunked loss (`jaxscale.parallel.vocab_parallel.VocabShards`, which
    holds the collectives; the model passes it on). Hashable."""

    unroll: bool  # run the loss's chunk loop unrolled

    def lookup(self, table: jax.Array, tokens: jax.Array) -> jax.Array: ...

    def gather_tokens(self, xs: jax.Array, ts: jax.Array, ms: jax.Array,
                      vocab: int) -> tuple[jax.Array, jax.Array, jax.Array]: ...

    def normalizer(self, logits: jax.Array, target: jax.Array, tc: jax.Array,
                   vocab: int) -> tuple[jax.Array, jax.Array]: ...

    def scatter(self, losses: jax.Array, d_x: jax.Array,
                local_n: int) -> tuple[jax.Array, jax.Array]: ...


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """The rows of `table` for `ids` [...] ([..., *table.shape[1:]]). Their gradient is summed
    in float32 even for a bfloat16 table (a frequent token's many rows would round away in
    bfloat16 sums) and rounded once."""
    wide = jnp.promote_types(table.dtype, jnp.float32)
    return jnp.take(table.astype(wide), ids, axis=0).astype(table.dtype)


def embed_lookup(table: jax.Array, tokens: jax.Array, vocab: VocabShards | None = None) -> jax.Array:
    """The rows of `table` [vocab, embed] for `tokens` [...] ([..., embed], `take_rows`); with
    `vocab`, `table` is this device's slice of the vocabulary and `vocab.lookup` finds every
    token's row."""
    return take_rows(table, tokens) if vocab is None else vocab.lookup(table, tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked_xent_sums(x: jax.Array, table: jax.Array, targets: jax.Array, mask: jax.Array,
                      chunk: int, vocab: VocabShards | None = None,
                      logits_dtype: str = "float32") -> tuple[jax.Array, jax.Array]:
    """`token_loss_sums(x @ table, targets, mask)` without materialising the logits.

    `x` [batch, seq, embed] meets the output layer `table` [embed, vocab] `chunk` tokens at a time
    (a `lax.scan`), and each chunk's gradients are computed right there in the forward pass (the
    backward only scales them): the [tokens, vocab] logits, probabilities and their gradient,
    the largest arrays of a small model's step, exist one chunk at a time. Same FLOPs as the
    plain output layer. The output layer writes its logits in `logits_dtype` (bfloat16 halves
    the memory traffic of the passes over them); the loss and its gradient are computed in float32.

    With `vocab`, `table` is this device's slice of the vocabulary (as in `embed_lookup`): the
    tokens of the devices sharing the tables are gathered (`vocab.gather_tokens`), each device
    computes its slice's logits, the log-sum-exp is combined across devices (`vocab.normalizer`),
    and the gradient of `x` goes back to its device (`vocab.scatter`). The sums are this
    device's tokens'; the caller sums them over those devices (the gradients assume so).
    """
    return _chunked_xent(x, table, targets, mask, chunk, vocab, logits_dtype)[0]


def _chunked_xent(x, table, targets, mask, chunk, vocab, logits_dtype):
    d, local_n, vocab_size = x.shape[-1], targets.size, table.shape[-1]
    xs, ts, ms = x.reshape(local_n, d), targets.reshape(local_n), mask.reshape(local_n)
    ms = ms.astype(jnp.float32)
    if vocab is not None:
        xs, ts, ms = vocab.gather_tokens(xs, ts, ms, vocab_size)
    n = ts.size
    chunk = min(chunk, n)
    pad = -n % chunk  # padding tokens weigh 0

    def chunks(a):
        return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])

    def body(d_table, inputs):
        xc, tc, mc = inputs  # with `vocab`, targets outside this slice are out of range
        logits = jnp.einsum("cd,dv->cv", xc, table, preferred_element_type=jnp.dtype(logits_dtype))
        logits = constrain(logits, (None, "vocab")).astype(jnp.float32)
        target = jnp.take_along_axis(logits, jnp.clip(tc, 0, vocab_size - 1)[:, None], axis=-1)[:, 0]
        if vocab is not None:
            lse, target = vocab.normalizer(logits, target, tc, vocab_size)
        else:
            lse = jax.nn.logsumexp(logits, axis=-1)
        probs = jnp.exp(logits - lse[:, None])
        d_logits = ((probs - jax.nn.one_hot(tc, vocab_size, dtype=probs.dtype))
                    * mc[:, None]).astype(x.dtype)
        d_x = jnp.einsum("cv,dv->cd", d_logits, table,  # partial sums with `vocab`
                         preferred_element_type=None if vocab is None else jnp.float32)
        d_table = d_table + jnp.einsum("cd,cv->dv", xc, d_logits,
                                       preferred_element_type=d_table.dtype)
        return d_table, ((lse - target) * mc, d_x)

    zeros = jnp.zeros(table.shape, jnp.promote_types(table.dtype, jnp.float32))
    varying = set(jax.typeof(x).manual_axis_type.varying) | set(jax.typeof(table).manual_axis_type.varying)
    if varying:  # inside shard_map: the accumulator varies where its summands do
        zeros = jax.lax.pcast(zeros, tuple(sorted(varying)), to="varying")
    d_table, (losses, d_x) = jax.lax.scan(body, zeros, (chunks(xs), chunks(ts), chunks(ms)),
                                          unroll=vocab is not None and vocab.unroll)
    losses, d_x = losses.reshape(-1)[:n], d_x.reshape(-1, d)[:n]
    if vocab is not None:  # back to this device's tokens
        losses, d_x = vocab.scatter(losses, d_x, local_n)
    sums = (jnp.sum(losses), jnp.sum(mask.astype(jnp.float32)))
    return sums, (d_x.reshape(x.shape).astype(x.dtype), d_table.astype(table.dtype), targets, mask)


def _chunked_xent_bwd(chunk, vocab, logits_dtype, residuals, g):
    d_x, d_table, targets, mask = residuals
    scale = g[0]
    return ((d_x * scale.astype(d_x.dtype)), d_table * scale.astype(d_table.dtype),
            np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(mask))


chunked_xent_sums.defvjp(_chunked_xent, _chunked_xent_bwd)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> jax.Array:
    """The `head_dim // 2` rotation frequencies (float32), Llama-3-scaled when asked."""
    half = head_dim // 2
    freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    if scaling.kind == "none":
        return freq
    s = scaling
    wavelen = 2 * math.pi / freq
    scaled = jnp.where(wavelen > s.original_max_seq_len / s.low_freq_factor, freq / s.factor, freq)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    medium = ((wavelen >= s.original_max_seq_len / s.high_freq_factor)
              & (wavelen <= s.original_max_seq_len / s.low_freq_factor))
    return jnp.where(medium, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def rope(x: jax.Array, positions: jax.Array, theta: float,
         scaling: RopeScaling = RopeScaling()) -> jax.Array:
    """Rotary position embedding of `x` [batch, seq, heads, head_dim] at `positions` [batch, seq].

    Rotates the two halves of the head dimension (the Llama / Hugging Face convention):
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], written as x [cos, cos] + [x2, x1] [-sin, sin]
    with the halves swapped by a reversal, one elementwise pass (splitting and concatenating x
    took 2.6x as long forward and backward on XLA:CPU).
    """
    freq = rope_frequencies(x.shape[-1], theta, scaling)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, s, 1, half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    cos2, sin2 = jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)
    x32 = x.astype(jnp.float32)
    swapped = jnp.flip(x32.reshape(*x.shape[:-1], 2, -1), -2).reshape(x.shape)
    return (x32 * cos2 + swapped * sin2).astype(x.dtype)


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy for `model.remat`; None means no rematerialisation."""
    policies = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return policies.nothing_saveable
    if name == "save_dots":
        return policies.checkpoint_dots_with_no_batch_dims
    kind, _, listed = name.partition(":")
    names = [n.strip() for n in listed.split(",") if n.strip()]
    if kind == "save" and names:
        return policies.save_only_these_names(*names)
    if kind == "offload" and names:  # kept in host memory between the forward and the backward
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=names,
            offload_src="device", offload_dst="pinned_host")
    raise UserError(f"model.remat={name!r} is not a policy; use none, full, save_dots, "
                     f"save:<name>,<name> or offload:<name>,<name>")


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs,
                 axis: str = "layers") -> nnx.Module:
    """`n` layers built by `make` as one module whose parameters carry a leading logical `axis`:
    `layers` for a decoder's (which pipelines split into stages), `encoder_layers` otherwise."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def build(key):
        return make(nnx.Rngs(params=key))

    layers = build(jax.random.split(rngs.params(), n))
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Variable):
            node.set_metadata(logical_axes=(axis, *node.get_metadata()["logical_axes"]))
    return layers
