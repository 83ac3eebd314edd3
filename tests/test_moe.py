"""Mixture of experts: routing, dispatch, router losses and expert parallelism on the mesh."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxscale.checkpoint import Checkpointer
from jaxscale.data import build_data, make_global_batch
from jaxscale.errors import UserError
from jaxscale.mesh import mesh_from_config
from jaxscale.models import abstract_model, build_model, flops_per_token, param_count
from jaxscale.models.moe import MoE, MoEConfig, RouterBias
from jaxscale.parallel.expert_parallel import ExpertShards
from jaxscale.train.loop import train
from jaxscale.train.trainer import build_trainer

STEPS = 5


def moe_config(**settings):
    """`tiny_config` with 8 experts (top 2) in every layer; `settings` as `tiny_config`'s, and
    `model.moe`, `pipeline` keys and `n_layers`."""
    moe = {k: settings.pop(k) for k in list(settings) if k in MoEConfig.__dataclass_fields__}
    pipe = {k: settings.pop(k) for k in ("schedule", "virtual_stages") if k in settings}
    n_layers = settings.pop("n_layers", 2)
    c = tiny_config(**settings)
    c.model.n_layers = n_layers
    c.model.moe.update({"n_experts": 8, "top_k": 2, "d_ff": 32, **moe})
    c.pipeline.update(pipe)
    return c


def run(config, devices, steps=STEPS, compiler_options=None):
    """Metrics of `steps` steps, the trainer and the last state."""
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
    trainer.compile(compiler_options)  # the steps run it; its HLO is read without a new trace
    _, data = build_data(config)
    state, rows = trainer.init(), []
    for _ in range(steps):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
        rows.append({k: float(v) for k, v in out.items()})
    return rows, trainer, state


@pytest.fixture(scope="module")
def references():
    """One-device runs of the models the layouts use, keyed by their model settings."""
    cache = {}

    def get(model: dict):
        key = tuple(sorted(model.items()))
        if key not in cache:
            rows, trainer, _ = run(moe_config(**model), jax.devices()[:1])
            cache[key] = rows, trainer
        return cache[key]

    return get


BALANCED = dict(router="sigmoid", bias_rate=0.01)  # aux-loss-free balancing: the bias moves
LAYOUTS = {  # (mesh and parallel settings, model settings)
    "ep8": (dict(expert=8), {}),  # expert x data: ep4_dp2_accum2_zero2 (and the capacity test)
    "ep2_fsdp2_tp2": (dict(expert=2, fsdp=2, tensor=2), {}),
    "ep4_dp2_accum2_zero2": (dict(expert=4, data=2, grad_accum_steps=2, zero_stage=2), BALANCED),
    "ep2_pp2_dp2_1f1b": (dict(expert=2, pipeline=2, data=2, schedule="1f1b"), BALANCED),
    "ep2_pp2_dp2_gpipe": (dict(expert=2, pipeline=2, data=2), {}),
    "ep2_pp2_dp2_interleaved": (dict(expert=2, pipeline=2, data=2, schedule="interleaved",
                                     virtual_stages=2), dict(n_layers=4, **BALANCED)),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_dropless_expert_parallel_matches_one_device(name, references):
    layout, model = LAYOUTS[name]
    ref, ref_trainer = references(model)
    rows, trainer, state = run(moe_config(**layout, **model), devices_or_skip(8))
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.5  # learning
    for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "expert_load_max_mean"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref], rtol=1e-5,
                                   err_msg=key)
    assert all(r["moe_dropped_fraction"] == 0 for r in rows)
    # each device holds and computes only its experts; tokens travel by all-to-all
    experts, stages = trainer.mesh.shape["expert"], trainer.mesh.shape["pipeline"]
    w = state.params["blocks"]["mlp"]["experts"]["w_gate"][...]
    shard = w.addressable_shards[0].data  # [(chunks,) layers, experts, embed, mlp]
    assert shard.shape[-3] == 8 // experts  # fsdp, tensor and ZeRO-2 split the rest further
    assert shard.nbytes * experts * stages * trainer.mesh.shape["fsdp"] * trainer.mesh.shape[
        "tensor"] * (2 if "zero_stage" in layout else 1) == w.nbytes
    assert "all-to-all" in trainer.compile().as_text()
    assert "all-to-all" not in ref_trainer.compile().as_text()


def test_accelerators_get_the_ragged_all_to_all_and_the_cpu_its_padded_form():
    """XLA:CPU has no ragged all-to-all (`jaxscale.cpu.ragged_all_to_all` pads it there); a step
    lowered for GPUs or TPUs exchanges only the rows that travel."""
    config = moe_config(expert=8)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
    ragged = {p: trainer.lower(p).as_text().count("ragged_all_to_all") for p in ("cpu", "cuda", "tpu")}
    # dispatch and return, forward and backward (each once, in the layer loop's bodies)
    assert ragged["cpu"] == 0 and ragged["cuda"] == ragged["tpu"] == 4


def test_a_capped_exchange_drops_what_overflows_in_source_order():
    """Two devices, one expert each, four rows each and room for four (`buffer_factor=1`).
    Device 0 sends one row to expert 0 and three to expert 1; device 1 sends four to expert 1,
    which takes device 0's three, then one of its own: three of device 1's rows are dropped."""
    mesh = jax.make_mesh((2,), ("expert",), axis_types=(AxisType.Auto,), devices=devices_or_skip(2))
    rows = jnp.arange(1.0, 9.0)[:, None]
    sizes = jnp.array([1, 3, 0, 4], jnp.int32)  # per device: rows for expert 0, for expert 1

    def exchange(rows, sizes):
        out, dropped = ExpertShards(buffer_factor=1.0).ragged(rows, sizes, lambda r, _: r * 10)
        return out, dropped[None]

    out, dropped = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=(P("expert"), P("expert")),
                                         out_specs=(P("expert"), P("expert"))))(rows, sizes)
    np.testing.assert_array_equal(out[:, 0], [10, 20, 30, 40, 50, 0, 0, 0])
    np.testing.assert_array_equal(dropped, [0, 3])


def test_capped_expert_parallel_drops_and_counts_or_matches_dropless():
    ref = run(moe_config(), jax.devices()[:1], steps=2)[0]
    roomy = run(moe_config(expert=8, expert_buffer=8.0), devices_or_skip(8), steps=2)[0]
    tight = run(moe_config(expert=8, expert_buffer=1.0), devices_or_skip(8), steps=2)[0]
    np.testing.assert_allclose([r["loss"] for r in roomy], [r["loss"] for r in ref], rtol=1e-5)
    assert roomy[0]["moe_dropped_fraction"] == 0 < tight[0]["moe_dropped_fraction"] < 0.5


def test_capacity_mode_matches_one_device_under_expert_parallelism():
    # capacity is per row, so which assignments are dropped does not depend on the layout
    ref = run(moe_config(dispatch="capacity", capacity_factor=1.0), jax.devices()[:1])[0]
    rows = run(moe_config(dispatch="capacity", capacity_factor=1.0, expert=4, data=2),
               devices_or_skip(8))[0]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-5)
    assert rows[0]["moe_dropped_fraction"] == ref[0]["moe_dropped_fraction"] > 0


def test_no_all_to_all_without_expert_parallelism():
    _, trainer, _ = run(moe_config(data=8), devices_or_skip(8), steps=0)
    assert "all-to-all" not in trainer.compile().as_text()


def layer(n_experts=2, top_k=1, **moe) -> MoE:
    """An MoE layer of width 4 whose router sends token features straight to the experts:
    router weights are the identity on the first `n_experts` features."""
    c = MoEConfig(n_experts=n_experts, top_k=top_k, d_ff=8, **moe)
    m = MoE(4, c, 1, nnx.Rngs(0))
    m.router[...] = jnp.eye(4, n_experts) * 10.0
    return m


def expert_out(m: MoE, e: int, x):
    w = {k: getattr(m.experts, k)[e] for k in ("w_gate", "w_up", "w_down")}
    return (jax.nn.silu(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_down"]


def test_capacity_drops_the_assignments_past_each_experts_slots():
    # 4 tokens, 2 experts, top 1, factor 0.5: ceil(0.5 x 4 x 1 / 2) = 1 slot per expert. Tokens
    # 0, 1, 2 choose expert 0 and token 3 expert 1: tokens 1 and 2 are dropped.
    m = layer(dispatch="capacity", capacity_factor=0.5, normalize_top_k=False)
    x = jnp.array([[[1, 0, 0, 0], [2, 0, 0, 0], [1, 0.5, 0, 0], [0, 1, 0, 0]]], jnp.float32)
    out, stats = m(x)
    weights = jax.nn.softmax(x[0] @ m.router[...], axis=-1).max(-1)
    want = np.zeros((4, 4), np.float32)
    want[0] = weights[0] * expert_out(m, 0, x[0, 0])
    want[3] = weights[3] * expert_out(m, 1, x[0, 3])
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)
    assert float(stats["dropped"]) == 2


def test_capacity_fills_first_choices_before_second_ones():
    # 2 tokens choosing both experts, 1 slot each: the first choices (token 0 -> expert 0,
    # token 1 -> expert 1) take the slots; both second choices are dropped. (Taking token 0's
    # two choices first would have dropped token 1's first choice instead.)
    m = layer(top_k=2, dispatch="capacity", capacity_factor=0.5)
    x = jnp.array([[[1, 0.5, 0, 0], [0.5, 1, 0, 0]]], jnp.float32)
    out, stats = m(x)
    w = jax.nn.softmax(x[0] @ m.router[...], axis=-1)
    want = np.stack([w[0, 0] * expert_out(m, 0, x[0, 0]), w[1, 1] * expert_out(m, 1, x[0, 1])])
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)
    assert float(stats["dropped"]) == 2


def test_dropless_layer_equals_the_weighted_sum_of_its_experts():
    m = MoE(16, MoEConfig(n_experts=4, top_k=2, d_ff=8, shared_d_ff=0), 1, nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    out, stats = m(x)
    probs = jax.nn.softmax(x @ m.router[...], axis=-1)
    top, ids = jax.lax.top_k(probs, 2)
    top = top / top.sum(-1, keepdims=True)
    want = sum(top[..., j, None] * jnp.stack([expert_out(m, int(e), t) for e, t in zip(
        ids[..., j].reshape(-1), x.reshape(-1, 16), strict=True)]).reshape(x.shape) for j in range(2))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    assert float(stats["dropped"]) == 0


def test_router_losses_equal_their_formulas():
    e, k = 4, 2
    for router in ("softmax", "sigmoid"):
        m = MoE(16, MoEConfig(n_experts=e, top_k=k, d_ff=8, router=router), 1, nnx.Rngs(2))
        x = jax.random.normal(jax.random.key(3), (3, 6, 16))
        _, stats = m(x)
        logits = np.asarray(x @ m.router[...], np.float64)
        if router == "softmax":
            p = np.exp(logits - logits.max(-1, keepdims=True))
        else:
            p = 1 / (1 + np.exp(-logits))
        p /= p.sum(-1, keepdims=True)
        ids = np.argsort(-logits, axis=-1)[..., :k]  # both routers rank by the logits
        counts = np.stack([(ids == i).sum(axis=(1, 2)) for i in range(e)], -1)  # [rows, e]
        seq = x.shape[1]
        aux_per_row = e / (k * seq) * (counts * p.mean(1)).sum(-1)
        np.testing.assert_allclose(float(stats["aux"]), seq * aux_per_row.sum(), rtol=1e-5)
        lse = np.log(np.exp(logits).sum(-1))
        np.testing.assert_allclose(float(stats["z"]), (lse**2).sum(), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(stats["load"]), counts.sum(0))


def test_loss_adds_the_weighted_router_losses():
    c = moe_config()
    batch = {k: jnp.asarray(v) for k, v in next(build_data(c)[1]).items()}
    sums = {}
    for aux, z in ((0.0, 0.0), (0.5, 0.25)):
        c.model.moe.update(aux_coef=aux, z_coef=z)
        sums[aux] = build_model(c.model, nnx.Rngs(0)).loss_sums(batch)
    (base, count, stats), (weighted, _, _) = sums[0.0], sums[0.5]
    np.testing.assert_allclose(float(weighted), float(base + 0.5 * stats["aux"] + 0.25 * stats["z"]),
                               rtol=1e-6)
    assert stats["load"].shape == (2, 8) and float(stats["load"].sum()) == 2 * 2 * float(count)


def test_bias_moves_once_per_step_toward_balance():
    c = moe_config(router="sigmoid", bias_rate=0.01, grad_accum_steps=2)
    trainer = build_trainer(c, mesh_from_config(c.mesh, jax.devices()[:1]))
    _, data = build_data(c)
    state = trainer.init()
    batch = make_global_batch(next(data), trainer.batch_sharding)
    load = trainer.loss_fn(state.params, batch)[2]["load"]  # [layers, experts]
    state, _ = trainer.step(state, batch)
    bias = state.params["blocks"]["mlp"]["bias"][...]
    want = 0.01 * np.sign(np.mean(load, -1, keepdims=True) - load)
    np.testing.assert_allclose(bias, want, atol=1e-7)
    assert np.any(want != 0)
    # the bias is state, not a trained parameter: no gradient, no weight decay, no optimizer step
    assert isinstance(abstract_model(c.model)[1]["blocks"]["mlp"]["bias"], RouterBias)


def test_balancing_lowers_the_expert_load_spread():
    spread = {}
    for rate in (0.0, 0.02):
        c = moe_config(router="sigmoid", bias_rate=rate, aux_coef=0.0, z_coef=0.0)
        rows = run(c, jax.devices()[:1], steps=30, compiler_options=None)[0]
        spread[rate] = np.mean([r["expert_load_max_mean"] for r in rows[-10:]])
    assert spread[0.02] < 0.9 * spread[0.0], spread


def test_parameter_counts():
    c = moe_config(shared_d_ff=16, first_dense=1).model
    c.n_layers = 3
    params = abstract_model(c)[1]
    trained = sum(x.size for x in jax.tree.leaves(nnx.state(params, nnx.Param)))
    assert param_count(c) == trained
    # one token uses the top 2 of 8 experts in each of the 2 MoE layers
    experts_unused = 2 * 6 * 3 * c.d_model * c.moe.d_ff
    assert param_count(c, active=True) == trained - experts_unused
    dense = param_count(c, active=True) - c.vocab_size * c.d_model
    flops = flops_per_token(c, 32) - 12 * c.n_layers * c.n_heads * c.head_dim * 32
    assert flops == 6 * (dense - 2 * c.n_layers * c.d_model - c.d_model)


@pytest.mark.parametrize("settings, message", [
    (dict(top_k=9), "top_k=9 must be between 1 and model.moe.n_experts=8"),
    (dict(dispatch="capacity", capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
    (dict(router="topk"), "model.moe.router='topk'"),
    (dict(dispatch="sparse"), "model.moe.dispatch='sparse'"),
    (dict(every=3), "every=3 must leave"),
    (dict(d_ff=0), "model.moe.d_ff=0 must be positive"),
])
def test_bad_moe_settings_say_what_is_wrong(settings, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        abstract_model(moe_config(**settings).model)


def test_experts_must_divide_the_expert_axis():
    c = moe_config(expert=8)
    c.model.moe.n_experts = 12
    with pytest.raises(UserError, match="model.moe.n_experts=12 is not divisible by mesh.expert=8"):
        build_trainer(c, mesh_from_config(c.mesh, devices_or_skip(8)))


def test_capacity_slots():
    assert MoEConfig(n_experts=8, top_k=2, capacity_factor=1.25).capacity(32) == math.ceil(10)


def test_kv_cache_decoding_of_an_moe_model(tmp_path):
    """Greedy decoding with the cache equals recomputing the forward pass, on one device and with
    the experts split over `expert` (weights read from a training checkpoint)."""
    from test_infer import PROMPTS, recompute_greedy

    from jaxscale.infer import Generator
    from jaxscale.mesh import make_mesh

    config = moe_config(expert=4, data=2)
    config.run_dir, config.train.steps = str(tmp_path), 3
    train(config, progress=False)
    one, split = (Generator.from_config(config, checkpoint=str(tmp_path / "checkpoints"),
                                        mesh=make_mesh(mesh, devices_or_skip(n)))
                  for mesh, n in (({"data": 1}, 1), ({"expert": 4, "data": 2}, 8)))
    tokens = one.generate(PROMPTS, 16).tokens
    np.testing.assert_array_equal(tokens, recompute_greedy(one, PROMPTS, 16))
    np.testing.assert_array_equal(split.generate(PROMPTS, 16).tokens, tokens)
    assert len({tuple(r) for r in tokens}) > 1  # rows differ


def test_checkpoint_resumes_exactly_and_restores_onto_other_expert_layouts(tmp_path):
    config = moe_config(expert=8, router="sigmoid", bias_rate=0.01)
    config.run_dir, config.train.steps, config.checkpoint.every = str(tmp_path / "a"), 4, 2
    straight = [r["loss"] for r in train(config, progress=False)]
    config.run_dir = str(tmp_path / "b")
    train(config, progress=False, stop_at=2)
    resumed = [r["loss"] for r in train(config, progress=False)]
    assert resumed == straight[2:]  # the balancing bias is in the checkpoint too
    other = moe_config(expert=2, data=4, router="sigmoid", bias_rate=0.01)
    trainer = build_trainer(other, mesh_from_config(other.mesh, devices_or_skip(8)))
    with Checkpointer(str(tmp_path / "b" / "checkpoints"), read_only=True) as ckpt:
        state, data_state, _ = ckpt.restore(trainer.abstract_state(), 2)
    assert np.any(np.asarray(state.params["blocks"]["mlp"]["bias"][...]) != 0)
    _, data = build_data(other)
    data.set_state(data_state)
    _, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    np.testing.assert_allclose(float(out["loss"]), straight[2], rtol=1e-5)


@pytest.mark.parametrize("family, layout", [  # early fusion's decoder is the plain one's
    ("cross_attention", dict(expert=2, pipeline=2, data=2)),
    ("clip", dict(expert=2, fsdp=2, tensor=2)),
])
def test_multimodal_decoders_take_moe_layers(family, layout):
    """Each fusion family's decoder (CLIP's text encoder) with MoE layers trains alike on one
    device and with its experts split (cross-attention also pipelined, under 1F1B)."""
    from test_multimodal import mm_config
    from test_multimodal import train as train_steps

    def config(**mesh):
        c = mm_config(family, **mesh)
        c.model.moe.update(n_experts=4, top_k=2, d_ff=64)
        c.pipeline.update(schedule="1f1b", microbatches=2)
        return c

    _, _, one = train_steps(config(), jax.devices()[:1], 3)
    trainer, _, split = train_steps(config(**layout), devices_or_skip(8), 3)
    np.testing.assert_allclose(split, one, rtol=1e-5)
    assert one[-1] < one[0]
    assert "all-to-all" in trainer.compile().as_text()
