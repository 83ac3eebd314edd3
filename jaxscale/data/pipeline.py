"""Training batches through grain: global batch `k` is one element, this process's rows of it.

`grain.MapDataset.range(k0, ...)` maps each global batch index `k` to the rows of batch `k` that this
process holds (`process_rows` positions). Row position `j = k * B + i` of the global row stream is
drawn from one source (several: `grain.MapDataset.mix` by weight) and, in that source, from its own
epoch shuffle (seeded by `(seed, source, epoch)`: `RowOrder`). Every element is a pure
function of `k`, so a resume only needs the number of batches taken: it is exact under any number of
processes or prefetch workers.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np

from jaxscale.errors import UserError

WHOLE = 1 << 20  # a source of fewer rows shuffles each epoch with numpy (8 MiB; RowOrder._epoch)


class RowSource(Protocol):
    """What the pipeline reads: `PackedTokens`, `TokenStore` or `SceneExamples`."""

    seq_len: int

    @property
    def num_rows(self) -> int: ...

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


def epoch_seed(seed: int, source: int, epoch: int) -> int:
    """The 32-bit shuffle seed of `source`'s epoch `epoch` in a run of `seed`."""
    return int(np.random.SeedSequence((seed, source, epoch)).generate_state(1)[0])


class RowOrder:
    """One source's endless row order: epoch `e` visits the first `epoch_rows` rows of a shuffle of
    all `num_rows` (identity without shuffle)."""

    def __init__(self, num_rows: int, epoch_rows: int, seed: int, source: int, shuffle: bool):
        self.num_rows, self.epoch_rows = num_rows, epoch_rows
        self.seed, self.source, self.shuffle = seed, source, shuffle
        self._epochs: dict[int, grain.MapDataset | np.ndarray] = {}

    def _epoch(self, epoch: int) -> grain.MapDataset | np.ndarray:
        """Epoch `epoch`'s shuffle: grain's index shuffle (no memory per row), or for fewer than `WHOLE`
        rows a numpy permutation (grain's is slow per call on small ranges: ~40 ms per range)."""
        if epoch not in self._epochs:
            if len(self._epochs) > 1:  # batches move forward: keep the latest two epochs
                del self._epochs[min(self._epochs)]
            seed = epoch_seed(self.seed, self.source, epoch)
            self._epochs[epoch] = (np.random.default_rng(seed).permutation(self.num_rows)
                                   if self.num_rows < WHOLE
                                   else grain.MapDataset.range(self.num_rows).shuffle(seed=seed))
        return self._epochs[epoch]

    def __call__(self, stream: np.ndarray) -> np.ndarray:
        """The row index of each position `stream` of this source's row stream."""
        epochs, offsets = np.divmod(np.asarray(stream, np.int64), self.epoch_rows)
        if not self.shuffle:
            return offsets
        rows = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            at, order = epochs == epoch, self._epoch(int(epoch))
            rows[at] = (order[offsets[at]] if isinstance(order, np.ndarray)
                        else [order[int(i)] for i in offsets[at]])
        return rows


def _tag(source: int, index: int) -> tuple[int, int]:
    return source, index


class GlobalBatchRows:
    """Global batch index `k` -> this process's rows of batch `k` (positions `rows`), as a dict of
    numpy arrays; picklable when the sources are (it runs in grain's worker processes)."""

    def __init__(self, sources: Sequence[RowSource], weights: Sequence[float], global_batch_size: int,
                 rows: np.ndarray, seed: int, shuffle: bool):
        self.sources, self.rows, self.global_batch_size = list(sources), np.asarray(rows), global_batch_size
        if len(sources) == 1:  # epochs of whole batches: the incomplete last batch is dropped
            steps = sources[0].num_rows // global_batch_size
            self.orders = [RowOrder(sources[0].num_rows, steps * global_batch_size, seed, 0, shuffle)]
            self.mix = None
        else:  # each source cycles through its own epochs as the mixture draws from it
            self.orders = [RowOrder(s.num_rows, s.num_rows, seed, i, shuffle) for i, s in enumerate(sources)]
            self.mix = grain.MapDataset.mix(
                [grain.MapDataset.range(sys.maxsize).map(functools.partial(_tag, i))
                 for i in range(len(sources))], list(weights))

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        positions = k * self.global_batch_size + self.rows
        if self.mix is None:
            return self.sources[0].rows(self.orders[0](positions))
        drawn = np.array([self.mix[int(j)] for j in positions], np.int64).reshape(-1, 2)
        batch: dict[str, np.ndarray] = {}
        for s in np.unique(drawn[:, 0]):
            mine = np.flatnonzero(drawn[:, 0] == s)
            part = self.sources[s].rows(self.orders[s](drawn[mine, 1]))
            for key, value in part.items():
                if key not in batch:
                    batch[key] = np.empty((len(positions), *value.shape[1:]), value.dtype)
                batch[key][mine] = value
        return batch


