"""The TPU compile tier: every layout the parity tests cover compiles for a small TPU slice with
the TPU compiler (libtpu, no TPU needed), with the per-chip memory and collectives it implies.

The model's dimensions are multiples of the TPU's 128 lanes where the attention allows (smaller
arrays are padded to tiles of 128 in memory, which blurs the sharded bytes). The TPU compiler
writes every reduce-scatter as an all-reduce (a bare `psum_scatter` too), so ZeRO/FSDP's gradient
bytes are read from all-reduces.
"""

import dataclasses
import importlib.util

import jax
import pytest
from conftest import tiny_config

from jaxscale.errors import UserError
from jaxscale.mesh import AXES, make_mesh
from jaxscale.models import abstract_model
from jaxscale.planner import clusters, memory, remat, search
from jaxscale.planner.collectives import param_collectives
from jaxscale.planner.compiled import DoesNotFit, compile_step, topology_devices

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="compiling for TPUs needs libtpu: pip install -e '.[test]' (or pip install libtpu)")

SHAPE = dict(vocab_size=512, d_model=128, n_heads=4, n_kv_heads=4, head_dim=32, d_ff=256)
MICROBATCHES = 4
LAYOUTS = {  # name: (topology, mesh/parallel/train settings, model/pipeline/data settings)
    "dp": ("v5p:2x2x2", dict(data=8), {}),
    "zero1": ("v5p:2x2x2", dict(data=8, zero_stage=1), {}),
    "zero2": ("v5p:2x2x2", dict(data=8, zero_stage=2), {}),
    "zero3": ("v5p:2x2x2", dict(data=8, zero_stage=3), {}),
    "fsdp": ("v5p:2x2x2", dict(fsdp=8), {}),
    "tp": ("v6e:2x2", dict(tensor=4), {}),
    "tp_sp": ("v6e:2x2", dict(tensor=4, sequence_parallel=True), {}),
    "gpipe": ("v5p:2x2x1", dict(pipeline=4), dict(n_layers=4)),
    "1f1b": ("v5p:2x2x1", dict(pipeline=4), dict(n_layers=4, schedule="1f1b")),
    "interleaved": ("v5p:2x2x1", dict(pipeline=2, data=2),
                    dict(n_layers=4, schedule="interleaved", virtual_stages=2)),
    "ep": ("v5p:2x2x2", dict(expert=8), dict(n_experts=8)),
    "cp": ("v5p:2x2x1", dict(context=4), dict(seq_len=64)),
}


def layout_config(name: str):
    _, settings, other = LAYOUTS[name]
    c = tiny_config(**settings)
    c.model.update(SHAPE, n_layers=other.get("n_layers", 2))
    c.pipeline.update(microbatches=MICROBATCHES, schedule=other.get("schedule", "gpipe"),
                      virtual_stages=other.get("virtual_stages", 1))
    if "n_experts" in other:
        c.model.moe.update(n_experts=other["n_experts"], top_k=2, d_ff=128)
    c.data.seq_len = other.get("seq_len", c.data.seq_len)
    return c


