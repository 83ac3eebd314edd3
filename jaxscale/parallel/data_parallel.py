"""Data parallelism with explicit collectives: DP, ZeRO-1/2/3 and FSDP.

The loss runs inside `jax.shard_map`, manual over the data-parallel mesh axes (`data`, `fsdp`)
and automatic over the rest (`tensor`, ...), so the communication of data parallelism is written
out rather than left to backend passes (which differ: CPU XLA never forms reduce-scatters):

- a parameter sharded over data-parallel axes is `all_gather`ed inside; `jax.grad` turns each
  gather into a `psum_scatter` (reduce-scatter) of its gradient;
- a parameter replicated over a data-parallel axis gets its gradient `psum`med (all-reduce) over
  it, from shard_map's transpose;
- `regather=True` (FSDP / ZeRO-3) rematerialises each gather in the backward pass, so gathered
  parameters are freed after their use in the forward; `regather=False` (ZeRO-2) keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.sharding import Layout

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
    for dim, axes in enumerate(spec):
        if axes:
            x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
    return x


def data_parallel_loss(loss_fn: Callable, layout: Layout, param_specs,
                       *, regather: bool) -> Callable:
    """Wrap `loss_fn(params, batch) -> (loss_sum, count)` to run manual over data-parallel axes.

    `param_specs` are the stored layouts of the parameters; their data-parallel parts decide what
    is gathered. The batch's leading dimension is split over the data-parallel axes. Sums are
    `psum`med, so the result is the global `(loss_sum, count)`. Differentiable in `params`.
    """
    axes = dp_axes(layout)
    if not axes:
        return loss_fn
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    manual = jax.tree.map(lambda s: _manual_part(s, axes, "a parameter rule"), param_specs,
                          is_leaf=is_spec)
    manual_leaves = jax.tree.leaves(manual, is_leaf=is_spec)
    batch_spec = PartitionSpec(axes)

    def gather(x, spec):
        fn = partial(_gather, spec=spec)
        x = jax.checkpoint(fn)(x) if regather and any(spec) else fn(x)
        # Mark the full-precision value as varying here, so the gradient's psum over the
        # replicated axes happens in the parameter dtype (not in a bf16 compute copy).
        # (Inputs vary over the axes of their spec, and stay varying through `all_gather`.)
        sharded = {a for d in spec for a in ((d,) if isinstance(d, str) else d or ())}
        missing = tuple(a for a in axes if a not in sharded)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    def local(params, batch):
        leaves, treedef = jax.tree.flatten(params)
        full = treedef.unflatten([gather(x, s) for x, s in zip(leaves, manual_leaves,
                                                                 strict=True)])
        loss_sum, count = loss_fn(full, batch)
        return jax.lax.psum(loss_sum, axes), jax.lax.psum(count, axes)

    def wrapped(params, batch):
        batch_specs = jax.tree.map(lambda _: batch_spec, batch)
        fn = jax.shard_map(local, mesh=layout.mesh, in_specs=(manual, batch_specs),
                           out_specs=(PartitionSpec(), PartitionSpec()), axis_names=set(axes))
        return fn(params, batch)

    return wrapped
