"""Adam with 8-bit moments: 1 byte per moment and parameter instead of 4.

Each moment is kept block-wise quantized, as in 8-bit optimizers (Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization"): blocks of at most `block` values along each
parameter's last axis (`block_size`) share one float32 scale, their absolute maximum, and each
value is stored as an 8-bit code of itself divided by that scale. The codes have the parameter's
shape and take its layout; the scales have shape `[..., ceil(n / block)]` and its layout too,
their last axis split only where each shard holds whole blocks (`Layout.param_specs`), so the
update runs on the shards in place (only block maxima cross devices). Every step dequantizes,
updates in float32 as `optax.scale_by_adam` does, and quantizes again, rounding to nearest:
deterministic, so runs resume exactly.

The code is float8 e4m3 (`jnp.float8_e4m3fn`, the block maximum mapped to its largest value 448):
like the dynamic quantization of 8-bit optimizers a non-linear code, with an exponent, precise for
small values as well as large ones: every value down to 2^-6 / 448 (3.5e-5) of its block's maximum
keeps a relative error of at most 2^-4 (torchao's FP8 Adam stores its moments so too). A linear
(absmax int8) code does not do for the second moment v, whose values span orders of magnitude
within a block: those under 1/254 of the maximum round to 0 and m / (sqrt(v) + eps) explodes (the
tiny test model's loss went from 6.2 to 218 in one step). Here v is stored as sqrt(v), which halves
the exponent range it needs (v down to 1.2e-9 of the block's maximum keeps sqrt(v) within 2^-4) and
is what the update divides by; values under that range are rounded up to its floor, never to 0:
that can only shrink their update.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

CODE = jnp.float8_e4m3fn
CODE_MAX = float(jnp.finfo(CODE).max)  # 448
SQRT_V_FLOOR = float(jnp.finfo(CODE).smallest_normal)  # 2^-6: the code's relative error holds above


class ScaleByAdam8bitState(NamedTuple):
    """Step count; float8 codes of m and sqrt(v) (the parameters' shapes) and their block scales."""

    count: jax.Array
    mu: optax.Updates
    mu_scale: optax.Updates
    nu: optax.Updates
    nu_scale: optax.Updates


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                       block: int = 256) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with its moments block-wise quantized to 8 bits (module docstring).

    Moments of `nnx.Variable` parameters are `nnx.Variable`s with the parameters' metadata, so a
    layout shards them like the parameters; the scales' metadata adds `block_scales=(n, b)` (the
    parameter's last axis and the block: `Layout.param_specs` splits the scales like the codes,
    their block axis only where each shard of the codes holds whole blocks).
    """
    if block < 1:
        raise ValueError(f"block={block} must be at least 1")

    def init_fn(params):
        def scales(p):
            zeros = jnp.zeros(scale_shape(p.shape, block), jnp.float32)
            if not isinstance(p, nnx.Variable):
                return zeros
            if not p.ndim:  # a 0-d parameter: one scale of its shape
                return p.replace(zeros)
            return p.replace(zeros, block_scales=(p.shape[-1], block_size(p.shape[-1], block)))

        codes = jax.tree.map(lambda p: jnp.zeros(p.shape, CODE), params)
        scale = jax.tree.map(scales, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), codes, scale, codes, scale)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def one(g, mq, ms, vq, vs):
            g32 = g.astype(jnp.float32)
            m = (1 - b1) * g32 + b1 * dequantize(mq, ms, block)
            v = (1 - b2) * jnp.square(g32) + b2 * jnp.square(dequantize(vq, vs, block))
            u = (m / (1 - b1**count)) / (jnp.sqrt(v / (1 - b2**count)) + eps)
            return u.astype(g.dtype), *quantize(m, block), *quantize(jnp.sqrt(v), block, SQRT_V_FLOOR)

        grads, treedef = jax.tree.flatten(updates)
        trees = state.mu, state.mu_scale, state.nu, state.nu_scale
        out = list(zip(*map(one, grads, *map(jax.tree.leaves, trees)), strict=True))
        new = [jax.tree.structure(t).unflatten(leaves) for t, leaves in zip(trees, out[1:], strict=True)]
        return treedef.unflatten(out[0]), ScaleByAdam8bitState(count, *new)

    return optax.GradientTransformation(init_fn, update_fn)


def block_size(n: int, block: int) -> int:
    """The length of the blocks along a last axis of `n`: `ceil(n / block)` blocks of equal length
    where they divide `n`, else of `block` (the last one padded). Equal blocks line up with the
    shards of evenly split axes more often (a vocabulary of 264 in 2 shards: 2 blocks of 132)."""
    count = -(-n // block)
    return n // count if n % count == 0 else block


def scale_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """The scales of an array of `shape`: one per block along the last axis, `ceil(n / block)`."""
    return (*shape[:-1], -(-shape[-1] // block)) if shape else ()


def quantize(x: jax.Array, block: int, floor: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """float8 codes of `x` (its shape) and float32 scales (`scale_shape`): each block's absolute
    maximum / 448. With `floor`, codes under it (in units of the scale) are raised to it."""
    blocks = _blocks(x.astype(jnp.float32), block)
    scales = jnp.max(jnp.abs(blocks), axis=-1) / CODE_MAX
    scaled = blocks / jnp.where(scales > 0, scales, 1.0)[..., None]
    codes = (jnp.maximum(scaled, floor) if floor else scaled).astype(CODE)
    return _unblock(codes, x.shape), scales.reshape(scale_shape(x.shape, block))


def dequantize(codes: jax.Array, scales: jax.Array, block: int) -> jax.Array:
    """The float32 values that `quantize` encoded."""
    blocks = _blocks(codes.astype(jnp.float32), block) * scales.reshape(scales.shape or (1,))[..., None]
    return _unblock(blocks, codes.shape)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[..., n] -> [..., ceil(n / block), block_size], zeros padding the last (a scalar: [1, 1])."""
    x = x.reshape(x.shape or (1,))
    size = block_size(x.shape[-1], block)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % size)])
    return x.reshape(*x.shape[:-1], -1, size)


def _unblock(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    n = shape[-1] if shape else 1
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :n].reshape(shape)
