"""Models: Flax NNX modules whose parameters and activations name logical axes only."""

from jaxscale.models.llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
