"""The base config: every key a run may set, with the tiny default that trains in minutes on a CPU.

Experiment files in `configs/` start from `base_config()` and change a few fields; a key that is not
here is a mistake and `validate` says so before anything runs. They are loaded by path, not imported
as a package, so they share `configs/presets.py` through `load_module`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import types
from pathlib import Path

import ml_collections

from jaxscale.errors import UserError


def base_config() -> ml_collections.ConfigDict:
    """Return the complete default config (a tiny Llama on the embedded corpus)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.run_dir = "runs/default"

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 512  # byte tokenizer (257 ids) padded so every mesh axis divides it
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.n_kv_heads = 4
    c.model.head_dim = 16
    c.model.d_ff = 384
    c.model.max_seq_len = 128
    c.model.rope_theta = 10000.0
    c.model.rope_scaling = "none"  # none | llama3 (Llama 3.1's long-context scaling, below)
    c.model.rope_factor = 8.0
    c.model.rope_low_freq_factor = 1.0
    c.model.rope_high_freq_factor = 4.0
    c.model.rope_original_max_seq_len = 8192
    c.model.norm_eps = 1e-5
    c.model.qk_norm = False  # RMSNorm of each head's queries and keys before RoPE (Qwen3)
    c.model.tie_embeddings = False
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = "none"  # none | full | save_dots | save:<name>,<name> (names: see models/llama.py)
    c.model.loss_chunk = 0  # > 0: fused output layer + cross-entropy, this many tokens at a time
    c.model.logits_dtype = "float32"  # bfloat16: the output layer writes bf16 logits (loss math f32)
    c.model.scan_layers = True  # False: unroll the layers (longer compile; faster on XLA:CPU)
    c.model.attention = "dot_product"  # jax.nn.dot_product_attention; "einsum" (faster on XLA:CPU);
    # "cudnn" (cuDNN flash attention: NVIDIA GPUs, bfloat16); "splash" (Pallas splash attention:
    # TPUs, data.seq_len a multiple of 128)
    c.model.max_documents = 8  # cudnn on Hopper+: documents a packed row may hold (packed layout)
    c.model.moe = ml_collections.ConfigDict()  # mixture of experts (llama family; docs/moe.md)
    c.model.moe.n_experts = 0  # 0: dense
    c.model.moe.top_k = 2  # experts per token
    c.model.moe.d_ff = 0  # each expert's hidden size
    c.model.moe.shared_d_ff = 0  # shared experts' hidden size (DeepSeek); 0: none
    c.model.moe.first_dense = 0  # the first layers keep a dense MLP (DeepSeek-V3: 3)
    c.model.moe.every = 1  # then every N-th layer is an MoE layer (Llama 4: 2)
    c.model.moe.router = "softmax"  # softmax (Mixtral) | sigmoid (DeepSeek-V3)
    c.model.moe.normalize_top_k = True  # renormalise the chosen experts' weights to sum to 1
    c.model.moe.route_scale = 1.0  # routed experts' weights times this (DeepSeek-V3: 2.5)
    c.model.moe.bias_rate = 0.0  # aux-loss-free balancing bias step per optimizer step; 0: off
    c.model.moe.aux_coef = 0.01  # load-balancing loss weight
    c.model.moe.z_coef = 0.001  # router z-loss weight
    c.model.moe.dispatch = "dropless"  # dropless | capacity (static slots; overflow dropped)
    c.model.moe.capacity_factor = 1.25  # capacity: slots per expert = factor x seq x top_k / experts
    c.model.lora = ml_collections.ConfigDict()  # low-rank adapters on a frozen base (docs/lora.md)
    c.model.lora.rank = 0  # 0: off; > 0: W x + alpha/rank B(A x) on the projections `targets` names
    c.model.lora.alpha = 16.0
    c.model.lora.targets = "wq,wk,wv,wo"  # projection names or regexes over their paths (blocks.attn.wq)
    c.model.lora.base_quant = "none"  # QLoRA: the frozen base stored as none | int8 | int4
    c.model.lora.group_size = 128  # int4: inputs per scale (as infer.group_size)
    c.model.family = "llama"  # llama | gpt2 | early_fusion | cross_attention | clip (docs/multimodal.md)

    c.model.vision = ml_collections.ConfigDict()  # the ViT encoder of the multimodal families
    c.model.vision.image_size = 32
    c.model.vision.patch_size = 4
    c.model.vision.d_model = 64
    c.model.vision.n_layers = 2
    c.model.vision.n_heads = 4
    c.model.vision.head_dim = 16
    c.model.vision.d_ff = 256
    c.model.vision.max_frames = 1
    c.model.vision.pool = 1  # token budget: average-pool the patch grid by this factor per frame

    c.model.fusion = ml_collections.ConfigDict()
    c.model.fusion.n_latents = 16  # cross_attention: resampled visual tokens
    c.model.fusion.resampler_layers = 1
    c.model.fusion.cross_every = 1  # cross_attention: a gated cross-attention block every N layers
    c.model.fusion.embed_dim = 64  # clip: the shared embedding size
    c.model.fusion.n_answers = 15  # clip: answer classes, the scenes task's (build_data checks)
    c.model.fusion.freeze = ""  # any of "vision,connector,llm": parameter groups left untrained

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: fill the devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.pipeline = 1
    c.mesh.expert = 1
    c.mesh.context = 1
    # mesh.dcn.<axis>: the part of that axis's size that spans TPU slices or hosts (slow links)
    c.mesh.dcn = ml_collections.ConfigDict(
        {a: 1 for a in ("data", "fsdp", "tensor", "pipeline", "expert", "context")})

    c.distributed = ml_collections.ConfigDict()  # multi-process runs (docs/distributed.md)
    c.distributed.init_timeout_s = 300  # give up joining the job (coordinator unreachable) after this
    c.distributed.heartbeat_timeout_s = 100  # a process silent this long is dead: the others exit

    c.parallel = ml_collections.ConfigDict()
    c.parallel.zero_stage = 0  # extra sharding over the `data` axis: 1 opt state, 2 +grads, 3 +params
    # ZeRO/FSDP all-gather parameters in: compute (model.dtype) | float32 | bfloat16; their
    # gradients are reduce-scattered in float32 either way
    c.parallel.gather_dtype = "compute"
    c.parallel.sequence_parallel = False  # shard the residual stream's sequence over `tensor`
    c.parallel.expert_buffer = 0.0  # > 0: expert parallelism receives at most this x a device's
    # routed rows (overflow dropped and counted); 0: room for all the axis could send (dropless)
    c.parallel.context_attention = "ring"  # under mesh.context > 1: ring, all_gather or all_to_all
    # compress the gradients' reduction over mesh.data, with error feedback: none | bf16 | int8 | topk
    c.parallel.grad_compression = "none"
    c.parallel.topk_fraction = 0.01  # topk: the share of each gradient chunk's values sent
    c.parallel.rules = ()  # ((logical, mesh_axes), ...) overriding the default rules

    c.pipeline = ml_collections.ConfigDict()  # used when mesh.pipeline > 1
    c.pipeline.schedule = "gpipe"  # gpipe, 1f1b or interleaved (docs/parallelism.md)
    c.pipeline.microbatches = 4  # per data-parallel shard and accumulation step
    c.pipeline.virtual_stages = 1  # layer chunks per stage (interleaved schedule)

    c.data = ml_collections.ConfigDict()
    c.data.source = "embedded"  # "embedded", "scenes" (images + questions), a .txt / .jsonl path or a
    # prepared dataset directory (`jaxscale prepare`; docs/data.md)
    c.data.mixture = ""  # "path_a:0.7,path_b:0.3": rows drawn from several sources by weight (not source)
    c.data.workers = 0  # grain worker processes that build batches ahead of the step; 0: in-process
    c.data.text_key = "text"  # field read from .jsonl records
    c.data.tokenizer = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    c.data.seq_len = 128
    c.data.heldout_every = 16  # every 16th document is held out of training (for `jaxscale eval`)
    c.data.shuffle = True
    c.data.frames = 1  # source "scenes": frames per example (> 1: clips with motion)
    c.data.num_examples = 4096  # source "scenes": training examples (held-out ones are extra)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 500
    c.train.global_batch_size = 16
    c.train.grad_accum_steps = 1
    c.train.log_every = 20
    c.train.max_nonfinite_steps = 0  # steps with a NaN/inf loss or gradient to skip before stopping
    c.train.offload = ""  # state kept in host memory between steps: "optimizer", "params" or both

    c.diloco = ml_collections.ConfigDict()  # local SGD over mesh.data's replicas (docs/parallelism.md)
    c.diloco.enabled = False
    c.diloco.inner_steps = 32  # H: steps each replica takes alone between outer steps
    c.diloco.outer_lr = 0.7  # the outer SGD's learning rate on the averaged pseudo-gradient
    c.diloco.outer_momentum = 0.9  # 0: none
    c.diloco.nesterov = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.dir = ""  # default: <run_dir>/checkpoints; any path Orbax/tensorstore supports
    c.checkpoint.every = 100  # save every N steps (0: only at the end and on SIGTERM/SIGINT)
    c.checkpoint.keep = 3  # keep the last K (0: all)
    c.checkpoint.keep_every = 0  # and also every M-th step for good (0: none)
    c.checkpoint.async_save = True  # training goes on while a save is written
    c.checkpoint.resume_step = -1  # -1: resume from the latest complete checkpoint, if any
    # parameters to start from: a checkpoint directory (the whole model), or comma-separated
    # group=directory entries for top-level groups, e.g. "vision=runs/clip/checkpoints"
    c.checkpoint.init_params_from = ""

    c.infer = ml_collections.ConfigDict()  # `jaxscale generate` and `jaxscale eval` (docs/inference.md)
    c.infer.max_new_tokens = 64
    c.infer.temperature = 0.0  # 0: greedy
    c.infer.top_k = 0  # 0: off
    c.infer.top_p = 1.0  # 1: off
    c.infer.seed = 0  # sampling key
    c.infer.stop = "eos"  # comma-separated stop token ids and/or "eos"; "" for none
    c.infer.weights = "float32"  # float32 | bfloat16 | int8 (per channel) | int4 (grouped)
    c.infer.group_size = 128  # int4: inputs per scale (the whole input dim when shorter, or 0)
    c.infer.cache_dtype = "auto"  # auto (the compute dtype) | int8 (a scale per token and head)
    c.infer.cache_len = 0  # KV cache slots; 0: model.max_seq_len
    c.infer.window = 0  # > 0: sliding-window cache of the latest `window` tokens plus the sinks
    c.infer.sink_tokens = 4  # with a window: the first tokens, kept for good
    c.infer.eval_source = "heldout"  # eval: "heldout" (data.source's held-out split) or a path
    c.infer.eval_batch_size = 16  # eval rows per batch (data.seq_len tokens each)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.min_lr_ratio = 0.1
    c.optim.warmup_steps = 30
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.moments = "float32"  # AdamW's moments: float32 | 8bit (float8 codes, block scales: adam8bit.py)
    return c


