"""Training low-rank adapters on a frozen base (`model.lora`, docs/lora.md).

The state's parameters are the whole model, base and adapters (`models/lora.py`), laid out as
every parameter is; `split` cuts any tree shaped like them (parameters, specs, shardings) into
the adapters and the base. Only the adapters are differentiated and updated, and only they have
optimizer state (`train/step.py` takes the gradient with respect to them alone, the optimizer is
initialised on them): AdamW's moments take 2 x 4 bytes per adapter value, none for the base.

A checkpoint holds the adapters (with their optimizer state, the step and the data state), not
the base: the base is read from `checkpoint.init_params_from` (a whole-model checkpoint, e.g.
`jaxscale import-hf`'s) when a run starts, resumes, generates or exports, so a resumed run must
name the same base, and a run without one is an error before anything compiles.

QLoRA (`model.lora.base_quant = int8 | int4`): the state holds the base quantized, as
`models/lora.py`'s `quantize_base` lays it out (the codes under each projection weight's name, its
scales beside them; `build_model` makes the model so, so the abstract state, its layouts and the
optimizer all see that structure). `read_base` reads the float base from
`checkpoint.init_params_from` into the codes' layouts and quantizes it there, jitted, into the
state's shardings: on start, resume, generate and export alike, and the same way each time (round
to nearest), so resume stays exact. The base's bytes in the state are the codes' (1 byte per value
for int8, 1/2 for int4) plus float32 scales, against 4 for the float base.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.checkpoint import Checkpointer
from jaxscale.errors import UserError
from jaxscale.models.lora import SUFFIXES, LoraConfig, enabled, quantize_state, quantized


def check(config) -> None:
    """One-line errors, before anything compiles, for settings LoRA cannot train with."""
    cfg = LoraConfig.from_config(config.model)
    if not cfg.rank:
        return
    base = config.checkpoint.init_params_from
    if not base:
        raise UserError(f"model.lora.rank={cfg.rank} trains adapters on a frozen base: set "
                        f"checkpoint.init_params_from to the base model's checkpoint (e.g. what "
                        f"jaxscale import-hf wrote)")
    if "=" in base:
        raise UserError(f"checkpoint.init_params_from={base!r}: under model.lora the base is a "
                        f"whole-model checkpoint directory, not group=directory entries")
    for bad, what in ((config.diloco.enabled, "diloco.enabled"),
                      (config.model.moe.bias_rate, "model.moe.bias_rate > 0"),
                      (config.model.fusion.freeze, "model.fusion.freeze"),
                      (config.parallel.grad_compression != "none", "parallel.grad_compression")):
        if bad:
            raise UserError(f"model.lora.rank={cfg.rank} does not combine with {what}; "
                            f"turn one of them off")


def _is_node(x) -> bool:
    return isinstance(x, Mapping) and not isinstance(x, nnx.Variable)


def split(tree) -> tuple[nnx.State, nnx.State]:
    """(adapters, base) of a tree shaped like the parameters (any leaves: variables, specs,
    shardings, shapes), each an `nnx.State` of dicts as `nnx.split` makes them."""

    def cut(node):
        train, frozen = {}, {}
        for key, value in node.items():
            if _is_node(value):
                t, f = cut(value)
                if t:
                    train[key] = t
                if f:
                    frozen[key] = f
            elif str(key).endswith(SUFFIXES):
                train[key] = value
            else:
                frozen[key] = value
        return train, frozen

    return tuple(map(nnx.State, cut(tree)))


def join(adapters, base) -> nnx.State:
    """The inverse of `split`."""

    def union(a, b):
        out = {}
        for key in {**b, **a}:
            x, y = a.get(key), b.get(key)
            out[key] = union(x or {}, y or {}) if _is_node(x) or _is_node(y) else (
                x if key in a else y)
        return out

    return nnx.State(union(adapters, base))


PARTITION = (split, join)  # what `make_train_step` takes to differentiate the adapters alone


def checkpointed(state, trainer):
    """`state` (a `TrainState`, or its abstract form) as a checkpoint holds it: without the base
    when the trainer trains adapters."""
    if not trainer.lora:
        return state
    return state.replace(params=split(state.params)[0])


def with_base(config, trainer, state):
    """`state` (checkpoint form, with its adapters or the whole model) with the base read from
    `checkpoint.init_params_from` into the trainer's shardings."""
    abstract = split(trainer.abstract_state(canonical=True).params)[1]
    return state.replace(params=join(split(state.params)[0], read_base(config, abstract)))


def read_base(config, abstract) -> nnx.State:
    """The base parameters (`abstract`: their shapes and shardings) from
    `checkpoint.init_params_from`; under QLoRA read as float32 and quantized into `abstract`."""
    check(config)
    scales = quantized(dict(nnx.to_flat_state(abstract)))
    with Checkpointer(config.checkpoint.init_params_from, read_only=True) as source:
        if not scales:
            return source.restore_params(abstract)
        floats = source.restore_params(_unquantized(abstract, scales))
    quantize = partial(quantize_state, like=abstract, cfg=LoraConfig.from_config(config.model))
    return jax.jit(quantize, out_shardings=jax.tree.map(lambda s: s.sharding, abstract))(floats)


def _unquantized(abstract, scales: dict) -> nnx.State:
    """`abstract` as the float32 model it quantizes: each quantized weight's full shape (its
    scales' last axis is the weight's, unpacked) in its codes' sharding, no scales."""
    flat = dict(nnx.to_flat_state(abstract))
    out = []
    for path, var in flat.items():
        if path in scales:
            codes, scale = var.get_value(), flat[scales[path]].get_value()
            var = var.replace(jax.ShapeDtypeStruct((*codes.shape[:-1], scale.shape[-1]), jnp.float32,
                                                   sharding=codes.sharding))
        if path not in scales.values():
            out.append((path, var))
    return nnx.from_flat_state(out)


def restore_params(config, abstract, directory: str, step: int | None = None) -> nnx.State:
    """A run's parameters (`abstract`: their shapes and shardings): with `model.lora`, its
    checkpoint's adapters joined to the base it was trained on; otherwise its checkpoint's."""
    with Checkpointer(directory, read_only=True) as ckpt:
        if not enabled(config.model):
            return ckpt.restore_params(abstract, step)
        adapters, base = split(abstract)
        return join(ckpt.restore_params(adapters, step), read_base(config, base))
