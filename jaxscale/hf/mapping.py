"""How Hugging Face checkpoints name and lay out each jaxscale parameter, per architecture.

A `Tensor` says where one jaxscale parameter lives in a safetensors file: its name, whether it is
stored transposed (torch `Linear` keeps [out, in]; GPT-2's `Conv1D` keeps [in, out] like
jaxscale), and which equal part of its last dimension it is (GPT-2 stores q, k and v side by side
in `c_attn`). A parameter's leading *stacked* axes each pick a different tensor: its layer axes
(`strides`; a stack of blocks, or of `MoEGroup`s and their dense blocks) give the HF layer "{i}",
and for an MoE layer's experts (a name with "{e}") the next axis gives the expert. One such
tensor, read as a 2-D matrix M (transposed when `transpose`), is the parameter's slice at that
index reshaped: M's rows split into the slice's first `split` dimensions, its columns into the rest.
"""

from __future__ import annotations

import dataclasses

from jaxscale.errors import UserError


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str  # with "{i}" for the HF layer of stacked blocks and "{e}" for the expert
    split: int = 1  # leading dims of one tensor's slice made from the (transposed) tensor's rows
    transpose: bool = False
    part: tuple[int, int] = (0, 1)  # (k, n): the k-th of n equal parts of the last dimension
    first: int = 0  # the HF layer of a stack's first block
    strides: tuple[int, ...] = ()  # per layer axis of the stack: HF layers from one block to the next

    @property
    def stacked(self) -> int:
        """How many leading axes of the parameter pick the tensor: its layer axes, then the expert."""
        return len(self.strides) + ("{e}" in self.name)

    def layer(self, index: tuple[int, ...]) -> int | None:
        """The HF layer of the parameter's slice at `index` (of its stacked axes); None unstacked."""
        if not self.strides:
            return None
        return self.first + sum(j * s for j, s in zip(index, self.strides, strict=False))

    def at(self, index: tuple[int, ...]) -> str:
        """The name of the tensor holding the parameter's slice at `index` (of its stacked axes)."""
        expert = index[len(self.strides)] if "{e}" in self.name else None
        return self.name.format(i=self.layer(index), e=expert)


# Tensors of one Llama-style decoder layer of each architecture (under "model.layers.{i}."):
# jaxscale path inside a block -> (HF name, split, transpose).
ATTENTION = {
    "attn_norm.scale": ("input_layernorm.weight", 1, False),
    "attn.wq": ("self_attn.q_proj.weight", 1, True),
    "attn.wk": ("self_attn.k_proj.weight", 1, True),
    "attn.wv": ("self_attn.v_proj.weight", 1, True),
    "attn.wo": ("self_attn.o_proj.weight", 2, True),
    "mlp_norm.scale": ("post_attention_layernorm.weight", 1, False),
}
QK_NORM = {"attn.q_norm.scale": ("self_attn.q_norm.weight", 1, False),
           "attn.k_norm.scale": ("self_attn.k_norm.weight", 1, False)}
DENSE_MLP = {"mlp.w_gate": ("mlp.gate_proj.weight", 1, True),
             "mlp.w_up": ("mlp.up_proj.weight", 1, True),
             "mlp.w_down": ("mlp.down_proj.weight", 1, True)}
MOE_MLP = {  # the router's balancing bias (`RouterBias`) is state no HF checkpoint has
    "mixtral": {"mlp.router": ("block_sparse_moe.gate.weight", 1, True),
                "mlp.experts.w_gate": ("block_sparse_moe.experts.{e}.w1.weight", 1, True),
                "mlp.experts.w_up": ("block_sparse_moe.experts.{e}.w3.weight", 1, True),
                "mlp.experts.w_down": ("block_sparse_moe.experts.{e}.w2.weight", 1, True)},
    "qwen3_moe": {"mlp.router": ("mlp.gate.weight", 1, True),
                  "mlp.experts.w_gate": ("mlp.experts.{e}.gate_proj.weight", 1, True),
                  "mlp.experts.w_up": ("mlp.experts.{e}.up_proj.weight", 1, True),
                  "mlp.experts.w_down": ("mlp.experts.{e}.down_proj.weight", 1, True)},
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "gpt2": "GPT2LMHeadModel"}


