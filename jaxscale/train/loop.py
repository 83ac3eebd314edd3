"""`train(config)`: data, mesh, trainer, the step loop, and metrics every `train.log_every` steps."""

from __future__ import annotations

import logging

import jax
from tqdm import tqdm

from jaxscale import metrics
from jaxscale.config import validate
from jaxscale.data import build_data, make_global_batch
from jaxscale.mesh import describe, mesh_from_config
from jaxscale.train.trainer import build_trainer

log = logging.getLogger("jaxscale")


def train(config, *, progress: bool = True) -> list[dict]:
    """Train as the config says; return the logged metrics (also in `<run_dir>/metrics.jsonl`)."""
    validate(config)
    mesh = mesh_from_config(config.mesh)
    _, data = build_data(config)
    trainer = build_trainer(config, mesh)
    compiled = trainer.compile()
    mem = compiled.memory_analysis()
    log.info("mesh %s on %d %s devices; step needs %.1f MiB per device (args %.1f, temp %.1f)",
             describe(mesh), mesh.size, jax.devices()[0].platform,
             _mib(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
             _mib(mem.argument_size_in_bytes), _mib(mem.temp_size_in_bytes))

    state = trainer.init()
    seq_len, steps = config.data.seq_len, config.train.steps
    flops_per_token = metrics.flops_per_token(config.model, seq_len)
    peak, peak_source = metrics.peak_flops_per_device(dtype=config.model.dtype,
                                                      cpu_devices=mesh.local_mesh.size)
    log.info("peak %.1f TFLOP/s per device (%s)", peak / 1e12, peak_source)
    timer = metrics.StepTimer()
    history = []
    with metrics.MetricsWriter(config.run_dir) as writer:
        writer.write_config(config.to_json_best_effort(indent=2))
        bar = tqdm(range(steps), desc="train", disable=not progress, dynamic_ncols=True)
        for i in bar:
            batch = make_global_batch(next(data), trainer.batch_sharding)
            state, out = trainer.step(state, batch)
            timer.add(config.train.global_batch_size * seq_len)
            if i == 0:  # keep dispatch and first-run costs out of the throughput window
                jax.block_until_ready(out)
                timer.reset()
            if i == 0 or (i + 1) % config.train.log_every == 0 or i + 1 == steps:
                row = {k: float(v) for k, v in jax.device_get(out).items()}
                tokens, seconds = timer.lap()
                if tokens and seconds > 0:
                    row.update(metrics.throughput_metrics(tokens, seconds, flops_per_token,
                                                          mesh.size, peak))
                row.update(metrics.device_memory_stats())
                writer.write(i + 1, row)
                history.append({"step": i + 1, **row})
                bar.set_postfix(loss=f"{row['loss']:.3f}",
                                tok_s=f"{row.get('tokens_per_s', 0):.0f}")
    return history


def _mib(n: int) -> float:
    return n / 2**20
