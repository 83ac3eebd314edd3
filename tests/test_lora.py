"""LoRA: only the adapters train and hold optimizer state; the base stays bitwise; a sharded run
matches one device; resume is exact with the base read again; a merged export gives the unmerged
model's logits; bad settings are one-line errors. QLoRA: the same on an int8 / int4 base, held at
its quantized bytes, training from the dequantized base's loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxscale.checkpoint import Checkpointer
from jaxscale.errors import UserError
from jaxscale.hf import checkpoint_config, export_hf, import_hf
from jaxscale.infer import Generator, QuantizedArray, quantize_params
from jaxscale.mesh import mesh_from_config
from jaxscale.models import abstract_model, build_model, loss_sums
from jaxscale.models.lora import LoraConfig, merge
from jaxscale.plan import plan
from jaxscale.train import lora
from jaxscale.train.loop import train
from jaxscale.train.trainer import build_trainer

RANK, STEPS = 4, 3
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 16))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A checkpoint of a random tiny Llama: the frozen base."""
    path = str(tmp_path_factory.mktemp("base"))
    config = tiny_config()
    with Checkpointer(path, async_save=False) as ckpt:
        ckpt.save(0, {"params": nnx.state(build_model(config.model, nnx.Rngs(3)))}, {},
                  config.to_json())
    return path


def lora_config(base: str, **mesh):
    c = tiny_config(**mesh)
    c.model.lora.update(rank=RANK, alpha=8.0, targets="wq,wk,wv,wo,w_up")
    c.checkpoint.init_params_from = base
    c.optim.update(lr=1e-2, weight_decay=0.1)
    return c


def start(config, n_devices: int):
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(n_devices)))
    state = lora.with_base(config, trainer, trainer.to_canonical(trainer.init()))
    return trainer, trainer.from_canonical(state)


def steps(trainer, config, state, n: int):
    from jaxscale.data import build_data, make_global_batch

    _, data = build_data(config)
    losses = []
    for _ in range(n):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
        losses.append(float(out["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def one_device(base):
    config = lora_config(base)
    trainer, state = start(config, 1)
    before = jax.tree.map(np.asarray, state.params)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    after, losses = steps(trainer, config, state, STEPS)
    return config, before, after, losses, opt_bytes


def test_only_adapters_train_and_hold_optimizer_state(one_device, base):
    config, before, after, losses, opt_bytes = one_device
    adapters0, base0 = lora.split(before)
    adapters1, base1 = lora.split(jax.tree.map(np.asarray, after.params))
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters0))
    # per layer: A [64, 4] for wq, wk, wv, w_up and [8, 8, 4] for wo; B [4, out]
    assert n_adapter == 2 * (4 * 64 * RANK + 64 * RANK + RANK * (64 + 2 * 32 + 64 + 128))
    for x, y in zip(jax.tree.leaves(base0), jax.tree.leaves(base1), strict=True):
        np.testing.assert_array_equal(x, y)  # the base is bitwise unchanged
    changed = [float(np.abs(x - y).max()) for x, y in
               zip(jax.tree.leaves(adapters0), jax.tree.leaves(adapters1), strict=True)]
    assert min(changed) > 1e-3, changed  # every A and B moved
    assert all(not np.any(b) for p, b in nnx.to_flat_state(adapters0) if p[-1].endswith("_b"))
    # AdamW's two float32 moments for the adapters alone, plus two int32 step counters
    assert opt_bytes == 2 * 4 * n_adapter + 8
    with Checkpointer(base, read_only=True) as ckpt:
        loaded = ckpt.restore_params(abstract_model(tiny_config().model)[1])
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(base1), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)  # and equal to the checkpoint it came from
    assert losses[-1] < losses[0]


def test_adapters_start_as_the_base_model(base):
    config = lora_config(base)
    adapted = build_model(config.model, nnx.Rngs(3))
    plain = build_model(tiny_config().model, nnx.Rngs(3))
    nnx.update(adapted, lora.split(nnx.state(adapted))[0])
    base_params = lora.split(nnx.state(adapted))[1]
    nnx.update(plain, base_params)
    np.testing.assert_array_equal(np.asarray(adapted(jnp.asarray(TOKENS))),
                                  np.asarray(plain(jnp.asarray(TOKENS))))


