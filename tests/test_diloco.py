"""DiLoCo / local SGD over the `data` axis's replicas (`diloco.*`)."""

import jax
import numpy as np
import optax
import pytest
from conftest import devices_or_skip, tiny_config, train_steps

from jaxscale.config import validate
from jaxscale.errors import UserError
from jaxscale.hlo import branch_collective_stats
from jaxscale.mesh import mesh_from_config
from jaxscale.plan import plan
from jaxscale.train import trainer as trainer_module
from jaxscale.train.loop import train
from jaxscale.train.trainer import build_trainer

STEPS = 5


def diloco_config(inner_steps: int = 0, **layout):
    """`tiny_config` on `layout`, with DiLoCo taking `inner_steps` (0: off)."""
    config = tiny_config(**layout)
    if inner_steps:
        config.diloco.update(enabled=True, inner_steps=inner_steps)
    return config


def run(config, steps: int = STEPS):
    """The state after `steps` steps and their losses."""
    n = int(np.prod([config.mesh[a] for a in ("data", "fsdp", "tensor", "pipeline")]))
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(n)))
    return train_steps(trainer, config, steps)


def sgd(optim_cfg, total_steps, frozen=()):
    """An inner optimizer linear in the gradient, in place of `make_optimizer`'s AdamW."""
    return optax.sgd(0.2), optax.constant_schedule(0.2)


def close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("layout", [dict(data=2, fsdp=2, tensor=2),
                                    dict(data=2, pipeline=2, fsdp=2)])
def test_one_inner_step_with_plain_outer_sgd_is_synchronous_data_parallelism(layout, monkeypatch):
    """H = 1, outer learning rate 1 and no momentum, inner SGD: the losses of 5 steps and the
    parameters after them equal synchronous data parallelism's (fsdp, tensor and pipeline inside
    each replica)."""
    monkeypatch.setattr(trainer_module, "make_optimizer", sgd)
    want_state, want = run(diloco_config(**layout))
    config = diloco_config(1, **layout)
    config.diloco.update(outer_lr=1.0, outer_momentum=0.0)
    state, losses = run(config)
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    assert losses[-1] < losses[0] - 0.1
    close(state.params, want_state.params, 1e-4)
    for replica in range(layout["data"]):  # every replica restarted from the global parameters
        close(jax.tree.map(lambda a, i=replica: a[i], state.local[0]), state.params, 1e-6)


def test_replicas_train_apart_then_the_outer_step_moves_the_global_parameters():
    """With H = 3 the replicas drift apart on their own batches; the third step's outer step
    moves the global parameters by -lr (1 + momentum) x (global - replicas' mean) (Nesterov's
    first step), and every replica restarts from them."""
    layout = dict(data=4, fsdp=2)
    apart, _ = run(diloco_config(1000, **layout), steps=3)  # no outer step yet
    init, _ = run(diloco_config(1000, **layout), steps=0)
    replicas = apart.local[0]
    first, second = (jax.tree.map(lambda a, i=i: np.asarray(a[i]), replicas) for i in (0, 1))
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(first),
                                                   jax.tree.leaves(second), strict=True)) > 1e-3
    close(apart.params, init.params, 0)  # the global parameters wait for the outer step
    config = diloco_config(3, **layout)
    synced, _ = run(config, steps=3)
    lr, mu = config.diloco.outer_lr, config.diloco.outer_momentum
    want = jax.tree.map(lambda g, r: np.asarray(g) - lr * (1 + mu) * (
        np.asarray(g) - np.asarray(r).mean(axis=0)), init.params, replicas)
    close(synced.params, want, 1e-4)
    for replica in range(layout["data"]):
        close(jax.tree.map(lambda a, i=replica: a[i], synced.local[0]), synced.params, 1e-6)


def test_parameters_cross_data_only_in_the_outer_step():
    """Synchronous data=8 all-reduces every gradient each step; DiLoCo's step all-reduces only
    scalars (loss and token sums, gradient norms), and the parameters once, in the branch its
    outer step takes every H steps: H times fewer bytes per step."""
    config = diloco_config(data=8)
    sync = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
    param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(sync.abstract_state().params))
    every, _ = branch_collective_stats(sync.compile().as_text())
    assert every["all-reduce"][1] >= param_bytes
    local = build_trainer(diloco_config(32, data=8), mesh_from_config(config.mesh, devices_or_skip(8)))
    every, outer = branch_collective_stats(local.compile().as_text())
    assert sum(b for _, b in every.values()) < 1024
    assert outer["all-reduce"][1] == param_bytes
    assert sum(b for op, (_, b) in outer.items() if op != "all-reduce") == 0


def test_info_counts_the_global_parameters_and_the_outer_momentum():
    """`jaxscale info` adds DiLoCo's global parameters and outer momentum to each device's state:
    twice the parameter bytes with momentum, once without."""
    config = diloco_config(8, data=8)
    p = plan(config, 8)
    assert p["diloco_bytes_per_device"] == 2 * p["param_bytes_per_device"] > 0
    config.diloco.outer_momentum = 0.0
    assert plan(config, 8)["diloco_bytes_per_device"] == p["param_bytes_per_device"]
    assert plan(diloco_config(data=8), 8)["diloco_bytes_per_device"] == 0


def test_resume_mid_round_is_exact(tmp_path):
    """Stopped after step 2 of a round of 3 and resumed, the run's losses are those of a run
    without a stop: the replicas, their optimizer states and the outer momentum are saved."""
    def config(name, stop_every=0):
        c = diloco_config(3, data=2, fsdp=2, tensor=2)
        c.run_dir, c.train.steps = str(tmp_path / name), 7
        c.checkpoint.every = stop_every
        return c

    want = [row["loss"] for row in train(config("straight"), progress=False)]
    train(config("run", 2), progress=False, stop_at=2)
    assert [row["loss"] for row in train(config("run", 2), progress=False)] == want[2:]


@pytest.mark.parametrize("settings, error, match", [
    (dict(enabled=True, layout=dict(fsdp=8)), UserError, "diloco.enabled needs replicas"),
    (dict(enabled=True, zero_stage=1), UserError, "parallel.zero_stage=1 shards over `data`"),
    (dict(enabled=True, inner_steps=0), UserError, "diloco.inner_steps=0 is out of range"),
    (dict(enabled=True, layout=dict(data=2, pipeline=2, fsdp=2), virtual_stages=2),
     NotImplementedError, "DiLoCo with the interleaved schedule"),
])
def test_bad_settings_are_refused_in_one_line(settings, error, match):
    config = tiny_config(**settings.pop("layout", dict(data=2, fsdp=4)))
    config.parallel.zero_stage = settings.pop("zero_stage", 0)
    if "virtual_stages" in settings:
        config.pipeline.update(schedule="interleaved", virtual_stages=settings.pop("virtual_stages"))
        config.model.n_layers = 4
    config.diloco.update(settings)
    with pytest.raises(error, match=match):
        validate(config)
        build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
