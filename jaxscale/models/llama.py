"""A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.

Parameters and activations carry logical axis names only; how they map onto a mesh is decided
by `jaxscale.sharding`. Activations tagged for `model.remat="save:..."`: `layer_input`, `qkv`,
`attn_out`, `mlp_hidden`, `mlp_out`. Blocks take an optional `attend(q, k, v)` that replaces causal attention
(decoding with a KV cache, `jaxscale.infer`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxscale.errors import UserError
from jaxscale.models.attention import ATTENTION, causal_attention
from jaxscale.models.decoder import RESIDUAL, Attend, Decoder, Stats, attention_params, scan_blocks
from jaxscale.models.decoder import flops_per_token as decoder_flops_per_token
from jaxscale.models.layers import (
    RMSNorm,
    RopeScaling,
    VocabShards,
    embed_lookup,
    param,
    remat_policy,
    rope,
    stack_layers,
)
from jaxscale.models.lora import project
from jaxscale.models.moe import MoE, MoEConfig
from jaxscale.sharding import constrain


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "llama3": Llama 3.1's long-context frequency scaling
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before RoPE (Qwen3, OLMoE-style)
    tie_embeddings: bool = False
    dtype: str = "float32"
    remat: str = "none"
    loss_chunk: int = 0  # > 0: output layer + cross-entropy in chunks of this many tokens
    logits_dtype: str = "float32"  # "bfloat16": the output layer rounds its logits to bf16
    scan_layers: bool = True  # False: unroll the layer loop
    attention: str = "dot_product"  # or "einsum", "cudnn", "splash" (attention.causal_attention)
    max_documents: int = 8  # "cudnn": documents per packed row (its packed layout)
    moe: MoEConfig = MoEConfig()  # n_experts > 0: mixture-of-experts layers (models/moe.py)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name}={getattr(self, name)} must be positive")
        if self.loss_chunk < 0:
            raise UserError(f"model.loss_chunk={self.loss_chunk} must be 0 (off) or positive")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads={self.n_heads} is not a multiple of "
                            f"model.n_kv_heads={self.n_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise UserError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        for key in ("dtype", "logits_dtype"):
            if getattr(self, key) not in ("float32", "bfloat16"):
                raise UserError(f"model.{key}={getattr(self, key)!r}; use float32 or bfloat16")
        self.rope()  # reject a bad scaling at construction time
        if self.attention not in ATTENTION:
            raise UserError(f"model.attention={self.attention!r}; use {', '.join(ATTENTION)}")
        if self.max_documents < 1:
            raise UserError(f"model.max_documents={self.max_documents} must be at least 1")
        self.moe.check(self.n_layers)

    def rope(self) -> RopeScaling:
        """The RoPE frequency scaling of `rope_*`."""
        return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_low_freq_factor,
                           self.rope_high_freq_factor, self.rope_original_max_seq_len)

    @classmethod
    def from_config(cls, model_cfg) -> LlamaConfig:
        """From the config's `model` section (an ml_collections ConfigDict or a dict)."""
        fields = {f.name: model_cfg[f.name] for f in dataclasses.fields(cls) if f.name != "moe"}
        moe = model_cfg.get("moe", MoEConfig())
        return cls(**fields, moe=moe if isinstance(moe, MoEConfig) else MoEConfig(**moe))


