"""Multimodal LLMs: a ViT encoder joined to the Llama decoder in the survey's three ways.

- `early_fusion` (LLaVA, GIT): image tokens, projected into the decoder's embedding space by a
  two-layer MLP, form the prefix of the sequence (the image placeholder is the start of the
  prompt); the decoder attends to them like to text, and the loss is on text tokens only.
- `cross_attention` (Flamingo): a Perceiver resampler turns the image tokens into a fixed number
  of latents; gated cross-attention blocks, one before every `cross_every` decoder layers,
  attend to them. Their tanh gates start at 0, so at initialisation the decoder computes exactly
  what it computes alone.
- `clip` (late fusion): a dual encoder trained with the symmetric contrastive loss and a learnable
  temperature, plus decision-level fusion for question answering: independent image and question
  heads whose answer logits are summed.

Every model has `loss_sums(batch)` (what training minimises) and `evaluate(batch)` (held-out
metrics). Only logical axis names appear here; `apply_block` lets data parallelism gather each
stacked layer's parameters just in time, in the encoder and the decoder alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxscale.errors import UserError
from jaxscale.models import moe
from jaxscale.models.attention import sequence_parts, split_sequence
from jaxscale.models.decoder import scan_blocks
from jaxscale.models.layers import RMSNorm, param, stack_layers, token_loss_sums
from jaxscale.models.llama import Llama, LlamaConfig, flops_per_token
from jaxscale.models.vit import (
    MLP,
    Attention,
    PerceiverResampler,
    ViT,
    ViTConfig,
    vit_flops_per_example,
)
from jaxscale.sharding import constrain, gather_batch

Batch = dict[str, jax.Array]

# What `model.fusion.freeze` may name, per family: group -> the model's top-level parameter keys.
FREEZE_GROUPS = {
    "early_fusion": {"vision": ("vision",), "connector": ("projector",), "llm": ("llm",)},
    "cross_attention": {"vision": ("vision",), "connector": ("resampler", "projector", "cross"),
                        "llm": ("llm",)},
}


def vision_config(model_cfg) -> ViTConfig:
    """The encoder of the config's `model.vision` section, in the model's dtype, remat and
    layer loops (`scan_layers`)."""
    return ViTConfig.from_config({**model_cfg.vision, "dtype": model_cfg.dtype,
                                  "remat": model_cfg.remat, "scan_layers": model_cfg.scan_layers})


def build(family: str, model_cfg, rngs: nnx.Rngs) -> nnx.Module:
    """The multimodal model of `model.family`."""
    llm, vision, f = LlamaConfig.from_config(model_cfg), vision_config(model_cfg), model_cfg.fusion
    freeze = tuple(g.strip() for g in f.freeze.split(",") if g.strip())
    if family == "cross_attention" and llm.moe.n_experts and (llm.moe.first_dense or llm.moe.every > 1):
        raise NotImplementedError("model.moe.first_dense or model.moe.every > 1 in "
                                  "model.family='cross_attention' (an MoE layer in every layer works)")
    if family == "early_fusion":
        return EarlyFusion(llm, vision, rngs, freeze=freeze)
    if family == "cross_attention":
        return CrossAttentionFusion(llm, vision, rngs, n_latents=f.n_latents,
                                    resampler_layers=f.resampler_layers, every=f.cross_every,
                                    freeze=freeze)
    return CLIP(llm, vision, rngs, embed_dim=f.embed_dim, n_answers=f.n_answers)


def flops_per_example(model_cfg, seq_len: int, frames: int) -> float:
    """Training FLOPs of one example (forward + backward, 6 per matmul weight per token, plus
    attention): the encoder on its tokens, the decoder on the tokens it runs, and the family's
    connector (projector, resampler, cross-attention blocks) on the tokens each sees."""
    m, f, v = model_cfg, model_cfg.fusion, vision_config(model_cfg)
    d, attn = m.d_model, 2 * m.d_model * m.n_heads * m.head_dim  # q+o (or k+v) weights
    image = v.tokens(frames)
    flops = vit_flops_per_example(v, frames)
    if m.family == "early_fusion":
        tokens = image + seq_len
        return flops + flops_per_token(m, tokens) * tokens + 6 * (v.d_model * d + d * d) * image
    if m.family == "cross_attention":
        layer = 2 * v.d_model * v.n_heads * v.head_dim * 2 + 2 * v.d_model * v.d_ff
        resampler = 6 * f.resampler_layers * layer * (f.n_latents + image)
        blocks = m.n_layers // f.cross_every
        cross = 6 * blocks * ((attn + 2 * d * m.d_ff) * seq_len + attn * f.n_latents)
        projector = 6 * (v.d_model * d + d * d) * f.n_latents
        return flops + flops_per_token(m, seq_len) * seq_len + resampler + cross + projector
    tokens = 2 * seq_len  # clip: captions and questions, without the unused LM head
    return flops + (flops_per_token(m, tokens) - 6 * d * m.vocab_size) * tokens


def _blocks_kwargs(apply_block: Callable | None) -> dict:
    return {} if apply_block is None else {"apply_block": apply_block}


class Projector(nnx.Module):
    """Two-layer GELU MLP from the encoder's width to the decoder's (LLaVA-1.5)."""

    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs):
        self.w_in = param(rngs, (d_in, d_out), ("embed", "mlp"), d_in**-0.5)
        self.w_out = param(rngs, (d_out, d_out), ("mlp", "embed"), d_out**-0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = jax.nn.gelu(jnp.einsum("bse,ef->bsf", x, self.w_in[...].astype(dt)))
        return jnp.einsum("bsf,fe->bse", h, self.w_out[...].astype(dt))


class _TokenModel(nnx.Module):
    """Shared by the fusion families that answer in text: loss and answer accuracy from logits,
    through the decoder's pipeline interface (`models.decoder.Decoder`), which they implement:
    `pipeline_input` runs the encoder and connector, `pipeline_stage` the decoder's layers."""

    llm: Llama

    def logits(self, batch: Batch, apply_block: Callable | None = None) -> jax.Array:
        return self._logits(batch, apply_block)[0]

    def loss_sums(self, batch: Batch, apply_block: Callable | None = None):
        """The answer tokens' summed cross-entropy (plus the decoder's weighted router losses
        if it has MoE layers), their count, and the MoE stats (`Decoder.loss_sums`)."""
        x, side = self.pipeline_input(batch, apply_block)
        y, stats = self.pipeline_stage(x, side, apply_block)
        loss_sum, count = self._text_loss(y, batch)
        extra, summary = self.stats_loss(stats)
        return loss_sum + extra, count, summary

    def _logits(self, batch: Batch, apply_block: Callable | None):
        x, side = self.pipeline_input(batch, apply_block)
        y, stats = self.pipeline_stage(x, side, apply_block)
        return self.llm.head(y[:, y.shape[1] - batch["targets"].shape[1]:]), stats

    def _text_loss(self, y: jax.Array, labels: Batch) -> tuple[jax.Array, jax.Array]:
        """The cross-entropy sum and weight of the decoder's outputs `y` at the text positions
        (after any image prefix). Where each row is split across devices (context
        parallelism), `y` is this device's part of the row, image positions weighted 0."""
        targets, mask = labels["targets"], labels["loss_mask"]
        prefix = y.shape[1] * sequence_parts() - targets.shape[1]
        if sequence_parts() == 1:
            return token_loss_sums(self.llm.head(y[:, prefix:]), targets, mask)
        pad = ((0, 0), (prefix, 0))
        return token_loss_sums(self.llm.head(y), split_sequence(jnp.pad(targets, pad)),
                               split_sequence(jnp.pad(mask, pad)))

    def stats_loss(self, stats):
        return moe.router_losses(stats, self.llm.config.moe)

    def pipeline_loss(self, y: jax.Array, batch: Batch) -> jax.Array:
        return self._text_loss(y, batch)[0]

    def evaluate(self, batch: Batch) -> dict[str, jax.Array]:
        """Per example: is every answer token right, and the answer's mean token loss."""
        logits, mask = self.logits(batch), batch["loss_mask"]
        right = (jnp.argmax(logits, -1) == batch["targets"]) | (mask == 0)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return {"answer_correct": jnp.all(right, axis=-1),
                "answer_loss": jnp.sum(xent * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1)}

    def _visual(self, images: jax.Array, apply_block) -> jax.Array:
        tokens = self.vision(images, **_blocks_kwargs(apply_block))
        return jax.lax.stop_gradient(tokens) if "vision" in self.freeze else tokens


