"""The Llama decoder: causality, packing, GQA, RoPE, remat, tied embeddings, bf16 compute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config
from flax import nnx
from test_parallel import train_losses

from jaxscale.errors import UserError
from jaxscale.models import Llama, LlamaConfig, abstract_model, loss_sums, param_count
from jaxscale.models.attention import causal_attention, documents
from jaxscale.models.layers import rope

BASE = LlamaConfig.from_config(tiny_config().model)


def make(seed=0, **changes) -> Llama:
    return Llama(dataclasses.replace(BASE, **changes), nnx.Rngs(seed))


def tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, BASE.vocab_size)


def test_every_parameter_names_its_logical_axes():
    params = nnx.state(make(), nnx.Param)
    for path, p in jax.tree.leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Param)):
        axes = p.get_metadata()["logical_axes"]
        assert len(axes) == p[...].ndim, path


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_matches_the_formula(tie):
    model = make(tie_embeddings=tie)
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == param_count(dataclasses.replace(BASE, tie_embeddings=tie))
    assert hasattr(model, "lm_head") != tie


def test_causal_future_tokens_do_not_change_the_past():
    model, x = make(), tokens((2, 16))
    y = x.at[:, 10].set((x[:, 10] + 1) % BASE.vocab_size)
    a, b = model(x), model(y)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, 10:] - b[:, 10:]))) > 1e-3


def test_packed_documents_do_not_attend_across_boundaries():
    model, doc_a, doc_b = make(), tokens((1, 7), seed=2), tokens((1, 9), seed=3)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1] * 7 + [2] * 9])
    positions = jnp.array([list(range(7)) + list(range(9))])
    together = model(packed, positions, segments)
    np.testing.assert_allclose(together[:, 7:], model(doc_b), atol=2e-5)
    np.testing.assert_allclose(together[:, :7], model(doc_a), atol=2e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    gqa, mha, x = make(n_kv_heads=2), make(n_kv_heads=BASE.n_heads), tokens((2, 12))
    params = jax.tree.map(jnp.asarray, nnx.state(gqa, nnx.Param))  # a copy
    for name in ("wk", "wv"):  # [layers, embed, kv_heads, head_dim]: query head h reads kv h // 4
        kv = params["blocks"]["attn"][name]
        kv.set_value(jnp.repeat(kv[...], BASE.n_heads // 2, axis=2))
    nnx.update(mha, params)
    assert gqa.blocks.attn.wk[...].shape[2] == 2 and mha.blocks.attn.wk[...].shape[2] == 8
    np.testing.assert_allclose(gqa(x), mha(x), atol=2e-5)
    assert float(jnp.max(jnp.abs(gqa(x) - make(n_kv_heads=BASE.n_heads)(x)))) > 1e-3


def test_rope_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))
    def score(pq, pk):
        return jnp.sum(rope(q, jnp.array([[pq]]), 1e4) * rope(k, jnp.array([[pk]]), 1e4))
    np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
    assert abs(float(score(3, 1) - score(3, 2))) > 1e-4


@pytest.mark.parametrize("policy", ["full", "save_dots", "save:attn_out,mlp_out"])
def test_remat_policies_give_the_same_loss_and_grads(policy):
    batch = {"inputs": tokens((2, 16)), "targets": tokens((2, 16), seed=4),
             "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
             "segment_ids": jnp.ones((2, 16), jnp.int32), "loss_mask": jnp.ones((2, 16))}

    def loss_and_grads(remat):
        graphdef, params = nnx.split(make(remat=remat))
        fn = jax.jit(jax.value_and_grad(lambda p: loss_sums(graphdef, p, batch)[0]))
        return fn(params)

    (ref_loss, ref_grads), (loss, grads) = loss_and_grads("none"), loss_and_grads(policy)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    # accelerators fuse the recomputation differently: round-off relative to each tensor's scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                 grads, ref_grads)


def test_bad_remat_policy_is_a_config_error():
    with pytest.raises(ValueError, match="model.remat='sometimes' is not a policy"):
        make(remat="sometimes")
    with pytest.raises(UserError, match="model.max_documents=0 must be at least 1"):
        make(max_documents=0)


def test_bfloat16_compute_tracks_float32_and_is_layout_independent():
    """bf16 activations (params and optimizer stay fp32): within 3% of the fp32 losses over 5 steps,
    and within 1% between one device and a data x fsdp x tensor mesh (reduction orders differ)."""
    fp32 = train_losses(tiny_config(), jax.devices()[:1])
    bf16_config = tiny_config()
    bf16_config.model.dtype = "bfloat16"
    bf16 = train_losses(bf16_config, jax.devices()[:1])
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2)
    sharded = tiny_config(data=2, fsdp=2, tensor=2)
    sharded.model.dtype = "bfloat16"
    np.testing.assert_allclose(train_losses(sharded, devices_or_skip(8)), bf16, rtol=1e-2)


def gpt2_config(**layout):
    c = tiny_config(**layout)
    c.model.update(family="gpt2", n_kv_heads=c.model.n_heads)
    return c


@pytest.mark.parametrize("tie", [False, True])
def test_gpt2_parameter_count_matches_the_formula(tie):
    c = gpt2_config().model
    c.tie_embeddings = tie
    assert sum(s.size for s in jax.tree.leaves(abstract_model(c)[1])) == param_count(c)


def test_gpt2_trains_the_same_on_one_device_sharded_and_pipelined():
    devices = devices_or_skip(8)
    reference = train_losses(gpt2_config(), devices[:1])
    assert reference[-1] < reference[0] - 0.5
    for layout in (dict(data=2, fsdp=2, tensor=2), dict(pipeline=2, fsdp=4, zero_stage=3)):
        np.testing.assert_allclose(train_losses(gpt2_config(**layout), devices), reference,
                                   rtol=1e-5, err_msg=str(layout))


@pytest.mark.parametrize("chunk", [16, 24, 1000])  # dividing, padded, one chunk
def test_chunked_loss_matches_the_materialised_logits(chunk):
    model, x = make(), tokens((2, 32))
    targets = jnp.roll(x, -1, axis=1)
    mask = (jax.random.uniform(jax.random.key(3), x.shape) > 0.2).astype(jnp.float32)
    batch = {"inputs": x, "targets": targets, "loss_mask": mask, "segment_ids": None,
             "positions": jnp.broadcast_to(jnp.arange(32), x.shape)}
    graphdef, params = nnx.split(model)

    def loss(params, chunk):
        m = nnx.merge(graphdef, params)
        m.config = dataclasses.replace(m.config, loss_chunk=chunk)
        total, count, _ = m.loss_sums(batch)
        return total / count

    want, want_grads = jax.value_and_grad(loss)(params, 0)
    got, got_grads = jax.value_and_grad(loss)(params, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_logits_are_rounded_once_and_the_loss_stays_close():
    """`logits_dtype="bfloat16"`: the output layer's logits are bf16 values (materialised or in
    chunks alike), the loss within 0.1% of float32 logits' and its gradients within 1% of their
    scale (measured: 1e-5 and 0.44%)."""
    x = tokens((2, 32))
    batch = {"inputs": x, "targets": jnp.roll(x, -1, axis=1), "loss_mask": jnp.ones(x.shape),
             "segment_ids": None, "positions": jnp.broadcast_to(jnp.arange(32), x.shape)}
    graphdef, params = nnx.split(make())

    def run(logits_dtype, chunk=0):
        def loss(params):
            m = nnx.merge(graphdef, params)
            m.config = dataclasses.replace(m.config, logits_dtype=logits_dtype, loss_chunk=chunk)
            total, count, _ = m.loss_sums(batch)
            return total / count, m.head(m.hidden(x)[0])
        return jax.value_and_grad(loss, has_aux=True)(params)

    (want, fp32_logits), want_grads = run("float32")
    (got, logits), grads = run("bfloat16")
    (chunked, _), chunked_grads = run("bfloat16", chunk=24)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, logits.astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(fp32_logits, fp32_logits.astype(jnp.bfloat16).astype(jnp.float32))
    assert got != want
    np.testing.assert_allclose(got, want, rtol=1e-3)
    np.testing.assert_allclose(chunked, got, rtol=1e-5)
    for a, b, c in zip(jax.tree.leaves(grads), jax.tree.leaves(chunked_grads),
                       jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, c, atol=1e-2 * np.abs(c).max())
        np.testing.assert_allclose(b, c, atol=1e-2 * np.abs(c).max())
    with pytest.raises(UserError, match="model.logits_dtype='float16'; use float32 or bfloat16"):
        make(logits_dtype="float16")


def attention_out_and_grads(kind, segments, q, k, v) -> list[jax.Array]:
    """Float32 output and q, k, v gradients of `causal_attention` under a nonlinear loss."""
    def loss(q, k, v):
        out = causal_attention(q, k, v, segments, kind).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(out)), out
    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return [t.astype(jnp.float32) for t in (out, *grads)]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_einsum_attention_equals_dot_product_attention(kv_heads):
    k = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k[0], (2, 16, 4, 8))
    kv = [jax.random.normal(key, (2, 16, kv_heads, 8)) for key in k[1:3]]
    segments = jnp.array([[0] * 10 + [1] * 6, [0] * 16])
    for m in (None, segments):  # outputs and the hand-written backward's gradients
        got, want = (attention_out_and_grads(kind, m, q, *kv) for kind in ("einsum", "dot_product"))
        assert len(got) == 4
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_documents_of_a_packed_row_in_cudnns_layout():
    """Lengths and start offsets of each row's documents (-1 past the last), from the segment
    ids; with fewer slots than documents the last slot takes the rest."""
    segments = jnp.array([[1] * 3 + [2] * 4 + [3], [1] * 8, [1] * 5 + [0] * 3])
    lengths, offsets = documents(segments, 4)
    np.testing.assert_array_equal(lengths, [[3, 4, 1, -1], [8, -1, -1, -1], [5, 3, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 7, -1, -1], [0, -1, -1, -1, -1],
                                            [0, 5, -1, -1, -1]])
    lengths, offsets = documents(segments, 2)
    np.testing.assert_array_equal(lengths, [[3, 5], [8, -1], [5, 3]])
    np.testing.assert_array_equal(offsets, [[0, 3, -1], [0, -1, -1], [0, 5, -1]])


def test_cudnn_attention_matches_xla_on_a_gpu_and_is_refused_elsewhere():
    """Output and gradients of cuDNN's fused attention (GQA, packed rows) in bfloat16 against XLA's
    in float32; without an NVIDIA GPU the config is refused with the way out."""
    k = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k[0], (2, 128, 8, 64), jnp.bfloat16)
    kv = [jax.random.normal(key, (2, 128, 2, 64), jnp.bfloat16) for key in k[1:3]]
    segments = jnp.array([[0] * 50 + [1] * 30 + [2] * 48, [0] * 128])  # packed layout on Hopper
    if jax.default_backend() != "gpu":
        with pytest.raises(UserError, match="needs an NVIDIA GPU.*use dot_product"):
            causal_attention(q, *kv, segments, "cudnn")
        return

    def rel_err(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    for m in (None, segments):
        want = attention_out_and_grads("dot_product", m, *(t.astype(jnp.float32) for t in (q, *kv)))
        got = attention_out_and_grads("cudnn", m, q, *kv)
        bf16 = attention_out_and_grads("dot_product", m, q, *kv)  # XLA's own bfloat16 round-off
        for g, b, w in zip(got, bf16, want, strict=True):
            assert rel_err(g, w) < max(2 * rel_err(b, w), 1e-2), (rel_err(g, w), rel_err(b, w))


def test_throughput_options_train_like_the_defaults_on_a_hybrid_mesh():
    """Chunked loss, unrolled layers and einsum attention (the reference config's options)."""
    devices = devices_or_skip(8)
    reference = train_losses(tiny_config(), devices[:1])
    layout = dict(data=2, fsdp=2, tensor=2)
    for config in (tiny_config(), tiny_config(**layout)):
        config.model.loss_chunk = 48  # 128 tokens per device on the mesh: padded to 144
        config.model.scan_layers = False
        config.model.attention = "einsum"
        n = 8 if config.mesh.fsdp > 1 else 1
        np.testing.assert_allclose(train_losses(config, devices[:n]), reference, rtol=1e-5)
