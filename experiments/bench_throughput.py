"""Training throughput of the reference shape against the machine's GEMM roof (docs/throughput.md).

    python3 experiments/bench_throughput.py [--config configs/bench_reference.py] [--steps 12]
        [--layouts single,data8,data8_zero1,data8_zero2,fsdp8] [--out docs/results/throughput.md]
        [--no-interleave] [--profile DIR]
        [--config.<section>.<key>=<value> ...]

In one run: the roof (the best float32 2048^3 matmul on one device, measured before and after the
layouts, the better kept; or the datasheet peak of a known accelerator in the config's dtype),
then for each layout the median step time over `--steps` steps after warm-up (the layouts' steps
alternate, so the host's drift falls on all alike), its ratio to one device's, tokens/s and
MFU = tokens/s x FLOPs per token / roof. FLOPs per token are 6 x matmul parameters (output layer
included) + causal attention 6 x layers x seq x heads x head_dim. Also the same model as a
hand-written `jax.jit` step on one device. On a CPU host the 8 devices are emulated and share
the host's cores, so every layout is held to the one roof.
"""

# ruff: noqa: E402  (XLA_FLAGS must be set before jax is imported)

import os
import sys

import _host

from jaxscale.cpu import SWITCH, reexec_with_host_memory
from jaxscale.errors import UserError

# On a Linux CPU-only host, huge pages and the block cache (jaxscale/cpu.py) unless JAXSCALE_HOST_MEMORY=0.
# Interleaved layouts free blocks of several sizes between steps: the block cache keeps up to half
# the memory idle (not its eighth), or each round faults them in again (single 704 -> 607 ms).
os.environ.setdefault("JAXSCALE_BLOCK_CACHE_MB",
                      str(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**21))
os.environ.setdefault(SWITCH, "1" if sys.platform == "linux" and _host.cpu_only() else "0")
try:
    HOST_MEMORY = reexec_with_host_memory([sys.executable, *sys.argv])
except UserError as e:
    sys.exit(f"bench_throughput: {e}")
print(f"host memory: {SWITCH}={os.environ[SWITCH]}: "
      + ("glibc huge pages and the block cache (jaxscale/cpu.py) are on" if HOST_MEMORY
         else "the process's allocator as it is"), flush=True)

_host.emulate_devices()
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # an accelerator is the run's alone

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax
from bench_layouts import hand_written_step
from ml_collections import config_flags  # noqa: F401  (config files may import it)

from jaxscale import metrics
from jaxscale.cli import _parse
from jaxscale.data import build_data, make_global_batch
from jaxscale.errors import UserError
from jaxscale.mesh import AXES, describe, mesh_from_config
from jaxscale.train.trainer import build_trainer

# name: (mesh axes, parallel.zero_stage)
LAYOUTS = {"single": ({}, 0), "data8": ({"data": 8}, 0), "data8_zero1": ({"data": 8}, 1),
           "data8_zero2": ({"data": 8}, 2), "fsdp8": ({"fsdp": 8}, 0)}
WARMUP = 3


