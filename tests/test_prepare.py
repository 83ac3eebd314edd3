"""`jaxscale prepare` and the token store: rows equal to in-memory packing, resume, worker counts,
input formats and every bad input as a counted skip or one clear line."""

import bz2
import gzip
import hashlib
import importlib.util
import json
import lzma
import pickle
from pathlib import Path

import numpy as np
import pytest

import jaxscale.data.prepare as prepare
from jaxscale.cli import main
from jaxscale.data.corpus import split_documents
from jaxscale.data.packing import pack_documents
from jaxscale.data.prepare import prepare_dataset
from jaxscale.data.store import TokenStore, is_store
from jaxscale.data.tokenizer import ByteTokenizer
from jaxscale.errors import UserError

SHARD_MB = 200 / 2**20  # 100 uint16 tokens per shard: most rows span two shards


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(1, 60))) + " é" for _ in range(n)]


def _jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return str(path)


def _tree(directory):
    """Every file of a directory, by relative path, as its sha256."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _prepare(inputs, out, **kw):
    return prepare_dataset([str(i) for i in inputs], str(out), "byte", progress=False,
                           **{"heldout_every": 4, "shard_mb": SHARD_MB, **kw})


def test_store_rows_equal_packed_rows_of_the_same_documents(tmp_path):
    docs = _docs(40)
    report = _prepare([_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "out")
    assert report.documents == {"train": 30, "heldout": 10} and report.shards["train"] > 5
    assert is_store(tmp_path / "out") and not is_store(tmp_path)
    for split in ("train", "heldout"):
        for seq_len in (1, 7, 32, 150):
            store = TokenStore.open(str(tmp_path / "out"), split, seq_len=seq_len)
            packed = pack_documents(split_documents(docs, 4, split), ByteTokenizer(), seq_len)
            assert store.num_rows == packed.num_rows
            rows = np.random.default_rng(seq_len).permutation(store.num_rows)
            got, want = store.rows(rows), packed.rows(rows)
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
            assert store.max_documents_per_row() == packed.max_documents_per_row()
    state = pickle.dumps(store)
    assert len(state) < 300  # by path, not by contents
    assert np.array_equal(pickle.loads(state).rows([1, 0])["inputs"], store.rows([1, 0])["inputs"])
    other = _docs(40, seed=1)  # the same shard names, rewritten: no stale mapping is read
    _prepare([_jsonl(tmp_path / "a.jsonl", other)], tmp_path / "out", overwrite=True)
    packed = pack_documents(split_documents(other, 4, "heldout"), ByteTokenizer(), 150)
    rows = TokenStore.open(str(tmp_path / "out"), "heldout", seq_len=150).rows([0])
    assert np.array_equal(rows["inputs"], packed.rows([0])["inputs"])


def test_a_run_stopped_midway_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    files = [_jsonl(tmp_path / f"{i}.jsonl", _docs(12, seed=i)) for i in range(4)]
    _prepare(files, tmp_path / "whole")
    read = prepare.read_documents

    def dies_on_the_third_file(file, *args):
        if file == files[2]:
            raise RuntimeError("killed")
        return read(file, *args)

    monkeypatch.setattr(prepare, "read_documents", dies_on_the_third_file)
    with pytest.raises(RuntimeError, match="killed"):
        _prepare(files, tmp_path / "resumed")
    assert not (tmp_path / "resumed/index.json").exists()
    with pytest.raises(UserError, match="no index.json"):
        TokenStore.open(str(tmp_path / "resumed"), seq_len=8)
    monkeypatch.setattr(prepare, "read_documents", read)
    next((tmp_path / "resumed").glob("train-00001-*.tokens.npy")).unlink()  # unit 1 lost a shard
    report = _prepare(files, tmp_path / "resumed")
    assert report.resumed_files == 1  # unit 0; unit 1 is redone
    assert _tree(tmp_path / "resumed") == _tree(tmp_path / "whole")
    assert _prepare(files, tmp_path / "resumed").resumed_files == 4  # nothing left to do
    assert _tree(tmp_path / "resumed") == _tree(tmp_path / "whole")


def test_one_and_two_workers_write_the_same_store(tmp_path):
    files = [_jsonl(tmp_path / f"{i}.jsonl", _docs(10, seed=i)) for i in range(3)]
    one = _prepare(files, tmp_path / "one", workers=1)
    two = _prepare(files, tmp_path / "two", workers=2)
    assert two.workers == 2 and one.tokens == two.tokens
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_compressed_parquet_text_and_remote_inputs_read_the_same_documents(tmp_path):
    docs = _docs(9)
    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs).encode()
    (tmp_path / "in/sub").mkdir(parents=True)
    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)):
        (tmp_path / f"in/sub/a.jsonl{suffix}").write_bytes(compress(lines))
    (tmp_path / "in/b.txt").write_text(docs[0])
    (tmp_path / "in/notes.md").write_text("not an input")
    report = _prepare([tmp_path / "in"], tmp_path / "out", text_key="body", heldout_every=0)
    assert report.files == 4 and report.documents == {"train": 28} and report.skipped == {}
    assert TokenStore.open(str(tmp_path / "out"), seq_len=4).num_tokens == sum(
        len(d.encode()) + 1 for d in docs * 3 + docs[:1])

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": [*docs[:3], None, " "], "n": list(range(5))}),
                   tmp_path / "c.parquet", row_group_size=2)
    report = _prepare([tmp_path / "*.parquet"], tmp_path / "pq", text_key="body", heldout_every=0)
    assert report.documents == {"train": 3} and report.skipped == {"empty": 1, "missing_text_key": 1}
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://bucket/d/x.jsonl", "wb") as f:
        f.write(lines)
    report = _prepare(["memory://bucket/d/*.jsonl"], tmp_path / "mem", text_key="body", heldout_every=0)
    assert report.documents == {"train": 9}


def test_bad_records_are_counted_skips(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/empty.txt").write_text("")
    (tmp_path / "in/blank.txt").write_text(" \n\t")
    (tmp_path / "in/latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "in/ok.txt").write_text("kept")
    (tmp_path / "in/r.jsonl").write_bytes(b"\n".join([
        b'{"text": "kept"}', b'{"text": "kept"', b'{"body": "x"}', b'{"text": 3}', b'["text"]',
        b'{"text": "caf\xe9"}', b'{"text": "  "}', b'{"text": "\\ud800"}', b"", b'{"text": "kept"}']))
    lines = b"".join(b'{"text": "kept %d"}\n' % i for i in range(5000))
    (tmp_path / "in/t.jsonl.gz").write_bytes(gzip.compress(lines)[:-30])  # truncated
    report = _prepare([tmp_path / "in"], tmp_path / "out", heldout_every=0)
    assert report.skipped == {"empty": 3, "invalid_json": 1, "missing_text_key": 3, "non_utf8": 3,
                              "unreadable": 1}
    assert report.skipped_first["invalid_json"].endswith("r.jsonl:2")
    kept_gz = report.documents["train"] - 3  # the lines before the damage
    assert 0 < kept_gz < 5000
    assert report.skipped_first["unreadable"].endswith(f"t.jsonl.gz:{kept_gz + 1} (EOFError)")


def _cli(capsys, *args):
    rc = main(["prepare", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("case, message", [
    ("glob", "matches no"),
    ("missing", "does not exist"),
    ("nothing kept", "no document to keep"),
    ("format", "unsupported format"),
    ("no output", "usage: jaxscale prepare"),
    ("not a store", "holds no prepared dataset"),
    ("zstandard", "needs zstandard"),
])
def test_bad_input_is_one_clear_line(case, message, tmp_path, capsys):
    if case == "zstandard" and importlib.util.find_spec("zstandard"):
        pytest.skip("zstandard is installed")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/file").write_text("mine")
    out = ["--output", str(tmp_path / "out")]
    argv = {"glob": [str(tmp_path / "*.jsonl"), *out], "missing": [str(tmp_path / "no.txt"), *out],
            "nothing kept": [str(tmp_path / "empty.txt"), *out], "format": [str(tmp_path / "x.csv"), *out],
            "no output": [str(tmp_path / "empty.txt")], "zstandard": [str(tmp_path / "a.jsonl.zst"), *out],
            "not a store": [str(tmp_path / "empty.txt"), "--output", str(tmp_path / "other"),
                            "--overwrite"]}[case]
    assert main(["prepare", *argv, "--workers=1"]) == 2
    err = capsys.readouterr().err  # the progress bar's lines, then the error
    assert err.count("jaxscale: error:") == 1 and "Traceback" not in err
    assert message in err.strip().splitlines()[-1]


def test_the_command_prepares_resumes_and_refuses_another_dataset(tmp_path, capsys):
    a = _jsonl(tmp_path / "a.jsonl", _docs(20), key="body")
    out = str(tmp_path / "out")
    rc, stdout, stderr = _cli(capsys, a, "--output", out, "--text-key=body", "--heldout-every", "5",
                              "--shard-mb=0.001", "--workers=1")
    assert rc == 0 and "train: 16 documents" in stdout and "heldout: 4 documents" in stdout, stderr
    rc, stdout, _ = _cli(capsys, a, "--output", out, "--text-key=body", "--heldout-every", "5",
                         "--shard-mb=0.001")
    assert rc == 0 and "1 kept from an earlier run" in stdout
    rc, _, stderr = _cli(capsys, a, "--output", out, "--text-key=body")  # heldout_every 16: another dataset
    assert rc == 2 and "pass --overwrite" in stderr and "Traceback" not in stderr
    rc, stdout, _ = _cli(capsys, a, "--output", out, "--config.data.text_key=body", "--overwrite")
    assert rc == 0 and "train: 19 documents" in stdout


def test_a_damaged_store_is_one_clear_line_on_open(tmp_path):
    _prepare([_jsonl(tmp_path / "a.jsonl", _docs(30))], tmp_path / "out")
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match=r"no split 'valid'; it has 'heldout', 'train'"):
        TokenStore.open(out, "valid", seq_len=8)
    with pytest.raises(UserError, match="does not exist"):
        TokenStore.open(str(tmp_path / "nowhere"), seq_len=8)
    shard = tmp_path / "out/train-00000-0001.tokens.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    TokenStore.open(out, seq_len=8)  # same size: only verify reads the bytes
    with pytest.raises(UserError, match=f"shard {shard} does not match its sha256.*re-run jaxscale prepare"):
        TokenStore.open(out, seq_len=8, verify=True)
    shard.write_bytes(bytes(data[:-7]))
    with pytest.raises(UserError, match=f"shard {shard} is .* bytes, the index says .*re-run jaxscale"):
        TokenStore.open(out, seq_len=8)
