"""`jaxscale inspect`: what a checkpoint directory holds, and whether every step reads back."""

from __future__ import annotations

import json
import time

import numpy as np
from etils import epath

from jaxscale.checkpoint import Checkpointer, Unreadable
from jaxscale.errors import UserError

VERIFY_UP_TO = 1 << 30  # `describe` reads every array by default when the steps hold less


def describe(directory: str, verify: bool | None = None) -> str:
    """A checkpoint directory in a few lines: steps and their size on disk, whether they read back,
    and the parameter tree and config of the newest readable step.

    `verify` reads every array of every step (default: when all steps together hold under 1 GiB);
    otherwise only each step's metadata is read, which finds a damaged manifest or metadata file
    but not damaged array data.
    """
    ckpt = Checkpointer(directory, read_only=True)
    steps = ckpt.steps()
    if not steps:
        raise UserError(f"no complete checkpoint in {directory!r}")
    sizes = {s: _bytes_on_disk(epath.Path(ckpt.directory) / str(s)) for s in steps}
    verify = sum(sizes.values()) < VERIFY_UP_TO if verify is None else verify
    damaged: dict[int, Unreadable] = {}
    start, read = time.perf_counter(), 0
    for s in steps if verify else ():
        try:
            read += ckpt.verify(s)
        except Unreadable as e:
            damaged[s] = e
    seconds = time.perf_counter() - start
    for latest in reversed(steps):
        try:
            if latest not in damaged:
                names, config = ckpt.saved_names(latest), ckpt.saved_config(latest)
                break
        except Unreadable as e:
            damaged[latest] = e
    else:
        raise damaged[steps[-1]]
    lines = [f"checkpoints in {ckpt.directory}"]
    lines += [f"  step {s:>8}  {sizes[s] / 2**20:10.2f} MiB"
              + (f"  unreadable: {damaged[s].reason}" if s in damaged else "") for s in steps]
    lines.append(f"verified: {len(steps) - len(damaged)} of {len(steps)} steps read back whole "
                 f"({read / 2**20:.1f} MiB in {seconds:.1f} s)" if verify
                 else "not verified: metadata read only; --verify reads every array")
    params = {k: v for k, v in names.items() if k.startswith("params.")}
    total = sum(int(np.prod(shape)) for shape, _ in params.values())
    lines.append(f"parameters at step {latest}: {total:,}")
    lines += [f"  {k[len('params.'):].removesuffix('.value'):<40} {dtype:<8} {list(shape)}"
              for k, (shape, dtype) in sorted(params.items())]
    lines.append("config: " + json.dumps(config, sort_keys=True))
    return "\n".join(lines)


def _bytes_on_disk(step_dir: epath.Path) -> int:
    return sum((root / f).stat().length for root, _, files in step_dir.walk() for f in files)
