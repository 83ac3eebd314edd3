"""Data parallelism with explicit collectives: DP, ZeRO-1/2/3 and FSDP.

The loss runs inside `jax.shard_map`, manual over the data-parallel mesh axes (`data`, `fsdp`)
and automatic over the rest (`tensor`, ...), so the communication of data parallelism is written
out rather than left to backend passes (which differ: CPU XLA never forms reduce-scatters):

- a parameter sharded over data-parallel axes is `all_gather`ed inside; `jax.grad` turns each
  gather into a `psum_scatter` (reduce-scatter) of its gradient;
- a parameter replicated over a data-parallel axis gets its gradient `psum`med (all-reduce) over
  it, from shard_map's transpose;
- `regather=True` (FSDP / ZeRO-3) gathers each block's parameters inside the block, under a
  `jax.checkpoint` policy that saves everything but them, so the backward pass gathers them again
  instead of holding every layer's full parameters; `regather=False` (ZeRO-2) gathers once per
  step and keeps them;
- vocabulary tables (the embedding and output layer, `vocab_tables`) sharded over the
  data-parallel axes are not gathered when the devices' tokens are fewer than the vocabulary:
  each device keeps a slice of the vocabulary (an all-to-all when they are stored split along
  another dimension) and the model gathers the tokens instead (`layers.embed_lookup`,
  `layers.chunked_xent_sums`), so the tables' gradients need no reduce-scatter either;
- on a CPU mesh the batch and the layer loops wait for the gathers outside them, and the
  backward pass's reduce-scatters for the loops' (`sharding.in_order`).
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
from jaxscale.sharding import Layout, in_order
from jaxscale.train.step import loss_sums

DP_AXES = ("data", "fsdp")


def dp_axes(layout: Layout) -> tuple[str, ...]:
    """The data-parallel axes of the layout's mesh that have more than one device."""
    return tuple(a for a in DP_AXES if layout.mesh.shape[a] > 1)


def _manual_part(spec: PartitionSpec, axes: tuple[str, ...], where: str) -> PartitionSpec:
    out = []
    for d in spec:
        names = (d,) if isinstance(d, str) else tuple(d or ())
        manual = tuple(a for a in names if a in axes)
        if manual and len(manual) != len(names):
            raise UserError(f"{where} shards one dimension over both data-parallel and other mesh "
                            f"axes ({names}); map them to different logical axes in the rules")
        out.append(manual[0] if len(manual) == 1 else (manual or None))
    return PartitionSpec(*out)


def _split_dims(spec: PartitionSpec) -> list[tuple[int, tuple[str, ...]]]:
    """The dimensions of `spec` split over data-parallel axes, with those axes."""
    return [(dim, axes) for dim, d in enumerate(spec)
            if (axes := tuple(a for a in ((d,) if isinstance(d, str) else d or ()) if a in DP_AXES))]


def _unstack(whole: jax.Array, shape: tuple[int, ...], dim: int) -> jax.Array:
    """[devices, *shape] gathered shards -> the array they split along `dim`."""
    return jnp.moveaxis(whole.reshape(-1, *shape), 0, dim).reshape(
        *shape[:dim], -1, *shape[dim + 1:])


def _gather_all(xs: list[jax.Array], specs: list[PartitionSpec],
                flat: bool) -> list[jax.Array]:
    """All-gather each `x` over the data-parallel axes in its spec (`pipeline` stays split).

    With `flat`, shards gathered over the same axes travel as one flat buffer: one all-gather
    for all of them (and one reduce-scatter for their gradients) instead of one per parameter,
    like the flat parameters of PyTorch FSDP; each is gathered along a new leading axis and
    moved into place, which XLA:CPU does several times faster than gathering along an inner
    dimension. Without `flat` (where other mesh axes, e.g. `tensor`, split the shards, which
    flattening would gather over them too) each is gathered along its own dimension.
    """
    out = list(xs)
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, (x, spec) in enumerate(zip(xs, specs, strict=True)):
        split = _split_dims(spec)
        if len(split) == 1:
            groups.setdefault((split[0][1], x.dtype), []).append((i, split[0][0]))
        for dim, axes in split if len(split) > 1 else ():  # rare: gathered on its own
            out[i] = _unstack(jax.lax.all_gather(out[i], axes), out[i].shape, dim)
    for (axes, _), members in groups.items():
        if not flat:  # as gathered before flat buffers (other mesh axes split the array)
            for i, dim in members:
                out[i] = jax.lax.all_gather(xs[i], axes, axis=dim, tiled=True)
            continue
        whole = jax.lax.all_gather(jnp.concatenate([xs[i].reshape(-1) for i, _ in members]),
                                   axes)  # [devices, flat]
        sizes = [xs[i].size for i, _ in members]
        pieces = jnp.split(whole, list(itertools.accumulate(sizes))[:-1], axis=1)
        for (i, dim), piece in zip(members, pieces, strict=True):
            out[i] = _unstack(piece, xs[i].shape, dim)
    return out


