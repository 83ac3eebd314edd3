"""Tests for jaxscale.metrics: FLOP and parameter counts, peaks, throughput and the writer."""

import json
import struct
import types

import jax
import pytest
from tensorboardX.proto import event_pb2

from jaxscale import metrics, models
from jaxscale.config import base_config
from jaxscale.errors import UserError


def _model(**fields):
    m = base_config().model
    m.update(fields)
    return m


LLAMA3_8B = dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 head_dim=128, d_ff=14336, tie_embeddings=False)
LLAMA32_1B = dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                  head_dim=64, d_ff=8192, tie_embeddings=True)


def test_param_count_matches_published_llama_shapes():
    assert models.param_count(_model(**LLAMA3_8B)) == 8_030_261_248
    assert models.param_count(_model(**LLAMA32_1B)) == 1_235_814_400


def test_flops_per_token_tiny_config_by_hand():
    m = _model()  # vocab 512, d 128, 4 layers, 8 heads, 4 kv heads, head_dim 16, d_ff 384
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 384
    n_matmul = 4 * per_layer + 128 * 512
    assert n_matmul == 851_968
    expected = 6 * n_matmul + 12 * 4 * 8 * 16 * 128
    assert metrics.flops_per_token(m, 128) == expected == 5_898_240.0
    # The LM head is a matmul whether or not it shares the embedding's weights.
    tied = _model(tie_embeddings=True)
    assert metrics.flops_per_token(tied, 128) == expected
    assert models.param_count(m) - models.param_count(tied) == 512 * 128


def test_peak_on_cpu_is_measured_and_split_over_devices():
    cpu = jax.local_devices(backend="cpu")
    peak, source = metrics.peak_flops_per_device(cpu[0], "float32")
    assert peak > 0
    assert source.startswith("measured CPU GEMM") and f"/ {len(cpu)} devices" in source
    assert metrics.peak_flops_per_device(cpu[-1], "bfloat16") == (peak, source)  # cached


@pytest.mark.parametrize(
    ("kind", "dtype", "peak", "source"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12, "table: NVIDIA H100 80GB HBM3 bf16 dense"),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12, "table: NVIDIA H100 PCIe bf16 dense"),
        ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12, "table: NVIDIA A100-SXM4-80GB fp32 dense"),
        ("NVIDIA L4", "bfloat16", 121e12, "table: NVIDIA L4 bf16 dense"),
        ("TPU v5 lite", "bfloat16", 197e12, "table: TPU v5 lite bf16 dense"),
        ("TPU v5p", "bfloat16", 459e12, "table: TPU v5p bf16 dense"),
        ("TPU v6 lite", "bfloat16", 918e12, "table: TPU v6 lite bf16 dense"),
    ],
)
def test_peak_table(kind, dtype, peak, source):
    device = types.SimpleNamespace(platform="gpu", device_kind=kind)
    assert metrics.peak_flops_per_device(device, dtype) == (peak, source)


def test_peak_rejects_unknown_dtype():
    with pytest.raises(UserError, match="float16"):
        metrics.peak_flops_per_device(jax.local_devices(backend="cpu")[0], "float16")


def test_throughput_metrics_arithmetic():
    out = metrics.throughput_metrics(tokens=8192, seconds=2.0, flops_per_token=1e9,
                                     num_devices=4, peak_per_device=2e12)
    assert out["tokens_per_s"] == 4096
    assert out["tflops_per_device"] == pytest.approx(1.024)
    assert out["mfu"] == pytest.approx(0.512)
    with pytest.raises(ValueError, match="positive"):
        metrics.throughput_metrics(1, 0.0, 1.0, 1, 1.0)


def test_step_timer_windows():
    now = [10.0]
    timer = metrics.StepTimer(clock=lambda: now[0])
    timer.add(100)
    timer.add(100)
    now[0] = 12.0
    assert timer.lap() == (200, 2.0)
    timer.add(50)
    now[0] = 13.0
    assert timer.lap() == (50, 1.0)


def test_device_memory_stats():
    stats = metrics.device_memory_stats()
    if jax.local_devices()[0].memory_stats() is None:
        assert stats == {}
    else:
        assert stats["mem_in_use_gib"] >= 0 and stats["mem_peak_gib"] >= 0


def _tfrecords(path):
    """Decode a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events


def test_metrics_writer(tmp_path):
    config = json.dumps({"seed": 0, "model": {"d_model": 128}})
    with metrics.MetricsWriter(tmp_path, enabled=True) as w:
        w.write_config(config)
        w.write(1, {"loss": 2.5, "mfu": jax.numpy.float32(0.25)})
        w.write(2, {"loss": 2.0, "tokens": 4096})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "mfu": 0.25},
        {"step": 2, "loss": 2.0, "tokens": 4096},
    ]
    assert (tmp_path / "config.json").read_text() == config

    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars, texts = {}, []
    for event in _tfrecords(event_file):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars[(value.tag, event.step)] = value.simple_value
            else:
                texts.append(value.tag)
    assert scalars == {("loss", 1): 2.5, ("mfu", 1): 0.25, ("loss", 2): 2.0, ("tokens", 2): 4096}
    assert any(tag.startswith("hparams/config") for tag in texts)


def test_metrics_writer_rewrites_the_jsonl_where_files_cannot_be_appended_to(tmp_path, monkeypatch):
    """A URL run_dir (gs://...) is written through epath; its JSONL is rewritten whole, resumes
    included. Here the URL maps to a local directory."""
    local = metrics.epath.Path
    monkeypatch.setattr(metrics.epath, "Path", lambda p: local(str(p).replace("gs://bucket", str(tmp_path))))
    with metrics.MetricsWriter("gs://bucket/run", enabled=True) as w:
        w.write_config("{}")
        w.write(1, {"loss": 2.5})
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # written whole
    with metrics.MetricsWriter("gs://bucket/run", enabled=True) as w:  # a resumed run
        w.write(2, {"loss": 2.0})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    assert (tmp_path / "run" / "config.json").read_text() == "{}"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with metrics.MetricsWriter(str(run_dir), enabled=False) as w:
        w.write_config("{}")
        w.write(1, {"loss": 1.0})
    assert not run_dir.exists()
