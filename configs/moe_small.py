"""A small mixture-of-experts Llama on the embedded corpus (minutes on a CPU): the default model
with 8 experts of a quarter of its MLP width in every layer, 2 per token, so a token uses about
the parameters of the dense default's MLP. Try `--config.mesh.expert=8` on 8 devices."""

from jaxscale.config import base_config
from jaxscale.default_config import SMALL_MODEL


def get_config():
    c = base_config()
    c.run_dir = "runs/moe_small"
    c.model.update(SMALL_MODEL)
    c.model.moe.update(n_experts=8, top_k=2, d_ff=96)
    c.train.steps = 300  # about 2 minutes on 2 CPU cores (XLA:CPU runs dropless experts densely)
    return c
