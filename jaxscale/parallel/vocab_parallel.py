"""Vocabulary-split tables under ZeRO/FSDP: the embedding and output layer are never gathered.

What it shards: a vocabulary table (a top-level parameter with a `vocab` axis) that the
data-parallel axes shard stays split by vocabulary inside the loss. When the tokens of the
devices along those axes are fewer than the vocabulary, each device keeps its slice of the
vocabulary and the model gathers the tokens instead (`models.layers.embed_lookup`,
`chunked_xent_sums`), so neither the table nor its gradient crosses the network.

Formulation: explicit collectives (inside the data-parallel `shard_map`), because they buy a
measured saving over gathering the table (docs/parallelism.md): per step, an all-gather of the
tokens and hidden states ([B, S] ids and [B, S, D] activations over the N devices) and of the
softmax statistics, instead of an all-gather of the [V, D] table and a reduce-scatter of its
gradient. A table stored split along another dimension moves to a vocabulary split once per step
(one all-to-all of its shard); `vocab_split` stores FSDP tables split by vocabulary to avoid it.
"""

from __future__ import annotations

import jax
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
