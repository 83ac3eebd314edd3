"""The cost model next to the compiler: layouts compiled for a TPU slice, or on this host's devices.

`compiled_rows` compiles the planner's best layouts for the cluster's real TPU topology (libtpu,
no TPU needed) and prices them with the compiler's own memory and collective bytes; `check`
compiles a config's layouts on the devices present (the 8-device CPU mesh of the tests) and
prints predicted against compiled memory and bytes per mesh axis.
"""

from __future__ import annotations

import math

import jax

from jaxscale.errors import UserError
from jaxscale.mesh import AXES, resolve_axis_sizes
from jaxscale.planner import cost
from jaxscale.planner.clusters import Chip, Cluster
from jaxscale.planner.collectives import Collective
from jaxscale.planner.compiled import CompiledStep, DoesNotFit, compile_step
from jaxscale.planner.search import Candidate

GIB = 2.0**30


def slice_devices(cluster: Cluster) -> list[jax.Device]:
    """The devices of the cluster's TPU slices (`jax.experimental.topologies`, libtpu)."""
    if not cluster.topology:
        raise UserError(f"cluster {cluster.name} names no TPU topology to compile for; compiling "
                        f"applies to TPU clusters (docs/plan.md has the GPU way)")
    from jax.experimental import topologies

    from jaxscale.planner.compiled import topology_devices

    if cluster.domains == 1:
        return topology_devices(cluster.topology)
    topology_devices(cluster.topology)  # libtpu present, the name valid
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=cluster.topology,
                                                 num_slices=cluster.domains).devices)
    except Exception as e:  # libtpu's own errors, several lines long
        raise UserError(f"cannot compile for {cluster.domains} slices of {cluster.topology}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def compiled_step_time(step: CompiledStep, estimate: cost.Estimate, config, cluster: Cluster) -> float:
    """`estimate`'s step time with the compiled program's collective bytes: per mesh-axis group,
    over its link class; collectives on `tensor`, `pipeline`, `expert` and `context` exposed,
    data-parallel ones overlapped with compute, 1F1B's on `tensor` at their critical path's
    share (as `cost.estimate`)."""
    exposed = overlapped = 0.0
    ticked = cost.conditional_share(config, estimate.sizes)
    for label, ops in step.collectives.items():
        if not label:
            continue
        axes = tuple(label.split("+"))
        _, bw = cost.link(axes, estimate.sizes, cluster)
        seconds = sum(b for _, b in ops.values()) / bw * (ticked if axes == ("tensor",) else 1.0)
        if set(axes) <= {"data", "fsdp"}:
            overlapped += seconds
        else:
            exposed += seconds
    busy = estimate.compute_s / (1 - estimate.bubble)
    return busy + exposed + cost.hidden_excess(busy, overlapped)


def compiled_rows(config, cluster: Cluster, ranked, n: int, near=()) -> list[str]:
    """Table rows for the `n` best `ranked` layouts and the `near` misses
    (`search.near_misses`) compiled for the cluster's slices: the compiler's memory, or its
    reason where the step does not fit."""
    devices = slice_devices(cluster)
    lines = ["", f"compiled for {cluster.topology}" + (f" x {cluster.domains} slices" if cluster.domains > 1
                                                      else "") + " (libtpu; no TPU needed):", "",
             "| # | layout | predicted memory GiB | compiled memory GiB | predicted step s | "
             "step s with compiled bytes | compiled bytes sent per chip |",
             "|---:|---|---:|---:|---:|---:|---|"]
    tokens = config.train.global_batch_size * config.data.seq_len
    rows = [(str(i), r) for i, r in enumerate(ranked[:n], 1)] + [("near miss", r) for r in near]
    rescued = []
    for label, (cand, est) in rows:
        head = f"| {label} | {cand.describe()} | {est.memory_bytes / GIB:.1f} |"
        try:
            step = compile_step(cand.apply(config), devices)
        except DoesNotFit as e:
            lines.append(f"{head} does not fit: {e} | {est.step_s:.3f} | | |")
            continue
        seconds = compiled_step_time(step, est, config, cluster)
        sent = ", ".join(f"{axes or 'none'} {sum(b for _, b in ops.values()) / GIB:.2f} GiB"
                         for axes, ops in step.collectives.items())
        lines.append(f"{head} {step.peak_bytes / GIB:.1f} | {est.step_s:.3f} | {seconds:.3f} "
                     f"({tokens / seconds / cluster.chips:,.0f} tokens/s/chip) | {sent} |")
        if label == "near miss":
            rescued.append(cand.overrides(config) or "the config's own layout")
    return lines + [""] + [f"near miss the compiler fits: {o}" for o in rescued] if rescued else lines


LAYOUTS = {  # the strategies `check` compares, as config overrides
    "DP": {"mesh.data": -1},
    "ZeRO-1": {"mesh.data": -1, "parallel.zero_stage": 1},
    "ZeRO-2": {"mesh.data": -1, "parallel.zero_stage": 2},
    "ZeRO-3": {"mesh.data": -1, "parallel.zero_stage": 3},
    "FSDP": {"mesh.data": 1, "mesh.fsdp": -1},
    "TP": {"mesh.data": -1, "mesh.tensor": 2},
    "TP+SP": {"mesh.data": -1, "mesh.tensor": 2, "parallel.sequence_parallel": True},
    "GPipe": {"mesh.data": -1, "mesh.pipeline": 2, "pipeline.schedule": "gpipe"},
    "1F1B": {"mesh.data": -1, "mesh.pipeline": 2, "pipeline.schedule": "1f1b"},
}


def check(config) -> str:
    """Predicted against compiled memory and bytes sent per mesh axis, on the devices present."""
    devices = jax.devices()
    lines = [f"{len(devices)} x {devices[0].device_kind}: predicted / compiled, per device", "",
             "| layout | memory MiB | bytes sent per axis (KiB) |", "|---|---|---|"]
    for name, overrides in LAYOUTS.items():
        c = Candidate(tuple(overrides.items())).apply(config)
        try:
            sizes = resolve_axis_sizes({a: c.mesh[a] for a in AXES}, len(devices))
            step = compile_step(c, devices)
        except UserError as e:
            lines.append(f"| {name} | does not apply: {e} | |")
            continue
        chip = Chip("host", 1e12, math.inf, 1e11, 1e10, 0, 1.0)  # times are not compared
        host = Cluster("host", len(devices), chip, len(devices), 1e10)
        est = cost.estimate(c, sizes, host)
        predicted: dict[str, float] = {}
        for coll in est.collectives:
            if devices[0].platform == "cpu" and coll.op == "reduce-scatter" and coll.axes == ("tensor",):
                # XLA:CPU lowers sequence parallelism's reduce-scatters as all-reduces
                coll = Collective("all-reduce", coll.axes, coll.nbytes * sizes["tensor"], coll.count,
                                       coll.what)
            label = "+".join(a for a in AXES if a in coll.axes)
            predicted[label] = predicted.get(label, 0.0) + coll.sent(sizes)
        compiled = {label: sum(b for _, b in ops.values()) for label, ops in step.collectives.items()}
        axes = " ".join(f"{label or 'none'} {predicted.get(label, 0) / 1024:.0f}/"
                        f"{compiled.get(label, 0) / 1024:.0f}"
                        for label in sorted(set(predicted) | set(compiled), key=str))
        lines.append(f"| {name} | {est.memory_bytes / 2**20:.1f} / {step.peak_bytes / 2**20:.1f} | {axes} |")
    return "\n".join(lines)

