"""Throughput on one accelerator: the Llama-3.2-1B shape in bfloat16 (docs/throughput.md).

1.24B parameters (tied 128,256-entry vocabulary), sequence 2048, global batch 20 (40,960 tokens
per step), cuDNN flash attention (on Hopper, the packed rows' documents in cuDNN's packed layout
with the default 8 slots a row), unrolled layers, no rematerialisation, the output layer fused with
the loss in chunks of 4096 tokens and writing bfloat16 logits (the loss math stays float32); AdamW
with float32 parameters and moments. Peak 66.7 GiB: sized for one 80 GB GPU; 55.9% MFU on an
H100 (docs/results/throughput_gpu.md):

    python3 experiments/bench_throughput.py --config configs/bench_1b.py --layouts single \\
        --no-hand-written

On a host without an NVIDIA GPU add `--config.model.attention=dot_product`.
"""

from pathlib import Path

from jaxscale.config import base_config, load_module

llama3 = load_module(Path(__file__).with_name("presets.py")).llama3


def get_config():
    c = base_config()
    c.run_dir = "runs/bench_1b"
    c.model.update(**llama3("1b"), dtype="bfloat16", remat="none", attention="cudnn",
                   loss_chunk=4096, scan_layers=False, logits_dtype="bfloat16")
    c.data.seq_len = 2048
    c.train.update(steps=100, global_batch_size=20, log_every=10)
    c.optim.update(lr=3e-4, warmup_steps=10)
    c.mesh.update(data=-1)
    return c
