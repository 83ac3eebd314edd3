"""Benchmark mesh layouts of one small Llama: throughput, MFU, compiled memory and collectives.

    python3 experiments/bench_layouts.py [--steps N] [--out docs/results/layouts.md]

For each layout (single device, DP, ZeRO-1/2/3, FSDP, TP, TP+SP, hybrid) the jaxscale train step is
compiled ahead of time, its memory and the collectives in its optimized HLO are recorded, and it
is timed on real batches. Then a single-device jaxscale step is timed against a minimal hand-written
`jax.jit` step of the same model. On a CPU-only host 8 devices are emulated (unless XLA_FLAGS is
already set); they share the host's cores, so the numbers measure plumbing and communication volume,
not accelerator performance.
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
import jax.numpy as jnp
import optax
from flax import nnx

from jaxscale import metrics
from jaxscale.config import base_config, validate
from jaxscale.data import build_data, make_global_batch
from jaxscale.hlo import collective_stats, format_stats
from jaxscale.mesh import AXES, describe, mesh_from_config
from jaxscale.models import Llama, LlamaConfig, param_count
from jaxscale.train.optim import make_optimizer
from jaxscale.train.trainer import build_trainer

WARMUP_STEPS = 2
OVERHEAD_ROUNDS = 20  # one step of each per round, alternating which goes first
MIB = 2**20


class Case(NamedTuple):
    """One layout: mesh axis sizes (others 1) and the parallel settings."""

    name: str
    mesh: dict[str, int]
    zero_stage: int = 0
    sequence_parallel: bool = False

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())


CASES = (
    Case("single device", {}),
    Case("DP", {"data": 8}),
    Case("ZeRO-1", {"data": 8}, zero_stage=1),
    Case("ZeRO-2", {"data": 8}, zero_stage=2),
    Case("ZeRO-3", {"data": 8}, zero_stage=3),
    Case("FSDP", {"fsdp": 8}),
    Case("TP", {"data": 2, "tensor": 4}),
    Case("TP+SP", {"data": 2, "tensor": 4}, sequence_parallel=True),
    Case("hybrid", {"data": 2, "fsdp": 2, "tensor": 2}),
)


def bench_config():
    """The fixed model and batch shared by every layout."""
    c = base_config()
    c.model.update(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                   d_ff=768, max_seq_len=128)
    c.data.seq_len = 128
    c.train.global_batch_size = 16
    return c


def case_config(base, case: Case):
    """`base` with the case's mesh and parallel settings."""
    c = base.copy_and_resolve_references()
    for axis in AXES:
        c.mesh[axis] = case.mesh.get(axis, 1)
    c.parallel.zero_stage = case.zero_stage
    c.parallel.sequence_parallel = case.sequence_parallel
    validate(c)
    return c


# ---------------------------------------------------------------------------------------------
# Collectives in the compiled HLO


# ---------------------------------------------------------------------------------------------
# Layouts


def run_case(config, case: Case, data, steps: int) -> dict:
    """Compile, measure and time one layout; return a table row."""
    mesh = mesh_from_config(config.mesh, jax.devices()[:case.num_devices])
    trainer = build_trainer(config, mesh)
    compiled = trainer.compile()
    mem = compiled.memory_analysis()
    found = collective_stats(compiled.as_text())

    state = trainer.init()
    for _ in range(WARMUP_STEPS):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    jax.block_until_ready((state, out))
    start = time.perf_counter()
    for _ in range(steps):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    jax.block_until_ready((state, out))
    seconds = time.perf_counter() - start

    tokens = steps * config.train.global_batch_size * config.data.seq_len
    fpt = metrics.flops_per_token(config.model, config.data.seq_len)
    mesh_peak, _ = metrics.peak_flops_per_device(dtype=config.model.dtype, cpu_devices=mesh.size)
    tput = metrics.throughput_metrics(tokens, seconds, fpt, mesh.size, mesh_peak)
    return {"layout": case.name, "mesh": describe(mesh), "zero": case.zero_stage,
            "step_s": seconds / steps, **tput,
            "mem_mib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / MIB,
            "collectives": format_stats(found)}


def run_cases(base, steps: int) -> tuple[list[dict], list[str]]:
    """Rows for every layout that fits the devices present, and why the others were skipped."""
    _, data = build_data(base)
    rows, skipped = [], []
    for case in CASES:
        if case.num_devices > jax.device_count():
            why = f"{case.name}: needs {case.num_devices} devices, {jax.device_count()} present"
            if jax.devices()[0].platform == "cpu":
                why += f" (XLA_FLAGS=\"{_host.HOST_FLAGS}\" emulates 8)"
            print(f"skip {why}", flush=True)
            skipped.append(why)
            continue
        row = run_case(case_config(base, case), case, data, steps)
        print(f"{row['layout']:>14}: {row['step_s'] * 1e3:8.1f} ms/step  "
              f"{row['tokens_per_s']:9.0f} tok/s  {row['collectives']}", flush=True)
        rows.append(row)
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# Overhead: jaxscale's step against a hand-written jit step, on one device


def hand_written_step(config):
    """A minimal jitted AdamW step of the same model: no sharding, no shard_map. Returns (step, state)."""
    model = Llama(LlamaConfig.from_config(config.model), nnx.Rngs(params=config.seed))
    graphdef, params = nnx.split(model)
    tx, _ = make_optimizer(config.optim, config.train.steps)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(xent * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), (params, tx.init(params))


