"""A small Llama at sequence 32,768 with each row split over 8 devices (context parallelism,
ring attention), on the embedded corpus: long-context training on a CPU host with 8 emulated
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), where one device alone would need
the 32,768 x 32,768 attention scores. Try `--config.parallel.context_attention=all_gather` or
`all_to_all`; on accelerators raise the model and keep the layout."""

from jaxscale.config import base_config


def get_config():
    c = base_config()
    c.run_dir = "runs/long_context"
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=256,
                   max_seq_len=32768, rope_theta=500000.0, scan_layers=False)
    c.data.seq_len = 32768
    c.mesh.update(data=1, context=8)
    c.parallel.context_attention = "ring"
    # 32,768 tokens a step: measured 116 tokens/s (about 5 minutes a step) on 2 CPU cores shared
    # with another job, 1.0 GiB per device; loss 6.75 -> 6.06 in 3 steps
    c.train.update(global_batch_size=1, steps=4, log_every=1)
    c.optim.warmup_steps = 1
    c.checkpoint.every = 0
    return c
