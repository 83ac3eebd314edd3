"""The data pipeline: text documents -> tokens -> packed rows -> sharded global batches.

The names below load their module on first use, so a worker process that unpickles a `TokenStore`
or runs a `prepare` unit does not import jax.
"""

import importlib

_MODULES = {
    "ByteTokenizer": "tokenizer",
    "DataIterator": "pipeline",
    "HFTokenizer": "tokenizer",
    "PackedTokens": "packing",
    "TokenStore": "store",
    "Tokenizer": "tokenizer",
    "build_data": "loader",
    "load_documents": "corpus",
    "load_tokenizer": "tokenizer",
    "make_global_batch": "loader",
    "pack_documents": "packing",
    "prepare_dataset": "prepare",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
