"""Integer weights with float32 scales: the arithmetic of weight-only quantization.

Symmetric, round-to-nearest: int8 has one scale per output channel (over all its inputs), int4
one per group of `group_size` consecutive inputs of a channel, its values packed two per byte
along the last axis. `infer/quantize.py` stores a trained model's weights this way for inference;
`models/lora.py` stores QLoRA's frozen base this way for training.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxscale.errors import UserError

QMAX = {8: 127, 4: 7}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """Integers `q` and float32 `scale` standing for the float32 weight `q * scale`.

    `axes` are the contracting (input) axes, contiguous and counted from the end; `scale` has the
    weight's shape with those axes replaced by one axis of groups. 4-bit values are packed two per
    int8 along the last axis (low nibble first).
    """

    q: jax.Array
    scale: jax.Array
    axes: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    bits: int = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, last = self.q.shape
        return (*lead, last * (8 // self.bits))

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def __getitem__(self, key) -> jax.Array:
        return self.dequantize()[key]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight `q * scale`."""
        q = _unpack(self.q) if self.bits == 4 else self.q
        a0, a1 = self._range()
        groups = self.scale.shape[a0]
        k = math.prod(q.shape[a0:a1])
        q = q.reshape(q.shape[:a0] + (groups, k // groups) + q.shape[a1:])
        w = q.astype(jnp.float32) * jnp.expand_dims(self.scale, a0 + 1)
        return w.reshape(self.shape).astype(dtype)

    def _range(self) -> tuple[int, int]:
        return self.ndim + self.axes[0], self.ndim + self.axes[-1] + 1


def quantize_weight(w: jax.Array, axes: tuple[int, ...], bits: int, group_size: int = 0,
                    keys: tuple[str, str] = ("infer.weights", "infer.group_size")) -> QuantizedArray:
    """`w` rounded to `bits`-bit integers with one scale per output channel and group of
    `group_size` consecutive inputs (0, or more than the inputs: one group per channel).
    `keys`: the config keys of the format and the group size, which the errors name."""
    a0, a1 = w.ndim + axes[0], w.ndim + axes[-1] + 1
    k = math.prod(w.shape[a0:a1])
    size = k if group_size <= 0 else min(group_size, k)
    if k % size:
        raise UserError(f"{keys[1]}={group_size} does not divide the {k} inputs of a "
                        f"weight of shape {list(w.shape)}; use a divisor of {k}")
    if bits == 4 and w.shape[-1] % 2:
        raise UserError(f"int4 weights pack two values per byte along the last axis, which is odd "
                        f"in a weight of shape {list(w.shape)}; use {keys[0]}=int8")
    grouped = w.astype(jnp.float32).reshape(w.shape[:a0] + (k // size, size) + w.shape[a1:])
    scale = jnp.max(jnp.abs(grouped), axis=a0 + 1) / QMAX[bits]
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(grouped / jnp.expand_dims(scale, a0 + 1)), -QMAX[bits], QMAX[bits])
    q = q.astype(jnp.int8).reshape(w.shape)
    return QuantizedArray(_pack(q) if bits == 4 else q, scale, tuple(axes), bits)


def _pack(q: jax.Array) -> jax.Array:
    return (q[..., 0::2] & 0x0F) | (q[..., 1::2] << 4)


def _unpack(p: jax.Array) -> jax.Array:
    low, high = (p << 4) >> 4, p >> 4  # arithmetic shifts sign-extend each nibble
    return jnp.stack([low, high], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