def _timed_steps(step, state, batches):
    """Run `step` once per batch; return the final state and each step's wall time."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready((state, out))
        times.append(time.perf_counter() - start)
    return state, times


def overhead_ratio(base) -> dict:
    """Median step times of jaxscale and the hand-written step, timed alternately step by step."""
    config = case_config(base, CASES[0])
    trainer = build_trainer(config, mesh_from_config(config.mesh, jax.devices()[:1]))
    _, data = build_data(config)
    batches = [make_global_batch(next(data), trainer.batch_sharding) for _ in range(WARMUP_STEPS)]
    hand, hand_state = hand_written_step(config)
    steps = {"jaxscale": trainer.step, "hand-written": hand}
    states = {"jaxscale": trainer.init(), "hand-written": hand_state}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name in steps:  # warm-up: compile and first runs
        states[name], _ = _timed_steps(steps[name], states[name], batches)
    for r in range(OVERHEAD_ROUNDS):
        for name in list(steps)[::1 if r % 2 == 0 else -1]:
            states[name], t = _timed_steps(steps[name], states[name], [batches[r % len(batches)]])
            times[name] += t
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    return {"jaxscale_s": med["jaxscale"], "hand_s": med["hand-written"],
            "ratio": med["hand-written"] / med["jaxscale"],
            "best_ratio": best["hand-written"] / best["jaxscale"]}


# ---------------------------------------------------------------------------------------------
# Report


def model_shape(c) -> str:
    m = c.model
    return (f"Llama, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv, "
            f"head_dim {m.head_dim}), d_ff {m.d_ff}, vocab {m.vocab_size}, seq_len {c.data.seq_len}, "
            f"global batch {c.train.global_batch_size}, {m.dtype}; "
            f"{param_count(m) / 1e6:.2f}M parameters, "
            f"{metrics.flops_per_token(m, c.data.seq_len) / 1e6:.1f} MFLOP/token")


def header(config, steps: int, peak: float, peak_source: str, load: float) -> list[str]:
    dev, n = jax.devices()[0], jax.device_count()
    lines = [
        "# Mesh layouts: throughput, memory and collectives", "",
        f"Generated by `python3 experiments/bench_layouts.py --steps {steps}` ({WARMUP_STEPS} warm-up "
        f"steps, then {steps} timed steps per layout).", "",
        *_host.environment_lines(load),
        f"- Model: {model_shape(config)}",
        f"- Peak: {peak / 1e12:.4g} TFLOP/s per device ({peak_source})",
    ]
    if dev.platform == "cpu":
        lines += [
            f"- On CPU the {n} devices share the host, so MFU uses host peak / n per device for a mesh "
            "of n devices (the single-device row gets the whole host's peak).",
            "- Note: an emulated CPU mesh measures plumbing and communication volume, not accelerator "
            f"performance: the {n} \"devices\" share {os.cpu_count()} cores, so a collective is a "
            "memory copy and more devices do not mean more compute.",
        ]
    return lines + [""]


def table(rows: list[dict]) -> list[str]:
    lines = ["| layout | mesh | zero stage | tokens/s | TFLOP/s/device | MFU | memory/device (MiB) "
             "| collectives |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['mesh']} | {r['zero']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops_per_device']:.3g} | {r['mfu']:.1%} | {r['mem_mib']:.1f} | "
                     f"{r['collectives']} |")
    return lines


def footer(skipped: list[str], overhead: dict, seconds: float) -> list[str]:
    lines = ["", "Memory is the compiled step's argument + temporary bytes per device "
             "(`memory_analysis()`). Collectives are counted in the optimized HLO by "
             "`jaxscale.hlo.collective_stats` (`op(` and `op-start(` forms; an op inside a loop counts "
             "once), with the bytes of each op's per-device result; AR all-reduce, AG all-gather, "
             "RS reduce-scatter, A2A all-to-all, CP collective-permute."]
    if skipped:
        lines += [""] + [f"Skipped {why}." for why in skipped]
    lines += ["", f"Overhead ratio (one device; hand-written `jax.jit` step time / jaxscale step time; "
              f"medians of {OVERHEAD_ROUNDS} steps each, alternating): "
              f"{overhead['hand_s'] * 1e3:.1f} ms / {overhead['jaxscale_s'] * 1e3:.1f} ms = "
              f"**{overhead['ratio']:.3f}** (goal >= 0.97); fastest steps: {overhead['best_ratio']:.3f}.",
              "", f"Script run time: {seconds:.0f} s."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_host.at_least(1), default=10, help="timed steps per layout")
    parser.add_argument("--out", default=_host.in_repo("docs/results/layouts.md"),
                        help="markdown file to write")
    args = parser.parse_args()
    begin, load = time.perf_counter(), os.getloadavg()[0]
    config = bench_config()
    peak, peak_source = metrics.peak_flops_per_device(dtype=config.model.dtype)
    rows, skipped = run_cases(config, args.steps)
    overhead = overhead_ratio(config)
    _host.write_report(header(config, args.steps, peak, peak_source, load) + table(rows)
                       + footer(skipped, overhead, time.perf_counter() - begin), args.out)


if __name__ == "__main__":
    main()
