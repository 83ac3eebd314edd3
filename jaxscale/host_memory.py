"""Host memory for XLA:CPU: transparent huge pages and a cache of large blocks (docs/throughput.md).

XLA:CPU allocates each execution's temporaries afresh. glibc maps blocks that large anew each
time and the kernel faults in and zeroes their pages: on 4 KiB pages that was a third of the
reference training step, and on huge pages still 9% of its CPU time (19% with 8 emulated
devices). Both settings are read only when a process starts, so the `jaxscale` command (and the
benchmarks) re-execute themselves once with them; with the Python API, start Python with the
environment that `host_memory_env` returns.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SWITCH = "JAXSCALE_HOST_MEMORY"  # "0": leave the process as it is
HUGE_PAGES = "glibc.malloc.hugetlb=1"
SOURCE = Path(__file__).with_name("block_cache.c")


def block_cache_library() -> Path | None:
    """The block cache (`block_cache.c`) built for this machine, or None without a C compiler.

    Built once per source version into $XDG_CACHE_HOME/jaxscale (~/.cache/jaxscale)."""
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxscale"
    except RuntimeError:  # no home directory
        return None
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    lib = cache / f"block_cache-{digest}-{platform.machine()}.so"
    if lib.exists():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / lib.name
            result = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(SOURCE),
                                     "-lpthread", "-Wl,--no-undefined"], capture_output=True, timeout=120)
            if result.returncode != 0:
                return None
            os.replace(built, lib)
    except (OSError, subprocess.SubprocessError):
        return None
    return lib


def host_memory_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with huge pages for glibc's malloc and the block cache
    preloaded where it builds, marked so that `reexec_with_host_memory` leaves it alone."""
    env = dict(os.environ if env is None else env)
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, HUGE_PAGES)))
    env = with_block_cache(env)
    env[SWITCH] = "1"
    return env


def with_block_cache(env: dict[str, str]) -> dict[str, str]:
    """`env` with the block cache added to LD_PRELOAD where it builds (no huge pages, no mark)."""
    env = dict(env)
    lib = block_cache_library()
    if lib is not None and str(lib) not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, (str(lib), env.get("LD_PRELOAD"))))
    return env


def reexec_with_host_memory(command: list[str]) -> None:
    """Re-run `command` (this process's own, same pid) in `host_memory_env`, before JAX starts.

    Only on Linux, once, and not where JAXSCALE_HOST_MEMORY=0."""
    if (sys.platform != "linux" or not sys.executable or SWITCH in os.environ
            or "jax" in sys.modules):
        return
    os.execve(sys.executable, command, host_memory_env())
