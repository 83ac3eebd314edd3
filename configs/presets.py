"""Presets the config files share: published model shapes as `model` fields, and the multimodal
experiments. A config file loads it by path: `load_module(Path(__file__).with_name("presets.py"))`.
"""

import ml_collections

from jaxscale.config import base_config
from jaxscale.default_config import SMALL_MODEL
from jaxscale.errors import UserError

LLAMA3_COMMON = dict(vocab_size=128256, n_kv_heads=8, max_seq_len=8192, rope_theta=500000.0)

LLAMA3 = {
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, head_dim=64, d_ff=8192,
               tie_embeddings=True),  # Llama-3.2-1B
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, head_dim=128, d_ff=14336,
               tie_embeddings=False),
    "70b": dict(d_model=8192, n_layers=80, n_heads=64, head_dim=128, d_ff=28672,
                tie_embeddings=False),
}


# Mixture-of-experts shapes: (`model` fields, `model.moe` fields). `aux_coef` is the release's
# balancing strength (HF `router_aux_loss_coef`, on one loss pooled over the layers, about top_k
# at balance) for jaxscale's loss per layer (about 1 each): coef x top_k / n_layers.
MOE = {
    # Mixtral-8x7B: 46,702,792,704 parameters, 12,879,925,248 active per token
    "mixtral_8x7b": (dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          head_dim=128, d_ff=14336, max_seq_len=32768, rope_theta=1e6),
                     dict(n_experts=8, top_k=2, d_ff=14336, router="softmax",
                          aux_coef=0.02 * 2 / 32)),
    # Qwen3-30B-A3B: 30,532,122,624 parameters, 3,353,032,704 active per token
    "qwen3_30b_a3b": (dict(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                           head_dim=128, d_ff=6144, max_seq_len=40960, rope_theta=1e6,
                           norm_eps=1e-6, qk_norm=True),
                      dict(n_experts=128, top_k=8, d_ff=768, router="softmax",
                           aux_coef=0.001 * 8 / 48)),
}


def moe(name: str) -> tuple[dict, dict]:
    """`model` and `model.moe` fields of a published MoE shape: "mixtral_8x7b" or "qwen3_30b_a3b"."""
    return MOE[name]


def llama3(size: str) -> dict:
    """Model fields of a Llama-3 size: "1b", "8b" or "70b"."""
    return {**LLAMA3_COMMON, **LLAMA3[size]}


def multimodal_config(family: str, size: str = "tiny") -> ml_collections.ConfigDict:
    """A config training `family` on the embedded scenes task: "tiny" (minutes on a CPU) or
    "realistic" (a Llama-3.2-1B decoder with a ViT-L/14 encoder at 224 px, for accelerators)."""
    if size not in ("tiny", "realistic"):
        raise UserError(f"multimodal preset size {size!r}; use tiny or realistic "
                        f"(--config configs/{family}.py:tiny)")
    c = base_config()
    c.run_dir = f"runs/{family}_{size}"
    c.model.family = family
    c.data.source = "scenes"
    if size == "tiny":
        c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
                       d_ff=256, max_seq_len=128, tie_embeddings=family == "clip", **SMALL_MODEL)
        c.model.vision.update(image_size=32, patch_size=4, d_model=64, n_layers=2, n_heads=4,
                              head_dim=16, d_ff=256, pool=2)
        c.data.seq_len = 80
        c.train.update(steps=600, global_batch_size=32, log_every=50)
        c.optim.update(lr=2e-3, warmup_steps=50, weight_decay=0.0)
    else:
        c.model.update(**llama3("1b"), dtype="bfloat16", remat="save_dots")
        c.model.update(vocab_size=512, max_seq_len=512)  # the byte tokenizer (or a local HF one)
        c.model.vision.update(image_size=224, patch_size=14, d_model=1024, n_layers=24, n_heads=16,
                              head_dim=64, d_ff=4096, pool=1)
        c.model.fusion.update(n_latents=64, resampler_layers=2, cross_every=4, embed_dim=512)
        c.data.seq_len = 128
        c.train.update(steps=5000, global_batch_size=256, log_every=10)
        c.optim.update(lr=2e-4, warmup_steps=200)
        c.mesh.update(data=-1, fsdp=8)
    return c
