"""Force 8 host devices before jax is imported, so the CPU emulates an 8-device mesh.

On a machine with accelerators the flag only affects the (unused) host platform: the same tests then
run on the real devices, and those needing more devices than present are skipped with the reason.
Float32 matmuls run at full precision there too (GPUs default to TF32, TPUs to bfloat16 passes), so
the parity tolerances hold on every platform.
"""

import atexit
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile

from jaxscale.cpu import SWITCH, XLA_CPU_FLAGS, libtpu_without_tpu, with_block_cache

# libtpu (the test extra's, for the TPU compile tier, tests/test_tpu_compile.py) on a host without
# a TPU chip: the tests run on the CPU as without it, with its flags below and no libtpu warnings
# on the stderr the CLI tests read. A TPU host, or a GPU plugin, keeps jax's own choice.
if not os.environ.get("JAX_PLATFORMS") and libtpu_without_tpu():
    os.environ["JAX_PLATFORMS"] = "cpu"

# The XLA:CPU flags the `jaxscale` command sets (jaxscale/cpu.py). On GPUs, deterministic
# reductions: the exact-resume tests compare losses bit for bit.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
    + XLA_CPU_FLAGS + " --xla_gpu_deterministic_ops=true"
).strip()


def cpu_only() -> bool:
    """Whether jax will run on the CPU alone: no GPU or TPU plugin installed, or JAX_PLATFORMS=cpu
    (decided before jax starts, which reads XLA_FLAGS once)."""
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        return True
    return not (importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu")
                or importlib.metadata.entry_points(group="jax_plugins"))


# On a CPU host the tests spend most of their time compiling tiny programs: LLVM at -O0 compiles
# them faster than it slows them (whole suite on 2 cores: 973 s before, 772 and 809 s after).
# The optimized HLO is unchanged. The few runs of hundreds of steps compile their step with
# full optimisation (`Trainer.compile(compiler_options)`, tests/test_multimodal.py): 635 s.
# And XLA:CPU's elemental emitters, which compile the same HLO fusions 2-3x faster than its MLIR
# fusion emitters (a step of the cross-attention preset 5.8 -> 1.8 CPU-s, early fusion's on
# data x fsdp x tensor 6.1 -> 2.7), but expand scatters (embedding gradients) into while loops:
# the tests that read a compiled program's loops, memory or per-step collectives compile it as
# the `jaxscale` command does, with `PRODUCTION` (or the `production_compiles` fixture).
if cpu_only():
    os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                                " --xla_cpu_use_fusion_emitters=false")

# Compiler options that undo the flag above for one compile: XLA:CPU's MLIR fusion emitters, as
# the `jaxscale` command compiles (on other platforms, the platform's own).
PRODUCTION = {"xla_cpu_use_fusion_emitters": True} if cpu_only() else None

# One persistent compilation cache per test session, shared by its xdist workers and the processes
# tests start (they inherit the variable): tests that build the same programs (the one-device
# references, the CLI's runs) compile them once. 320 -> 243 s for tests/test_parallel.py on 2 cores.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxscale-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

# On a CPU-only Linux test bench, the block cache `JAXSCALE_HOST_MEMORY=1` preloads (jaxscale/cpu.py)
# for the xdist workers and the processes tests start, which inherit it: steps of the multimodal
# presets on 2 cores, early fusion 146 -> 104 ms, CLIP 190 -> 127 ms. (Huge pages too slowed the
# many short processes of tests/test_checkpoint.py and tests/test_distributed.py by 5-10%.) Not
# where JAXSCALE_HOST_MEMORY=0 or another library is preloaded.
if (sys.platform == "linux" and cpu_only() and os.environ.get(SWITCH) != "0"
        and not os.environ.get("LD_PRELOAD")):
    os.environ.update(with_block_cache(os.environ))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxscale.config import base_config  # noqa: E402
from jaxscale.data import build_data, make_global_batch  # noqa: E402


def tiny_config(**mesh):
    """A 2-layer model small enough to compile in seconds; `mesh` sets mesh/parallel/train keys."""
    c = base_config()
    c.model.update(vocab_size=264, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                   d_ff=128, max_seq_len=64)
    c.data.seq_len = 32
    c.train.update(steps=5, global_batch_size=16, log_every=1)
    c.optim.update(warmup_steps=2)
    c.mesh.data = 1
    for key, value in mesh.items():
        section = next(s for s in ("mesh", "parallel", "train") if key in c[s])
        c[section][key] = value
    return c


def devices_or_skip(n: int) -> list:
    """The first `n` devices, or skip the test saying how many it needs."""
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, {jax.device_count()} present")
    return jax.devices()[:n]


def train_steps(trainer, config, steps: int) -> tuple:
    """The state after `steps` steps of `trainer` from a fresh start on `config`'s batches, and
    their losses."""
    _, data = build_data(config)
    state, losses = trainer.init(), []
    for _ in range(steps):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
        losses.append(float(out["loss"]))
    return state, losses


@pytest.fixture
def production_compiles(monkeypatch):
    """`Trainer.compile` (and so `planner.compiled.compile_step`) with `PRODUCTION` unless given
    other options: the programs these tests read are the ones the `jaxscale` command runs."""
    from jaxscale.train.trainer import Trainer

    compile = Trainer.compile
    monkeypatch.setattr(Trainer, "compile",
                        lambda self, compiler_options=None: compile(self, compiler_options or PRODUCTION))


def pytest_collection_modifyitems(items: list) -> None:
    """The tests marked slow first: under `--dist worksteal` (the README's command) the first
    worker starts on them and the other takes the short tests off its queue, so neither is left
    alone with a long test at the end of the run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
