"""How Hugging Face checkpoints name and lay out each jaxscale parameter, per family.

A `Tensor` says where one jaxscale parameter (of one layer, for stacked blocks) lives in a
safetensors file: its name, whether it is stored transposed (torch `Linear` keeps [out, in];
GPT-2's `Conv1D` keeps [in, out] like jaxscale), and which equal part of its last dimension it is
(GPT-2 stores q, k and v side by side in `c_attn`). Reading the HF tensor as a 2-D matrix M
(transposed when `transpose`), the jaxscale parameter is M reshaped: M's rows split into the
parameter's first `split` dimensions, its columns into the rest.
"""

from __future__ import annotations

import dataclasses

from jaxscale.errors import UserError


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str  # with "{i}" for the layer index of stacked blocks
    split: int = 1  # leading parameter dims made from the (transposed) tensor's rows
    transpose: bool = False
    part: tuple[int, int] = (0, 1)  # (k, n): the k-th of n equal parts of the last dimension


def llama_tensors(tied: bool) -> dict[str, Tensor]:
    """jaxscale `Llama` parameter path -> tensor of `LlamaForCausalLM`."""
    layer = "model.layers.{i}."
    out = {
        "embed": Tensor("model.embed_tokens.weight"),
        "blocks.attn_norm.scale": Tensor(layer + "input_layernorm.weight"),
        "blocks.attn.wq": Tensor(layer + "self_attn.q_proj.weight", transpose=True),
        "blocks.attn.wk": Tensor(layer + "self_attn.k_proj.weight", transpose=True),
        "blocks.attn.wv": Tensor(layer + "self_attn.v_proj.weight", transpose=True),
        "blocks.attn.wo": Tensor(layer + "self_attn.o_proj.weight", split=2, transpose=True),
        "blocks.mlp_norm.scale": Tensor(layer + "post_attention_layernorm.weight"),
        "blocks.mlp.w_gate": Tensor(layer + "mlp.gate_proj.weight", transpose=True),
        "blocks.mlp.w_up": Tensor(layer + "mlp.up_proj.weight", transpose=True),
        "blocks.mlp.w_down": Tensor(layer + "mlp.down_proj.weight", transpose=True),
        "final_norm.scale": Tensor("model.norm.weight"),
    }
    if not tied:
        out["lm_head"] = Tensor("lm_head.weight", transpose=True)
    return out


def gpt2_tensors(tied: bool) -> dict[str, Tensor]:
    """jaxscale `GPT2` parameter path -> tensor of `GPT2LMHeadModel`."""
    layer = "transformer.h.{i}."
    out = {"wte": Tensor("transformer.wte.weight"), "wpe": Tensor("transformer.wpe.weight")}
    for norm, hf in (("ln1", "ln_1"), ("ln2", "ln_2")):
        out[f"blocks.{norm}.scale"] = Tensor(layer + hf + ".weight")
        out[f"blocks.{norm}.bias"] = Tensor(layer + hf + ".bias")
    for k, name in enumerate("qkv"):
        out[f"blocks.attn.w{name}"] = Tensor(layer + "attn.c_attn.weight", part=(k, 3))
        out[f"blocks.attn.b{name}"] = Tensor(layer + "attn.c_attn.bias", split=2, part=(k, 3))
    out |= {
        "blocks.attn.wo": Tensor(layer + "attn.c_proj.weight", split=2),
        "blocks.attn.bo": Tensor(layer + "attn.c_proj.bias"),
        "blocks.mlp.w_fc": Tensor(layer + "mlp.c_fc.weight"),
        "blocks.mlp.b_fc": Tensor(layer + "mlp.c_fc.bias"),
        "blocks.mlp.w_proj": Tensor(layer + "mlp.c_proj.weight"),
        "blocks.mlp.b_proj": Tensor(layer + "mlp.c_proj.bias"),
        "ln_f.scale": Tensor("transformer.ln_f.weight"),
        "ln_f.bias": Tensor("transformer.ln_f.bias"),
    }
    if not tied:
        out["lm_head"] = Tensor("lm_head.weight", transpose=True)
    return out


