"""jaxscale: train and serve LLMs and multimodal LLMs on any JAX device mesh."""

from jaxscale.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
