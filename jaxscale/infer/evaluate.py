"""Perplexity of a model on held-out text, and how often two models agree on the next token.

`infer.eval_source="heldout"` is the held-out split of `data.source`: the documents training
skips (every `data.heldout_every`-th, `jaxscale.data.corpus.split_documents`), as a separate eval
split does in MaxText; any `.txt` / `.jsonl` file or directory can be given instead. Documents are
cut into rows of `data.seq_len` tokens + 1 target, each inside one document, so every row starts
a fresh context. A prepared dataset's "heldout" split is read as packed rows (`TokenStore.rows`),
scored on the targets inside each row's first document (the model attends across the row).
"""

from __future__ import annotations

import math

import numpy as np

from jaxscale.data.corpus import load_documents, split_documents
from jaxscale.data.store import TokenStore, is_store
from jaxscale.data.tokenizer import Tokenizer, document_ids
from jaxscale.errors import UserError
from jaxscale.infer.generate import Generator


def eval_rows(config, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """`inputs`, `targets` and `loss_mask` [rows, data.seq_len] of `infer.eval_source`: a prepared
    dataset's held-out split (`store_rows`), else `document_rows` of `eval_documents`."""
    data, source = config.data, config.infer.eval_source
    if source == "heldout" and data.mixture:
        raise UserError("infer.eval_source='heldout' reads data.source's held-out split but training "
                        "reads data.mixture; set infer.eval_source to one prepared dataset or file")
    path = data.source if source == "heldout" else source
    if path != "embedded" and is_store(path):
        return store_rows(TokenStore.open(path, "heldout", seq_len=data.seq_len))
    return document_rows(eval_documents(config), tokenizer, data.seq_len)


def store_rows(store: TokenStore) -> dict[str, np.ndarray]:
    """All rows of `store`, with `loss_mask` on the targets of each row's first document (its eos
    included): the tokens whose context is that document alone."""
    rows = store.rows(np.arange(store.num_rows))
    first = rows["segment_ids"] == 1
    last = first[:, -1:] & (rows["inputs"][:, -1:] != store.index["tokenizer"]["eos_id"])
    mask = np.concatenate([first[:, 1:], last], axis=1)  # target t is input t + 1
    return {"inputs": rows["inputs"], "targets": rows["targets"], "loss_mask": mask.astype(np.float32)}


def eval_documents(config) -> list[str]:
    """The documents of `infer.eval_source`: `data.source`'s held-out split, or a path."""
    data, source = config.data, config.infer.eval_source
    if source != "heldout":
        return load_documents(source, data.text_key)
    if data.source == "scenes":
        raise UserError("jaxscale eval measures text perplexity; data.source='scenes' is the "
                        "multimodal task (its held-out answers: jaxscale.train.evaluate)")
    docs = split_documents(load_documents(data.source, data.text_key), data.heldout_every,
                           "heldout")
    if not docs:
        raise UserError(f"data.source={data.source!r} has no held-out documents "
                        f"(data.heldout_every={data.heldout_every}); set data.heldout_every >= 2 "
                        f"with more documents, or pass infer.eval_source=<file>")
    return docs


def document_rows(docs: list[str], tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """`inputs` and `targets` [rows, seq_len]: consecutive windows of `seq_len + 1` tokens of each
    document followed by eos (a shorter tail is dropped)."""
    inputs, targets = [], []
    for doc in docs:
        ids = np.asarray(document_ids(tokenizer, doc), np.int32)
        for start in range(0, len(ids) - seq_len, seq_len):
            inputs.append(ids[start:start + seq_len])
            targets.append(ids[start + 1:start + seq_len + 1])
    if not inputs:
        raise UserError(f"the eval text has no document of more than data.seq_len={seq_len} "
                        f"tokens; give longer documents or lower data.seq_len")
    return {"inputs": np.stack(inputs), "targets": np.stack(targets)}


def batches(rows: dict[str, np.ndarray], batch_size: int, max_rows: int = 0):
    """Successive batches of `batch_size` rows (the last may be smaller); `max_rows` > 0 caps the
    rows read."""
    n = len(rows["inputs"]) if max_rows <= 0 else min(max_rows, len(rows["inputs"]))
    for start in range(0, n, batch_size):
        yield {k: v[start:min(start + batch_size, n)] for k, v in rows.items()}


def perplexity(generator: Generator, rows: dict[str, np.ndarray], batch_size: int,
               max_rows: int = 0) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) over `rows`, its exponential, and the token count."""
    total, count = 0.0, 0
    for batch in batches(rows, batch_size, max_rows):
        loss, n, _ = generator.score(batch["inputs"], batch["targets"], batch.get("loss_mask"))
        total, count = total + loss, count + n
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


def agreement(a: Generator, b: Generator, rows: dict[str, np.ndarray], batch_size: int,
              max_rows: int = 0) -> float:
    """The fraction of positions of `rows` where `a` and `b` predict the same next token."""
    same, count = 0, 0
    for batch in batches(rows, batch_size, max_rows):
        pa, pb = (g.score(batch["inputs"], batch["targets"])[2] for g in (a, b))
        same, count = same + int(np.sum(pa == pb)), count + pa.size
    return same / count
