"""Everything jaxscale does only for CPU hosts; nothing else in the library names a backend.

- `order_collectives`: collective ordering for meshes of emulated CPU devices, lowered for CPU only
  (`jax.lax.platform_dependent`): a program lowered for GPUs or TPUs holds none of it.
- `ragged_all_to_all`: `jax.lax.ragged_all_to_all`, which XLA:CPU does not implement, written
  for CPU as an `all_to_all` of chunks padded to the operand's length (lowered for CPU only).
- `with_xla_cpu_flags`: an XLA:CPU flag set before jax starts; only the CPU backend reads it.
- `libtpu_without_tpu`: libtpu installed (for TPU compiles) on a host without a TPU chip.
- `interpret_kernels`: TPU Pallas kernels (`model.attention="splash"`) run in Pallas's interpret
  mode, for the tests (off unless asked; a program traced for TPUs keeps the real kernel).
- Host memory (docs/throughput.md), opt-in with `JAXSCALE_HOST_MEMORY=1`: XLA:CPU allocates each
  execution's temporaries afresh; glibc maps blocks that large anew each time and the kernel
  faults in and zeroes their pages (a third of the reference training step on 4 KiB pages, 9% on
  huge pages, 19% with 8 emulated devices). glibc's huge-page tunable and the block cache
  (`block_cache.c`, preloaded) are read only when a process starts, so the `jaxscale` command
  re-executes itself once with them when asked; with the Python API, start Python in the
  environment `host_memory_env` returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jaxscale.errors import UserError

SCOPE = "cpu_collective_order"  # the name of every operation the ordering adds
# XLA:CPU's concurrency-optimized scheduler can deadlock pipeline x fsdp x tensor layouts of a
# multi-device CPU mesh; the default scheduler does not.
XLA_CPU_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
SWITCH = "JAXSCALE_HOST_MEMORY"  # "1": re-execute with huge pages and the block cache
APPLIED = "JAXSCALE_HOST_MEMORY_APPLIED"  # set in the re-executed process
HUGE_PAGES = "glibc.malloc.hugetlb=1"
SOURCE = Path(__file__).with_name("block_cache.c")


# -- collective ordering ------------------------------------------------------------------------

def order_collectives(first, then):
    """`(first, then)` unchanged, but in a program lowered for CPU `then` waits for `first`, and
    in the backward pass the cotangents of `first` for those of `then`; lowered for any other
    platform nothing is added, so accelerators keep the overlap.

    XLA:CPU runs a program's collectives in program order, but a loop holding some runs as one
    operation, next to any other with no path between them, and its in-process collectives tell
    collectives apart only by kind, group and channel (jax gives all of `shard_map`'s the same).
    So the emulated devices of one process can pair one device's collective in a layer loop
    with another's outside it, or in another tower's loop: the run stops, or mixes their data
    (NaN losses). Computations that hold such collectives are ordered here by a data dependency
    (XLA:CPU drops optimization barriers before it orders a program);
    `jaxscale.hlo.unordered_collectives` finds the pairs left.
    """
    import jax

    return jax.lax.platform_dependent(first, then, cpu=_ordered(), default=_unchanged)


def _unchanged(first, then):
    return first, then


def _varying(x) -> frozenset:
    import jax

    return frozenset(jax.typeof(x).manual_axis_type.varying)


def _wait(tree, deps):
    """`tree` made to wait for `deps` through a data dependency, which no pass drops. A leaf
    waits for the dependencies that vary over no manual axes it does not (so its type stays);
    float0 leaves (integers' cotangents) stay."""
    import jax
    import jax.numpy as jnp

    # false, NaN or not, from one element of each dependency: nothing XLA folds away
    flags = [(_varying(x), x[(0,) * x.ndim].astype(jnp.float32) * 0 > 1)
             for x in jax.tree.leaves(deps) if x.dtype != jax.dtypes.float0]

    def one(x):
        mine = [f for axes, f in flags if axes <= _varying(x)]
        if x.dtype == jax.dtypes.float0 or not mine:
            return x
        never = functools.reduce(jnp.logical_or, mine)
        return x | never if x.dtype == jnp.bool_ else x + never.astype(x.dtype)

    with jax.named_scope(SCOPE):
        return jax.tree.map(one, tree)


@functools.cache
def _ordered():
    """`_wait` with its backward, built on first use: this module is imported before jax starts
    (the command's flags and re-execution), and jax is only imported once ordering is needed."""
    import jax

    ordered = jax.custom_vjp(_ordered_primal)
    ordered.defvjp(_ordered_fwd, _ordered_bwd)
    return ordered


def _ordered_primal(first, then):
    return first, _wait(then, first)


def _ordered_fwd(first, then):
    return _ordered_primal(first, then), None


def _ordered_bwd(_, cts):
    ct_first, ct_then = cts
    return _wait(ct_first, ct_then), ct_then


# -- XLA:CPU flags ------------------------------------------------------------------------------

# -- ragged all-to-all --------------------------------------------------------------------------

def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                      axis_name: str):
    """`jax.lax.ragged_all_to_all` with one chunk per device of `axis_name` (offsets and sizes of
    the axis's length). Lowered for CPU, whose XLA has no ragged all-to-all, each chunk travels
    padded to the longest it can be (the operand's or the output's length, the shorter) in one
    `all_to_all`: the same result, that length times the axis size in bytes. Lowered for any
    other platform it is the ragged collective."""
    import jax

    def ragged(*args):
        return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)

    return jax.lax.platform_dependent(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
        cpu=functools.partial(_padded_all_to_all, axis_name), default=ragged)


