"""The default experiment: a 0.9M-parameter Llama on the embedded corpus, ~2 minutes on 2 CPU cores."""

from jaxscale.config import base_config


def get_config():
    return base_config()
