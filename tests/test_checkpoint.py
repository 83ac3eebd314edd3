"""Checkpoints: exact resume, resharding restore, preemption (SIGTERM, SIGKILL), bad checkpoints."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import devices_or_skip, tiny_config

from jaxscale.checkpoint import Checkpointer
from jaxscale.checkpoint_report import describe
from jaxscale.data import build_data, make_global_batch
from jaxscale.errors import UserError
from jaxscale.mesh import mesh_from_config
from jaxscale.train.loop import train
from jaxscale.train.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]
N = 3


def run_config(run_dir, **layout):
    config = tiny_config(**layout)
    config.run_dir = str(run_dir)
    config.train.steps = 2 * N
    config.checkpoint.every = N
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """2N steps without a break under fsdp=8; its checkpoint at step N is reused below."""
    devices_or_skip(8)
    run_dir = tmp_path_factory.mktemp("straight")
    history = train(run_config(run_dir, fsdp=8), progress=False)
    return run_dir, [row["loss"] for row in history]


def test_resume_is_bitwise_exact(straight, tmp_path):
    _, losses = straight
    config = run_config(tmp_path, fsdp=8)
    first = train(config, progress=False, stop_at=N)
    assert [r["step"] for r in first][-1] == N
    assert Checkpointer(str(tmp_path / "checkpoints")).steps() == [N]
    second = train(config, progress=False)
    assert [r["step"] for r in second] == list(range(N + 1, 2 * N + 1))
    assert [r["loss"] for r in second] == losses[N:]  # same data order, same numbers
    timed = [r for r in second if "tokens_per_s" in r]  # the loop's wait for batches, in the metrics
    assert timed and all(0 <= r["data_wait_s"] and 0 <= r["data_wait_pct"] < 100 for r in timed)


def restore_and_step(run_dir, config, devices, step=N):
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
    ckpt = Checkpointer(str(run_dir / "checkpoints"), read_only=True)
    state, data_state, _ = ckpt.restore(trainer.abstract_state(), step)
    params = jax.device_get(state.params)
    _, data = build_data(config)
    data.set_state(data_state)
    _, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    return params, float(out["loss"]), trainer


@pytest.mark.parametrize("layout, n_devices", [(dict(data=2, tensor=4), 8),
                                               (dict(fsdp=2, tensor=2), 4)])
def test_restore_onto_another_mesh(straight, layout, n_devices):
    run_dir, losses = straight
    devices = devices_or_skip(n_devices)
    saved, _, _ = restore_and_step(run_dir, run_config(run_dir, fsdp=8), devices_or_skip(8))
    params, loss, trainer = restore_and_step(run_dir, run_config(run_dir, **layout), devices)
    jax.tree.map(np.testing.assert_array_equal, params, saved)
    leaf = jax.tree.leaves(trainer.abstract_state().params)[0]
    assert leaf.sharding.mesh.devices.size == n_devices
    np.testing.assert_allclose(loss, losses[N], rtol=1e-5)  # the un-resharded run's step N+1


def test_interleaved_pipeline_checkpoints_restore_onto_any_layout(tmp_path):
    """The interleaved schedule stores layers as [V, L/V, ...]; its checkpoints hold [L, ...]."""
    devices_or_skip(8)
    config = run_config(tmp_path, pipeline=2, data=4)
    config.model.n_layers = 4
    config.pipeline.update(schedule="interleaved", virtual_stages=2, microbatches=2)
    first = train(config, progress=False, stop_at=N)
    second = train(config, progress=False)  # resumes: canonical -> [V, L/V, ...]
    assert [r["step"] for r in first + second] == list(range(1, 2 * N + 1))
    assert re.search(r"blocks.mlp.w_up +float32 +\[4, 64, 128\]", describe(str(tmp_path / "checkpoints")))
    plain = run_config(tmp_path, data=2)
    plain.model.n_layers = 4
    _, loss, _ = restore_and_step(tmp_path, plain, devices_or_skip(2))
    np.testing.assert_allclose(loss, second[0]["loss"], rtol=1e-5)


def jaxscale(args, run_dir, *, kill_after_save=None, **popen):
    """`jaxscale train` in a subprocess; `kill_after_save=k` SIGKILLs it as step k's save starts."""
    code = ("import os, signal, sys\n"
            "from jaxscale import checkpoint\n"
            f"kill = {kill_after_save!r}\n"
            "save = checkpoint.Checkpointer.save\n"
            "def killing_save(self, step, *args):\n"
            "    save(self, step, *args)\n"
            "    if step == kill: os.kill(os.getpid(), signal.SIGKILL)\n"
            "checkpoint.Checkpointer.save = killing_save\n"
            "from jaxscale.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    overrides = ["--config.model.n_layers=1", "--config.model.d_model=64", "--config.model.d_ff=128",
                 "--config.model.head_dim=8", "--config.model.vocab_size=264",
                 "--config.data.seq_len=32", "--config.train.global_batch_size=8",
                 "--config.train.log_every=1", f"--config.run_dir={run_dir}"]
    return subprocess.Popen([sys.executable, "-c", code, "train", *overrides, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def losses_of(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_sigkill_during_async_save_leaves_the_previous_checkpoint(tmp_path):
    args = ["--config.train.steps=6", "--config.checkpoint.every=2"]
    killed = jaxscale(args, tmp_path / "killed", kill_after_save=4)
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    steps = Checkpointer(str(tmp_path / "killed" / "checkpoints"), read_only=True).steps()
    assert 2 in steps and set(steps) <= {2, 4}  # step 4 only if its write beat the kill
    resumed = jaxscale(args, tmp_path / "killed")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"at step {steps[-1]}" in err
    straight = jaxscale(args, tmp_path / "straight")
    straight.communicate(timeout=300)
    assert losses_of(tmp_path / "killed")[6] == losses_of(tmp_path / "straight")[6]


def test_sigterm_saves_at_the_current_step_and_exits_zero(tmp_path):
    proc = jaxscale(["--config.train.steps=100000", "--config.checkpoint.every=0"], tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    last = max(losses_of(tmp_path))
    assert Checkpointer(str(tmp_path / "checkpoints"), read_only=True).steps() == [last]
    assert f"received SIGTERM: saved a checkpoint at step {last}" in err


def test_damaged_latest_checkpoint_falls_back_with_a_warning(straight, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    latest = run_dir / "checkpoints" / str(2 * N) / "state"
    for f in latest.rglob("*"):
        if f.is_file() and "ocdbt" not in str(f.parent):
            f.write_bytes(b"garbage")
    config = run_config(run_dir, fsdp=8)
    trainer = build_trainer(config, mesh_from_config(config.mesh))
    ckpt = Checkpointer(str(run_dir / "checkpoints"))
    with caplog.at_level("WARNING", logger="jaxscale"):
        _, _, step = ckpt.restore(trainer.abstract_state())
    assert step == N and re.search(f"checkpoint step {2 * N} in .* is unreadable", caplog.text)
    with pytest.raises(UserError, match=f"checkpoint step {2 * N} .* is unreadable"):
        ckpt.restore(trainer.abstract_state(), step=2 * N)  # asked for by number: no fallback
    with pytest.raises(UserError, match=f"checkpoint step {2 * N} .* is unreadable"):
        ckpt.restore_params(trainer.abstract_state().params, step=2 * N)
    text = describe(str(run_dir / "checkpoints"))
    assert re.search(rf"step +{2 * N} .* MiB  unreadable", text) and f"parameters at step {N}:" in text


def test_mismatched_model_is_refused_and_nothing_is_touched(straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    config = run_config(run_dir, fsdp=8)
    config.model.d_ff = 256
    with pytest.raises(UserError, match=r"does not match the model: params.blocks.mlp.w_down is "
                                        r"float32\[2, 128, 64\] in the checkpoint but "
                                        r"float32\[2, 256, 64\] in the model"):
        train(config, progress=False)
    after = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*")
                   if p.name != "metrics.jsonl")
    assert [x for x in before if x[0].name != "metrics.jsonl"] == after


def test_a_url_checkpoint_directory_reaches_orbax_as_it_is(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ocp, "CheckpointManager", lambda directory, **_: seen.append(directory))
    monkeypatch.chdir(tmp_path)
    Checkpointer("gs://bucket/run/checkpoints")
    Checkpointer(Path("run/checkpoints"))
    assert seen == ["gs://bucket/run/checkpoints", str(tmp_path / "run" / "checkpoints")]


def test_bad_checkpoint_requests_are_clear(straight, tmp_path):
    config = run_config(tmp_path / "fresh", fsdp=8)
    config.checkpoint.init_params_from = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="checkpoint directory .*nowhere' does not exist"):
        train(config, progress=False)
    config = run_config(straight[0], fsdp=8)
    config.checkpoint.resume_step = 5
    with pytest.raises(UserError, match=f"no checkpoint at step 5 .* steps present: {N}, {2 * N}"):
        train(config, progress=False)
    with pytest.raises(UserError, match="no complete checkpoint"):
        describe(str(tmp_path))
    (tmp_path / "junk" / "5").mkdir(parents=True)  # a step directory Orbax did not write
    (tmp_path / "junk" / "5" / "state").write_text("junk")
    with pytest.raises(UserError, match="checkpoint step 5 in .*junk is unreadable .*; remove that"):
        describe(str(tmp_path / "junk"))
    config = run_config(tmp_path / "fresh", fsdp=8)
    config.checkpoint.init_params_from = str(tmp_path / "junk")
    with pytest.raises(UserError, match="checkpoint step 5 in .*junk is unreadable"):
        train(config, progress=False)


def test_fine_tuning_starts_from_another_runs_params(straight, tmp_path):
    config = run_config(tmp_path, data=8)
    config.checkpoint.init_params_from = str(straight[0] / "checkpoints")
    config.train.steps = 1
    history = train(config, progress=False)
    source, _, _ = restore_and_step(straight[0], run_config(straight[0], fsdp=8),
                                    devices_or_skip(8), step=2 * N)
    trainer = build_trainer(config, mesh_from_config(config.mesh))
    params = Checkpointer(config.checkpoint.init_params_from, read_only=True).restore_params(
        trainer.abstract_state().params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), source)
    assert history[0]["loss"] < straight[1][0] - 0.5  # starts from trained weights, not random
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    assert ckpt.steps() == [1]  # its own step count, from 0


def test_inspect_lists_steps_params_and_config(straight):
    text = describe(str(straight[0] / "checkpoints"))
    assert f"step {N:>8}" in text and f"step {2 * N:>8}" in text
    assert "blocks.mlp.w_gate                        float32  [2, 64, 128]" in text
    assert '"d_model": 64' in text
    out = subprocess.run([sys.executable, "-m", "jaxscale.cli", "inspect", "/no/such/dir"],
                         capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
