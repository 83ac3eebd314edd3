"""Training metrics: model FLOPs, accelerator peak FLOP/s, throughput/MFU, memory, and the writer.

`flops_per_token` is each model family's count (from `jaxscale.models`); `train_flops_per_token`
applies it to a config's batch. `peak_flops_per_device` looks the device up in a table of dense
peaks and measures a GEMM when it is unknown (always on CPU).
`MetricsWriter` appends JSON lines to `<run_dir>/metrics.jsonl` and TensorBoard scalars to
`<run_dir>/tensorboard`. See docs/metrics.md.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxscale.errors import UserError
from jaxscale.models import flops_per_token

_GIB = 1024**3

# (pattern matched case-insensitively against device_kind, bf16 dense FLOP/s, fp32 FLOP/s or None).
# First match wins, so specific patterns come before general ones. fp32 is the non-tensor-core
# (tf32-free) figure; None means the chip has no separate fp32 rate (TPU: f32 matmuls run on the
# bf16 MXU at the default precision), so the bf16 figure is used.
_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    (r"h100.*pcie", 756e12, 51.2e12),
    (r"h100", 989.4e12, 66.9e12),
    (r"h200", 989.4e12, 66.9e12),
    (r"a100", 312e12, 19.5e12),
    (r"\bl4\b", 121e12, 30.3e12),
    (r"tpu v4(?! lite)", 275e12, None),
    (r"tpu v5 ?(lite|e\b)", 197e12, None),
    (r"tpu v5", 459e12, None),  # v5p reports "TPU v5" / "TPU v5p"
    (r"tpu v6|trillium", 918e12, None),
)
_DTYPES = ("bfloat16", "float32")


def train_flops_per_token(config: Any) -> float:
    """Training FLOPs per token of the batch's `seq_len`-long text rows (`flops_per_token`, which
    for a multimodal family spreads the encoder's and connector's FLOPs over the text tokens)."""
    return flops_per_token(config.model, config.data.seq_len, config.data.frames)


def _time_gemm(device: jax.Device, dtype: str, n: int) -> float:
    """Best FLOP/s of an n x n matmul on `device`: 2 warm-ups, then up to 5 runs within ~1 s."""
    x = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda a: a @ a)
    for _ in range(2):
        matmul(x).block_until_ready()
    best = float("inf")
    deadline = time.perf_counter() + 1.0
    for _ in range(5):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
        if start > deadline:
            break
    return 2 * n**3 / best


@functools.cache
def _host_gemm_flops() -> float:
    """FLOP/s of a float32 GEMM on the host; all CPU devices of a process share these cores."""
    return _time_gemm(jax.local_devices(backend="cpu")[0], "float32", 2048)


@functools.cache
def _device_gemm_flops(device: jax.Device, dtype: str) -> float:
    return _time_gemm(device, dtype, 4096)


def peak_flops_per_device(
    device: jax.Device | None = None, dtype: str = "bfloat16", cpu_devices: int | None = None
) -> tuple[float, str]:
    """Return (dense peak FLOP/s of one device for `dtype`, where the figure comes from).

    Known accelerators come from a table of datasheet figures; unknown ones are measured with a
    4096^2 GEMM in `dtype`. CPU is always measured (float32 GEMM) and split evenly over the
    process's CPU devices, which share the host's cores. Measurements run once per process.
    """
    device = device if device is not None else jax.local_devices()[0]
    dtype = jnp.dtype(dtype).name
    if dtype not in _DTYPES:
        raise UserError(f"no peak FLOP/s for dtype '{dtype}'; use one of {', '.join(_DTYPES)}")
    if device.platform == "cpu":
        n = cpu_devices or len(jax.local_devices(backend="cpu"))
        host = _host_gemm_flops()
        return host / n, f"measured CPU GEMM: {host / 1e9:.1f} GFLOP/s host / {n} devices"
    kind = device.device_kind
    for pattern, bf16, fp32 in _PEAKS:
        if re.search(pattern, kind, re.IGNORECASE):
            if dtype == "bfloat16":
                return bf16, f"table: {kind} bf16 dense"
            if fp32 is None:
                return bf16, f"table: {kind} bf16 dense (f32 matmuls run on the bf16 units)"
            return fp32, f"table: {kind} fp32 dense"
    peak = _device_gemm_flops(device, dtype)
    return peak, f"measured {kind} {dtype} GEMM: {peak / 1e12:.1f} TFLOP/s"


class StepTimer:
    """Tokens/s over a window of steps.

    Call `add(tokens)` after each step and `lap()` to read the window and start the next one.
    JAX dispatches asynchronously: call `jax.block_until_ready` on the step's outputs before
    `lap()` (and before `reset()`), or the time measures dispatch, not compute. Call `reset()`
    after the first step so compilation stays out of the first window.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Start a new, empty window now."""
        self._start = self._clock()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        """Count `tokens` processed (all processes together) by one step."""
        self._tokens += tokens

    def lap(self) -> tuple[int, float]:
        """Return (tokens, seconds) of the window so far and start a new one."""
        tokens, seconds = self._tokens, self._clock() - self._start
        self.reset()
        return tokens, seconds


def throughput_metrics(
    tokens: int,
    seconds: float,
    flops_per_token: float,
    num_devices: int,
    peak_per_device: float,
) -> dict[str, float]:
    """Return `tokens_per_s`, `tflops_per_device` (model TFLOP/s) and `mfu` (0..1).

    `tokens` and `num_devices` are global: all processes together.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    tokens_per_s = tokens / seconds
    flops_per_device = tokens_per_s * flops_per_token / num_devices
    return {
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": flops_per_device / 1e12,
        "mfu": flops_per_device / peak_per_device,
    }


