"""The survey's Table 1 as numbers: memory, communication and synchronisation of each strategy.

    python3 experiments/bench_strategies.py [--topology v5p:8x8x4] [--seq-len 8192] [--skip-large]
        [--out docs/results/strategies.md]

Table 1 of the survey (the seed text in /work/shared/seed) rates data, tensor, pipeline and hybrid
parallelism by memory efficiency, communication overhead and synchronisation frequency in words.
Here each strategy's training step is compiled (`jaxscale.planner.compiled.compile_step`) and
its per-device memory, the bytes its collectives send per device per step on each mesh axis,
the collectives it runs per step (loops counted by their trip counts) and, for the pipeline
schedules, the bubble of the schedule are set next to the survey's words. Once for a small Llama
on 8 devices (emulated on a CPU-only host), once for a Llama-3-70B shape on a 256-chip TPU slice,
compiled by the TPU compiler on this host (needs the `libtpu` package, `pip install libtpu`; the
part is skipped with a note without it). A plot (`.png` next to the report) needs matplotlib.
"""

# ruff: noqa: E402  (XLA_FLAGS must be set before jax is imported)

import _host

_host.emulate_devices()

import argparse
import importlib.metadata
import importlib.util
import os
import re
import time
from typing import NamedTuple

import jax

from jaxscale.config import base_config, load_module
from jaxscale.hlo import ABBREVIATIONS
from jaxscale.plan import plan
from jaxscale.planner.compiled import CompiledStep, compile_step, topology_devices

GIB = 2**30
SURVEY = {  # Table 1 of the survey: memory efficiency, communication overhead, sync frequency
    "Data Parallelism": ("High", "High (All-reduce)", "Per step"),
    "Tensor Parallelism": ("Moderate", "Moderate (Slice gather)", "Per layer"),
    "Pipeline Parallelism": ("High", "Low (Stage buffer)", "Per microbatch"),
    "Hybrid Parallelism": ("Optimal", "Complex", "Variable"),
}


class Strategy(NamedTuple):
    """One row: its survey row, mesh axis sizes and the settings it changes."""

    name: str
    survey: str | None  # the survey's row, None where Table 1 has none
    mesh: dict[str, int]
    parallel: dict = {}
    pipeline: dict = {}
    moe: bool = False


