"""GPT-2: learned absolute positions, pre-LayerNorm blocks with biases, GELU MLP, tied embeddings.

Same decoder interface as `Llama` (`embed_tokens`, stacked `blocks`, `head`), so training,
parallelism and KV-cache decoding run it unchanged. Configured by the `model` section with
`family="gpt2"` (`n_kv_heads` equals `n_heads`; `rope_*` are unused).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxscale.errors import UserError
from jaxscale.models.attention import causal_attention
from jaxscale.models.decoder import RESIDUAL, Attend, Decoder, attention_params
from jaxscale.models.decoder import flops_per_token as decoder_flops_per_token
from jaxscale.models.layers import (
    LayerNorm,
    VocabShards,
    embed_lookup,
    param,
    remat_policy,
    stack_layers,
    take_rows,
)
from jaxscale.models.llama import LlamaConfig
from jaxscale.models.lora import project
from jaxscale.sharding import constrain


def _bias(shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)


class Attention(nnx.Module):
    PROJECTIONS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2}  # their input dims (`lora.project`)
    OUTPUTS = {"wq": 2, "wk": 2, "wv": 2}

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        std, out_std = 0.02, 0.02 / math.sqrt(2 * c.n_layers)
        axes = ("embed", "heads", "head_dim")
        self.wq, self.wk, self.wv = (param(rngs, (c.d_model, c.n_heads, c.head_dim), axes, std)
                                     for _ in range(3))
        self.bq, self.bk, self.bv = (_bias((c.n_heads, c.head_dim), ("heads", "head_dim"))
                                     for _ in range(3))
        self.wo = param(rngs, (c.n_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"),
                        out_std)
        self.bo = _bias((c.d_model,), ("embed",))
        self.kind, self.max_documents = c.attention, c.max_documents

    def __call__(self, x: jax.Array, segments: jax.Array | None, attend: Attend | None) -> jax.Array:
        dt = x.dtype
        q, k, v = (constrain(project(self, w, x) + b[...].astype(dt),
                             ("batch", "seq", "heads", "head_dim"))
                   for w, b in (("wq", self.bq), ("wk", self.bk), ("wv", self.bv)))
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        if attend is None:
            out = causal_attention(q, k, v, segments, self.kind, self.max_documents)
        else:
            out = attend(q, k, v)
        out = checkpoint_name(constrain(out, ("batch", "seq", "heads", "head_dim")), "attn_out")
        return project(self, "wo", out, 2) + self.bo[...].astype(dt)


class MLP(nnx.Module):
    PROJECTIONS = {"w_fc": 1, "w_proj": 1}

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        self.w_fc = param(rngs, (c.d_model, c.d_ff), ("embed", "mlp"), 0.02)
        self.b_fc = _bias((c.d_ff,), ("mlp",))
        self.w_proj = param(rngs, (c.d_ff, c.d_model), ("mlp", "embed"), 0.02 / math.sqrt(2 * c.n_layers))
        self.b_proj = _bias((c.d_model,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = project(self, "w_fc", x) + self.b_fc[...].astype(dt)
        h = checkpoint_name(constrain(jax.nn.gelu(h, approximate=True), ("batch", "seq", "mlp")),
                            "mlp_hidden")
        out = project(self, "w_proj", h) + self.b_proj[...].astype(dt)
        return checkpoint_name(out, "mlp_out")


class Block(nnx.Module):
    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c, rngs)
        self.ln2 = LayerNorm(c.d_model, c.norm_eps)
        self.mlp = MLP(c, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segments: jax.Array | None,
                 attend: Attend | None = None) -> jax.Array:
        """One layer; `positions` are unused (they enter through the position embedding)."""
        x = checkpoint_name(x, "layer_input")
        x = constrain(x + self.attn(self.ln1(x), segments, attend), RESIDUAL)
        return constrain(x + self.mlp(self.ln2(x)), RESIDUAL)


def layer_matmul_params(c: LlamaConfig) -> int:
    """Matmul weights of one layer: q, k, v, o and the MLP's fc and proj."""
    return attention_params(c) + 2 * c.d_model * c.d_ff


def param_count(c: LlamaConfig) -> int:
    """All parameters of the GPT-2 that `c` (a `LlamaConfig` or the config's `model` section)
    describes: token and position tables, the LM head unless tied, each layer's matmuls, biases
    and two LayerNorms (scale and bias), the final LayerNorm."""
    tables = 1 if c.tie_embeddings else 2
    per_layer = layer_matmul_params(c) + 3 * c.n_heads * c.head_dim + c.d_ff + 2 * c.d_model + 4 * c.d_model
    return (tables * c.vocab_size * c.d_model + c.max_seq_len * c.d_model + c.n_layers * per_layer
            + 2 * c.d_model)


def flops_per_token(c: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token of the GPT-2 that `c` describes (`decoder.flops_per_token`)."""
    return decoder_flops_per_token(c, layer_matmul_params(c), seq_len)


class GPT2(Decoder):
    """GPT-2 language model; `__call__` maps token ids [batch, seq] to float32 logits."""

    def __init__(self, c: LlamaConfig, rngs: nnx.Rngs):
        if c.n_kv_heads != c.n_heads:
            raise UserError(f"model.family=gpt2 has no grouped-query attention: set "
                            f"model.n_kv_heads={c.n_heads} (= model.n_heads)")
        if c.moe.n_experts or c.qk_norm:
            raise NotImplementedError("mixture-of-experts layers and qk_norm in model.family=gpt2; "
                                      "use model.family=llama (or model.moe.n_experts=0 and "
                                      "model.qk_norm=false)")
        self.config = c
        self.wte = param(rngs, (c.vocab_size, c.d_model), ("vocab", "embed"), 0.02)
        self.wpe = param(rngs, (c.max_seq_len, c.d_model), ("positions", "embed"), 0.01)
        self.blocks = stack_layers(lambda r: Block(c, r), c.n_layers, rngs)
        self.ln_f = LayerNorm(c.d_model, c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = param(rngs, (c.d_model, c.vocab_size), ("embed", "vocab"), 0.02)
        remat_policy(c.remat)

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array | None = None,
                     vocab: VocabShards | None = None) -> jax.Array:
        """Token plus position embeddings, in the compute dtype."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        wte = constrain(self.wte[...], ("vocab", None))
        wpe = constrain(self.wpe[...], ("positions", None))
        x = embed_lookup(wte, tokens, vocab) + take_rows(wpe, positions)
        return constrain(x.astype(self.config.dtype), RESIDUAL)

    def final(self, x: jax.Array) -> jax.Array:
        return self.ln_f(x)

    def output_table(self) -> jax.Array:
        return self.wte[...].T if self.config.tie_embeddings else self.lm_head[...]
