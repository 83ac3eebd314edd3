"""A vision encoder for stills and short clips, and a Perceiver resampler to a fixed token count.

`ViT` cuts each frame into patches, embeds them linearly, adds a learned spatial position and a
learned per-frame (temporal) embedding, and runs pre-norm transformer blocks with bidirectional
attention over all tokens of the clip, so attention compares frames. An optional spatial average
pool (`pool`) then shrinks the patch grid of each frame: the token budget handed to the language
model. `PerceiverResampler` (Flamingo) maps any number of visual tokens to `n_latents` tokens.

As in `jaxscale.models.llama`, parameters and activations carry logical axis names only, blocks
are stacked on a leading `layers` axis and run with `jax.lax.scan` (unrolled with
`scan_layers=False`, as the decoder's `model.scan_layers`), and activations tagged for
`remat="save:..."` are `layer_input` (a ViT block's), `qkv`, `attn_out`, `mlp_hidden` and `mlp_out`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxscale.errors import UserError
from jaxscale.models.layers import RMSNorm, param, remat_policy, stack_layers
from jaxscale.sharding import constrain

TOKENS = ("batch", "seq", "embed")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Sizes of the encoder; images are `image_size` x `image_size` with `channels` channels."""

    image_size: int
    patch_size: int
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    d_ff: int
    channels: int = 3
    max_frames: int = 1
    pool: int = 1  # average pool of the patch grid after the encoder (per side); 1 = none
    norm_eps: float = 1e-6
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True  # False: unroll the block loops (the resampler's too)

    def __post_init__(self):
        for name in ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff",
                     "channels", "max_frames", "pool"):
            if getattr(self, name) < 1:
                raise UserError(f"model.vision.{name}={getattr(self, name)} must be positive")
        if self.image_size % self.patch_size:
            raise UserError(f"model.vision.image_size={self.image_size} is not divisible by "
                            f"model.vision.patch_size={self.patch_size}")
        if self.grid % self.pool:
            raise UserError(f"model.vision.pool={self.pool} does not divide the patch grid side "
                            f"{self.grid} (image_size / patch_size)")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"vit.dtype={self.dtype!r}; use float32 or bfloat16")
        try:
            remat_policy(self.remat)
        except UserError as e:  # the same policies as `model.remat`, under this section's name
            raise UserError(str(e).replace("model.remat", "vit.remat")) from None

    @classmethod
    def from_config(cls, cfg) -> ViTConfig:
        """From a config section (an ml_collections ConfigDict or a dict); absent keys take defaults."""
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})

    @property
    def grid(self) -> int:
        """Patches along each side of a frame, before pooling."""
        return self.image_size // self.patch_size

    @property
    def patches_per_frame(self) -> int:
        """Output tokens per frame, after pooling."""
        return (self.grid // self.pool) ** 2

    def tokens(self, frames: int) -> int:
        """Output tokens for a clip of `frames` frames."""
        return frames * self.patches_per_frame


class Attention(nnx.Module):
    """Non-causal multi-head attention: queries from `x`, keys and values from `context`."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, n_layers: int, rngs: nnx.Rngs):
        std, out_std = d_model**-0.5, (n_heads * head_dim) ** -0.5 / math.sqrt(2 * n_layers)
        axes = ("embed", "heads", "head_dim")
        self.wq = param(rngs, (d_model, n_heads, head_dim), axes, std)
        self.wk = param(rngs, (d_model, n_heads, head_dim), axes, std)
        self.wv = param(rngs, (d_model, n_heads, head_dim), axes, std)
        self.wo = param(rngs, (n_heads, head_dim, d_model), ("heads", "head_dim", "embed"), out_std)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dt, heads = x.dtype, ("batch", "seq", "heads", "head_dim")
        q = constrain(jnp.einsum("bse,ehd->bshd", x, self.wq[...].astype(dt)), heads)
        k = constrain(jnp.einsum("bse,ehd->bshd", context, self.wk[...].astype(dt)), heads)
        v = constrain(jnp.einsum("bse,ehd->bshd", context, self.wv[...].astype(dt)), heads)
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=False)
        out = checkpoint_name(constrain(out, heads), "attn_out")
        return jnp.einsum("bshd,hde->bse", out, self.wo[...].astype(dt))


class MLP(nnx.Module):
    """Two-layer GELU MLP."""

    def __init__(self, d_model: int, d_ff: int, n_layers: int, rngs: nnx.Rngs):
        std, out_std = d_model**-0.5, d_ff**-0.5 / math.sqrt(2 * n_layers)
        self.w_in = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_out = param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = jax.nn.gelu(jnp.einsum("bse,ef->bsf", x, self.w_in[...].astype(dt)))
        h = checkpoint_name(constrain(h, ("batch", "seq", "mlp")), "mlp_hidden")
        return checkpoint_name(jnp.einsum("bsf,fe->bse", h, self.w_out[...].astype(dt)), "mlp_out")


class ViTBlock(nnx.Module):
    """Pre-norm self-attention over every token of the clip, then the MLP."""

    def __init__(self, c: ViTConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c.d_model, c.n_heads, c.head_dim, c.n_layers, rngs)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = MLP(c.d_model, c.d_ff, c.n_layers, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = checkpoint_name(x, "layer_input")
        h = self.attn_norm(x)
        x = constrain(x + self.attn(h, h), TOKENS)
        return constrain(x + self.mlp(self.mlp_norm(x)), TOKENS)


def scan_layers(layers: nnx.Module, x: jax.Array, apply: Callable[[nnx.Module, jax.Array], jax.Array],
                unroll: bool = False) -> jax.Array:
    """Run stacked layers in order with `jax.lax.scan` (`unroll`ed: every layer in the program):
    `x = apply(layer, x)` for each."""
    graph, stacked = nnx.split(layers)

    def step(x, state):
        return apply(nnx.merge(graph, state), x), None

    return jax.lax.scan(step, x, stacked, unroll=unroll)[0]


def _apply(layer: nnx.Module, x: jax.Array) -> jax.Array:
    return layer(x)


class ViT(nnx.Module):
    """Images [batch, frames, H, W, C] -> tokens [batch, frames * patches_per_frame, d_model]."""

    def __init__(self, c: ViTConfig, rngs: nnx.Rngs):
        self.config = c
        patch_dim = c.patch_size**2 * c.channels
        self.patch_embed = param(rngs, (patch_dim, c.d_model), ("patch", "embed"), patch_dim**-0.5)
        self.pos_embed = param(rngs, (c.grid**2, c.d_model), (None, "embed"), 0.02)
        self.frame_embed = param(rngs, (c.max_frames, c.d_model), (None, "embed"), 0.02)
        self.blocks = stack_layers(lambda r: ViTBlock(c, r), c.n_layers, rngs, "encoder_layers")
        self.final_norm = RMSNorm(c.d_model, c.norm_eps)

    def __call__(self, images: jax.Array,
                 apply_block: Callable[[nnx.Module, jax.Array], jax.Array] = _apply) -> jax.Array:
        """Tokens of `images`; `apply_block(block, x)` runs one layer (data parallelism gathers
        its parameters there, as for the decoder)."""
        c, dt = self.config, jnp.dtype(self.config.dtype)
        b, t = images.shape[:2]
        if images.shape[2:] != (c.image_size, c.image_size, c.channels):
            raise UserError(f"ViT expects images [batch, frames, {c.image_size}, {c.image_size}, "
                            f"{c.channels}], got {list(images.shape)}")
        if t > c.max_frames:
            raise UserError(f"a clip of {t} frames exceeds model.vision.max_frames={c.max_frames}")
        patches = patchify(images.astype(dt), c.patch_size)  # [b, t, grid², patch_dim]
        x = jnp.einsum("btnp,pe->btne", patches, self.patch_embed[...].astype(dt))
        x = x + self.pos_embed[...].astype(dt)[None, None] + self.frame_embed[:t].astype(dt)[None, :, None]
        x = constrain(x.reshape(b, t * c.grid**2, c.d_model), TOKENS)
        apply = apply_block if c.remat == "none" else nnx.remat(
            apply_block, policy=remat_policy(c.remat), prevent_cse=True)
        x = self.final_norm(scan_layers(self.blocks, x, apply, unroll=not c.scan_layers))
        return constrain(pool_frames(x, t, c.grid, c.pool), TOKENS)


def patchify(images: jax.Array, p: int) -> jax.Array:
    """[b, t, H, W, C] -> [b, t, (H/p) * (W/p), p * p * C], patches in row-major grid order."""
    b, t, h, w, ch = images.shape
    x = images.reshape(b, t, h // p, p, w // p, p, ch).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, (h // p) * (w // p), p * p * ch)


def pool_frames(x: jax.Array, frames: int, grid: int, pool: int) -> jax.Array:
    """Average each frame's patch grid over `pool` x `pool` windows (in float32):
    [b, frames * grid², d] -> [b, frames * (grid / pool)², d]."""
    if pool == 1:
        return x
    (b, _, d), g = x.shape, grid // pool
    pooled = x.astype(jnp.float32).reshape(b, frames, g, pool, g, pool, d).mean(axis=(3, 5))
    return pooled.reshape(b, frames * g * g, d).astype(x.dtype)


class ResamplerLayer(nnx.Module):
    """Latents attend to [visual tokens; latents] (pre-norm, separate norms), then the MLP."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, d_ff: int, n_layers: int,
                 norm_eps: float, rngs: nnx.Rngs):
        self.media_norm = RMSNorm(d_model, norm_eps)
        self.latent_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, head_dim, n_layers, rngs)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = MLP(d_model, d_ff, n_layers, rngs)

    def __call__(self, latents: jax.Array, media: jax.Array) -> jax.Array:
        q = self.latent_norm(latents)
        context = jnp.concatenate([self.media_norm(media), q], axis=1)
        latents = constrain(latents + self.attn(q, constrain(context, TOKENS)), TOKENS)
        return constrain(latents + self.mlp(self.mlp_norm(latents)), TOKENS)


