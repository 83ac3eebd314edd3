"""Multi-process (multi-host) runs through `jax.distributed`: initialisation and a local launcher.

`initialize` joins this process to a multi-controller JAX job before any device is touched:
explicitly (`--coordinator host:port --num_processes N --process_id i`), or detected from the
environment on SLURM, Open MPI, Cloud TPU pods and GKE (jax's own cluster detection), or from
`JAX_COORDINATOR_ADDRESS`; with none of these it does nothing and the run is single-process.
A coordinator that cannot be reached within `distributed.init_timeout_s` is a `UserError` (a job
that does not form in that time makes jax abort the process, saying why), and a process that dies
is noticed by the others through the coordination service's heartbeats within
`distributed.heartbeat_timeout_s`: they exit non-zero instead of waiting forever in a collective.

`launch_local` runs N processes of `jaxscale train` on this machine, each with its own CPU devices
and gloo collectives: the multi-host code paths, tested without a cluster. See docs/distributed.md.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import jax

from jaxscale.errors import UserError

log = logging.getLogger("jaxscale")

# Environment variables by which jax's cluster detection recognises a multi-process job.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_CLUSTER_ENV = {
    "SLURM_PROCID": "SLURM",
    "OMPI_MCA_orte_hnp_uri": "Open MPI",
    "PMIX_SERVER_URI2": "Open MPI",
    "TPU_WORKER_HOSTNAMES": "Cloud TPU (GKE)",
    "TPU_PROCESS_ADDRESSES": "Cloud TPU (GKE)",
    "JAX_COORDINATOR_ADDRESS": "JAX_COORDINATOR_ADDRESS",
}


def detect_cluster(env: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> str | None:
    """The kind of job the environment describes, for jax's detection to join; None: a single
    process. SLURM means a job step of several tasks (`srun`); a Cloud TPU VM (`tpu_vm`, default:
    `/dev/accel*` exists) is detected even on one host, where jax's detection finds one process.
    """
    env = os.environ if env is None else env
    if "SLURM_PROCID" in env and not (all(v in env for v in _SLURM_STEP)
                                      and int(env["SLURM_NTASKS"]) > 1):
        return None
    kind = next((kind for var, kind in _CLUSTER_ENV.items() if env.get(var)), None)
    if kind is None and (bool(glob.glob("/dev/accel*")) if tpu_vm is None else tpu_vm):
        kind = "Cloud TPU VM"
    return kind


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, init_timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> bool:
    """Join the multi-process job, if there is one; return whether this run is multi-process.

    Must run before anything touches a device. Arguments left `None` are detected from the
    environment; with no arguments and no cluster environment, nothing happens.
    """
    explicit = (coordinator, num_processes, process_id)
    if all(v is None for v in explicit):
        cluster = detect_cluster()
        if cluster is None:
            return False
        log.info("multi-process job detected from the environment (%s)", cluster)
    elif None in explicit:
        raise UserError("--coordinator, --num_processes and --process_id go together; pass all "
                        "three, or none to detect a SLURM/TPU/MPI job from the environment")
    else:
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):
            raise UserError(f"--coordinator={coordinator!r} is not host:port, e.g. "
                            f"10.0.0.1:1234 (the address of process 0)")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} must be in [0, --num_processes="
                            f"{num_processes})")
        if process_id > 0:  # process 0 starts the coordination service; the others wait for it
            _wait_for(coordinator, init_timeout_s)
        log.info("joining the job at %s as process %d of %d (waiting up to %d s for the others)",
                 coordinator, process_id, num_processes, init_timeout_s)
    try:  # past the connection, jax aborts the process (saying why) if the job does not form
        jax.distributed.initialize(
            coordinator, num_processes, process_id,
            cluster_detection_method="deactivate" if coordinator else None,
            initialization_timeout=init_timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    except ValueError as e:  # detection could not fill in the coordinator, count or id
        raise UserError(f"could not set up the distributed job from the environment ({e}); under "
                        f"SLURM start each process with srun, elsewhere pass --coordinator, "
                        f"--num_processes and --process_id") from None
    log.info("process %d of %d; %d local and %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _wait_for(address: str, timeout_s: float) -> None:
    """Return once `address` (host:port) accepts TCP connections; `UserError` after `timeout_s`."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(f"could not reach the coordinator at {address} within {timeout_s} s "
                                f"({e.strerror or e}); start process 0 with the same --coordinator, "
                                f"check the host and port are reachable from here, or raise "
                                f"distributed.init_timeout_s") from None
            time.sleep(0.5)


def free_port() -> int:
    """A TCP port that is free on this machine now (for a local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(devices_per_process: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one local process: `devices_per_process` CPU devices, gloo collectives."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    for var in (*_CLUSTER_ENV, *_SLURM_STEP):  # the children form their own job, not an enclosing one
        env.pop(var, None)
    return env


def launch_local(num_processes: int, args: Sequence[str], *, devices_per_process: int = 1,
                 grace_s: float = 60.0) -> int:
    """Run `jaxscale <args>` as `num_processes` processes of one job on this machine.

    Returns 0 when every process succeeds, else the first non-zero exit status; once one process
    fails, the others get `grace_s` seconds to notice and exit before they are killed.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise UserError("launch local needs --processes >= 1 and --devices_per_process >= 1")
    coordinator = f"localhost:{free_port()}"
    env = local_env(devices_per_process)
    procs = [subprocess.Popen([sys.executable, "-m", "jaxscale.cli", *args,
                               f"--coordinator={coordinator}", f"--num_processes={num_processes}",
                               f"--process_id={i}"], env=env)
             for i in range(num_processes)]
    failed, deadline = 0, None
    try:
        while any(p.poll() is None for p in procs):
            if failed == 0:
                failed = next((p.returncode for p in procs if p.returncode), 0)
                deadline = time.monotonic() + grace_s if failed else None
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return failed or next((p.returncode for p in procs if p.returncode), 0)