def load_module(path: str | os.PathLike) -> types.ModuleType:
    """Run the Python file at `path` as a module of its own (not added to `sys.modules`), e.g. a
    config file's sibling: `load_module(Path(__file__).with_name("presets.py"))`, from any cwd."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None:
        raise UserError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Bounds of numeric settings, checked before anything runs so the error names the key: ">= 1"
# etc., several joined by " and " (the model and data code check the rest where they read them).
BOUNDS = {
    "data.num_examples": ">= 1",
    "data.frames": ">= 1 and <= 16",
    "data.workers": ">= 0",
    "train.steps": ">= 1",
    "train.log_every": ">= 1",
    "train.max_nonfinite_steps": ">= 0",
    "checkpoint.every": ">= 0",
    "checkpoint.keep": ">= 0",
    "checkpoint.keep_every": ">= 0",
    "checkpoint.resume_step": ">= -1",
    "diloco.inner_steps": ">= 1",
    "diloco.outer_lr": "> 0",
    "diloco.outer_momentum": ">= 0 and < 1",
    "optim.lr": ">= 0",
    "optim.min_lr_ratio": ">= 0 and <= 1",
    "optim.warmup_steps": ">= 0",
    "optim.b1": ">= 0 and < 1",
    "optim.b2": ">= 0 and < 1",
    "optim.eps": ">= 0",
    "optim.weight_decay": ">= 0",
    "optim.clip_norm": "> 0",
    "distributed.init_timeout_s": "> 0",
    "distributed.heartbeat_timeout_s": "> 0",
    "infer.group_size": ">= 0",
    "parallel.expert_buffer": ">= 0",
    "parallel.topk_fraction": "> 0 and <= 1",
    "infer.sink_tokens": ">= 0",
}
_COMPARE = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise `UserError` for a key that the base config does not have, a value of the wrong type,
    or one outside its `BOUNDS`."""
    _check_keys(config, base_config(), "")
    for name, bounds in BOUNDS.items():
        section, key = name.split(".")
        value = config[section][key]
        for bound in bounds.split(" and "):
            op, limit = bound.split()
            if not _COMPARE[op](float(value), float(limit)):
                raise UserError(f"{name}={value} is out of range: it must be {bounds}")


def _check_keys(cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict, prefix: str) -> None:
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in ref:
            close = [k for k in ref.keys() if k[:3] == key[:3]]
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise UserError(f"unknown config key '{name}'{hint}; valid keys in this section: "
                            f"{', '.join(sorted(ref.keys()))}")
        value, want = cfg[key], ref[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise UserError(f"config key '{name}' must be a section, got {value!r}")
            _check_keys(value, want, name + ".")
        elif isinstance(want, bool) and not isinstance(value, bool):
            raise UserError(f"config key '{name}' must be true or false, got {value!r}")
        elif isinstance(want, int | float) and not isinstance(value, int | float):
            raise UserError(f"config key '{name}' must be a number, got {value!r}")
        elif isinstance(want, int | float) and not math.isfinite(value):
            raise UserError(f"{name}={value} is out of range: it must be a finite number")
        elif isinstance(want, str) and not isinstance(value, str):
            raise UserError(f"config key '{name}' must be a string, got {value!r}")
