"""Multi-process training on one machine: 2 processes x 4 CPU devices (gloo) against 1 x 8.

Every child is a real `jaxscale` process joined by `jax.distributed`; the reference runs in the
test process on its 8 emulated devices with the same config.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config

from jaxscale.checkpoint import Checkpointer
from jaxscale.cli import main
from jaxscale.config import base_config
from jaxscale.distributed import detect_cluster, free_port, initialize, local_env
from jaxscale.errors import UserError
from jaxscale.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
RTOL = 1e-5  # fp32: the processes sum the same numbers in another order
HEARTBEAT_S = 10
FAIL_BOUND_S = HEARTBEAT_S + 20  # a survivor must be gone within this after its peer is killed


def flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_config(run_dir, **layout):
    config = tiny_config(**layout)
    config.run_dir = str(run_dir)
    config.train.steps = STEPS
    config.checkpoint.every = 2
    return config


def overrides(config) -> list[str]:
    """The `--config.KEY=VALUE` flags that turn the base config into `config`."""
    base = flat(base_config())
    return [f"--config.{k}={v}" for k, v in flat(config).items() if base[k] != v]


def launch(config, *extra, processes=2, timeout=300):
    """`jaxscale launch local --processes 2 --devices_per_process 4 train ...`."""
    args = ["launch", "local", "--processes", str(processes), "--devices_per_process", "4",
            "train", *overrides(config), *extra]
    return subprocess.run([sys.executable, "-m", "jaxscale.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics written more than once: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def rewind_to_step_2(src, dst):
    """A copy of a finished run without its step-4 checkpoint and its metrics."""
    shutil.copytree(src, dst)
    shutil.rmtree(Path(dst) / "checkpoints" / str(STEPS))
    (Path(dst) / "metrics.jsonl").unlink()


def start_two(config):
    """The two processes of a job, started by hand (stderr piped) so a test can signal one."""
    port, env = free_port(), local_env(4)
    return [subprocess.Popen([sys.executable, "-m", "jaxscale.cli", "train", *overrides(config),
                              f"--coordinator=localhost:{port}", "--num_processes=2",
                              f"--process_id={i}"], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i in range(2)]


def wait_for_steps(procs, metrics: Path, steps: int) -> None:
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps (checkpoints at 2 and 4) on 1 process x 8 devices and 2 processes x 4."""
    devices_or_skip(8)
    tmp = tmp_path_factory.mktemp("dist")
    one = train(run_config(tmp / "one", data=2, fsdp=4), progress=False)
    start = time.monotonic()
    two = launch(run_config(tmp / "two", data=2, fsdp=4))
    seconds = time.monotonic() - start
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, {r["step"]: r["loss"] for r in one}, two, seconds


