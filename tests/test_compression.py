"""Compressed gradient reduction over `data` with error feedback (`parallel.grad_compression`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config, train_steps
from jax.sharding import Mesh, PartitionSpec

from jaxscale.config import validate
from jaxscale.errors import UserError
from jaxscale.hlo import collective_stats
from jaxscale.mesh import mesh_from_config
from jaxscale.parallel import compression
from jaxscale.plan import plan
from jaxscale.train.loop import train
from jaxscale.train.trainer import build_trainer


def exchanged(codec, x):
    """`compression.exchange` over 2 devices of `x` [2, ...] (device i's row i): the reduced
    sum each device gets, and each device's residual."""
    mesh = Mesh(np.array(devices_or_skip(2)), ("data",))
    run = jax.shard_map(lambda x: tuple(a[None] for a in compression.exchange(x[0], codec, "data")),
                        mesh=mesh, in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data"),
                        check_vma=False)
    total, left = jax.jit(run)(x)
    return np.asarray(total), np.asarray(left)


def test_top_k_reduction_with_error_feedback_by_hand():
    """Two devices, chunks of 4 values, k = 1. Device 0 holds x0 = g0 + e0 = [1, -2.5 | 0.5, 2]
    (its gradient plus the residual it carried), device 1 x1 = [2, 1 | -4, 0.25]. Each sends the
    largest value of each chunk to the chunk's owner (device j owns chunk j), which sums them and
    keeps the largest of the sum; what either step left out stays in the residuals, so the
    reduced sum plus both residuals is exactly x0 + x1."""
    x = np.array([[[1.0, -2.5], [0.5, 2.0]], [[2.0, 1.0], [-4.0, 0.25]]], np.float32)
    total, left = exchanged(compression.TopK(1, 2), jnp.asarray(x))
    # chunk 0: device 0 sends -2.5 (index 1), device 1 sends 2 (index 0): sum [2, -2.5] -> -2.5
    # chunk 1: device 0 sends 2 (index 1), device 1 sends -4 (index 0): sum [-4, 2] -> -4
    np.testing.assert_array_equal(total, [[0, -2.5, -4, 0]] * 2)
    # device 0: unsent [1, 0 | 0.5, 0], plus chunk 0's sum minus what it kept: [2, 0]
    # device 1: unsent [0, 1 | 0, 0.25], plus chunk 1's sum minus what it kept: [0, 2]
    np.testing.assert_array_equal(left, [[3, 0, 0.5, 0], [0, 1, 0, 2.25]])
    np.testing.assert_array_equal(total[0] + left.sum(0), x.reshape(2, -1).sum(0))


@pytest.mark.parametrize("codec", [compression.BF16(), compression.Int8()])
def test_reduction_plus_residuals_is_the_uncompressed_sum(codec):
    """Whatever bf16 or int8 codes lose stays in the residuals: the reduced sum plus every
    device's residual is the float32 sum of what the devices held (to rounding)."""
    x = jax.random.normal(jax.random.key(0), (2, 2, 2 * compression.BLOCK)) * jnp.array([1e-3, 10.0])[
        None, :, None]
    total, left = exchanged(codec, x)
    want = np.asarray(x).reshape(2, -1).sum(0)
    np.testing.assert_array_equal(total[0], total[1])
    assert np.abs(total[0] - want).max() > 1e-6  # lossy...
    np.testing.assert_allclose(total[0] + left.sum(0), want, rtol=1e-6, atol=1e-6)  # ...no loss


@pytest.fixture(scope="module")
def sync():
    """Synchronous data parallelism's first steps on data=4 x fsdp=2, and its bytes over `data`."""
    return run("none")


def run(kind: str, steps: int = 4, fraction: float = 1 / 64):
    config = tiny_config(data=4, fsdp=2)
    config.parallel.update(grad_compression=kind, topk_fraction=fraction)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
    stats = collective_stats(trainer.compile().as_text(), sent=True)
    local = sum(math.prod(a.sharding.shard_shape(a.shape))  # values of each device's shards
                for a in jax.tree.leaves(trainer.abstract_state().params))
    state, losses = train_steps(trainer, config, steps)
    return state, losses, stats, local


@pytest.mark.parametrize("kind, factor, rtol", [("bf16", 2, 1e-5), ("int8", 4 / (1 + 4 / 256), 1e-3),
                                                ("topk", 32, None)])
def test_compressed_training_sends_the_expected_fraction_of_bytes(sync, kind, factor, rtol):
    """On data=4 x fsdp=2 (fsdp reduces inside each replica as before), the bytes each device
    sends for the gradients' reduction over `data` fall by the codec's factor against the
    float32 all-reduce (bf16 2x, int8 3.9x, top-1/64 32x; within the chunks' padding), and the
    losses follow synchronous training's; top-k's error feedback holds what it did not send."""
    _, want, sync_stats, local = sync
    state, losses, stats, _ = run(kind)
    float32 = sync_stats["all-reduce"][1] - stats["all-reduce"][1]  # both sum the loss's scalars
    assert float32 == pytest.approx(2 * 3 / 4 * 4 * local, rel=1e-3)  # a ring's over data=4
    compressed = stats["all-to-all"][1] + stats["all-gather"][1] - sync_stats["all-gather"][1]
    assert sync_stats["all-to-all"][1] == 0 and stats["reduce-scatter"] == sync_stats["reduce-scatter"]
    assert float32 / compressed == pytest.approx(factor, rel=0.03)
    if rtol:
        np.testing.assert_allclose(losses, want, rtol=rtol)
    else:
        assert losses[-1] < losses[0] - 0.3
        assert min(np.abs(np.asarray(r)).max() for r in jax.tree.leaves(state.residual)) > 0
    assert jax.tree.leaves(state.residual)[0].shape[0] == 4  # one residual per replica


def test_resume_is_exact_with_the_residuals_checkpointed(tmp_path):
    """Stopped after step 2 and resumed, an int8 run's losses are those of a run without a stop."""
    def config(name):
        c = tiny_config(data=4, fsdp=2)
        c.parallel.grad_compression = "int8"
        c.run_dir, c.train.steps, c.checkpoint.every = str(tmp_path / name), 5, 2
        return c

    want = [row["loss"] for row in train(config("straight"), progress=False)]
    train(config("run"), progress=False, stop_at=2)
    assert [row["loss"] for row in train(config("run"), progress=False)] == want[2:]


def test_info_counts_the_residuals():
    config = tiny_config(data=4, fsdp=2)
    assert plan(config, 8)["residual_bytes_per_device"] == 0
    config.parallel.grad_compression = "int8"
    p = plan(config, 8)
    assert p["residual_bytes_per_device"] == p["grad_bytes_per_device"] > 0


@pytest.mark.parametrize("settings, error, match", [
    (dict(grad_compression="fp4"), UserError, "grad_compression='fp4'; use one of"),
    (dict(grad_compression="int8", layout=dict(fsdp=8)), UserError, "which is 1 here"),
    (dict(grad_compression="topk", topk_fraction=0.0), UserError, "topk_fraction=0.0 is out of range"),
    (dict(grad_compression="int8", zero_stage=2), NotImplementedError, "zero_stage=2"),
    (dict(grad_compression="bf16", diloco=True), NotImplementedError, "DiLoCo's outer step"),
])
def test_bad_settings_are_refused_in_one_line(settings, error, match):
    config = tiny_config(**settings.pop("layout", dict(data=2, fsdp=4)))
    config.diloco.enabled = settings.pop("diloco", False)
    config.parallel.update(settings)
    with pytest.raises(error, match=match):
        validate(config)
        build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
