"""Device meshes from axis sizes: `{"data": 2, "fsdp": -1, "tensor": 2}` on whatever devices exist."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from jaxscale.errors import UserError

# Outermost first: `tensor` is innermost so its collectives stay on the fastest links (NVLink, ICI).
AXES = ("pipeline", "data", "fsdp", "expert", "context", "tensor")
_NOT_YET = {"expert": "expert", "context": "context (ring attention)"}


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


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a mesh over `devices` (default: all) with every axis of `AXES`, in `Auto` mode.

    Auto axes let XLA propagate shardings from the parameter layouts and the few constraints the
    models place on activations; size-1 axes are kept so the same rules work on every layout.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(sizes, len(devices))
    for axis, what in _NOT_YET.items():
        if sizes[axis] > 1:
            raise NotImplementedError(f"{what} parallelism (mesh axis '{axis}') is not implemented "
                                      f"yet; set mesh.{axis}=1")
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_from_config(mesh_cfg: Mapping[str, int],
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh` from the config's `mesh` section."""
    return make_mesh({a: mesh_cfg[a] for a in AXES}, devices)


def describe(mesh: Mesh) -> str:
    """`data=2 x tensor=4` style summary of the axes larger than one."""
    parts = [f"{a}={n}" for a, n in mesh.shape.items() if n > 1]
    return " x ".join(parts) or "single device"
