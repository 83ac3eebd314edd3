"""Load text documents: the embedded CPython docs, a .txt / .jsonl file or a directory of them."""

from __future__ import annotations

import json
from pathlib import Path

from jaxscale.errors import UserError

SUFFIXES = (".txt", ".jsonl")


def load_documents(source: str, text_key: str = "text") -> list[str]:
    """Return the non-empty documents of `source`, in a deterministic order.

    `source` is "embedded" (the ~80 documentation topics that ship with CPython in
    `pydoc_data.topics`, ~460 KB of English), a `.txt` file (one document), a `.jsonl` file (one
    document per line, its `text_key` field) or a directory searched recursively for both.
    """
    if source == "embedded":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"data directory {path} has no .txt or .jsonl files; add some or set "
                            f"data.source to another path or 'embedded'")
        return [doc for f in files for doc in _read_file(f, text_key)]
    if not path.exists():
        raise UserError(f"data source {path} does not exist; set data.source to 'embedded' or to "
                        f"an existing .txt / .jsonl file or directory")
    if path.suffix not in SUFFIXES:
        raise UserError(f"data source {path} has unsupported extension '{path.suffix}'; use a .txt "
                        f"or .jsonl file or a directory of them")
    return _read_file(path, text_key)


def split_documents(docs: list[str], heldout_every: int, split: str) -> list[str]:
    """The `"train"` or `"heldout"` split of `docs`: every `heldout_every`-th document (the
    `heldout_every`-th, the `2 * heldout_every`-th, ...) is held out from training; 0 holds out none."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; use 'train' or 'heldout'")
    if heldout_every < 0 or heldout_every == 1:
        raise UserError(f"data.heldout_every={heldout_every} must be 0 (no held-out split) or >= 2")
    held = [heldout_every and i % heldout_every == heldout_every - 1 for i in range(len(docs))]
    return [d for d, h in zip(docs, held, strict=True) if h == (split == "heldout")]


def _read_file(path: Path, text_key: str) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (byte offset {e.start}); re-encode it as "
                        f"UTF-8") from e
    docs = _jsonl_documents(path, text, text_key) if path.suffix == ".jsonl" else [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{path} contains no text; add text to it or remove it from data.source")
    return docs


def _jsonl_documents(path: Path, text: str, text_key: str) -> list[str]:
    docs = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n} is not valid JSON ({e.msg}); fix or remove that "
                            f"line") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise UserError(f"{path}:{n} has no string field '{text_key}'; add it or set "
                            f"data.text_key to the field that holds the text")
        docs.append(record[text_key])
    return docs