class EarlyFusion(_TokenModel):
    """Projected image tokens, then the text, through one causal decoder."""

    PIPELINED = ("llm/blocks",)

    def __init__(self, llm: LlamaConfig, vision: ViTConfig, rngs: nnx.Rngs, freeze=()):
        self.vision = ViT(vision, rngs)
        self.projector = Projector(vision.d_model, llm.d_model, rngs)
        self.llm = Llama(llm, rngs)
        self.freeze = tuple(freeze)

    def pipeline_input(self, batch: Batch, apply_block: Callable | None = None):
        dt = jnp.dtype(self.llm.config.dtype)
        image = self.projector(self._visual(batch["images"], apply_block).astype(dt))
        text = self.llm.embed_tokens(batch["inputs"])
        (b, n, _), s = image.shape, text.shape[1]
        x = split_sequence(jnp.concatenate([image, text], axis=1))
        x = constrain(x, ("batch", "res_seq", "embed"))
        segments = jnp.concatenate([jnp.ones((b, n), batch["segment_ids"].dtype),
                                    batch["segment_ids"]], axis=1)
        side = {"positions": split_sequence(jnp.broadcast_to(jnp.arange(n + s), (b, n + s))),
                "segments": split_sequence(segments)}
        return self.llm.run_first(x, side["positions"], side["segments"],
                                  **_blocks_kwargs(apply_block)), side

    def pipeline_stage(self, x: jax.Array, side: Batch, apply_block: Callable | None = None):
        return self.llm.pipeline_stage(x, side, **_blocks_kwargs(apply_block))


