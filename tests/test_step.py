"""The compiled training step: state buffers donated, one compilation for every step."""

import jax
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config

from jaxscale.data import build_data, make_global_batch
from jaxscale.mesh import mesh_from_config
from jaxscale.train.trainer import build_trainer


class CompileCounter:
    """Counts XLA backend compilations while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, *_, **__) -> None:
        self.count += event == self.EVENT


COUNTER = CompileCounter()


@pytest.mark.parametrize("layout", [{}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_the_step_donates_its_state_and_compiles_once(layout):
    config = tiny_config(**layout)
    n = int(np.prod(list(layout.values()) or [1]))
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(n)))
    _, data = build_data(config)
    state = trainer.init()
    for aot in (False, True):
        if aot:
            trainer.compile()  # what `jaxscale train` runs: the ahead-of-time executable
        compiles = []
        for _ in range(3):
            old = jax.tree.leaves(state)
            before = COUNTER.count
            batch = make_global_batch(next(data), trainer.batch_sharding)
            state, out = trainer.step(state, batch)
            jax.block_until_ready(out)
            compiles.append(COUNTER.count - before)
            assert all(leaf.is_deleted() for leaf in old)  # every state buffer was donated
        assert compiles[1:] == [0, 0], compiles  # compiled for the first step, then reused
        assert compiles[0] == (0 if aot else 1)


def test_a_step_with_a_nonfinite_loss_applies_no_update():
    config = tiny_config()
    config.optim.update(lr=1e10, warmup_steps=0)  # the first update blows the weights up
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(1)))
    _, data = build_data(config)
    state, out = trainer.step(trainer.init(), make_global_batch(next(data), trainer.batch_sharding))
    assert float(out["nonfinite"]) == 0.0 and np.isfinite(float(out["loss"]))
    before = jax.device_get((state.params, state.opt_state))
    state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    assert float(out["nonfinite"]) == 1.0 and not np.isfinite(float(out["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state)),
                 before)
    assert int(state.step) == 2  # the data moved on; the weights did not