def _not_gathered(prim, *_, **__) -> bool:
    """Remat policy: save everything but gathered parameters (and their aliases and casts)."""
    return prim.name not in ("all_gather", "pvary", "pcast", "name", "reshape", "split", "transpose",
                             "convert_element_type")


def _keys(path) -> list[str]:
    return [str(k.key) for k in path if hasattr(k, "key")]


def _block_part(path) -> str:
    """The path inside its stacked-blocks subtree ("attn/wq"), or "" outside any."""
    keys = _keys(path)
    return "/".join(keys[keys.index("blocks") + 1:]) if "blocks" in keys else ""


def _layer_specs(manual, stacked_dims: int) -> dict[frozenset, dict[str, PartitionSpec]]:
    """One layer's specs for each stacked-blocks subtree (`blocks` anywhere in the tree), keyed by
    the set of its parameter names, which is how `regathered_block` recognises a layer."""
    groups: dict[tuple, dict[str, PartitionSpec]] = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(
            manual, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]:
        if name := _block_part(path):
            keys = _keys(path)
            groups.setdefault(tuple(keys[:keys.index("blocks")]), {})[name] = PartitionSpec(
                *spec[stacked_dims:])
    out: dict[frozenset, dict[str, PartitionSpec]] = {}
    for specs in groups.values():
        key = frozenset(specs)
        if out.setdefault(key, specs) != specs:
            raise ValueError(f"two stacked-block subtrees with the parameters {sorted(key)} are laid "
                             f"out differently; rename one of them")
    return out


def _vocab_slice(x: jax.Array, spec: PartitionSpec, vocab_dim: int,
                 axes: tuple[str, ...]) -> jax.Array:
    """This device's slice of a table's vocabulary over `axes`, from its stored shard."""
    ((dim, _),) = _split_dims(spec)
    return x if dim == vocab_dim else jax.lax.all_to_all(x, axes, vocab_dim, dim, tiled=True)


