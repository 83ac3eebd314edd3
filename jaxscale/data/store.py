"""A prepared token store: `DIR/index.json` and `.npy` token shards, read as `PackedTokens`' rows.

`index.json` holds the format version, the tokenizer (name, vocab_size, eos_id), the token dtype
(uint16 when the vocabulary has under 65,536 ids, else uint32) and, per split ("train", "heldout"),
its shards in stream order. A shard is `<name>.tokens.npy` (its documents' tokens, each document
ending with eos) and `<name>.docs.npy` (int64 start offset of each document in the shard); no
document spans two shards. `jaxscale prepare` (`prepare.py`) writes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxscale.errors import UserError

FORMAT = "jaxscale-tokens"
VERSION = 1
INDEX = "index.json"
SPLITS = ("train", "heldout")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits under 65,536, else uint32."""
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a prepared store's `index.json`."""
    return (Path(path) / INDEX).is_file()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(directory: str | os.PathLike, name: str, documents: Sequence[np.ndarray | Sequence[int]],
                dtype: np.dtype) -> dict[str, Any]:
    """Write `documents` (token ids, eos included) as shard `name` of `directory`, each file atomically
    (tmp + rename); return its index entry."""
    directory = Path(directory)
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = np.concatenate([np.asarray(d, dtype) for d in documents]) if documents else np.empty(0, dtype)
    entry: dict[str, Any] = {"name": name, "tokens": len(tokens), "documents": len(lengths)}
    for kind, array in (("tokens", tokens), ("docs", starts)):
        file = f"{name}.{kind}.npy"
        tmp = directory / f".{file}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, directory / file)
        entry[f"{kind}_file"] = file
        entry[f"{kind}_bytes"] = (directory / file).stat().st_size
        entry[f"{kind}_sha256"] = sha256_file(directory / file)
    return entry


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write `data` as JSON atomically (tmp + rename), keys sorted so equal data gives equal bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `index.json` of store `path`, its format and version checked."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"prepared dataset {directory} does not exist; create it with "
                        f"`jaxscale prepare INPUT... --output {directory}`")
    if not (directory / INDEX).is_file():
        raise UserError(f"{directory} has no {INDEX} (not a prepared dataset, or its prepare run did "
                        f"not finish); re-run jaxscale prepare")
    try:
        index = json.loads((directory / INDEX).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{directory / INDEX} is corrupt ({e}); re-run jaxscale prepare") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{directory / INDEX} is not a jaxscale token store index; re-run jaxscale prepare")
    if index.get("version") != VERSION:
        raise UserError(f"{directory} has store format version {index.get('version')}, this jaxscale "
                        f"reads version {VERSION}; re-run jaxscale prepare")
    return index


@functools.lru_cache(maxsize=256)  # open shards (each mapping holds a file descriptor)
def _load(file: str, version: tuple[int, int]) -> np.ndarray:
    """`file` memory-mapped; `version` (inode, mtime) tells a rewritten file from the one mapped."""
    return np.load(file, mmap_mode="r")


