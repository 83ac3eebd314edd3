"""Prefill and one decode step of a decoder (llama, gpt2) with a `KVCache` (traced inside `jax.jit`).

Both run the model's own blocks, embedding and head; only attention is replaced, through the
blocks' `attend` hook: prefill attends causally over the prompt (as the model's forward does) and
keeps each layer's keys and values, a decode step writes the new token's into the cache and
attends over the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.infer.cache import CacheConfig, KVCache
from jaxscale.models.attention import causal_attention
from jaxscale.models.decoder import Decoder


def forward(model: Decoder, tokens: jax.Array, positions: jax.Array,
            mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The last block's output [batch, seq, embed] and every layer's keys and values [layers,
    batch, seq, kv_heads, head_dim]; attention is causal and, where given, also masked."""
    graph, stacked = nnx.split(model.blocks)

    def layer(x, state):
        kv = {}

        def attend(q, k, v):
            kv["k"], kv["v"] = k, v
            if mask is None:  # the model's attention (a strategy's, for split sequences)
                return causal_attention(q, k, v, None)
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)

        x = _output(nnx.merge(graph, state)(x, positions, None, attend=attend))
        return x, (kv["k"], kv["v"])

    if model.first_blocks is not None:
        raise NotImplementedError("KV-cache decoding of an MoE model with model.moe.first_dense > 0")
    x, (ks, vs) = jax.lax.scan(layer, model.embed_tokens(tokens, positions), stacked)
    return x, ks, vs


def _output(out):
    """A block's output (an MoE block returns its router stats too, unused here)."""
    return out[0] if isinstance(out, tuple) else out


def prefill(model: Decoder, config: CacheConfig, tokens: jax.Array, lengths: jax.Array,
            run: Callable = forward) -> tuple[KVCache, jax.Array]:
    """The cache after the right-padded prompts `tokens` [batch, seq] of `lengths` tokens, and the
    logits [batch, vocab] that follow each prompt's last token. `run`: `forward` as a
    parallelism strategy runs it (context parallelism's whole-row forward)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, ks, vs = run(model, tokens, positions, config.prefill_mask(tokens.shape[1]))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    return KVCache.from_prompt(config, ks, vs, lengths), model.head(last)[:, 0]


def decode_step(model: Decoder, cache: KVCache, tokens: jax.Array) -> tuple[KVCache, jax.Array]:
    """Append one token per row (`tokens` [batch]) at each row's own position; the cache after it
    and the logits [batch, vocab] of the token that follows."""
    pos = cache.lengths
    slot = cache.config.slot(pos)
    positions = cache.positions.at[jnp.arange(pos.shape[0]), slot].set(pos)
    mask = (positions >= 0)[:, None, None, :]
    graph, stacked = nnx.split(model.blocks)

    def layer(carry, xs):
        x, cache = carry
        state, index = xs
        out = {}

        def attend(q, k, v):
            out["cache"] = written = cache.write(index, slot, k[:, 0], v[:, 0])
            keys, values = written.layer(index, q.dtype)
            return jax.nn.dot_product_attention(q, keys, values, mask=mask)

        x = _output(nnx.merge(graph, state)(x, pos[:, None], None, attend=attend))
        return (x, out["cache"]), None

    n_layers = cache.k.shape[0]
    (x, cache), _ = jax.lax.scan(layer, (model.embed_tokens(tokens[:, None], pos[:, None]), cache),
                                 (stacked, jnp.arange(n_layers)))
    cache = dataclasses.replace(cache, positions=positions, lengths=pos + 1)
    return cache.pinned(), model.head(x)[:, 0]


def teacher_forced_logits(model: Decoder, config: CacheConfig, tokens: jax.Array) -> jax.Array:
    """Logits [batch, seq, vocab] of every position, attending as decoding with this cache would:
    the model's own forward for a full cache, masked to sinks plus window for a sliding one."""
    if not config.window:
        return model(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.head(forward(model, tokens, positions, config.prefill_mask(tokens.shape[1]))[0])
