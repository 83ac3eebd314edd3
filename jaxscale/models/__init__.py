"""Models: Flax NNX modules whose parameters and activations name logical axes only.

Every model has `loss_sums(batch, **kwargs) -> (loss_sum, weight, stats)` (`stats`: an MoE
model's router statistics, `moe.router_losses`; `{}` otherwise); `build_model` makes the one a
config's `model.family` names, and `flops_per_token` and `param_count` ask that family's module.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxscale.errors import UserError
from jaxscale.models import fusion, gpt2, llama, lora
from jaxscale.models.gpt2 import GPT2
from jaxscale.models.llama import Llama, LlamaConfig

FAMILIES = ("llama", "gpt2", "early_fusion", "cross_attention", "clip")
DECODERS = ("llama", "gpt2")  # text-only decoder families
_DECODER_MODULES = {"llama": llama, "gpt2": gpt2}  # each holds its family's FLOP and parameter counts


def build_model(model_cfg, rngs: nnx.Rngs) -> nnx.Module:
    """The model of the config's `model` section (its `family` picks the class), with low-rank
    adapters where `model.lora` asks for them (`lora.add_adapters`), on a base whose projection
    weights are quantized with `model.lora.base_quant` (QLoRA, `lora.quantize_base`)."""
    lora_cfg = lora.LoraConfig.from_config(model_cfg)
    family = model_cfg.get("family", "llama")
    if family == "llama":
        model = Llama(LlamaConfig.from_config(model_cfg), rngs)
    elif family == "gpt2":
        model = GPT2(LlamaConfig.from_config(model_cfg), rngs)
    elif family not in FAMILIES:
        raise UserError(f"model.family={family!r}; use one of {', '.join(FAMILIES)}")
    else:
        model = fusion.build(family, model_cfg, rngs)
    if lora_cfg.rank:
        model = lora.add_adapters(model, lora_cfg, rngs)
    return lora.quantize_base(model, lora_cfg) if lora_cfg.base_quant != "none" else model


def flops_per_token(model_cfg, seq_len: int, frames: int = 1) -> float:
    """Training FLOPs (forward + backward) per token of `seq_len`-long text rows: a decoder
    family's own count (`llama.flops_per_token`, `gpt2.flops_per_token`), or for a multimodal family
    all of one example's FLOPs (encoder of `frames` images and connector included) spread over its
    text tokens. `model_cfg` is the config's `model` section or a `LlamaConfig` (a Llama)."""
    family = getattr(model_cfg, "family", "llama")
    if family in DECODERS:
        return _DECODER_MODULES[family].flops_per_token(model_cfg, seq_len)
    return fusion.flops_per_example(model_cfg, seq_len, frames) / seq_len


def param_count(model_cfg, active: bool = False) -> int:
    """All parameters of the decoder (llama or gpt2) that `model_cfg` describes: the config's
    `model` section or a `LlamaConfig` (a Llama). `active`: those one token uses (an MoE
    model's routed experts counted `top_k` times per layer, not `n_experts`)."""
    family = getattr(model_cfg, "family", "llama")
    if family not in DECODERS:
        raise UserError(f"param_count counts the decoder families ({', '.join(DECODERS)}), not "
                        f"model.family={family!r}; count the leaves of abstract_model instead")
    if family == "llama":
        return llama.param_count(model_cfg, active)
    return gpt2.param_count(model_cfg)


def abstract_model(model_cfg) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and parameter shapes of the config's model, without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0))))


def loss_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: dict,
              **model_kwargs) -> tuple[jax.Array, jax.Array, dict]:
    """The model's loss on `batch` as (sum over examples or tokens, their weight, MoE stats):
    each model family's `loss_sums` method, e.g. token cross-entropies weighted by `loss_mask`."""
    return nnx.merge(graphdef, params).loss_sums(batch, **model_kwargs)


__all__ = ["DECODERS", "FAMILIES", "Llama", "LlamaConfig", "abstract_model", "build_model", "flops_per_token",
           "loss_sums", "param_count"]
