"""The cross-attention (Flamingo) multimodal family on the embedded scenes task (docs/multimodal.md).

`--config configs/cross_attention.py` is the tiny preset (trains on a CPU);
`configs/cross_attention.py:realistic` a 1B-class decoder with a ViT-L/14 encoder.
"""

from pathlib import Path

from jaxscale.config import load_module

multimodal_config = load_module(Path(__file__).with_name("presets.py")).multimodal_config


def get_config(size: str = "tiny"):
    return multimodal_config("cross_attention", size or "tiny")
