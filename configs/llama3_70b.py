"""Llama-3-70B shape (70.6B parameters): tensor parallel over 8 devices, FSDP over the rest."""

from pathlib import Path

from jaxscale.config import base_config, load_module

llama3 = load_module(Path(__file__).with_name("presets.py")).llama3


def get_config():
    c = base_config()
    c.run_dir = "runs/llama3_70b"
    c.model.update(**llama3("70b"), dtype="bfloat16", remat="save_dots")
    c.data.seq_len = 8192
    c.train.update(steps=10000, global_batch_size=512, log_every=10)
    c.optim.update(lr=3e-4, warmup_steps=2000)
    c.mesh.update(data=1, fsdp=-1, tensor=8)
    c.parallel.sequence_parallel = True
    return c
