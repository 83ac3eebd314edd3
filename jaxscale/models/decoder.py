"""What the decoder families share: stacked blocks run between token embeddings and a head.

The fusion models build on it (`embed_tokens`, `blocks`: one module whose parameters carry a
leading `layers` axis, `block_fn`, `head`) and the pipeline schedules on its pipeline interface
(`Decoder`), with `scan_blocks` running a stack;
`flops_per_token` is the FLOP count every decoder family's own builds on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.models import moe
from jaxscale.models.attention import split_sequence
from jaxscale.models.layers import VocabShards, chunked_xent_sums, dense, remat_policy, token_loss_sums
from jaxscale.sharding import constrain

if TYPE_CHECKING:
    from jaxscale.models.llama import LlamaConfig

RESIDUAL = ("batch", "res_seq", "embed")
Stats = moe.Stats
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def attention_params(c: LlamaConfig) -> int:
    """The q, k, v and o weights of one decoder layer."""
    return 2 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.n_kv_heads * c.head_dim


def flops_per_token(c: LlamaConfig, layer_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token: `6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len`.

    N_matmul counts each layer's `layer_matmul_params` and the LM head (even when tied; the
    embedding lookup is not a matmul). The second term is QK^T and AV forward+backward with no
    causal discount (PaLM convention).
    """
    n_matmul = c.n_layers * layer_matmul_params + c.d_model * c.vocab_size
    return float(6 * n_matmul + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len)


def apply_block(block: nnx.Module, x: jax.Array, positions: jax.Array, segments: jax.Array | None):
    return block(x, positions, segments)


def scan_blocks(blocks: nnx.Module, x: jax.Array, positions: jax.Array, segments: jax.Array | None,
                apply_block: Callable[..., jax.Array] = apply_block,
                unroll: bool = False) -> tuple[jax.Array, Stats]:
    """Run the stacked blocks in order with `jax.lax.scan` (one compiled layer, any depth), or
    `unroll`ed (every layer in the program: compiles longer, runs faster on XLA:CPU).

    Returns the output and the blocks' stats stacked by layer (an MoE block returns its output
    with its `moe.Stats`; `{}` for blocks that return an output alone)."""
    graph, stacked = nnx.split(blocks)

    def layer(x, state):
        out = apply_block(nnx.merge(graph, state), x, positions, segments)
        return out if isinstance(out, tuple) else (out, {})

    return jax.lax.scan(layer, x, stacked, unroll=unroll)