def gemm_roof(dtype: str) -> tuple[float, str]:
    """FLOP/s the model's matmuls could reach on one device."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return metrics.peak_flops_per_device(device, dtype)
    n = 2048
    x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda a: a @ a)
    for _ in range(3):
        matmul(x).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times), f"measured float32 {n}^3 GEMM, best of 10"


def rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def flops_per_token(m, seq_len: int) -> float:
    """6 x matmul parameters (output layer included) + causal attention (the issue's count):
    `metrics.flops_per_token` counts attention without the causal half."""
    return metrics.flops_per_token(m, seq_len) - 6 * m.n_layers * seq_len * m.n_heads * m.head_dim


@dataclasses.dataclass
class Run:
    """One layout's (or the hand-written step's) compiled step, state, batches and step times."""

    layout: str
    mesh: str
    step: Callable
    state: object
    batches: list
    times: list[float] = dataclasses.field(default_factory=list)
    peak: str = "-"
    update: Callable | None = None
    update_ms: float | None = None

    def tick(self, i: int) -> float:
        """Run step `i` and wait for its outputs; its wall time."""
        start = time.perf_counter()
        self.state, out = self.step(self.state, self.batches[i % len(self.batches)])
        jax.block_until_ready(out)
        return time.perf_counter() - start

    def warm_up(self) -> None:
        for i in range(WARMUP):
            self.tick(i)


def prepare_layout(config, name: str) -> Run:
    c = config.copy_and_resolve_references()
    axes, c.parallel.zero_stage = LAYOUTS[name]
    for axis in AXES:
        c.mesh[axis] = axes.get(axis, 1)
    trainer = build_trainer(c, mesh_from_config(c.mesh, jax.devices()[:math.prod(axes.values())]))
    trainer.compile()
    _, data = build_data(c)
    batches = [make_global_batch(next(data), trainer.batch_sharding) for _ in range(4)]
    zero = f", ZeRO-{c.parallel.zero_stage}" if c.parallel.zero_stage else ""
    return Run(name, describe(trainer.mesh) + zero, trainer.step, trainer.init(), batches,
               update=optimizer_update(trainer))


def optimizer_update(trainer) -> Callable:
    """The step's AdamW update on its own, in the layout's shardings: `update(state) -> state`
    with a gradient the size of the parameters, laid out like them."""
    shardings = trainer.state_shardings

    @partial(jax.jit, donate_argnums=0, out_shardings=shardings)
    def update(state):
        grads = jax.tree.map(lambda p: p * 1e-3, state.params)
        updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state)

    return update


def prepare_hand_written(config) -> Run:
    c = config.copy_and_resolve_references()
    for axis in AXES:
        c.mesh[axis] = 1
    step, state = hand_written_step(c)
    _, data = build_data(c)
    device = jax.devices()[0]
    batches = [jax.device_put(next(data), device) for _ in range(4)]
    return Run("hand-written jax.jit", "1 device", step, jax.device_put(state, device), batches)


def time_runs(prepares: list[Callable[[], Run]], steps: int, interleave: bool,
              profile: str = "") -> list[Run]:
    """Each run's `steps` timed steps after `WARMUP` untimed ones.

    With `interleave` (and more than one run), all runs are prepared and warmed up first, then
    timed in rounds of one step each (the order reversed every other round), so drift in the
    host's speed falls on all of them alike; their peak memory is then not told apart.
    Otherwise each is timed in turn, its peak memory read, and its state freed before the next.
    With `profile`, 3 more steps of each layout are traced into `profile/<layout>`.
    """
    interleave = interleave and len(prepares) > 1
    runs = []
    for prepare in prepares:
        runs.append(run := prepare())
        run.warm_up()
        if not interleave:
            run.times = [run.tick(i) for i in range(WARMUP, WARMUP + steps)]
            run.peak = peak_memory()
            finish(run, profile)
    if interleave:
        for i in range(WARMUP, WARMUP + steps):
            for run in runs if i % 2 else runs[::-1]:
                run.times.append(run.tick(i))
        for run in runs:
            finish(run, profile)
    return runs


def finish(run: Run, profile: str) -> None:
    """Trace 3 more steps of a layout into `profile/<layout>` (TensorBoard, Perfetto) if asked;
    time its optimizer update alone (median of 5 after 2); free its state."""
    if profile and run.layout in LAYOUTS:
        with jax.profiler.trace(os.path.join(profile, run.layout), create_perfetto_trace=True):
            for i in range(3):
                run.tick(i)
    if run.update is not None:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            run.state = jax.block_until_ready(run.update(run.state))
            times.append(time.perf_counter() - start)
        run.update_ms = statistics.median(times[2:]) * 1e3
    run.state = None


def peak_memory() -> str:
    """The first device's peak allocation so far in GiB, where the platform reports it (not CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return "-" if peak is None else f"{peak / 2**30:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=_host.in_repo("configs/bench_reference.py"))
    p.add_argument("--steps", type=_host.at_least(1), default=12)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--hand-written", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=_host.in_repo("docs/results/throughput.md"))
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="time the layouts in alternating rounds of one step (all held at once)")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="also trace 3 steps of each layout into DIR/<layout> (jax.profiler)")
    args, overrides = p.parse_known_args()
    if stray := [o for o in overrides if not o.startswith("--config.")]:
        p.error(f"unknown argument {stray[0]!r}; config overrides look like --config.model.remat=full")
    if unknown := [n for n in args.layouts.split(",") if n and n not in LAYOUTS]:
        p.error(f"unknown layout {unknown[0]!r}; use any of {', '.join(LAYOUTS)}")
    try:
        config, _ = _parse(["--config", args.config, *overrides])
    except UserError as e:
        p.error(str(e))
    load = os.getloadavg()[0]
    tokens = config.train.global_batch_size * config.data.seq_len
    fpt = flops_per_token(config.model, config.data.seq_len)
    roof, roof_source = gemm_roof(config.model.dtype)
    print(f"roof {rate(roof)} ({roof_source}); {fpt / 1e6:.2f} MFLOP/token; "
          f"{tokens} tokens/step", flush=True)
    prepares = []
    for name in [n for n in args.layouts.split(",") if n]:
        if math.prod(LAYOUTS[name][0].values()) > jax.device_count():
            print(f"skip {name}: needs more devices than the {jax.device_count()} present")
            continue
        prepares.append(partial(prepare_layout, config, name))
        if name == "single" and args.hand_written:
            prepares.append(partial(prepare_hand_written, config))
    runs = time_runs(prepares, args.steps, args.interleave, args.profile)
    if jax.devices()[0].platform == "cpu":  # the host's speed drifts: the roof is the better of two
        again, _ = gemm_roof(config.model.dtype)
        roof_source += f" at the start ({roof / 1e9:.1f}) and at the end ({again / 1e9:.1f})"
        roof = max(roof, again)
        print(f"roof at the end {again / 1e9:.1f} GFLOP/s; using {roof / 1e9:.1f}", flush=True)
    single = next((statistics.median(r.times) for r in runs if r.layout == "single"), None)
    lines = [f"# Training throughput of `{args.config}`", "",
             *_host.environment_lines(load),
             f"- Host memory: {SWITCH}={os.environ[SWITCH]}; GLIBC_TUNABLES: "
             f"`{os.environ.get('GLIBC_TUNABLES', '')}`; LD_PRELOAD: "
             f"`{os.path.basename(os.environ.get('LD_PRELOAD', '')) or 'none'}` (jaxscale/cpu.py), "
             f"JAXSCALE_BLOCK_CACHE_MB={os.environ.get('JAXSCALE_BLOCK_CACHE_MB', '')}",
             f"- Config: `{args.config}` {' '.join(overrides)}; {tokens} tokens/step; "
             f"{fpt / 1e6:.2f} MFLOP/token (6 x matmul params + causal attention)",
             f"- Roof: {rate(roof)} ({roof_source})",
             f"- Median over {args.steps} steps after {WARMUP} warm-up steps"
             + (", the layouts' steps alternating" if args.interleave and len(runs) > 1 else "")
             + " (`experiments/bench_throughput.py`)", "",
             "| layout | mesh | median step (ms) | min step (ms) | vs one device | tokens/s "
             "| MFU of roof | peak memory (GiB) | AdamW update alone (ms) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        med = statistics.median(run.times)
        mfu = tokens / med * fpt / roof
        print(f"{run.layout:>22}: {med * 1e3:8.1f} ms/step  {tokens / med:8.0f} tok/s  "
              f"MFU {mfu:6.1%}  peak {run.peak} GiB  update {run.update_ms or 0:.1f} ms"
              + (f"  x{med / single:.3f} of one device" if single else ""),
              flush=True)
        ratio = f"{med / single:.3f}" if single else "-"
        lines.append(f"| {run.layout} | {run.mesh} | {med * 1e3:.1f} | "
                     f"{min(run.times) * 1e3:.1f} | {ratio} | {tokens / med:.0f} | {mfu:.1%} "
                     f"| {run.peak} | {'-' if run.update_ms is None else f'{run.update_ms:.1f}'} |")
    if args.out:
        _host.write_report(lines, args.out)


if __name__ == "__main__":
    main()