@pytest.mark.slow  # with the `runs` fixture: over a minute on 2 cores
def test_two_processes_train_like_one(runs):
    """data=2 x fsdp=4 where `data` crosses the process boundary: same losses as one process."""
    tmp, one, two, seconds = runs
    got = losses(tmp / "two")  # process 0 alone wrote the metrics: each step once
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [one[s] for s in sorted(one)],
                               rtol=RTOL)
    assert got[STEPS] < got[1] - 0.5  # it trains
    assert two.stdout.count("done: step 4") == 1  # one process speaks for the job
    assert two.stderr.count("process 0 of 2; 4 local and 8 global devices") == 1
    assert "mesh data=2 x fsdp=4 on 8 cpu devices" in two.stderr
    assert json.loads((tmp / "two" / "config.json").read_text())["mesh"]["fsdp"] == 4
    assert len(list((tmp / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert Checkpointer(str(tmp / "two" / "checkpoints"), read_only=True).steps() == [2, STEPS]
    worst = max(abs(got[s] - one[s]) / one[s] for s in got)
    print(f"2-process run: {seconds:.0f} s; losses {got}; largest relative difference {worst:.1e}")


@pytest.mark.slow  # with the `runs` fixture: over a minute on 2 cores
def test_two_process_checkpoint_resumes_in_one_process(runs):
    tmp, one, _, _ = runs
    rewind_to_step_2(tmp / "two", tmp / "two_then_one")
    history = train(run_config(tmp / "two_then_one", data=2, fsdp=4), progress=False)
    assert [r["step"] for r in history] == [3, STEPS]
    np.testing.assert_allclose([r["loss"] for r in history], [one[3], one[STEPS]], rtol=RTOL)


@pytest.mark.slow  # with the `runs` fixture: over a minute on 2 cores
def test_one_process_checkpoint_resumes_in_two_processes_with_pipeline_across_them(runs):
    """Resharded onto pipeline=2 x fsdp=4 with the pipeline stages on different processes
    (`mesh.dcn.pipeline=2`): each process then loads the whole batch, as stages need it."""
    tmp, one, _, _ = runs
    rewind_to_step_2(tmp / "one", tmp / "one_then_two")
    config = run_config(tmp / "one_then_two", pipeline=2, fsdp=4)
    config.mesh.dcn.pipeline = 2
    result = launch(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stderr and "mesh pipeline=2 x fsdp=4" in result.stderr
    got = losses(tmp / "one_then_two")
    assert sorted(got) == [3, STEPS]
    np.testing.assert_allclose([got[3], got[STEPS]], [one[3], one[STEPS]], rtol=RTOL)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_others_within_the_heartbeat_bound(tmp_path, victim):
    config = run_config(tmp_path, data=2, fsdp=4)
    config.train.steps = 100_000
    config.checkpoint.every = 0
    config.distributed.heartbeat_timeout_s = HEARTBEAT_S
    procs = start_two(config)
    survivor = procs[1 - victim]
    try:
        wait_for_steps(procs, tmp_path / "metrics.jsonl", 2)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = survivor.communicate(timeout=FAIL_BOUND_S + 30)
        seconds = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    print(f"process {1 - victim} exited {seconds:.1f} s after process {victim} was killed")
    assert survivor.returncode != 0
    assert seconds < FAIL_BOUND_S
    assert any(m in err for m in ("another task died", "stopped sending heartbeats",
                                  "another process of the job has probably stopped")), err[-3000:]


def test_sigterm_to_one_process_stops_all_at_the_same_step_with_a_checkpoint(tmp_path):
    """jax's preemption sync manager agrees on the step: both save it and exit 0."""
    config = run_config(tmp_path, data=2, fsdp=4)
    config.train.steps = 100_000
    config.checkpoint.every = 0
    procs = start_two(config)
    try:
        wait_for_steps(procs, tmp_path / "metrics.jsonl", 2)
        procs[1].send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    last = max(losses(tmp_path))
    assert Checkpointer(str(tmp_path / "checkpoints"), read_only=True).steps() == [last]
    assert f"received SIGTERM: saved a checkpoint at step {last}" in errs[0]


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "jaxscale.cli", "train",
                             f"--coordinator=localhost:{port}", "--num_processes=2",
                             "--process_id=1", "--config.distributed.init_timeout_s=3"],
                            cwd=ROOT, env=local_env(4), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("jaxscale: error:")]
    assert len(lines) == 1 and f"could not reach the coordinator at localhost:{port} within " \
        "3 s" in lines[0], result.stderr[-3000:]
    assert seconds < 3 + 30


@pytest.mark.parametrize("args, message", [
    (("localhost:1234", 2, None), "--coordinator, --num_processes and --process_id go together"),
    (("localhost", 2, 0), "'localhost' is not host:port"),
    (("localhost:1234", 2, 2), "--process_id=2 must be in [0, --num_processes=2)"),
])
def test_bad_distributed_flags_are_user_errors(args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        initialize(*args)


def test_cluster_detection_from_the_environment():
    assert detect_cluster({}, tpu_vm=False) is None
    srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16",
            "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
    assert detect_cluster(srun) == "SLURM"
    assert detect_cluster({**srun, "SLURM_NTASKS": "1"}, tpu_vm=False) is None  # one task
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"},
                          tpu_vm=False) is None  # an salloc shell or batch script, not srun
    assert detect_cluster({}, tpu_vm=True) == "Cloud TPU VM"  # jax reads the pod from metadata
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}) == "Cloud TPU (GKE)"
    assert detect_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
    env = local_env(4, {"SLURM_JOB_ID": "7", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert "SLURM_JOB_ID" not in env and env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


@pytest.mark.parametrize("argv", [["remote", "train"], ["local", "train"],
                                  ["local", "--processes", "two", "train"],
                                  ["local", "--processes", "2"], ["local", "--procs=2", "train"]])
def test_bad_launch_lines_print_the_usage(argv, capsys):
    assert main(["launch", *argv]) == 2
    assert capsys.readouterr().err.startswith("jaxscale: error: usage: jaxscale launch local --processes N")


def test_launch_usage_is_one_line_and_status_2():
    result = subprocess.run([sys.executable, "-m", "jaxscale.cli", "launch", "local", "train"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("jaxscale: error: usage:")
