"""Measure the pipeline bubble of the GPipe, 1F1B and interleaved schedules against their formulas.

    python3 experiments/bench_pipeline.py [--steps N] [--out docs/results/pipeline.md]

For P in {2, 4} pipeline stages (mesh `pipeline=P` on the first P devices), M in {P, 2P, 4P, 8P}
microbatches and each schedule (interleaved with V = 2 chunks per stage), the jaxscale train step of
one small Llama is compiled ahead of time, its memory and collectives are read from the compiled
program, and it is timed against the ideal: the same model
and batch on the same P devices with the work spread without a pipeline (`data=P`). Steps of every
variant of one P are timed in alternating rounds, so host noise hits them alike. The plot of the
bubble against M is written next to the markdown file (same name, `.png`); it needs matplotlib
(`pip install matplotlib`, not a jaxscale dependency) and is skipped with a message without it.
On a CPU-only host 8 devices are emulated (unless XLA_FLAGS is already set); they share the host's
cores, so the bubble shows as wasted compute, not as idle devices (see the output's header).
"""

# ruff: noqa: E402  (XLA_FLAGS must be set before jax is imported)

import _host

_host.emulate_devices()

import argparse
import math
import os
import statistics
import time
from typing import NamedTuple

import jax

from jaxscale import metrics
from jaxscale.config import base_config, validate
from jaxscale.data import build_data, make_global_batch
from jaxscale.hlo import collective_stats, format_bytes, format_stats
from jaxscale.mesh import AXES, mesh_from_config
from jaxscale.models import param_count
from jaxscale.train.trainer import build_trainer

STAGES = (2, 4)
MICROBATCH_FACTORS = (1, 2, 4, 8)  # M = factor * P
ROWS_PER_STAGE = 8  # global batch 8P rows: every M divides it, down to 1-row microbatches at M = 8P
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2))  # (pipeline.schedule, virtual_stages)
WARMUP_STEPS = 2
MIB = 2**20


class Variant(NamedTuple):
    """One compiled step to time: a pipeline with M microbatches (M = 0: a baseline without one)."""

    name: str
    mesh: dict[str, int]
    microbatches: int = 0
    virtual_stages: int = 1


def variants(stages: int) -> list[Variant]:
    """The ideal (data=P), a single-device reference and each schedule with M = P .. 8P."""
    return ([Variant("ideal", {"data": stages}), Variant("one device", {})]
            + [Variant(name, {"pipeline": stages}, f * stages, v) for name, v in SCHEDULES
               for f in MICROBATCH_FACTORS])


def bench_config(stages: int):
    """The small model, with the global batch of P stages."""
    c = base_config()
    c.model.update(vocab_size=512, d_model=128, n_layers=8, n_heads=4, n_kv_heads=4, head_dim=32,
                   d_ff=384, max_seq_len=64)
    c.data.seq_len = 64
    c.train.global_batch_size = ROWS_PER_STAGE * stages
    return c


def variant_config(base, variant: Variant):
    """`base` with the variant's mesh (other axes 1) and microbatches."""
    c = base.copy_and_resolve_references()
    for axis in AXES:
        c.mesh[axis] = variant.mesh.get(axis, 1)
    c.pipeline.microbatches = max(variant.microbatches, 1)
    if variant.microbatches:
        c.pipeline.update(schedule=variant.name, virtual_stages=variant.virtual_stages)
    validate(c)
    return c


# ---------------------------------------------------------------------------------------------
# Compile and time


def prepare(base, variant: Variant, host_batch: dict) -> dict:
    """Compile the variant's step; its memory, collectives, initial state and device batch."""
    config = variant_config(base, variant)
    devices = jax.devices()[:math.prod(variant.mesh.values())]
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
    compiled = trainer.compile()
    mem = compiled.memory_analysis()
    return {"variant": variant, "step": compiled, "state": trainer.init(),
            "batch": make_global_batch(host_batch, trainer.batch_sharding),
            "mem_mib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / MIB,
            "temp_mib": mem.temp_size_in_bytes / MIB,
            "collectives": collective_stats(compiled.as_text())}


