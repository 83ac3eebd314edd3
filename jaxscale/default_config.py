"""The embedded default experiment: `jaxscale train` with no `--config`."""

from jaxscale.config import base_config


def get_config():
    c = base_config()
    # Few layers: unrolled, with einsum attention, the job's steps run 1.40x faster on 2 CPU cores
    # (107 -> 83 s in all); the base config keeps the layer scan that deep models compile with.
    c.model.update(scan_layers=False, attention="einsum")
    return c
