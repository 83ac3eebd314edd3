"""Weight-only quantization of a trained model: int8 per output channel, int4 in groups.

Every matmul weight (attention, MLP, embedding table and LM head) is stored as integers with
float32 scales in a `QuantizedArray`, which takes the place of the parameter's value; reading the
parameter (`w[...]`, as the model does) dequantizes it right before its matmul, `x @ (q * scale)`,
so the model code runs unchanged. Symmetric, round-to-nearest: int8 has one scale per output channel
(over all its inputs), int4 one per group of `group_size` consecutive inputs of a channel, its
values packed two per byte (the arithmetic: `models/quant.py`). The embedding table counts each
token's vector as a channel. RMSNorm scales stay float32. Weights already stored as integers (a
QLoRA run's base, `model.lora.base_quant`, with its own scales) stay as they are. `weight_bytes`
reports what the arrays really hold, scales included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxscale.errors import UserError
from jaxscale.models.quant import QuantizedArray, quantize_weight
from jaxscale.sharding import Layout

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")
# The axes each matmul weight contracts with its input (negative: the same with a `layers` axis).
CONTRACTING = {"wq": (-3,), "wk": (-3,), "wv": (-3,), "wo": (-3, -2), "w_gate": (-2,),
               "w_up": (-2,), "w_down": (-2,), "lm_head": (-2,), "embed": (-1,)}


def check_format(weights: str) -> None:
    if weights not in WEIGHT_FORMATS:
        raise UserError(f"infer.weights={weights!r} is not a weight format; use one of "
                        f"{', '.join(WEIGHT_FORMATS)}")


def quantize_params(params: nnx.State, weights: str, group_size: int = 128) -> nnx.State:
    """`params` with every matmul weight in `weights` format: float32 (unchanged), bfloat16
    (cast), int8 or int4 (`QuantizedArray`); integer weights (already quantized) unchanged.
    Call under `jax.jit` to quantize in place on a mesh."""
    check_format(weights)

    def one(path, var):
        name = str(getattr(path[-1], "name", getattr(path[-1], "key", path[-1])))
        w = var.get_value()
        if weights == "float32" or name not in CONTRACTING or jnp.issubdtype(w.dtype, jnp.integer):
            return var
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
