"""Logical axis names -> mesh axes: the one place that decides how arrays are laid out.

Models name the axes of every parameter (`nnx.Param(..., logical_axes=("embed", "mlp"))`) and call
`constrain(x, ("batch", "seq", "embed"))` on activations. `Layout` holds a mesh and a rules table
and turns those names into `PartitionSpec`s. Each rule maps a logical name to a mesh axis, a tuple
of mesh axes, or None. Within one array a mesh axis is used at most once: a dimension whose axes
are already taken by an earlier dimension stays unsharded (so the activation `("batch", "seq",
"embed")` is not sharded over `fsdp` twice under the parameter rule `embed -> fsdp`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxscale.errors import UserError

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("layers", None),  # the stacked-blocks axis: `pipeline` under pipeline parallelism
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # parameters: ZeRO-3 / FSDP over `fsdp`
    ("mlp", "tensor"),  # Megatron column-parallel in, row-parallel out
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("positions", None),  # rows of a learned position-embedding table
    ("patch", None),  # a flattened image patch (pixels x channels)
    ("seq", None),
    ("res_seq", None),  # the residual stream's sequence: `tensor` under sequence parallelism
)
SEQUENCE_PARALLEL_RULES: Rules = (("res_seq", "tensor"),)
PIPELINE_RULES: Rules = (("layers", "pipeline"),)


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
    """A mesh plus logical-axis rules, with the ZeRO stage that adds sharding over `data`."""

    mesh: Mesh
    rules: Rules = DEFAULT_RULES
    zero_stage: int = 0

    def __post_init__(self) -> None:
        axes = set(self.mesh.axis_names)
        for name, target in self.rules:
            for a in _as_tuple(target):
                if a not in axes:
                    raise UserError(f"axis rule ({name!r}, {target!r}) names mesh axis {a!r}; "
                                    f"the mesh has {', '.join(self.mesh.axis_names)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"parallel.zero_stage={self.zero_stage} is invalid; use 0, 1, 2 or 3")

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
            axes = tuple(a for a in _as_tuple(table.get(name)) if self.mesh.shape[a] > 1)
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

    def zero_spec(self, spec: PartitionSpec, shape: Sequence[int],
                  names: Sequence[str | None] = ()) -> PartitionSpec:
        """`spec` with `data` added to the first dimension it divides (ZeRO over data parallel),
        a `vocab` dimension before the others.

        Only dimensions that are unsharded or sharded over `fsdp` alone are candidates, so data
        parallel and model parallel axes never share a dimension, and never the `layers` axis of
        stacked blocks (which are run one layer at a time). Arrays too small to split stay as
        they were (their size is negligible).
        """
        n = self.mesh.shape["data"]
        dims = list(spec) + [None] * (len(shape) - len(spec))
        if n == 1 or any("data" in _as_tuple(d) for d in dims):
            return spec
        # a table's vocabulary first (see `vocab_split`)
        order = sorted(range(len(dims)), key=lambda i: not (i < len(names) and names[i] == "vocab"))
        for i in order:
            d = dims[i]
            if i < len(names) and names[i] == "layers":
                continue
            if set(_as_tuple(d)) <= {"fsdp"} and shape[i] % (self.size(_as_tuple(d)) * n) == 0:
                dims[i] = _as_tuple(d) + ("data",) if d else "data"
                return PartitionSpec(*dims)
        return spec

    def vocab_split(self, spec: PartitionSpec, shape: Sequence[int],
                    names: Sequence[str | None]) -> PartitionSpec:
        """A vocabulary table's `fsdp` split moved onto its `vocab` dimension where the rules
        leave that unsplit, so data parallelism can keep the table split by vocabulary (see
        `parallel/data_parallel.py`) without first exchanging its shards."""
        if "vocab" not in names:
            return spec
        dims = list(spec) + [None] * (len(shape) - len(spec))
        v = list(names).index("vocab")
        for i, d in enumerate(dims):
            if (i != v and _as_tuple(d) == ("fsdp",) and dims[v] is None
                    and shape[v] % self.mesh.shape["fsdp"] == 0):
                dims[i], dims[v] = None, d
        return PartitionSpec(*dims)

    def param_specs(self, tree, *, zero_from_stage: int = 4):
        """Specs for a tree of `nnx.Variable`s (params, or optimizer state mirroring them).

        Variables use their `logical_axes` metadata; other leaves (step counters) are replicated.
        When `zero_stage >= zero_from_stage` the spec gains the `data` axis (`zero_spec`).
        """

        def one(path, leaf):
            if not isinstance(leaf, nnx.Variable):
                return PartitionSpec()
            names = leaf.get_metadata().get("logical_axes")
            where = "parameter " + jax.tree_util.keystr(path, simple=True, separator="/")
            if names is None or len(names) != leaf.ndim:
                raise ValueError(f"{where} of shape {leaf.shape} has logical_axes={names!r}")
            s = self.vocab_split(self.spec(names, leaf.shape, where), leaf.shape, names)
            return self.zero_spec(s, leaf.shape, names) if self.zero_stage >= zero_from_stage else s

        return jax.tree.map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def shardings(self, specs):
        return jax.tree.map(self.sharding, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, list | tuple) else (axes,)


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
    manual = set(mesh.manual_axes) if not mesh.empty else set()
    dims = []
    for i, d in enumerate(layout.spec(names)):
        axes = tuple(a for a in _as_tuple(d) if a not in manual)
        ok = axes and x.shape[i] % layout.size(axes) == 0
        dims.append((axes[0] if len(axes) == 1 else axes) if ok else None)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(layout.mesh if mesh.empty else mesh, PartitionSpec(*dims)))


def gather_batch(x: jax.Array) -> tuple[jax.Array, jax.Array | int]:
    """The whole global batch of `x` and the index of this shard's first row in it.

    Inside a region manual over the data-parallel axes (`data`, `fsdp`: the batch's), `x` is this
    device's rows: they are all-gathered in the order the batch was split. Elsewhere `x` is whole.
    For losses that couple examples (contrastive), so they match one device's.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in ("data", "fsdp")
                                        if a in mesh.manual_axes and mesh.shape[a] > 1)
    if not axes:
        return x, 0
    shard = 0
    for a in axes:
        shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
    return jax.lax.all_gather(x, axes, axis=0, tiled=True), shard * x.shape[0]


