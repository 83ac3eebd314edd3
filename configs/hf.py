"""Fine-tune a model imported with `jaxscale import-hf` (docs/huggingface.md).

`--config configs/hf.py:CHECKPOINT_DIR` takes the model and tokenizer from the import's saved
config and starts from its parameters; set the data with `--config.data.source=...`.
"""

import os

from jaxscale.errors import UserError
from jaxscale.hf import checkpoint_config


def get_config(checkpoint: str = ""):
    if not checkpoint:
        raise UserError("pass the import-hf output directory: --config configs/hf.py:CHECKPOINT_DIR")
    c = checkpoint_config(checkpoint)
    c.run_dir = os.path.join("runs", "finetune_" + os.path.basename(os.path.normpath(checkpoint)))
    c.checkpoint.init_params_from = checkpoint
    c.train.update(steps=200, global_batch_size=8)
    c.optim.update(lr=3e-5, warmup_steps=20, weight_decay=0.0)
    c.data.seq_len = min(c.data.seq_len, c.model.max_seq_len)
    return c
