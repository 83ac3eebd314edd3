"""Every parallelism is a config change: same losses, sharded memory, the expected collectives."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config, train_steps
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxscale.cpu import SCOPE as ORDERING_SCOPE
from jaxscale.data import build_data, make_global_batch
from jaxscale.errors import UserError
from jaxscale.hlo import collective_stats, unordered_collectives
from jaxscale.mesh import mesh_from_config
from jaxscale.models.layers import chunked_xent_sums, embed_lookup
from jaxscale.models.llama import Block, LlamaConfig
from jaxscale.parallel.vocab_parallel import VocabShards
from jaxscale.train.trainer import build_trainer

STEPS = 5


def train_metrics(config, devices) -> tuple[list[float], list[float]]:
    """Losses and gradient norms of `STEPS` steps."""
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
    _, data = build_data(config)
    state, losses, grad_norms = trainer.init(), [], []
    for _ in range(STEPS):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
        losses.append(float(out["loss"]))
        grad_norms.append(float(out["grad_norm"]))
    return losses, grad_norms


def train_losses(config, devices) -> list[float]:
    return train_metrics(config, devices)[0]


@pytest.fixture(scope="module")
def reference_losses():
    return train_losses(tiny_config(), jax.devices()[:1])


# tensor=4 is the largest tensor-parallel size the tiny model allows (4 KV heads).
LAYOUTS = {
    "dp8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "tp4_dp2": dict(data=2, tensor=4),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
    "dp2_fsdp2_tp2_sp": dict(data=2, fsdp=2, tensor=2, sequence_parallel=True),
    "zero1": dict(data=8, zero_stage=1),
    "zero2": dict(data=8, zero_stage=2),
    "zero3": dict(data=8, zero_stage=3),
    "dp4_accum2": dict(data=4, fsdp=2, grad_accum_steps=2),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_loss_matches_single_device(name, reference_losses):
    devices = devices_or_skip(8)
    losses = train_losses(tiny_config(**LAYOUTS[name]), devices)
    assert reference_losses[-1] < reference_losses[0] - 0.5  # the model is really learning
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


def nbytes_per_device(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def nbytes_total(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def state_and_memory(**layout):
    config = tiny_config(**layout)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
    batch_bytes = sum(np.prod(b.shape) * b.dtype.itemsize // 8
                      for b in trainer.abstract_batch().values())
    args = trainer.compile().memory_analysis().argument_size_in_bytes - batch_bytes
    return trainer.init(), args


def test_fsdp_shards_params_and_optimizer_state():
    state, compiled_args = state_and_memory(fsdp=8)
    total = nbytes_total(state.params) + nbytes_total(state.opt_state)
    per_device = nbytes_per_device(state.params) + nbytes_per_device(state.opt_state)
    assert per_device <= 1.15 * total / 8
    assert compiled_args <= 1.15 * total / 8


def test_zero1_shards_only_the_optimizer_state():
    state, compiled_args = state_and_memory(data=8, zero_stage=1)
    params, opt = nbytes_total(state.params), nbytes_total(state.opt_state)
    assert nbytes_per_device(state.params) == params  # replicated
    assert nbytes_per_device(state.opt_state) <= 1.15 * opt / 8
    assert params + opt / 8 <= compiled_args <= 1.15 * (params + opt / 8)
    dp_state, dp_args = state_and_memory(data=8)
    assert nbytes_per_device(dp_state.opt_state) == opt  # plain DP replicates it
    assert compiled_args < 0.6 * dp_args


def compiled_collectives(devices, **layout):
    config = tiny_config(**layout)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
    return collective_stats(trainer.compile().as_text()), trainer


@pytest.mark.usefixtures("production_compiles")  # the loops of the command's programs
@pytest.mark.parametrize("layout", [dict(data=2, fsdp=4), dict(fsdp=4, tensor=2),
                                    dict(data=8, zero_stage=3), dict(pipeline=2, fsdp=4)])
def test_emulated_devices_run_their_collectives_in_one_order(layout):
    """On a CPU mesh no layer loop runs next to a collective it could be mistaken for (see
    `jaxscale.hlo.unordered_collectives`): before the gathers outside the loops were ordered,
    data=2 x fsdp=4 aborted or crashed in most runs."""
    devices = devices_or_skip(8)
    if devices[0].platform != "cpu":
        pytest.skip("accelerators keep collectives overlapping; the order is XLA:CPU's need")
    _, trainer = compiled_collectives(devices, **layout)
    assert unordered_collectives(trainer.compile().as_text()) == []


@pytest.mark.parametrize("layout", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2, zero_stage=3)])
def test_cpu_workarounds_stay_out_of_accelerator_programs(layout):
    """The step lowered for GPUs and TPUs holds none of the operations that order collectives for
    XLA:CPU (`jaxscale.cpu.order_collectives`); lowered for the CPU it does."""
    config = tiny_config(**layout)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
    found = {p: trainer.lower(p).as_text(debug_info=True).count(ORDERING_SCOPE)
             for p in ("cpu", "cuda", "tpu")}
    assert found["cpu"] > 0 and found["cuda"] == found["tpu"] == 0


def param_bytes(trainer) -> int:
    return sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(trainer.abstract_state().params))


def test_dp_all_reduces_gradients_once():
    stats, trainer = compiled_collectives(devices_or_skip(8), data=8)
    count, nbytes = stats["all-reduce"]
    assert count >= 1 and nbytes >= param_bytes(trainer)  # every gradient, plus the loss sums
    assert stats["all-gather"][0] == stats["reduce-scatter"][0] == 0


@pytest.mark.parametrize("layout", [dict(fsdp=8), dict(data=8, zero_stage=2),
                                    dict(data=8, zero_stage=3)])
def test_fsdp_and_zero23_gather_params_and_reduce_scatter_grads(layout):
    stats, trainer = compiled_collectives(devices_or_skip(8), **layout)
    n_params = len(jax.tree.leaves(trainer.abstract_state().params))
    # the shards travel as flat buffers, not one collective per parameter
    assert 1 <= stats["all-gather"][0] < n_params and 1 <= stats["reduce-scatter"][0] < n_params
    # every parameter is gathered whole; a gather in the layer loop counts once, for one layer
    layers = trainer.config.model.n_layers
    block_bytes = sum(p.size * p.dtype.itemsize for p in
                      jax.tree.leaves(trainer.abstract_state().params["blocks"]))
    assert stats["all-gather"][1] >= param_bytes(trainer) - block_bytes * (layers - 1) / layers
    # gradients never travel whole: what is all-reduced is scalars (loss, token count, norm)
    assert stats["all-reduce"][1] < param_bytes(trainer) / 100


def lowered_collective_types(trainer, op: str) -> set[str]:
    """The element types of `op`'s results in the step lowered for TPUs (before any backend
    pass: XLA:CPU sends bfloat16 collectives as float32)."""
    text = trainer.lower("tpu").as_text()
    return {re.search(r"-> tensor<[^>]*x(\w+)>", text[m.end():]).group(1)
            for m in re.finditer(f'"stablehlo.{op}"', text)}


@pytest.mark.parametrize("layout", [dict(fsdp=8), dict(data=8, zero_stage=2)])
def test_zero_and_fsdp_gather_in_the_compute_dtype_and_reduce_gradients_in_float32(layout):
    """Under bfloat16 compute the parameters travel in bfloat16 (PyTorch FSDP's mixed precision
    `param_dtype`), their gradients in float32 (`reduce_dtype`); `parallel.gather_dtype=float32`
    gathers them in float32. The models cast every matrix to bfloat16 before use, so the first
    step is the float32 gather's bit for bit; the norm scales, rounded to bfloat16 once they
    move from 1.0, make later steps differ slightly."""
    devices = devices_or_skip(8)
    runs = {}
    for gather in ("compute", "float32"):
        config = tiny_config(**layout)
        config.model.dtype = "bfloat16"
        config.parallel.gather_dtype = gather
        trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
        assert lowered_collective_types(trainer, "reduce_scatter") == {"f32"}
        runs[gather] = trainer, train_steps(trainer, config, 3)[1]
    assert lowered_collective_types(runs["compute"][0], "all_gather") == {"bf16"}
    assert lowered_collective_types(runs["float32"][0], "all_gather") == {"f32"}
    (_, compute), (_, full) = runs["compute"], runs["float32"]
    assert compute[0] == full[0] and compute[1:] != full[1:]
    np.testing.assert_allclose(compute, full, rtol=1e-3)


def test_flat_buffers_are_capped_at_bucket_bytes_and_train_the_same(monkeypatch):
    """FSDP's shards travel in flat buffers of at most `zero.BUCKET_BYTES` of whole float32
    gradient: capped below every shard, each parameter is gathered and reduce-scattered on its
    own, and the losses are the same."""
    from jaxscale.parallel import zero

    devices, runs, default = devices_or_skip(8), {}, zero.BUCKET_BYTES
    for cap in (default, 1):
        monkeypatch.setattr(zero, "BUCKET_BYTES", cap)
        config = tiny_config(fsdp=8)
        trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
        text = trainer.lower().as_text()
        runs[cap] = (text.count('"stablehlo.all_gather"'), text.count('"stablehlo.reduce_scatter"'),
                     train_steps(trainer, config, 2)[1])
    (gathers, scatters, losses), (alone_g, alone_s, alone) = runs[default], runs[1]
    assert 0 < gathers < alone_g and 0 < scatters < alone_s
    np.testing.assert_allclose(alone, losses, rtol=1e-6)


def test_a_bad_gather_dtype_is_refused():
    config = tiny_config(fsdp=8)
    config.parallel.gather_dtype = "fp8"
    with pytest.raises(UserError, match="parallel.gather_dtype='fp8'; use compute"):
        build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))


def test_zero1_all_reduces_grads_then_gathers_updated_params():
    stats, trainer = compiled_collectives(devices_or_skip(8), data=8, zero_stage=1)
    assert stats["all-reduce"][1] >= param_bytes(trainer)
    assert stats["all-gather"][1] >= param_bytes(trainer) * 7 / 8
    assert stats["reduce-scatter"][0] == 0


def test_tensor_parallel_all_reduces_each_block():
    stats, trainer = compiled_collectives(devices_or_skip(4), tensor=4)
    layers = trainer.config.model.n_layers
    # forward: attention and MLP outputs; backward: their input gradients.
    assert stats["all-reduce"][0] >= 4 * layers
    assert stats["all-gather"][0] == stats["reduce-scatter"][0] == 0


def test_sequence_parallel_gathers_the_sequence_before_each_block():
    devices = devices_or_skip(4)
    stats, trainer = compiled_collectives(devices, tensor=4, sequence_parallel=True)
    layers = trainer.config.model.n_layers
    assert stats["all-gather"][0] >= 2 * layers
    if devices[0].platform != "cpu":  # XLA:CPU lowers reduce-scatter as all-reduce + slice
        assert stats["reduce-scatter"][0] >= 2 * layers


def gathers_in_program(**layout) -> int:
    """all_gather ops in the program handed to XLA (before backend passes)."""
    config = tiny_config(**layout)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
    return str(trainer.trace().jaxpr).count("all_gather[")


def test_zero3_regathers_block_params_in_the_backward_and_zero2_does_not():
    n_block_params = len(jax.tree.leaves(nnx.state(Block(
        LlamaConfig.from_config(tiny_config().model), nnx.Rngs(0)))))
    assert n_block_params > 1
    zero2, zero3 = gathers_in_program(data=8, zero_stage=2), gathers_in_program(data=8, zero_stage=3)
    assert zero2 == 1  # every parameter, in one flat buffer, once per step
    # outside the blocks once; each layer's parameters (one flat buffer) in the forward, and
    # again in the backward
    assert zero3 == 3
    assert gathers_in_program(fsdp=8) == zero3


def test_remat_composes_with_fsdp_regathering():
    base = train_losses(tiny_config(fsdp=8), devices_or_skip(8))
    config = tiny_config(fsdp=8)
    config.model.remat = "full"
    np.testing.assert_allclose(train_losses(config, devices_or_skip(8)), base, rtol=1e-6)


def pipeline_config(schedule="gpipe", n_layers=4, microbatches=2, virtual_stages=1, **layout):
    config = tiny_config(**layout)
    config.model.n_layers = n_layers
    config.pipeline.update(schedule=schedule, microbatches=microbatches,
                           virtual_stages=virtual_stages)
    return config


@pytest.fixture(scope="module")
def pipeline_references():
    """Losses and grad norms without a pipeline, by depth (the interleaved P=4 case needs 8)."""
    cache = {}

    def get(n_layers):
        if n_layers not in cache:
            cache[n_layers] = train_metrics(pipeline_config(n_layers=n_layers), jax.devices()[:1])
        return cache[n_layers]

    return get


HYBRID = dict(pipeline=2, fsdp=2, tensor=2)
PIPELINES = {  # name: (pipeline_config arguments, devices)
    "gpipe_p2": (dict(pipeline=2), 2),
    "gpipe_p4": (dict(pipeline=4), 4),
    "gpipe_p2_dp4": (dict(pipeline=2, data=4), 8),
    "gpipe_p2_fsdp2_tp2": (HYBRID, 8),
    "gpipe_p2_dp2_tp2_zero3": (dict(pipeline=2, data=2, tensor=2, zero_stage=3), 8),
    "1f1b_p2": (dict(schedule="1f1b", pipeline=2, microbatches=4), 2),
    "1f1b_p4": (dict(schedule="1f1b", pipeline=4, microbatches=4), 4),
    "1f1b_p2_dp4": (dict(schedule="1f1b", pipeline=2, data=4), 8),
    "1f1b_p2_fsdp2_tp2": (dict(schedule="1f1b", **HYBRID), 8),
    "1f1b_p2_accum2": (dict(schedule="1f1b", pipeline=2, data=2, grad_accum_steps=2), 4),
    "interleaved_p2_v2": (dict(schedule="interleaved", virtual_stages=2, pipeline=2), 2),
    "interleaved_p4_v2": (dict(schedule="interleaved", virtual_stages=2, pipeline=4, n_layers=8,
                               microbatches=4), 4),
    "interleaved_p2_v2_fsdp2_tp2": (dict(schedule="interleaved", virtual_stages=2, **HYBRID), 8),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_schedules_match_the_unpipelined_model(name, pipeline_references):
    args, n_devices = PIPELINES[name]
    config = pipeline_config(**args)
    losses, grad_norms = train_metrics(config, devices_or_skip(n_devices))
    reference = pipeline_references(config.model.n_layers)
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    np.testing.assert_allclose(grad_norms, reference[1], rtol=1e-4)


def family_config(family: str, **args):
    """`pipeline_config` for another model family: GPT-2 (no grouped-query attention)."""
    config = pipeline_config(**args)
    config.model.family = family
    config.model.n_kv_heads = config.model.n_heads
    return config


@pytest.fixture(scope="module")
def family_references():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = train_metrics(family_config(family), jax.devices()[:1])
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["gpt2"])
@pytest.mark.parametrize("schedule", [dict(), dict(schedule="1f1b", microbatches=4),
                                      dict(schedule="interleaved", virtual_stages=2)],
                         ids=["gpipe", "1f1b", "interleaved"])
def test_every_decoder_family_pipelines(family, schedule, family_references):
    config = family_config(family, pipeline=2, **schedule)
    losses, grad_norms = train_metrics(config, devices_or_skip(2))
    reference = family_references(family)
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    np.testing.assert_allclose(grad_norms, reference[1], rtol=1e-4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_pipeline_sends_activations_between_stages_and_keeps_layers_local(schedule):
    virtual = 2 if schedule == "interleaved" else 1
    config = pipeline_config(schedule, n_layers=8, microbatches=4, virtual_stages=virtual,
                             pipeline=4)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(4)))
    stats = collective_stats(trainer.compile().as_text())
    assert stats["collective-permute"][0] >= 2  # activations forward, cotangents backward
    assert stats["all-gather"][0] == 0  # no stage ever sees another stage's layers
    block = trainer.abstract_state().params["blocks"]["mlp"]["w_up"]
    layers = (virtual, 8 // virtual) if virtual > 1 else (8,)
    assert block.shape[:virtual] == layers and block.sharding.spec[virtual - 1] == "pipeline"
    assert block.sharding.shard_shape(block.shape)[:virtual] == layers[:-1] + (layers[-1] // 4,)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_pipeline_loss_without_gradients_matches_the_training_step(schedule):
    config = pipeline_config(schedule, virtual_stages=2 if schedule == "interleaved" else 1,
                             pipeline=2)
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(2)))
    _, data = build_data(config)
    batch = make_global_batch(next(data), trainer.batch_sharding)
    state = trainer.init()
    loss = float(trainer.loss(state.params, batch))
    _, out = trainer.step(state, batch)
    assert loss == pytest.approx(float(out["loss"]), rel=1e-6)


@pytest.fixture(scope="module")
def bf16_pipeline_reference():
    config = pipeline_config()
    config.model.dtype = "bfloat16"
    return train_losses(config, jax.devices()[:1])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_pipelines_train_in_bfloat16(schedule, bf16_pipeline_reference):
    config = pipeline_config(schedule, virtual_stages=2 if schedule == "interleaved" else 1,
                             pipeline=2)
    config.model.dtype = "bfloat16"
    losses = train_losses(config, devices_or_skip(2))
    np.testing.assert_allclose(losses, bf16_pipeline_reference, rtol=1e-2)


@pytest.mark.usefixtures("production_compiles")  # the memory of the command's programs
def test_1f1b_keeps_less_activation_memory_than_gpipe():
    """Compiled temporaries per device at the same M: 1F1B keeps <= 2P - 1 microbatches' stage
    inputs, GPipe every layer's activations of all M (plus the head on every stage). Interleaved
    keeps what GPipe keeps, not its chunk's weights once per tick."""
    temp = {}
    for schedule in ("gpipe", "1f1b", "interleaved"):
        config = pipeline_config(schedule, microbatches=8, pipeline=2,
                                 virtual_stages=2 if schedule == "interleaved" else 1)
        trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(2)))
        temp[schedule] = trainer.compile().memory_analysis().temp_size_in_bytes
    assert temp["1f1b"] < 0.5 * temp["gpipe"], temp
    assert temp["interleaved"] < 1.1 * temp["gpipe"], temp


