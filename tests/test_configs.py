"""Shipped configs load and validate; presets have the published sizes; validation errors."""

from pathlib import Path

import ml_collections
import numpy as np
import optax
import pytest

from jaxscale.config import base_config, load_module, validate
from jaxscale.errors import UserError
from jaxscale.models import param_count
from jaxscale.models.llama import LlamaConfig
from jaxscale.plan import plan
from jaxscale.train.optim import make_optimizer, make_schedule

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/*.py")
                 if p.stem != "presets")  # what the config files share, not a config


def load(path: Path) -> ml_collections.ConfigDict:
    return load_module(path).get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_file_is_valid(path):
    if path.stem == "hf":  # needs an import-hf output directory (tests/test_hf.py runs it)
        with pytest.raises(UserError, match="configs/hf.py:CHECKPOINT_DIR"):
            load(path)
        return
    validate(load(path))


@pytest.mark.parametrize("name, params", [("llama3_1b", 1_235_814_400),
                                          ("llama3_8b", 8_030_261_248),
                                          ("llama3_70b", 70_553_706_496),
                                          # the released GPT-2 small's count: embeddings tied
                                          ("gpt2_small", 124_439_808),
                                          # Hugging Face's counts of Mixtral-8x7B, Qwen3-30B-A3B
                                          ("mixtral_8x7b", 46_702_792_704),
                                          ("qwen3_moe", 30_532_122_624)])
def test_presets_build_abstractly_with_published_sizes(name, params):
    config = load(next(p for p in CONFIGS if p.stem == name))
    p = plan(config, num_devices=256)
    assert p["params"] == params
    bias = 4 * config.model.n_layers * config.model.moe.n_experts  # routers' balancing state
    assert p["param_bytes_total"] == 4 * params + bias


@pytest.mark.parametrize("name, active", [("mixtral_8x7b", 12_879_925_248),  # "12.9B active"
                                          ("qwen3_moe", 3_353_032_704),  # "3.3B activated"
                                          ("llama3_8b", 8_030_261_248)])
def test_active_parameters_per_token(name, active):
    config = load(next(p for p in CONFIGS if p.stem == name))
    assert plan(config, num_devices=256)["active_params"] == active
    assert param_count(config.model, active=True) == active


def test_plan_divides_state_over_the_mesh():
    config = load(next(p for p in CONFIGS if p.stem == "llama3_8b"))
    p = plan(config, num_devices=8)  # fsdp=8: every tensor of Llama-3-8B divides by 8
    assert p["mesh"] == {"fsdp": 8}
    assert p["param_bytes_per_device"] == p["param_bytes_total"] // 8
    moments = 2 * p["param_bytes_total"] // 8  # Adam's mu and nu, sharded like the params
    assert moments <= p["opt_bytes_per_device"] <= moments + 16  # plus replicated step counters
    with pytest.raises(UserError, match="--num_devices=0 must be at least 1"):
        plan(config, num_devices=0)


def test_unknown_key_and_wrong_type_are_reported():
    config = base_config()
    config.model.d_modle = 3
    with pytest.raises(UserError, match="unknown config key 'model.d_modle' .did you mean model.d_model"):
        validate(config)
    raw = base_config().to_dict()
    raw["train"]["steps"] = "many"
    config = ml_collections.ConfigDict(raw)
    with pytest.raises(UserError, match="'train.steps' must be a number"):
        validate(config)


@pytest.mark.parametrize("key, bad, edge", [("train.steps", 0, 1), ("train.log_every", -1, 1),
                                            ("checkpoint.keep", -1, 0), ("optim.b2", 1.0, 0.0),
                                            ("optim.min_lr_ratio", 1.5, 1.0),
                                            ("optim.clip_norm", 0.0, 1e-3), ("optim.lr", float("nan"), 0.0),
                                            ("optim.lr", float("inf"), 1e3),
                                            ("model.rope_theta", float("-inf"), 1.0)])
def test_values_out_of_range_are_reported_and_edges_accepted(key, bad, edge):
    section, name = key.split(".")
    config = base_config()
    config[section][name] = edge
    validate(config)
    config[section][name] = bad
    with pytest.raises(UserError, match=rf"^{key}={bad} is out of range: it must be "):
        validate(config)


@pytest.mark.parametrize("field, value, match", [("n_layers", 0, "model.n_layers=0 must be positive"),
                                                  ("head_dim", -2, "model.head_dim=-2 must be positive"),
                                                  ("loss_chunk", -1, "model.loss_chunk=-1 must be 0")])
def test_model_dimensions_must_be_positive(field, value, match):
    model = base_config().model
    model[field] = value
    with pytest.raises(UserError, match=match):
        LlamaConfig.from_config(model)


def test_schedule_warms_up_then_decays_to_the_floor():
    optim = base_config().optim
    schedule = make_schedule(optim, total_steps=100)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(optim.warmup_steps)), optim.lr, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), optim.lr * optim.min_lr_ratio, rtol=1e-6)
    assert float(schedule(60)) < float(schedule(40))


def test_optimizer_clips_and_skips_decay_for_vectors():
    optim = base_config().optim
    optim.update(lr=1.0, warmup_steps=0, clip_norm=1.0, weight_decay=0.5, min_lr_ratio=1.0)
    tx, _ = make_optimizer(optim, total_steps=10)
    params = {"w": np.ones((2, 2), np.float32), "scale": np.ones((2,), np.float32)}
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * params["w"])  # decoupled weight decay
    np.testing.assert_allclose(updates["scale"], 0.0)  # no decay on norm scales
    huge = {k: 1e6 * np.ones_like(v) for k, v in params.items()}
    clipped = optax.clip_by_global_norm(optim.clip_norm).update(huge, None)[0]
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)
