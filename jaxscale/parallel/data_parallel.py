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
  step and keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.sharding import Layout
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


def _gather(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    """All-gather `x` over the data-parallel axes in its spec (`pipeline` stays split)."""
    for dim, axes in enumerate(spec):
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in DP_AXES)
        if axes:
            x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
    return x


def _not_gathered(prim, *_, **__) -> bool:
    """Remat policy: save everything but gathered parameters (and their aliases and casts)."""
    return prim.name not in ("all_gather", "pvary", "pcast", "name", "reshape", "convert_element_type")


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


def data_parallel_loss(graphdef: nnx.GraphDef, layout: Layout, param_specs, *, regather: bool,
                       model_loss: Callable = loss_sums, stacked_dims: int = 1) -> Callable:
    """`loss_sums` of the model, run manual over the data-parallel axes.

    Returns `loss(params, batch) -> (loss_sum, count)`, the global sums, differentiable in
    `params`. `param_specs` are the stored layouts of the parameters: their data-parallel parts
    decide what is gathered. The batch's leading dimension is split over the data-parallel axes.
    With `regather`, each block's parameters are gathered inside the block and gathered again in
    the backward pass instead of being kept (`blocks` are stacked: their first `stacked_dims`
    axes index layers). With a `pipeline` axis, it is manual too and `model_loss` (`loss_sums` or
    a pipeline schedule's loss, see `pipeline.py`) returns the same sums on every stage.
    """
    axes = dp_axes(layout)
    manual_axes = axes + (("pipeline",) if layout.mesh.shape["pipeline"] > 1 else ())
    if not manual_axes:
        return partial(model_loss, graphdef)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    manual = jax.tree.map(lambda s: _manual_part(s, manual_axes, "a parameter rule"),
                          param_specs, is_leaf=is_spec)

    def gather(x, spec):
        x = _gather(x, spec)
        # Mark the full-precision value as varying here, so the gradient's psum over the
        # replicated axes happens in the parameter dtype (not in a bf16 compute copy).
        varying = jax.typeof(x).manual_axis_type.varying
        missing = tuple(a for a in manual_axes if a not in varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    def gather_tree(tree, specs, skip_blocks: bool = False):
        """Gather every leaf (with `skip_blocks`: those outside stacked-block subtrees)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        specs = jax.tree.leaves(specs, is_leaf=is_spec)
        return treedef.unflatten([x if skip_blocks and _block_part(p) else gather(x, s)
                                  for (p, x), s in zip(flat, specs, strict=True)])

    layer_specs = _layer_specs(manual, stacked_dims)

    def regathered_block(block, *args):
        block_graph, shards = nnx.split(block)
        flat, treedef = jax.tree_util.tree_flatten_with_path(shards)
        names = ["/".join(_keys(p)) for p, _ in flat]
        specs = layer_specs[frozenset(names)]

        def run(shards, *args):
            full = treedef.unflatten([gather(x, specs[n]) for x, n in
                                      zip(jax.tree.leaves(shards), names, strict=True)])
            return nnx.merge(block_graph, full)(*args)

        return jax.checkpoint(run, policy=_not_gathered)(shards, *args)

    def local(params, batch):
        if regather:
            full = gather_tree(params, manual, skip_blocks=True)
            loss_sum, count = model_loss(graphdef, full, batch, apply_block=regathered_block)
        else:
            loss_sum, count = model_loss(graphdef, gather_tree(params, manual), batch)
        if axes:
            loss_sum, count = jax.lax.psum(loss_sum, axes), jax.lax.psum(count, axes)
        return loss_sum, count

    def wrapped(params, batch):
        batch_specs = jax.tree.map(lambda _: PartitionSpec(axes or None), batch)
        fn = jax.shard_map(local, mesh=layout.mesh, in_specs=(manual, batch_specs),
                           out_specs=(PartitionSpec(), PartitionSpec()),
                           axis_names=set(manual_axes))
        return fn(params, batch)

    return wrapped
