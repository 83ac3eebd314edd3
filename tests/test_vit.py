"""The vision encoder and the Perceiver resampler: shapes, attention across patches and frames,
sharded parity, logical axes, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import devices_or_skip
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxscale.errors import UserError
from jaxscale.mesh import make_mesh
from jaxscale.models.vit import PerceiverResampler, ViT, ViTConfig, patchify, vit_flops_per_example
from jaxscale.parallel import DEFAULT_RULES
from jaxscale.sharding import Layout, use_layout

# 16x16 images in 4x4 patches: a 4x4 grid, 16 patches per frame before pooling.
BASE = ViTConfig(image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=4, head_dim=8, d_ff=64,
                 max_frames=3)


def make(seed=0, **changes) -> ViT:
    return ViT(dataclasses.replace(BASE, **changes), nnx.Rngs(seed))


def images(batch, frames, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, frames, 16, 16, 3))


@nnx.jit
def run(model: nnx.Module, x: jax.Array) -> jax.Array:
    """`model(x)`, compiled once per model structure and input shape (faster than op by op)."""
    return model(x)


def resampler(n_latents=5) -> PerceiverResampler:
    return PerceiverResampler(d_model=32, n_latents=n_latents, n_layers=2, n_heads=4, head_dim=8,
                              d_ff=64, rngs=nnx.Rngs(0))


def differs(a, b, tol=1e-4) -> bool:
    return float(jnp.max(jnp.abs(a - b))) > tol


@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("frames", [1, 3])
def test_output_shapes_for_stills_and_clips(frames, pool):
    model = make(pool=pool)
    out = run(model, images(1, frames))
    per_frame = (4 // pool) ** 2
    assert model.config.patches_per_frame == per_frame
    assert out.shape == (1, frames * per_frame, 32) == (1, model.config.tokens(frames), 32)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_patches_are_pixel_blocks_in_row_major_order():
    x = images(2, 3)
    patches = patchify(x, 4)  # [b, t, 16, 4 * 4 * 3]
    for index, (row, col) in ((0, (0, 0)), (1, (0, 1)), (4, (1, 0)), (15, (3, 3))):
        block = x[:, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4, :].reshape(2, 3, -1)
        np.testing.assert_array_equal(patches[:, :, index], block)


def test_pooling_averages_neighbouring_patches_of_the_same_frame():
    pooled, full = make(pool=2), make(pool=1)  # the same seed: the same parameters
    x = images(1, 3)
    grid = run(full, x).reshape(1, 3, 4, 4, 32)  # [b, frames, rows, cols, d]
    expected = grid.reshape(1, 3, 2, 2, 2, 2, 32).mean(axis=(3, 5)).reshape(1, 12, 32)
    np.testing.assert_allclose(run(pooled, x), expected, atol=1e-6)


def test_attention_is_bidirectional():
    model, x = make(), images(1, 1)
    y = x.at[:, :, 12:, 12:, :].add(1.0)  # only the last (bottom-right) patch
    a, b = run(model, x), run(model, y)
    assert differs(a[:, 0], b[:, 0])  # the first patch sees the last one


def test_frames_are_told_apart_and_attend_to_each_other():
    model, x = make(), images(1, 3)
    out = run(model, x)
    swapped = run(model, x[:, [1, 0, 2]])
    # Undo the swap on the output: without temporal embeddings the encoder would be equivariant
    # to permuting frames and this would equal `out`.
    unswapped = swapped.reshape(1, 3, 16, 32)[:, [1, 0, 2]].reshape(1, 48, 32)
    assert differs(out, unswapped)
    # Frame 0's tokens depend on frame 1's pixels.
    changed = run(model, x.at[:, 1].add(1.0))
    assert differs(out[:, :16], changed[:, :16])


def test_identical_frames_give_different_tokens_per_frame():
    model = make()
    clip = jnp.repeat(images(1, 1), 3, axis=1)
    per_frame = run(model, clip).reshape(1, 3, 16, 32)
    assert differs(per_frame[:, 0], per_frame[:, 1]) and differs(per_frame[:, 1], per_frame[:, 2])
    # ...and only because of the temporal embedding: with it zeroed the frames are interchangeable.
    model.frame_embed.set_value(jnp.zeros_like(model.frame_embed[...]))
    per_frame = run(model, clip).reshape(1, 3, 16, 32)
    np.testing.assert_allclose(per_frame[:, 0], per_frame[:, 2], atol=1e-5)


def mesh_layout(devices) -> Layout:
    return Layout(make_mesh({"data": 2, "tensor": 2}, devices), DEFAULT_RULES)


def test_sharded_encoder_matches_one_device():
    layout = mesh_layout(devices_or_skip(4))
    graphdef, params = nnx.split(make())
    x = images(2, 2)

    def encode(params, x):
        return nnx.merge(graphdef, params)(x)

    expected = jax.jit(encode)(params, x)
    params = jax.device_put(params, layout.shardings(layout.param_specs(params)))
    x = jax.device_put(x, layout.sharding(layout.spec(("batch",))))
    assert params["blocks"]["attn"]["wq"][...].sharding.spec == P(None, None, "tensor", None)
    assert params["blocks"]["mlp"]["w_in"][...].sharding.spec == P(None, None, "tensor")
    with use_layout(layout):
        out = jax.jit(encode)(params, x)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("module", ["vit", "resampler"])
def test_every_parameter_names_its_logical_axes(module):
    model = make() if module == "vit" else resampler()
    state = nnx.state(model)
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert variables and all(len(v.get_metadata()["logical_axes"]) == v.ndim for v in variables)
    specs = jax.tree.leaves(mesh_layout(devices_or_skip(4)).param_specs(state))
    assert len(specs) == len(variables)
    assert any("tensor" in s for s in specs)  # heads and mlp are split over `tensor`


@pytest.mark.parametrize("n_tokens", [7, 40])
def test_resampler_output_size_is_fixed_and_depends_on_every_token(n_tokens):
    model = resampler(n_latents=5)
    tokens = jax.random.normal(jax.random.key(n_tokens), (2, n_tokens, 32))
    probe = jax.random.normal(jax.random.key(0), (2, 5, 32))  # not sum(out²): RMSNorm fixes that

    @jax.jit
    def out_and_grads(t):
        out, pullback = jax.vjp(model, t)
        return out, pullback(probe)[0]

    out, grads = out_and_grads(tokens)
    assert out.shape == (2, 5, 32)
    assert bool(jnp.all(jnp.linalg.norm(grads, axis=-1) > 1e-6))


def test_remat_gives_the_same_gradients():
    x = images(1, 1)

    def grads(remat):
        graphdef, params = nnx.split(make(remat=remat))
        return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads("full"), grads("none"))


def test_bfloat16_compute_tracks_float32():
    x = images(1, 3)
    fp32, bf16 = run(make(), x), run(make(dtype="bfloat16"), x)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(jnp.float32), fp32, atol=0.1)


def test_flops_count_every_matmul_weight():
    model, frames, tokens = make(), 2, 2 * 16
    matmul = sum(v.size for path, v in jax.tree.leaves_with_path(
        nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))
        if jax.tree_util.keystr(path[-1:], simple=True) in ("wq", "wk", "wv", "wo", "w_in", "w_out",
                                                            "patch_embed"))
    attention = 12 * BASE.n_layers * BASE.n_heads * BASE.head_dim * tokens**2
    assert vit_flops_per_example(BASE, frames) == 6 * matmul * tokens + attention


@pytest.mark.parametrize("changes, message", [
    ({"image_size": 18}, "model.vision.image_size=18 is not divisible by model.vision.patch_size=4"),
    ({"pool": 3}, "model.vision.pool=3 does not divide the patch grid side 4"),
    ({"dtype": "float16"}, "vit.dtype='float16'"),
    ({"n_heads": 0}, "model.vision.n_heads=0 must be positive"),
    ({"remat": "sometimes"}, "vit.remat='sometimes' is not a policy"),
])
def test_config_errors_name_the_option(changes, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(BASE, **changes)


def test_too_many_frames_is_a_user_error():
    with pytest.raises(UserError, match="model.vision.max_frames=3"):
        make()(images(1, 4))


def test_from_config_fills_defaults():
    c = ViTConfig.from_config({"image_size": 16, "patch_size": 4, "d_model": 32, "n_layers": 2,
                               "n_heads": 4, "head_dim": 8, "d_ff": 64, "pool": 2})
    assert (c.channels, c.max_frames, c.pool, c.patches_per_frame, c.tokens(3)) == (3, 1, 2, 4, 12)
