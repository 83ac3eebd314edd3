"""Data parallelism over the `data` and `fsdp` mesh axes: the batch split, gradients all-reduced.

What it shards: the batch's leading dimension over `data` x `fsdp` (both are data parallel; `fsdp`
also shards parameters, see `zero.py`). Parameters replicated over those axes stay whole.

Formulation: the loss runs inside `jax.shard_map`, manual over the data-parallel axes (and
`pipeline`, whose schedules are written out too) and automatic over the rest (`tensor`, ...), so
the communication is written in the program rather than left to partitioner passes, which differ
by backend (XLA:CPU never forms reduce-scatters; GPU and TPU do). Every backend then compiles
the same collectives: a replicated parameter is marked varying before use (`vary`), so
shard_map's transpose all-reduces its gradient in the parameter dtype; the loss and token count
are summed with one all-reduce of two scalars.

Collectives per step: one all-reduce of the gradients of every parameter not sharded over the
data-parallel axes (2 (N-1)/N x its bytes per device in a ring), plus the two scalars.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from jaxscale.errors import UserError
from jaxscale.sharding import Layout, Rules, as_tuple

AXES = ("data", "fsdp")
RULES: Rules = (("batch", AXES),)


def dp_axes(layout: Layout) -> tuple[str, ...]:
    """The data-parallel axes of the layout's mesh that have more than one device."""
    return tuple(a for a in AXES if layout.mesh.shape[a] > 1)


def manual_part(spec: PartitionSpec, axes: tuple[str, ...], where: str) -> PartitionSpec:
    """The part of `spec` over the manual `axes` (what `shard_map` splits)."""
    out = []
    for d in spec:
        names = as_tuple(d)
        manual = tuple(a for a in names if a in axes)
        if manual and len(manual) != len(names):
            raise UserError(f"{where} shards one dimension over both data-parallel and other mesh "
                            f"axes ({names}); map them to different logical axes in the rules")
        out.append(manual[0] if len(manual) == 1 else (manual or None))
    return PartitionSpec(*out)


def split_dims(spec: PartitionSpec) -> list[tuple[int, tuple[str, ...]]]:
    """The dimensions of `spec` split over data-parallel axes, with those axes."""
    return [(dim, axes) for dim, d in enumerate(spec)
            if (axes := tuple(a for a in as_tuple(d) if a in AXES))]


def vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """`x` marked varying over the manual `axes` it is not varying over yet, so its gradient is
    all-reduced over them in its own (parameter) dtype, not in a low-precision compute copy."""
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


class DataParallelLoss:
    """`loss(params, batch) -> (loss_sum, count, stats)`, the global sums (MoE stats: see
    `models.moe.router_losses`), differentiable in `params`.

    `local_loss(params, batch)` runs on each device's shard of the batch (split over the
    `batch_axes`: the data-parallel axes, and `expert` under expert parallelism) with the
    parameters as `manual_specs` split them over `manual_axes`; its sums are added over the
    `batch_axes` and the `token_axes` (`context`, over which the model splits each row's tokens).

    With a `replica_axis` (DiLoCo, `diloco.py`), `params` are stacked over its replicas (a leading
    dimension split over it): each replica's loss and token sums come out apart, `[replicas]`,
    and its gradients are its own (nothing is all-reduced over that axis but the stats).
    """

    def __init__(self, local_loss: Callable, layout: Layout, manual_specs,
                 manual_axes: tuple[str, ...], batch_axes: tuple[str, ...],
                 token_axes: tuple[str, ...] = (), replica_axis: str | None = None):
        self.local_loss, self.layout = local_loss, layout
        self.manual_specs, self.manual_axes, self.axes = manual_specs, manual_axes, batch_axes
        self.summed, self.replica_axis = batch_axes + token_axes, replica_axis

    def __call__(self, params, batch):
        batch_specs = jax.tree.map(lambda _: PartitionSpec(self.axes or None), batch)
        param_specs, sums = self.manual_specs, PartitionSpec()
        if self.replica_axis:
            param_specs = jax.tree.map(lambda s: PartitionSpec(self.replica_axis, *s), param_specs,
                                       is_leaf=lambda x: isinstance(x, PartitionSpec))
            sums = PartitionSpec(self.replica_axis)
        return jax.shard_map(self._summed, mesh=self.layout.mesh,
                             in_specs=(param_specs, batch_specs),
                             out_specs=(sums, sums, PartitionSpec()),
                             axis_names=set(self.manual_axes))(params, batch)

    def _summed(self, params, batch):
        if self.replica_axis:
            return self._replica_sums(jax.tree.map(lambda p: p[0], params), batch)
        sums = self.local_loss(params, batch)
        if self.summed:  # one all-reduce, after the loss (the count alone would not wait for it)
            sums = jax.lax.psum(sums, self.summed)
        return sums

    def _replica_sums(self, params, batch):
        loss_sum, count, stats = self.local_loss(params, batch)
        within = tuple(a for a in self.summed if a != self.replica_axis)
        if within:
            loss_sum, count = jax.lax.psum((loss_sum, count), within)
        return loss_sum[None], count[None], jax.lax.psum(stats, self.summed)
