"""`jaxscale prepare`: tokenize input files in worker processes into a token store (`store.py`).

One input file is one unit of work. Unit `u` (its place among the sorted input files) writes its own
shards `{split}-{u:05d}-{k:04d}.*.npy`, each file atomically, then `units/{u:05d}.json` (its shards,
counts and skips); a restarted run keeps the units whose marker and shards are complete and redoes the
rest, so its shards and `index.json` (written last) are byte for byte those of an uninterrupted run,
whatever the worker count. Document `j` of unit `u` (counting the documents kept) is held out when
`(u + j) % heldout_every == heldout_every - 1`: for one file, `split_documents`' rule.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxscale.data.inputs import REASONS, Skips, expand_inputs, file_version, read_documents
from jaxscale.data.store import FORMAT, INDEX, SPLITS, VERSION, token_dtype, write_json, write_shard
from jaxscale.data.tokenizer import Tokenizer, document_ids, load_tokenizer
from jaxscale.errors import UserError

MANIFEST = "prepare.json"  # what the dataset is made of: a restart must match it
UNITS = "units"


@dataclass
class PrepareReport:
    """What a `prepare_dataset` run produced (totals over all units, resumed ones included)."""

    output: str
    files: int
    resumed_files: int  # units finished by an earlier run and kept
    documents: dict[str, int]  # by split
    tokens: dict[str, int]  # by split
    skipped: dict[str, int]  # by reason (inputs.REASONS)
    skipped_first: dict[str, str]  # the first place of each reason
    seconds: float
    tokens_per_s: float  # tokens tokenized by this run (not resumed) per second
    workers: int
    shards: dict[str, int] = field(default_factory=dict)  # by split

    def __str__(self) -> str:
        splits = "; ".join(f"{s}: {self.documents[s]:,} documents, {self.tokens[s]:,} tokens in "
                           f"{self.shards[s]} shards" for s in self.documents)
        skipped = ", ".join(f"{n:,} {r} (first: {self.skipped_first[r]})"
                            for r, n in self.skipped.items()) or "none"
        return (f"prepared {self.output} from {self.files} files ({self.resumed_files} kept from an "
                f"earlier run): {splits}\nskipped: {skipped}\n{self.seconds:.1f} s, "
                f"{self.tokens_per_s:,.0f} tokens/s with {self.workers} worker(s)")


@dataclass(frozen=True)
class _Unit:
    """One input file's work."""

    index: int
    file: str
    output: str
    text_key: str
    heldout_every: int
    shard_tokens: int
    dtype: str


def _marker(unit: _Unit) -> Path:
    return Path(unit.output) / UNITS / f"{unit.index:05d}.json"


