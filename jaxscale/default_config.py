"""The embedded default experiment: `jaxscale train` with no `--config`."""

from jaxscale.config import base_config


def get_config():
    return base_config()
