"""Hugging Face interop: import/export of Llama, GPT-2, Mixtral and Qwen3-MoE against
`transformers` (test-only).

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
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import devices_or_skip  # noqa: E402

from jaxscale.checkpoint import Checkpointer  # noqa: E402
from jaxscale.config import base_config  # noqa: E402
from jaxscale.errors import UserError  # noqa: E402
from jaxscale.hf import (  # noqa: E402
    checkpoint_config,
    convert,
    export_hf,
    import_config,
    import_hf,
    load_hf_params,
    mapping,
    safetensors,
)
from jaxscale.infer.generate import Generator  # noqa: E402
from jaxscale.mesh import mesh_from_config  # noqa: E402
from jaxscale.models import abstract_model, param_count  # noqa: E402
from jaxscale.models.moe import RouterBias  # noqa: E402
from jaxscale.train.trainer import build_trainer  # noqa: E402

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


def mixtral_config(**settings):
    return transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, **settings)


def qwen3_moe_config(**settings):
    return transformers.Qwen3MoeConfig(**{
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 64, "num_experts": 8, "num_experts_per_tok": 2,
        **settings})  # head_dim != hidden_size / heads, as in Qwen3-30B-A3B


def routed(config, seed: int):
    """The MoE model of `config` with random norms (q/k norms included, so that their mapping
    matters) and routers 25 times the initial scale, so that no token's choice of experts is
    a near-tie that rounding could flip."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(25.0)
    return model


MODELS = {
    "llama_untied": lambda: llama(False),
    "llama_tied_rope_llama3": lambda: llama(True, {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "gpt2": gpt2,
    "mixtral": lambda: routed(mixtral_config(), 4),
    "qwen3_moe": lambda: routed(qwen3_moe_config(norm_topk_prob=True, tie_word_embeddings=True), 5),
    # MoE in layers 2 and 4 of 5 (top k not renormalised): model.moe.first_dense=1, every=2
    "qwen3_moe_dense_layers": lambda: routed(qwen3_moe_config(num_hidden_layers=5,
                                                              mlp_only_layers=[0, 1, 3]), 6),
}
MOE = ("mixtral", "qwen3_moe", "qwen3_moe_dense_layers")
EP = dict(expert=4, data=2)  # the MoE models' 8-device mesh: 8 (or 4) experts over 4 devices


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


def save(name: str, path) -> tuple[np.ndarray, int]:
    """Save model `name` in `path`; its logits on TOKENS and its number of parameters."""
    model = MODELS[name]().float()
    model.save_pretrained(path)
    word_tokenizer(path / "tokenizer.json")
    return torch_logits(model), sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    """(name, HF model directory, the transformers model's logits on TOKENS, its parameters)."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, str(path), *save(request.param, path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama")
    save("llama_untied", path)
    return str(path)


def jax_logits(checkpoint: str, **mesh) -> np.ndarray:
    config = checkpoint_config(checkpoint)
    config.mesh.update({"data": 1, **mesh})
    devices = jax.devices()[:int(np.prod([config.mesh[a] for a in ("data", "fsdp", "tensor",
                                                                    "expert")]))]
    generator = Generator.from_config(config, checkpoint=checkpoint,
                                      mesh=mesh_from_config(config.mesh, devices))
    return np.asarray(generator.logits(TOKENS))


def test_imported_models_match_transformers_logits_on_one_device_and_sharded(saved, tmp_path,
                                                                             monkeypatch):
    name, hf_dir, expected, n_params = saved
    mesh = EP if name in MOE else dict(data=2, fsdp=2, tensor=2)
    config = base_config()
    config.mesh.update(mesh)
    devices_or_skip(8)
    reads = []  # every block read from the files: one device's shard, never a whole tensor
    names = []  # the tensors each device's shard is read from

    original, get = convert.read_block, safetensors.Tensors.get

    def read_block(a, t, shape, index):
        block = original(a, t, shape, index)
        reads.append((t.name, block.size, int(np.prod(shape))))
        return block

    monkeypatch.setattr(convert, "read_block", read_block)
    monkeypatch.setattr(safetensors.Tensors, "get", lambda files, n: names.append(n) or get(files, n))
    out = import_hf(hf_dir, str(tmp_path / "ckpt"), config)  # streamed into an 8-device layout
    assert all(size <= whole for _, size, whole in reads)
    if name in MOE:  # each expert's tensors read by the data=2 devices holding it, not all 8
        experts = [n for n in names if ".experts." in n]
        assert experts and set(np.unique(experts, return_counts=True)[1]) == {2}
    else:
        sharded_reads = [r for r in reads if r[1] < r[2]]
        assert any("embed" in n or "wte" in n for n, _, _ in sharded_reads)  # fsdp x tensor: 1/4
    model = checkpoint_config(out).model
    assert model.family == ("gpt2" if name == "gpt2" else "llama")
    assert param_count(model) == n_params
    single = jax_logits(out)
    np.testing.assert_allclose(single, expected, atol=1e-4, rtol=0)
    sharded = jax_logits(out, **mesh)
    np.testing.assert_allclose(sharded, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.05  # the logits are not trivially zero


@pytest.mark.parametrize("saved", ["qwen3_moe_dense_layers"], indirect=True)
def test_imported_moe_loss_under_expert_parallelism_matches_transformers(saved):
    """The training loss on an expert=4 x data=2 mesh (tokens to the experts by all-to-all),
    parameters streamed from the HF files into the trainer's layout."""
    _, hf_dir, _, _ = saved
    config = import_config(hf_dir)
    config.model.moe.update(aux_coef=0.0, z_coef=0.0)  # cross-entropy alone, as transformers'
    config.mesh.update(EP)
    config.train.global_batch_size, config.data.seq_len = 8, SEQ - 1
    trainer = build_trainer(config, mesh_from_config(config.mesh, devices_or_skip(8)))
    params = load_hf_params(hf_dir, config, trainer.layout)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (8, SEQ)).astype(np.int32)
    ones = np.ones((8, SEQ - 1), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
             "positions": np.cumsum(ones, axis=1) - 1, "loss_mask": ones.astype(np.float32)}
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    logits = torch.tensor(torch_logits(model, tokens[:, :-1]))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                 torch.tensor(tokens[:, 1:]).long().reshape(-1))
    np.testing.assert_allclose(float(trainer.loss(params, batch)), float(expected), rtol=1e-5)