def _in_order(full, params, batch, layout: Layout):
    """`full` (`params` after the gathers and exchanges) and `batch`, ordered on a CPU mesh
    (`sharding.in_order`): the batch (whose tokens the model may gather) and the blocks'
    shards left for the layer loops to gather wait for those collectives, and in the backward
    pass their reduce-scatters wait for the loops'."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(full)
    moved = [i for i, ((_, x), raw) in enumerate(zip(flat, jax.tree.leaves(params), strict=True))
             if x is not raw]
    blocks = [i for i, (p, _) in enumerate(flat) if _block_part(p) and i not in moved]
    first, (batch, later) = in_order([flat[i][1] for i in moved],
                                     (batch, [flat[i][1] for i in blocks]), layout)
    leaves = [x for _, x in flat]
    for i, x in zip(moved + blocks, first + later, strict=True):
        leaves[i] = x
    return treedef.unflatten(leaves), batch


def data_parallel_loss(graphdef: nnx.GraphDef, layout: Layout, param_specs, *, regather: bool,
                       model_loss: Callable = loss_sums, stacked_dims: int = 1,
                       vocab_tables: dict[str, int] | None = None) -> Callable:
    """`loss_sums` of the model, run manual over the data-parallel axes.

    Returns `loss(params, batch) -> (loss_sum, count)`, the global sums, differentiable in
    `params`. `param_specs` are the stored layouts of the parameters: their data-parallel parts
    decide what is gathered. The batch's leading dimension is split over the data-parallel axes.
    With `regather`, each block's parameters are gathered inside the block and gathered again in
    the backward pass instead of being kept (`blocks` are stacked: their first `stacked_dims`
    axes index layers). With a `pipeline` axis, it is manual too and `model_loss` (`loss_sums` or
    a pipeline schedule's loss, see `pipeline.py`) returns the same sums on every stage.
    `vocab_tables` maps top-level parameters to their vocabulary dimension; when all of them are
    sharded over the same data-parallel axes (FSDP, ZeRO-2/3) and only those, and the tokens of
    the devices along them are fewer than the vocabulary, `model_loss` gets their vocabulary
    slices and `vocab_axes` (a decoder's `loss_sums`) instead of gathering them.
    """
    axes = dp_axes(layout)
    manual_axes = axes + (("pipeline",) if layout.mesh.shape["pipeline"] > 1 else ())
    if not manual_axes:
        return functools.partial(model_loss, graphdef)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    manual = jax.tree.map(lambda s: _manual_part(s, manual_axes, "a parameter rule"),
                          param_specs, is_leaf=is_spec)
    # flat buffers only where no other mesh axis splits the parameters (see `_gather_all`)
    flat_buffers = all(n == 1 for a, n in layout.mesh.shape.items() if a not in manual_axes)

    def varying(x):
        # Mark the full-precision value as varying here, so the gradient's psum over the
        # replicated axes happens in the parameter dtype (not in a bf16 compute copy).
        missing = tuple(a for a in manual_axes if a not in jax.typeof(x).manual_axis_type.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    def vocab_axes(tree, tokens: int) -> tuple[str, ...]:
        """The axes all vocabulary tables are split over (and nothing else splits their
        vocabulary), or () to gather them like any parameter: also when the `tokens` gathered
        over those axes outnumber the vocabulary (moving them would cost more)."""
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        specs = jax.tree.leaves(manual, is_leaf=is_spec)
        full = jax.tree.leaves(param_specs, is_leaf=is_spec)
        found = set()
        for (path, x), spec, stored in zip(flat, specs, full, strict=True):
            keys = _keys(path)
            if len(keys) != 1 or keys[0] not in (vocab_tables or {}):
                continue
            vocab_dim, split = vocab_tables[keys[0]], _split_dims(spec)
            if len(split) != 1 or (stored[vocab_dim] if vocab_dim < len(stored) else None) not in (
                    None, spec[split[0][0]]):
                return ()
            (dim, axes), n = split[0], layout.size(split[0][1])
            vocab = x.shape[vocab_dim] * (n if dim == vocab_dim else 1)
            if vocab % n or tokens * n > vocab:
                return ()
            found.add(axes)
        return found.pop() if len(found) == 1 else ()

    def gather_tree(tree, specs, skip_blocks: bool = False, vocab: tuple[str, ...] = ()):
        """Gather every leaf (with `skip_blocks`: those outside stacked-block subtrees; with
        `vocab`: the vocabulary tables are cut into vocabulary slices instead), not yet
        `varying`."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        specs = jax.tree.leaves(specs, is_leaf=is_spec)
        out = [x for _, x in flat]
        todo = []
        for i, ((p, x), s) in enumerate(zip(flat, specs, strict=True)):
            keys = _keys(p)
            if vocab and len(keys) == 1 and keys[0] in vocab_tables:
                out[i] = _vocab_slice(x, s, vocab_tables[keys[0]], vocab)
            elif not (skip_blocks and _block_part(p)):
                todo.append(i)
        gathered = _gather_all([out[i] for i in todo], [specs[i] for i in todo],
                               flat_buffers)
        for i, x in zip(todo, gathered, strict=True):
            out[i] = x
        return treedef.unflatten(out)

    layer_specs = _layer_specs(manual, stacked_dims)

    def regathered_block(block, *args):
        block_graph, shards = nnx.split(block)
        flat, treedef = jax.tree_util.tree_flatten_with_path(shards)
        names = ["/".join(_keys(p)) for p, _ in flat]
        specs = layer_specs[frozenset(names)]

        def run(shards, *args):
            gathered = _gather_all(jax.tree.leaves(shards), [specs[n] for n in names],
                                   flat_buffers)
            full = treedef.unflatten([varying(x) for x in gathered])
            return nnx.merge(block_graph, full)(*args)

        return jax.checkpoint(run, policy=_not_gathered)(shards, *args)

    def local(params, batch):
        vocab = vocab_axes(params, batch["inputs"].size) if vocab_tables else ()
        kwargs = {"vocab_axes": vocab} if vocab else {}
        full = gather_tree(params, manual, skip_blocks=regather, vocab=vocab)
        full, batch = _in_order(full, params, batch, layout)
        full = jax.tree_util.tree_map_with_path(
            lambda p, x: x if regather and _block_part(p) else varying(x), full)
        if regather:
            kwargs["apply_block"] = regathered_block
        loss_sum, count = model_loss(graphdef, full, batch, **kwargs)
        if axes:  # one all-reduce, after the loss (the count alone would not wait for it)
            loss_sum, count = jax.lax.psum((loss_sum, count), axes)
        return loss_sum, count

    def wrapped(params, batch):
        batch_specs = jax.tree.map(lambda _: PartitionSpec(axes or None), batch)
        fn = jax.shard_map(local, mesh=layout.mesh, in_specs=(manual, batch_specs),
                           out_specs=(PartitionSpec(), PartitionSpec()),
                           axis_names=set(manual_axes))
        return fn(params, batch)

    return wrapped
