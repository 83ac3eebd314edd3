"""Inference: KV-cache generation, sampling, sharded decode, weight quantization, perplexity.

See docs/inference.md. `Generator` holds a model's parameters on a mesh and generates or scores;
the pieces it uses live in `cache`, `decode`, `sampling` and `quantize`.
"""

from jaxscale.infer.cache import CacheConfig, KVCache, cache_bytes
from jaxscale.infer.generate import GenerationResult, Generator, inference_layout, load_params
from jaxscale.infer.quantize import QuantizedArray, quantize_params, weight_bytes
from jaxscale.infer.sampling import SamplingParams, sample

__all__ = [
    "CacheConfig",
    "GenerationResult",
    "Generator",
    "KVCache",
    "QuantizedArray",
    "SamplingParams",
    "cache_bytes",
    "inference_layout",
    "load_params",
    "quantize_params",
    "sample",
    "weight_bytes",
]
