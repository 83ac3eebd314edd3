"""Models: Flax NNX modules whose parameters and activations name logical axes only.

Every model has `loss_sums(batch, **kwargs) -> (loss_sum, weight)`; `build_model` makes the one a
config's `model.family` names.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxscale.errors import UserError
from jaxscale.models.llama import Llama, LlamaConfig

FAMILIES = ("llama", "gpt2", "early_fusion", "cross_attention", "clip")
DECODERS = ("llama", "gpt2")  # text-only decoder families


def build_model(model_cfg, rngs: nnx.Rngs) -> nnx.Module:
    """The model of the config's `model` section (its `family` picks the class)."""
    family = model_cfg.get("family", "llama")
    if family == "llama":
        return Llama(LlamaConfig.from_config(model_cfg), rngs)
    if family == "gpt2":
        from jaxscale.models.gpt2 import GPT2

        return GPT2(LlamaConfig.from_config(model_cfg), rngs)
    if family not in FAMILIES:
        raise UserError(f"model.family={family!r}; use one of {', '.join(FAMILIES)}")
    from jaxscale.models import fusion

    return fusion.build(family, model_cfg, rngs)


def abstract_model(model_cfg) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and parameter shapes of the config's model, without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0))))


def loss_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: dict,
              **model_kwargs) -> tuple[jax.Array, jax.Array]:
    """The model's loss on `batch` as (sum over examples or tokens, their weight): each model
    family's `loss_sums` method, e.g. token cross-entropies weighted by `loss_mask`."""
    return nnx.merge(graphdef, params).loss_sums(batch, **model_kwargs)


__all__ = ["DECODERS", "FAMILIES", "Llama", "LlamaConfig", "abstract_model", "build_model", "loss_sums"]
