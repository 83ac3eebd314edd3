"""Hugging Face interop: import/export of Llama and GPT-2 against `transformers` (test-only).

The reference models are small, randomly initialised `transformers` models saved to a temporary
directory (nothing is downloaded). Logits must agree within 1e-4 in float32.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import devices_or_skip  # noqa: E402

from jaxscale.checkpoint import Checkpointer  # noqa: E402
from jaxscale.config import base_config  # noqa: E402
from jaxscale.hf import checkpoint_config, convert, export_hf, import_hf, safetensors  # noqa: E402
from jaxscale.infer.generate import Generator  # noqa: E402
from jaxscale.mesh import mesh_from_config  # noqa: E402
from jaxscale.models import abstract_model  # noqa: E402

VOCAB, SEQ = 96, 24
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))


def llama(tied: bool, rope_scaling: dict | None = None):
    torch.manual_seed(1 + tied)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_theta=500000.0,
        **({"rope_scaling": rope_scaling} if rope_scaling else {}))
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial biases and norms, so their mapping is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


MODELS = {
    "llama_untied": lambda: llama(False),
    "llama_tied_rope_llama3": lambda: llama(True, {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "gpt2": gpt2,
}


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens)).logits.float().numpy()


def word_tokenizer(path) -> None:
    """A word-level tokenizer.json of VOCAB ids over the embedded corpus's commonest words."""
    import collections

    import tokenizers

    from jaxscale.data.corpus import load_documents

    words = collections.Counter(" ".join(load_documents("embedded")).split()).most_common(VOCAB - 2)
    vocab = {"<unk>": 0, "</s>": 1} | {w: i + 2 for i, (w, _) in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def save(name: str, path) -> np.ndarray:
    model = MODELS[name]().float()
    model.save_pretrained(path)
    word_tokenizer(path / "tokenizer.json")
    return torch_logits(model)


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    """(name, HF model directory, the transformers model's logits on TOKENS)."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, str(path), save(request.param, path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama")
    save("llama_untied", path)
    return str(path)


def jax_logits(checkpoint: str, **mesh) -> np.ndarray:
    config = checkpoint_config(checkpoint)
    config.mesh.update({"data": 1, **mesh})
    devices = jax.devices()[:int(np.prod([config.mesh[a] for a in ("data", "fsdp", "tensor")]))]
    generator = Generator.from_config(config, checkpoint=checkpoint,
                                      mesh=mesh_from_config(config.mesh, devices))
    return np.asarray(generator.logits(TOKENS))


def test_imported_models_match_transformers_logits_on_one_device_and_sharded(saved, tmp_path,
                                                                             monkeypatch):
    name, hf_dir, expected = saved
    config = base_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    devices_or_skip(8)
    reads = []  # every block read from the files: one device's shard, never a whole tensor

    original = convert.read_block

    def read_block(a, t, shape, index):
        block = original(a, t, shape, index)
        reads.append((t.name, block.size, int(np.prod(shape))))
        return block

    monkeypatch.setattr(convert, "read_block", read_block)
    out = import_hf(hf_dir, str(tmp_path / "ckpt"), config)  # streamed into an 8-device layout
    sharded_reads = [r for r in reads if r[1] < r[2]]
    assert sharded_reads and all(size <= whole for _, size, whole in reads)
    assert any("embed" in n or "wte" in n for n, _, _ in sharded_reads)  # fsdp x tensor: a quarter
    family = "gpt2" if name == "gpt2" else "llama"
    assert checkpoint_config(out).model.family == family
    single = jax_logits(out)
    np.testing.assert_allclose(single, expected, atol=1e-4, rtol=0)
    sharded = jax_logits(out, data=2, fsdp=2, tensor=2)
    np.testing.assert_allclose(sharded, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.05  # the logits are not trivially zero


def test_greedy_generation_with_the_kv_cache_matches_transformers_generate(saved, tmp_path):
    _, hf_dir, _ = saved
    out = import_hf(hf_dir, str(tmp_path / "ckpt"))
    generator = Generator.from_config(checkpoint_config(out), checkpoint=out,
                                      mesh=mesh_from_config(base_config().mesh, jax.devices()[:1]))
    prompts = [list(TOKENS[0, :5]), list(TOKENS[1, :9])]
    got = generator.generate(prompts, 12, stop_tokens=())
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 min_new_tokens=12, pad_token_id=0)
        assert got.row(i) == ids[0, len(prompt):].tolist()


def test_import_then_export_is_bitwise_identical(saved, tmp_path):
    _, hf_dir, _ = saved
    ckpt = import_hf(hf_dir, str(tmp_path / "ckpt"))
    mesh = base_config().mesh
    if jax.device_count() >= 8:
        mesh.update(fsdp=2, tensor=2)  # read back sharded over 8 devices (data=2)
    export_hf(ckpt, str(tmp_path / "hf"), mesh=mesh)
    before, after = safetensors.Tensors(hf_dir), safetensors.Tensors(tmp_path / "hf")
    assert before.names() == after.names()
    for name in before.names():
        a, b = before.get(name), after.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name


def random_checkpoint(path, family: str, tied: bool) -> str:
    """A jaxscale checkpoint of a random model whose every parameter (biases, norms) is non-trivial."""
    config = base_config()
    config.model.update(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                        n_kv_heads=4 if family == "gpt2" else 2, head_dim=8, d_ff=64,
                        max_seq_len=64, tie_embeddings=tied)
    shapes = abstract_model(config.model)[1]
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(shapes))))
    params = jax.tree.map(lambda s: 0.1 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
    with Checkpointer(path, async_save=False) as ckpt:
        ckpt.save(0, {"params": params}, {}, config.to_json())
    return str(path)


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("gpt2", True)])
def test_exported_models_reproduce_jaxscale_logits_in_transformers(tmp_path, family, tied):
    ckpt = random_checkpoint(tmp_path / "ckpt", family, tied)
    expected = jax_logits(ckpt)
    export_hf(ckpt, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(torch_logits(model), expected, atol=1e-4, rtol=0)


def test_export_in_bfloat16_and_in_several_shards_loads_in_transformers(tmp_path):
    ckpt = random_checkpoint(tmp_path / "ckpt", "llama", False)
    files = export_hf(ckpt, str(tmp_path / "hf"), dtype="bfloat16", max_shard_bytes=20_000)
    assert len(files) > 1
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    got = torch_logits(model)
    np.testing.assert_allclose(got, jax_logits(ckpt), atol=0.1, rtol=0)  # bfloat16 weights


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxscale.cli", *args], capture_output=True,
                          text=True, timeout=300)


def import_error(capsys, model_dir, out) -> str:
    """The stderr of a failing `jaxscale import-hf` (exit status 2, one line)."""
    from jaxscale.cli import main

    assert main(["import-hf", "--model-dir", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxscale: error: ") and err.count("\n") == 1, err
    return err


def test_import_errors_are_one_line_naming_the_problem(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert "does not exist" in import_error(capsys, tmp_path / "missing", out)
    bad = tmp_path / "bad"
    bad.mkdir()
    assert "no config.json" in import_error(capsys, bad, out)
    (bad / "config.json").write_text("{not json")
    assert "not valid JSON" in import_error(capsys, bad, out)
    (bad / "config.json").write_text(Path(llama_dir, "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"")
    assert "no *.safetensors weights" in import_error(capsys, bad, out)
    files = safetensors.Tensors(llama_dir)
    tensors = {n: np.asarray(files.get(n)) for n in files.names()}
    name = "model.layers.1.self_attn.k_proj.weight"
    safetensors.write(bad / "model.safetensors", [(n, a[:-1] if n == name else a)
                                                  for n, a in tensors.items()])
    err = import_error(capsys, bad, out)
    assert name in err and "[15, 32]" in err and "[16, 32]" in err
    safetensors.write(bad / "model.safetensors", [(n, a) for n, a in tensors.items() if n != name])
    assert f"tensor {name} is missing" in import_error(capsys, bad, out)
    extra = "model.layers.0.self_attn.q_proj.bias"
    safetensors.write(bad / "model.safetensors", [*tensors.items(), (extra, np.zeros(32, np.float32))])
    assert f"tensor {extra} in {bad} has no place in jaxscale's llama" in import_error(capsys, bad, out)
    (bad / "config.json").write_text(json.dumps({"model_type": "mistral",
                                                 "architectures": ["MistralForCausalLM"]}))
    assert "model_type='mistral' (MistralForCausalLM)" in import_error(capsys, bad, out)
    assert not out.exists()  # nothing written by a failed import


def test_fine_tuning_starts_from_the_import_with_its_tokenizer(llama_dir, tmp_path):
    out = str(tmp_path / "imported")
    r = cli("import-hf", "--model-dir", llama_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"--config configs/hf.py:{out}" in r.stdout
    run = tmp_path / "run"
    r = cli("train", "--config", f"configs/hf.py:{out}", f"--config.run_dir={run}",
            "--config.train.steps=1", "--config.optim.lr=0.0", "--config.data.seq_len=32")
    assert r.returncode == 0, r.stderr
    config = checkpoint_config(str(run / "checkpoints"))
    assert config.data.tokenizer == str(tmp_path / "imported" / "tokenizer.json")
    assert config.checkpoint.init_params_from == out
    shapes = abstract_model(config.model)[1]
    with Checkpointer(out, read_only=True) as a, Checkpointer(str(run / "checkpoints"),
                                                              read_only=True) as b:
        imported, tuned = a.restore_params(shapes), b.restore_params(shapes)
    for x, y in zip(jax.tree.leaves(imported), jax.tree.leaves(tuned), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # lr 0: still the import
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 1.0 < first["loss"] < 2 * np.log(VOCAB)
    r = cli("export-hf", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "hf"),
            "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == Path(llama_dir, "tokenizer.json").read_text()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.config.eos_token_id == 1 and exported.dtype == torch.bfloat16


def test_the_library_never_imports_torch_or_transformers(llama_dir, tmp_path):
    code = (f"import sys; from jaxscale.hf import import_hf, export_hf; "
            f"export_hf(import_hf({llama_dir!r}, {str(tmp_path / 'c')!r}), {str(tmp_path / 'h')!r}); "
            f"assert not {{'torch', 'transformers', 'safetensors'}} & set(sys.modules), sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
