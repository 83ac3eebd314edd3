"""Low-rank adapters (LoRA): a projection `x W` becomes `x W + (alpha / rank) (x A) B`.

`add_adapters` gives the projections `model.lora.targets` names an `A` [*lead, *in, rank] (drawn
from N(0, 1/in)) and a `B` [*lead, rank, *out] (zeros, so the adapted model starts as its base),
as `nnx.LoRAParam`s named `<weight>_lora_a` / `<weight>_lora_b` beside the weight. They carry
logical axes like every parameter (the weight's, with `lora_rank` for the new one), so every
mesh layout and the stacked `[layers, ...]` blocks split them as they split the weights. The
models route their projections through `project`, which adds the adapter where there is one;
`merge` folds the adapters into the weights (`W + scale A B`) for export.

QLoRA (`model.lora.base_quant = int8 | int4`): `quantize_base` stores the weight of every
projection (every class's `PROJECTIONS`, adapted or not) as two plain parameters, so that each
keeps one set of logical axes and every layout splits it as it splits any parameter: the integer
codes under the weight's own name (int8, the weight's shape and logical axes; int4 values packed two
per byte along the last axis, which halves that axis: a split of the packed axis over n devices is
a split of the weight's into n contiguous ranges, so the packing commutes with every layout whose
axes divide the halved size), and float32 scales `<weight>_scale`, the weight's logical axes with
its input axes replaced by one `quant_groups` axis (int8: one scale per output channel; int4: one
per `group_size` consecutive inputs; `models/quant.py`'s arithmetic). `project` dequantizes the
weight right before its matmul, in the input's dtype, and keeps only the codes and scales for the
backward pass (which dequantizes again) so no float copy of the base is ever held.
`quantize_state` does the same to a float base read from a checkpoint; `merge` dequantizes.

What trains them (only the adapters get gradients and optimizer state) is `train/lora.py`'s.

Why not qwix (0.1.8, MaxText's LoRA library), checked against jax 0.10.2 / flax 0.12.8: it
creates the adapters by intercepting `dot_general` during a traced call and finding which module
parameter the right operand is. Our `dense` hands `dot_general` the weight reshaped to 2-D, which
it does not recognise outside jit (no adapter is created, silently); run over our scanned stacks
(`decoder.scan_blocks`) `qwix.apply_lora_to_model` fails with `IndexError: tuple index out of
range` in `lax.scan` (it attaches unstacked Rngs to every module); and the adapters it would make
are 2-D `[in, rank]` copies of the flax `out_sharding` metadata, not our `logical_axes` (so no
layout would shard them). Fixing those means changing the models for the library; this module is
~150 lines.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.errors import UserError
from jaxscale.models.layers import dense
from jaxscale.models.quant import QuantizedArray, quantize_weight

QUANT = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
SUFFIXES = ("_lora_a", "_lora_b")
SCALE = "_scale"  # a quantized weight's scales: `<weight>_scale` beside its codes
GROUPS = "quant_groups"  # the logical axis of a scale's input groups (never sharded)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The config's `model.lora` section, checked."""

    rank: int = 0
    alpha: float = 16.0
    targets: str = "wq,wk,wv,wo"
    base_quant: str = "none"
    group_size: int = 128

    def __post_init__(self):
        if self.rank < 0:
            raise UserError(f"model.lora.rank={self.rank} must be 0 (off) or positive")
        if self.rank and not self.alpha > 0:
            raise UserError(f"model.lora.alpha={self.alpha} must be positive (the adapters' scale "
                            f"is alpha / rank)")
        if self.rank and not self.names():
            raise UserError(f"model.lora.rank={self.rank} with no model.lora.targets; name the "
                            f"projections to adapt, e.g. wq,wk,wv,wo")
        if self.base_quant not in QUANT:
            raise UserError(f"model.lora.base_quant={self.base_quant!r}; use one of {', '.join(QUANT)}")
        if self.base_quant != "none" and not self.rank:
            raise UserError(f"model.lora.base_quant={self.base_quant} needs adapters: set "
                            f"model.lora.rank > 0 (QLoRA trains adapters on a quantized base)")
        if self.group_size < 0:
            raise UserError(f"model.lora.group_size={self.group_size} must be >= 0")

    @classmethod
    def from_config(cls, model_cfg) -> LoraConfig:
        section = model_cfg.get("lora", None) if hasattr(model_cfg, "get") else None
        return cls(**dict(section)) if section is not None else cls()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def names(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]


