"""A compiled step's memory and per-axis collectives, counted per step, on the emulated CPU mesh."""

import jax
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config

from jaxscale.errors import UserError
from jaxscale.mesh import mesh_from_config
from jaxscale.parallel import zero
from jaxscale.planner import compiled
from jaxscale.planner.compiled import compile_step, step_collectives
from jaxscale.train.trainer import build_trainer

# the memory and the per-step collectives (loops by their trip counts) of the programs the
# `jaxscale` command compiles
pytestmark = pytest.mark.usefixtures("production_compiles")

LAYOUTS = {
    "dp8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "tp4": dict(tensor=4),
    "tp4_unrolled": dict(tensor=4),
    "gpipe_p2_dp4": dict(pipeline=2, data=4),
}


@pytest.fixture(scope="module")
def steps():
    """Each layout of `LAYOUTS` compiled once, as the tests ask for them."""
    cache = {}

    def get(name: str):
        if name not in cache:
            config = tiny_config(**LAYOUTS[name])
            config.model.scan_layers = name != "tp4_unrolled"
            n = int(np.prod([v for k, v in LAYOUTS[name].items() if k in config.mesh]))
            cache[name] = compile_step(config, devices_or_skip(n))
        return cache[name]
    return get


def param_bytes(config) -> int:
    trainer = build_trainer(config, mesh_from_config(config.mesh, jax.devices()[:1]))
    return sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(trainer.abstract_state().params))


def test_dp_all_reduces_every_float32_gradient_once_over_data(steps):
    step, n = steps("dp8"), 8
    grads = param_bytes(tiny_config()) + 2 * 4  # and the loss sum and token count, float32
    assert step.collectives == {"data": {"all-reduce": (1, 2 * (n - 1) / n * grads)}}


def test_fsdp_gathers_params_and_reduce_scatters_grads_over_fsdp(steps):
    step, params = steps("fsdp8"), param_bytes(tiny_config())
    assert set(step.collectives) == {"fsdp"}
    ops = step.collectives["fsdp"]
    assert ops["all-gather"][1] >= 7 / 8 * params  # each device receives the other 7/8ths
    # flat buffers: the layers' and the rest's, each device's part padded to FLAT_ALIGN floats
    padding = (tiny_config().model.n_layers + 1) * 7 * zero.FLAT_ALIGN * 4
    assert 7 / 8 * params <= ops["reduce-scatter"][1] <= 7 / 8 * params + padding
    assert ops["all-reduce"][1] < 1e-3 * params  # scalars only: gradients never travel whole
    dp = steps("dp8")
    assert step.argument_bytes < dp.argument_bytes / 4 and step.peak_bytes < dp.peak_bytes
    assert step.peak_bytes == (step.argument_bytes + step.output_bytes - step.alias_bytes
                               + step.temp_bytes)
    assert step.host_argument_bytes == step.host_temp_bytes == 0 and step.flops > 0


def test_tp_all_reduces_each_layer_over_tensor_counted_per_step(steps):
    """The scanned layers' all-reduces count once per layer: as many as the unrolled layers'."""
    scanned, unrolled = steps("tp4"), steps("tp4_unrolled")
    layers = tiny_config().model.n_layers
    assert set(scanned.collectives) == {"tensor"}
    count = scanned.collectives["tensor"]["all-reduce"][0]
    assert count >= 4 * layers  # attention and MLP outputs, forward and backward
    assert scanned.collectives == unrolled.collectives


def test_pipeline_sends_each_microbatch_over_pipeline_every_tick(steps):
    step = steps("gpipe_p2_dp4")
    c = tiny_config()
    p, m = 2, c.pipeline.microbatches
    rows = c.train.global_batch_size // 4 // m  # per data shard and microbatch
    activation = rows * c.data.seq_len * c.model.d_model * 4
    ticks = m + p - 1
    assert step.collectives["pipeline"]["collective-permute"] == (2 * ticks, 2 * ticks * activation)
    assert "data" in step.collectives and "tensor" not in step.collectives


# A TPU-style program: a loop without `known_trip_count` whose counter starts from a copied
# constant, an async collective-permute inside it, an all-gather over the whole mesh outside.
PROGRAM = """HloModule m, is_scheduled=true

%cond (c: (s32[], f32[4])) -> pred[] {
  %c = (s32[], f32[4]{0:T(128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%c), index=0
  %n = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0:T(128)}) parameter(0)
  %x = f32[4]{0:T(128)} get-tuple-element(%p), index=1
  %s = (f32[4], f32[4], u32[]) collective-permute-start(%x), source_target_pairs={{0,2},{2,0},{1,3},{3,1}}
  %d = f32[4]{0:T(128)} collective-permute-done(%s)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4]) tuple(%i, %d)
}

ENTRY %main (a: f32[4]) -> f32[16] {
  %a = f32[4]{0:T(128)} parameter(0)
  %z = s32[]{:T(128)} constant(1)
  %zc = s32[]{:T(128)} copy(%z)
  %in = (s32[], f32[4]) tuple(%zc, /*index=1*/%a)
  %loop = (s32[], f32[4]) while(%in), condition=%cond, body=%body
  %out = f32[4] get-tuple-element(%loop), index=1
  ROOT %g = f32[16]{0:T(128)} all-gather(%out), channel_id=2, replica_groups={}, dimensions={0}
}
"""


def test_loops_without_known_trip_counts_and_async_pairs_count_per_step():
    # devices 0..3 on a mesh `a=2 x b=2`; the permute's pairs differ in `a` only
    stats = step_collectives(PROGRAM, np.arange(4).reshape(2, 2), ("a", "b"))
    assert stats == {"a": {"collective-permute": (2, 2 * 16.0)},  # counter 1, 2: two trips
                     "a+b": {"all-gather": (1, 3 / 4 * 64)}}  # `{}`: every device


def test_topology_devices_needs_libtpu(monkeypatch):
    monkeypatch.setattr(compiled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install libtpu"):
        compiled.topology_devices("v5p:2x2x1")