def _varying(x) -> frozenset:
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def _wait(tree, deps):
    """`tree` made to wait for `deps` through a data dependency, which no pass drops. A leaf
    waits for the dependencies that vary over no manual axes it does not (so its type stays);
    float0 leaves (integers' cotangents) stay."""
    # false, NaN or not, from one element of each dependency: nothing XLA folds away
    flags = [(_varying(x), x[(0,) * x.ndim].astype(jnp.float32) * 0 > 1)
             for x in jax.tree.leaves(deps) if x.dtype != jax.dtypes.float0]

    def one(x):
        mine = [f for axes, f in flags if axes <= _varying(x)]
        if x.dtype == jax.dtypes.float0 or not mine:
            return x
        never = functools.reduce(jnp.logical_or, mine)
        return x | never if x.dtype == jnp.bool_ else x + never.astype(x.dtype)

    return jax.tree.map(one, tree)


@jax.custom_vjp
def _ordered(first, then):
    return first, _wait(then, first)


def _ordered_fwd(first, then):
    return _ordered(first, then), None


def _ordered_bwd(_, cts):
    ct_first, ct_then = cts
    return _wait(ct_first, ct_then), ct_then


_ordered.defvjp(_ordered_fwd, _ordered_bwd)


def in_order(first, then, layout: Layout | None = None):
    """`(first, then)` unchanged, but on a CPU mesh `then` waits for `first`, and in the backward
    pass the cotangents of `first` for those of `then`.

    XLA:CPU runs a program's collectives in program order, but a loop holding some runs as one
    operation, next to any other with no path between them, and its in-process collectives tell
    collectives apart only by kind, group and channel (jax gives all of `shard_map`'s the same).
    So the emulated devices of one process can pair one device's collective in a layer loop
    with another's outside it, or in another tower's loop: the run stops, or mixes their data
    (NaN losses). Computations that hold such collectives are ordered here by a data dependency
    (XLA:CPU drops optimization barriers before it orders a program);
    `jaxscale.hlo.unordered_collectives` finds the pairs left. Accelerators keep the overlap.
    `layout` defaults to the active one (`use_layout`); without either, nothing changes.
    """
    layout = layout or _ACTIVE.get()
    if layout is None or layout.mesh.devices.flat[0].platform != "cpu":
        return first, then
    return _ordered(first, then)