@pytest.mark.parametrize("changes, error, message", [
    (dict(n_layers=3), UserError, "model.n_layers=3 is not divisible by mesh.pipeline=2"),
    (dict(microbatches=3), UserError, r"\(16\) is not divisible by pipeline.microbatches=3"),
    (dict(schedule="zigzag"), UserError, "pipeline.schedule='zigzag'"),
    (dict(schedule="interleaved", virtual_stages=4), UserError,
     r"n_layers=4 is not divisible by mesh.pipeline=2 x pipeline.virtual_stages=4"),
    (dict(schedule="interleaved", virtual_stages=2, microbatches=1), UserError,
     "groups of mesh.pipeline=2; set pipeline.microbatches=1 to a multiple of it"),
    (dict(virtual_stages=2), UserError, "virtual_stages=2 needs pipeline.schedule=interleaved"),
])
def test_bad_pipeline_configs_fail_before_compiling(changes, error, message):
    config = pipeline_config(pipeline=2)
    if "n_layers" in changes:
        config.model.n_layers = changes.pop("n_layers")
    config.pipeline.update(changes)
    with pytest.raises(error, match=message):
        build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(2)))


@pytest.mark.parametrize("layout", [dict(fsdp=8), dict(data=8, zero_stage=2), dict(data=2, fsdp=4)])
def test_vocab_tables_stay_split_when_the_tokens_are_fewer(layout):
    """With a vocabulary larger than the step's tokens (1024 > 16 x 32), FSDP and ZeRO-2/3 keep
    the embedding and output layer split by vocabulary and move tokens instead: the same losses
    and gradient norms as one device, and the tables are never gathered."""
    def config(**layout):
        c = tiny_config(**layout)
        c.model.vocab_size = 1024
        return c

    devices = devices_or_skip(8)
    np.testing.assert_allclose(train_metrics(config(**layout), devices),
                               train_metrics(config(), devices[:1]), rtol=2e-5)
    trainer = build_trainer(config(**layout), mesh_from_config(config(**layout).mesh, devices))
    stats = collective_stats(trainer.compile().as_text())
    params = trainer.state_specs.params
    assert params["embed"][0] and params["lm_head"][1]  # stored split by vocabulary
    assert stats["all-to-all"][0] == 0  # so no exchange of their shards
    # gathering the tables (60% of the parameters) would take every parameter's bytes; what is
    # gathered instead is the blocks' parameters (the layer loop's once) and the tokens
    assert stats["all-gather"][1] < param_bytes(trainer)


