"""Clusters the planner plans for: named presets or a small TOML/JSON file of the same fields.

Each figure is per chip. `fast_bw` is what one chip moves per second, each way, in a collective
over the fast links (NVLink through NVSwitch; a TPU slice's ICI torus, counting both directions
of the ring on each torus dimension the group spans), inside domains of `fast_domain` chips;
`slow_bw` is the same over the slow links between domains (InfiniBand per GPU; DCN between TPU
slices). `compute_fraction` is the share of `peak_flops` the chip's matmuls reach in a large
training step (calibrated: docs/plan.md). Sources of the figures are in docs/plan.md.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

from jaxscale.errors import UserError

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator kind."""

    kind: str
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bytes: float
    hbm_bw: float
    fast_bw: float  # bytes/s each way per chip, one torus dimension or the NVLink switch
    torus_dims: int  # TPU: dimensions of the ICI torus (a group over several gets each one's links)
    compute_fraction: float  # share of peak the matmuls of a big training step reach
    host_bw: float = 32 * GB  # bytes/s each way between HBM and host memory (PCIe)
    host_bytes: float = 0.0  # host memory per chip for offloaded activations (0: not checked)


MIB, GIB = 2**20, 2**30
# compute fractions fitted on torchtitan's Llama-3.1-8B (8 x H100) and MaxText's Llama-2-70B (v5p)
# by experiments/plan_published.py (docs/results/plan.md); H200 and v6e take H100's and v5p's.
# HBM: the GPUs' total as nvidia-smi reports it; the TPUs' as their compiler makes it available
# to a program (libtpu 0.0.42.1's "exceeds available HBM" figure)
CHIPS = {
    "h100": Chip("H100 SXM", 989e12, 81559 * MIB, 3.35e12, 450 * GB, 0, 0.382, 64 * GB, 256 * GB),
    "h200": Chip("H200 SXM", 989e12, 143771 * MIB, 4.8e12, 450 * GB, 0, 0.382, 64 * GB, 256 * GB),
    "v5p": Chip("TPU v5p", 459e12, 95.74 * GIB, 2.765e12, 100 * GB, 3, 0.844, 32 * GB, 112 * GB),
    "v6e": Chip("TPU v6e", 918e12, 31.25 * GIB, 1.64e12, 112 * GB, 2, 0.844, 32 * GB, 180 * GB),
}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Chips, their links and (TPU) the topology a slice compiles for."""

    name: str
    chips: int
    chip: Chip
    fast_domain: int  # chips joined by the fast links: an NVLink node, a TPU slice
    slow_bw: float  # bytes/s each way per chip between domains
    topology: str = ""  # TPU: the slice's topology name (jax.experimental.topologies), "" for GPUs

    @property
    def domains(self) -> int:
        return self.chips // self.fast_domain

    def describe(self) -> str:
        where = (f"{self.domains} slices of {self.fast_domain} over DCN" if self.chip.torus_dims and
                 self.domains > 1 else f"one {self.topology or 'slice'}" if self.chip.torus_dims
                 else f"nodes of {self.fast_domain}" + (" over InfiniBand" if self.domains > 1 else ""))
        return f"{self.chips} x {self.chip.kind} ({where})"


def _gpu(chips: int, kind: str) -> Cluster:
    return Cluster(f"{chips}x{kind}", chips, CHIPS[kind], min(chips, 8), 50 * GB)


def _tpu(kind: str, chips: int, topology: str, slices: int = 1) -> Cluster:
    name = f"{kind}-{chips * slices}" if slices == 1 else f"{slices}x{kind}-{chips}"
    # DCN: 100 Gb/s NICs, one per 4 chips (v5p) or per 4 of v6e's (assumed; docs/plan.md)
    return Cluster(name, chips * slices, CHIPS[kind], chips, 3.125 * GB, topology)


PRESETS = {c.name: c for c in [
    _gpu(8, "h100"), _gpu(64, "h100"), _gpu(256, "h100"), _gpu(1024, "h100"), _gpu(8, "h200"),
    _gpu(64, "h200"),
    _tpu("v5p", 64, "v5p:4x4x4"), _tpu("v5p", 128, "v5p:4x4x8"), _tpu("v5p", 256, "v5p:4x8x8"),
    _tpu("v5p", 512, "v5p:8x8x8"), _tpu("v5p", 256, "v5p:4x8x8", slices=2),
    _tpu("v6e", 64, "v6e:8x8"), _tpu("v6e", 256, "v6e:16x16"), _tpu("v6e", 256, "v6e:16x16", slices=2),
]}

FIELDS = ("chips", "peak_flops", "hbm_bytes", "hbm_bw", "fast_bw", "fast_domain", "slow_bw")


def load_cluster(spec: str) -> Cluster:
    """A preset name (`8xh100`, `v5p-512`, `2xv6e-256`, ...) or a `.toml`/`.json` file with the
    keys of `FIELDS` (and optional `kind`, `torus_dims`, `compute_fraction`, `topology`, `host_bw`,
    `host_bytes`)."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.suffix not in (".toml", ".json"):
        raise UserError(f"unknown cluster {spec!r}; use a preset ({', '.join(PRESETS)}) or a "
                        f".toml/.json file with {', '.join(FIELDS)}")
    if not path.is_file():
        raise UserError(f"cluster file {spec} does not exist")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cluster file {spec} is not valid {path.suffix[1:].upper()}: {e}") from None
    known = set(FIELDS) | {"kind", "torus_dims", "compute_fraction", "topology", "name", "host_bw",
                           "host_bytes"}
    if missing := [k for k in FIELDS if k not in raw]:
        raise UserError(f"cluster file {spec} lacks {', '.join(missing)}; it needs {', '.join(FIELDS)}")
    if unknown := sorted(set(raw) - known):
        raise UserError(f"cluster file {spec} has unknown key {unknown[0]!r}; "
                        f"keys: {', '.join(sorted(known))}")
    if bad := [k for k in (*FIELDS, "host_bw", "host_bytes") if k in raw and (
            not isinstance(raw[k], int | float) or raw[k] <= 0)]:
        raise UserError(f"cluster file {spec}: {bad[0]} must be a positive number")
    if raw["chips"] % raw["fast_domain"]:
        raise UserError(f"cluster file {spec}: fast_domain={raw['fast_domain']} does not divide "
                        f"chips={raw['chips']}")
    chip = Chip(raw.get("kind", path.stem), float(raw["peak_flops"]), float(raw["hbm_bytes"]),
                float(raw["hbm_bw"]), float(raw["fast_bw"]), int(raw.get("torus_dims", 0)),
                float(raw.get("compute_fraction", 0.55)), float(raw.get("host_bw", 32 * GB)),
                float(raw.get("host_bytes", 0.0)))
    return Cluster(raw.get("name", path.stem), int(raw["chips"]), chip, int(raw["fast_domain"]),
                   float(raw["slow_bw"]), raw.get("topology", ""))
