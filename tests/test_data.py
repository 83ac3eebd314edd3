"""Tests for the data pipeline: tokenizers, corpus, packing, the iterator and global batches."""

import json

import jax
import numpy as np
import pytest
import tokenizers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxscale.config import base_config
from jaxscale.data import (
    ByteTokenizer,
    DataIterator,
    HFTokenizer,
    build_data,
    load_documents,
    load_tokenizer,
    make_global_batch,
    pack_documents,
)
from jaxscale.data.pipeline import epoch_seed
from jaxscale.data.tokenizer import document_ids, prompt_ids
from jaxscale.errors import UserError

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="module")
def packed():
    return pack_documents(load_documents("embedded"), ByteTokenizer(), 32)


def _equal(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in KEYS)


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    text = "naïve café — 日本語 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.eos_id]) == text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def _save_bpe(path, special):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=special,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip(tmp_path):
    path = _save_bpe(tmp_path / "tokenizer.json", ["<pad>", "<|endoftext|>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == 1 and tok.vocab_size > 256
    text = "the quick fox — ünïcode"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and len(ids) < len(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_id]) == text


@pytest.mark.parametrize("template", ["<s> $A", "<s> $A </s>"])
def test_documents_and_prompts_carry_the_tokenizers_special_tokens(tmp_path, template):
    """A Llama-style tokenizer adds beginning-of-text; documents end with one eos, prompts none."""
    path = _save_bpe(tmp_path / "tokenizer.json", ["<pad>", "<s>", "</s>"])
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.save(str(path))
    tok = load_tokenizer(str(path))
    words = tok.encode("the lazy dog")
    assert document_ids(tok, "the lazy dog") == [1, *words, 2]
    assert prompt_ids(tok, "the lazy dog") == [1, *words]
    packed = pack_documents(["the lazy dog", "the quick fox"], tok, 4)
    assert packed.tokens.tolist() == [1, *words, 2, 1, *tok.encode("the quick fox"), 2]
    assert prompt_ids(ByteTokenizer(), "ab") == [97, 98] == document_ids(ByteTokenizer(), "ab")[:-1]


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="no end-of-sequence token"):
        HFTokenizer(_save_bpe(tmp_path / "noeos.json", ["<pad>"]))
    with pytest.raises(UserError, match=r"tokenizer file .*missing\.json not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match=r"cannot parse tokenizer file .*bad\.json"):
        load_tokenizer(str(bad))


def test_embedded_corpus():
    docs = load_documents("embedded")
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000
    text = "\n".join(docs)
    assert 'The "for" statement' in text and "while" in text
    assert docs == load_documents("embedded")


def test_file_sources(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second file\n\nstill second")
    (tmp_path / "sub" / "c.jsonl").write_text(
        json.dumps({"body": "x", "text": "line one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "sub" / "d.jsonl").write_text(json.dumps({"body": "y", "text": "z"}))
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "ignored.md").write_text("not data")
    assert load_documents(str(tmp_path / "b.txt")) == ["second file\n\nstill second"]
    assert load_documents(str(tmp_path / "sub" / "d.jsonl"), "body") == ["y"]
    assert load_documents(str(tmp_path)) == [
        "first", "second file\n\nstill second", "line one", "two", "z"]


def test_corpus_errors(tmp_path):
    cases = {
        "missing.txt": (None, "does not exist"),
        "empty.txt": (b"  \n", r"empty\.txt contains no text"),
        "latin1.txt": (b"ok caf\xe9", r"latin1\.txt is not valid UTF-8 \(byte offset 6\)"),
        "notes.md": (b"text", "unsupported extension '.md'"),
        "bad.jsonl": (b'{"text": "a"}\n{"text": oops}\n', r"bad\.jsonl:2 is not valid JSON"),
        "nokey.jsonl": (b'{"text": "a"}\n{"body": "b"}\n', r"nokey\.jsonl:2 has no string field"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=message):
            load_documents(str(tmp_path / name))
    (tmp_path / "nodata").mkdir()
    with pytest.raises(UserError, match=r"nodata has no \.txt or \.jsonl files"):
        load_documents(str(tmp_path / "nodata"))


def test_packing_hand_made():
    # Documents "ab", "cde", "f" -> stream a b <eos> c d e <eos> f <eos> (9 tokens); seq_len 3 packs
    # (9 - 1) // 3 = 2 rows: windows [0:4] and [3:7].
    packed = pack_documents(["ab", "cde", "f"], ByteTokenizer(), 3)
    a, e = ord("a"), 256
    np.testing.assert_array_equal(packed.tokens, [a, a + 1, e, a + 2, a + 3, a + 4, e, a + 5, e])
    np.testing.assert_array_equal(packed.segments, [0, 0, 0, 1, 1, 1, 1, 2, 2])
    assert packed.num_rows == 2
    rows = packed.rows(np.array([0, 1]))
    np.testing.assert_array_equal(rows["inputs"], [[a, a + 1, e], [a + 2, a + 3, a + 4]])
    np.testing.assert_array_equal(rows["targets"], [[a + 1, e, a + 2], [a + 3, a + 4, e]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(rows["loss_mask"], np.ones((2, 3)))
    assert all(rows[k].dtype == np.int32 for k in KEYS[:4])
    assert rows["loss_mask"].dtype == np.float32

    # seq_len 4: one row [0:5] = a b <eos> c d, spanning two documents.
    row = pack_documents(["ab", "cde", "f"], ByteTokenizer(), 4).rows(np.array([0]))
    np.testing.assert_array_equal(row["segment_ids"], [[1, 1, 1, 2]])
    np.testing.assert_array_equal(row["positions"], [[0, 1, 2, 0]])
    # Row 1 of seq_len 2 starts mid-document ("b <eos>" then "c"): renumbered from 1, position 0.
    row = pack_documents(["ab", "cde", "f"], ByteTokenizer(), 2).rows(np.array([1, 2]))
    np.testing.assert_array_equal(row["inputs"], [[e, a + 2], [a + 3, a + 4]])
    np.testing.assert_array_equal(row["segment_ids"], [[1, 2], [1, 1]])
    np.testing.assert_array_equal(row["positions"], [[0, 0], [0, 1]])


def test_documents_per_row(tmp_path):
    """The most documents in a row, against counting them in every row; build_data refuses a
    corpus with more than cuDNN attention's `model.max_documents`."""
    rng = np.random.default_rng(0)
    docs = ["x" * n for n in rng.integers(1, 12, 400)]
    short = pack_documents(docs, ByteTokenizer(), 32)
    seg = short.rows(np.arange(short.num_rows))["segment_ids"]
    assert short.max_documents_per_row() == seg.max() > 5
    assert pack_documents(["ab", "cde", "f"], ByteTokenizer(), 3).max_documents_per_row() == 1
    assert pack_documents(["ab", "cde", "f"], ByteTokenizer(), 4).max_documents_per_row() == 2
    config = base_config()
    config.data.source = str(tmp_path / "short.jsonl")
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config.data.seq_len, config.data.heldout_every = 32, 0
    config.train.global_batch_size, config.model.attention = 4, "cudnn"
    config.model.max_documents = int(seg.max())
    build_data(config)
    config.model.max_documents -= 1
    with pytest.raises(UserError, match=f"holds up to {seg.max()} documents, more than "
                                        f"model.max_documents={seg.max() - 1} .* set "
                                        f"model.max_documents={seg.max()}"):
        build_data(config)


def test_packing_too_short():
    with pytest.raises(UserError, match="too few for one row of data.seq_len=64"):
        pack_documents(["tiny"], ByteTokenizer(), 64)


def test_iterator_determinism_and_seeds(packed):
    a, b, c = (DataIterator(packed, 8, s, process_index=0, process_count=1) for s in (0, 0, 1))
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        assert _equal(x, y) and not _equal(x, z)
        assert x["inputs"].shape == (8, 32)
    plain = DataIterator(packed, 8, 0, shuffle=False, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(plain)["inputs"], packed.rows(np.arange(8))["inputs"])


def test_iterator_resume(packed):
    it = DataIterator(packed, 8, 3, process_index=0, process_count=1)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = DataIterator(packed, 8, 3, process_index=0, process_count=1)
    resumed.set_state(state)
    assert all(_equal(x, next(resumed)) for x in expected)
    with pytest.raises(UserError, match="seed=3 but this run has 4"):
        DataIterator(packed, 8, 4, process_index=0, process_count=1).set_state(state)


def test_epoch_rollover():
    packed = pack_documents(["abcdefghijklmnopqrstuvwxyz" * 4], ByteTokenizer(), 10)
    it = DataIterator(packed, 3, 0, process_index=0, process_count=1)
    assert (it.rows_per_epoch, it.steps_per_epoch) == (10, 3)
    first = [next(it)["inputs"] for _ in range(3)]
    assert it.get_state()["epoch"] == 1 and it.get_state()["step_in_epoch"] == 0
    seen = np.concatenate(first)[:, 0]
    assert len(set(seen.tolist())) == 9  # 9 distinct rows, the 10th is the dropped tail
    second = [next(it)["inputs"] for _ in range(3)]
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    order = np.random.default_rng(epoch_seed(0, 0, 1)).permutation(10)  # epoch 1's shuffle
    expected = packed.rows(order[:9])["inputs"]
    np.testing.assert_array_equal(np.concatenate(second), expected)


def test_process_slices(packed):
    whole = DataIterator(packed, 8, 5, process_index=0, process_count=1)
    parts = [DataIterator(packed, 8, 5, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        full, p0, p1 = next(whole), next(parts[0]), next(parts[1])
        assert p0["inputs"].shape == (4, 32)
        assert all(np.array_equal(full[k], np.concatenate([p0[k], p1[k]])) for k in KEYS)
    with pytest.raises(UserError, match="multiple of the process count 3"):
        DataIterator(packed, 8, 0, process_index=0, process_count=3)


def test_make_global_batch(packed):
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    local = next(DataIterator(packed, 2 * n, 0))
    batch = make_global_batch(local, sharding)
    for k in KEYS:
        assert batch[k].shape == (2 * n, 32) and batch[k].sharding == sharding
        assert batch[k].addressable_shards[0].data.shape == (2, 32)
        np.testing.assert_array_equal(np.asarray(batch[k]), local[k])


def test_build_data(tmp_path):
    config = base_config()
    tokenizer, it = build_data(config)
    assert isinstance(tokenizer, ByteTokenizer) and it.steps_per_epoch > 100
    assert next(it)["inputs"].shape == (16, 128)
    config.model.vocab_size = 200
    with pytest.raises(UserError, match="raise model.vocab_size to at least 257"):
        build_data(config)
    config.model.vocab_size = 512
    config.data.source = str(tmp_path / "small.txt")
    (tmp_path / "small.txt").write_text("x" * 1000)
    with pytest.raises(UserError, match="packs into 7 rows .* fewer than one batch"):
        build_data(config)