class DataIterator:
    """Yields this process's slice of each global batch of rows, as a dict of numpy arrays.

    One source: epoch `e` visits `steps_per_epoch` global batches of a shuffle of its rows (an
    incomplete last batch is dropped). Several (`weights`): each row of the stream comes from a source
    drawn by weight, each source with its own epoch shuffle. Process `p` of `P` keeps rows
    `[p * B / P, (p + 1) * B / P)` of every global batch, or the positions in `rows` (those its
    devices hold under the batch sharding: `loader.process_rows`). `workers > 0` builds batches in
    that many grain worker processes, ahead of the training step (the sources must pickle).
    """

    def __init__(self, sources: RowSource | Sequence[RowSource], global_batch_size: int, seed: int,
                 shuffle: bool = True, process_index: int | None = None,
                 process_count: int | None = None, rows: np.ndarray | None = None,
                 weights: Sequence[float] | None = None, workers: int = 0):
        self.sources = list(sources) if isinstance(sources, list | tuple) else [sources]
        self.weights = [1.0] if weights is None else [float(w) for w in weights]
        self.global_batch_size, self.seed, self.shuffle, self.workers = (
            global_batch_size, seed, shuffle, workers)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size < 1 or global_batch_size % self.process_count:
            raise UserError(f"train.global_batch_size={global_batch_size} must be a positive "
                            f"multiple of the process count {self.process_count}")
        if seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed}")
        if workers < 0:
            raise UserError(f"data.workers={workers} must be 0 (in-process) or more worker processes")
        if len(self.weights) != len(self.sources) or min(self.weights) <= 0:
            raise UserError(f"mixture weights {self.weights} must be positive, one per source")
        if len(self.sources) == 1 and self.rows_per_epoch < global_batch_size:
            raise UserError(f"the corpus packs into {self.rows_per_epoch} rows of data.seq_len="
                            f"{self.sources[0].seq_len}, fewer than one batch of "
                            f"train.global_batch_size={global_batch_size}; lower either or add text")
        local = global_batch_size // self.process_count
        self._rows = (np.arange(self.process_index * local, (self.process_index + 1) * local)
                      if rows is None else np.asarray(rows))
        self.batch = 0  # global batches taken
        self._it: Any = None

    @property
    def rows(self) -> np.ndarray:
        """The positions of each global batch this process reads."""
        return self._rows

    @rows.setter
    def rows(self, rows: np.ndarray) -> None:
        self.close()
        self._rows = np.asarray(rows)

    @property
    def rows_per_epoch(self) -> int:
        """Number of rows of all sources (one epoch of a single source visits all but the dropped
        incomplete batch)."""
        return sum(s.num_rows for s in self.sources)

    @property
    def steps_per_epoch(self) -> int:
        """Number of full global batches in an epoch (of all sources' rows, for a mixture)."""
        return self.rows_per_epoch // self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.batch // self.steps_per_epoch

    @property
    def step_in_epoch(self) -> int:
        """The next batch's index in its epoch."""
        return self.batch % self.steps_per_epoch

    def dataset(self, start: int = 0) -> grain.MapDataset:
        """Global batches `start, start + 1, ...` as a grain dataset of this process's rows."""
        return grain.MapDataset.range(start, sys.maxsize).map(GlobalBatchRows(
            self.sources, self.weights, self.global_batch_size, self._rows, self.seed, self.shuffle))

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = iter(self._iter_dataset(self.batch))
        batch = next(self._it)
        self.batch += 1
        return batch

    def _iter_dataset(self, start: int) -> grain.IterDataset:
        ds = self.dataset(start).to_iter_dataset(grain.ReadOptions(num_threads=0))
        if not self.workers:
            return ds
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag in mp_prefetch (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                           per_worker_buffer_size=2))

    def close(self) -> None:
        """Stop the prefetch workers (the next batch starts new ones)."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def __enter__(self) -> DataIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_state(self) -> dict[str, Any]:
        """Return the JSON-serialisable position of the next batch, and what it must be resumed with."""
        state: dict[str, Any] = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                                 "seed": self.seed, "global_batch_size": self.global_batch_size,
                                 "rows_per_epoch": self.rows_per_epoch}
        if len(self.sources) > 1:
            state["mixture"] = self._mixture()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state()` result (of any process or worker count); the data must match
        the run that saved it."""
        saved = {"mixture": None, **state}  # a single source's state names no mixture
        for key, value in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                           ("rows_per_epoch", self.rows_per_epoch), ("mixture", self._mixture())):
            if key in saved and saved[key] != value:
                raise UserError(f"the data state being restored has {key}={saved[key]} but this "
                                f"run has {value}; restore the original data, "
                                f"seed and batch settings or start a new run_dir")
        if not 0 <= state["step_in_epoch"] < self.steps_per_epoch or state["epoch"] < 0:
            raise UserError(f"invalid data state {state}; start a new run_dir")
        self.close()
        self.batch = int(state["epoch"]) * self.steps_per_epoch + int(state["step_in_epoch"])

    def _mixture(self) -> list[list[float]] | None:
        if len(self.sources) == 1:
            return None
        return [[s.num_rows, w] for s, w in zip(self.sources, self.weights, strict=True)]