# the MoE decoding path once (qwen3_moe: experts, q/k norms); none for MoE models with dense layers
KV_CACHE = [n for n in MODELS if n not in ("mixtral", "qwen3_moe_dense_layers")]


@pytest.mark.parametrize("saved", KV_CACHE, indirect=True)
def test_greedy_generation_with_the_kv_cache_matches_transformers_generate(saved, tmp_path):
    _, hf_dir, _, _ = saved
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
    name, hf_dir, _, _ = saved
    ckpt = import_hf(hf_dir, str(tmp_path / "ckpt"))
    mesh = base_config().mesh
    if jax.device_count() >= 8:  # read back sharded over 8 devices
        mesh.update(EP if name in MOE else dict(data=2, fsdp=2, tensor=2))
    export_hf(ckpt, str(tmp_path / "hf"), mesh=mesh)
    before, after = safetensors.Tensors(hf_dir), safetensors.Tensors(tmp_path / "hf")
    assert before.names() == after.names()
    for name in before.names():
        a, b = before.get(name), after.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name


def random_checkpoint(path, router_bias: float = 0.0, **model) -> str:
    """A jaxscale checkpoint of a random model (`model` settings over a small Llama) whose every
    parameter (biases, norms) is non-trivial; an MoE router's balancing bias is `router_bias`."""
    config = base_config()
    config.model.update(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=8, d_ff=64, max_seq_len=64)
    config.model.update(model)
    rng = np.random.default_rng(7)

    def value(v):
        if isinstance(v, RouterBias):
            return v.replace(np.full(v.shape, router_bias, v.dtype))
        return v.replace((0.1 * rng.standard_normal(v.shape)).astype(v.dtype))

    params = jax.tree.map(value, abstract_model(config.model)[1],
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    with Checkpointer(path, async_save=False) as ckpt:
        ckpt.save(0, {"params": params}, {}, config.to_json())
    return str(path)


EXPORTED = {  # model settings -> the HF model_type they export as
    "llama": ({}, "llama"),
    "llama_tied": (dict(tie_embeddings=True), "llama"),
    "gpt2": (dict(family="gpt2", n_kv_heads=4, tie_embeddings=True), "gpt2"),
    "mixtral": (dict(moe=dict(n_experts=4, d_ff=32)), "mixtral"),
    "qwen3_moe_dense_layers": (dict(n_layers=3, head_dim=16, qk_norm=True, moe=dict(  # MoE: layer 2
        n_experts=8, d_ff=32, first_dense=1, every=2, normalize_top_k=False)), "qwen3_moe"),
}


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_models_reproduce_jaxscale_logits_in_transformers(tmp_path, name):
    settings, model_type = EXPORTED[name]
    ckpt = random_checkpoint(tmp_path / "ckpt", **settings)
    expected = jax_logits(ckpt)
    export_hf(ckpt, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.model_type == model_type
    np.testing.assert_allclose(torch_logits(model), expected, atol=1e-4, rtol=0)


def test_export_in_bfloat16_and_in_several_shards_loads_in_transformers(tmp_path):
    ckpt = random_checkpoint(tmp_path / "ckpt")
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
    assert err.startswith(("jaxscale: error: ", "jaxscale: not implemented: ")), err
    assert err.count("\n") == 1, err
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


def test_moe_configs_jaxscale_cannot_run_are_one_line_errors(tmp_path, capsys):
    out, bad = tmp_path / "out", tmp_path / "bad"
    bad.mkdir()
    for config, expected in [
        (mixtral_config(sliding_window=16), "sliding_window=16 < max_position_embeddings=64"),
        (mixtral_config(router_jitter_noise=0.1), "Mixtral router jitter"),
        (mixtral_config(hidden_act="gelu"), "Mixtral activation: config.json has hidden_act='gelu'"),
        (qwen3_moe_config(use_sliding_window=True, sliding_window=16), "sliding_window=16"),
        (qwen3_moe_config(num_hidden_layers=3, decoder_sparse_step=2),
         "decoder_sparse_step=2 and mlp_only_layers=[] make layers [1] of 3 MoE"),
    ]:
        config.to_json_file(bad / "config.json")
        assert expected in import_error(capsys, bad, out)
    assert not out.exists()
    config = mixtral_config(sliding_window=64)  # a window as long as any sequence: no effect
    config.to_json_file(bad / "config.json")
    assert import_config(str(bad)).model.moe.n_experts == 4


def test_qwen3_moe_layer_patterns_map_to_first_dense_and_every():
    patterns = {  # (layers, decoder_sparse_step, mlp_only_layers) -> (first_dense, every)
        (4, 1, ()): (0, 1), (4, 2, ()): (0, 2), (6, 3, ()): (0, 3), (4, 1, (0,)): (1, 1),
        (5, 1, (0, 1, 3)): (1, 2), (6, 2, (1,)): (2, 2), (3, 1, (0, 1)): (2, 1),
        (3, 2, ()): None, (4, 1, (1,)): None, (4, 1, (0, 1, 2, 3)): None}
    for (layers, step, dense), expected in patterns.items():
        hf = qwen3_moe_config(num_hidden_layers=layers, decoder_sparse_step=step,
                              mlp_only_layers=list(dense)).to_dict()
        if expected is None:
            with pytest.raises(NotImplementedError, match="Qwen3-MoE layer pattern"):
                mapping.model_config(hf)
        else:
            moe = mapping.model_config(hf)["moe"]
            assert (moe["first_dense"], moe["every"]) == expected, (layers, step, dense)


def test_export_of_what_hf_cannot_hold_is_an_error_naming_the_setting(tmp_path):
    for settings, expected in [
        (dict(qk_norm=True), "dense Llama with model.qk_norm=True"),
        (dict(moe=dict(n_experts=4, d_ff=32, router="sigmoid")), "model.moe.router='sigmoid'"),
        (dict(moe=dict(n_experts=4, d_ff=32, shared_d_ff=32)), "model.moe.shared_d_ff=32"),
        (dict(n_layers=4, moe=dict(n_experts=4, d_ff=32, every=2)), "model.moe.every=2"),
        (dict(moe=dict(n_experts=4, d_ff=32, normalize_top_k=False)), "normalize_top_k=False"),
    ]:
        config = base_config()
        config.model.update(settings)
        with pytest.raises(NotImplementedError, match=expected):
            mapping.hf_config(config.model, "float32")
    ckpt = random_checkpoint(tmp_path / "ckpt", router_bias=0.5, moe=dict(n_experts=4, d_ff=32))
    with pytest.raises(UserError, match="blocks.mlp.bias .* is nonzero: MixtralForCausalLM has no"):
        export_hf(ckpt, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


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
