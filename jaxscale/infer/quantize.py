"""Weight-only quantization of a trained model: int8 per output channel, int4 in groups.

Every matmul weight (attention, MLP, embedding table and LM head) is stored as integers with
float32 scales in a `QuantizedArray`, which takes the place of the parameter's value; reading the
parameter (`w[...]`, as the model does) dequantizes it right before its matmul, `x @ (q * scale)`,
so the model code runs unchanged. Symmetric, round-to-nearest: int8 has one scale per output channel
(over all its inputs), int4 one per group of `group_size` consecutive inputs of a channel, its
values packed two per byte. The embedding table counts each token's vector as a channel. RMSNorm
scales stay float32. `weight_bytes` reports what the arrays really hold, scales included.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxscale.errors import UserError
from jaxscale.sharding import Layout

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")
# The axes each matmul weight contracts with its input (negative: the same with a `layers` axis).
CONTRACTING = {"wq": (-3,), "wk": (-3,), "wv": (-3,), "wo": (-3, -2), "w_gate": (-2,),
               "w_up": (-2,), "w_down": (-2,), "lm_head": (-2,), "embed": (-1,)}
_QMAX = {8: 127, 4: 7}


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


def quantize_weight(w: jax.Array, axes: tuple[int, ...], bits: int,
                    group_size: int = 0) -> QuantizedArray:
    """`w` rounded to `bits`-bit integers with one scale per output channel and group of
    `group_size` consecutive inputs (0, or more than the inputs: one group per channel)."""
    a0, a1 = w.ndim + axes[0], w.ndim + axes[-1] + 1
    k = math.prod(w.shape[a0:a1])
    size = k if group_size <= 0 else min(group_size, k)
    if k % size:
        raise UserError(f"infer.group_size={group_size} does not divide the {k} inputs of a "
                        f"weight of shape {list(w.shape)}; use a divisor of {k}")
    grouped = w.astype(jnp.float32).reshape(w.shape[:a0] + (k // size, size) + w.shape[a1:])
    scale = jnp.max(jnp.abs(grouped), axis=a0 + 1) / _QMAX[bits]
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(grouped / jnp.expand_dims(scale, a0 + 1)), -_QMAX[bits], _QMAX[bits])
    q = q.astype(jnp.int8).reshape(w.shape)
    return QuantizedArray(_pack(q) if bits == 4 else q, scale, tuple(axes), bits)


def _pack(q: jax.Array) -> jax.Array:
    if q.shape[-1] % 2:
        raise UserError(f"int4 weights pack two values per byte along the last axis, which is odd "
                        f"in a weight of shape {list(q.shape)}; use infer.weights=int8")
    return (q[..., 0::2] & 0x0F) | (q[..., 1::2] << 4)


def _unpack(p: jax.Array) -> jax.Array:
    low, high = (p << 4) >> 4, p >> 4  # arithmetic shifts sign-extend each nibble
    return jnp.stack([low, high], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def check_format(weights: str) -> None:
    if weights not in WEIGHT_FORMATS:
        raise UserError(f"infer.weights={weights!r} is not a weight format; use one of "
                        f"{', '.join(WEIGHT_FORMATS)}")


def quantize_params(params: nnx.State, weights: str, group_size: int = 128) -> nnx.State:
    """`params` with every matmul weight in `weights` format: float32 (unchanged), bfloat16
    (cast), int8 or int4 (`QuantizedArray`). Call under `jax.jit` to quantize in place on a mesh."""
    check_format(weights)

    def one(path, var):
        name = str(getattr(path[-1], "name", getattr(path[-1], "key", path[-1])))
        if weights == "float32" or name not in CONTRACTING:
            return var
        w = var.get_value()
        if weights == "bfloat16":
            return var.replace(w.astype(jnp.bfloat16))
        return var.replace(quantize_weight(w, CONTRACTING[name], 8 if weights == "int8" else 4,
                                           group_size if weights == "int4" else 0))

    return jax.tree.map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def weight_bytes(params: nnx.State) -> int:
    """Bytes of all parameter arrays (the whole model, summed over shards), scales included."""
    return sum(x.nbytes for x in jax.tree.leaves(params))


def fit_spec(layout: Layout, names, shape) -> PartitionSpec:
    """`layout.spec(names)` without the mesh axes that do not divide their dimension."""
    dims = []
    for axes, n in zip(layout.spec(names), shape, strict=True):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        dims.append((axes[0] if len(axes) == 1 else axes)
                    if axes and n % layout.size(axes) == 0 else None)
    return PartitionSpec(*dims)


def param_shardings(layout: Layout, params: nnx.State) -> nnx.State:
    """NamedShardings for `params` (float or quantized, arrays or ShapeDtypeStructs), in its tree
    structure: integers follow their parameter's logical axes, a scale's groups the first
    contracting axis."""

    def one(var):
        names, value = var.get_metadata()["logical_axes"], var.get_value()
        if not isinstance(value, QuantizedArray):
            return var.replace(NamedSharding(layout.mesh, fit_spec(layout, names, value.shape)))
        a0, a1 = value._range()
        scale_names = (*names[:a0], names[a0], *names[a1:])
        return var.replace(dataclasses.replace(
            value, q=NamedSharding(layout.mesh, fit_spec(layout, names, value.q.shape)),
            scale=NamedSharding(layout.mesh, fit_spec(layout, scale_names, value.scale.shape))))

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
