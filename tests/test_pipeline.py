"""The grain training pipeline: exact resume (workers 0 and 2, 1 -> 2 processes), mixing, stores."""

import json

import grain
import numpy as np
import pytest

from jaxscale.config import base_config
from jaxscale.data import ByteTokenizer, DataIterator, build_data, load_documents, pack_documents
from jaxscale.data.loader import parse_mixture
from jaxscale.data.packing import PackedTokens
from jaxscale.data.pipeline import WHOLE, GlobalBatchRows, RowOrder
from jaxscale.data.store import FORMAT, INDEX, VERSION, TokenStore, token_dtype, write_json, write_shard
from jaxscale.data.tokenizer import document_ids
from jaxscale.errors import UserError
from jaxscale.infer.evaluate import eval_rows

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="module")
def packed():
    return pack_documents(load_documents("embedded"), ByteTokenizer(), 32)


def constant(value: int, rows: int) -> PackedTokens:
    """A source whose every token is `value` (its rows are told apart by `segments`' row index)."""
    n = rows * 4 + 1
    return PackedTokens(np.full(n, value, np.int32), np.arange(n, dtype=np.int32) // 4, 4)


def stacked(batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in KEYS}


def assert_same(a: list[dict], b: list[dict]) -> None:
    for k in KEYS:
        np.testing.assert_array_equal(stacked(a)[k], stacked(b)[k])


def resumed(make, state: dict, n: int) -> list[dict]:
    with make() as it:
        it.set_state(json.loads(json.dumps(state)))
        return [next(it) for _ in range(n)]


def test_resume_is_exact_across_epochs(packed):
    """Batches after set_state equal an uninterrupted run's, across epoch boundaries."""
    def make():
        return DataIterator(packed, 64, 7, process_index=0, process_count=1)

    it = make()
    straight = [next(it) for _ in range(2 * it.steps_per_epoch + 3)]
    stop = it.steps_per_epoch - 2
    it = make()
    for _ in range(stop):
        next(it)
    state = it.get_state()
    assert state["epoch"] == 0 and state["step_in_epoch"] == stop
    assert_same(resumed(make, state, len(straight) - stop), straight[stop:])
    epochs = [np.concatenate([b["inputs"][:, 0] for b in straight[e * stop:(e + 1) * stop]])
              for e in range(2)]
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch its own shuffle


def test_resume_with_worker_processes(packed):
    """workers=2 (grain mp_prefetch) yields the in-process run's batches, also after a resume."""
    def make(workers):
        return DataIterator(packed, 16, 3, process_index=0, process_count=1, workers=workers)

    it = make(0)
    straight = [next(it) for _ in range(8)]
    state = {**it.get_state(), "step_in_epoch": 5}
    assert_same(resumed(lambda: make(2), state, 3), straight[5:])


def test_one_process_resumes_into_two(packed):
    """A 1-process run's state restores into 2 processes: their rows are disjoint and, in order, make
    up the 1-process batch (contiguous halves, or interleaved positions)."""
    one = DataIterator(packed, 8, 5, process_index=0, process_count=1)
    for _ in range(4):
        next(one)
    state = one.get_state()
    expected = [next(one) for _ in range(3)]
    halves = [resumed(lambda p=p: DataIterator(packed, 8, 5, process_index=p, process_count=2), state, 3)
              for p in range(2)]
    for whole, a, b in zip(expected, *halves, strict=True):
        assert a["inputs"].shape == (4, 32)
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k])
    parts = [np.arange(p, 8, 2) for p in range(2)]  # an inner batch axis spanning the processes
    interleaved = [resumed(lambda r=r: DataIterator(packed, 8, 5, process_index=0, process_count=2,
                                                    rows=r), state, 3) for r in parts]
    for whole, a, b in zip(expected, *interleaved, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], whole[k][parts[0]])
            np.testing.assert_array_equal(b[k], whole[k][parts[1]])


def test_mixing_proportions_and_per_source_epochs():
    """0.7 / 0.3 over 2000 rows within 3 points; each source visits all its rows once per epoch;
    the mixture resumes exactly and its state names the mixture."""
    a, b = constant(1, 50), constant(2, 30)

    def make():
        return DataIterator([a, b], 20, 0, process_index=0, process_count=1, weights=[0.7, 0.3])

    it = make()
    batches = [next(it) for _ in range(100)]
    first = np.concatenate([x["inputs"][:, 0] for x in batches])
    assert len(first) == 2000 and abs(np.mean(first == 1) - 0.7) < 0.03
    it = make()
    for _ in range(37):
        next(it)
    state = it.get_state()
    assert state["mixture"] == [[50, 0.7], [30, 0.3]]
    assert_same(resumed(make, state, 5), batches[37:42])
    with pytest.raises(UserError, match="mixture="):
        DataIterator([a, b], 20, 0, process_index=0, process_count=1, weights=[0.5, 0.5]).set_state(state)


