"""Benchmark mixture-of-experts training: MoE against dense, dropless against capacity, and the
all-to-all volume of expert-parallel layouts.

    python3 experiments/bench_moe.py [--steps N] [--out docs/results/moe.md]

1. On one device: tokens/s and MFU (on active parameters) of a small MoE Llama (8 experts, top 2)
   against the dense Llama whose MLP has the width of the two experts a token uses (the same
   active parameters but the router's), and the MoE model with capacity factors 1.0 and 1.25
   (tokens/s, fraction dropped).
2. On 8 devices (emulated on a CPU-only host): for each expert-parallel layout the all-to-alls in
   the compiled step's HLO (count and bytes of their per-device results) next to the analytic
   volume of the program compiled (`expert_parallel.py`; on XLA:CPU the dropless exchange is the
   padded form of `jaxscale.cpu.ragged_all_to_all`), and the volume the ragged exchange moves on
   GPUs and TPUs under uniform routing.
"""

# ruff: noqa: E402  (XLA_FLAGS must be set before jax is imported)

import _host

_host.emulate_devices()

import argparse
import os
import time

import jax

from jaxscale import metrics
from jaxscale.config import base_config, validate
from jaxscale.data import build_data, make_global_batch
from jaxscale.default_config import SMALL_MODEL
from jaxscale.hlo import collective_stats, format_bytes
from jaxscale.mesh import AXES, describe, mesh_from_config
from jaxscale.models import param_count
from jaxscale.models.moe import MoEConfig
from jaxscale.train.trainer import build_trainer

WARMUP_STEPS = 2
EXPERTS, TOP_K, EXPERT_FF = 8, 2, 192
MODELS = {  # name: (model.d_ff, model.moe settings)
    "dense (d_ff 384)": (TOP_K * EXPERT_FF, {}),
    "MoE dropless": (768, dict(n_experts=EXPERTS)),
    "MoE capacity 1.0": (768, dict(n_experts=EXPERTS, dispatch="capacity", capacity_factor=1.0)),
    "MoE capacity 1.25": (768, dict(n_experts=EXPERTS, dispatch="capacity", capacity_factor=1.25)),
}
LAYOUTS = (  # (mesh, model.moe settings)
    (dict(expert=8), {}),
    (dict(expert=4, data=2), {}),
    (dict(expert=2, fsdp=2, tensor=2), {}),
    (dict(expert=8), dict(dispatch="capacity", capacity_factor=1.25)),
)


def bench_config(d_ff: int, moe: dict, mesh: dict | None = None):
    """The fixed model and batch; `moe` switches its MLPs to experts."""
    c = base_config()
    c.model.update(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                   d_ff=d_ff, max_seq_len=128, **SMALL_MODEL)
    if moe:
        c.model.moe.update(top_k=TOP_K, d_ff=EXPERT_FF, **moe)
    c.data.seq_len = 128
    c.train.global_batch_size = 16
    for axis in AXES:
        c.mesh[axis] = (mesh or {}).get(axis, 1)
    validate(c)
    return c


def timed(config, devices, steps: int) -> tuple[float, dict, object]:
    """Seconds per step (after warm-up), the last metrics, and the trainer."""
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
    _, data = build_data(config)
    state = trainer.init()
    for _ in range(WARMUP_STEPS):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    jax.block_until_ready((state, out))
    start = time.perf_counter()
    for _ in range(steps):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    jax.block_until_ready((state, out))
    return (time.perf_counter() - start) / steps, {k: float(v) for k, v in out.items()}, trainer


def model_rows(steps: int) -> list[dict]:
    peak, _ = metrics.peak_flops_per_device(dtype="float32", cpu_devices=1)
    rows = []
    for name, (d_ff, moe) in MODELS.items():
        config = bench_config(d_ff, moe)
        seconds, out, _ = timed(config, jax.devices()[:1], steps)
        tokens = config.train.global_batch_size * config.data.seq_len
        fpt = metrics.flops_per_token(config.model, config.data.seq_len)
        tput = metrics.throughput_metrics(tokens, seconds, fpt, 1, peak)
        rows.append({"model": name, "params": param_count(config.model),
                     "active": param_count(config.model, active=True), "step_ms": seconds * 1e3,
                     "dropped": out.get("moe_dropped_fraction", 0.0),
                     "spread": out.get("expert_load_max_mean", 1.0), **tput})
        print(f"{name:>18}: {seconds * 1e3:8.1f} ms/step {tput['tokens_per_s']:9.0f} tok/s", flush=True)
    return rows


def analytic(config, mesh) -> tuple[float, float]:
    """All-to-all bytes per device and step: of the program compiled here, and of the ragged
    exchange under uniform routing (dropless; capacity exchanges the same buffers everywhere)."""
    m, x = config.model, mesh.shape["expert"]
    batch_split = mesh.shape["data"] * mesh.shape["fsdp"] * x  # the batch's axes
    local_rows = config.train.global_batch_size // batch_split * config.data.seq_len  # tokens
    assignments = local_rows * m.moe.top_k
    per_row = m.d_model * 4  # float32
    layers = m.n_layers
    if m.moe.dispatch == "capacity":  # [experts, rows x slots, d] each way, forward and backward
        capacity = MoEConfig(**m.moe).capacity(config.data.seq_len)
        slots = m.moe.n_experts * local_rows // config.data.seq_len * capacity
        volume = 4 * layers * slots * per_row
        return volume, volume
    counts = (m.moe.n_experts + 5 * x) * 4  # per layer, forward: counts [x, E/x], 5 of [x] (int32)
    padded = 4 * layers * x * assignments * per_row + layers * counts  # each chunk padded to all rows
    ragged = 4 * layers * (x - 1) / x * assignments * per_row  # the rows that leave the device
    return padded, ragged


