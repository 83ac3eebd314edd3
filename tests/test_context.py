"""Context parallelism: each row's sequence split over `context`, for every attention kind."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config

from jaxscale.data import build_data, make_global_batch
from jaxscale.errors import UserError
from jaxscale.hlo import collective_stats
from jaxscale.mesh import mesh_from_config
from jaxscale.parallel import context_parallel, ring_attention
from jaxscale.sharding import use_layout
from jaxscale.train.trainer import build_trainer

STEPS = 5
KINDS = context_parallel.KINDS


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> str:
    """A .jsonl corpus of short documents of uneven lengths (3 to 40 characters), so packed rows
    hold several, cut anywhere by the context chunks."""
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards box".split()
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(600):
            text = " ".join(rng.choice(words, 12))[: rng.integers(3, 41)]
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


def cp_config(source: str, kind: str = "ring", **settings):
    """`tiny_config` (64 tokens a row) on `source`, attending across `context` as `kind`."""
    schedule = settings.pop("schedule", None)
    c = tiny_config(**settings)
    c.data.source, c.data.seq_len = source, 64
    c.parallel.context_attention = kind
    if schedule:
        c.pipeline.schedule = schedule
    return c


def run(config, devices, steps=STEPS):
    """The gradients of the first batch's mean loss at the initial parameters (checkpoint form),
    the losses of `steps` steps, and the trainer."""
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices))
    _, data = build_data(config)
    state = trainer.init()
    batches = [make_global_batch(next(data), trainer.batch_sharding) for _ in range(steps)]

    def mean_loss(params):
        loss_sum, count, _ = trainer.loss_fn(params, batches[0])
        return loss_sum / count

    with use_layout(trainer.layout):
        grads = trainer.to_canonical(jax.jit(jax.grad(mean_loss))(state.params))
    losses = []
    for batch in batches:
        state, out = trainer.step(state, batch)
        losses.append(float(out["loss"]))
    return grads, losses, trainer


@pytest.fixture(scope="module")
def reference(documents):
    return run(cp_config(documents), jax.devices()[:1])


LAYOUTS = {
    "cp8": dict(context=8),
    "cp4_dp2": dict(context=4, data=2),
    "cp2_fsdp2_tp2": dict(context=2, fsdp=2, tensor=2),
    "cp2_tp2_sp_dp2": dict(context=2, tensor=2, data=2, sequence_parallel=True),
    "cp2_pp2_dp2_gpipe": dict(context=2, pipeline=2, data=2),
    "cp2_pp2_dp2_1f1b": dict(context=2, pipeline=2, data=2, schedule="1f1b"),
}
# the ring on every layout; the gathering kinds on those that exercise their own paths (data and
# fsdp x tensor beside context, 1F1B's skipping schedule), as the suite's time allows
CASES = [("ring", layout) for layout in LAYOUTS] + [
    (kind, layout) for kind in KINDS if kind != "ring"
    for layout in ("cp4_dp2", "cp2_fsdp2_tp2", "cp2_pp2_dp2_1f1b")]


@pytest.mark.parametrize("kind, layout", CASES)
def test_context_parallel_matches_one_device(kind, layout, documents, reference):
    """Packed documents of uneven lengths: losses over 5 steps to 1e-5 and the gradients to 1e-4
    (relative) of one device's."""
    want_grads, want_losses, _ = reference
    grads, losses, _ = run(cp_config(documents, kind, **LAYOUTS[layout]), devices_or_skip(8))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True)
    for got, want in pairs:
        err = np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(want)
        assert err < 1e-4, err


def test_rows_hold_several_documents(documents):
    """The parity above covers packed rows: most rows hold several documents, and chunk edges
    fall inside documents."""
    _, data = build_data(cp_config(documents))
    segments = next(data)["segment_ids"]
    assert np.mean(segments[:, -1] > 2) > 0.9
    edges = segments[:, 3:-1:4] == segments[:, 4::4]  # context=8: chunks of 4 tokens
    assert edges.mean() > 0.5


def test_zig_zag_layout_balances_causal_work():
    """Each device's queries need (under the causal mask) the same number of key positions within
    5% in the zig-zag layout; the plain contiguous split would not (the last device's more than
    C times the first's). The ring computes exactly these pairs' blocks: its own block, then half of every
    other device's."""
    for length, parts in ((64, 8), (8192, 8), (4096, 4)):
        place = context_parallel.order(length, parts).reshape(parts, -1)
        work = (place + 1).sum(axis=1)  # keys at or before each query
        assert work.max() / work.min() < 1.05
        assert sorted(place.ravel().tolist()) == list(range(length))
        contiguous = (np.arange(length).reshape(parts, -1) + 1).sum(axis=1)
        assert contiguous.max() / contiguous.min() > parts