def run_step(run: dict) -> float:
    """One step of a prepared variant (its state is donated and replaced); the wall time."""
    start = time.perf_counter()
    run["state"], out = run["step"](run["state"], run["batch"])
    jax.block_until_ready((run["state"], out))
    return time.perf_counter() - start


def time_rounds(runs: list[dict], steps: int) -> None:
    """Time `steps` rounds of one step per variant, rotating which goes first; store `times`."""
    for run in runs:
        for _ in range(WARMUP_STEPS):
            run_step(run)
        run["times"] = []
    for r in range(steps):
        for run in runs[r % len(runs):] + runs[:r % len(runs)]:
            run["times"].append(run_step(run))


def bench_stages(stages: int, steps: int) -> list[dict]:
    """Compile and time every variant for P stages; one dict per variant, with median `step_s`."""
    base = bench_config(stages)
    _, data = build_data(base)
    host_batch = next(data)
    runs = [prepare(base, v, host_batch) for v in variants(stages)]
    time_rounds(runs, steps)
    for run in runs:
        run["step_s"], run["min_s"] = statistics.median(run["times"]), min(run["times"])
        q1, _, q3 = statistics.quantiles(run["times"], n=4)
        run["iqr_s"] = (q1, q3)
        v = run["variant"]
        print(f"P={stages} {v.name:>11} M={v.microbatches:>2}: {run['step_s'] * 1e3:7.1f} ms  "
              f"{run['mem_mib']:6.1f} MiB  {format_stats(run['collectives'])}", flush=True)
    return runs


# ---------------------------------------------------------------------------------------------
# Report


def formula(stages: int, microbatches: float, virtual: int = 1) -> float:
    return (stages - 1) / (virtual * microbatches + stages - 1)


def table_rows(stages: int, runs: list[dict]) -> list[dict]:
    """One row per pipeline variant, measured against the ideal of the same P."""
    ideal = next(r for r in runs if r["variant"].name == "ideal")
    rows = []
    for run in runs:
        m = run["variant"].microbatches
        if not m:
            continue
        v = run["variant"].virtual_stages
        rows.append({"schedule": run["variant"].name + (f" V={v}" if v > 1 else ""), "V": v,
                     "P": stages, "M": m, "rows": ROWS_PER_STAGE * stages // m,
                     "step_s": run["step_s"], "iqr_s": run["iqr_s"], "ideal_s": ideal["step_s"],
                     "overhead": run["step_s"] / ideal["step_s"] - 1,
                     "bubble": 1 - ideal["step_s"] / run["step_s"],
                     "bubble_min": 1 - ideal["min_s"] / run["min_s"],
                     "formula": formula(stages, m, v), "mem_mib": run["mem_mib"],
                     "temp_mib": run["temp_mib"],
                     "cp": run["collectives"]["collective-permute"],
                     "other": format_stats({op: v for op, v in run["collectives"].items()
                                                  if op != "collective-permute"})})
    return rows


def model_shape(c) -> str:
    m = c.model
    return (f"Llama, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv, "
            f"head_dim {m.head_dim}), d_ff {m.d_ff}, vocab {m.vocab_size}, seq_len {c.data.seq_len}, "
            f"{m.dtype}; {param_count(m) / 1e6:.2f}M parameters, "
            f"{metrics.flops_per_token(m, c.data.seq_len) / 1e6:.1f} MFLOP/token; global batch "
            f"{ROWS_PER_STAGE}·P rows ({', '.join(f'{ROWS_PER_STAGE * p} for P={p}' for p in STAGES)})")


