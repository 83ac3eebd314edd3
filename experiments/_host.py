"""Benchmark set-up shared by the scripts here: on a CPU-only host, emulate 8 devices.

Import it and call `emulate_devices()` before jax is imported.
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# 8 emulated devices; XLA:CPU's concurrency-optimized scheduler can deadlock the emulated devices
# of some pipeline layouts, the default scheduler does not.
HOST_FLAGS = ("--xla_force_host_platform_device_count=8"
              " --xla_cpu_enable_concurrency_optimized_scheduler=false")


def cpu_only() -> bool:
    """Whether jax will only find the CPU: JAX_PLATFORMS says so, or no accelerator plugin exists."""
    platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or ""
    if platforms:
        return platforms.strip().lower() == "cpu"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def emulate_devices() -> None:
    """Set XLA_FLAGS for 8 emulated devices on a CPU-only host, unless the user set XLA_FLAGS;
    with libtpu installed on a host without a TPU, JAX_PLATFORMS=cpu too."""
    from jaxscale.cpu import libtpu_without_tpu

    if not os.environ.get("JAX_PLATFORMS") and libtpu_without_tpu():
        os.environ["JAX_PLATFORMS"] = "cpu"
    if cpu_only():
        os.environ.setdefault("XLA_FLAGS", HOST_FLAGS)


def environment_lines(load_at_start: float) -> list[str]:
    """Header lines every results file starts with: device, jax, date, XLA_FLAGS, host load."""
    import jax

    dev, n = jax.devices()[0], jax.device_count()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"- Device: {dev.device_kind} x {n} ({dev.platform}); jax {jax.__version__}; {now}",
             f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`"]
    if dev.platform == "cpu":
        lines.append(f"- Host load average (1 min) at start / end: {load_at_start:.1f} / "
                     f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; other processes on the "
                     f"host slow every timing.")
    return lines


def write_report(lines: list[str], path: str) -> None:
    """Print a results file and write it to `path` (creating its folder)."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def in_repo(path: str) -> str:
    """A path of the repository (a default config or results file) as seen from the current
    directory, so the scripts run from anywhere and write where the docs link to."""
    return os.path.relpath(ROOT / path)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return int(text)
    return parse
