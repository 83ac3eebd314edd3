"""Vocabulary-split tables under ZeRO/FSDP: the embedding and output layer are never gathered.

What it shards: a vocabulary table (a top-level parameter with a `vocab` axis) that the
data-parallel axes shard stays split by vocabulary inside the loss. When the tokens of the
devices along those axes are fewer than the vocabulary, each device keeps its slice of the
vocabulary and the tokens are gathered instead (`VocabShards`, which the model's embedding lookup
and chunked loss call), so neither the table nor its gradient crosses the network.

Formulation: explicit collectives (inside the data-parallel `shard_map`), because they buy a
measured saving over gathering the table (docs/parallelism.md): per step, an all-gather of the
tokens and hidden states ([B, S] ids and [B, S, D] activations over the N devices) and of the
softmax statistics, instead of an all-gather of the [V, D] table and a reduce-scatter of its
gradient. A table stored split along another dimension moves to a vocabulary split once per step
(one all-to-all of its shard); `vocab_split` stores FSDP tables split by vocabulary to avoid it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxscale.parallel.data_parallel import split_dims
from jaxscale.sharding import Layout, as_tuple


def vocab_split(layout: Layout, spec: PartitionSpec, shape, names) -> PartitionSpec:
    """A vocabulary table's `fsdp` split moved onto its `vocab` dimension where the rules leave
    that unsplit, so the table can stay split by vocabulary without first exchanging shards."""
    if "vocab" not in names:
        return spec
    dims = list(spec) + [None] * (len(shape) - len(spec))
    v = list(names).index("vocab")
    for i, d in enumerate(dims):
        if (i != v and as_tuple(d) == ("fsdp",) and dims[v] is None
                and shape[v] % layout.mesh.shape["fsdp"] == 0):
            dims[i], dims[v] = None, d
    return PartitionSpec(*dims)


def vocab_tables(params: nnx.State) -> dict[str, int]:
    """The top-level parameters with a vocabulary axis, and that axis."""
    return {key: p.get_metadata()["logical_axes"].index("vocab") for key, p in params.items()
            if isinstance(p, nnx.Variable) and "vocab" in p.get_metadata()["logical_axes"]}


def vocab_axes(layout: Layout, tables: dict[str, int], local: dict, manual: dict, stored: dict,
               tokens: int) -> tuple[str, ...]:
    """The data-parallel axes every vocabulary table is split over (and nothing else splits
    their vocabulary), or () to gather them like any parameter: also when the `tokens` gathered
    over those axes outnumber the vocabulary (moving them would cost more).

    `local`, `manual`, `stored`: per table key, its local shard, manual spec and stored spec.
    """
    found = set()
    for key, vocab_dim in tables.items():
        spec, full, split = manual[key], stored[key], split_dims(manual[key])
        if len(split) != 1 or (full[vocab_dim] if vocab_dim < len(full) else None) not in (
                None, spec[split[0][0]]):
            return ()
        (dim, axes), n = split[0], layout.size(split[0][1])
        vocab = local[key].shape[vocab_dim] * (n if dim == vocab_dim else 1)
        if vocab % n or tokens * n > vocab:
            return ()
        found.add(axes)
    return found.pop() if len(found) == 1 else ()


def vocab_slice(x: jax.Array, spec: PartitionSpec, vocab_dim: int,
                axes: tuple[str, ...]) -> jax.Array:
    """This device's slice of a table's vocabulary over `axes`, from its stored shard."""
    ((dim, _),) = split_dims(spec)
    return x if dim == vocab_dim else jax.lax.all_to_all(x, axes, vocab_dim, dim, tiled=True)


@dataclasses.dataclass(frozen=True)
class VocabShards:
    """Vocabulary tables split over `axes` (inside `shard_map`, manual over them): device
    `axis_index(axes)` holds vocabulary rows `i * rows` onwards. The collectives of the embedding
    lookup and the chunked loss (`models.layers.VocabShards`, `chunked_xent_sums`).

    `unroll`: the loss's chunk loop runs unrolled on every backend (XLA:CPU can pair the
    collectives of a loop body with independent ones of the same kind outside it; the chunks are
    usually one: `loss_chunk` unset means all tokens at once).
    """

    axes: tuple[str, ...]
    unroll: bool = True

    def lookup(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
        """The rows of `table` (this device's slice) for `tokens`: every device's tokens gathered,
        each device contributes the rows it holds, and a reduce-scatter hands every device its
        own tokens' rows. The table is never gathered and its gradient stays split."""
        rows = table.shape[0]
        ids = jax.lax.all_gather(tokens.reshape(-1), self.axes, tiled=True)
        local = ids - jax.lax.axis_index(self.axes) * rows
        hit = (local >= 0) & (local < rows)
        out = jnp.where(hit[:, None], jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0), 0)
        out = jax.lax.psum_scatter(out, self.axes, scatter_dimension=0, tiled=True)
        return out.reshape(*tokens.shape, table.shape[1])

    def gather_tokens(self, xs: jax.Array, ts: jax.Array, ms: jax.Array, vocab: int):
        """Every device's hidden states `xs` [n, d], targets `ts` (made relative to this
        device's `vocab` rows) and mask `ms` [n], in one all-gather."""
        d = xs.shape[-1]
        packed = jnp.concatenate([xs.astype(jnp.float32), ms[:, None],
                                  jax.lax.bitcast_convert_type(ts.astype(jnp.int32), jnp.float32)[:, None]],
                                 axis=1)
        packed = jax.lax.all_gather(packed, self.axes, tiled=True)
        ts = jax.lax.bitcast_convert_type(packed[:, d + 1], jnp.int32)
        return (packed[:, :d].astype(xs.dtype), ts - jax.lax.axis_index(self.axes) * vocab,
                packed[:, d])

    def normalizer(self, logits: jax.Array, target: jax.Array, tc: jax.Array, vocab: int):
        """The log-sum-exp over the whole vocabulary of this device's slice of `logits`, and the
        target logit from the device that holds it: both sums in one all-reduce."""
        top = jax.lax.pmax(jnp.max(logits, axis=-1), self.axes)
        sums, target = jax.lax.psum(jnp.stack([
            jnp.sum(jnp.exp(logits - top[:, None]), axis=-1),
            jnp.where((tc >= 0) & (tc < vocab), target, 0.0)]), self.axes)
        return top + jnp.log(sums), target

    def scatter(self, losses: jax.Array, d_x: jax.Array, local_n: int):
        """The losses of this device's `local_n` tokens, and their hidden states' gradient
        (partial sums reduce-scattered)."""
        d_x = jax.lax.psum_scatter(d_x, self.axes, scatter_dimension=0, tiled=True)
        start = jax.lax.axis_index(self.axes) * local_n
        return jax.lax.dynamic_slice(losses, (start,), (local_n,)), d_x