def architecture(m) -> str:
    """The HF `model_type` a jaxscale `model` section exports as: llama, gpt2, or for an MoE
    Llama mixtral (no q/k norms) or qwen3_moe (with them); `NotImplementedError` naming what
    none of them has."""
    if m.family == "gpt2":
        return "gpt2"
    if m.family != "llama":
        raise UserError(f"Hugging Face interop covers model.family llama and gpt2, not {m.family!r}")
    moe = m.moe
    if not moe.n_experts:
        if m.qk_norm:
            raise NotImplementedError("export of a dense Llama with model.qk_norm=True (Qwen3): "
                                      "LlamaForCausalLM has no q/k norms")
        return "llama"
    kind = "qwen3_moe" if m.qk_norm else "mixtral"
    unsupported = [f"model.moe.{key}={moe[key]!r}" for key, ok in (
        ("router", "softmax"), ("route_scale", 1.0), ("shared_d_ff", 0)) if moe[key] != ok]
    if kind == "mixtral":
        unsupported += [f"model.moe.{key}={moe[key]!r}" for key, ok in (
            ("normalize_top_k", True), ("first_dense", 0), ("every", 1)) if moe[key] != ok]
    if unsupported:
        raise NotImplementedError(
            f"export of {', '.join(unsupported)}: an MoE Llama exports as Mixtral (without "
            f"model.qk_norm) or Qwen3-MoE (with it), softmax routers without shared experts "
            f"(Mixtral also renormalises the top k and has MoE in every layer)")
    return kind


def _stacks(m) -> dict[str, tuple[bool, int, tuple[int, ...]]]:
    """Path prefix of each stack of decoder blocks -> (MoE blocks, HF layer of the first, strides)."""
    moe = m.moe
    if not moe.n_experts:
        return {"blocks.": (False, 0, (1,))}
    dense, every = moe.first_dense, moe.every
    out = {"first_blocks.": (False, 0, (1,))} if dense else {}
    if every == 1:
        return out | {"blocks.": (True, dense, (1,))}
    return out | {"blocks.dense.": (False, dense, (every, 1)),
                  "blocks.moe.": (True, dense + every - 1, (every,))}


def llama_tensors(m) -> dict[str, Tensor]:
    """jaxscale `Llama` parameter path -> tensor of its HF architecture (`architecture`)."""
    kind = architecture(m)
    out = {"embed": Tensor("model.embed_tokens.weight")}
    for prefix, (moe, first, strides) in _stacks(m).items():
        block = ATTENTION | (QK_NORM if m.qk_norm else {}) | (MOE_MLP[kind] if moe else DENSE_MLP)
        for path, (name, split, transpose) in block.items():
            out[prefix + path] = Tensor("model.layers.{i}." + name, split, transpose, first=first,
                                        strides=strides)
    out["final_norm.scale"] = Tensor("model.norm.weight")
    if not m.tie_embeddings:
        out["lm_head"] = Tensor("lm_head.weight", transpose=True)
    return out


def gpt2_tensors(tied: bool) -> dict[str, Tensor]:
    """jaxscale `GPT2` parameter path -> tensor of `GPT2LMHeadModel`."""
    layer = "transformer.h.{i}."

    def block(name: str, split: int = 1, part: tuple[int, int] = (0, 1)) -> Tensor:
        return Tensor(layer + name, split, part=part, strides=(1,))

    out = {"wte": Tensor("transformer.wte.weight"), "wpe": Tensor("transformer.wpe.weight")}
    for norm, hf in (("ln1", "ln_1"), ("ln2", "ln_2")):
        out[f"blocks.{norm}.scale"] = block(hf + ".weight")
        out[f"blocks.{norm}.bias"] = block(hf + ".bias")
    for k, name in enumerate("qkv"):
        out[f"blocks.attn.w{name}"] = block("attn.c_attn.weight", part=(k, 3))
        out[f"blocks.attn.b{name}"] = block("attn.c_attn.bias", split=2, part=(k, 3))
    out |= {
        "blocks.attn.wo": block("attn.c_proj.weight", split=2),
        "blocks.attn.bo": block("attn.c_proj.bias"),
        "blocks.mlp.w_fc": block("mlp.c_fc.weight"),
        "blocks.mlp.b_fc": block("mlp.c_fc.bias"),
        "blocks.mlp.w_proj": block("mlp.c_proj.weight"),
        "blocks.mlp.b_proj": block("mlp.c_proj.bias"),
        "ln_f.scale": Tensor("transformer.ln_f.weight"),
        "ln_f.bias": Tensor("transformer.ln_f.bias"),
    }
    if not tied:
        out["lm_head"] = Tensor("lm_head.weight", transpose=True)
    return out