@pytest.mark.parametrize("mesh, wq_a", [
    (dict(fsdp=2, tensor=2, data=2), (None, "fsdp", None)),  # A [layers, embed, rank]
    (dict(pipeline=2, fsdp=2, data=2), ("pipeline", "fsdp", None)),  # stacked layers in stages
])
def test_sharded_lora_matches_one_device(one_device, base, mesh, wq_a):
    losses = one_device[3]
    config = lora_config(base, **mesh)
    trainer, state = start(config, 8)
    spec = trainer.state_specs.params["blocks"]["attn"]["wq_lora_a"]
    assert spec == jax.sharding.PartitionSpec(*wq_a)  # embed -> fsdp, the rank whole
    _, sharded = steps(trainer, config, state, STEPS)
    np.testing.assert_allclose(sharded, losses, rtol=2e-5)


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """An uninterrupted 4-step run, and one stopped after 2 steps and resumed."""
    out = {}
    for name in ("whole", "resumed"):
        config = lora_config(base, data=-1)  # the loop's mesh: all 8 devices, data parallel
        config.run_dir = str(tmp_path_factory.mktemp(name))
        config.train.steps = 4
        config.checkpoint.async_save = False
        history = train(config, progress=False, stop_at=2 if name == "resumed" else None)
        if name == "resumed":
            history += train(config, progress=False)
        out[name] = config, [row["loss"] for row in history]
    return out


def test_resume_is_exact_and_checkpoints_hold_the_adapters_alone(runs):
    (config, whole), (resumed_config, resumed) = runs["whole"], runs["resumed"]
    assert len(whole) == 4 and resumed == whole  # bit for bit
    ckpt = Checkpointer(f"{config.run_dir}/checkpoints", read_only=True)
    names = ckpt._metadata_names(4)
    params = [n for n in names if n.startswith("params.")]
    assert params and all("_lora_" in n for n in params), params
    assert not any(n.startswith("opt_state.") and "_lora_" not in n and n.endswith(".value")
                   for n in names)
    bad = lora_config("", data=-1)
    bad.run_dir = resumed_config.run_dir
    with pytest.raises(UserError, match="set checkpoint.init_params_from to the base"):
        train(bad, progress=False)


