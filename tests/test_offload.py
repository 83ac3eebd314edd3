"""Host offload (`train.offload`): state parts kept in host memory between steps, same numbers."""

import re
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config, train_steps

from jaxscale.checkpoint import Checkpointer
from jaxscale.errors import UserError
from jaxscale.mesh import mesh_from_config
from jaxscale.train import offload
from jaxscale.train.loop import train
from jaxscale.train.trainer import build_trainer

LAYOUT = dict(data=2, fsdp=2, tensor=2)
STEPS = 3


def offload_config(parts: str, remat: str = "none"):
    config = tiny_config(**LAYOUT)
    config.train.offload, config.model.remat = parts, remat
    return config


def run(parts: str, remat: str = "none"):
    """The state after `STEPS` steps, their losses and the trainer."""
    config = offload_config(parts, remat)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
    return *train_steps(trainer, config, STEPS), trainer


@pytest.fixture(scope="module")
def reference():
    return run("")


def memory_kinds(tree) -> set[str]:
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.mark.parametrize("parts, on_host", [("optimizer", ("opt_state",)),
                                            ("optimizer, params", ("opt_state", "params"))])
def test_offloaded_parts_live_in_host_memory_and_train_alike(parts, on_host, reference):
    """After 3 steps on data=2 x fsdp=2 x tensor=2 the offloaded parts are in `pinned_host` memory
    with their usual shardings, the rest in device memory, and the losses are one device-memory
    run's; the step's program takes and returns exactly the offloaded leaves in host memory."""
    want_state, want_losses, _ = reference
    state, losses, trainer = run(parts)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    for field in ("params", "opt_state"):
        got, want = getattr(state, field), getattr(want_state, field)
        assert memory_kinds(got) == {offload.HOST if field in on_host else "device"}, field
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.sharding.spec == b.sharding.spec
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    host_leaves = sum(len(jax.tree.leaves(getattr(state, f))) for f in on_host)
    program = trainer.lower().as_text()
    main = program[program.index("func.func public @main"):].split("\n", 1)[0]
    marked = len(re.findall(r'mhlo.memory_kind = "pinned_host"', main))
    assert marked == 2 * host_leaves  # the step's inputs and outputs


def test_activation_offload_keeps_named_activations_in_host_memory(reference):
    """`model.remat="offload:..."` moves the named activations to `pinned_host` memory between
    the forward and the backward in programs for GPUs and TPUs (once per name, in the layer scan;
    XLA:CPU keeps them in place), with the losses of no rematerialisation."""
    _, losses, trainer = run("", "offload:mlp_hidden,attn_out")
    np.testing.assert_allclose(losses, reference[1], rtol=1e-6)
    for platform in ("cuda", "tpu"):
        program = trainer.lower(platform).as_text()
        assert program.count('_xla_buffer_placement = "pinned_host"') == 2, platform


def test_resume_with_offloaded_optimizer_is_exact(tmp_path):
    """A run with the optimizer state in host memory stopped at a checkpoint and resumed gives
    the losses of the run without a stop; the restored state is back in host memory."""
    def config():
        c = offload_config("optimizer")
        c.run_dir, c.train.steps, c.checkpoint.every = str(tmp_path / "run"), 4, 2
        return c

    straight = offload_config("optimizer")
    straight.run_dir, straight.train.steps = str(tmp_path / "straight"), 4
    want = [row["loss"] for row in train(straight, progress=False)]
    train(config(), progress=False, stop_at=2)
    assert [row["loss"] for row in train(config(), progress=False)] == want[2:]
    trainer = build_trainer(config(), mesh_from_config(config().mesh, devices_or_skip(8)))
    state, _, _ = Checkpointer(str(tmp_path / "run" / "checkpoints"), read_only=True).restore(
        trainer.abstract_state(canonical=True), 4)
    assert memory_kinds(state.opt_state) == {offload.HOST}
    assert memory_kinds(state.params) == {"device"}


def test_diloco_replicas_optimizer_state_is_offloaded_too():
    """Under DiLoCo `optimizer` also moves the replicas' AdamW state (the bulk) to the host, and
    the losses stay those of DiLoCo in device memory."""
    def diloco(parts):
        config = offload_config(parts)
        config.diloco.update(enabled=True, inner_steps=2)
        trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
        return train_steps(trainer, config, STEPS)

    state, losses = diloco("optimizer")
    np.testing.assert_allclose(losses, diloco("")[1], rtol=1e-6)
    assert memory_kinds(state.local[1]) == memory_kinds(state.opt_state) == {offload.HOST}
    assert memory_kinds(state.local[0]) == memory_kinds(state.params) == {"device"}


def test_bad_offload_settings_are_refused_in_one_line():
    with pytest.raises(UserError, match="train.offload names 'activations'; use a comma-separated"):
        offload.parts(offload_config("optimizer,activations"), jax.devices())
    no_host = SimpleNamespace(addressable_memories=lambda: [SimpleNamespace(kind="device")])
    with pytest.raises(UserError, match=r"needs host memory \('pinned_host'\), which these devices "
                                        r"do not have \(memory kinds: device\)"):
        offload.parts(offload_config("params"), [no_host])
    assert offload.parts(offload_config(""), [no_host]) == ()
    with pytest.raises(UserError, match="model.remat='offload:' is not a policy"):
        config = offload_config("", "offload:")
        build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