class GatedCrossAttention(nnx.Module):
    """Flamingo's block: tanh-gated cross-attention to the visual latents, then a gated MLP."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, d_ff: int, n_layers: int,
                 rngs: nnx.Rngs, eps: float):
        self.attn_norm = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_heads, head_dim, n_layers, rngs)
        self.attn_gate = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = MLP(d_model, d_ff, n_layers, rngs)
        self.mlp_gate = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, x: jax.Array, visual: jax.Array) -> jax.Array:
        dt = x.dtype
        x = x + jnp.tanh(self.attn_gate[...]).astype(dt) * self.attn(self.attn_norm(x), visual)
        return x + jnp.tanh(self.mlp_gate[...]).astype(dt) * self.mlp(self.mlp_norm(x))


class CrossAttentionFusion(_TokenModel):
    """The decoder with a gated cross-attention block before every `every` layers."""

    PIPELINED = ("cross", "llm/blocks")

    def __init__(self, llm: LlamaConfig, vision: ViTConfig, rngs: nnx.Rngs, *, n_latents: int,
                 resampler_layers: int, every: int, freeze=()):
        if every < 1 or llm.n_layers % every:
            raise UserError(f"model.fusion.cross_every={every} must divide model.n_layers="
                            f"{llm.n_layers}")
        self.vision = ViT(vision, rngs)
        self.resampler = PerceiverResampler(vision.d_model, n_latents, resampler_layers,
                                            vision.n_heads, vision.head_dim, vision.d_ff, rngs,
                                            unroll=not vision.scan_layers)
        self.projector = Projector(vision.d_model, llm.d_model, rngs)
        self.llm = Llama(llm, rngs)
        self.cross = stack_layers(
            lambda r: GatedCrossAttention(llm.d_model, llm.n_heads, llm.head_dim, llm.d_ff,
                                          llm.n_layers, r, llm.norm_eps), llm.n_layers // every, rngs)
        self.every = every
        self.freeze = tuple(freeze)

    def pipeline_input(self, batch: Batch, apply_block: Callable | None = None):
        dt = jnp.dtype(self.llm.config.dtype)
        visual = self._visual(batch["images"], apply_block)
        visual = self.projector(self.resampler(visual).astype(dt))
        return self.llm.embed_tokens(split_sequence(batch["inputs"])), {
            "positions": split_sequence(batch["positions"]),
            "segments": split_sequence(batch["segment_ids"]), "visual": visual}

    def pipeline_stage(self, x: jax.Array, side: Batch, apply_block: Callable | None = None):
        """Groups of a cross-attention block and `every` decoder layers (a stage's share of the
        groups, under a pipeline), and the decoder layers' stats."""
        run_layer = self.llm.block_fn(**_blocks_kwargs(apply_block))
        block_graph, blocks = nnx.split(self.llm.blocks)
        cross_graph, cross = nnx.split(self.cross)
        groups = jax.tree.map(lambda a: a.reshape(-1, self.every, *a.shape[1:]), blocks)
        unroll = not self.llm.config.scan_layers

        def group(x, states):
            cross_state, block_states = states
            x = nnx.merge(cross_graph, cross_state)(x, side["visual"])
            return scan_blocks(nnx.merge(block_graph, block_states), x, side["positions"],
                               side["segments"], run_layer, unroll)

        y, stats = jax.lax.scan(group, x, (cross, groups), unroll=unroll)
        return y, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stats)  # by decoder layer


def _unordered(first, then):
    return first, then