def _compiled(config, devices):
    return build_trainer(config, mesh_from_config(config.mesh, devices)).compile()


@pytest.mark.usefixtures("production_compiles")  # the memory of the command's programs
def test_ring_temporary_memory_per_device_falls_with_the_context_axis():
    """Compiled temporary memory per device at sequence 8,192 (batch 1): the ring's is at most
    1.3 x (one device's / C)."""
    def config(**mesh):
        c = tiny_config(**mesh)
        c.data.seq_len = c.model.max_seq_len = 8192
        c.train.global_batch_size = 1
        return c

    one = _compiled(config(), jax.devices()[:1]).memory_analysis().temp_size_in_bytes
    ring = _compiled(config(context=8), devices_or_skip(8)).memory_analysis().temp_size_in_bytes
    assert ring <= 1.3 * one / 8, (ring, one)


@pytest.mark.parametrize("kind, parts", [(kind, 8) for kind in KINDS] + [("ring", 2)])
def test_compiled_step_holds_each_kinds_collectives(kind, parts, documents):
    """The step's attention collectives and their bytes are those the module's analysis predicts
    (`context_parallel.collective_bytes`), and the other kinds' are absent."""
    c = cp_config(documents, kind, context=parts)
    c.model.scan_layers = False  # every layer's collectives in the program
    stats = collective_stats(_compiled(c, devices_or_skip(8)[:parts]).as_text())
    want = context_parallel.collective_bytes(kind, c.model, c.data.seq_len,
                                             c.train.global_batch_size, parts)
    for op in ("collective-permute", "all-gather", "reduce-scatter", "all-to-all"):
        assert stats[op] == want.get(op, (0, 0)), op


@pytest.mark.parametrize("settings, error, match", [
    (dict(seq_len=40), UserError, "sequence length 40 is not divisible by 2 x mesh.context=8"),
    (dict(kind="all_to_all", n_heads=4, n_kv_heads=2), UserError,
     r"context_attention='all_to_all' needs the heads \(4\) divisible by mesh.context=8"),
    (dict(kind="zigzag"), UserError, "parallel.context_attention='zigzag'; use ring"),
    (dict(n_experts=4, dispatch="capacity"), NotImplementedError, "dispatch='capacity' under"),
])
def test_bad_settings_are_refused_in_one_line(settings, error, match, documents):
    c = cp_config(documents, settings.pop("kind", "ring"), context=8)
    if "seq_len" in settings:
        c.data.seq_len = settings.pop("seq_len")
    if "n_experts" in settings:
        c.model.moe.update(n_experts=settings.pop("n_experts"), top_k=2, d_ff=32,
                           dispatch=settings.pop("dispatch"))
    c.model.update(settings)
    with pytest.raises(error, match=match):
        _compiled(c, devices_or_skip(8))


def test_moe_layers_under_context_and_expert_parallelism(documents):
    """An MoE model (its balancing loss needs each row's mean router probability, summed across
    the row's devices) trains alike on one device and on context=2 x expert=4."""
    def config(**mesh):
        c = cp_config(documents, **mesh)
        c.model.moe.update(n_experts=8, top_k=2, d_ff=32, aux_coef=0.1)
        return c

    _, one, _ = run(config(), jax.devices()[:1])
    _, split, trainer = run(config(context=2, expert=4), devices_or_skip(8))
    np.testing.assert_allclose(split, one, rtol=1e-5)
    text = trainer.compile().as_text()
    assert "all-to-all" in text and "collective-permute" in text


