"""GPT-2 small (`family="gpt2"`): 12 layers, d_model 768, 12 heads, MLP 3072, context 1024,
GPT-2's 50,257-token vocabulary, tied embeddings: 124,439,808 parameters, as the released model.

Pass a local GPT-2 `tokenizer.json` with `--config.data.tokenizer=/path/to/tokenizer.json`, or keep
the byte tokenizer. Tensor parallelism shards the vocabulary, which 50,257 does not divide: pad it,
e.g. `--config.model.vocab_size=50304` (124,475,904 parameters).
"""

from jaxscale.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/gpt2_small"
    c.model.update(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                   head_dim=64, d_ff=3072, max_seq_len=1024, tie_embeddings=True)
    c.data.seq_len = 1024
    c.train.update(steps=5000, global_batch_size=64, log_every=50)
    c.optim.update(lr=6e-4, warmup_steps=200)
    c.mesh.update(data=-1)
    return c