def strategies(n: int, tensor: int, pipeline: int, microbatches: int,
               hybrid: dict[str, int]) -> list[Strategy]:
    """The strategies on `n` devices; the tensor, pipeline, expert and context axes take `tensor`,
    `pipeline`, 8 and 8 of them, the rest goes to data (tensor) or fsdp (the others); the hybrid
    takes the axes `hybrid` gives, with sequence parallelism."""
    rest = n // tensor
    pipe = dict(microbatches=microbatches)
    return [
        Strategy("DP", "Data Parallelism", dict(data=n)),
        Strategy("ZeRO-1", "Data Parallelism", dict(data=n), dict(zero_stage=1)),
        Strategy("ZeRO-2", "Data Parallelism", dict(data=n), dict(zero_stage=2)),
        Strategy("ZeRO-3", "Data Parallelism", dict(data=n), dict(zero_stage=3)),
        Strategy("FSDP", "Data Parallelism", dict(fsdp=n)),
        Strategy("TP", "Tensor Parallelism", dict(tensor=tensor, data=rest)),
        Strategy("TP+SP", "Tensor Parallelism", dict(tensor=tensor, data=rest),
                 dict(sequence_parallel=True)),
        Strategy("PP gpipe", "Pipeline Parallelism", dict(pipeline=pipeline, fsdp=n // pipeline),
                 pipeline=dict(pipe, schedule="gpipe")),
        Strategy("PP 1f1b", "Pipeline Parallelism", dict(pipeline=pipeline, fsdp=n // pipeline),
                 pipeline=dict(pipe, schedule="1f1b")),
        Strategy("PP interleaved (v=2)", "Pipeline Parallelism",
                 dict(pipeline=pipeline, fsdp=n // pipeline),
                 pipeline=dict(pipe, schedule="interleaved", virtual_stages=2)),
        Strategy("EP (MoE, 8 experts)", None, dict(expert=8, fsdp=n // 8), moe=True),
        Strategy("CP (ring)", None, dict(context=8, fsdp=n // 8)),
        Strategy("Hybrid", "Hybrid Parallelism", hybrid, dict(sequence_parallel=True)),
    ]


def small_config():
    """A small Llama: 8 layers, d_model 256, 8 heads (tensor=8 splits them), 128 tokens a row."""
    c = base_config()
    c.model.update(vocab_size=1024, d_model=256, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=32,
                   d_ff=1024, max_seq_len=128)
    c.data.seq_len = 128
    c.train.global_batch_size = 32
    return c


def large_config(seq_len: int):
    """configs/llama3_70b.py (bfloat16 compute, float32 parameters and AdamW moments) with every
    layer recomputed in the backward (its `save_dots` needs ~145 GiB of temporaries at 8k) and one
    row of `seq_len` tokens per chip."""
    c = load_module(_host.in_repo("configs/llama3_70b.py")).get_config()
    c.model.remat = "full"
    c.data.seq_len = seq_len
    c.train.global_batch_size = 256
    return c


def configure(base, s: Strategy):
    c = base.copy_and_resolve_references()
    c.mesh.update({a: 1 for a in ("data", "fsdp", "tensor", "pipeline", "expert", "context")})
    c.mesh.update(s.mesh)
    c.parallel.update(dict(zero_stage=0, sequence_parallel=False), **s.parallel)
    c.pipeline.update(s.pipeline)
    if s.moe:  # every MLP an MoE layer of 8 experts, top 2, each a quarter of the dense MLP
        c.model.moe.update(n_experts=8, top_k=2, d_ff=c.model.d_ff // 4)
    return c


def bubble(c) -> float:
    """The schedule's idle fraction: (p-1)/(m+p-1) (gpipe, 1f1b), (p-1)/(v m+p-1) interleaved."""
    p, m, v = c.mesh.pipeline, c.pipeline.microbatches, c.pipeline.virtual_stages
    return 0.0 if p == 1 else (p - 1) / (v * m + p - 1)


def measure(base, rows: list[Strategy], devices) -> list[dict]:
    out = []
    for s in rows:
        c = configure(base, s)
        state = plan(c, len(devices))
        start = time.perf_counter()
        try:
            step: CompiledStep | str = compile_step(c, devices)
        except Exception as e:  # the TPU compiler refuses programs that do not fit in HBM
            step = re.sub(r"\s+", " ", str(e).splitlines()[0])[:160]
        seconds = time.perf_counter() - start
        out.append(dict(strategy=s, config=c, step=step, seconds=seconds,
                        state=state["param_bytes_per_device"] + state["grad_bytes_per_device"]
                        + state["opt_bytes_per_device"]))
        print(f"{s.name}: {seconds:.1f} s, {step if isinstance(step, str) else step.collectives}",
              flush=True)
    return out


def size(n: float) -> str:
    """`1.5 TiB`, `3.2 GiB`, `64.0 KiB` or `320 B`."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def sent(step: CompiledStep, axes: str | None = None) -> float:
    """Bytes sent per device per step over `axes` (a label of `collectives`), or over all."""
    return sum(b for label, ops in step.collectives.items() if axes in (None, label)
               for _, b in ops.values())


def syncs(step: CompiledStep) -> int:
    return sum(n for ops in step.collectives.values() for n, _ in ops.values())


def axis_bytes(step: CompiledStep) -> str:
    return "; ".join(f"{label or 'none'} {size(sum(b for _, b in ops.values()))}"
                     for label, ops in sorted(step.collectives.items())) or "none"


def ops_text(step: CompiledStep) -> str:
    return "; ".join(f"{label or 'none'}: " + ", ".join(
        f"{ABBREVIATIONS.get(op, 'RA2A')} {n} ({size(b)})" for op, (n, b) in ops.items() if n)
        for label, ops in sorted(step.collectives.items())) or "none"


def table(results: list[dict], unit: float, unit_name: str, timed: bool) -> list[str]:
    lines = [f"| strategy | mesh | state / device, planned ({unit_name}) | arguments / device "
             f"({unit_name}) | peak / device ({unit_name}) | bytes sent / device / step, by axis "
             f"| collectives / step | bubble | survey: memory efficiency | survey: communication "
             f"overhead | survey: sync frequency |" + (" compile (s) |" if timed else ""),
             "|---|---|---:|---:|---:|---|---:|---:|---|---|---|" + ("---:|" if timed else "")]
    for r in results:
        s, step = r["strategy"], r["step"]
        mesh = " x ".join(f"{a}={n}" for a, n in s.mesh.items() if n > 1)
        if s.parallel:
            mesh += ", " + ", ".join(f"{k}={v}" for k, v in s.parallel.items())
        if s.pipeline:
            mesh += f", microbatches={s.pipeline['microbatches']}"
        survey = SURVEY.get(s.survey, ("not in Table 1",) * 3)
        if isinstance(step, str):
            measured = f"does not fit: {step} | | | |"
        else:
            measured = (f"{step.argument_bytes / unit:.2f} | {step.peak_bytes / unit:.2f} | "
                        f"{axis_bytes(step)} | {syncs(step)}")
        lines.append(f"| {s.name} | {mesh} | {r['state'] / unit:.2f} | {measured} | "
                     f"{bubble(r['config']):.0%} | {' | '.join(survey)} |"
                     + (f" {r['seconds']:.0f} |" if timed else ""))
    return lines


def details(results: list[dict]) -> list[str]:
    lines = ["| strategy | collectives per step by axis: count (bytes sent per device; RA2A: ragged "
             "all-to-all) |", "|---|---|"]
    lines += [f"| {r['strategy'].name} | {ops_text(r['step'])} |" for r in results
              if not isinstance(r["step"], str)]
    return lines


def reading(results: list[dict], layers: int) -> list[str]:
    """The survey's cells against the small model's numbers."""
    r = {x["strategy"].name: x for x in results}
    dp, fsdp, tp, pp = r["DP"], r["FSDP"], r["TP"], r["PP gpipe"]
    return [
        f"- Memory: DP keeps the whole state on every device ({dp['state'] / fsdp['state']:.0f}x "
        f"FSDP's planned state per device, {dp['step'].argument_bytes / fsdp['step'].argument_bytes:.1f}x "
        "its compiled arguments): of the data-parallel family, only ZeRO-3/FSDP earn the survey's "
        "\"High\" memory efficiency; plain DP needs the most memory for its state here.",
        f"- Communication: the pipeline's stage buffers are small, as the survey says "
        f"({size(sent(pp['step'], 'pipeline'))} over `pipeline` a step, against DP's "
        f"{size(sent(dp['step']))} all-reduce), but the stages' own data-parallel axis still moves "
        f"the parameters ({size(sent(pp['step'], 'fsdp'))} over `fsdp`). Tensor parallelism sends "
        f"{size(sent(tp['step']))} ({sent(tp['step']) / sent(dp['step']):.1f}x DP's): activations, "
        "every layer, more than the survey's \"moderate\" suggests.",
        f"- Synchronisation: DP synchronises once a step ({syncs(dp['step'])} all-reduce), TP "
        f"{syncs(tp['step']) / layers:.1f} times a layer ({syncs(tp['step'])} for {layers} layers), "
        f"the pipeline twice a tick ({pp['step'].collectives['pipeline']['collective-permute'][0]} "
        "collective-permutes: one per microbatch and stage boundary, forward and backward), as "
        "the survey's cells say.",
    ]


def plot(parts: list[tuple[str, list[dict]]], path: str) -> None:
    """Peak memory and bytes sent per device per step of each strategy, one panel pair a part."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(parts), 2, figsize=(13, 4.2 * len(parts)), squeeze=False)
    for (title, results), (mem_ax, comm_ax) in zip(parts, axes, strict=True):
        names = [r["strategy"].name for r in results]
        fits = [not isinstance(r["step"], str) for r in results]
        peak = [r["step"].peak_bytes / GIB if ok else 0 for r, ok in zip(results, fits, strict=True)]
        sent = [sum(b for ops in r["step"].collectives.values() for _, b in ops.values()) / GIB
                if ok else 0 for r, ok in zip(results, fits, strict=True)]
        mem_ax.bar(names, peak, color=["tab:blue" if ok else "lightgray" for ok in fits])
        comm_ax.bar(names, sent, color="tab:orange")
        mem_ax.set_ylabel("peak memory / device (GiB)")
        comm_ax.set_ylabel("bytes sent / device / step (GiB)")
        comm_ax.set_yscale("log")
        for ax in (mem_ax, comm_ax):
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        for i, ok in enumerate(fits):
            if not ok:
                mem_ax.text(i, 0, "does not fit", rotation=90, fontsize=7, ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:8x8x4", help="the TPU slice of the large part")
    parser.add_argument("--seq-len", type=_host.at_least(128), default=8192)
    parser.add_argument("--skip-large", action="store_true", help="only the small model")
    parser.add_argument("--out", default=_host.in_repo("docs/results/strategies.md"))
    args = parser.parse_args()
    load, begin = os.getloadavg()[0], time.perf_counter()
    n = jax.device_count()
    if n < 8:
        parser.error(f"needs 8 devices, {n} present (on a CPU-only host they are emulated)")
    small = measure(small_config(), strategies(8, tensor=8, pipeline=4, microbatches=8,
                                               hybrid=dict(data=2, fsdp=2, tensor=2)),
                    jax.devices()[:8])
    c = small_config()
    lines = ["# Parallelism strategies: the survey's Table 1, compiled", "",
             "Generated by `python3 experiments/bench_strategies.py"
             + (f" --topology {args.topology} --seq-len {args.seq_len}`." if not args.skip_large
                else " --skip-large`."), "",
             *_host.environment_lines(load), "",
             "Each strategy's training step is compiled ahead of time (`jaxscale.planner.compiled."
             "compile_step`): per-device memory from the compiler's `memory_analysis()` (peak = "
             "arguments + outputs not aliased to them + temporaries; on a TPU slice the device "
             "memory space of the TPU compiler's memory-usage report), the bytes each device sends "
             "per step through each mesh axis's collectives (ring all-reduce 2(n-1)/n of the array,"
             " all-gather and all-to-all (n-1)/n, reduce-scatter (n-1)/n of its input, "
             "collective-permute all of it; collectives in loops times their trip count), and the "
             "collectives run per step (the survey's synchronisations). The planned state is "
             "`jaxscale.plan` (parameters, gradients, AdamW moments per device). The bubble is the "
             "schedule's: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v m+p-1) interleaved. The "
             "survey's cells are its Table 1 (data, tensor, pipeline and hybrid parallelism; ZeRO "
             "and FSDP are data parallelism there, expert and context parallelism are not in it).",
             "", f"## A small Llama on {n} devices", "",
             f"Llama, {c.model.n_layers} layers, d_model {c.model.d_model}, {c.model.n_heads} heads "
             f"of {c.model.head_dim}, d_ff {c.model.d_ff}, vocabulary {c.model.vocab_size}, "
             f"{c.data.seq_len} tokens a row, {c.train.global_batch_size} rows a step, float32; "
             "MoE variant: every MLP 8 experts of d_ff/4, top 2.", "",
             *table(small, 2**20, "MiB", False), "", *details(small), "",
             *reading(small, c.model.n_layers), ""]
    parts = [(f"small Llama, {n} {jax.devices()[0].platform} devices", small)]
    if args.skip_large:
        pass
    elif importlib.util.find_spec("libtpu") is None:
        note = ("libtpu is not installed: skipping the Llama-3-70B part (pip install libtpu, "
                "or point PYTHONPATH at a directory it was installed into with pip install --target)")
        print(note)
        lines += [f"The Llama-3-70B part was skipped: {note}.", ""]
    else:
        devices = topology_devices(args.topology)
        chips = len(devices)
        large = measure(large_config(args.seq_len),
                        strategies(chips, tensor=8, pipeline=8, microbatches=8,
                                   hybrid=dict(fsdp=chips // 8, tensor=8)), devices)
        c = large_config(args.seq_len)
        lines += [f"## Llama-3-70B on a {args.topology} slice ({chips} chips)", "",
                  f"- Compiled for {args.topology} ({chips} x {devices[0].device_kind}) by libtpu "
                  f"{importlib.metadata.version('libtpu')} on this host, which has no TPU.",
                  f"- `configs/llama3_70b.py`: {c.model.n_layers} layers, d_model {c.model.d_model}, "
                  f"d_ff {c.model.d_ff}, {c.model.n_heads} heads ({c.model.n_kv_heads} KV), "
                  f"vocabulary {c.model.vocab_size}; bfloat16 compute, float32 parameters and AdamW "
                  f"moments; `model.remat=full`; {c.data.seq_len} tokens a row, "
                  f"{c.train.global_batch_size} rows a step. MoE variant: every MLP 8 experts of "
                  "d_ff/4, top 2. Where the step does not fit in a chip's HBM the TPU compiler "
                  "stops and says so; the planned state still shows why.", "",
                  *table(large, GIB, "GiB", True), "", *details(large), ""]
        parts.append((f"Llama-3-70B, {args.topology} ({chips} chips)", large))
    lines += [f"Script run time: {time.perf_counter() - begin:.0f} s."]
    _host.write_report(lines, args.out)
    plot(parts, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