# Buffers some checkpoints carry that hold no parameters (causal masks, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def tensors(m) -> dict[str, Tensor]:
    """Parameter path -> tensor, for the jaxscale `model` section `m`."""
    return gpt2_tensors(m.tie_embeddings) if m.family == "gpt2" else llama_tensors(m)


def model_config(hf: dict) -> dict:
    """jaxscale `model` fields from a Hugging Face `config.json`; `UserError` (or
    `NotImplementedError`) naming what is not supported."""
    kind = hf.get("model_type")
    if kind == "llama":
        return _llama_config(hf)
    if kind == "mixtral":
        return _mixtral_config(hf)
    if kind == "qwen3_moe":
        return _qwen3_moe_config(hf)
    if kind == "gpt2":
        return _gpt2_config(hf)
    arch = ", ".join(hf.get("architectures") or []) or "unknown"
    supported = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
    raise UserError(f"config.json has model_type={kind!r} ({arch}); import-hf supports {supported}")


def _require(hf: dict, key: str, allowed: tuple, what: str) -> None:
    if hf.get(key, allowed[0]) not in allowed:
        raise NotImplementedError(f"{what}: config.json has {key}={hf[key]!r} (jaxscale supports "
                                  f"{', '.join(map(repr, allowed))})")


def _first(hf: dict, *keys: str):
    """The value of the first of `keys` that config.json has (transformers renames some)."""
    return next((hf[k] for k in keys if hf.get(k) is not None), None)


def _decoder_config(hf: dict, what: str) -> dict:
    """The fields a Llama-style config.json shares: sizes, attention, RoPE, norms."""
    _require(hf, "hidden_act", ("silu",), f"{what} activation")
    _require(hf, "attention_bias", (False,), f"{what} attention biases")
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
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_scaling="none",
               qk_norm=False, moe={"n_experts": 0})
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return out


def _no_sliding_window(hf: dict, window: int | None, what: str) -> None:
    """A window shorter than the longest sequence changes attention, which jaxscale's does not."""
    if window is not None and window < hf["max_position_embeddings"]:
        raise NotImplementedError(f"{what} sliding-window attention: config.json has "
                                  f"sliding_window={window} < max_position_embeddings="
                                  f"{hf['max_position_embeddings']} (jaxscale attends to the whole "
                                  f"sequence)")


def _moe(hf: dict, d_ff_key: str, experts: int | None, normalize: bool) -> dict:
    """The `model.moe` fields of a softmax-routed MoE config.json (no shared experts)."""
    if not experts:
        raise NotImplementedError("config.json has no experts (num_experts=0): a dense model")
    out = dict(n_experts=experts, top_k=hf["num_experts_per_tok"], d_ff=hf[d_ff_key],
               shared_d_ff=0, first_dense=0, every=1, router="softmax",
               normalize_top_k=normalize, route_scale=1.0, dispatch="dropless")
    if hf.get("router_aux_loss_coef") is not None:
        out["aux_coef"] = float(hf["router_aux_loss_coef"])
    return out


def _llama_config(hf: dict) -> dict:
    _require(hf, "mlp_bias", (False,), "Llama MLP biases")
    return _decoder_config(hf, "Llama")