def test_each_source_shuffles_its_own_epochs():
    """Over the rows a mixture draws from a source, each epoch visits all its rows once, in its own order."""
    a, b = constant(1, 50), constant(2, 30)
    fn = GlobalBatchRows([a, b], [0.7, 0.3], 20, np.arange(20), 4, True)
    drawn = np.array([fn.mix[j] for j in range(200)])
    for s, n in ((0, 50), (1, 30)):
        picks = fn.orders[s](drawn[drawn[:, 0] == s, 1])
        assert sorted(picks[:n].tolist()) == list(range(n))  # an epoch visits every row once
        assert not np.array_equal(picks[:n], picks[n:2 * n])


@pytest.mark.parametrize("spec, match", [
    ("embedded:0.7", "names one source"),
    ("embedded:0.7,embedded:0.3", "twice"),
    ("embedded:0,{txt}:1", "positive weight"),
    ("embedded:-1,{txt}:1", "positive weight"),
    ("embedded:x,{txt}:1", "positive weight"),
    ("embedded,{txt}:1", "positive weight"),
    ("embedded:0.5,{missing}:0.5", "does not exist"),
])
def test_bad_mixture_is_a_user_error(tmp_path, spec, match):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    spec = spec.format(txt=tmp_path / "a.txt", missing=tmp_path / "nope")
    with pytest.raises(UserError, match=match):
        parse_mixture(spec)


def test_build_data_mixes_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 5000)
    config = base_config()
    config.data.mixture = f"embedded:0.7,{tmp_path / 'a.txt'}:0.3"
    _, it = build_data(config)
    assert parse_mixture(config.data.mixture) == {"embedded": 0.7, str(tmp_path / "a.txt"): 0.3}
    first = np.concatenate([next(it)["inputs"] for _ in range(25)])
    only_a = np.all(first == ord("a"), axis=1)
    assert abs(only_a.mean() - 0.3) < 0.05 and it.get_state()["mixture"][1][1] == 0.3
    config.data.source = "scenes"
    with pytest.raises(UserError, match="unset it for data.source='scenes'"):
        build_data(config)


def make_store(path, docs: dict[str, list[str]]):
    """A prepared store of `docs` per split, byte-tokenized (as `jaxscale prepare` writes it)."""
    tok = ByteTokenizer()
    path.mkdir()
    dtype = token_dtype(tok.vocab_size)
    splits = {split: [write_shard(path, f"{split}-{i}", [document_ids(tok, d)], dtype)
                      for i, d in enumerate(texts)] for split, texts in docs.items()}
    write_json(path / INDEX, {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "splits": splits,
                              "tokenizer": {"name": "byte", "vocab_size": tok.vocab_size,
                                            "eos_id": tok.eos_id}})
    return path


def test_training_reads_a_prepared_store(tmp_path):
    """data.source = a store: the same rows as packing the same documents in memory."""
    docs = [f"document {i}: " + "lorem ipsum " * (5 + i) for i in range(40)]
    store = make_store(tmp_path / "store", {"train": docs, "heldout": docs[:2]})
    config = base_config()
    config.data.update(source=str(store), seq_len=32)
    config.train.global_batch_size = 8
    _, it = build_data(config)
    assert isinstance(it.sources[0], TokenStore)
    memory = DataIterator(pack_documents(docs, ByteTokenizer(), 32), 8, 0, process_index=0,
                          process_count=1)
    assert_same([next(it) for _ in range(4)], [next(memory) for _ in range(4)])
    index = json.loads((store / INDEX).read_text())
    index["tokenizer"].update(name="other.json", vocab_size=1000)
    write_json(store / INDEX, index)
    with pytest.raises(UserError, match="with tokenizer other.json .* set data.tokenizer=other.json"):
        build_data(config)


def test_large_sources_use_grains_index_shuffle():
    """From `WHOLE` rows on, an epoch's order is grain's index shuffle (no memory per row): a bijection
    per epoch, the same in every process, another in the next epoch."""
    n = WHOLE + 3
    order = RowOrder(n, n, 1, 0, True)
    first = order(np.arange(2000))
    assert len(set(first.tolist())) == 2000 and first.max() < n
    np.testing.assert_array_equal(RowOrder(n, n, 1, 0, True)(np.arange(2000)), first)
    assert not np.array_equal(order(np.arange(n, n + 2000)), first)
    assert isinstance(order._epoch(0), grain.MapDataset)


def test_eval_reads_a_stores_heldout_split(tmp_path):
    """`jaxscale eval` on a store: its "heldout" rows, scored inside each row's first document."""
    store = make_store(tmp_path / "store", {"train": ["t" * 200], "heldout": ["x" * 70, "y" * 70]})
    config = base_config()
    config.data.update(source=str(store), seq_len=32)
    rows = eval_rows(config, ByteTokenizer())
    assert rows["inputs"].shape == (4, 32)  # (2 * 71 - 1) // 32 rows of the held-out stream
    # row 2 holds x 64..69, eos, then y: its targets x..eos count, the first y's does not
    np.testing.assert_array_equal(rows["loss_mask"].sum(axis=1), [32, 32, 6, 32])
    config.data.mixture = f"{store}:0.5,embedded:0.5"
    with pytest.raises(UserError, match="training reads data.mixture"):
        eval_rows(config, ByteTokenizer())