def layout_rows() -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    if jax.device_count() < 8:
        skipped.append(f"expert-parallel layouts: need 8 devices, {jax.device_count()} present")
        return rows, skipped
    for mesh_sizes, moe in LAYOUTS:
        config = bench_config(768, dict(n_experts=EXPERTS, **moe), mesh_sizes)
        trainer = build_trainer(config, mesh_from_config(config.mesh, jax.devices()[:8]))
        count, size = collective_stats(trainer.compile().as_text())["all-to-all"]
        padded, ragged = analytic(config, trainer.mesh)
        rows.append({"mesh": describe(trainer.mesh), "dispatch": config.model.moe.dispatch,
                     "count": count, "bytes": size, "analytic": padded, "ragged": ragged})
        print(f"{rows[-1]['mesh']:>24} {rows[-1]['dispatch']:>9}: A2A {count} "
              f"({format_bytes(size)}; analytic {format_bytes(padded)})", flush=True)
    return rows, skipped


def report(models: list[dict], layouts: list[dict], skipped: list[str], steps: int, load: float,
           seconds: float) -> list[str]:
    c = bench_config(768, dict(n_experts=EXPERTS))
    m = c.model
    lines = ["# Mixture of experts: throughput, dispatch and expert-parallel all-to-alls", "",
             f"Generated by `python3 experiments/bench_moe.py --steps {steps}` ({WARMUP_STEPS} warm-up "
             f"steps, then {steps} timed).", "", *_host.environment_lines(load),
             f"- Model: Llama, d_model {m.d_model}, {m.n_layers} layers (unrolled, einsum attention), "
             f"{m.n_heads} heads ({m.n_kv_heads} kv), vocab {m.vocab_size}, seq_len {c.data.seq_len}, "
             f"global batch {c.train.global_batch_size}, float32; MoE: {EXPERTS} experts of d_ff "
             f"{EXPERT_FF}, top {TOP_K}, softmax router, in every layer.", "",
             "## MoE against dense (one device)", "",
             "| model | parameters | active / token | ms/step | tokens/s | MFU (active) | "
             "load max/mean | dropped |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in models:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['active']:,} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['spread']:.2f} | "
                     f"{r['dropped']:.1%} |")
    dense, dropless = models[0], models[1]
    ratio = dropless["tokens_per_s"] / dense["tokens_per_s"]
    lines += ["", f"MoE dropless / dense tokens/s: **{ratio:.2f}** (same run). Load max/mean and "
              f"dropped are the last timed step's ({WARMUP_STEPS + steps} steps from initialisation, "
              "routing still unbalanced: capacity dispatch drops what overflows the busiest experts)."]
    if jax.devices()[0].platform == "cpu":
        lines += ["", "On XLA:CPU `jax.lax.ragged_dot` is computed as a dense matmul against every "
                  f"expert (masked), so a dropless MoE layer does about {EXPERTS // TOP_K}x its "
                  "FLOPs here; capacity dispatch runs each expert on its own slots only. Neither "
                  "holds on GPUs and TPUs, where the grouped matmul runs each expert on its rows."]
    lines += ["", "## Expert-parallel all-to-alls (8 devices)", "",
              "| mesh | dispatch | all-to-alls in HLO | their bytes / device / step | analytic (this "
              "program) | ragged exchange on GPU/TPU (uniform routing) |", "|---|---|---:|---:|---:|---:|"]
    for r in layouts:
        lines.append(f"| {r['mesh']} | {r['dispatch']} | {r['count']} | {format_bytes(r['bytes'])} | "
                     f"{format_bytes(r['analytic'])} | {format_bytes(r['ragged'])} |")
    lines += ["", "Bytes are the per-device results of the all-to-alls in the optimized HLO "
              "(`jaxscale.hlo.collective_stats`; every layer is in the program, unrolled). Analytic: "
              "per MoE layer, the dispatch and the return exchange forward and their transposes "
              "backward, each of the device's `rows x top_k` assignments of `d_model` float32 "
              "values; on XLA:CPU, which has no ragged all-to-all, each of the `expert` chunks is "
              "padded to all of them (plus the int32 counts and offsets). On GPUs and TPUs "
              "`ragged_all_to_all` moves only the rows bound for other devices: `(X - 1) / X` of "
              "them when routing is uniform. Capacity dispatch exchanges the fixed "
              "[experts, slots, d_model] buffers on every platform."]
    lines += [""] + [f"Skipped {why}." for why in skipped] if skipped else []
    return lines + ["", f"Script run time: {seconds:.0f} s."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_host.at_least(1), default=10, help="timed steps per model")
    parser.add_argument("--out", default=_host.in_repo("docs/results/moe.md"), help="markdown file")
    args = parser.parse_args()
    begin, load = time.perf_counter(), os.getloadavg()[0]
    models = model_rows(args.steps)
    layouts, skipped = layout_rows()
    _host.write_report(report(models, layouts, skipped, args.steps, load, time.perf_counter() - begin),
                       args.out)


if __name__ == "__main__":
    main()