@pytest.fixture(scope="module")
def steps():
    """Each layout compiled once, when a test first asks for it (under xdist, in the worker
    that runs that test)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            topology = LAYOUTS[name][0]
            cache[name] = compile_step(layout_config(name), topology_devices(topology))
        return cache[name]
    return get


def param_bytes(name: str) -> int:
    _, params = abstract_model(layout_config(name).model)
    return sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))


def axes_bytes(collectives: dict, ops=None) -> float:
    return sum(b for stats in collectives.values() for op, (_, b) in stats.items()
               if ops is None or op in ops)


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_compiles_for_a_tpu_slice_with_collectives_on_its_axes(name, steps):
    step, (_, settings, _) = steps(name), LAYOUTS[name]
    axes = {a for a, n in tiny_config(**settings).mesh.items() if isinstance(n, int) and n > 1}
    assert step.flops > 0 and step.peak_bytes > step.argument_bytes > 0
    assert step.collectives and all(set(label.split("+")) <= axes for label in step.collectives)


def test_dp_all_reduces_the_gradients_over_data(steps):
    grads, n = param_bytes("dp"), 8
    assert set(steps("dp").collectives) == {"data"}
    _, sent = steps("dp").collectives["data"]["all-reduce"]
    assert 2 * (n - 1) / n * grads <= sent <= 1.01 * 2 * (n - 1) / n * grads


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "fsdp"])
def test_zero_and_fsdp_shard_the_state_and_move_gradients_and_params_once(name, steps):
    step, dp, params, n = steps(name), steps("dp"), param_bytes(name), 8
    axis = "fsdp" if name == "fsdp" else "data"
    assert set(step.collectives) == {axis}
    # DP's arguments: the parameters and both AdamW moments, whole on every chip
    assert step.argument_bytes < dp.argument_bytes / (1.8 if name == "zero1" else 3.5)
    # gradients reduced and parameters gathered: each at least (n-1)/n of them per chip
    assert axes_bytes(step.collectives) >= 2 * (n - 1) / n * params
    if name != "zero1":  # flat buffers gathered as such (`zero.FLAT_ALIGN`), not as all-reduces
        assert step.collectives[axis]["all-gather"][1] >= (n - 1) / n * params
        assert step.collectives[axis]["all-reduce"][1] <= 1.1 * 2 * (n - 1) / n * params


def test_fsdp_in_bfloat16_gathers_bfloat16_and_reduces_float32_as_the_planner_prices():
    """Under bfloat16 compute (`parallel.gather_dtype` "compute") the TPU program all-gathers
    the planner's bytes, fewer than with `gather_dtype=float32` (where the TPU compiler already
    sends the backward pass's regather in bfloat16: 0.63 of the bytes, not 0.5), and reduces
    the same float32 gradients (TPU all-reduces). 32 rows: more tokens than the vocabulary, so
    the tables are gathered too (`vocab_parallel.vocab_axes`)."""
    found = {}
    for gather in ("compute", "float32"):
        c = layout_config("fsdp")
        c.model.dtype, c.parallel.gather_dtype, c.train.global_batch_size = "bfloat16", gather, 32
        found[gather] = compile_step(c, topology_devices("v5p:2x2x2")).collectives["fsdp"]
    sizes = {a: 8 if a == "fsdp" else 1 for a in AXES}
    c.parallel.gather_dtype = "compute"
    predicted = sum(x.sent(sizes) for x in param_collectives(c, sizes) if x.op == "all-gather")
    half, full = found["compute"], found["float32"]
    assert half["all-gather"][1] == pytest.approx(predicted, rel=0.01)
    assert half["all-gather"][1] < 0.7 * full["all-gather"][1]
    assert half["all-reduce"][1] == pytest.approx(full["all-reduce"][1], rel=0.001)


def test_tensor_parallelism_all_reduces_every_block_over_tensor(steps):
    layers = layout_config("tp").model.n_layers
    assert set(steps("tp").collectives) == {"tensor"}
    assert steps("tp").collectives["tensor"]["all-reduce"][0] >= 4 * layers  # forward and backward
    assert steps("tp_sp").collectives["tensor"]["all-gather"][0] >= 2 * layers
    assert steps("tp_sp").argument_bytes == steps("tp").argument_bytes


@pytest.mark.parametrize("name,ticks", [("gpipe", MICROBATCHES + 4 - 1),
                                        ("1f1b", MICROBATCHES + 2 * 4 - 2),
                                        ("interleaved", 2 * MICROBATCHES + 2 - 1)])
def test_pipelines_send_activations_and_gradients_over_pipeline_every_tick(name, ticks, steps):
    """Each tick sends one microbatch's activations forward; gpipe and interleaved tick again
    for the backward, 1F1B sends the gradient back in the same tick."""
    c = layout_config(name)
    rows = c.train.global_batch_size // c.mesh.data // MICROBATCHES
    activation = rows * c.data.seq_len * c.model.d_model * 4
    assert steps(name).collectives["pipeline"]["collective-permute"] == (
        2 * ticks, 2 * ticks * activation)
    if name == "1f1b":  # fewer microbatches in flight than GPipe holds
        assert steps("1f1b").peak_bytes < steps("gpipe").peak_bytes


@pytest.mark.parametrize("name", ["dp", "1f1b"])
def test_a_tpu_steps_memory_is_the_device_space_of_the_compilers_report(name, steps):
    """Read from the TPU compiler's memory-usage report: `memory_analysis()`'s temporaries also
    count the scoped VMEM and, under 1F1B, buffers never live together (docs/plan.md)."""
    step = steps(name)
    assert step.peak_bytes == step.device_space_bytes > step.argument_bytes
    assert step.peak_bytes < step.argument_bytes + step.output_bytes - step.alias_bytes + step.temp_bytes


def test_expert_parallelism_exchanges_routed_tokens_over_expert(steps):
    c = layout_config("ep")
    count, sent = steps("ep").collectives["expert"]["ragged-all-to-all"]
    assert count == 4 * c.model.n_layers  # dispatch and return, forward and backward
    rows = c.train.global_batch_size * c.data.seq_len // 8 * c.model.moe.top_k
    assert sent == count * 7 / 8 * rows * c.model.d_model * 4


def test_context_parallelism_passes_keys_and_values_around_the_ring(steps):
    count, sent = steps("cp").collectives["context"]["collective-permute"]
    assert count >= 2 * layout_config("cp").model.n_layers * (4 - 1) and sent > 0


def test_a_mesh_axis_no_whole_torus_axes_make_still_lays_out():
    """tensor=8 on a 4x4 v6e torus (as on the 16x16 slice `jaxscale plan` proposes such layouts
    for): no product of whole physical axes is 8, so one is split rather than refused."""
    devices = topology_devices("v6e:4x4")
    mesh = make_mesh({**dict.fromkeys(AXES, 1), "data": 2, "tensor": 8}, devices)
    assert (mesh.shape["data"], mesh.shape["tensor"]) == (2, 8)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_a_bad_topology_is_one_line():
    with pytest.raises(UserError, match=r"^cannot compile for TPU topology 'v5p:3x3x3x3'[^\n]*$"):
        topology_devices("v5p:3x3x3x3")


def test_remat_policies_recompute_and_offload_what_the_planner_prices():
    """The TPU compiler's step against `planner.remat`: the forward FLOPs a named policy runs
    again in the backward pass (XLA counts the scanned layer once; within 3%: the recomputed
    norms and rotary embedding are not matmuls: 1.6% at d_model 256, 0.9% at 512, 2.1% at 128),
    and the bytes an offload policy keeps in host memory (exact at this shape; at 2 rows of 256
    tokens per chip the compiler pads k and v in host memory too, 1.6x). d_model 256 rather than
    512: the three compiles take 93 CPU-s rather than 178 on 2 cores."""
    flops, host = {}, {}
    for policy in ("none", "save:qkv,attn_out", "offload:layer_input,qkv"):
        config = tiny_config(fsdp=4)
        config.model.update(vocab_size=512, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64,
                            d_ff=768, max_seq_len=512, n_layers=2, scan_layers=True,
                            dtype="bfloat16", attention="dot_product", remat=policy)
        config.data.seq_len, config.train.global_batch_size = 512, 16
        step = compile_step(config, topology_devices("v5p:2x2x1"))
        sizes = {**dict.fromkeys(AXES, 1), "fsdp": 4}
        tokens = memory.tokens_per_device(config, sizes)  # 2,048; a layer's (XLA counts one)
        flops[policy] = (step.flops, remat.recompute_flops_per_token(config) * tokens / 2)
        host[policy] = (step.host_temp_bytes, memory.host_bytes(config, sizes))
    named = flops["save:qkv,attn_out"][0] - flops["none"][0]
    assert named == pytest.approx(flops["save:qkv,attn_out"][1], rel=0.03)
    assert flops["save:qkv,attn_out"][1] > 0 and host["save:qkv,attn_out"] == (0, 0)
    assert host["offload:layer_input,qkv"][1] > 0
    assert host["offload:layer_input,qkv"][0] == pytest.approx(host["offload:layer_input,qkv"][1], rel=0.01)


def test_plan_compiles_the_near_misses_that_the_cost_model_puts_over_the_chips_memory():
    """`jaxscale plan --compile` on a TPU cluster whose chips the cost model says the fastest
    layout overfills (a v5p:2x2x1 slice described with a tenth less HBM than that layout needs):
    the layout is a near miss, compiled beside the best that fits, and the compiler (a v5p's
    95.74 GiB) fits it, so the report gives its overrides."""
    config = tiny_config()
    config.model.update(SHAPE)
    roomy = clusters.Cluster("v5p-4", 4, clusters.CHIPS["v5p"], 4, 3.125e9, "v5p:2x2x1")
    _, fastest = search.plan(config, roomy)[0][0]
    chip = dataclasses.replace(roomy.chip, hbm_bytes=fastest.memory_bytes / 1.1)
    tight = dataclasses.replace(roomy, chip=chip)
    fits, _ = search.plan(config, tight)
    near = search.near_misses(config, tight, fits, 1)
    assert len(near) == 1 and near[0][1].step_s < fits[0][1].step_s
    assert near[0][1].memory_bytes > search.MEMORY_FRACTION * tight.chip.hbm_bytes
    lines = search.report(config, tight, top=2, compile_top=1).splitlines()
    row = next(line for line in lines if line.startswith("| near miss |"))
    assert "tokens/s/chip" in row and "does not fit" not in row  # compiled, and priced
    assert f"near miss the compiler fits: {near[0][0].overrides(config)}" in lines


def test_a_layout_the_compiler_cannot_fit_is_one_row_saying_so():
    """A cluster file that claims more HBM than the v5p has: the planner keeps a step whose
    float32 logits alone (65,536 tokens a chip, a 2^19 vocabulary) are 128 GiB, and the compile
    tier reports the TPU compiler's one-line refusal in its row instead of failing."""
    config = tiny_config(data=4, global_batch_size=128)
    config.model.update(SHAPE, vocab_size=2**19, max_seq_len=2048)
    config.data.seq_len = 2048
    big = clusters.Cluster("v5p-4", 4, dataclasses.replace(clusters.CHIPS["v5p"], hbm_bytes=1e12), 4,
                           3.125e9, "v5p:2x2x1")
    refusal = r"^Ran out of memory on HBM[^\n]* exceeds available HBM \(95\.74G\)\.?$"
    with pytest.raises(DoesNotFit, match=refusal):
        compile_step(config, topology_devices("v5p:2x2x1"))
    lines = search.report(config, big, top=1, compile_top=1).splitlines()
    row = next(line for line in lines if line.startswith("| 1 |") and "does not fit" in line)
    assert "exceeds available HBM (95.74G)" in row
