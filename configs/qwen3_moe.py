"""Qwen3-30B-A3B shape: 30.5B parameters, 3.3B active per token (128 experts, top 8, per-head
query/key norms), experts split over `expert=8` and everything else FSDP over the rest."""

from pathlib import Path

from jaxscale.config import base_config, load_module

moe = load_module(Path(__file__).with_name("presets.py")).moe


def get_config():
    c = base_config()
    c.run_dir = "runs/qwen3_moe"
    model, experts = moe("qwen3_30b_a3b")
    c.model.update(**model, dtype="bfloat16", remat="save_dots")
    c.model.moe.update(**experts)
    c.data.seq_len = 4096
    c.train.update(steps=10000, global_batch_size=256, log_every=10)
    c.optim.update(lr=3e-4, warmup_steps=2000)
    c.mesh.update(data=1, expert=8, fsdp=-1)
    return c
