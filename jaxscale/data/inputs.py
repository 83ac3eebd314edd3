"""`jaxscale prepare`'s inputs: INPUT arguments expanded into files, and documents read from them as a
stream, every document left out counted by reason (`Skips`).

Formats: `.txt` (the whole file is one document), `.jsonl` (one record per line, its text field), either
compressed as `.gz`, `.bz2`, `.xz` or `.zst` (with `zstandard`), and `.parquet` (the text column,
with `pyarrow`). Remote URLs (`gs://`, `s3://`, ...) are read through `fsspec` and the filesystem
package of their scheme (`gcsfs`, `s3fs`, ...).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import importlib
import io
import json
import lzma
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Any

from jaxscale.errors import UserError

TEXT_FORMATS = (".txt", ".jsonl")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SUFFIXES = (*TEXT_FORMATS, *(f + c for f in TEXT_FORMATS for c in COMPRESSIONS), ".parquet")
REASONS = {
    "empty": "empty or whitespace-only documents",
    "non_utf8": "files (.txt) or lines (.jsonl) that are not valid UTF-8",
    "invalid_json": ".jsonl lines that are not valid JSON",
    "missing_text_key": "records without a string text field",
    "unreadable": "files whose rest could not be read (truncated or corrupt compression, I/O error)",
}


class Skips:
    """Counts of documents (or lines, files) left out, by reason (`REASONS`), with the first place of each."""

    def __init__(self, state: dict[str, dict[str, Any]] | None = None):
        self.state: dict[str, dict[str, Any]] = dict(state or {})

    def add(self, reason: str, where: str, n: int = 1) -> None:
        """Count `n` skips of `reason` at `where` (e.g. `file:line`)."""
        entry = self.state.setdefault(reason, {"count": 0, "first": where})
        entry["count"] += n

    def merge(self, other: Skips) -> None:
        """Add the counts of `other` (its first places only for reasons new here)."""
        for reason, entry in other.state.items():
            self.add(reason, entry["first"], entry["count"])

    def counts(self) -> dict[str, int]:
        """Skips by reason."""
        return {r: e["count"] for r, e in sorted(self.state.items())}

    def __str__(self) -> str:
        return ", ".join(f"{e['count']} {r} (first: {e['first']})"
                         for r, e in sorted(self.state.items())) or "none"


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (`scheme://...`) rather than a local path."""
    return "://" in path


def _filesystem(url: str):
    """The fsspec filesystem of `url` and the path within it; a one-line error when it cannot be had."""
    try:
        import fsspec
    except ImportError:
        raise UserError(f"reading {url} needs fsspec; pip install fsspec and the filesystem package of "
                        f"its scheme (gcsfs for gs://, s3fs for s3://)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot read {url}: {e}; pip install the filesystem package of its scheme "
                        f"(gcsfs for gs://, s3fs for s3://)") from None