def header(steps: int, load: float) -> list[str]:
    dev, n = jax.devices()[0], jax.device_count()
    lines = [
        "# Pipeline bubble: GPipe, 1F1B and interleaved schedules against their formulas", "",
        f"Generated by `python3 experiments/bench_pipeline.py --steps {steps}` ({WARMUP_STEPS} warm-up "
        f"steps, then {steps} timed rounds of one step per variant, rotating which goes first).", "",
        *_host.environment_lines(load),
        f"- Model: {model_shape(bench_config(1))}",
        "- Pipeline: `pipeline.schedule=gpipe | 1f1b | interleaved` (interleaved with "
        "`pipeline.virtual_stages=2`), mesh `pipeline=P` (other axes 1) on the first P devices.",
        "- Ideal time: the same model and batch on the same P devices with the work spread without a "
        "pipeline (mesh `data=P`, timed in the same rounds). Overhead = measured / ideal − 1 and "
        "measured bubble = 1 − ideal / measured, from median step times; the bubble is also given "
        "from the fastest step of each (the least disturbed by other processes), next to the formula: "
        "(P − 1)/(M + P − 1) for GPipe and 1F1B, (P − 1)/(V·M + P − 1) for interleaved. 1F1B also "
        "recomputes each stage's forward in its backward (it keeps only stage inputs), about a third "
        "more block compute whatever M is; that shows in its measured column too. The "
        "difference also holds what else differs from data parallelism: the pipeline computes the "
        "embedding, head and loss on every stage and all-reduces the last stage's activations, data "
        "parallelism all-reduces the gradients and updates every parameter on every device (1F1B "
        "runs the head on the last stage only).",
    ]
    if dev.platform == "cpu":
        lines += [
            f"- **CPU caveat.** The {n} emulated devices share {os.cpu_count()} cores, so the P stages "
            "do not run in parallel and the bubble is not idle time here. It shows anyway, as wasted "
            "compute for GPipe and interleaved: in SPMD every stage runs its layers at every one of "
            "the ticks (`jaxscale/parallel/pipeline.py`), on zeros while the pipeline fills and on "
            "leftovers while it drains, and throws the results away; the backward does the same. "
            "Such a step does (M + P − 1)/M (interleaved: (V·M + P − 1)/(V·M)) times the layer work "
            "of the ideal, and on shared cores that costs time in the same proportion as idle stages "
            "would on real devices. 1F1B instead skips a stage's work in a tick where it has none "
            "(`lax.cond`), so here its bubble costs nothing and its column shows the recompute and "
            "per-tick costs only; on real devices its idle stages wait as the formula says. It can "
            "even beat the ideal here, which is then no lower bound: it computes the head on one "
            "stage instead of all, and each stage updates only its own layers, while data "
            "parallelism all-reduces every gradient and updates every parameter on every device, "
            "costs that add up on shared cores. "
            "What this cannot show: real parallel speed-up, the latency of sending activations between "
            "devices (a collective-permute is a memory copy here), or how the schedule overlaps them. "
            "Costs that grow with M also weigh more here: small microbatches cost more per row, and "
            "every tick makes the emulated devices meet at a collective-permute, forward and backward, "
            "while other processes compete for the cores. The one-device "
            "reference below shows why the ideal is not that step divided by P: P emulated devices "
            "do not have P times the compute of one.",
        ]
    return lines + [""]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| schedule | P | M | rows/microbatch | step ms (IQR) | ideal ms | overhead "
             "| bubble measured | bubble, fastest steps | bubble formula | memory/device (MiB) "
             "| of which temporaries | collective-permute | other collectives |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        (cp_count, cp_bytes), (q1, q3) = r["cp"], r["iqr_s"]
        lines.append(f"| {r['schedule']} | {r['P']} | {r['M']} | {r['rows']} | {_ms(r['step_s'])} "
                     f"({_ms(q1)}–{_ms(q3)}) | {_ms(r['ideal_s'])} | {r['overhead']:+.1%} | "
                     f"{r['bubble']:.1%} | {r['bubble_min']:.1%} | {r['formula']:.1%} | "
                     f"{r['mem_mib']:.1f} | {r['temp_mib']:.1f} | {cp_count} ({format_bytes(cp_bytes)}) "
                     f"| {r['other']} |")
    return lines


