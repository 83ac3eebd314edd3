"""The training data a config describes (its sources, mixture and iterator), and global jax.Arrays from
process rows."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from jaxscale.data.corpus import load_documents, split_documents
from jaxscale.data.packing import pack_documents
from jaxscale.data.pipeline import DataIterator, RowSource
from jaxscale.data.scenes import ANSWERS, SceneExamples, make_scenes
from jaxscale.data.store import TokenStore, is_store
from jaxscale.data.tokenizer import Tokenizer, load_tokenizer
from jaxscale.errors import UserError

HELDOUT_SEED_OFFSET = 1_000_003  # held-out scenes: a seed no training run of seed < this uses


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold under `sharding`, ascending.

    A contiguous block per process on the usual layouts; interleaved blocks when an inner batch
    axis spans processes; the whole batch when processes are replicas (e.g. pipeline stages).
    """
    held = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        held.update(range(*index[0].indices(global_batch_size)))
    return np.array(sorted(held))


def make_global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
                      global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """Assemble each process's local batch (its `process_rows`, in order) into global arrays laid
    out by `sharding`; `global_batch_size` is needed when processes hold overlapping rows."""
    return {k: jax.make_array_from_process_local_data(
        sharding, v, None if global_batch_size is None else (global_batch_size, *v.shape[1:]))
        for k, v in local.items()}


def build_data(config: ml_collections.ConfigDict) -> tuple[Tokenizer, DataIterator]:
    """Return the tokenizer and the training-batch iterator that `config.data` describes."""
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} ids but "
                        f"model.vocab_size={config.model.vocab_size}; raise model.vocab_size to at "
                        f"least {tokenizer.vocab_size}")
    mixture = parse_mixture(config.data.mixture)
    if config.data.source == "scenes":
        if mixture:
            raise UserError("data.mixture mixes text sources; unset it for data.source='scenes'")
        sources = [scene_examples(config, config.data.num_examples, tokenizer)]
    else:
        sources = [text_rows(config, path, tokenizer) for path in (mixture or [config.data.source])]
    for rows in sources:
        if config.model.attention == "cudnn" and (
                most := rows.max_documents_per_row()) > config.model.max_documents:
            raise UserError(f"a row of data.seq_len={config.data.seq_len} holds up to {most} documents, "
                            f"more than model.max_documents={config.model.max_documents} that cuDNN "
                            f"attention separates; set model.max_documents={most}")
    iterator = DataIterator(sources, config.train.global_batch_size, config.seed,
                            shuffle=config.data.shuffle, weights=list(mixture.values()) or None,
                            workers=config.data.workers)
    return tokenizer, iterator


def text_rows(config: ml_collections.ConfigDict, source: str, tokenizer: Tokenizer) -> RowSource:
    """Training rows of a text source: a prepared store's "train" split (read in place) or "embedded" /
    a .txt / .jsonl path (tokenized and packed here; every `data.heldout_every`-th document held out)."""
    if source != "embedded" and is_store(source):
        store = TokenStore.open(source, "train", seq_len=config.data.seq_len)
        made = store.index["tokenizer"]
        if (made["vocab_size"], made["eos_id"]) != (tokenizer.vocab_size, tokenizer.eos_id):
            raise UserError(f"{source} was prepared with tokenizer {made['name']} ({made['vocab_size']} "
                            f"ids), not data.tokenizer={config.data.tokenizer} ({tokenizer.vocab_size} "
                            f"ids); set data.tokenizer={made['name']} or prepare the data again")
        return store
    docs = split_documents(load_documents(source, config.data.text_key), config.data.heldout_every, "train")
    return pack_documents(docs, tokenizer, config.data.seq_len)


def parse_mixture(spec: str) -> dict[str, float]:
    """`"path_a:0.7,path_b:0.3"` -> `{path: weight}` (`{}` for ""); each path a prepared store or a text
    source, each weight positive (they need not sum to 1)."""
    mixture: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path, _, weight = part.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not path or not value > 0 or not np.isfinite(value):
            raise UserError(f"data.mixture entry {part!r} is not path:weight with a positive weight; "
                            f"write e.g. data.mixture='data/a:0.7,data/b:0.3'")
        if path != "embedded" and not is_store(path) and not os.path.exists(path):
            raise UserError(f"data.mixture source {path} does not exist; give a prepared dataset "
                            f"directory, a .txt / .jsonl path or 'embedded'")
        if path in mixture:
            raise UserError(f"data.mixture names {path} twice; give each source once")
        mixture[path] = value
    if len(mixture) == 1:
        raise UserError(f"data.mixture={spec!r} names one source; set data.source to it instead")
    return mixture


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of each array of a global batch of `config.data`."""
    b, s = config.train.global_batch_size, config.data.seq_len
    shapes = {k: ((b, s), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    shapes["loss_mask"] = ((b, s), np.float32)
    if config.data.source == "scenes":
        size = config.model.vision.image_size
        shapes.update(images=((b, config.data.frames, size, size, 3), np.float32),
                      answer_start=((b,), np.int32), answer_id=((b,), np.int32),
                      captions=((b, s), np.int32),
                      caption_mask=((b, s), np.float32))
    return shapes


def scene_examples(config: ml_collections.ConfigDict, n: int, tokenizer: Tokenizer,
                   heldout: bool = False) -> SceneExamples:
    """`n` examples of the embedded image/clip question-answering task (`data.source=scenes`);
    `heldout` ones come from another seed than training's."""
    if config.model.family == "clip" and config.model.fusion.n_answers != len(ANSWERS):
        raise UserError(f"model.fusion.n_answers={config.model.fusion.n_answers} but the scenes task has "
                        f"{len(ANSWERS)} answers; set model.fusion.n_answers={len(ANSWERS)}")
    seed = config.seed + (HELDOUT_SEED_OFFSET if heldout else 0)
    scenes = make_scenes(n, seed, image_size=config.model.vision.image_size,
                         frames=config.data.frames)
    return SceneExamples(scenes, tokenizer, config.data.seq_len, config.data.seq_len)
