"""Read and write the safetensors format: lazily (memory-mapped) and with bfloat16 as NumPy.

The `safetensors` package's NumPy API cannot hold bfloat16 (NumPy has no such dtype), and most
published checkpoints are bfloat16; the format is a JSON header and raw little-endian bytes, so
jaxscale maps it straight to NumPy arrays (bfloat16 through `ml_dtypes`, which JAX ships).
Memory-mapped tensors are read only where sliced: importing reads each device's shard alone.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxscale.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """The header of one file (name -> dtype, shape, data_offsets) and where its data begins."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise UserError(f"{path} is not a safetensors file (bad header length); re-download "
                            f"or re-save it")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise UserError(f"{path} has a corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES or end > size - 8 - n:
            raise UserError(f"tensor {name} in {path} is truncated or of unknown dtype "
                            f"{info['dtype']!r}; re-download or re-save the file")
    return header, 8 + n


class Tensors:
    """The tensors of every `*.safetensors` file in a directory, memory-mapped on demand."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in directory.glob("*.bin"))
            hint = (f" (only {', '.join(bins)}: re-save it with transformers' "
                    f"`save_pretrained(dir, safe_serialization=True)`)" if bins else "")
            raise UserError(f"no *.safetensors weights in {directory}{hint}")
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            header, start = read_header(path)
            for name, info in header.items():
                self._where[name] = (path, start, info)

    def rename(self, fn) -> None:
        """Rename every tensor to `fn(name)`."""
        self._where = {fn(n): v for n, v in self._where.items()}

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._where[name][2]["dtype"]])

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (bytes are read when indexed)."""
        path, start, info = self._where[name]
        begin, end = info["data_offsets"]
        shape, dtype = tuple(info["shape"]), DTYPES[info["dtype"]]
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def write(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]]) -> int:
    """Write `(name, array)` pairs as one safetensors file; its size in bytes."""
    arrays = [(name, np.ascontiguousarray(a)) for name, a in tensors]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, a in arrays:
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, a in arrays:
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return 8 + len(raw) + offset