def _finished(unit: _Unit) -> dict[str, Any] | None:
    """The unit's marker when it and every shard it names are complete, else None."""
    try:
        marker = _read_json(_marker(unit))
        same_file = (marker["file"], marker["version"]) == (unit.file, file_version(unit.file))
        if not same_file or set(marker["shards"]) != set(SPLITS):
            return None
        for shard in (s for split in marker["shards"].values() for s in split):
            for kind in ("tokens", "docs"):
                file = Path(unit.output) / shard[f"{kind}_file"]
                if not file.is_file() or file.stat().st_size != shard[f"{kind}_bytes"]:
                    return None
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: redo the unit
        return None
    return marker


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` (ValueError when it is not one)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no JSON object")
    return data


def _documents(unit: _Unit, tokenizer: Tokenizer, skips: Skips) -> Iterator[tuple[str, np.ndarray]]:
    """(split, token ids) of each document of the unit's file, in order."""
    every, dtype = unit.heldout_every, np.dtype(unit.dtype)
    for j, text in enumerate(read_documents(unit.file, unit.text_key, skips)):
        held = every and (unit.index + j) % every == every - 1
        yield ("heldout" if held else "train"), np.asarray(document_ids(tokenizer, text), dtype)


def _run_unit(unit: _Unit, tokenizer: Tokenizer) -> dict[str, Any]:
    """Tokenize one file into its shards and marker; return the marker."""
    skips, version = Skips(), file_version(unit.file)
    shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    pending: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    size = dict.fromkeys(SPLITS, 0)

    def flush(split: str) -> None:
        name = f"{split}-{unit.index:05d}-{len(shards[split]):04d}"
        shards[split].append(write_shard(unit.output, name, pending[split], np.dtype(unit.dtype)))
        pending[split], size[split] = [], 0

    for split, ids in _documents(unit, tokenizer, skips):
        pending[split].append(ids)
        size[split] += len(ids)
        if size[split] >= unit.shard_tokens:
            flush(split)
    for split in SPLITS:
        if pending[split]:
            flush(split)
    marker = {"file": unit.file, "version": version, "unit": unit.index, "shards": shards,
              "skipped": skips.state}
    write_json(_marker(unit), marker)
    return marker


_WORKER_TOKENIZER: Tokenizer | None = None  # a pool worker's own tokenizer


def _init_worker(tokenizer: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer)


def _pool_unit(unit: _Unit) -> dict[str, Any]:
    return _run_unit(unit, _WORKER_TOKENIZER)


def _manifest(files: list[str], tokenizer_name: str, tokenizer: Tokenizer, text_key: str,
              heldout_every: int, shard_mb: float) -> dict[str, Any]:
    info: dict[str, Any] = {"name": tokenizer_name, "vocab_size": tokenizer.vocab_size,
                            "eos_id": tokenizer.eos_id}
    if tokenizer_name != "byte":
        info["sha256"] = hashlib.sha256(Path(tokenizer_name).read_bytes()).hexdigest()
    return {"format": FORMAT, "version": VERSION, "inputs": files, "tokenizer": info,
            "dtype": token_dtype(tokenizer.vocab_size).name, "text_key": text_key,
            "heldout_every": heldout_every, "shard_mb": shard_mb}


def _claim_output(output: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Make `output` hold `manifest`'s dataset: new, resumed (the same manifest, no `overwrite`) or
    replaced (`overwrite`; only a prepared dataset, never a directory of other files)."""
    ours = output / MANIFEST
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a directory")
    if output.is_dir() and any(output.iterdir()):
        known = ours.is_file() or (output / INDEX).is_file()
        try:
            same = ours.is_file() and _read_json(ours) == manifest
        except (OSError, ValueError):
            same = False
        if not known:
            raise UserError(f"--output {output} is not empty and holds no prepared dataset; choose a new "
                            f"or empty directory")
        if not same and not overwrite:
            raise UserError(f"--output {output} holds another prepared dataset (other inputs, tokenizer "
                            f"or settings); pass --overwrite to replace it or choose another directory")
        if overwrite:
            shutil.rmtree(output)
    (output / UNITS).mkdir(parents=True, exist_ok=True)
    write_json(ours, manifest)


def prepare_dataset(inputs: Sequence[str], output: str, tokenizer: str = "byte", *, workers: int = 1,
                    text_key: str = "text", heldout_every: int = 16, shard_mb: float = 256,
                    overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Tokenize the documents of `inputs` (files, directories, globs, URLs) with `tokenizer` ("byte" or
    a tokenizer.json path) into the token store `output`, one input file per unit of work on `workers`
    processes (0 or 1: in this process); resume a run of the same dataset that stopped."""
    if workers < 0 or shard_mb <= 0:
        raise UserError(f"--workers={workers} must be >= 0 and --shard-mb={shard_mb} > 0")
    if heldout_every < 0 or heldout_every == 1:
        raise UserError(f"--heldout-every={heldout_every} must be 0 (no held-out split) or >= 2")
    start = time.perf_counter()
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    manifest = _manifest(files, tokenizer, tok, text_key, heldout_every, shard_mb)
    out = Path(output)
    _claim_output(out, manifest, overwrite)
    dtype = np.dtype(manifest["dtype"])
    units = [_Unit(i, f, str(out), text_key, heldout_every, max(1, int(shard_mb * 2**20) // dtype.itemsize),
                   dtype.name) for i, f in enumerate(files)]
    markers = {u.index: m for u in units if (m := _finished(u)) is not None}
    todo = [u for u in units if u.index not in markers]
    resumed, new_tokens = len(markers), 0
    bar = tqdm(total=len(units), initial=resumed, unit="file", disable=not progress, desc="prepare")
    executor = None
    if workers > 1 and len(todo) > 1:  # spawned: no fork of a process that may have started jax
        executor = ProcessPoolExecutor(min(workers, len(todo)), multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(tokenizer,))
        results = (f.result() for f in as_completed([executor.submit(_pool_unit, u) for u in todo]))
    else:
        results = (_run_unit(u, tok) for u in todo)
    try:
        for marker in results:
            markers[marker["unit"]] = marker
            new_tokens += sum(s["tokens"] for split in marker["shards"].values() for s in split)
            bar.update(1)
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):,.0f} tokens/s")
    except BrokenProcessPool:
        raise UserError("a prepare worker process died (out of memory? killed?); re-run the same "
                        "command to resume, with fewer --workers if memory is short") from None
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
    index = _index(manifest, [markers[u.index] for u in units])
    for tmp in out.glob(".*.tmp"):  # left by a worker that was stopped mid-write
        tmp.unlink()
    write_json(out / INDEX, index)
    seconds = time.perf_counter() - start
    splits = {s: index["splits"][s] for s in SPLITS if s in index["splits"]}
    return PrepareReport(
        output=str(out), files=len(units), resumed_files=resumed,
        documents={s: sum(x["documents"] for x in shards) for s, shards in splits.items()},
        tokens={s: sum(x["tokens"] for x in shards) for s, shards in splits.items()},
        shards={s: len(shards) for s, shards in splits.items()},
        skipped=index["skipped"], skipped_first=index["skipped_first"], seconds=seconds,
        tokens_per_s=new_tokens / seconds, workers=max(1, min(workers, len(todo))))


def _index(manifest: dict[str, Any], markers: list[dict[str, Any]]) -> dict[str, Any]:
    """The store's index: the manifest, each split's shards in unit order, the skips; a UserError when
    no document was kept."""
    skips = Skips()
    for marker in markers:
        skips.merge(Skips(marker["skipped"]))
    splits = {s: [x for m in markers for x in m["shards"][s]] for s in SPLITS}
    splits = {s: shards for s, shards in splits.items() if shards}
    if not splits:
        raise UserError(f"the inputs hold no document to keep (skipped: {skips}); check the files and "
                        f"--text-key")
    return {**manifest, "splits": splits, "skipped": skips.counts(),
            "skipped_first": {r: e["first"] for r, e in sorted(skips.state.items())},
            "skip_reasons": {r: REASONS[r] for r in sorted(skips.state)}}