def _mixtral_config(hf: dict) -> dict:
    _require(hf, "router_jitter_noise", (0.0,), "Mixtral router jitter")
    _no_sliding_window(hf, hf.get("sliding_window"), "Mixtral")
    experts = _first(hf, "num_local_experts", "num_experts")
    return _decoder_config(hf, "Mixtral") | {"moe": _moe(hf, "intermediate_size", experts, True)}


def _qwen3_moe_config(hf: dict) -> dict:
    _no_sliding_window(hf, hf.get("sliding_window") if hf.get("use_sliding_window") else None,
                       "Qwen3-MoE")
    out = _decoder_config(hf, "Qwen3-MoE") | {"qk_norm": True}
    experts = _first(hf, "num_experts", "num_local_experts")
    moe = _moe(hf, "moe_intermediate_size", experts, bool(hf.get("norm_topk_prob", False)))
    return out | {"moe": moe | _moe_layers(hf, out["n_layers"])}


def _moe_layers(hf: dict, n_layers: int) -> dict:
    """`first_dense` and `every` placing the MoE layers where Qwen3-MoE's `decoder_sparse_step`
    and `mlp_only_layers` do: layer i is MoE iff i is not in `mlp_only_layers` and
    (i + 1) % step == 0; jaxscale's are layers first_dense + every - 1 + k * every."""
    step, dense = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    moe = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    every = moe[1] - moe[0] if len(moe) > 1 else 1
    first = moe[0] - every + 1 if moe else -1
    if first < 0 or moe != list(range(first + every - 1, n_layers, every)):
        raise NotImplementedError(
            f"Qwen3-MoE layer pattern: decoder_sparse_step={step} and mlp_only_layers="
            f"{sorted(dense)} make layers {moe} of {n_layers} MoE; jaxscale's MoE layers are "
            f"every model.moe.every-th after the first model.moe.first_dense, ending with the last")
    return dict(first_dense=first, every=every)


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
    kind = architecture(m)
    common = {"architectures": [ARCHITECTURES[kind]], "model_type": kind,
              "vocab_size": m.vocab_size, "tie_word_embeddings": bool(m.tie_embeddings),
              "torch_dtype": dtype, "dtype": dtype}
    if eos_id is not None:
        common |= {"eos_token_id": eos_id, "bos_token_id": eos_id}
    if kind == "gpt2":
        if m.n_heads * m.head_dim != m.d_model:
            raise UserError(f"GPT-2 needs n_heads x head_dim = d_model; this model has "
                            f"{m.n_heads} x {m.head_dim} != {m.d_model}")
        return {"n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.d_ff,
                "n_positions": m.max_seq_len, "layer_norm_epsilon": m.norm_eps,
                "activation_function": "gelu_new", "scale_attn_weights": True,
                "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, **common}
    rope: dict = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope |= {"rope_type": "llama3", "factor": m.rope_factor,
                 "low_freq_factor": m.rope_low_freq_factor,
                 "high_freq_factor": m.rope_high_freq_factor,
                 "original_max_position_embeddings": m.rope_original_max_seq_len}
    out = {"hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
           "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
           "head_dim": m.head_dim, "intermediate_size": m.d_ff,
           "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
           "hidden_act": "silu", "attention_bias": False, "rope_theta": m.rope_theta,
           "rope_parameters": rope,
           "rope_scaling": None if rope["rope_type"] == "default" else {**rope, "type": "llama3"},
           **common}
    moe = m.moe
    routing = {"num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_coef,
               "sliding_window": None}
    if kind == "mixtral":
        return out | routing | {"num_local_experts": moe.n_experts, "intermediate_size": moe.d_ff,
                                "router_jitter_noise": 0.0}
    if kind == "qwen3_moe":
        moe_layers = range(moe.first_dense + moe.every - 1, m.n_layers, moe.every)
        return out | routing | {"num_experts": moe.n_experts, "moe_intermediate_size": moe.d_ff,
                                "norm_topk_prob": bool(moe.normalize_top_k),
                                "use_sliding_window": False, "decoder_sparse_step": 1,
                                "mlp_only_layers": sorted(set(range(m.n_layers)) - set(moe_layers))}
    return out | {"mlp_bias": False}