def enabled(model_cfg) -> bool:
    """Whether the config's `model` section asks for adapters."""
    return LoraConfig.from_config(model_cfg).rank > 0


def project(module: nnx.Module, name: str, x: jax.Array, n_in: int = 1) -> jax.Array:
    """`x` times the module's weight `name` (`dense`, in `x`'s dtype; a quantized weight, one with
    a `<name>_scale`, dequantized right before the matmul), plus its adapter's `scale (x A) B`
    when it has one."""
    dt = x.dtype
    scale = getattr(module, name + SCALE, None)
    if scale is None:
        y = dense(x, getattr(module, name)[...].astype(dt), n_in)
    else:
        y = _dense_quantized(x, getattr(module, name)[...], scale[...], n_in, _outputs(module, name))
    a = getattr(module, name + "_lora_a", None)
    if a is None:
        return y
    b = getattr(module, name + "_lora_b")
    delta = dense(dense(x, a[...].astype(dt), n_in), b[...].astype(dt))
    return y + (module.lora_scale * delta).astype(dt)


def _dense_quantized(x: jax.Array, q: jax.Array, scale: jax.Array, n_in: int,
                     outputs: int) -> jax.Array:
    """`dense(x, q * scale)`: the weight dequantized in `x`'s dtype right before the matmul, under
    a remat that saves nothing, so the backward pass keeps the codes and scales (not a float copy
    of the weight, which a scan over layers would stack) and dequantizes again."""
    axes = tuple(range(-(n_in + outputs), -outputs))
    bits = 4 if q.shape[-1] < scale.shape[-1] else 8  # int4 packs the last axis, its scales do not

    def run(x, q, scale):
        return dense(x, QuantizedArray(q, scale, axes, bits).dequantize(x.dtype), n_in)

    return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(x, q, scale)


def _projections(model: nnx.Module):
    """(dotted path, module, weight name, inputs) of every projection that `project` runs."""
    for path, module in nnx.iter_modules(model):
        for name, n_in in getattr(type(module), "PROJECTIONS", {}).items():
            yield ".".join(map(str, (*path, name))), module, name, n_in


