"""A GPT-2-small-shaped Llama (12 layers, d=768, 12 heads, ~124M parameters with tied embeddings).

The vocabulary is GPT-2's (padded to 50304); pass a local GPT-2 `tokenizer.json` with
`--config.data.tokenizer=/path/to/tokenizer.json`, or keep the byte tokenizer.
"""

from jaxscale.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/gpt2_small"
    c.model.update(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                   head_dim=64, d_ff=2048, max_seq_len=1024, tie_embeddings=True)
    c.data.seq_len = 1024
    c.train.update(steps=5000, global_batch_size=64, log_every=50)
    c.optim.update(lr=6e-4, warmup_steps=200)
    c.mesh.update(data=-1)
    return c
