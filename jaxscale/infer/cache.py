"""A preallocated KV cache: full, or a sliding window with attention sinks; optionally int8.

Arrays name logical axes (`AXES`), so the layout rules shard it like the model: `kv_heads` over
`tensor`, `batch` over `data`/`fsdp`. Each row keeps its own length and writes its next token at
its own slot, so a batch of prompts of different lengths is exact. Slots hold `positions` (the
token position a slot holds, -1 if empty); attention masks are `positions >= 0`.

With `window > 0` the cache is a ring of `sinks + window` slots: the first `sinks` tokens stay for
good (StreamingLLM's attention sinks), the others keep the latest `window` tokens, so memory is
bounded whatever the generation length. Keys are stored rotated at their true positions (as in
Mistral's sliding window), so the window equals attention masked to `sinks` plus the last `window`
tokens, which `prefill_mask` gives for teacher-forced evaluation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxscale.errors import UserError
from jaxscale.sharding import constrain

CACHE_RULES = (("cache_seq", None),)
CACHE_DTYPES = ("auto", "int8")
AXES = {
    "k": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    "k_scale": ("layers", "batch", "cache_seq", "kv_heads"),
    "v_scale": ("layers", "batch", "cache_seq", "kv_heads"),
    "positions": ("batch", "cache_seq"),
    "lengths": ("batch",),
}


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The cache's shape: `length` slots, or `sinks + window` slots when `window > 0`."""

    length: int
    window: int = 0
    sinks: int = 0
    int8: bool = False

    def __post_init__(self) -> None:
        if self.window < 0 or self.sinks < 0 or (not self.window and self.length < 1):
            raise UserError(f"KV cache of length={self.length}, window={self.window}, "
                            f"sinks={self.sinks} is invalid; use infer.cache_len >= 1 (0: "
                            f"model.max_seq_len) and infer.window, infer.sink_tokens >= 0")

    @classmethod
    def from_config(cls, config) -> CacheConfig:
        """From the config's `infer` section (and `model.max_seq_len` for the default length)."""
        infer = config.infer
        if infer.cache_dtype not in CACHE_DTYPES:
            raise UserError(f"infer.cache_dtype={infer.cache_dtype!r}; use auto (the compute "
                            f"dtype) or int8")
        window = infer.window
        return cls(infer.cache_len or config.model.max_seq_len, window,
                   infer.sink_tokens if window else 0, infer.cache_dtype == "int8")

    @property
    def slots(self) -> int:
        return self.sinks + self.window if self.window else self.length

    def slot(self, pos: jax.Array) -> jax.Array:
        """The slot that holds token position `pos`."""
        if not self.window:
            return pos
        return jnp.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.window)

    def prompt_positions(self, lengths: jax.Array) -> jax.Array:
        """[batch, slots]: the prompt position each slot holds after a prefill of `lengths`
        tokens per row (the latest one for ring slots), -1 for none."""
        s = jnp.arange(self.slots)[None, :]
        n = lengths[:, None]
        if not self.window:
            return jnp.where(s < n, s, -1)
        ring = s - self.sinks
        last = n - 1 - self.sinks - ring  # how far the last prompt token lies past this slot's first
        pos = self.sinks + ring + self.window * (jnp.maximum(last, 0) // self.window)
        return jnp.where(ring < 0, jnp.where(s < n, s, -1), jnp.where(last >= 0, pos, -1))

    def prefill_mask(self, seq: int) -> jax.Array | None:
        """[1, 1, seq, seq] keys each query may see besides causality (None: all of them)."""
        if not self.window:
            return None
        i, j = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
        return ((j < self.sinks) | (i - j < self.window))[None, None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for a batch of rows; see the module docstring."""

    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]: compute dtype, or int8
    v: jax.Array
    k_scale: jax.Array | None  # [layers, batch, slots, kv_heads] float32 (int8 only)
    v_scale: jax.Array | None
    positions: jax.Array  # [batch, slots] int32
    lengths: jax.Array  # [batch] int32: tokens seen, the position of the next one
    config: CacheConfig = dataclasses.field(metadata={"static": True})

    @classmethod
    def from_prompt(cls, config: CacheConfig, ks: jax.Array, vs: jax.Array,
                    lengths: jax.Array) -> KVCache:
        """The cache after a prefill whose keys and values are `ks`, `vs` [layers, batch, prompt,
        kv_heads, head_dim] (rows right-padded, `lengths` tokens each)."""
        positions = config.prompt_positions(lengths)
        index = jnp.clip(positions, 0, ks.shape[2] - 1)[None, :, :, None, None]
        valid = (positions >= 0)[None, :, :, None, None]

        def gather(x):
            return jnp.where(valid, jnp.take_along_axis(x, index, axis=2), 0).astype(x.dtype)

        (k, k_scale), (v, v_scale) = (_store(config, gather(x)) for x in (ks, vs))
        return cls(k, v, k_scale, v_scale, positions, lengths.astype(jnp.int32), config).pinned()

    def write(self, layer: jax.Array, slot: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Store one token's `k`, `v` [batch, kv_heads, head_dim] of `layer` at each row's `slot`."""
        rows = jnp.arange(k.shape[0])
        (k, k_scale), (v, v_scale) = _store(self.config, k), _store(self.config, v)
        new = {"k": self.k.at[layer, rows, slot].set(k), "v": self.v.at[layer, rows, slot].set(v)}
        if self.config.int8:
            new.update(k_scale=self.k_scale.at[layer, rows, slot].set(k_scale),
                       v_scale=self.v_scale.at[layer, rows, slot].set(v_scale))
        return dataclasses.replace(self, **new).pinned()

    def layer(self, layer: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `layer` [batch, slots, kv_heads, head_dim] in `dtype`."""
        k, v = self.k[layer], self.v[layer]
        if self.config.int8:
            k = k.astype(jnp.float32) * self.k_scale[layer][..., None]
            v = v.astype(jnp.float32) * self.v_scale[layer][..., None]
        return k.astype(dtype), v.astype(dtype)

    def pinned(self) -> KVCache:
        """This cache with its arrays constrained to their logical layout."""
        return dataclasses.replace(self, **{name: constrain(getattr(self, name), axes)
                                            for name, axes in AXES.items()
                                            if getattr(self, name) is not None})


def _store(config: CacheConfig, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """`x` as the cache holds it: unchanged, or int8 with one float32 scale per token and head."""
    if not config.int8:
        return x, None
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.round(x / scale[..., None]).astype(jnp.int8), scale


def cache_bytes(cache: KVCache) -> int:
    """Bytes of all the cache's arrays or ShapeDtypeStructs (summed over shards)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


def abstract_cache(config: CacheConfig, model_cfg, batch: int, dtype) -> KVCache:
    """ShapeDtypeStructs of a cache for `batch` rows of the model (sizes without allocating)."""
    shape = (model_cfg.n_layers, batch, config.slots, model_cfg.n_kv_heads, model_cfg.head_dim)
    kv = jax.ShapeDtypeStruct(shape, jnp.int8 if config.int8 else dtype)
    scale = jax.ShapeDtypeStruct(shape[:-1], jnp.float32) if config.int8 else None
    return KVCache(kv, kv, scale, scale, jax.ShapeDtypeStruct((batch, config.slots), jnp.int32),
                   jax.ShapeDtypeStruct((batch,), jnp.int32), config)
