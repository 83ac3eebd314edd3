"""Logical axis names -> mesh axes: how a layout turns names into `PartitionSpec`s.

Models name the axes of every parameter (`nnx.Param(..., logical_axes=("embed", "mlp"))`) and call
`constrain(x, ("batch", "seq", "embed"))` on activations, or `per_shard` for a kernel that runs on
each device's part of its arguments. `Layout` holds a mesh and a rules table
and turns those names into `PartitionSpec`s. Each rule maps a logical name to a mesh axis, a tuple
of mesh axes, or None. Within one array a mesh axis is used at most once: a dimension whose axes
are already taken by an earlier dimension stays unsharded (so the activation `("batch", "seq",
"embed")` is not sharded over `fsdp` twice under the parameter rule `embed -> fsdp`). Which
names go to which mesh axes is each strategy's business (`jaxscale/parallel/`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.errors import UserError

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Every logical axis the models name. Each strategy in `jaxscale/parallel/` maps some of them onto
# its mesh axis (`parallel.DEFAULT_RULES` joins them); here they are all unsharded.
LOGICAL_AXES = (
    "batch",
    "layers",  # the stacked-blocks axis of a decoder
    "encoder_layers",  # the stacked-blocks axis of an encoder (not pipelined)
    "vocab",
    "embed",
    "mlp",
    "experts",  # the experts of an MoE layer
    "heads",
    "kv_heads",
    "head_dim",
    "positions",  # rows of a learned position-embedding table
    "patch",  # a flattened image patch (pixels x channels)
    "seq",
    "res_seq",  # the residual stream's sequence
    "lora_rank",  # the rank of a low-rank adapter (models/lora.py)
    "quant_groups",  # the input groups of a quantized weight's scales (QLoRA's base, models/lora.py)
)
UNSHARDED: Rules = tuple((name, None) for name in LOGICAL_AXES)


def merge_rules(base: Rules, overrides: Sequence[Sequence]) -> Rules:
    """Rules with `overrides` replacing (or adding) the entries of the same logical names."""
    over = {}
    for item in overrides:
        if len(item) != 2 or not isinstance(item[0], str):
            raise UserError(f"axis rule {tuple(item)!r} must be (logical_name, mesh_axes)")
        axes = item[1]
        over[item[0]] = tuple(axes) if isinstance(axes, list | tuple) else axes
    out = [(name, over.pop(name, axes)) for name, axes in base]
    return tuple(out) + tuple(over.items())


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus logical-axis rules."""

    mesh: Mesh
    rules: Rules = UNSHARDED

    def __post_init__(self) -> None:
        axes = set(self.mesh.axis_names)
        for name, target in self.rules:
            for a in as_tuple(target):
                if a not in axes:
                    raise UserError(f"axis rule ({name!r}, {target!r}) names mesh axis {a!r}; "
                                    f"the mesh has {', '.join(self.mesh.axis_names)}")

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None,
             where: str = "array") -> PartitionSpec:
        """PartitionSpec for an array whose dims carry `names`.

        With `shape`, a dimension that its mesh axes do not divide raises `UserError` naming
        `where`; without it no check is made.
        """
        table = dict(self.rules)
        used: set[str] = set()
        out = []
        for i, name in enumerate(names):
            if name is not None and name not in table:
                raise UserError(f"{where}: logical axis {name!r} has no rule; add "
                                f"({name!r}, <mesh axes or None>) to parallel.rules")
            axes = tuple(a for a in as_tuple(table.get(name)) if self.mesh.shape[a] > 1)
            if any(a in used for a in axes):
                axes = ()
            if shape is not None and axes and shape[i] % self.size(axes):
                raise UserError(
                    f"{where}: dimension {i} ({name}={shape[i]}) is not divisible by mesh axes "
                    f"{'x'.join(axes)}={self.size(axes)}; change the model size or the mesh")
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else (axes or None))
        return PartitionSpec(*out)

    def size(self, axes: Sequence[str]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def param_specs(self, tree, adjust: Callable[..., PartitionSpec] | None = None):
        """Specs for a tree of `nnx.Variable`s (params, or optimizer state mirroring them).

        Variables use their `logical_axes` metadata; other leaves (step counters) are replicated.
        `adjust(spec, shape, names)` may change each variable's spec (a strategy's extra sharding).
        Block scales (metadata `block_scales=(n, b)`: one per `b` values along an array's last
        axis of `n`, as 8-bit optimizer moments keep) take that array's spec, their last axis
        split as its last axis only where every shard holds whole blocks (else kept whole).
        """

        def one(path, leaf):
            if not isinstance(leaf, nnx.Variable):
                return PartitionSpec()
            names = leaf.get_metadata().get("logical_axes")
            where = "parameter " + jax.tree_util.keystr(path, simple=True, separator="/")
            if names is None or len(names) != leaf.ndim:
                raise ValueError(f"{where} of shape {leaf.shape} has logical_axes={names!r}")
            blocks = leaf.get_metadata().get("block_scales")
            shape = (*leaf.shape[:-1], blocks[0]) if blocks else leaf.shape
            spec = self.spec(names, shape, where)
            spec = adjust(spec, shape, names) if adjust else spec
            if blocks:  # shards holding parts of blocks: the scales' block axis stays whole
                dims = list(spec) + [None] * (len(shape) - len(spec))
                if dims[-1] and blocks[0] // self.size(as_tuple(dims[-1])) % blocks[1]:
                    dims[-1] = None
                spec = PartitionSpec(*dims)
            return spec

        return jax.tree.map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def shardings(self, specs):
        return jax.tree.map(self.sharding, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, list | tuple) else (axes,)


def bytes_per_device(specs, shapes, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of arrays with these specs (works for abstract meshes too)."""
    total = 0
    for spec, s in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
                       jax.tree.leaves(shapes), strict=True):
        shard = list(s.shape)
        for i, axes in enumerate(spec):
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                shard[i] = -(-shard[i] // mesh_shape[a])
        total += int(np.prod(shard)) * jnp.dtype(s.dtype).itemsize
    return total


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


@contextlib.contextmanager
def use_layout(layout: Layout) -> Iterator[Layout]:
    """Make `layout.mesh` the current mesh and `constrain` apply `layout` inside this block."""
    token = _ACTIVE.set(layout)
    try:
        with jax.set_mesh(layout.mesh):
            yield layout
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside `use_layout`.

    Mesh axes that do not divide a dimension (a batch of 1 at decode time) are left out.
    """
    layout = _ACTIVE.get()
    if layout is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    spec = _auto_spec(layout, mesh, names, x.shape)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(layout.mesh if mesh.empty else mesh, spec))


def _auto_spec(layout: Layout, mesh, names: Sequence[str | None],
               shape: Sequence[int]) -> PartitionSpec:
    """`layout.spec(names)` without the mesh axes already manual and those that do not divide
    their dimension of `shape`."""
    manual = set(mesh.manual_axes) if not mesh.empty else set()
    dims = []
    for i, d in enumerate(layout.spec(names)):
        axes = tuple(a for a in as_tuple(d) if a not in manual)
        ok = axes and shape[i] % layout.size(axes) == 0
        dims.append((axes[0] if len(axes) == 1 else axes) if ok else None)
    return PartitionSpec(*dims)


def platform() -> str:
    """The platform of the devices the program being traced is for: the active layout's (a TPU
    topology compiled for on any host is "tpu"), else JAX's default backend."""
    layout = _ACTIVE.get()
    return layout.mesh.devices.flat[0].platform if layout else jax.default_backend()


def parts(name: str, size: int) -> int:
    """Into how many parts the active layout splits a dimension `name` of `size` over mesh axes
    not yet manual (1 outside `use_layout`, or where those axes do not divide it)."""
    layout = _ACTIVE.get()
    if layout is None:
        return 1
    spec = _auto_spec(layout, jax.sharding.get_abstract_mesh(), (name,), (size,))
    return layout.size(as_tuple(spec[0]))


def per_shard(f: Callable, in_names: Sequence[Sequence[str | None]],
              out_names: Sequence[Sequence[str | None]]) -> Callable:
    """`f` run on each device's part of its array arguments, as the active layout splits their
    logical axes `in_names` (one tuple per argument; None: held whole) over the mesh axes not yet
    manual: a `jax.shard_map` manual over every mesh axis, for kernels the partitioner cannot
    split (Pallas's, which Mosaic lowers only where every axis is manual). `f` returns a tuple,
    each output split as its `out_names` say (a name as the arguments' dimension of that name),
    typed as varying over the manual axes the arguments vary over. Differentiate around it, not
    through it (`jax.custom_vjp` with a `per_shard` forward and backward): inside a region
    already manual over the batch's axes a Pallas kernel's outputs do not name those axes in
    their types, which its backward pass rejects. Outside `use_layout`, `f` itself."""

    def run(*args: jax.Array) -> tuple[jax.Array, ...]:
        layout = _ACTIVE.get()
        if layout is None:
            return f(*args)
        mesh = jax.sharding.get_abstract_mesh()
        specs = [_auto_spec(layout, mesh, names, a.shape)
                 for names, a in zip(in_names, args, strict=True)]
        split = {n: d for names, spec in zip(in_names, specs, strict=True)
                 for n, d in zip(names, spec, strict=True) if n is not None}
        axes = set(mesh.axis_names) - set(mesh.manual_axes)  # Mosaic kernels: all manual
        outs = tuple(PartitionSpec(*(split.get(n) for n in names)) for names in out_names)
        out = jax.shard_map(f, mesh=mesh, in_specs=tuple(specs), out_specs=outs,
                            axis_names=axes, check_vma=False)(*args)
        varying = set().union(*(_varying(x) for x in args))
        return tuple(jax.lax.pcast(x, tuple(varying - _varying(x)), to="varying") for x in out)

    return run


def _varying(x: jax.Array) -> frozenset[str]:
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def gather_batch(x: jax.Array) -> tuple[jax.Array, jax.Array | int]:
    """The whole global batch of `x` and the index of this shard's first row in it.

    Inside a region manual over the batch's axes (`data`, `fsdp`, `expert`), `x` is this device's
    rows: they are all-gathered in the order the batch was split. Elsewhere `x` is whole.
    For losses that couple examples (contrastive), so they match one device's.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in ("data", "fsdp", "expert")
                                        if a in mesh.manual_axes and mesh.shape[a] > 1)
    if not axes:
        return x, 0
    shard = 0
    for a in axes:
        shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
    return jax.lax.all_gather(x, axes, axis=0, tiled=True), shard * x.shape[0]
