"""What a compiled training step really costs per device: memory, FLOPs and collectives per mesh axis.

`compile_step` compiles one step of a config for any devices: the emulated CPU mesh, or a TPU
topology this host does not have (`topology_devices`, with the `libtpu` package installed), whose
TPU compiler then plans memory and collectives as on the real slice. A planner's predictions are
checked against these numbers.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import tempfile
from collections.abc import Sequence

import jax
import numpy as np

from jaxscale import hlo
from jaxscale.cpu import tpu_chips
from jaxscale.errors import UserError
from jaxscale.mesh import mesh_from_config

_DONE = re.compile(r"^%?([\w.\-]+) = (\(.*?\)|\S+) [a-z\-]+-done\(%([\w.\-]+)\)")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_SHAPE = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (\S+) ")
# expert parallelism's token exchange on GPUs and TPUs (XLA:CPU gets all-to-alls instead)
_RAGGED = re.compile(r"=\s*(\S+)\s+(ragged-all-to-all)\(%([\w.\-]+)")


def topology_devices(name: str) -> list[jax.Device]:
    """The TPU devices of a topology such as `v5p:4x4x4` or `v6e:16x16`, compiled for on any host
    (`jax.experimental.topologies`; needs the `libtpu` package, not a TPU)."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"compiling for TPU topology {name!r} needs the libtpu package: pip install libtpu")
    from jax.experimental import topologies

    if not tpu_chips():  # compiling only: other processes may load libtpu too (its lockfile)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's own errors, several lines long
        raise UserError(f"cannot compile for TPU topology {name!r} (names like v5p:2x2x1, v6e:16x16): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One compiled training step, per device. `collectives`: for each group of mesh axes a
    collective runs over (`"data"`, `"data+fsdp"`; `""`: none), `{op: (count, bytes sent)}`
    executed per step (a loop's collectives times its trip count; see `step_collectives`).
    `flops` is XLA's cost analysis, which counts a loop's body once: with `model.scan_layers` one
    layer's (the tiny test model's step: 48 MFLOP scanned, 81 MFLOP unrolled); 0 where the
    compiler has none (a GPU compile without a GPU, docs/plan.md)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    host_argument_bytes: int
    host_temp_bytes: int
    flops: float
    collectives: dict[str, dict[str, tuple[int, float]]]
    device_space_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """Device memory the step needs. On TPUs the compiler's own account of its device memory
        space, arguments included (`device_space_bytes`, read by `_device_space_bytes`): its
        `memory_analysis()` mixes spaces (Llama-3.1-70B on v6e:16x16, 1F1B: 36.17 GiB of
        temporaries for 28.58 GiB of device memory; an offload step: a 59.33 GiB "peak" that is
        its arguments and 56.25 GiB of host memory). Elsewhere the arguments, the outputs not
        aliased to them and the temporaries less the host ones."""
        if self.device_space_bytes:
            return self.device_space_bytes
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                - self.host_temp_bytes)


class DoesNotFit(UserError):
    """The compiler found that a step does not fit the devices' memory (its one-line reason)."""


def compile_step(config, devices: Sequence[jax.Device]) -> CompiledStep:
    """Compile one training step of `config` on `mesh_from_config(config.mesh, devices)`; raises
    `DoesNotFit` where the compiler runs out of device memory."""
    from jaxscale.train.trainer import build_trainer  # the planner's other modules need no trainer

    mesh = mesh_from_config(config.mesh, devices)
    tpu = devices[0].platform == "tpu"
    with tempfile.TemporaryDirectory() as dump:
        try:  # the TPU compiler writes its memory-usage report where it dumps
            compiled = build_trainer(config, mesh).compile({"xla_dump_to": dump} if tpu else None)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise DoesNotFit(str(e).splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")) from None
        device_bytes = _device_space_bytes(dump) if tpu else 0
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}  # None from a GPU compile without a GPU
    cost = cost[0] if isinstance(cost, list) else cost
    # replica groups name devices by their place in the program's device assignment: the mesh's
    positions = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    return CompiledStep(
        memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
        memory.temp_size_in_bytes, getattr(memory, "host_argument_size_in_bytes", 0),
        getattr(memory, "host_temp_size_in_bytes", 0), float(cost.get("flops", 0.0)),
        step_collectives(compiled.as_text(), positions, mesh.axis_names), device_bytes)


