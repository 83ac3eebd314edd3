"""The throughput reference shape (docs/throughput.md): a 4-layer Llama, d_model 256, vocab 32000.

4 query and 4 KV heads of 64, SwiGLU 1024, untied output layer; sequence 256, global batch 8
(2,048 tokens per step); AdamW; float32. `experiments/bench_throughput.py` times it.
"""

from jaxscale.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/bench_reference"
    c.model.update(vocab_size=32000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64,
                   d_ff=1024, max_seq_len=256, tie_embeddings=False, dtype="float32",
                   loss_chunk=2048, scan_layers=False, attention="einsum")
    c.data.seq_len = 256
    c.train.update(steps=100, global_batch_size=8, log_every=10)
    c.optim.update(lr=1e-3, warmup_steps=10)
    c.mesh.update(data=-1)
    return c
