"""Enumerate a model's layouts on a cluster, drop those that do not fit, rank the rest by step time.

A layout is the mesh (data, fsdp, tensor, pipeline, expert, context; multi-slice TPU clusters put
the data-parallel axis across slices), the ZeRO stage, sequence parallelism, the pipeline schedule
and its microbatches, the remat policy (`REMATS` and the config's own) and the gradient
accumulation and the loss chunking (`model.loss_chunk`) that make it fit, at the config's global
batch and sequence. Each is priced by `cost.estimate`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Iterator

from jaxscale.errors import UserError
from jaxscale.mesh import AXES
from jaxscale.plan import counts
from jaxscale.planner import cost
from jaxscale.planner.clusters import Cluster
from jaxscale.planner.memory import BATCH_AXES, shapes

REMATS = ("none", "save_dots", "full")
MEMORY_FRACTION = 0.9  # of HBM a layout may plan to use (the rest: XLA's and the runtime's)
# layouts predicted to need up to this many times a TPU's HBM are near misses the compiler decides
# (`near_misses`): the analytic model over-predicts the TPU compiler's peak by up to 1.24 at real
# widths, and the compiler squeezes a program that would not fit (docs/plan.md)
NEAR_MISS = 1.3
# tokens a chunk of the fused output layer and cross-entropy takes, where the search chunks the
# loss to fit (the logits of 4,096 tokens and a 128K vocabulary: 2 GiB in float32)
LOSS_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout: `config` overrides (`section.key: value`)."""

    settings: tuple[tuple[str, object], ...]

    def apply(self, config, in_place: bool = False):
        """`config` with this layout: a copy, or `config` itself changed (`in_place`)."""
        c = config if in_place else copy.deepcopy(config)
        for key, value in self.settings:
            section, _, name = key.rpartition(".")
            node = c
            for part in section.split("."):
                node = node[part]
            node[name] = value
        return c

    def overrides(self, config) -> str:
        """The `--config.KEY=VALUE` line that turns `config` into this layout."""
        def value(key):
            node = config
            for part in key.split("."):
                node = node[part]
            return node

        return " ".join(f"--config.{k}={v}" for k, v in self.settings if value(k) != v)

    def describe(self) -> str:
        s = dict(self.settings)
        mesh = " x ".join(f"{a}={s[f'mesh.{a}']}" for a in AXES if s.get(f"mesh.{a}", 1) > 1) or "1 chip"
        extra = [f"zero{s['parallel.zero_stage']}"] if s.get("parallel.zero_stage") else []
        extra += ["sp"] if s.get("parallel.sequence_parallel") else []
        if s.get("mesh.pipeline", 1) > 1:
            extra.append(f"{s['pipeline.schedule']} m={s['pipeline.microbatches']}"
                         + (f" v={s['pipeline.virtual_stages']}" if s["pipeline.virtual_stages"] > 1 else ""))
        extra.append(f"remat={s['model.remat']}")
        if s.get("model.loss_chunk"):
            extra.append(f"loss_chunk={s['model.loss_chunk']}")
        if s.get("train.grad_accum_steps", 1) > 1:
            extra.append(f"accum={s['train.grad_accum_steps']}")
        return f"{mesh} ({', '.join(extra)})"


