"""Models: Flax NNX modules whose parameters and activations name logical axes only.

Every model has `loss_sums(batch, **kwargs) -> (loss_sum, weight)`; `build_model` makes the one a
config's `model.family` names.
"""

from __future__ import annotations

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


__all__ = ["DECODERS", "FAMILIES", "Llama", "LlamaConfig", "build_model"]