def device_memory_stats() -> dict[str, float]:
    """Memory of the first local device in GiB; `{}` where the backend reports none (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return {}
    names = {
        "bytes_in_use": "mem_in_use_gib",
        "peak_bytes_in_use": "mem_peak_gib",
        "bytes_limit": "mem_limit_gib",
    }
    return {out: stats[key] / _GIB for key, out in names.items() if key in stats}


def host_memory_stats() -> dict[str, float]:
    """This process's resident host memory in MiB; `{}` where /proc is missing (not Linux)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return {}
    return {"host_rss_mib": pages * os.sysconf("SC_PAGE_SIZE") / 2**20}


def _plain(value: Any) -> int | float:
    """A Python number from a Python, NumPy or JAX scalar (integers stay integers)."""
    a = np.asarray(value)
    return int(a) if a.dtype.kind in "biu" else float(a)


class MetricsWriter:
    """Writes metrics as JSON lines to `<run_dir>/metrics.jsonl` and to TensorBoard.

    `enabled=None` means "only on process 0", so multi-process runs write one copy. A disabled
    writer creates no files and ignores every call. Usable as a context manager.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool | None = None) -> None:
        self.run_dir = run_dir = os.fspath(run_dir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        if not self.enabled:
            return
        self._dir = epath.Path(run_dir)  # a local path or a URL (gs://...)
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            jsonl = self._dir / "metrics.jsonl"
            # object stores cannot append: there the whole file is rewritten at each write
            self._lines = None if "://" not in run_dir else (
                jsonl.read_text().splitlines(keepends=True) if jsonl.exists() else [])
            self._jsonl = jsonl.open("a") if self._lines is None else None
            from tensorboardX import SummaryWriter  # here: it imports torch when it is installed

            self._tb = SummaryWriter(str(self._dir / "tensorboard"))
            # it warns at each NaN it writes; the training loop reports non-finite steps itself
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        except (OSError, ImportError) as e:
            raise UserError(f"cannot write the run directory {run_dir!r} ({type(e).__name__}: {e}); "
                            f"set run_dir to a directory this process can write") from None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Append `{"step": step, **metrics}` as one JSON line and each metric as a scalar."""
        if not self.enabled:
            return
        step = int(step)
        values = {k: _plain(v) for k, v in metrics.items()}
        line = json.dumps({"step": step, **values}) + "\n"
        if self._jsonl is None:
            self._lines.append(line)
            (self._dir / "metrics.jsonl").write_text("".join(self._lines))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def write_config(self, config_json: str) -> None:
        """Store the run config as `<run_dir>/config.json` and TensorBoard text `hparams/config`."""
        if not self.enabled:
            return
        (self._dir / "config.json").write_text(config_json)
        self._tb.add_text("hparams/config", f"```json\n{config_json}\n```")
        self._tb.flush()

    def close(self) -> None:
        """Flush and close both outputs; later calls do nothing."""
        if not self.enabled:
            return
        self.enabled = False
        if self._jsonl is not None:
            self._jsonl.close()
        self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
