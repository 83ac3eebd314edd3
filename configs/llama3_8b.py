"""Llama-3-8B shape (8.03B parameters), FSDP over all devices."""

from pathlib import Path

from jaxscale.config import base_config, load_module

llama3 = load_module(Path(__file__).with_name("presets.py")).llama3


def get_config():
    c = base_config()
    c.run_dir = "runs/llama3_8b"
    c.model.update(**llama3("8b"), dtype="bfloat16", remat="save_dots")
    c.data.seq_len = 8192
    c.train.update(steps=10000, global_batch_size=512, log_every=10)
    c.optim.update(lr=3e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1)
    return c