def _supported(path: str) -> bool:
    return path.endswith(SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """The files that `inputs` name (local ones as absolute paths), sorted, without repeats: files as
    given, directories searched recursively and globs (`**` included) matched, both keeping the files
    of supported formats."""
    if not inputs:
        raise UserError("no inputs; pass .txt, .jsonl(.gz/.bz2/.xz/.zst) or .parquet files, "
                        "directories or globs")
    files: set[str] = set()
    for item in inputs:
        files.update(_expand_remote(item) if is_remote(item) else map(os.path.abspath, _expand_local(item)))
    return sorted(files)


def _expand_local(item: str) -> list[str]:
    if glob.has_magic(item):
        matched = [p for p in glob.glob(item, recursive=True) if os.path.isfile(p)]
        kind = "glob"
    elif os.path.isdir(item):
        matched = [os.path.join(d, f) for d, _, names in os.walk(item) for f in names]
        kind = "directory"
    elif os.path.isfile(item):
        if not _supported(item):
            raise UserError(f"input {item} has an unsupported format; use {', '.join(SUFFIXES)}")
        return [item]
    else:
        raise UserError(f"input {item} does not exist; pass existing files, directories or globs")
    found = [p for p in matched if _supported(p)]
    if not found:
        raise UserError(f"{kind} {item} matches no {', '.join(SUFFIXES)} files; check the path")
    return found


def _expand_remote(item: str) -> list[str]:
    fs, path = _filesystem(item)
    if glob.has_magic(path):
        matched, kind = fs.glob(path), "glob"
    elif fs.isdir(path):
        matched, kind = fs.find(path), "directory"
    elif fs.isfile(path):
        if not _supported(path):
            raise UserError(f"input {item} has an unsupported format; use {', '.join(SUFFIXES)}")
        return [item]
    else:
        raise UserError(f"input {item} does not exist; pass existing files, directories or globs")
    found = [fs.unstrip_protocol(p) for p in matched if _supported(p) and fs.isfile(p)]
    if not found:
        raise UserError(f"{kind} {item} matches no {', '.join(SUFFIXES)} files; check the path")
    return found


def file_version(file: str) -> str:
    """What tells a changed file from the one read before: size and modification time (locally), the
    filesystem's key of its metadata (URLs)."""
    if is_remote(file):
        fs, path = _filesystem(file)
        return fs.ukey(path)
    stat = os.stat(file)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _open(file: str) -> IO[bytes]:
    """`file` opened for reading bytes, decompressed as its suffix says."""
    if is_remote(file):
        fs, path = _filesystem(file)
        raw = fs.open(path, "rb")
    else:
        raw = open(file, "rb")  # noqa: SIM115 - closed by the caller
    if file.endswith(".gz"):
        return gzip.open(raw)
    if file.endswith(".bz2"):
        return bz2.open(raw)
    if file.endswith(".xz"):
        return lzma.open(raw)
    if file.endswith(".zst"):
        try:
            zstandard = importlib.import_module("zstandard")
        except ImportError:
            raw.close()
            raise UserError(f"reading {file} needs zstandard; pip install zstandard") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def read_documents(file: str, text_key: str, skips: Skips) -> Iterator[str]:
    """The documents of `file` in order; those left out are counted in `skips`. Blank `.jsonl` lines
    are not records and are passed over."""
    if file.endswith(".parquet"):
        yield from _parquet_documents(file, text_key, skips)
        return
    jsonl = ".jsonl" in os.path.basename(file)
    line = 0
    try:
        with _open(file) as f:
            if not jsonl:
                text = _decode(f.read(), file, skips)
                if text is not None:
                    yield from _keep(text, file, skips)
                return
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{file}:{line}"
                text = _decode(raw, where, skips)
                if text is None:
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    skips.add("invalid_json", where)
                    continue
                doc = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(doc, str):
                    skips.add("missing_text_key", where)
                elif _encodable(doc, where, skips):
                    yield from _keep(doc, where, skips)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        skips.add("unreadable", f"{file}{f':{line + 1}' if jsonl else ''} ({type(e).__name__})")


def _decode(raw: bytes, where: str, skips: Skips) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skips.add("non_utf8", where)
        return None


def _encodable(text: str, where: str, skips: Skips) -> bool:
    """False (counted) for text with lone surrogates (JSON `\\ud800` escapes), which no tokenizer takes."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        skips.add("non_utf8", where)
        return False


def _keep(text: str, where: str, skips: Skips) -> Iterator[str]:
    if text.strip():
        yield text
    else:
        skips.add("empty", where)


def _parquet_documents(file: str, text_key: str, skips: Skips) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {file} needs pyarrow; pip install pyarrow") from None
    import pyarrow as pa

    row = 0
    try:
        with _open(file) as f:
            parquet = pq.ParquetFile(f)
            field = parquet.schema_arrow.field(text_key) if text_key in parquet.schema_arrow.names else None
            if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
                skips.add("missing_text_key", f"{file} (no string column {text_key!r})",
                          parquet.metadata.num_rows)
                return
            for batch in parquet.iter_batches(columns=[text_key]):
                for doc in batch.column(0).to_pylist():
                    row += 1
                    if doc is None:
                        skips.add("missing_text_key", f"{file}:row {row}")
                    else:
                        yield from _keep(doc, f"{file}:row {row}", skips)
    except (OSError, pa.ArrowException) as e:
        skips.add("unreadable", f"{file}:row {row + 1} ({type(e).__name__})")