def baselines(results: dict[int, list[dict]]) -> list[str]:
    lines = ["", "Baselines (median step; memory per device; collectives):", ""]
    for stages, runs in results.items():
        for run in runs:
            v = run["variant"]
            if not v.microbatches:
                mesh = f"data={stages}" if v.mesh else "1 device"
                lines.append(f"- P={stages}, {v.name} ({mesh}): {_ms(run['step_s'])} ms, "
                             f"{run['mem_mib']:.1f} MiB, {format_stats(run['collectives'])}")
    return lines


def footer(seconds: float) -> list[str]:
    return ["", "Step times are medians over the timed rounds (interquartile range in brackets). Memory "
            "is the compiled step's argument + temporary bytes per device (`memory_analysis()`). "
            "Collectives are counted in the optimized HLO by `jaxscale.hlo.collective_stats` (an op "
            "inside a loop counts once: the pipeline's collective-permute runs at every tick, forward "
            "and backward), with the bytes of each op's per-device result; AR all-reduce, AG "
            "all-gather, RS reduce-scatter, A2A all-to-all, CP collective-permute.", "",
            f"Script run time: {seconds:.0f} s."]


def plot(rows: list[dict], path: str) -> None:
    """Bubble fraction against M, one panel per P: measured points and formula curves."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STAGES), figsize=(10, 4.2), sharey=True, squeeze=False)
    colors = dict(zip((n for n, _ in SCHEDULES), ("tab:blue", "tab:green", "tab:orange"), strict=True))
    for ax, stages in zip(axes[0], STAGES, strict=True):
        for name, virtual in SCHEDULES:
            mine = [r for r in rows if r["P"] == stages and r["schedule"].split()[0] == name]
            if not mine:
                continue
            label, color = mine[0]["schedule"], colors[name]
            curve = [stages * 2 ** (i / 16) for i in range(16 * 3 + 1)]
            ax.plot(curve, [formula(stages, m, virtual) for m in curve], color=color,
                    linestyle="--" if name == "1f1b" else "-", label=f"{label} formula")
            ax.plot([r["M"] for r in mine], [r["bubble"] for r in mine], "o", color=color,
                    label=f"{label} measured")
        ax.set_xscale("log", base=2)
        ms = sorted({r["M"] for r in rows if r["P"] == stages})
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel("microbatches M")
        ax.set_title(f"P = {stages}", fontsize=10)
        ax.set_ylim(bottom=min([0.0] + [r["bubble"] - 0.02 for r in rows]))
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("bubble: 1 − ideal / step (medians)")
    axes[0][0].legend(loc="upper right", fontsize=7)
    fig.suptitle(f"Pipeline bubble, measured vs formula; {jax.devices()[0].platform}, "
                 f"{jax.device_count()} devices, jax {jax.__version__}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_host.at_least(2), default=20,
                        help="timed rounds (one step per variant each; 2 or more: the table gives quartiles)")
    parser.add_argument("--out", default=_host.in_repo("docs/results/pipeline.md"),
                        help="markdown file to write")
    args = parser.parse_args()
    begin, load = time.perf_counter(), os.getloadavg()[0]
    results = {}
    for stages in STAGES:
        if stages > jax.device_count():
            print(f"skip P={stages}: needs {stages} devices, {jax.device_count()} present")
            continue
        results[stages] = bench_stages(stages, args.steps)
    rows = [row for p, runs in results.items() for row in table_rows(p, runs)]
    _host.write_report(header(args.steps, load) + table(rows) + baselines(results)
                       + footer(time.perf_counter() - begin), args.out)
    plot(rows, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