class Attention(nnx.Module):
    PROJECTIONS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2}  # their input dims (`lora.project`)
    OUTPUTS = {"wq": 2, "wk": 2, "wv": 2}

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        std, out_std = c.d_model**-0.5, (c.n_heads * c.head_dim) ** -0.5 / math.sqrt(2 * c.n_layers)
        self.wq = param(rngs, (c.d_model, c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), std)
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.wk = param(rngs, (c.d_model, c.n_kv_heads, c.head_dim), kv_axes, std)
        self.wv = param(rngs, (c.d_model, c.n_kv_heads, c.head_dim), kv_axes, std)
        self.wo = param(rngs, (c.n_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"),
                        out_std)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps, "head_dim")
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps, "head_dim")
        self.c = c

    def __call__(self, x: jax.Array, positions: jax.Array, segments: jax.Array | None,
                 attend: Attend | None = None) -> jax.Array:
        """Self-attention of `x`; `attend(q, k, v)`, given rotated q, k and v [batch, seq, heads,
        head_dim], replaces causal attention over these tokens (and their `segments`)."""
        q, k, v = (project(self, name, x) for name in ("wq", "wk", "wv"))
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        if self.c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        scaling = self.c.rope()
        q, k = (rope(t, positions, self.c.rope_theta, scaling) for t in (q, k))
        if attend is None:
            out = causal_attention(q, k, v, segments, self.c.attention, self.c.max_documents)
        else:
            out = attend(q, k, v)
        out = checkpoint_name(constrain(out, ("batch", "seq", "heads", "head_dim")), "attn_out")
        return project(self, "wo", out, 2)


class MLP(nnx.Module):
    PROJECTIONS = {"w_gate": 1, "w_up": 1, "w_down": 1}

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        std, out_std = c.d_model**-0.5, c.d_ff**-0.5 / math.sqrt(2 * c.n_layers)
        self.w_gate = param(rngs, (c.d_model, c.d_ff), ("embed", "mlp"), std)
        self.w_up = param(rngs, (c.d_model, c.d_ff), ("embed", "mlp"), std)
        self.w_down = param(rngs, (c.d_ff, c.d_model), ("mlp", "embed"), out_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = project(self, "w_gate", x), project(self, "w_up", x)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        h = checkpoint_name(h, "mlp_hidden")
        return checkpoint_name(project(self, "w_down", h), "mlp_out")


class Block(nnx.Module):
    """Attention and an MLP, or with `moe` an MoE layer (then `__call__` returns the output and
    the layer's stats)."""

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs, moe: bool = False):
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c, rngs)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        if moe:
            shared = MLP(dataclasses.replace(c, d_ff=c.moe.shared_d_ff), rngs) if (
                c.moe.shared_d_ff) else None
            self.mlp = MoE(c.d_model, c.moe, c.n_layers, rngs, shared)
        else:
            self.mlp = MLP(c, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segments: jax.Array | None,
                 attend: Attend | None = None) -> jax.Array | tuple[jax.Array, Stats]:
        x = checkpoint_name(x, "layer_input")
        x = constrain(x + self.attn(self.attn_norm(x), positions, segments, attend), RESIDUAL)
        if not isinstance(self.mlp, MoE):
            return constrain(x + self.mlp(self.mlp_norm(x)), RESIDUAL)
        out, stats = self.mlp(self.mlp_norm(x))
        return constrain(x + out, RESIDUAL), stats


class MoEGroup(nnx.Module):
    """`every - 1` dense blocks, then an MoE block: the unit an MoE model with
    `model.moe.every > 1` stacks."""

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        self.dense = stack_layers(lambda r: Block(c, r), c.moe.every - 1, rngs)
        self.moe = Block(c, rngs, moe=True)
        self.unroll = not c.scan_layers

    def __call__(self, x: jax.Array, positions: jax.Array, segments: jax.Array | None,
                 attend: Attend | None = None) -> tuple[jax.Array, Stats]:
        if attend is not None:
            raise NotImplementedError("KV-cache decoding of an MoE model with model.moe.every > 1")
        x = scan_blocks(self.dense, x, positions, segments, unroll=self.unroll)[0]
        return self.moe(x, positions, segments)