_REPORT = re.compile(r"Memory Space: default \(color=0\)\s+Total bytes: (\d+)")


def _device_space_bytes(dump: str) -> int:
    """The bytes of the device's memory space in the step's memory-usage report (the TPU
    compiler's buffers at their assigned offsets, arguments included); 0 without a report."""
    for path in glob.glob(os.path.join(dump, "*jit_step*memory-usage-report.txt")):
        with open(path) as f:
            if m := _REPORT.search(f.read()):
                return int(m.group(1))
    return 0


def step_collectives(hlo_text: str, positions: np.ndarray, axis_names: Sequence[str]
                     ) -> dict[str, dict[str, tuple[int, float]]]:
    """`{axes: {op: (count, bytes sent per device)}}` of the collectives a program executes once:
    each collective counted as many times as its computation runs (`hlo.executions`: loops of
    scanned layers and pipeline ticks times their trip counts; conditional branches as if taken),
    under the mesh axes whose coordinate varies inside its replica groups (a collective-permute:
    between its sources and targets). `positions`: each device's id in the program, laid out as
    the mesh. Bytes are `hlo.sent_bytes` of the result (an async pair's `-done`); a
    ragged-all-to-all's depend on the routing: (n-1)/n of the smaller of its input and output
    buffers (balanced routing; the other is sized for the worst case)."""
    coords = {int(i): c for c, i in np.ndenumerate(positions)}
    sizes = dict(zip(axis_names, positions.shape, strict=True))
    everyone = frozenset([frozenset(coords)])
    comps = hlo._computations(hlo_text)
    runs = hlo.executions(hlo_text)
    out: dict[str, dict[str, list]] = {}
    for name, lines in comps.items():
        done = {m.group(3): m.group(2) for line in lines if (m := _DONE.match(line))}
        shapes = {m.group(1): m.group(2) for line in lines if (m := _SHAPE.match(line))}
        for line in lines:
            m = hlo._INSTR.search(line) or _RAGGED.search(line)
            if not m or not runs[name]:
                continue
            shape, op = m.group(1, 2)
            if op == "ragged-all-to-all":
                shape = min(shape, shapes.get(m.group(3), shape), key=_bytes)
            if f"{op}-start(" in line:
                shape = done.get(line.split(" = ", 1)[0].removeprefix("ROOT ").lstrip("%"), shape)
            if op == "collective-permute":
                pairs = [tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}",
                                                                 _PAIRS.search(line).group(1))]
                groups = None
            else:
                groups = hlo.replica_groups(line) or everyone
                pairs = [(min(g), b) for g in groups for b in g]  # an axis varies: from the first
            varying = {axis for a, b in pairs for axis, x, y in
                       zip(axis_names, coords[a], coords[b], strict=True) if x != y}
            label = "+".join(a for a in axis_names if a in varying and sizes[a] > 1)
            stats = out.setdefault(label, {}).setdefault(op, [0, 0.0])
            stats[0] += runs[name]
            stats[1] += runs[name] * hlo.sent_bytes(op.removeprefix("ragged-"), _bytes(shape), groups)
    return {label: {op: (c, b) for op, (c, b) in ops.items()} for label, ops in out.items()}


def _bytes(shape: str) -> int:
    """The bytes of an HLO shape (every array of a tuple)."""
    return sum(int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * hlo._BYTES[t]
               for t, dims in hlo._ARRAY.findall(shape))