def test_vocab_parallel_tables_match_the_whole_tables():
    """`embed_lookup` and `chunked_xent_sums` on vocabulary slices (the tokens gathered instead
    of the tables) give the losses and gradients of the whole tables."""
    mesh = jax.sharding.Mesh(np.array(devices_or_skip(4)), ("fsdp",))
    keys = jax.random.split(jax.random.key(0), 5)
    vocab, d, shape = 24, 8, (8, 3)  # 24 tokens: chunks of 5 leave a padded one
    emb = jax.random.normal(keys[0], (vocab, d))
    out = jax.random.normal(keys[1], (d, vocab))
    x = jax.random.normal(keys[2], (*shape, d))
    tokens, targets = (jax.random.randint(k, shape, 0, vocab) for k in keys[3:])
    mask = (jnp.arange(shape[1]) < 2) * jnp.ones(shape)

    def loss(emb, out, x, tokens, targets, mask, axes=()):
        vocab = VocabShards(axes) if axes else None
        h = x + embed_lookup(emb, tokens, vocab)
        s, n = chunked_xent_sums(h, out, targets, mask, 5, vocab)
        return (jax.lax.psum(s, axes), jax.lax.psum(n, axes)) if axes else (s, n)

    rows = P("fsdp")
    sliced = jax.shard_map(partial(loss, axes=("fsdp",)), mesh=mesh,
                           in_specs=(rows, P(None, "fsdp"), rows, rows, rows, rows),
                           out_specs=(P(), P()))
    args = (emb, out, x, tokens, targets, mask)
    want = loss(*args)
    np.testing.assert_allclose(sliced(*args), want, rtol=1e-5)
    assert float(want[1]) == 16  # only the masked-in tokens count
    grads = [jax.grad(lambda *a, f=f: f(*a)[0], argnums=(0, 1, 2))(*args) for f in (sliced, loss)]
    for got, expected in zip(*grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
