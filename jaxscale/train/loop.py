"""`train(config)`: data, mesh, trainer, the step loop, and metrics every `train.log_every` steps."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import jax
import ml_collections
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxscale import metrics
from jaxscale.checkpoint import Checkpointer, parse_init_params_from
from jaxscale.config import validate
from jaxscale.data import DataIterator, build_data, make_global_batch
from jaxscale.data.loader import process_rows
from jaxscale.errors import UserError
from jaxscale.mesh import describe, mesh_from_config
from jaxscale.train import lora
from jaxscale.train.step import TrainState
from jaxscale.train.trainer import Trainer, build_trainer

log = logging.getLogger("jaxscale")


class NonFiniteError(UserError):
    """A step's loss or gradient norm was not finite (more often than the config allows)."""


def train(config, *, progress: bool = True, stop_at: int | None = None) -> list[dict]:
    """Train as the config says; return the metrics logged by this call.

    Resumes from the run's latest complete checkpoint when there is one. SIGTERM or SIGINT
    saves a checkpoint at the current step and returns. `stop_at` ends the run after that step
    (with a checkpoint), as a preemption would.
    """
    validate(config)
    mesh = mesh_from_config(config.mesh)
    _, data = build_data(config)
    trainer = build_trainer(config, mesh)
    data.rows = process_rows(trainer.batch_sharding, config.train.global_batch_size)
    ckpt_cfg = config.checkpoint
    ckpt = Checkpointer(ckpt_cfg.dir or os.path.join(config.run_dir, "checkpoints"),
                        keep=ckpt_cfg.keep, keep_every=ckpt_cfg.keep_every,
                        async_save=ckpt_cfg.async_save)
    with contextlib.ExitStack() as stack:
        stack.enter_context(ckpt)
        stack.enter_context(data)  # stops its prefetch workers
        state = initial_state(config, trainer, data, ckpt)  # fails before anything is written
        first = int(state.step)
        last = min(config.train.steps, stop_at) if stop_at is not None else config.train.steps
        if first >= last:  # already there: nothing to compile, write or measure
            return []
        writer = stack.enter_context(metrics.MetricsWriter(config.run_dir))
        signals = stack.enter_context(_Signals(multi_process=jax.process_count() > 1))
        config_json = config.to_json_best_effort(indent=2)
        writer.write_config(config_json)
        compiled = trainer.compile()
        mem = compiled.memory_analysis()
        log.info("mesh %s on %d %s devices; step needs %.1f MiB per device (args %.1f, temp %.1f)",
                 describe(mesh), mesh.size, jax.devices()[0].platform,
                 _mib(mem.argument_size_in_bytes + mem.temp_size_in_bytes),
                 _mib(mem.argument_size_in_bytes), _mib(mem.temp_size_in_bytes))
        seq_len, steps = config.data.seq_len, config.train.steps
        flops_per_token = metrics.train_flops_per_token(config)
        peak, peak_source = metrics.peak_flops_per_device(dtype=config.model.dtype,
                                                          cpu_devices=mesh.local_mesh.size)
        log.info("peak %.1f TFLOP/s per device (%s)", peak / 1e12, peak_source)
        timer = metrics.StepTimer()
        nonfinite = _NonFinite(config.train.max_nonfinite_steps, ckpt)
        history = []
        data_wait = 0.0  # seconds spent waiting for batches since the last logged step
        bar = tqdm(range(first, last), desc="train", disable=not progress, dynamic_ncols=True,
                   initial=first, total=steps)
        for i in bar:
            start = time.perf_counter()
            local = next(data)
            data_wait += time.perf_counter() - start
            batch = make_global_batch(local, trainer.batch_sharding, config.train.global_batch_size)
            state, out = trainer.step(state, batch)
            timer.add(config.train.global_batch_size * seq_len)
            if i == first:  # keep dispatch and first-run costs out of the throughput window
                jax.block_until_ready(out)
                timer.reset()
            done = i + 1
            nonfinite.add(done, out)
            ckpt.check()  # a background save that failed stops the run here
            if i == first or done % config.train.log_every == 0 or done == last:
                nonfinite.judge()
                row = {k: float(v) for k, v in jax.device_get(out).items()}
                tokens, seconds = timer.lap()
                if tokens and seconds > 0:
                    row.update(metrics.throughput_metrics(tokens, seconds, flops_per_token,
                                                          mesh.size, peak))
                    row["data_wait_pct"] = 100 * data_wait / seconds
                row["data_wait_s"], data_wait = data_wait, 0.0
                row.update(metrics.device_memory_stats())
                row.update(metrics.host_memory_stats())
                row["nonfinite_steps"] = nonfinite.count
                writer.write(done, row)
                history.append({"step": done, **row})
                bar.set_postfix(loss=f"{row['loss']:.3f}",
                                tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                                data=f"{row.get('data_wait_pct', 0):.1f}%")
            periodic = ckpt_cfg.every and done % ckpt_cfg.every == 0
            stop = signals.check(done)
            if periodic or done == last or stop:
                nonfinite.judge()  # never save a step that stops the run
                ckpt.save(done, lora.checkpointed(trainer.to_canonical(state), trainer),
                          data.get_state(), config_json)
            if stop:
                log.info("received %s: saved a checkpoint at step %d; exiting",
                         signals.received, done)
                break
        nonfinite.judge()
        bar.close()
    return history