def add_adapters(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> nnx.Module:
    """`model` with adapters on the projections `cfg.targets` names (a name, e.g. `wq`, or a
    regex matching whole paths, e.g. `blocks\\.attn\\..*`); each target must match one."""
    found = list(_projections(model))
    matched: set[str] = set()
    for path, module, name, n_in in found:
        hits = [t for t in cfg.names() if t == name or re.fullmatch(t, path)]
        if not hits:
            continue
        matched.update(hits)
        w = getattr(module, name)
        axes = w.get_metadata()["logical_axes"]
        lead = len(axes) - n_in - _outputs(module, name)
        in_dims, out_dims = w.shape[lead:lead + n_in], w.shape[lead + n_in:]
        a = jax.random.normal(rngs.params(), (*w.shape[:lead + n_in], cfg.rank), jnp.float32)
        setattr(module, name + "_lora_a", nnx.LoRAParam(
            a / math.sqrt(math.prod(in_dims)), logical_axes=(*axes[:lead + n_in], "lora_rank")))
        setattr(module, name + "_lora_b", nnx.LoRAParam(
            jnp.zeros((*w.shape[:lead], cfg.rank, *out_dims), jnp.float32),
            logical_axes=(*axes[:lead], "lora_rank", *axes[lead + n_in:])))
        module.lora_scale = cfg.scale
    unmatched = [t for t in cfg.names() if t not in matched]
    if unmatched:
        names = sorted({n for _, _, n, _ in found})
        paths = ", ".join(p for p, *_ in found[:4])
        raise UserError(f"model.lora.targets entry {unmatched[0]!r} matches no projection; the "
                        f"model's are {', '.join(names) or 'none'} (paths like {paths})")
    return model


def _outputs(module: nnx.Module, name: str) -> int:
    return getattr(type(module), "OUTPUTS", {}).get(name, 1)


def quantize_base(model: nnx.Module, cfg: LoraConfig) -> nnx.Module:
    """`model` with the weight of every projection `project` reads stored as `cfg.base_quant`
    codes and `<weight>_scale` scales (module docstring): QLoRA's frozen base."""
    for _, module, name, n_in in list(_projections(model)):
        outputs = _outputs(module, name)
        codes, scale = _quantize(getattr(module, name), tuple(range(-(n_in + outputs), -outputs)),
                                 cfg)
        setattr(module, name, codes)
        setattr(module, name + SCALE, scale)
    return model


def _quantize(var: nnx.Variable, axes: tuple[int, ...], cfg: LoraConfig,
              like: tuple[nnx.Variable, nnx.Variable] | None = None):
    """The codes and scales variables of the float weight `var` (contracting `axes`, counted from
    the end), as new parameters or, given `like` (codes, scales), in their place."""
    bits = BITS[cfg.base_quant]
    qa = quantize_weight(var[...], axes, bits, cfg.group_size if bits == 4 else 0,
                         keys=("model.lora.base_quant", "model.lora.group_size"))
    if like is not None:
        return like[0].replace(qa.q), like[1].replace(qa.scale)
    names = var.get_metadata()["logical_axes"]
    a0, a1 = qa._range()
    return var.replace(qa.q), nnx.Param(qa.scale, logical_axes=(*names[:a0], GROUPS, *names[a1:]))


def quantized(flat: dict) -> dict:
    """{weight path: its scales' path} of the quantized weights in a flat state (`nnx.to_flat_state`
    as a dict; any leaves)."""
    return {path: scale for path in flat
            if (scale := (*path[:-1], f"{path[-1]}{SCALE}")) in flat}


def _axes(codes: nnx.Variable, scale: nnx.Variable) -> tuple[int, ...]:
    """A quantized weight's contracting axes (from the end), read off its scales' `quant_groups`."""
    ndim = len(codes.get_value().shape)
    n_in = ndim - len(scale.get_value().shape) + 1
    g = scale.get_metadata()["logical_axes"].index(GROUPS)
    return tuple(range(g - ndim, g - ndim + n_in))


def quantize_state(params: nnx.State, like: nnx.State, cfg: LoraConfig) -> nnx.State:
    """`params` (the same tree without quantization: float weights, no scales) quantized as
    `like` (its abstract form, e.g. ShapeDtypeStructs with shardings) says: every weight that has a
    `<weight>_scale` there. Call under `jax.jit` with `like`'s shardings to quantize in place."""
    src = dict(nnx.to_flat_state(params))
    flat = dict(nnx.to_flat_state(like))
    scales = quantized(flat)
    out = []
    for path, var in flat.items():
        if path in scales:
            pair = (var, flat[scales[path]])
            out.extend(zip((path, scales[path]), _quantize(src[path], _axes(*pair), cfg, like=pair),
                           strict=True))
        elif path not in scales.values():
            out.append((path, src[path]))
    return nnx.from_flat_state(out)


def is_adapter(path) -> bool:
    """Whether a flat-state path (a tuple of keys) names an adapter."""
    return str(path[-1]).endswith(SUFFIXES)


def merge(params: nnx.State, cfg: LoraConfig) -> nnx.State:
    """`params` with every adapter folded into its weight (`W + scale A B`, float32; a QLoRA base's
    weight dequantized first) and the adapters and scales removed: the parameters of the model
    without `model.lora`."""
    flat = dict(nnx.to_flat_state(params))
    scales = quantized(flat)
    out = []
    for path, var in flat.items():
        if is_adapter(path) or path in scales.values():
            continue
        if path in scales:
            s = flat[scales[path]]
            var = var.replace(QuantizedArray(var[...], s[...], _axes(var, s),
                                             BITS[cfg.base_quant]).dequantize())
        a = flat.get((*path[:-1], f"{path[-1]}_lora_a"))
        if a is not None:
            b = flat[(*path[:-1], f"{path[-1]}_lora_b")][...]
            a = a[...]
            lead = b.ndim - (var.ndim - a.ndim + 2)  # b: [*lead, rank, *out]
            ab = jnp.einsum("...ir,...ro->...io", a.reshape(*a.shape[:lead], -1, a.shape[-1]),
                            b.reshape(*b.shape[:lead + 1], -1), precision="highest")
            var = var.replace(var[...] + cfg.scale * ab.reshape(var.shape))
        out.append((path, var))
    return nnx.from_flat_state(out)