def stacked_blocks(c: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The decoder's layers as one module whose parameters carry a leading `layers` axis:
    `n_layers` blocks, or for an MoE model the layers after `first_dense`, in groups of `every`
    ending in an MoE layer (one MoE block each when `every == 1`)."""
    if not c.moe.n_experts:
        return stack_layers(lambda r: Block(c, r), c.n_layers, rngs)
    if c.moe.every == 1:
        return stack_layers(lambda r: Block(c, r, moe=True), c.moe.moe_layers(c.n_layers), rngs)
    return stack_layers(lambda r: MoEGroup(c, r), c.moe.moe_layers(c.n_layers), rngs)


def first_blocks(c: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module | None:
    """An MoE model's first `first_dense` (dense) layers, stacked; None if there are none."""
    n = c.moe.first_dense if c.moe.n_experts else 0
    return stack_layers(lambda r: Block(c, r), n, rngs) if n else None


def moe_config(c) -> MoEConfig:
    """The MoE settings of a `LlamaConfig` or of the config's `model` section."""
    m = c.get("moe", {}) if hasattr(c, "get") else c.moe
    return m if isinstance(m, MoEConfig) else MoEConfig(**m)


def layer_matmul_params(c: LlamaConfig) -> int:
    """Matmul weights of one dense layer: q, k, v, o and SwiGLU's gate, up and down."""
    return attention_params(c) + 3 * c.d_model * c.d_ff


def moe_layer_params(c: LlamaConfig, active: bool = False) -> int:
    """Matmul weights of one MoE layer: attention, the router, the shared experts and every
    expert (with `active`, the `top_k` a token uses)."""
    m = moe_config(c)
    experts = m.top_k if active else m.n_experts
    return (attention_params(c) + c.d_model * m.n_experts
            + 3 * c.d_model * (m.shared_d_ff + experts * m.d_ff))


def param_count(c: LlamaConfig, active: bool = False) -> int:
    """All parameters of the Llama that `c` (a `LlamaConfig` or the config's `model` section)
    describes: embedding, the LM head unless tied, each layer's matmuls and two RMSNorm scales
    (four with `qk_norm`), the final norm. `active`: those one token uses (an MoE layer's `top_k` experts; the
    router's balancing bias is state, not counted)."""
    tables = 1 if c.tie_embeddings else 2
    m = moe_config(c)
    moe_layers = m.moe_layers(c.n_layers)
    norms = 2 * c.d_model + (2 * c.head_dim if c.qk_norm else 0)
    layers = ((c.n_layers - moe_layers) * layer_matmul_params(c)
              + moe_layers * moe_layer_params(c, active) + c.n_layers * norms)
    return tables * c.vocab_size * c.d_model + layers + c.d_model


def flops_per_token(c: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token of the Llama that `c` describes (`decoder.flops_per_token`), an
    MoE layer counting the experts a token is routed to (active parameters)."""
    moe_layers = moe_config(c).moe_layers(c.n_layers)
    if not moe_layers:
        return decoder_flops_per_token(c, layer_matmul_params(c), seq_len)
    moe_extra = moe_layer_params(c, active=True) - layer_matmul_params(c)
    return decoder_flops_per_token(c, layer_matmul_params(c), seq_len) + 6 * moe_layers * moe_extra


class Llama(Decoder):
    """Decoder-only language model; `__call__` maps token ids [batch, seq] to float32 logits."""

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        self.config = c
        self.embed = param(rngs, (c.vocab_size, c.d_model), ("vocab", "embed"), 0.02)
        self.first_blocks = first_blocks(c, rngs)
        self.blocks = stacked_blocks(c, rngs)
        self.final_norm = RMSNorm(c.d_model, c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = param(rngs, (c.d_model, c.vocab_size), ("embed", "vocab"), c.d_model**-0.5)
        remat_policy(c.remat)  # reject a bad policy name at construction time

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array | None = None,
                     vocab: VocabShards | None = None) -> jax.Array:
        """The residual stream's input: token embeddings in the compute dtype (RoPE places
        positions inside attention, so `positions` is unused)."""
        table = constrain(self.embed[...], ("vocab", None))  # gathered whole over `fsdp` for use
        x = embed_lookup(table, tokens, vocab)
        return constrain(x.astype(self.config.dtype), RESIDUAL)

    def final(self, x: jax.Array) -> jax.Array:
        """The output layer's input: the final norm of the last block's output."""
        return self.final_norm(x)

    def output_table(self) -> jax.Array:
        """The output layer's weights [embed, vocab] (the embedding's transpose when tied)."""
        return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]
