"""The command line as a user meets it: the README's main job, `info`, and one-line errors."""

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import devices_or_skip

from jaxscale.cpu import libtpu_without_tpu

ROOT = Path(__file__).resolve().parents[1]


def jaxscale(*args: str, cwd: Path = ROOT, single_device: bool = False, timeout: int = 600):
    env = dict(os.environ)
    if single_device:  # as the README's command runs on a plain CPU machine
        env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "jaxscale.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_events(path: Path) -> list:
    from tensorboardX.proto import event_pb2

    events, data = [], path.read_bytes()
    while data:  # TFRecord: u64 length, u32 crc, payload, u32 crc
        n = int.from_bytes(data[:8], "little")
        events.append(event_pb2.Event.FromString(data[12:12 + n]))
        data = data[16 + n:]
    return events


@pytest.mark.slow
def test_default_training_lowers_the_loss_and_writes_metrics(tmp_path):
    """`jaxscale train` as in the README (embedded default config), in a fresh run dir, over 40
    of its 500 steps (the learning-rate schedule follows train.steps; the loss falls from 6.71 to
    2.72 by then; at 120 steps, 2.04: twice the time) to save CI time."""
    result = jaxscale("train", f"--config.run_dir={tmp_path}/run", "--config.train.steps=40",
                      single_device=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 40
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # about 6.7 at step 1
    assert {"grad_norm", "lr", "tokens_per_s", "tflops_per_device", "mfu"} <= set(rows[-1])
    assert 0 < rows[-1]["mfu"] < 1
    (events_file,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    tags = {v.tag for e in read_events(events_file) for v in e.summary.value}
    assert {"loss", "tokens_per_s", "mfu"} <= tags
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["d_model"] == 128


def test_overrides_and_mesh_apply_to_a_sharded_run(tmp_path):
    devices_or_skip(8)
    result = jaxscale("train", "--config", str(ROOT / "configs/default.py"),
                      f"--config.run_dir={tmp_path}", "--config.train.steps=3",
                      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                      "--config.parallel.zero_stage=1", "--config.model.n_layers=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data=2 x fsdp=2 x tensor=2" in result.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["n_layers"] == 1 and config["parallel"]["zero_stage"] == 1


def test_info_sizes_llama3_70b_without_allocating():
    result = jaxscale("info", "--config", "configs/llama3_70b.py", "--num_devices", "64")
    assert result.returncode == 0, result.stderr
    assert "70,553,706,496" in result.stdout
    assert "fsdp=8 x tensor=8" in result.stdout
    # float32 params / 64 devices = 4.11 GiB; Adam's two moments twice that.
    assert "params / device     4.11 GiB" in result.stdout
    assert "optimizer / device  8.21 GiB" in result.stdout


@pytest.mark.skipif(not libtpu_without_tpu(), reason="needs libtpu installed on a host without TPUs")
def test_libtpu_without_a_tpu_starts_quietly_on_the_cpu():
    """The test extra's libtpu on a host without TPU chips: the command runs on the CPU, without
    libtpu's failed start on stderr (the tests' own JAX_PLATFORMS=cpu taken away)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-m", "jaxscale.cli", "info"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "parameters" in result.stdout
    assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr


def test_info_sizes_a_realistic_multimodal_preset():
    result = jaxscale("info", "--config", "configs/early_fusion.py:realistic", "--num_devices", "64")
    assert result.returncode == 0, result.stderr
    # Llama-3.2-1B shape with a 512-id vocabulary, ViT-L/14 at 224 px and the projector
    assert "1,283,391,488" in result.stdout and "data=8 x fsdp=8" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--config.model.d_modle=64"], "unknown config key 'model.d_modle'"),
    (["train", "--config.mesh.tensor=3"], "mesh data=-1 x tensor=3 cannot fill 8 devices"),
    (["train", "--config.mesh.data=16"], "needs 16 devices but 8 are present"),
    (["train", "--config.data.source=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["train", "--config", "configs/missing.py"], "config file 'configs/missing.py' not found"),
    (["train", "--config.model.d_model=big"], "--config.model.d_model=big"),
    (["train", "--config.train.steps=0"], "train.steps=0 is out of range: it must be >= 1"),
    (["train", "--config.checkpoint.dir=README.md/checkpoints"],
     "cannot write checkpoint directory 'README.md/checkpoints' (NotADirectoryError"),
    (["train", "--config.model.n_kv_heads=3", "--config.mesh.tensor=2"], "kv_heads=3"),
    (["train", "--config.mesh.context=2", "--config.parallel.context_attention=zigzag"],
     "parallel.context_attention='zigzag'; use ring, all_gather, all_to_all"),
    (["train", "--config.mesh.pipeline=2", "--config.pipeline.virtual_stages=2"],
     "pipeline.virtual_stages=2 needs pipeline.schedule=interleaved"),
    (["train", "--config", "configs/clip.py:huge"], "multimodal preset size 'huge'; use tiny or"),
    (["train", "--config.model.family=vlm"], "model.family='vlm'; use one of llama, gpt2, early_fusion"),
    (["serve"], "unknown command 'serve'"),
    (["launch", "local", "--processes", "2", "train", "--config.train.steps=0"],
     "train.steps=0 is out of range"),  # refused once, before any process starts
    (["generate", "--checkpoint", "/no/such/run", "--prompt", "hi"],
     "checkpoint directory '/no/such/run' does not exist"),
    (["eval", "--checkpoint", "/no/such/run"], "checkpoint directory '/no/such/run' does not exist"),
    (["generate", "--prompt", "x" * 100],
     "a prompt of 100 tokens plus max_new_tokens=64 does not fit the KV cache of 128 tokens"),
    (["generate", "--prompt", "hi", "--config.infer.temperature=-1"],
     "sampling temperature=-1.0 is invalid; set infer.temperature"),
    (["generate", "--prompt", "hi", "--config.infer.top_p=1.5"], "sampling top_p=1.5 is invalid"),
    (["generate", "--prompt", "hi", "--config.infer.weights=int3"],
     "infer.weights='int3' is not a weight format"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(args, message, tmp_path):
    if any(a.startswith("--config.mesh.") for a in args):
        devices_or_skip(8)  # the messages name the 8 devices (or a mesh that needs several)
    result = jaxscale(*args, f"--config.run_dir={tmp_path}/run", cwd=ROOT) if args[0] == "train" \
        else jaxscale(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("jaxscale:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_main_in_process_leaves_the_logger_as_it_was(capsys):
    from jaxscale.cli import main

    logger = logging.getLogger("jaxscale")
    before = list(logger.handlers), logger.level, logger.propagate
    assert main(["inspect", "/no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (list(logger.handlers), logger.level, logger.propagate) == before


TINY = ("--config.model.n_layers=2", "--config.model.d_model=64", "--config.model.head_dim=8",
        "--config.model.d_ff=128", "--config.model.max_seq_len=64", "--config.data.seq_len=32")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small model trained for 40 steps by `jaxscale train`: a checkpoint to generate from."""
    run = tmp_path_factory.mktemp("tiny_run")
    result = jaxscale("train", *TINY, f"--config.run_dir={run}", "--config.train.steps=40")
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def test_generate_streams_a_prompt_and_eval_reports_perplexity(tiny_run):
    """Train -> generate (streamed; a batch on a data x tensor mesh with int8 weights and
    sampling) -> eval with int4 weights, all from the command line."""
    devices_or_skip(8)
    one = jaxscale("generate", *TINY, f"--config.run_dir={tiny_run}", "--prompt", "The ",
                   "--config.infer.max_new_tokens=12")
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout.startswith("The ") and len(one.stdout.rstrip("\n")) > len("The ")
    assert "12 tokens each at most" in one.stderr and "weights float32" in one.stderr
    batch = jaxscale("generate", *TINY, "--checkpoint", f"{tiny_run}/checkpoints", "--prompt", "a",
                     "--prompt", "def f", "--config.mesh.data=2", "--config.mesh.tensor=4",
                     "--config.infer.weights=int8", "--config.infer.temperature=0.7",
                     "--config.infer.top_k=5", "--config.infer.max_new_tokens=8")
    assert batch.returncode == 0, batch.stderr[-2000:]
    assert "--- [0]\na" in batch.stdout and "--- [1]\ndef f" in batch.stdout
    assert "weights int8" in batch.stderr
    ev = jaxscale("eval", *TINY, f"--config.run_dir={tiny_run}", "--config.infer.weights=int4",
                  "--config.infer.group_size=32")
    assert ev.returncode == 0, ev.stderr[-2000:]
    found = re.search(r"perplexity ([\d.]+) \(loss ([\d.]+) nats/token\) on ([\d,]+) tokens",
                      ev.stdout)
    assert found, ev.stdout
    ppl, loss = float(found[1]), float(found[2])
    assert 1 < ppl < 264 and abs(ppl - math.exp(loss)) < 0.01 * ppl
    assert int(found[3].replace(",", "")) > 20_000  # the embedded held-out split: ~29 KB


@pytest.mark.skipif(sys.platform != "linux", reason="Linux (glibc) only")
@pytest.mark.parametrize("switch", [None, "0", "1"])
def test_the_command_reexecutes_itself_with_its_host_memory_only_when_asked(switch):
    from jaxscale.cpu import APPLIED, SWITCH, block_cache_library

    code = ("import sys; from jaxscale.cpu import reexec_with_host_memory; "
            "reexec_with_host_memory([sys.executable, '-c', 'import os; "
            "print(os.environ.get(\"GLIBC_TUNABLES\"), os.environ.get(\"LD_PRELOAD\"))']); "
            "print('parent')")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", SWITCH, APPLIED)}
    if switch is not None:
        env[SWITCH] = switch
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env).stdout.strip()
    if switch != "1":
        assert out == "parent"
    else:
        lib = block_cache_library()
        assert out == f"glibc.malloc.hugetlb=1 {lib}"
