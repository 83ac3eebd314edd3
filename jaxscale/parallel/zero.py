"""ZeRO-1/2/3 and FSDP: optimizer state, gradients and parameters sharded over data parallelism.

What it shards: parameters over `fsdp` (the rule `embed -> fsdp`: FSDP, stage 3 by nature), and
with `parallel.zero_stage` over `data` too (`zero_spec`): 1 the optimizer state, 2 also the
parameters and gradients between steps (PyTorch FSDP's SHARD_GRAD_OP), 3 also re-gathering each
block's parameters in the backward pass instead of keeping them (FULL_SHARD).

Formulation: inside the data-parallel `shard_map` (`data_parallel.py`), written out so that every
backend compiles the same program: a parameter sharded over data-parallel axes is `all_gather`ed,
and `jax.grad` turns each gather into a `psum_scatter` (reduce-scatter) of its gradient. Shards
gathered over the same axes travel as one flat buffer (like PyTorch FSDP's flat parameters): one
all-gather and one reduce-scatter per group instead of one per parameter. Mixed precision as
PyTorch FSDP's: floating parameters are gathered in `parallel.gather_dtype` (by default the
compute dtype, which the models cast every matrix to anyway) and their gradients reduce-scattered
in float32. With regathering
(`fsdp > 1` or stage 3) each block's parameters are gathered inside the block under a remat
policy that saves everything but them, so the backward pass gathers them again.

Collectives per step, for P bytes of parameters sharded over N devices: stage 1 an all-reduce of
the gradients (data parallelism's) and the optimizer's own sharded update; stage 2 one
all-gather of the parameters (P, or P/2 gathered in bfloat16) and one reduce-scatter of the
gradients (P), (N-1)/N of each; stage 3 / FSDP one more all-gather of the blocks' parameters in
the backward pass.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.parallel import vocab_parallel
from jaxscale.parallel.data_parallel import split_dims, vary
from jaxscale.parallel.stages import under
from jaxscale.sharding import Layout, Rules, as_tuple

RULES: Rules = (("embed", "fsdp"),)  # parameters: FSDP over `fsdp`
# Each device's part of a flat buffer is padded to a multiple of this many elements: the TPU
# compiler writes a flat all-gather whose parts are not whole 1-D tiles (1,024 elements) as an
# all-reduce of a zero-filled buffer, twice the bytes (docs/plan.md).
FLAT_ALIGN = 1024
# Shards travel in flat buffers whose whole float32 gradient is at most this many bytes (a larger
# parameter alone), as PyTorch FSDP and DDP cap theirs: the whole buffer lives once gathered and
# once reduced. Uncapped, Llama-3.1-70B's step on v6e:16x16 (FSDP, 5 accumulation steps) held
# its two 128K tables' 8.4 GB gradient twice and did not fit; capped it does (docs/plan.md).
BUCKET_BYTES = 2**30
GATHER_DTYPES = ("compute", "float32", "bfloat16")


def gather_dtype(config) -> jnp.dtype:
    """The dtype parameters are all-gathered in (`parallel.gather_dtype`; "compute": `model.dtype`,
    PyTorch FSDP's `param_dtype` under mixed precision). Their gradients are reduce-scattered in
    the parameters' own float32 (`reduce_dtype`) whatever it is."""
    name = config.parallel.gather_dtype
    if name not in GATHER_DTYPES:
        raise UserError(f"parallel.gather_dtype={name!r}; use compute (model.dtype), float32 or "
                        "bfloat16")
    return jnp.dtype(config.model.dtype if name == "compute" else name)


def sent_dtype(dtype: jnp.dtype, gather: jnp.dtype | None) -> jnp.dtype:
    """What a parameter of `dtype` is gathered as: `gather` for floating parameters."""
    return jnp.dtype(gather) if gather is not None and jnp.issubdtype(dtype, jnp.floating) else (
        jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather_as(x: jax.Array, axes: tuple[str, ...], axis: int, dtype: jnp.dtype) -> jax.Array:
    """`x` cast to `dtype` and all-gathered (tiled) along `axis`; its gradient is cast back to
    `x`'s dtype before the reduce-scatter, so the reduction runs at the parameter's precision."""
    return _gather_as_fwd(x, axes, axis, dtype)[0]


def _gather_as_fwd(x, axes, axis, dtype):
    # the gather itself, not `_gather_as`: a remat policy sees its `all_gather` (`_not_gathered`)
    gathered = jax.lax.all_gather(x.astype(dtype), axes, axis=axis, tiled=True)
    return gathered, jnp.zeros((), x.dtype)  # (x's dtype for the bwd)


def _gather_as_bwd(axes, axis, dtype, like, g):
    return (jax.lax.psum_scatter(g.astype(like.dtype), axes, scatter_dimension=axis, tiled=True),)


_gather_as.defvjp(_gather_as_fwd, _gather_as_bwd)


def all_gather(x: jax.Array, axes: tuple[str, ...], axis: int, gather: jnp.dtype | None) -> jax.Array:
    """`x` all-gathered (tiled) along `axis` over `axes`, sent as `sent_dtype(x.dtype, gather)`."""
    dtype = sent_dtype(x.dtype, gather)
    if dtype == x.dtype:
        return jax.lax.all_gather(x, axes, axis=axis, tiled=True)
    return _gather_as(x, axes, axis, dtype)


def zero_spec(layout: Layout, spec: PartitionSpec, shape, names=()) -> PartitionSpec:
    """`spec` with `data` added to the first dimension it divides (ZeRO over data parallel),
    a `vocab` dimension before the others.

    Only dimensions that are unsharded or sharded over `fsdp` alone are candidates, so data
    parallel and model parallel axes never share a dimension, and never the `layers` axis of
    stacked blocks (which are run one layer at a time). Arrays too small to split stay as they
    were (their size is negligible).
    """
    n = layout.mesh.shape["data"]
    dims = list(spec) + [None] * (len(shape) - len(spec))
    if n == 1 or any("data" in as_tuple(d) for d in dims):
        return spec
    order = sorted(range(len(dims)), key=lambda i: not (i < len(names) and names[i] == "vocab"))
    for i in order:
        d = dims[i]
        if i < len(names) and names[i] in ("layers", "encoder_layers"):
            continue
        if set(as_tuple(d)) <= {"fsdp"} and shape[i] % (layout.size(as_tuple(d)) * n) == 0:
            dims[i] = as_tuple(d) + ("data",) if d else "data"
            return PartitionSpec(*dims)
    return spec


def specs(layout: Layout, tree, stage: int, from_stage: int):
    """Specs of a tree of variables: the rules', tables split by vocabulary, and over `data` too
    when `stage >= from_stage` (1 for optimizer state, 2 for parameters and gradients)."""

    def adjust(spec, shape, names):
        spec = vocab_parallel.vocab_split(layout, spec, shape, names)
        return zero_spec(layout, spec, shape, names) if stage >= from_stage else spec

    return layout.param_specs(tree, adjust)


def regathers(layout: Layout, stage: int) -> bool:
    """Whether blocks gather their parameters again in the backward pass (FSDP, ZeRO-3)."""
    return layout.mesh.shape["fsdp"] > 1 or stage == 3


def _unstack(whole: jax.Array, shape: tuple[int, ...], dim: int) -> jax.Array:
    """[devices, *shape] gathered shards -> the array they split along `dim`."""
    return jnp.moveaxis(whole.reshape(-1, *shape), 0, dim).reshape(
        *shape[:dim], -1, *shape[dim + 1:])


def auto_part(spec: PartitionSpec, manual_axes: tuple[str, ...], sizes: dict[str, int]) -> PartitionSpec:
    """The part of `spec` over the mesh axes a `shard_map` manual over `manual_axes` leaves
    automatic (tensor parallelism's), those of one device dropped."""
    return PartitionSpec(*(tuple(a for a in as_tuple(d) if a not in manual_axes and sizes[a] > 1)
                           or None for d in spec))


def gather_all(xs: list[jax.Array], specs: list[PartitionSpec], flat: bool,
               gather: jnp.dtype | None = None, auto: list[PartitionSpec] | None = None
               ) -> list[jax.Array]:
    """All-gather each `x` over the data-parallel axes in its spec (`pipeline` stays split), sent
    in `gather` (floating parameters; `all_gather`). A parameter split over data-parallel axes in
    two dimensions (rare) is gathered in its own dtype.

    `auto` gives each `x`'s spec over the automatic mesh axes (`auto_part`). Those split over
    them (tensor parallelism's) are gathered in a `shard_map` manual over those axes too, so each
    device gathers its own slice: in a collective over manual axes, XLA's partitioner first
    gathers an operand split over automatic axes whole (under tensor=4, an all-gather over
    `tensor` and 4 times the bytes over the data-parallel axes, gradients likewise).

    With `flat`, shards gathered over the same axes travel as one flat buffer (each device's part
    padded to `FLAT_ALIGN` elements), gathered along its leading axis and moved into place
    (XLA:CPU does that several times faster than gathering along an inner dimension). Without
    `flat` (where other mesh axes, e.g. `tensor`, split the shards) each is gathered along its
    own dimension.
    """
    out = list(xs)
    nested = [i for i, spec in enumerate(auto or ()) if any(as_tuple(d) for d in spec)]
    if nested:
        inner = tuple(auto[i] for i in nested)
        axes = frozenset(a for spec in inner for d in spec for a in as_tuple(d))
        gathered = jax.shard_map(
            lambda *ys: tuple(_gather_all(list(ys), [specs[i] for i in nested], False, gather)),
            in_specs=inner, out_specs=inner, axis_names=axes)(*(xs[i] for i in nested))
        for i, x in zip(nested, gathered, strict=True):
            out[i] = x
    rest = [i for i in range(len(xs)) if i not in nested]
    for i, x in zip(rest, _gather_all([xs[i] for i in rest], [specs[i] for i in rest], flat, gather),
                    strict=True):
        out[i] = x
    return out


def _gather_all(xs: list[jax.Array], specs: list[PartitionSpec], flat: bool,
                gather: jnp.dtype | None) -> list[jax.Array]:
    out = list(xs)
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, (x, spec) in enumerate(zip(xs, specs, strict=True)):
        split = split_dims(spec)
        if len(split) == 1:
            groups.setdefault((split[0][1], x.dtype), []).append((i, split[0][0]))
        for dim, axes in split if len(split) > 1 else ():  # rare: gathered on its own
            out[i] = _unstack(jax.lax.all_gather(out[i], axes), out[i].shape, dim)
    for (axes, _), members in groups.items():
        if not flat:
            for i, dim in members:
                out[i] = all_gather(xs[i], axes, dim, gather)
            continue
        sizes = [xs[i].size for i, _ in members]
        for bucket in _buckets(sizes, jax.lax.axis_size(axes)):
            chosen = [members[k] for k in bucket]
            flat_shards = jnp.concatenate([xs[i].reshape(-1) for i, _ in chosen])
            n = flat_shards.size
            padded = jnp.pad(flat_shards, (0, -n % FLAT_ALIGN))
            whole = all_gather(padded, axes, 0, gather).reshape(-1, padded.size)[:, :n]
            ends = list(itertools.accumulate(sizes[k] for k in bucket))[:-1]
            pieces = jnp.split(whole, ends, axis=1)
            for (i, dim), piece in zip(chosen, pieces, strict=True):
                out[i] = _unstack(piece, xs[i].shape, dim)
    return out


def _buckets(sizes: list[int], devices: int) -> list[list[int]]:
    """Consecutive shards (their element counts on one device) in flat buffers of at most
    `BUCKET_BYTES` of whole float32 gradient over `devices`; a larger shard alone."""
    buckets: list[list[int]] = []
    total = 0
    for k, size in enumerate(sizes):
        whole = size * devices * 4
        if not buckets or total + whole > BUCKET_BYTES:
            buckets.append([])
            total = 0
        buckets[-1].append(k)
        total += whole
    return buckets


def _not_gathered(prim, *_, **__) -> bool:
    """Remat policy: save everything but gathered parameters (and their aliases and casts)."""
    return prim.name not in ("all_gather", "pvary", "pcast", "name", "reshape", "slice", "split",
                             "transpose", "convert_element_type")


def _keys(path) -> list[str]:
    return [str(k.key) for k in path if hasattr(k, "key")]


def stack_index(keys: list[str]) -> int | None:
    """Where a stacked-blocks subtree (`blocks`, `first_blocks`, ...) starts in `keys`."""
    return next((i for i, k in enumerate(keys) if k == "blocks" or k.endswith("_blocks")), None)


def block_part(path) -> str:
    """The path inside its stacked-blocks subtree ("attn/wq"), or "" outside any."""
    keys = _keys(path)
    i = stack_index(keys)
    return "" if i is None else "/".join(keys[i + 1:])


def _layer_specs(manual, virtualized: tuple[str, ...]) -> dict[frozenset, dict[str, PartitionSpec]]:
    """One layer's specs for each stacked-blocks subtree (`blocks`, `*_blocks`, anywhere), keyed by
    the set of its parameter names, which is how `RegatheredBlock` recognises a layer; stacks at
    the `virtualized` paths have two leading stacked dimensions (`pipeline.virtualize`)."""
    groups: dict[tuple, dict[str, PartitionSpec]] = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(
            manual, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]:
        if name := block_part(path):
            keys = _keys(path)
            groups.setdefault(tuple(keys[:stack_index(keys) + 1]), {})[name] = PartitionSpec(
                *spec[1 + under(path, virtualized):])
    out: dict[frozenset, dict[str, PartitionSpec]] = {}
    for layer in groups.values():
        key = frozenset(layer)
        if out.setdefault(key, layer) != layer:
            raise ValueError(f"two stacked-block subtrees with the parameters {sorted(key)} are laid "
                             f"out differently; rename one of them")
    return out


class RegatheredBlock:
    """`apply_block(block, *args)` that gathers the layer's parameter shards inside the layer and
    again in the backward pass (remat policy `_not_gathered`) instead of keeping them, sent in
    `gather`, each device its slice of the automatic axes (`auto_specs`; `gather_all`)."""

    def __init__(self, manual_specs, virtualized: tuple[str, ...], manual_axes: tuple[str, ...],
                 flat: bool, gather: jnp.dtype | None = None, auto_specs=None):
        self.layer_specs = _layer_specs(manual_specs, virtualized)
        self.layer_auto = _layer_specs(auto_specs, virtualized) if auto_specs is not None else None
        self.manual_axes, self.flat, self.gather = manual_axes, flat, gather

    def __call__(self, block: nnx.Module, *args) -> jax.Array:
        graph, shards = nnx.split(block)
        flat, treedef = jax.tree_util.tree_flatten_with_path(shards)
        names = ["/".join(_keys(p)) for p, _ in flat]
        layer = self.layer_specs[frozenset(names)]
        auto = [self.layer_auto[frozenset(names)][n] for n in names] if self.layer_auto else None

        def run(shards, *args):
            gathered = gather_all(jax.tree.leaves(shards), [layer[n] for n in names], self.flat,
                                  self.gather, auto)
            full = treedef.unflatten(gathered)
            return nnx.merge(graph, full)(*args)

        return jax.checkpoint(run, policy=_not_gathered)(shards, *args)


class LocalLoss:
    """The loss on one data-parallel shard, from the parameters as ZeRO/FSDP store them.

    Gathers the parameters (with regathering, those outside the stacked blocks: the blocks gather
    their own), or cuts the vocabulary tables into vocabulary slices (`vocab_parallel.py`), and
    runs `model_loss(graphdef, params, batch, **kwargs)`. Floating parameters are gathered in
    `gather` (`gather_dtype`), their gradients reduce-scattered in their own dtype.
    `order(first, then)` returns its arguments with `then` sequenced after `first` where the
    backend needs it (`parallelize` passes `jaxscale.cpu.order_collectives`); it sequences the
    gathers before the batch and the layer loops, and is handed to models with independent
    towers (`towers`: a model whose `loss_sums` takes `order`).
    """

    def __init__(self, graphdef: nnx.GraphDef, model_loss: Callable, layout: Layout, manual_specs,
                 stored_specs, manual_axes: tuple[str, ...], *, regather: bool,
                 virtualized: tuple[str, ...], tables: dict[str, int], order: Callable | None,
                 towers: bool = False, gather: jnp.dtype | None = None):
        self.graphdef, self.model_loss, self.layout = graphdef, model_loss, layout
        self.manual, self.stored, self.manual_axes = manual_specs, stored_specs, manual_axes
        self.regather, self.tables, self.order, self.towers = regather, tables, order, towers
        self.gather = gather
        # flat buffers only where no other mesh axis splits the parameters (see `gather_all`)
        self.flat = all(n == 1 for a, n in layout.mesh.shape.items() if a not in manual_axes)
        sizes = dict(layout.mesh.shape)
        self.auto = jax.tree.map(lambda s: auto_part(s, manual_axes, sizes), stored_specs,
                                 is_leaf=lambda x: isinstance(x, PartitionSpec))
        self.block = RegatheredBlock(manual_specs, virtualized, manual_axes, self.flat,
                                     gather, self.auto) if regather else None

    def __call__(self, params, batch):
        # marked varying as shards, so a gradient is all-reduced over the axes that do not split
        # its parameter after its reduce-scatter, not before (a 1/n share under data x fsdp)
        params = jax.tree.map(lambda x: vary(x, self.manual_axes), params)
        vocab = self._vocab_axes(params, batch["inputs"].size) if self.tables else ()
        kwargs = {"vocab": vocab_parallel.VocabShards(vocab)} if vocab else {}
        full = self._gather(params, vocab)
        if self.order is not None:
            full, batch = self._ordered(full, params, batch)
            if self.towers:
                kwargs["order"] = self.order
        if self.block is not None:
            kwargs["apply_block"] = self.block
        return self.model_loss(self.graphdef, full, batch, **kwargs)

    def _vocab_axes(self, params, tokens: int) -> tuple[str, ...]:
        local = {k: params[k][...] for k in self.tables}
        manual = {k: self.manual[k] for k in self.tables}
        stored = {k: self.stored[k] for k in self.tables}
        return vocab_parallel.vocab_axes(self.layout, self.tables, local, manual, stored, tokens)

    def _gather(self, params, vocab: tuple[str, ...]):
        """Every leaf gathered (with regathering: those outside stacked-block subtrees; with
        `vocab`: the vocabulary tables cut into vocabulary slices instead)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        specs = jax.tree.leaves(self.manual, is_leaf=lambda x: isinstance(x, PartitionSpec))
        auto = jax.tree.leaves(self.auto, is_leaf=lambda x: isinstance(x, PartitionSpec))
        out = [x for _, x in flat]
        todo = []
        for i, ((path, x), spec) in enumerate(zip(flat, specs, strict=True)):
            keys = _keys(path)
            if vocab and len(keys) == 1 and keys[0] in self.tables:
                out[i] = vocab_parallel.vocab_slice(x, spec, self.tables[keys[0]], vocab)
            elif not (self.regather and block_part(path)):
                todo.append(i)
        gathered = gather_all([out[i] for i in todo], [specs[i] for i in todo], self.flat,
                              self.gather, [auto[i] for i in todo])
        for i, x in zip(todo, gathered, strict=True):
            out[i] = x
        return treedef.unflatten(out)

    def _ordered(self, full, params, batch):
        """`full` and `batch` with the batch (whose tokens the model may gather) and the blocks'
        shards left for the layer loops to gather waiting for the gathers and exchanges; in the
        backward pass their reduce-scatters wait for the loops' (`order`)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(full)
        moved = [i for i, ((_, x), raw) in enumerate(zip(flat, jax.tree.leaves(params), strict=True))
                 if x is not raw]
        blocks = [i for i, (p, _) in enumerate(flat) if block_part(p) and i not in moved]
        first, (batch, later) = self.order([flat[i][1] for i in moved],
                                           (batch, [flat[i][1] for i in blocks]))
        leaves = [x for _, x in flat]
        for i, x in zip(moved + blocks, first + later, strict=True):
            leaves[i] = x
        return treedef.unflatten(leaves), batch

