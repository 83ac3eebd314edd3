"""Device meshes from axis sizes: `{"data": 2, "fsdp": -1, "tensor": 2}` on whatever devices exist.

Multi-slice and multi-host jobs name, per axis, the part of its size that spans slices (or, where
devices have no slice, processes): `dcn={"data": 2}` puts the two halves of `data` on different
slices and keeps every other axis inside one, on the fast links (ICI, NVLink).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxscale.errors import UserError

# Outermost first: `tensor` is innermost so its collectives stay on the fastest links (NVLink, ICI).
AXES = ("pipeline", "data", "fsdp", "expert", "context", "tensor")


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the single `-1` axis and check that the product equals `num_devices`."""
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise UserError(f"unknown mesh axis {sorted(unknown)[0]!r}; mesh axes are {', '.join(AXES)}")
    out = {a: int(sizes.get(a, 1)) for a in AXES}
    free = [a for a, n in out.items() if n == -1]
    bad = [a for a, n in out.items() if n == 0 or n < -1]
    if bad:
        raise UserError(f"mesh axis {bad[0]}={out[bad[0]]} is invalid; use a positive size or -1")
    if len(free) > 1:
        raise UserError(f"mesh axes {' and '.join(free)} are both -1; at most one axis may be -1")
    fixed = math.prod(n for n in out.values() if n != -1)
    described = " x ".join(f"{a}={n}" for a, n in out.items() if n != 1)
    if free:
        if num_devices % fixed:
            raise UserError(f"mesh {described} cannot fill {num_devices} devices: the fixed axes "
                            f"multiply to {fixed}, which does not divide {num_devices}")
        out[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(f"mesh {described or 'of size 1'} needs {fixed} devices but {num_devices} "
                        f"are present; change the axis sizes or set one axis to -1")
    return out


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None) -> Mesh:
    """Build a mesh over `devices` (default: all) with every axis of `AXES`, in `Auto` mode.

    Auto axes let XLA propagate shardings from the parameter layouts and the few constraints the
    models place on activations; size-1 axes are kept so the same rules work on every layout.
    `dcn` gives, per axis, how many slices (or processes) that axis spans; see `hybrid_devices`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(sizes, len(devices))
    types = (AxisType.Auto,) * len(AXES)
    dcn = {a: int(n) for a, n in (dcn or {}).items() if int(n) != 1}
    if dcn:
        return Mesh(hybrid_devices(sizes, dcn, devices), AXES, axis_types=types)
    shape = tuple(sizes[a] for a in AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
    except NotImplementedError:  # no whole physical axes make an axis (tensor=8 on a 16x16
        # torus): split one, as MaxText's `allow_split_physical_axes` does, rather than refuse
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, AXES, axis_types=types)


def hybrid_devices(sizes: Mapping[str, int], dcn: Mapping[str, int],
                   devices: Sequence[jax.Device]):
    """The device array of a mesh whose axes span `dcn[axis]` slices each (slow links) and are
    otherwise laid out within a slice (fast links), via `mesh_utils.create_hybrid_device_mesh`.

    Devices are grouped by `slice_index` where they have one (TPU multi-slice), else by process
    (one process per host on GPU clusters).
    """
    unknown = set(dcn) - set(AXES)
    if unknown:
        raise UserError(f"unknown mesh axis mesh.dcn.{sorted(unknown)[0]}; mesh axes are "
                        f"{', '.join(AXES)}")
    for axis, n in dcn.items():
        if n < 1 or sizes[axis] % n:
            raise UserError(f"mesh.dcn.{axis}={n} must be a positive divisor of mesh.{axis}="
                            f"{sizes[axis]}: it is the part of that axis that spans slices/hosts")
    by_slice = len({getattr(d, "slice_index", None) for d in devices} - {None}) > 1
    granules = "slices" if by_slice else "processes"
    groups = len({d.slice_index if by_slice else d.process_index for d in devices})
    dcn_shape = tuple(dcn.get(a, 1) for a in AXES)
    if math.prod(dcn_shape) != groups:
        across = " x ".join(f"{a}={n}" for a, n in dcn.items())
        raise UserError(f"mesh.dcn {across} spans {math.prod(dcn_shape)} {granules} but the "
                        f"devices are on {groups}; make the mesh.dcn sizes multiply to {groups}")
    ici_shape = tuple(sizes[a] // n for a, n in zip(AXES, dcn_shape, strict=True))
    try:
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                    process_is_granule=not by_slice)
    except NotImplementedError:  # as in `make_mesh`
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                    process_is_granule=not by_slice,
                                                    allow_split_physical_axes=True)


def mesh_from_config(mesh_cfg: Mapping[str, int],
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh` from the config's `mesh` section (axis sizes and their `dcn` parts)."""
    return make_mesh({a: mesh_cfg[a] for a in AXES}, devices, mesh_cfg.get("dcn"))


def describe(mesh: Mesh) -> str:
    """`data=2 x tensor=4` style summary of the axes larger than one."""
    parts = [f"{a}={n}" for a, n in mesh.shape.items() if n > 1]
    return " x ".join(parts) or "single device"
