"""The cross-attention (Flamingo) multimodal family on the embedded scenes task (docs/multimodal.md).

`--config configs/cross_attention.py` is the tiny preset (trains on a CPU);
`configs/cross_attention.py:realistic` a 1B-class decoder with a ViT-L/14 encoder.
"""

from jaxscale.models.presets import multimodal_config


def get_config(size: str = "tiny"):
    return multimodal_config("cross_attention", size or "tiny")
