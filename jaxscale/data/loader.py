"""Deterministic, resumable batches of packed rows, and their assembly into global jax.Arrays."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from jaxscale.data.corpus import load_documents, split_documents
from jaxscale.data.packing import PackedTokens, pack_documents
from jaxscale.data.scenes import ANSWERS, SceneExamples, make_scenes
from jaxscale.data.tokenizer import Tokenizer, load_tokenizer
from jaxscale.errors import UserError

HELDOUT_SEED_OFFSET = 1_000_003  # held-out scenes: a seed no training run of seed < this uses


class DataIterator:
    """Yields this process's slice of each global batch of rows, as a dict of numpy arrays.

    Epoch `e` visits the rows in the order `default_rng((seed, e)).permutation` (identity without
    shuffle), `global_batch_size` rows per step; an incomplete last batch is dropped. Process `p` of
    `P` keeps rows `[p * B / P, (p + 1) * B / P)` of every global batch, or the positions in `rows`
    (those its devices hold under the batch sharding: see `process_rows`).
    """

    def __init__(self, packed: PackedTokens, global_batch_size: int, seed: int,
                 shuffle: bool = True, process_index: int | None = None,
                 process_count: int | None = None, rows: np.ndarray | None = None):
        self.packed = packed
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size < 1 or global_batch_size % self.process_count:
            raise UserError(f"train.global_batch_size={global_batch_size} must be a positive "
                            f"multiple of the process count {self.process_count}")
        if seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed}")
        if packed.num_rows < global_batch_size:
            raise UserError(f"the corpus packs into {packed.num_rows} rows of data.seq_len="
                            f"{packed.seq_len}, fewer than one batch of train.global_batch_size="
                            f"{global_batch_size}; lower either or add text")
        local = global_batch_size // self.process_count
        self.rows = (np.arange(self.process_index * local, (self.process_index + 1) * local)
                     if rows is None else np.asarray(rows))
        self.epoch = 0
        self.step_in_epoch = 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    @property
    def rows_per_epoch(self) -> int:
        """Number of packed rows (each epoch visits all but the dropped incomplete batch)."""
        return self.packed.num_rows

    @property
    def steps_per_epoch(self) -> int:
        """Number of full global batches in an epoch."""
        return self.rows_per_epoch // self.global_batch_size

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._order_epoch != self.epoch:
            n = self.rows_per_epoch
            rng = np.random.default_rng((self.seed, self.epoch))
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        batch = self.packed.rows(self._order[self.step_in_epoch * self.global_batch_size + self.rows])
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return batch

    def get_state(self) -> dict[str, int]:
        """Return the JSON-serialisable position of the next batch."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "rows_per_epoch": self.rows_per_epoch}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state()` result; the data must match the run that saved it."""
        for key in ("seed", "global_batch_size", "rows_per_epoch"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"the data state being restored has {key}={state[key]} but this "
                                f"run has {getattr(self, key)}; restore the original data, "
                                f"seed and batch settings or start a new run_dir")
        if not 0 <= state["step_in_epoch"] < self.steps_per_epoch or state["epoch"] < 0:
            raise UserError(f"invalid data state {state}; start a new run_dir")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


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
    if config.data.source == "scenes":
        rows = scene_examples(config, config.data.num_examples, tokenizer)
    else:
        docs = load_documents(config.data.source, config.data.text_key)
        docs = split_documents(docs, config.data.heldout_every, "train")  # keeps the first
        rows = pack_documents(docs, tokenizer, config.data.seq_len)
    if config.model.attention == "cudnn" and (
            most := rows.max_documents_per_row()) > config.model.max_documents:
        raise UserError(f"a row of data.seq_len={config.data.seq_len} holds up to {most} documents, "
                        f"more than model.max_documents={config.model.max_documents} that cuDNN "
                        f"attention separates; set model.max_documents={most}")
    iterator = DataIterator(rows, config.train.global_batch_size, config.seed,
                            shuffle=config.data.shuffle)
    return tokenizer, iterator


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
