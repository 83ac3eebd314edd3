"""`model.attention="splash"`: the Pallas TPU splash kernel, run here in Pallas's interpret mode
(`cpu.interpret_kernels`) against XLA's attention, its one-line refusals, and a training step
compiled for a TPU slice (libtpu, no TPU needed) without XLA's [heads, seq, seq] scores."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config
from jax.sharding import Mesh

from jaxscale.cpu import interpret_kernels
from jaxscale.data import build_data, make_global_batch
from jaxscale.errors import UserError
from jaxscale.mesh import mesh_from_config
from jaxscale.models.attention import causal_attention
from jaxscale.models.llama import LlamaConfig
from jaxscale.sharding import UNSHARDED, Layout, merge_rules, use_layout
from jaxscale.train.trainer import build_trainer

SEQ = 256  # two of the kernel's smallest blocks


def out_and_grads(kind: str, q, k, v, segments) -> list[jax.Array]:
    def loss(q, k, v):
        out = causal_attention(q, k, v, segments, kind)
        return jnp.sum(out * jnp.cos(out)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return [out, *grads]


@pytest.mark.parametrize("packed", [False, True])
def test_splash_equals_xla_attention_forward_and_backward(packed):
    """Grouped-query heads (4 over 2 K/V heads); packed: three documents in one row, and the
    rows split over `data` and the heads over `tensor` (4 devices for 2 K/V heads: each
    device's K/V head repeated for its query heads)."""
    key = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(key[0], (2, SEQ, 4, 32))
    k, v = (jax.random.normal(a, (2, SEQ, 2, 32)) for a in key[1:])
    segments = None
    if packed:
        segments = jnp.array([[0] * 100 + [1] * 28 + [2] * 128, [5] * SEQ])
    want = out_and_grads("dot_product", q, k, v, segments)
    with interpret_kernels():
        if packed:
            mesh = Mesh(np.array(devices_or_skip(8)).reshape(2, 4), ("data", "tensor"))
            rules = (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"))
            with use_layout(Layout(mesh, merge_rules(UNSHARDED, rules))):
                got = out_and_grads("splash", q, k, v, segments)
        else:
            got = out_and_grads("splash", q, k, v, segments)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)


def losses(config, steps: int = 3) -> list[float]:
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(4)))
    _, data = build_data(config)
    batch = make_global_batch(next(data), trainer.batch_sharding)
    state, out = trainer.init(), []
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
        out.append(float(metrics["loss"]))
    return out


def test_a_training_step_with_splash_equals_xla_attentions_under_data_and_tensor():
    """Inside the loss's region manual over `data`, with the heads split over `tensor`."""
    config = tiny_config(data=2, tensor=2)
    config.model.max_seq_len = config.data.seq_len = 128
    config.train.global_batch_size = 4
    want = losses(config)
    config.model.attention = "splash"
    with interpret_kernels():
        got = losses(config)
    assert want[-1] < want[0] - 0.5  # the model learns (the first step's learning rate is 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_splash_is_refused_off_tpus_and_for_sequences_off_its_blocks():
    q = jnp.ones((1, SEQ, 2, 8))
    with pytest.raises(UserError, match=r"^model.attention='splash' needs a TPU \(found cpu\); "
                                        r"use dot_product$"):
        causal_attention(q, q, q, None, "splash")
    with interpret_kernels(), pytest.raises(
            UserError, match=r"^model.attention='splash' needs the sequence length \(200\) to be a "
                             r"multiple of 128 \(its smallest block\); change data.seq_len or use "
                             r"dot_product$"):
        causal_attention(q[:, :200], q[:, :200], q[:, :200], None, "splash")
    model = tiny_config().model.to_dict()
    with pytest.raises(UserError, match=r"^model.attention='flash'; use dot_product, einsum, "
                                        r"cudnn, splash$"):
        LlamaConfig.from_config(dict(model, attention="flash"))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for TPUs needs libtpu: pip install -e '.[test]'")
def test_splash_compiles_for_a_tpu_slice_without_the_scores():
    """Seq 1024, one layer, data=2 x tensor=2 on v5p:2x2x1, one row and 16 of 32 heads per
    chip: XLA's attention holds float32 [16 heads, 1024, 1024] scores (64 MiB a copy) per chip;
    measured (libtpu 0.0.52): temporaries 140 MiB against splash's 25 (its q, k, v and their
    gradients padded from 8 to 128 lanes)."""
    from jaxscale.planner.compiled import compile_step, topology_devices

    temps = {}
    for kind in ("dot_product", "splash"):
        c = tiny_config(data=2, tensor=2)
        c.model.update(vocab_size=512, d_model=128, n_heads=32, n_kv_heads=4, head_dim=8, d_ff=256,
                       n_layers=1, max_seq_len=1024, attention=kind)
        c.data.seq_len, c.train.global_batch_size = 1024, 2
        temps[kind] = compile_step(c, topology_devices("v5p:2x2x1")).temp_bytes
    assert temps["splash"] * 4 < temps["dot_product"], temps
