"""8-bit AdamW (`optim.moments="8bit"`): state bytes, quantization error, training next to float32
AdamW, sharded like the parameters, exact resume, the config's one-line error."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import devices_or_skip, tiny_config, train_steps
from jax.sharding import PartitionSpec as P

from jaxscale.checkpoint import Checkpointer
from jaxscale.config import load_module
from jaxscale.errors import UserError
from jaxscale.hlo import collective_stats
from jaxscale.mesh import mesh_from_config
from jaxscale.models import abstract_model
from jaxscale.train import adam8bit
from jaxscale.train.adam8bit import SQRT_V_FLOOR, dequantize, quantize
from jaxscale.train.loop import train
from jaxscale.train.optim import make_optimizer
from jaxscale.train.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


def config(moments: str, **layout):
    c = tiny_config(**layout)
    c.train.steps = STEPS
    c.optim.moments = moments
    return c


def run(c, devices, steps: int):
    """Losses of `steps` steps, the state after them and the trainer (compiled ahead of time)."""
    trainer = build_trainer(c, mesh_from_config(c.mesh, devices))
    trainer.compile()
    state, losses = train_steps(trainer, c, steps)
    return losses, state, trainer


@pytest.fixture(scope="module")
def single():
    """STEPS steps on one device with float32 and with 8-bit moments."""
    devices = devices_or_skip(1)
    return {m: run(config(m), devices, STEPS)[:2] for m in ("float32", "8bit")}


def adam_state(opt_state):
    kinds = (adam8bit.ScaleByAdam8bitState, optax.ScaleByAdamState)
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
                if isinstance(s, kinds))


def bytes_per_param(params, opt_state) -> float:
    n = sum(p.size for p in jax.tree.leaves(params))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)) / n


def test_state_bytes_per_parameter_are_about_2_against_8(single):
    (_, s32), (_, s8) = single["float32"], single["8bit"]
    assert adam_state(s8.opt_state).mu["lm_head"].dtype == jnp.float8_e4m3fn
    float32, eight = bytes_per_param(s32.params, s32.opt_state), bytes_per_param(s8.params, s8.opt_state)
    assert float32 == pytest.approx(8.0, abs=1e-3)
    # the tiny model's attention weights end in head_dim=8: one scale per 8 values there
    assert 2.0 < eight < 2.25, eight  # measured 2.229
    # Llama-3.2-1B's shapes (abstract, nothing allocated): blocks of 256 (128 along head_dim)
    c = load_module(ROOT / "configs" / "llama3_1b.py").get_config()
    _, params = abstract_model(c.model)
    for moments, low, high in (("float32", 8.0, 8.001), ("8bit", 2.0, 2.05)):  # measured 2.039
        c.optim.moments = moments
        tx, _ = make_optimizer(c.optim, 10)
        assert low <= bytes_per_param(params, jax.eval_shape(tx.init, params)) < high


@pytest.mark.parametrize("n, size", [(600, 200), (601, 256)])  # 3 equal blocks; a padded last one
def test_quantization_error_is_bounded_per_block(n, size):
    assert adam8bit.block_size(n, 256) == size
    rng = np.random.default_rng(0)
    # first moments: signs, magnitudes over 4 decades within each block
    x = (rng.standard_normal((4, n)) * np.logspace(-3, 1, n)).astype(np.float32)
    codes, scales = quantize(jnp.asarray(x), 256)
    assert codes.shape == x.shape and codes.dtype == jnp.float8_e4m3fn and scales.shape == (4, 3)
    absmax = np.pad(np.abs(x), ((0, 0), (0, 3 * size - n))).reshape(4, 3, size).max(-1)
    np.testing.assert_allclose(scales, absmax / 448, rtol=1e-6)
    y = np.asarray(dequantize(codes, scales, 256))
    unit = np.repeat(np.asarray(scales), size, axis=1)[:, :n]
    normal = np.abs(x) >= 2**-6 * unit  # the code's normal range: 3.5e-5 of the block's maximum
    assert normal.mean() > 0.99
    assert (np.abs(y - x) / np.abs(x))[normal].max() <= 2**-4  # measured 0.059
    assert np.all(np.abs(y - x) <= 2**-10 * unit, where=~normal)  # subnormal codes: half a step
    # second moments spanning 1e-8..1 in one block, stored as sqrt(v): a bounded relative error
    v = rng.permutation(np.logspace(-8, 0, 256)).astype(np.float32)
    r = np.asarray(dequantize(*quantize(jnp.sqrt(v), 256, SQRT_V_FLOOR), 256))
    assert np.abs(r / np.sqrt(v) - 1).max() <= 2**-4  # measured 0.059
    # under the code's range sqrt(v) is rounded up to its floor, never to 0; a zero block stays 0
    r = np.asarray(dequantize(*quantize(jnp.asarray([1.0, 1e-6, 0.0]), 256, SQRT_V_FLOOR), 256))
    assert r[0] == 1.0 and r[1] == pytest.approx(2**-6 / 448) and r[1] > 1e-6
    zeros = quantize(jnp.zeros((2, 8)), 256, SQRT_V_FLOOR)
    assert not np.any(zeros[1]) and not np.any(dequantize(*zeros, 256))
    codes, scales = quantize(jnp.float32(-3.0), 256)  # a 0-d parameter (a gate): its own block
    assert codes.shape == scales.shape == () and float(dequantize(codes, scales, 256)) == -3.0


def test_training_follows_float32_adamw(single):
    (float32, _), (eight, _) = single["float32"], single["8bit"]
    assert eight[-1] < eight[0] - 2.5, eight  # it learns: 6.21 -> 3.11
    rel = np.abs(np.asarray(eight) / np.asarray(float32) - 1)
    assert rel.max() < 5e-3, rel.max()  # measured 4.7e-4 over 30 steps


# 6 steps: after about 10 a gradient's last-bit difference (another summation order) starts to
# move a moment across a rounding boundary (6% of one value) and the runs drift apart (2e-4 by 20).
SHARDED_STEPS = 6
# {parameter: (spec of its 8-bit moments, of their block scales)}: a scale's block axis is split
# where each shard holds whole blocks (lm_head: 2 blocks of 132 vocabulary entries)
LAYOUTS = {
    "fsdp4_dp2_zero1": (dict(fsdp=4, data=2, zero_stage=1), 8, {
        ("blocks", "mlp", "w_down"): (P(None, "data", "fsdp"), P(None, "data", None)),
        ("blocks", "mlp", "w_up"): (P(None, ("fsdp", "data"), None),) * 2,
        ("lm_head",): (P(None, ("fsdp", "data")), P(None, None))}),  # 33 entries a shard
    "tp2_dp2": (dict(tensor=2, data=2), 4, {
        ("blocks", "mlp", "w_up"): (P(None, None, "tensor"), P(None, None, None)),
        ("lm_head",): (P(None, "tensor"), P(None, "tensor"))}),  # 132 entries a shard
}


def leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("name", LAYOUTS)
def test_sharded_moments_match_one_device(name, single):
    layout, n, expected = LAYOUTS[name]
    c = config("8bit", **layout)
    losses, state, trainer = run(c, devices_or_skip(n), SHARDED_STEPS)
    np.testing.assert_allclose(losses, single["8bit"][0][:SHARDED_STEPS], rtol=1e-5)
    s8 = adam_state(state.opt_state)
    for path, (codes, scales) in expected.items():
        for tree, spec in ((s8.mu, codes), (s8.nu, codes), (s8.mu_scale, scales), (s8.nu_scale, scales)):
            assert leaf(tree, path).sharding.spec == spec, (path, leaf(tree, path).sharding.spec)
    # every parameter's 8-bit moments are laid out as float32 AdamW's moments are
    f32 = build_trainer(config("float32", **layout), mesh_from_config(c.mesh, devices_or_skip(n)))
    want = adam_state(f32.state_specs.opt_state).mu
    got = jax.tree.map(lambda x: x.sharding.spec, s8.mu)
    assert jax.tree.leaves(got) == jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, P))
    # the update runs on the shards in place: no moment moves, only block maxima (a few KiB)
    stats8, stats32 = (collective_stats(t.compile().as_text()) for t in (trainer, f32))
    for op in ("collective-permute", "all-to-all", "reduce-scatter"):
        assert stats8[op] == stats32[op], (op, stats8[op], stats32[op])
    extra = sum(stats8[op][1] - stats32[op][1] for op in stats8)
    assert 0 <= extra < 0.02 * sum(p.nbytes for p in jax.tree.leaves(state.params)), extra


def test_resume_is_exact_for_every_piece_of_state(tmp_path):
    devices_or_skip(8)

    def run_config(run_dir):
        c = config("8bit", fsdp=4, data=2, zero_stage=1)
        c.train.steps, c.checkpoint.every, c.run_dir = 6, 3, str(run_dir)
        return c

    straight = train(run_config(tmp_path / "straight"), progress=False)
    first = train(run_config(tmp_path / "resumed"), progress=False, stop_at=3)
    second = train(run_config(tmp_path / "resumed"), progress=False)  # restores step 3
    assert [r["step"] for r in second] == [4, 5, 6]
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    c = run_config(tmp_path)
    abstract = build_trainer(c, mesh_from_config(c.mesh)).abstract_state()
    a, b = (Checkpointer(str(tmp_path / d / "checkpoints"), read_only=True).restore(abstract, 6)[0]
            for d in ("straight", "resumed"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
    saved = Checkpointer(str(tmp_path / "resumed" / "checkpoints"), read_only=True).saved_names(3)
    kinds = {dtype for name, (_, dtype) in saved.items() if name.startswith("opt_state")}
    assert {"float8_e4m3fn", "float32"} <= kinds  # the codes and scales, saved as they are


def test_bad_moments_setting_is_one_line():
    c = config("int8")
    with pytest.raises(UserError) as e:
        build_trainer(c, mesh_from_config(c.mesh, devices_or_skip(1)))
    assert str(e.value) == "optim.moments='int8'; use one of float32, 8bit"
    with pytest.raises(ValueError, match=r"^block=0 must be at least 1$"):
        adam8bit.scale_by_adam_8bit(block=0)