class Decoder(nnx.Module):
    """What the decoder families share: run the stacked `blocks` between `embed_tokens` and `head`.

    Subclasses set `config`, `blocks` and define `embed_tokens(tokens, positions)`, `final(x)`
    (the final norm) and `output_table()` (the output layer's [embed, vocab] weights).

    The pipeline interface, which the fusion models implement too: `PIPELINED`, the paths of the
    stacked modules a pipeline splits into stages (each with a leading `layers` axis);
    `pipeline_input(batch)`, the residual stream entering them and the per-example inputs every
    stage uses (`side`); `pipeline_stage(x, side)`, the stacked layers the model holds (a stage's
    share of them, under a pipeline) on `x`, and their stats stacked by layer (`scan_blocks`);
    `pipeline_loss(y, batch)`, the loss sum of the last layer's output; `stats_loss(stats)`,
    what those stats add to the loss sum, and their summary.
    """

    PIPELINED = ("blocks",)
    config: LlamaConfig
    blocks: nnx.Module
    first_blocks: nnx.Module | None = None  # layers before `blocks` (an MoE model's dense ones)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 apply_block: Callable[..., jax.Array] = apply_block) -> jax.Array:
        """Logits for `tokens`. `apply_block(block, x, positions, segments)` runs one layer (data
        parallelism replaces it to gather the layer's parameters just in time)."""
        return self.head(self.hidden(tokens, positions, segment_ids, apply_block)[0])

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               apply_block: Callable[..., jax.Array] = apply_block,
               vocab: VocabShards | None = None) -> tuple[jax.Array, Stats]:
        """The last block's output [batch, seq, embed] for `tokens`, and the blocks' stats (see
        `run`; for `vocab`, `loss_sums`)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        tokens, positions, segments = map(split_sequence, (tokens, positions, segment_ids))
        return self.run(self.embed_tokens(tokens, positions, vocab), positions, segments,
                        apply_block)

    def loss_sums(self, batch: dict[str, jax.Array], vocab: VocabShards | None = None,
                  apply_block: Callable[..., jax.Array] = apply_block
                  ) -> tuple[jax.Array, jax.Array, Stats]:
        """Summed next-token cross-entropy over `loss_mask` (plus an MoE model's weighted router
        losses, `stats_loss`), the mask's sum, and the MoE layers' stats (`{}` if none).
        With `vocab`, a parallelism strategy hands the model its slice of the vocabulary tables
        and what the embedding and loss do across the slices (see `layers.VocabShards`)."""
        x, stats = self.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                               apply_block, vocab)
        loss_sum, count = self.output_loss(x, batch, vocab)
        extra, summary = self.stats_loss(stats)
        return loss_sum + extra, count, summary

    def output_loss(self, x: jax.Array, batch: dict[str, jax.Array],
                    vocab: VocabShards | None = None) -> tuple[jax.Array, jax.Array]:
        """The cross-entropy sum and weight from the last block's output `x`. With `loss_chunk`
        (or `vocab`) the logits are never materialised (`chunked_xent_sums`)."""
        targets = (split_sequence(batch["targets"]), split_sequence(batch["loss_mask"]))
        if self.config.loss_chunk or vocab is not None:
            return chunked_xent_sums(self.final(x), self.output_table().astype(x.dtype),
                                     *targets,
                                     self.config.loss_chunk or x.size // x.shape[-1], vocab,
                                     self.config.logits_dtype)
        return token_loss_sums(self.head(x), *targets)

    def run(self, x: jax.Array, positions: jax.Array, segments: jax.Array | None,
            apply_block: Callable[..., jax.Array] = apply_block) -> tuple[jax.Array, Stats]:
        """The blocks on a residual stream `x` [batch, seq, embed] (token or other embeddings),
        `first_blocks` first; the output and the stats of `blocks` (`scan_blocks`)."""
        x = self.run_first(x, positions, segments, apply_block)
        return self.run_blocks(x, positions, segments, apply_block)

    def run_blocks(self, x: jax.Array, positions: jax.Array, segments: jax.Array | None,
                   apply_block: Callable[..., jax.Array] = apply_block) -> tuple[jax.Array, Stats]:
        """`blocks` alone (a pipeline's stages), with their stats."""
        return scan_blocks(self.blocks, x, positions, segments, self.block_fn(apply_block),
                           unroll=not self.config.scan_layers)

    def run_first(self, x: jax.Array, positions: jax.Array, segments: jax.Array | None,
                  apply_block: Callable[..., jax.Array] = apply_block) -> jax.Array:
        """`first_blocks` on `x` (which a pipeline runs before its stages), or `x`."""
        if self.first_blocks is None:
            return x
        return scan_blocks(self.first_blocks, x, positions, segments, self.block_fn(apply_block),
                           unroll=not self.config.scan_layers)[0]

    def pipeline_input(self, batch: dict[str, jax.Array],
                       apply_block: Callable[..., jax.Array] = apply_block):
        side = {"positions": split_sequence(batch["positions"]),
                "segments": split_sequence(batch["segment_ids"])}
        x = self.embed_tokens(split_sequence(batch["inputs"]), side["positions"])
        return self.run_first(x, side["positions"], side["segments"], apply_block), side

    def pipeline_stage(self, x: jax.Array, side: dict[str, jax.Array],
                       apply_block: Callable[..., jax.Array] = apply_block) -> tuple[jax.Array, Stats]:
        return self.run_blocks(x, side["positions"], side["segments"], apply_block)

    def stats_loss(self, stats: Stats) -> tuple[jax.Array, Stats]:
        """What the blocks' `stats` add to the loss sum (an MoE model's weighted router losses;
        0 for none) and their summary (`moe.router_losses`)."""
        return moe.router_losses(stats, self.config.moe)

    def pipeline_loss(self, y: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        return self.output_loss(y, batch)[0]

    def block_fn(self, apply_block: Callable[..., jax.Array] = apply_block) -> Callable[..., jax.Array]:
        """`apply_block` under the model's rematerialisation policy."""
        if self.config.remat == "none":
            return apply_block
        return nnx.remat(apply_block, policy=remat_policy(self.config.remat), prevent_cse=True)

    def head(self, x: jax.Array) -> jax.Array:
        """Float32 logits [batch, seq, vocab] from the last block's output (rounded to bfloat16
        first with `logits_dtype="bfloat16"`)."""
        x = self.final(x)
        logits = dense(x, self.output_table().astype(x.dtype),
                       preferred_element_type=jnp.dtype(self.config.logits_dtype))
        return constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