def test_row_mean_and_split_follow_the_zig_zag_layout():
    """`SequenceShards.split` gives device c chunks c and 2C-1-c, and `row_mean` the whole row's
    mean, on every device."""
    mesh = jax.make_mesh((8,), ("context",), devices=devices_or_skip(8),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    x = jnp.arange(2 * 32, dtype=jnp.float32).reshape(2, 32)
    shards = context_parallel.SequenceShards("ring", 8)

    def local(x):
        part = shards.split(x)
        return part[None], shards.row_mean(part)[None]

    parts, means = jax.shard_map(local, mesh=mesh, in_specs=jax.P(),
                                 out_specs=(jax.P("context"), jax.P("context")))(x)
    place = context_parallel.order(32, 8).reshape(8, 4)
    np.testing.assert_array_equal(parts, np.asarray(x)[:, place].transpose(1, 0, 2))
    np.testing.assert_allclose(means, np.broadcast_to(x.mean(axis=1), (8, 2)))


def test_generate_prefills_a_long_prompt_split_over_context(tmp_path):
    """`generate` on context=8 (and context=4 x data=2) prefills with the rows split (ring
    attention, the K/V gathered into the cache) and decodes the tokens one device does."""
    from test_infer import PROMPTS

    from jaxscale.infer import Generator
    from jaxscale.mesh import make_mesh
    from jaxscale.train.loop import train

    config = tiny_config(data=8)
    config.run_dir, config.train.steps = str(tmp_path), 3
    train(config, progress=False)
    prompts = PROMPTS  # padded to 32 tokens: 2 chunks of 2 per device on context=8
    want = None
    for mesh, n in (({"data": 1}, 1), ({"context": 8}, 8), ({"context": 4, "data": 2}, 8)):
        generator = Generator.from_config(config, checkpoint=str(tmp_path / "checkpoints"),
                                          mesh=make_mesh(mesh, devices_or_skip(n)))
        tokens = generator.generate(prompts, 16).tokens
        if want is None:
            want = tokens
        np.testing.assert_array_equal(tokens, want)


def test_checkpoints_do_not_depend_on_the_context_axis(tmp_path, documents):
    """A run saved on context=8 resumes exactly (same losses as straight through), and its
    checkpoint restores onto context=2 x data=4 with the next loss the straight run had."""
    from jaxscale.checkpoint import Checkpointer
    from jaxscale.train.loop import train

    config = cp_config(documents, context=8)
    config.run_dir, config.train.steps, config.checkpoint.every = str(tmp_path / "a"), 4, 2
    straight = [r["loss"] for r in train(config, progress=False)]
    config.run_dir = str(tmp_path / "b")
    train(config, progress=False, stop_at=2)
    assert [r["loss"] for r in train(config, progress=False)] == straight[2:]
    other = cp_config(documents, "all_gather", context=2, data=4)
    trainer = build_trainer(other, mesh_from_config(other.mesh, devices_or_skip(8)))
    with Checkpointer(str(tmp_path / "b" / "checkpoints"), read_only=True) as ckpt:
        state, data_state, _ = ckpt.restore(trainer.abstract_state(), 2)
    _, data = build_data(other)
    data.set_state(data_state)
    _, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    np.testing.assert_allclose(float(out["loss"]), straight[2], rtol=1e-5)


def test_early_fusion_clip_split_over_context():
    """An early-fusion model on a clip of several frames (image tokens then text in one
    sequence, cut into zig-zag chunks after they are joined) trains alike on one device and on
    context=4 x data=2."""
    from test_multimodal import mm_config
    from test_multimodal import train as train_steps

    _, _, one = train_steps(mm_config("early_fusion", frames=3), jax.devices()[:1], 3)
    config = mm_config("early_fusion", frames=3, context=4, data=2)
    _, _, split = train_steps(config, devices_or_skip(8), 3)
    np.testing.assert_allclose(split, one, rtol=1e-5)


@pytest.mark.parametrize("kind, op", [("ring", "collective_permute"), ("all_to_all", "all_to_all")])
def test_step_lowers_for_gpus_and_tpus(kind, op, documents):
    """The same step lowered for cuda and tpu holds the kind's exchange (no CPU workaround)."""
    c = cp_config(documents, kind, context=8)
    trainer = build_trainer(c, mesh_from_config(c.mesh, devices_or_skip(8)))
    for platform in ("cuda", "tpu"):
        assert f"stablehlo.{op}" in trainer.lower(platform).as_text()


def test_query_tiles_divide_any_block():
    """Blocks of any multiple of 128 queries are taken in tiles of 128 to 512 queries; a block with
    no such divisor is taken whole."""
    assert ring_attention.QUERY_TILE == 512
    for tq, tiles in ((512, 1), (4096, 8), (2816, 8), (1536, 3), (640, 2), (2053, 1)):
        assert ring_attention.query_tiles(tq) == tiles, tq


def test_ring_takes_queries_in_tiles(documents, reference, monkeypatch):
    """The ring's blocks computed a few queries at a time (`QUERY_TILE`, 512 by default; 2 here,
    so every block is tiled) give one device's losses and gradients."""
    monkeypatch.setattr(ring_attention, "QUERY_TILE", 2)
    want_grads, want_losses, _ = reference
    grads, losses, _ = run(cp_config(documents, context=4, data=2), devices_or_skip(8))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(want) < 1e-4
