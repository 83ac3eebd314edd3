"""The data pipeline: text documents -> tokens -> packed rows -> sharded global batches."""

from jaxscale.data.corpus import load_documents
from jaxscale.data.loader import build_data, make_global_batch
from jaxscale.data.packing import PackedTokens, pack_documents
from jaxscale.data.pipeline import DataIterator
from jaxscale.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataIterator",
    "HFTokenizer",
    "PackedTokens",
    "Tokenizer",
    "build_data",
    "load_documents",
    "load_tokenizer",
    "make_global_batch",
    "pack_documents",
]