def _padded_all_to_all(axis_name, operand, output, input_offsets, send_sizes, output_offsets,
                       recv_sizes):
    import jax
    import jax.numpy as jnp

    m = min(operand.shape[0], output.shape[0])  # no chunk is longer than what receives it
    row = jnp.arange(m)
    chunks = jnp.take(operand, jnp.minimum(input_offsets[:, None] + row, operand.shape[0] - 1), axis=0)
    chunks = jnp.where((row < send_sizes[:, None]).reshape(*chunks.shape[:2], *(1,) * (operand.ndim - 1)),
                       chunks, jnp.zeros((), operand.dtype))
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [sources, m, ...]
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dest = jnp.where(row < recv_sizes[:, None], offsets[:, None] + row, output.shape[0])
    return output.at[dest.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


def with_xla_cpu_flags(env: dict[str, str], host_devices: int = 0) -> dict[str, str]:
    """`env` with `XLA_CPU_FLAGS` added to XLA_FLAGS unless the user set that flag, and with
    `host_devices` > 0 that many emulated CPU devices unless the user set their count (the host
    platform's alone: accelerators are unaffected)."""
    env = dict(env)
    if "concurrency_optimized_scheduler" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {XLA_CPU_FLAGS}".strip()
    if host_devices and "host_platform_device_count" not in env["XLA_FLAGS"]:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={host_devices}"
    return env



# -- libtpu without a TPU -----------------------------------------------------------------------

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips' PCI vendor id, as jax looks for them


def libtpu_without_tpu() -> bool:
    """Whether the libtpu package is installed (to compile for TPU topologies) on a host with no
    TPU chip and no other accelerator plugin: jax would only print libtpu's failed start on stderr
    and run on the CPU, which `JAX_PLATFORMS=cpu` says up front."""
    import importlib.metadata
    import importlib.util

    if not importlib.util.find_spec("libtpu") or importlib.util.find_spec("jax_plugins") or (
            importlib.metadata.entry_points(group="jax_plugins")):
        return False
    return not tpu_chips()


def tpu_chips() -> bool:
    """Whether this host has TPU chips: PCI devices of Google's vendor id, as jax looks for them."""
    import glob

    return any(Path(p).read_text().strip() == GOOGLE_PCI_VENDOR
               for p in glob.glob("/sys/bus/pci/devices/*/vendor"))


# -- Pallas TPU kernels off TPUs ----------------------------------------------------------------

_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("interpret_kernels", default=False)


@contextlib.contextmanager
def interpret_kernels() -> Iterator[None]:
    """Within this block (while tracing), TPU Pallas kernels traced for a platform other than TPU
    run in Pallas's interpret mode (XLA operations doing what the kernel does, far slower than
    XLA's own attention): how the tests run them on the CPU. Off by default."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def kernels_interpreted() -> bool:
    """Whether `interpret_kernels` is on here."""
    return _INTERPRET.get()


# -- host memory --------------------------------------------------------------------------------

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


def with_block_cache(env: dict[str, str]) -> dict[str, str]:
    """`env` with the block cache in LD_PRELOAD where it builds (no huge pages, no mark).

    Raises UserError when LD_PRELOAD already holds another library: the cache hands blocks it
    does not keep to glibc, so an allocator preloaded beside it (tcmalloc, jemalloc) aborts the
    process on its first foreign pointer."""
    env = dict(env)
    lib = block_cache_library()
    others = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":")
              if p and p != str(lib)]
    if others:
        raise UserError(f"{SWITCH}=1 preloads jaxscale's block cache, but LD_PRELOAD already holds "
                        f"{others[0]}; two allocators in one process abort it: unset LD_PRELOAD "
                        f"or {SWITCH}")
    if lib is not None:
        env["LD_PRELOAD"] = str(lib)
    return env


def host_memory_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with huge pages for glibc's malloc and the block cache
    preloaded where it builds, marked so that `reexec_with_host_memory` leaves it alone."""
    env = with_block_cache(dict(os.environ if env is None else env))
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, HUGE_PAGES)))
    env[APPLIED] = "1"
    return env


def reexec_with_host_memory(command: list[str]) -> bool:
    """Re-run `command` (this process's own, same pid) in `host_memory_env` if the user set
    JAXSCALE_HOST_MEMORY=1 (Linux only; call it first thing, it replaces the process). Returns
    whether the settings apply to this process; raises UserError where they cannot."""
    switch = os.environ.get(SWITCH, "")
    if switch not in ("", "0", "1"):
        raise UserError(f"{SWITCH}={switch!r}: set it to 1 (huge pages and the block cache) or 0")
    if switch != "1":
        return False
    if sys.platform != "linux":
        raise UserError(f"{SWITCH}=1 needs Linux (glibc's allocator); unset it on {sys.platform}")
    if not os.environ.get(APPLIED):
        os.execve(sys.executable, command, host_memory_env())
    return True
