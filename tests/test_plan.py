"""`jaxscale plan`: the cost model against compiled programs, the search, the command."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import devices_or_skip, tiny_config

from jaxscale.data.loader import batch_shapes
from jaxscale.errors import UserError
from jaxscale.mesh import AXES, resolve_axis_sizes
from jaxscale.metrics import train_flops_per_token
from jaxscale.planner import clusters, collectives, cost, memory, remat, search
from jaxscale.planner.compiled import compile_step

# mesh, parallel and pipeline settings
LAYOUTS = {
    "DP": dict(data=8),
    "ZeRO-1": dict(data=8, zero_stage=1),
    "ZeRO-2": dict(data=8, zero_stage=2),
    "ZeRO-3": dict(data=8, zero_stage=3),
    "FSDP": dict(fsdp=8),
    "HSDP": dict(data=2, fsdp=4),
    "TP": dict(tensor=4),
    "TP+SP": dict(tensor=4, sequence_parallel=True),
    "GPipe": dict(pipeline=2, data=4, schedule="gpipe"),
    "1F1B": dict(pipeline=2, data=4, schedule="1f1b"),
    "interleaved": dict(pipeline=2, data=4, schedule="interleaved"),
    "GPipe x FSDP": dict(pipeline=2, fsdp=4, schedule="gpipe"),  # each tick gathers its layers
    # context parallelism: the planner takes `context_parallel.collective_bytes`, which
    # tests/test_context.py checks against the compiled programs
}


def layout_config(name: str):
    settings = dict(LAYOUTS[name])
    schedule = settings.pop("schedule", None)
    c = tiny_config(**settings)
    if schedule:
        c.model.n_layers = 4
        c.pipeline.schedule = schedule
        c.pipeline.virtual_stages = 2 if schedule == "interleaved" else 1
    return c


def sizes_of(config, n: int) -> dict[str, int]:
    return resolve_axis_sizes({a: config.mesh[a] for a in AXES}, n)


def predicted_bytes(config, sizes, platform: str) -> dict[str, dict[str, float]]:
    """`{axes: {op: bytes sent per device}}` of the cost model's collectives. XLA:CPU lowers the
    reduce-scatters that sharding propagation makes (sequence parallelism's) as all-reduces of
    the whole input; the explicit ones (ZeRO/FSDP's) stay reduce-scatters."""
    out: dict[str, dict[str, float]] = {}
    for c in collectives.param_collectives(config, sizes) + collectives.activation_collectives(config, sizes):
        if platform == "cpu" and c.op == "reduce-scatter" and c.axes == ("tensor",):
            c = collectives.Collective("all-reduce", c.axes, c.nbytes * sizes["tensor"], c.count, c.what)
        label = "+".join(a for a in AXES if a in c.axes)
        out.setdefault(label, {}).setdefault(c.op, 0.0)
        out[label][c.op] += c.sent(sizes)
    return out


@pytest.mark.usefixtures("production_compiles")  # the memory and loops of the command's programs
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_collective_bytes_and_memory_match_the_compiled_programs(name):
    """Every collective the compiled step runs per step (loops counted by their trip counts),
    per mesh axis and kind: the bytes each device sends equal the cost model's, up to the
    scalars (loss, token count, gradient-norm partials: under 1 KB) it leaves out. The predicted
    memory per device is within 10% of the compiled step's peak (on the CPU mesh; the TPU
    compiler's: docs/plan.md)."""
    config = layout_config(name)
    n = 4 if name.startswith("TP") else 8
    devices = devices_or_skip(n)
    sizes = sizes_of(config, n)
    step = compile_step(config, devices[:n])
    if devices[0].platform == "cpu":
        predicted = cost.estimate(config, sizes, clusters.PRESETS["8xh100"]).memory_bytes
        assert abs(predicted - step.peak_bytes) <= 0.1 * step.peak_bytes, (predicted, step.peak_bytes)
    assert_bytes_match(step.collectives, predicted_bytes(config, sizes, devices[0].platform))


def assert_bytes_match(compiled: dict, want: dict) -> None:
    """The same collectives per mesh axis and kind, and bytes within 1 KB and 0.2%."""
    found = {(label, op) for label, ops in compiled.items() for op, (_, b) in ops.items() if b > 1024}
    assert found == {(label, op) for label, ops in want.items() for op, b in ops.items() if b > 1024}
    for label, op in found:
        got, predicted = compiled[label][op][1], want[label][op]
        assert abs(got - predicted) <= 1024 + 0.002 * got, (label, op, got, predicted)


@pytest.mark.usefixtures("production_compiles")
@pytest.mark.parametrize("settings", [dict(data=2, tensor=4, zero_stage=3), dict(fsdp=2, tensor=4)],
                         ids=["ZeRO-3 x TP", "FSDP x TP"])
def test_zero_and_fsdp_under_tensor_parallelism_gather_each_devices_tensor_slice(settings):
    """Parameters split over `tensor` and a data-parallel axis are gathered over the latter
    only, each device its tensor slice (`zero.gather_all`'s nested shard_map): nothing is
    gathered over `tensor`, and the bytes over `data`/`fsdp` are the cost model's (without the
    nesting, XLA's partitioner gathered every parameter whole over `tensor` first: 2.6 times the
    bytes over `data`, 2.1 times the gradients'). Memory is not compared: predicted 1.14 times
    the compiled peak for ZeRO-3 x TP (docs/plan.md)."""
    config = tiny_config(**settings)
    step = compile_step(config, devices_or_skip(8))
    assert "all-gather" not in step.collectives["tensor"]
    assert_bytes_match(step.collectives, predicted_bytes(config, sizes_of(config, 8), "cpu"))


@pytest.mark.usefixtures("production_compiles")
@pytest.mark.parametrize("sp", [False, True], ids=["without SP", "with SP"])
@pytest.mark.parametrize("settings,schedule", [
    (dict(pipeline=2, tensor=4), "gpipe"),
    (dict(pipeline=2, data=2, tensor=2, zero_stage=3), "1f1b"),
    (dict(pipeline=2, tensor=4), "interleaved")],
    ids=["GPipe x TP", "1F1B x ZeRO-3 x TP", "interleaved x TP"])
def test_pipelines_under_tensor_parallelism_all_reduce_in_every_tick(settings, schedule, sp):
    """Each tick runs its stage's layers on a microbatch with their tensor-parallel all-reduces
    (GPipe's and the interleaved schedule's idle ticks too); 1F1B also runs the stage's forward
    again in the tick of its backward, and its head in every tick. Without the ticks the model
    priced 0.82 of GPipe x TP's tensor bytes and 0.54 of 1F1B's. With sequence parallelism the
    layers gather and scatter instead, each run's norm gradients are all-reduced, the stages'
    table gradient stays split, and 1F1B's recomputed stage and the interleaved schedule's
    checkpointed chunk gather their inputs again in the backward (before these were priced:
    0.92, 0.77 and 0.66 of the compiled tensor all-gather bytes, 2.9 times the pipeline's
    all-reduce)."""
    config = tiny_config(sequence_parallel=sp, **settings)
    config.model.n_layers = 4
    config.pipeline.update(schedule=schedule, microbatches=4,
                           virtual_stages=2 if schedule == "interleaved" else 1)
    step = compile_step(config, devices_or_skip(8))
    assert_bytes_match(step.collectives, predicted_bytes(config, sizes_of(config, 8), "cpu"))


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_1f1b_tensor_traffic_is_timed_over_the_ticks_of_its_critical_path(schedule):
    """1F1B's tick loop holds each tick's work in conditionals: its tensor bytes count all
    M + 2P - 2 ticks (as compiled, the test above), its time the M + P - 1 ticks of the critical
    path; GPipe's idle ticks run their layers, so its time is all its bytes'."""
    config = tiny_config(pipeline=2, tensor=4)
    config.model.n_layers = 4
    config.pipeline.update(schedule=schedule, microbatches=4)
    sizes = sizes_of(config, 8)
    chip = clusters.Chip("tiny", 100e12, 64e9, 1e12, 100e9, 0, 0.5)
    est = cost.estimate(config, sizes, clusters.Cluster("8xtiny", 8, chip, 8, 10e9))
    tensor = sum(c.sent(sizes) for c in est.collectives if cost.overlap_class(c) == "tensor")
    rest = sum(c.sent(sizes) for c in est.collectives if cost.overlap_class(c) != "tensor")
    share = (4 + 2 - 1) / (4 + 2 * 2 - 2) if schedule == "1f1b" else 1.0
    assert tensor > rest > 0
    assert est.comm_s["fast"] == pytest.approx((tensor * share + rest) / chip.fast_bw)


@pytest.mark.usefixtures("production_compiles")
def test_state_bytes_equal_the_compiled_arguments():
    """Parameters and optimizer state per device (the step's arguments, less the batch) as the
    cost model sizes them from the abstract shardings, for DP, ZeRO-1/3, FSDP, TP and a pipeline."""
    for name in ("DP", "ZeRO-1", "ZeRO-3", "FSDP", "TP", "GPipe"):
        config = layout_config(name)
        n = 4 if name == "TP" else 8
        sizes = sizes_of(config, n)
        state = cost.state_bytes(config, sizes)
        batch = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in
                    batch_shapes(config).values()) / math.prod(sizes[a] for a in memory.BATCH_AXES)
        got = compile_step(config, devices_or_skip(n)[:n]).argument_bytes - batch
        assert abs(state["params"] + state["optimizer"] - got) <= 0.001 * got, name


def test_the_search_keeps_only_layouts_that_fit_fastest_first():
    config = tiny_config()
    config.model.update(d_model=256, n_layers=4, d_ff=1024, n_heads=8, n_kv_heads=4, head_dim=32)
    chip = clusters.Chip("tiny", 100e12, 64e6, 1e12, 100e9, 0, 0.5)
    cluster = clusters.Cluster("8xtiny", 8, chip, 8, 10e9)
    fits, too_big = search.plan(config, cluster)
    assert fits and too_big  # 64 MB chips: replicated AdamW state (16 B x 3.5M params) does not fit
    assert all(e.memory_bytes <= 0.9 * chip.hbm_bytes for _, e in fits)
    times = [e.step_s for _, e in fits]
    assert times == sorted(times)


@pytest.mark.usefixtures("production_compiles")
def test_the_search_chunks_the_loss_where_the_logits_do_not_fit(monkeypatch):
    """A model whose float32 logits are most of its step: chunked, the planner's memory is within
    10% of the compiled step's, as unchunked; on chips that hold the chunked step only, the
    search keeps the layout by chunking the loss (same FLOPs) before it accumulates."""
    monkeypatch.setattr(search, "LOSS_CHUNK", 128)
    config = tiny_config(data=8, global_batch_size=64)
    config.model.update(vocab_size=4096, max_seq_len=128)
    config.data.seq_len = 128  # 1,024 tokens a device: 16 MiB of logits
    sizes, gpu = sizes_of(config, 8), clusters.PRESETS["8xh100"]
    predicted = {}
    for chunk in (0, 128):
        config.model.loss_chunk = chunk
        predicted[chunk] = cost.estimate(config, sizes, gpu).memory_bytes
        compiled = compile_step(config, devices_or_skip(8)).peak_bytes
        assert abs(predicted[chunk] - compiled) <= 0.1 * compiled, (chunk, predicted[chunk], compiled)
    assert predicted[0] - predicted[128] > 12 * 2**20
    config.model.loss_chunk = 0
    between = (predicted[0] + predicted[128]) / 2 / search.MEMORY_FRACTION
    chip = dataclasses.replace(gpu.chip, hbm_bytes=between)
    fits, _ = search.plan(config, clusters.Cluster("8xsmall", 8, chip, 8, 10e9))
    settings = [dict(c.settings) for c, _ in fits]
    kept = next(s for s in settings if s["mesh.data"] == 8 and s["parallel.zero_stage"] == 0
                and s["model.remat"] == "none")
    assert (kept["model.loss_chunk"], kept["train.grad_accum_steps"]) == (128, 1)
    assert {s["model.loss_chunk"] for s in settings} <= {0, 128}
    best = fits[0][0]
    chunked = "--config.model.loss_chunk=128" in best.overrides(config)
    assert chunked == ("loss_chunk=128" in best.describe())


def test_the_search_accumulates_any_divisor_of_a_devices_rows():
    """A per-device batch of 5 that fits only one row at a time (MaxText's 70B on v6e-256): the
    search keeps it at 5 accumulation steps; powers of two left it none."""
    config = tiny_config(data=8, global_batch_size=40)
    config.model.loss_chunk = 32  # what the logits hold does not change with the search's chunking
    sizes, gpu = sizes_of(config, 8), clusters.PRESETS["8xh100"]
    need = {}
    for accum in (1, 5):
        config.train.grad_accum_steps = accum
        need[accum] = cost.estimate(config, sizes, gpu).memory_bytes
    config.train.grad_accum_steps = 1
    assert need[5] < need[1]
    chip = dataclasses.replace(gpu.chip, hbm_bytes=(need[1] + need[5]) / 2 / search.MEMORY_FRACTION)
    fits, _ = search.plan(config, clusters.Cluster("8xsmall", 8, chip, 8, 10e9))
    kept = {dict(c.settings)["train.grad_accum_steps"] for c, _ in fits
            if dict(c.settings)["mesh.data"] == 8 and dict(c.settings)["model.remat"] == "none"
            and dict(c.settings)["parallel.zero_stage"] == 0}
    assert kept == {5}


def test_named_remat_policies_keep_offload_and_recompute_what_they_name():
    """`save:`/`offload:` policies: the device keeps the layer input and the saved names (float32
    results), an offload sends its names to the host and back beside the compute, the backward
    runs again what no name spares; the search prices the config's own policy."""
    config = tiny_config(data=8)
    config.model.update(dtype="bfloat16", n_kv_heads=2, attention="dot_product")
    sizes, cluster = sizes_of(config, 8), clusters.PRESETS["8xh100"]
    m, t = config.model, memory.tokens_per_device(config, sizes)
    per_token = {}
    for policy in ("full", "save:qkv", "save:qkv,mlp_out", "offload:layer_input,qkv"):
        config.model.remat = policy
        per_token[policy] = memory.layer_bytes(config, sizes)
    q_k_v = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim
    assert per_token["save:qkv"] - per_token["full"] == pytest.approx(4 * q_k_v)  # float32
    assert per_token["save:qkv,mlp_out"] == per_token["save:qkv"]  # never read back
    assert per_token["offload:layer_input,qkv"] == 0
    host = memory.host_bytes(config, sizes)
    assert host == pytest.approx(m.n_layers * t * 2 * (m.d_model + q_k_v))  # bfloat16 values
    estimate = cost.estimate(config, sizes, cluster)
    assert estimate.comm_s["host"] == pytest.approx(2 * host / cluster.chip.host_bw)
    forward = (train_flops_per_token(config) / 3 - 2 * m.d_model * m.vocab_size) / m.n_layers
    attention = 4 * m.n_heads * m.head_dim * config.data.seq_len
    w_down = m.d_model * m.d_ff * 2
    for policy, spared in (("none", forward), ("save_dots", forward - attention), ("full", w_down),
                           ("save:qkv,attn_out", w_down + 2 * m.d_model * q_k_v + attention / 2)):
        config.model.remat = policy
        assert remat.recompute_flops_per_token(config) == pytest.approx(m.n_layers * (forward - spared))
    config.model.remat = "offload:qkv"
    assert {dict(c.settings)["model.remat"] for c, _ in search.candidates(config, cluster)} == {
        "none", "save_dots", "full", "offload:qkv"}


def test_offload_layouts_must_fit_the_hosts_memory_too():
    """An offload policy's activations of one accumulation step live in host memory: the search
    keeps a layout only where they fit `chip.host_bytes` (with the HBM margin), accumulating
    more where that helps; a cluster file may leave host memory out (not checked)."""
    config = tiny_config(data=8)
    config.model.update(dtype="bfloat16", remat="offload:layer_input,qkv")
    roomy = clusters.PRESETS["8xh100"]
    need = cost.estimate(config, sizes_of(config, 8), roomy).host_memory_bytes
    assert need == pytest.approx(memory.host_bytes(config, sizes_of(config, 8))) and need > 0
    small = dataclasses.replace(roomy, chip=dataclasses.replace(roomy.chip, host_bytes=need / 2))
    offloads = {name: [(dict(c.settings), e) for c, e in search.plan(config, cluster)[0]
                       if dict(c.settings)["model.remat"].startswith("offload")]
                for name, cluster in (("roomy", roomy), ("small", small))}
    budget = need / 2 * search.MEMORY_FRACTION
    assert offloads["small"] and all(e.host_memory_bytes <= budget for _, e in offloads["small"])
    assert any(e.host_memory_bytes > budget for _, e in offloads["roomy"])
    assert len(offloads["small"]) <= len(offloads["roomy"])


def test_pipeline_bubble_and_slow_links():
    config = tiny_config(pipeline=2, data=4)
    config.model.n_layers = 4
    gpu = clusters.PRESETS["64xh100"]
    for schedule, v, bubble in (("gpipe", 1, 1 / 5), ("1f1b", 1, 1 / 5), ("interleaved", 2, 1 / 9)):
        config.pipeline.update(schedule=schedule, virtual_stages=v)
        estimate = cost.estimate(config, sizes_of(config, 8), clusters.PRESETS["8xh100"])
        assert estimate.bubble == pytest.approx(bubble)
    sizes = {**dict.fromkeys(AXES, 1), "data": 8, "tensor": 8}
    assert cost.link(("tensor",), sizes, gpu)[0] == "fast"  # inside an NVLink node
    assert cost.link(("data",), sizes, gpu) == ("slow", gpu.slow_bw)  # across nodes


def test_hbm_traffic_and_overlapped_tensor_parallel_traffic():
    """Compute time is the matmuls at the achievable rate plus the elementwise passes at HBM
    bandwidth; collectives of an `overlapped` class only show where they exceed compute."""
    import dataclasses

    config = tiny_config(tensor=4)
    sizes, cluster = sizes_of(config, 4), clusters.PRESETS["8xh100"]
    slow_hbm = dataclasses.replace(cluster, chip=dataclasses.replace(cluster.chip, hbm_bw=1e9))
    fast, slow = cost.estimate(config, sizes, cluster), cost.estimate(config, sizes, slow_hbm)
    hbm = cost.hbm_bytes(config, sizes)
    assert hbm > 0 and slow.compute_s - fast.compute_s == pytest.approx(hbm / 1e9 - hbm / 3.35e12)
    bw = cost.link(("tensor",), sizes, cluster)[1]
    tp = sum(c.sent(sizes) for c in fast.collectives if cost.overlap_class(c) == "tensor")
    assert tp > 0 and fast.exposed_comm_s == pytest.approx(tp / bw)  # nothing else travels
    hidden = cost.estimate(config, sizes, cluster, ("parameters", "tensor"))
    assert hidden.exposed_comm_s == pytest.approx(cost.hidden_excess(
        hidden.compute_s, tp / bw))
    config.model.remat = "full"  # the forward's elementwise passes again in the backward
    assert cost.hbm_bytes(config, sizes) > hbm


def test_cluster_files_and_their_errors(tmp_path):
    good = dict(chips=16, peak_flops=5e14, hbm_bytes=8e10, hbm_bw=2e12, fast_bw=3e11, fast_domain=8,
                slow_bw=2.5e10, kind="my chip")
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(good))
    cluster = clusters.load_cluster(str(path))
    assert (cluster.chips, cluster.domains, cluster.chip.kind) == (16, 2, "my chip")
    path.write_text(json.dumps(dict(good, host_bw=5e10, host_bytes=2e11)))
    assert clusters.load_cluster(str(path)).chip.host_bw == 5e10
    assert (clusters.load_cluster(str(path)).chip.host_bytes, cluster.chip.host_bytes) == (2e11, 0)
    path.write_text(json.dumps(good))
    toml = tmp_path / "cluster.toml"
    toml.write_text("\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in good.items()))
    assert clusters.load_cluster(str(toml)) == cluster  # both named for their stem
    for text, message in [(dict(good, chips=0), "chips must be a positive number"),
                          ({k: v for k, v in good.items() if k != "slow_bw"}, "lacks slow_bw"),
                          (dict(good, bandwidth=1), "unknown key 'bandwidth'"),
                          (dict(good, fast_domain=3), "does not divide chips=16"),
                          (dict(good, host_bw="fast"), "host_bw must be a positive number"),
                          (dict(good, host_bytes=-1), "host_bytes must be a positive number")]:
        path.write_text(json.dumps(text))
        with pytest.raises(UserError, match=message):
            clusters.load_cluster(str(path))
    path.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        clusters.load_cluster(str(path))
    with pytest.raises(UserError, match="unknown cluster 'a100'"):
        clusters.load_cluster("a100")


def test_plan_command_prints_the_table_and_the_best_overrides():
    run = subprocess.run([sys.executable, "-m", "jaxscale.cli", "plan", "--cluster", "8xh100",
                          "--top", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "layouts fit" in lines[0] and sum(line.startswith("| ") for line in lines) == 1 + 3
    assert lines[-1].startswith("best: ")
    bad = subprocess.run([sys.executable, "-m", "jaxscale.cli", "plan"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "needs --cluster" in bad.stderr
