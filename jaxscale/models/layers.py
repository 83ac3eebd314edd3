"""Building blocks shared by the models: parameters with logical axes, norms, RoPE, remat."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxscale.errors import UserError


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], std: float) -> nnx.Param:
    """A float32 parameter drawn from N(0, std²) (truncated at 2σ) that names its logical axes."""
    init = jax.nn.initializers.truncated_normal(std)
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm, computed in float32."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
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

    Rotates the two halves of the head dimension (the Llama / Hugging Face convention).
    """
    freq = rope_frequencies(x.shape[-1], theta, scaling)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, s, 1, half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy for `model.remat`; None means no rematerialisation."""
    policies = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "full":
        return policies.nothing_saveable
    if name == "save_dots":
        return policies.checkpoint_dots_with_no_batch_dims
    if name.startswith("save:"):
        names = [n.strip() for n in name[5:].split(",") if n.strip()]
        if names:
            return policies.save_only_these_names(*names)
    raise UserError(f"model.remat={name!r} is not a policy; use none, full, save_dots or "
                     f"save:<name>,<name>")


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` layers built by `make` as one module whose parameters carry a leading `layers` axis."""

    @nnx.vmap(in_axes=0, out_axes=0)
    def build(key):
        return make(nnx.Rngs(params=key))

    layers = build(jax.random.split(rngs.params(), n))
    for _, node in nnx.iter_graph(layers):
        if isinstance(node, nnx.Variable):
            node.set_metadata(logical_axes=("layers", *node.get_metadata()["logical_axes"]))
    return layers