def initial_state(config: ml_collections.ConfigDict, trainer: Trainer, data: DataIterator | None,
                  ckpt: Checkpointer) -> TrainState:
    """The state a run starts from: `ckpt`'s latest (or `checkpoint.resume_step`) checkpoint,
    `data` (when given) set to where it stopped; else a fresh one, its parameters (or some
    groups) read from `checkpoint.init_params_from` when set. With `model.lora` the checkpoint
    holds the adapters and `checkpoint.init_params_from` the base (`train/lora.py`)."""
    ckpt_cfg = config.checkpoint
    step = ckpt_cfg.resume_step if ckpt_cfg.resume_step >= 0 else None
    if ckpt.steps() or step is not None:
        state, data_state, step = ckpt.restore(
            lora.checkpointed(trainer.abstract_state(canonical=True), trainer), step)
        if data is not None:
            data.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, step)
        return trainer.from_canonical(lora.with_base(config, trainer, state) if trainer.lora
                                      else state)
    if trainer.lora:  # fresh adapters on the base
        return trainer.from_canonical(lora.with_base(config, trainer,
                                                     trainer.to_canonical(trainer.init())))
    loaded = _read_init_params(ckpt_cfg.init_params_from, trainer)  # errors before init's compile
    state = trainer.init()
    if None in loaded:
        return trainer.with_params(state, trainer.from_canonical(loaded[None]))
    if loaded:  # the other groups keep their fresh initialisation
        params = trainer.to_canonical(state.params)
        for group, subtree in loaded.items():
            params[group] = subtree
        state = trainer.with_params(state, trainer.from_canonical(params))
    return state


def _read_init_params(spec: str, trainer) -> dict:
    """`{group: subtree}` as `checkpoint.init_params_from` says (`{None: params}`: the whole
    model; `{}`: nothing), in checkpoint form and in the current mesh's shardings."""
    if not spec:
        return {}
    abstract = trainer.abstract_state(canonical=True).params
    loaded = {}
    for group, directory in parse_init_params_from(spec, list(abstract)).items():
        source = Checkpointer(directory, read_only=True)
        if group is None:
            loaded[None] = source.restore_params(abstract)
        else:
            loaded[group] = source.restore_params(abstract, groups=(group,))[group]
        log.info("initialised %s from %s", group or "parameters", source.directory)
    return loaded


class _NonFinite:
    """Stop the run at a step whose loss or gradient norm is not finite (the step applied no
    update), or skip up to `limit` such steps; `count` is how many were skipped so far.

    Steps' flags stay on the device until `judge` reads them together (at logging and saving
    steps), so checking adds no host-device synchronisation to the steps between.
    """

    def __init__(self, limit: int, ckpt: Checkpointer):
        self.limit, self.count, self._ckpt = limit, 0, ckpt
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, out: dict) -> None:
        self._pending.append((step, out))

    def judge(self) -> None:
        """Read the flags of the steps since the last call; warn for each skipped step, or raise
        `NonFiniteError` naming the first step past the limit."""
        pending, self._pending = self._pending, []
        flags = jax.device_get([out["nonfinite"] for _, out in pending])
        for (done, out), flag in zip(pending, flags, strict=True):
            if not flag:
                continue
            row = jax.device_get(out)
            self.count += 1
            what = f"loss {float(row['loss'])}, grad norm {float(row['grad_norm'])}"
            if self.count > self.limit:
                saved = [s for s in self._ckpt.steps() if s < done]
                kept = f"checkpoints up to step {saved[-1]} are intact" if saved else "nothing saved yet"
                skip = ("set train.max_nonfinite_steps=N to skip up to N such steps"
                        if not self.limit
                        else f"the run already skipped train.max_nonfinite_steps={self.limit}")
                raise NonFiniteError(f"step {done}: {what}; the run stops without applying it "
                                     f"({kept}); lower optim.lr or check the data, or {skip}")
            log.warning("step %d: %s; update skipped (%d of train.max_nonfinite_steps=%d)", done,
                        what, self.count, self.limit)


class _Signals:
    """Record SIGTERM / SIGINT (what schedulers send before preemption) instead of dying.

    Across processes, jax's preemption sync manager watches SIGTERM instead and makes every
    process stop at the same step, whichever process got the signal (a Python handler would stop
    only that one, leaving the others waiting in the next step's collectives).
    """

    def __init__(self, multi_process: bool = False):
        self.received: str | None = None
        self._multi_process = multi_process

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def check(self, step: int) -> str | None:
        """The signal to stop for after `step` (call once per step, on every process), or None."""
        if self._multi_process and self.received is None and (
                multihost_utils.reached_preemption_sync_point(step)):
            self.received = "SIGTERM"
        return self.received

    def __enter__(self) -> _Signals:
        self._old = {}
        main = threading.current_thread() is threading.main_thread()  # handlers live there only
        if main and not self._multi_process:
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _mib(n: int) -> float:
    return n / 2**20