def _powers(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else [1]


def meshes(config, cluster: Cluster) -> Iterator[dict[str, int]]:
    """Axis sizes that multiply to the cluster's chips and split the model evenly."""
    m, chips = config.model, cluster.chips
    for tp in _powers(min(cluster.fast_domain, 8 if not cluster.chip.torus_dims else 16)):
        if m.n_heads % tp or m.n_kv_heads % tp or m.d_ff % tp or chips % tp:
            continue
        for pp in _powers(min(16, m.n_layers)):
            if m.n_layers % pp or chips % (tp * pp):
                continue
            for ep in _powers(m.moe.n_experts) if m.moe.n_experts else [1]:
                for cp in _powers(8) if config.data.seq_len >= 16384 else [1]:
                    rest = chips // (tp * pp)
                    if rest % (ep * cp):
                        continue
                    rest //= ep * cp
                    for fsdp in _powers(rest):
                        if rest % fsdp == 0:
                            yield {"pipeline": pp, "data": rest // fsdp, "fsdp": fsdp, "expert": ep,
                                   "context": cp, "tensor": tp}


def candidates(config, cluster: Cluster) -> Iterator[tuple[Candidate, dict[str, int]]]:
    """Every layout, without gradient accumulation (`plan` adds it where memory needs it)."""
    batch = config.train.global_batch_size
    for sizes in meshes(config, cluster):
        split = math.prod(sizes[a] for a in BATCH_AXES)
        if batch % split:
            continue
        rows = batch // split
        dcn = {}
        if cluster.chip.torus_dims and cluster.domains > 1:  # slices joined by the data-parallel axis
            axis = next((a for a in ("data", "fsdp") if sizes[a] % cluster.domains == 0), None)
            if axis is None:
                continue
            dcn = {axis: cluster.domains}
        mesh = [(f"mesh.{a}", sizes[a]) for a in AXES] + [(f"mesh.dcn.{a}", n) for a, n in dcn.items()]
        zeros = ([0, 1, 2, 3] if sizes["fsdp"] == 1 else [0, 1]) if sizes["data"] > 1 else [0]
        sps = [False, True] if sizes["tensor"] > 1 else [False]
        pipes = [(config.pipeline.schedule, config.pipeline.microbatches, config.pipeline.virtual_stages)]
        if sizes["pipeline"] > 1:
            p, layers = sizes["pipeline"], config.model.n_layers // sizes["pipeline"]
            pipes = [(s, mb, v) for mb in (p, 2 * p, 4 * p) if rows % mb == 0
                     for s, v in (("1f1b", 1), ("gpipe", 1), ("interleaved", 2)) if layers % v == 0]
        remats = REMATS + ((config.model.remat,) if config.model.remat not in REMATS else ())
        for zero, sp, (schedule, mb, v), remat in itertools.product(zeros, sps, pipes, remats):
            yield Candidate(tuple(mesh) + (
                ("parallel.zero_stage", zero), ("parallel.sequence_parallel", sp),
                ("pipeline.schedule", schedule), ("pipeline.microbatches", mb),
                ("pipeline.virtual_stages", v), ("model.remat", remat),
                ("model.loss_chunk", config.model.loss_chunk), ("train.grad_accum_steps", 1))), sizes


def _chunkings(config, sizes: dict[str, int]) -> list[int]:
    """The loss chunkings to try at one accumulation, cheapest first: the config's own, then
    `LOSS_CHUNK` tokens where the config has none and a device's micro-batch holds more (the
    same FLOPs; only the logits' memory changes, `memory.activation_bytes`)."""
    own = config.model.loss_chunk
    return [own] if own or cost.tokens_per_device(config, sizes) <= LOSS_CHUNK else [own, LOSS_CHUNK]


def _fit_at(c, candidate: Candidate, sizes: dict[str, int], accum: int, cluster: Cluster,
            overlapped: tuple[str, ...]):
    """`candidate` at `accum` accumulation steps and the first of `_chunkings` that fits, written
    into `c`: `(Candidate, Estimate)`, None where none fits, False where the model's shapes do
    not split so."""
    candidate.apply(c, in_place=True)
    c.train.grad_accum_steps = accum
    for chunk in _chunkings(c, sizes):
        c.model.loss_chunk = chunk
        try:
            est = cost.estimate(c, sizes, cluster, overlapped)
        except UserError:
            return False
        if est.memory_bytes <= cluster.chip.hbm_bytes * MEMORY_FRACTION and (
                not cluster.chip.host_bytes
                or est.host_memory_bytes <= cluster.chip.host_bytes * MEMORY_FRACTION):
            chosen = {"train.grad_accum_steps": accum, "model.loss_chunk": chunk}
            return Candidate(tuple((k, chosen.get(k, v)) for k, v in candidate.settings)), est
    return None


def _accumulations(config, candidate: Candidate, sizes: dict[str, int]) -> list[int]:
    """The gradient accumulations a layout can take, fewest steps first: each divisor of a
    device's rows that leaves its micro-batch whole pipeline microbatches (a per-device batch of
    5 accumulates 5 rows of 1, as of 2 and 4 for a batch of 8)."""
    rows = config.train.global_batch_size // math.prod(sizes[a] for a in BATCH_AXES)
    mb = dict(candidate.settings)["pipeline.microbatches"] if sizes["pipeline"] > 1 else 1
    return [a for a in range(1, rows // mb + 1) if rows % a == 0 and (rows // a) % mb == 0]


def plan(config, cluster: Cluster, overlapped: tuple[str, ...] = ("parameters",)
         ) -> tuple[list[tuple[Candidate, cost.Estimate]], int]:
    """The layouts that fit, fastest first, and how many did not fit at any accumulation or loss
    chunking (`overlapped`: as `cost.estimate`'s). Fitting: `MEMORY_FRACTION` of the chip's HBM,
    and of its host memory for an offload policy's activations (where the cluster gives it)."""
    fits, too_big = [], 0
    c = copy.deepcopy(config)  # each candidate is written into it (copies are slow)
    for candidate, sizes in candidates(config, cluster):
        found = None
        for accum in _accumulations(config, candidate, sizes):
            if (found := _fit_at(c, candidate, sizes, accum, cluster, overlapped)) is not None:
                break
        if found:
            fits.append(found)
        elif found is None:
            too_big += 1
    fits.sort(key=lambda r: (r[1].step_s, sum(r[1].comm_s.values()), r[1].memory_bytes))
    return fits, too_big


def near_misses(config, cluster: Cluster, fits, n: int) -> list[tuple[Candidate, cost.Estimate]]:
    """The `n` fastest layouts predicted over the memory budget but within `NEAR_MISS` x HBM that
    are predicted faster than the best of `fits`: for the compiler to decide (a TPU slice's)."""
    loose = dataclasses.replace(cluster, chip=dataclasses.replace(
        cluster.chip, hbm_bytes=cluster.chip.hbm_bytes * NEAR_MISS / MEMORY_FRACTION))
    fastest = fits[0][1].step_s if fits else math.inf
    budget = cluster.chip.hbm_bytes * MEMORY_FRACTION
    return [(c, e) for c, e in plan(config, loose)[0] if e.memory_bytes > budget and e.step_s < fastest][:n]


def report(config, cluster: Cluster, top: int = 10, compile_top: int = 0) -> str:
    """The `jaxscale plan` table: the `top` fastest layouts that fit, the best one's overrides,
    and the `compile_top` best and as many `near_misses` compiled for the cluster's TPU slices
    (`compare.compiled_rows`)."""
    fits, too_big = plan(config, cluster)
    near = near_misses(config, cluster, fits, compile_top) if compile_top else []
    gib = 2.0**30
    params = counts(shapes(config)[0], config.model.moe)["params"]
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    head = (f"{config.model.family} {size} parameters, batch "
            f"{config.train.global_batch_size} x {config.data.seq_len} tokens on {cluster.describe()}: "
            f"{len(fits)} layouts fit in {MEMORY_FRACTION:.0%} of {cluster.chip.hbm_bytes / gib:.1f} GiB, "
            f"{too_big} do not")
    if not fits and not near:
        raise UserError(f"{head}; lower the batch or sequence, or plan for more chips")
    lines = [head, "", "| # | layout | memory GiB | compute s | comm fast s | comm slow s | bubble | "
             "step s | tokens/s/chip | MFU |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, (cand, e) in enumerate(fits[:top], 1):
        lines.append(f"| {i} | {cand.describe()} | {e.memory_bytes / gib:.1f} | {e.compute_s:.3f} | "
                     f"{e.comm_s['fast']:.3f} | {e.comm_s['slow']:.3f} | {e.bubble:.0%} | {e.step_s:.3f} | "
                     f"{e.tokens_per_s_per_chip:,.0f} | {e.mfu:.1%} |")
    lines += ["", "best: " + (fits[0][0].overrides(config) or "the config's own layout") if fits else
              f"none fits by the cost model; {len(near)} near misses for the compiler below"]
    if compile_top:
        from jaxscale.planner.compare import compiled_rows

        lines += compiled_rows(config, cluster, fits, compile_top, near)
    return "\n".join(lines)