class PerceiverResampler(nnx.Module):
    """Flamingo's resampler: visual tokens [batch, n, d_model] -> [batch, n_latents, d_model], any n.

    Computes in the dtype of its input; parameters are float32.
    """

    def __init__(self, d_model: int, n_latents: int, n_layers: int, n_heads: int, head_dim: int,
                 d_ff: int, rngs: nnx.Rngs, norm_eps: float = 1e-6, unroll: bool = False):
        for name, value in (("d_model", d_model), ("n_latents", n_latents), ("n_layers", n_layers),
                            ("n_heads", n_heads), ("head_dim", head_dim), ("d_ff", d_ff)):
            if value < 1:
                raise UserError(f"resampler.{name}={value} must be positive")
        self.latents = param(rngs, (n_latents, d_model), (None, "embed"), 1.0)
        self.layers = stack_layers(
            lambda r: ResamplerLayer(d_model, n_heads, head_dim, d_ff, n_layers, norm_eps, r),
            n_layers, rngs, "encoder_layers")
        self.final_norm = RMSNorm(d_model, norm_eps)
        self.unroll = unroll

    def __call__(self, tokens: jax.Array) -> jax.Array:
        media = constrain(tokens, TOKENS)
        latents = jnp.broadcast_to(self.latents[...].astype(tokens.dtype),
                                   (tokens.shape[0], *self.latents.shape))
        latents = scan_layers(self.layers, constrain(latents, TOKENS),
                              lambda layer, x: layer(x, media), unroll=self.unroll)
        return self.final_norm(latents)


def vit_flops_per_example(c: ViTConfig, frames: int) -> float:
    """Training FLOPs of the encoder for one clip of `frames` frames (forward + backward).

    `6 * N_matmul * T + 12 * n_layers * n_heads * head_dim * T²` with T = frames * grid² the
    encoder's tokens (pooling comes after the blocks and is free). N_matmul counts the patch
    embedding and the attention and MLP weights (the convention of `decoder.flops_per_token`; the patch
    embedding's input gradient, which training does not need, is counted too).
    """
    t = frames * c.grid**2
    layer = 4 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.d_ff
    n_matmul = c.n_layers * layer + c.patch_size**2 * c.channels * c.d_model
    return float(6 * n_matmul * t + 12 * c.n_layers * c.n_heads * c.head_dim * t * t)