class TokenStore:
    """One split of a prepared store as a single token stream, with `PackedTokens`' row interface.

    Row `r` is the window `stream[r * seq_len : (r + 1) * seq_len + 1]`; the ragged tail is dropped.
    Shards are memory-mapped when first read. Pickles by path: a grain worker reopens it.
    """

    def __init__(self, path: str, split: str, seq_len: int, verify: bool = False):
        self.path, self.split, self.seq_len = str(path), split, seq_len
        self.index = read_index(path)
        splits = self.index["splits"]
        if split not in splits:
            raise UserError(f"{path} has no split {split!r}; it has {', '.join(map(repr, splits))}")
        if seq_len < 1:
            raise UserError(f"data.seq_len must be at least 1, got {seq_len}")
        self.shards: list[dict[str, Any]] = splits[split]
        directory = Path(path)
        self._versions: list[dict[str, tuple[int, int]]] = []
        for shard in self.shards:
            self._versions.append({})
            for kind in ("tokens", "docs"):
                file = directory / shard[f"{kind}_file"]
                stat = file.stat() if file.is_file() else None
                size = None if stat is None else stat.st_size
                if size != shard[f"{kind}_bytes"]:
                    found = "missing" if size is None else f"{size} bytes"
                    raise UserError(f"shard {file} is {found}, the index says {shard[f'{kind}_bytes']} "
                                    f"bytes (truncated or corrupt); re-run jaxscale prepare")
                if verify and sha256_file(file) != shard[f"{kind}_sha256"]:
                    raise UserError(f"shard {file} does not match its sha256 in the index (corrupt); "
                                    f"re-run jaxscale prepare")
                self._versions[-1][kind] = (stat.st_ino, stat.st_mtime_ns)
        lengths = np.array([s["tokens"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each shard
        self.num_tokens = int(self.offsets[-1])
        self.num_documents = sum(s["documents"] for s in self.shards)
        if self.num_rows == 0:
            raise UserError(f"split {split!r} of {path} has {self.num_tokens} tokens, too few for one row "
                            f"of data.seq_len={seq_len} (+1 target); lower data.seq_len or add text")
        self._most: int | None = None

    @classmethod
    def open(cls, path: str, split: str = "train", *, seq_len: int, verify: bool = False) -> TokenStore:
        """Open split `split` of the store at `path`; `verify` checks every shard's sha256 too."""
        return cls(path, split, seq_len, verify)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "split": self.split, "seq_len": self.seq_len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["split"], state["seq_len"])

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (the caller checks it against the model's)."""
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def num_rows(self) -> int:
        """Number of complete rows."""
        return (self.num_tokens - 1) // self.seq_len

    def _array(self, shard: int, kind: str) -> np.ndarray:
        return _load(os.path.join(self.path, self.shards[shard][f"{kind}_file"]), self._versions[shard][kind])

    def _window(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens `[start, start + seq_len + 1)` of the stream, and whether a document starts at each
        of the first `seq_len` of them."""
        end = start + self.seq_len + 1
        tokens, starts = [], np.zeros(self.seq_len, dtype=bool)
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while self.offsets[shard] < end:
            base = int(self.offsets[shard])
            lo, hi = max(start, base) - base, min(end, int(self.offsets[shard + 1])) - base
            tokens.append(self._array(shard, "tokens")[lo:hi])
            docs = self._array(shard, "docs")
            first = docs[np.searchsorted(docs, lo):np.searchsorted(docs, min(hi, end - 1 - base))]
            starts[first + base - start] = True
            shard += 1
        return np.concatenate(tokens), starts

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of rows `indices`, exactly as `PackedTokens.rows` gives it: int32 `inputs`,
        `targets`, `segment_ids`, `positions` and float32 `loss_mask`, each `[len(indices), seq_len]`."""
        indices = np.asarray(indices)
        tokens = np.empty((len(indices), self.seq_len + 1), dtype=np.int32)
        starts = np.empty((len(indices), self.seq_len), dtype=bool)
        for i, r in enumerate(indices):
            tokens[i], starts[i] = self._window(int(r) * self.seq_len)
        starts[:, 0] = True
        col = np.arange(self.seq_len, dtype=np.int32)
        start_col = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.cumsum(starts, axis=1, dtype=np.int32),
            "positions": col - start_col,
            "loss_mask": np.ones(starts.shape, dtype=np.float32),
        }

    def max_documents_per_row(self) -> int:
        """The most documents (or parts of one) that any complete row holds (one pass over the
        document offsets, cached)."""
        if self._most is None:
            n, most, row, count = self.num_rows * self.seq_len, 0, -1, 0
            for shard in range(len(self.shards)):
                starts = self._array(shard, "docs") + self.offsets[shard]
                starts = starts[(starts < n) & (starts % self.seq_len != 0)]
                if not len(starts):
                    continue
                rows, counts = np.unique(starts // self.seq_len, return_counts=True)
                if rows[0] == row:  # the row the previous shard ended in continues
                    counts[0] += count
                most, row, count = max(most, int(counts.max())), int(rows[-1]), int(counts[-1])
            self._most = 1 + most
        return self._most