# Buffers some checkpoints carry that hold no parameters (causal masks, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def tensors(family: str, tied: bool) -> dict[str, Tensor]:
    if family == "llama":
        return llama_tensors(tied)
    if family == "gpt2":
        return gpt2_tensors(tied)
    raise UserError(f"Hugging Face interop covers model.family llama and gpt2, not {family!r}")


def model_config(hf: dict) -> dict:
    """jaxscale `model` fields from a Hugging Face `config.json`; `UserError` (or
    `NotImplementedError`) naming what is not supported."""
    kind = hf.get("model_type")
    if kind == "llama":
        return _llama_config(hf)
    if kind == "gpt2":
        return _gpt2_config(hf)
    arch = ", ".join(hf.get("architectures") or []) or "unknown"
    raise UserError(f"config.json has model_type={kind!r} ({arch}); import-hf supports llama "
                    f"(LlamaForCausalLM) and gpt2 (GPT2LMHeadModel)")


def _require(hf: dict, key: str, allowed: tuple, what: str) -> None:
    if hf.get(key, allowed[0]) not in allowed:
        raise NotImplementedError(f"{what}: config.json has {key}={hf[key]!r} (jaxscale supports "
                                  f"{', '.join(map(repr, allowed))})")


def _llama_config(hf: dict) -> dict:
    _require(hf, "hidden_act", ("silu",), "Llama activation")
    _require(hf, "attention_bias", (False,), "Llama attention biases")
    _require(hf, "mlp_bias", (False,), "Llama MLP biases")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise NotImplementedError(f"RoPE scaling {kind!r} (jaxscale supports none and llama3)")
    heads = hf["num_attention_heads"]
    out = dict(family="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
               n_layers=hf["num_hidden_layers"], n_heads=heads,
               n_kv_heads=hf.get("num_key_value_heads") or heads,
               head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
               d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
               rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_scaling="none")
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return out


def _gpt2_config(hf: dict) -> dict:
    _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "GPT-2 activation")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        _require(hf, key, (False,), "GPT-2 option")
    _require(hf, "scale_attn_weights", (True,), "GPT-2 option")
    d, heads = hf["n_embd"], hf["n_head"]
    return dict(family="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
                n_heads=heads, n_kv_heads=heads, head_dim=d // heads,
                d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def hf_config(m, dtype: str, eos_id: int | None = None) -> dict:
    """A Hugging Face `config.json` for the jaxscale `model` section `m`."""
    common = {"vocab_size": m.vocab_size, "tie_word_embeddings": bool(m.tie_embeddings),
              "torch_dtype": dtype, "dtype": dtype}
    if eos_id is not None:
        common |= {"eos_token_id": eos_id, "bos_token_id": eos_id}
    if m.family == "gpt2":
        if m.n_heads * m.head_dim != m.d_model:
            raise UserError(f"GPT-2 needs n_heads x head_dim = d_model; this model has "
                            f"{m.n_heads} x {m.head_dim} != {m.d_model}")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": m.d_model,
                "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.d_ff,
                "n_positions": m.max_seq_len, "layer_norm_epsilon": m.norm_eps,
                "activation_function": "gelu_new", "scale_attn_weights": True,
                "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, **common}
    rope: dict = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope |= {"rope_type": "llama3", "factor": m.rope_factor,
                 "low_freq_factor": m.rope_low_freq_factor,
                 "high_freq_factor": m.rope_high_freq_factor,
                 "original_max_position_embeddings": m.rope_original_max_seq_len}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": m.d_model,
            "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
            "intermediate_size": m.d_ff, "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "rope_theta": m.rope_theta, "rope_parameters": rope,
            "rope_scaling": None if rope["rope_type"] == "default" else {**rope, "type": "llama3"},
            **common}