class CLIP(nnx.Module):
    """Image and text encoders with a contrastive loss; summed answer heads (decision level) over
    `n_answers` classes."""

    def __init__(self, llm: LlamaConfig, vision: ViTConfig, rngs: nnx.Rngs, *, embed_dim: int,
                 n_answers: int):
        for name, value in (("embed_dim", embed_dim), ("n_answers", n_answers)):
            if value < 1:
                raise UserError(f"model.fusion.{name}={value} must be positive")
        self.vision = ViT(vision, rngs)
        self.text = Llama(llm, rngs)
        self.image_proj = param(rngs, (vision.d_model, embed_dim), ("embed", None), vision.d_model**-0.5)
        self.text_proj = param(rngs, (llm.d_model, embed_dim), ("embed", None), llm.d_model**-0.5)
        self.log_scale = nnx.Param(jnp.full((), math.log(1 / 0.07), jnp.float32), logical_axes=())
        self.image_answer = param(rngs, (embed_dim, n_answers), (None, None), embed_dim**-0.5)
        self.text_answer = param(rngs, (embed_dim, n_answers), (None, None), embed_dim**-0.5)

    def embed_images(self, images: jax.Array, apply_block: Callable | None = None) -> jax.Array:
        """Unit-norm image embeddings [batch, embed_dim] (mean of the encoder's tokens)."""
        tokens = self.vision(images, **_blocks_kwargs(apply_block)).astype(jnp.float32)
        return _unit(jnp.mean(tokens, axis=1) @ self.image_proj[...])

    def embed_text(self, tokens: jax.Array, last: jax.Array,
                   apply_block: Callable | None = None) -> jax.Array:
        """Unit-norm text embeddings from the causal encoder's state at index `last` [batch]."""
        return self._text_features(self.text.embed_tokens(tokens), last, apply_block)[0]

    def _text_features(self, x: jax.Array, last: jax.Array, apply_block):
        """Text embeddings and the text encoder's layer stats."""
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        x, stats = self.text.run(x, positions, None, **_blocks_kwargs(apply_block))
        x = self.text.final_norm(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0])
        return _unit(x.astype(jnp.float32) @ self.text_proj[...]), stats

    def _outputs(self, batch: Batch, apply_block=None, order: Callable = _unordered):
        image = self.embed_images(batch["images"], apply_block)
        # One pass of the text encoder over captions and questions (up to the answer) together.
        caption_last = jnp.sum(batch["caption_mask"], axis=1).astype(jnp.int32) - 1
        x = self.text.embed_tokens(jnp.concatenate([batch["captions"], batch["inputs"]]))
        # The towers are independent: `order` (from the parallelism strategy) may run the text
        # tower after the image tower, and the contrastive loss's gathers after both.
        image, x = order(image, x)
        text, stats = self._text_features(x, jnp.concatenate([caption_last, batch["answer_start"]]),
                                          apply_block)
        text, image = order(text, image)
        caption, question = jnp.split(text, 2)
        answer_logits = image @ self.image_answer[...] + question @ self.text_answer[...]
        return image, caption, answer_logits, stats

    def _contrastive(self, image: jax.Array, caption: jax.Array):
        """Per-example symmetric InfoNCE against the whole global batch, and the logits rows."""
        all_images, offset = gather_batch(image)
        all_captions, _ = gather_batch(caption)
        scale = jnp.exp(self.log_scale[...])
        rows = jnp.arange(image.shape[0]) + offset
        image_to_text = scale * image @ all_captions.T  # [local, global]
        text_to_image = scale * caption @ all_images.T
        loss = (optax.softmax_cross_entropy_with_integer_labels(image_to_text, rows)
                + optax.softmax_cross_entropy_with_integer_labels(text_to_image, rows)) / 2
        return loss, image_to_text, rows

    def loss_sums(self, batch: Batch, apply_block: Callable | None = None,
                  order: Callable = _unordered):
        """The summed contrastive and answer losses (plus the text encoder's weighted router losses
        if it has MoE layers), the number of examples, and the MoE stats. `order(first,
        then)` returns its arguments, `then` sequenced after `first` as a strategy needs."""
        image, caption, answer_logits, stats = self._outputs(batch, apply_block, order)
        contrastive, _, _ = self._contrastive(image, caption)
        answer = optax.softmax_cross_entropy_with_integer_labels(answer_logits, batch["answer_id"])
        extra, summary = moe.router_losses(stats, self.text.config.moe)
        return jnp.sum(contrastive + answer) + extra, jnp.asarray(image.shape[0], jnp.float32), summary

    def evaluate(self, batch: Batch) -> dict[str, jax.Array]:
        """Image-to-text retrieval within the batch, contrastive loss, and answer correctness."""
        image, caption, answer_logits, _ = self._outputs(batch)
        contrastive, image_to_text, rows = self._contrastive(image, caption)
        return {"retrieved": jnp.argmax(image_to_text, -1) == rows,
                "contrastive_loss": contrastive,
                "answer_correct": jnp.argmax(answer_logits, -1) == batch["answer_id"]}


def _unit(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