def test_merged_export_equals_the_unmerged_model_and_generate_runs(runs, tmp_path):
    config, _ = runs["whole"]
    checkpoint = f"{config.run_dir}/checkpoints"
    mesh = mesh_from_config(config.mesh, jax.devices()[:1])
    unmerged = Generator.from_config(checkpoint_config(checkpoint), checkpoint=checkpoint, mesh=mesh)
    logits = np.asarray(unmerged.logits(TOKENS))
    export_hf(checkpoint, str(tmp_path / "hf"))
    imported = import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    merged = Generator.from_config(checkpoint_config(imported), checkpoint=imported, mesh=mesh)
    np.testing.assert_allclose(np.asarray(merged.logits(TOKENS)), logits, atol=1e-5, rtol=0)
    base_only = Generator.from_config(checkpoint_config(config.checkpoint.init_params_from),
                                      checkpoint=config.checkpoint.init_params_from, mesh=mesh)
    assert np.abs(np.asarray(base_only.logits(TOKENS)) - logits).max() > 1e-3  # adapters matter
    out = unmerged.generate([[1, 2, 3]], max_new_tokens=4)
    assert len(out.row(0)) == 4
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("settings, message", [
    (dict(rank=-1), r"model.lora.rank=-1 must be 0 \(off\) or positive"),
    (dict(rank=4, alpha=0.0), "model.lora.alpha=0.0 must be positive"),
    (dict(rank=4, targets=""), "model.lora.rank=4 with no model.lora.targets"),
    (dict(rank=4, targets="wq,w_in"), "entry 'w_in' matches no projection; the model's are "
                                      "w_down, w_gate, w_up, wk, wo, wq, wv"),
    (dict(rank=0, base_quant="int8"), "model.lora.base_quant=int8 needs adapters"),
    (dict(rank=4, base_quant="int2"), "model.lora.base_quant='int2'; use one of none, int8, int4"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    config = tiny_config()
    config.model.lora.update(settings)
    with pytest.raises(UserError, match=message) as e:
        abstract_model(config.model)
    assert "\n" not in str(e.value)


def test_lora_without_a_base_is_an_error_before_compiling():
    config = tiny_config()
    config.model.lora.rank = 4
    with pytest.raises(UserError, match="trains adapters on a frozen base: set "
                                        "checkpoint.init_params_from"):
        build_trainer(config, mesh_from_config(config.mesh, jax.devices()[:1]))


def qlora_config(base: str, quant: str = "int8", **mesh):
    c = lora_config(base, **mesh)
    c.model.lora.update(base_quant=quant, group_size=32)
    return c


def batches(config, trainer, n: int) -> list:
    from jaxscale.data import build_data, make_global_batch

    _, data = build_data(config)
    return [make_global_batch(next(data), trainer.batch_sharding) for _ in range(n)]


def run(trainer, state, batches):
    losses = []
    for batch in batches:
        state, out = trainer.step(state, batch)
        losses.append(float(out["loss"]))
    return state, losses


def base_bytes(params) -> tuple[int, int]:
    """(bytes of the base's projection weights as the state holds them, codes and scales; their
    values as float32)."""
    flat = dict(nnx.to_flat_state(lora.split(params)[1]))
    scales = {(*p[:-1], f"{p[-1]}_scale"): p for p in flat if (*p[:-1], f"{p[-1]}_scale") in flat}
    held = sum(flat[p].nbytes + flat[s].nbytes for s, p in scales.items())
    return held, 4 * sum(flat[s].shape[-1] * flat[p].size // flat[p].shape[-1] for s, p in scales.items())


@pytest.fixture(scope="module")
def qlora(base, tmp_path_factory):
    """A QLoRA (int8 base) run on one device: 3 steps; the same stopped after 1 step, its
    checkpoint (the adapters) saved and read back with the base read and quantized again, and
    resumed for 2."""
    config = qlora_config(base)
    trainer, state = start(config, 1)
    data = batches(config, trainer, STEPS)
    before = jax.tree.map(np.asarray, state.params)
    after, losses = run(trainer, state, data)
    path = str(tmp_path_factory.mktemp("qlora"))
    state = lora.with_base(config, trainer, trainer.init())
    state, resumed = run(trainer, state, data[:1])
    with Checkpointer(path, async_save=False) as ckpt:
        ckpt.save(1, lora.checkpointed(state, trainer), {}, config.to_json())
        del state
        state, _, _ = ckpt.restore(lora.checkpointed(trainer.abstract_state(canonical=True), trainer))
    _, more = run(trainer, lora.with_base(config, trainer, state), data[1:])
    return config, trainer, data, before, jax.tree.map(np.asarray, after.params), losses, resumed + more, path


def test_qlora_trains_adapters_on_an_int8_base_a_quarter_of_float32(qlora, one_device):
    config, trainer, data, before, after, losses, resumed, _ = qlora
    adapters0, base0 = lora.split(before)
    adapters1, base1 = lora.split(after)
    for x, y in zip(jax.tree.leaves(base0), jax.tree.leaves(base1), strict=True):
        np.testing.assert_array_equal(x, y)  # codes and scales bitwise unchanged
    assert min(float(np.abs(x - y).max()) for x, y in
               zip(jax.tree.leaves(adapters0), jax.tree.leaves(adapters1), strict=True)) > 1e-3
    codes = before["blocks"]["attn"]["wq"]
    assert codes.dtype == np.int8 and codes.shape == (2, 64, 8, 8)
    assert before["blocks"]["mlp"]["w_down_scale"].shape == (2, 1, 64)  # one per output channel
    held, float32 = base_bytes(before)
    # 2 layers of q, k, v, o, gate, up, down: 73728 values, 1 byte each, and 1024 float32 scales
    assert (held, float32) == (73728 + 4 * 1024, 4 * 73728) and held / float32 < 0.27
    # the first loss is the quantized base's: that of the float model with the dequantized weights
    plain, cfg = abstract_model(tiny_config().model)[0], LoraConfig(**config.model.lora)
    loss_sum, count, _ = jax.jit(lambda p, b: loss_sums(plain, merge(p, cfg), b))(before, data[0])
    assert abs(losses[0] - float(loss_sum / count)) < 1e-5
    float_base = one_device[3][0]
    assert 1e-5 < abs(losses[0] - float_base) < 1e-2, (losses[0], float_base)
    assert losses[-1] < losses[0]


def test_qlora_resume_is_exact_with_the_base_quantized_again(qlora):
    losses, resumed = qlora[5], qlora[6]
    assert resumed == losses  # bit for bit
    names = Checkpointer(qlora[7], read_only=True)._metadata_names(1)
    params = [n for n in names if n.startswith("params.")]
    assert params and all("_lora_" in n for n in params), params  # no codes, no scales


def test_sharded_qlora_matches_one_device(qlora, base):
    before, losses = qlora[3], qlora[5]
    config = qlora_config(base, fsdp=2, tensor=2, data=2)
    trainer, state = start(config, 8)
    specs = trainer.state_specs.params["blocks"]["attn"]  # codes as the weight, scales' groups whole
    assert specs["wq"] == P(None, "fsdp", "tensor", None)
    assert specs["wq_scale"] == P(None, None, "tensor", None)
    for x, y in zip(jax.tree.leaves(lora.split(before)[1]),
                    jax.tree.leaves(lora.split(state.params)[1]), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))  # quantized in shards as on one device
    _, sharded = steps(trainer, config, state, STEPS)
    np.testing.assert_allclose(sharded, losses, rtol=2e-5)


def test_qlora_int4_base_an_eighth_of_float32_plus_scales(base, one_device):
    config = qlora_config(base, "int4")
    trainer, state = start(config, 1)
    held, float32 = base_bytes(state.params)
    # 73728 values at half a byte, one float32 scale per 32 inputs of a channel
    assert (held, float32) == (73728 // 2 + 4 * 73728 // 32, 4 * 73728), held
    _, losses = run(trainer, state, batches(config, trainer, 4))
    assert losses[-1] < losses[0] and abs(losses[0] - one_device[3][0]) < 5e-2


def test_lora_with_compressed_reduction_is_refused(base):
    config = lora_config(base)
    config.parallel.grad_compression = "int8"
    with pytest.raises(UserError, match="does not combine with parallel.grad_compression"):
        build_trainer(config, mesh_from_config(config.mesh, jax.devices()[:1]))


def test_qlora_generate_runs_on_the_quantized_base_and_export_merges_it(qlora, tmp_path):
    config, path = qlora[0], qlora[7]
    mesh = mesh_from_config(config.mesh, jax.devices()[:1])
    saved = checkpoint_config(path)
    unmerged = Generator.from_config(saved, checkpoint=path, mesh=mesh)
    assert unmerged.params["blocks"]["attn"]["wq"].dtype == jnp.int8  # the base stays quantized
    logits = np.asarray(unmerged.logits(TOKENS))
    assert len(unmerged.generate([[1, 2, 3]], max_new_tokens=4).row(0)) == 4
    export_hf(path, str(tmp_path / "hf"))  # W = dequantized codes + alpha/rank A B
    imported = import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    merged = Generator.from_config(checkpoint_config(imported), checkpoint=imported, mesh=mesh)
    np.testing.assert_allclose(np.asarray(merged.logits(TOKENS)), logits, atol=1e-5, rtol=0)
    # infer.weights=int8|int4 quantizes the embedding and head; the base stays as it is
    smaller = quantize_params(unmerged.params, "int4", 32)
    assert isinstance(smaller["embed"].get_value(), QuantizedArray)
    for x, y in zip(jax.tree.leaves(lora.split(unmerged.params)[1]["blocks"]),
                    jax.tree.leaves(lora.split(smaller)[1]["blocks"]), strict=True):
        assert x is y


def test_plan_sizes_the_quantized_base_as_stored_and_the_adapters_optimizer_state(base):
    floats, int8 = plan(lora_config(base), 1), plan(qlora_config(base), 1)
    assert int8["params"] == floats["params"]  # the codes count as the values they stand for
    assert floats["param_bytes_total"] - int8["param_bytes_total"] == 3 * 73728 - 4 * 1024
    n_adapter = 2 * (4 * 64 * RANK + 64 * RANK + RANK * (64 + 2 * 32 + 64 + 128))
    assert int8["opt_bytes_per_device"] == floats["opt_bytes_per_device"] == 2 * 4 * n_adapter + 8
    assert int8["grad_bytes_per_device"] == 4 * n_adapter
