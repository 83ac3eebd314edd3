"""Data pipeline speed on this host: prepare tokens/s, loader rows/s against the training step's need,
and the time the step waits for data.

    python3 experiments/bench_data.py [--mb 30] [--steps 60] [--out docs/results/data.md]

1. `prepare_dataset` tokenizes `--mb` MB of text (the CPython docs of `pydoc_data.topics`, each copy
   numbered so no two documents are equal, in 8 `.jsonl` files) with the byte tokenizer, on 1 and 2
   worker processes.
2. The grain loader (`DataIterator` over the prepared store) yields batches of the default config
   (16 rows of 128 tokens) with `data.workers` 0 and 2; rows/s excludes the first batch (worker
   start-up, reported apart).
3. `train` runs the default config for `--steps` steps on the store with each `data.workers`; the
   step's rows/s is what the loader must keep up with, and `data_wait_pct` (metrics) is the share of
   step time the loop waited for batches (goal: under 1%).
"""

import argparse
import json
import os
import tempfile
import time

import _host

WORKERS = (0, 2)
FILES = 8


def write_text(directory: str, megabytes: float) -> list[str]:
    """`FILES` .jsonl files of about `megabytes` MB in all, copies of the embedded docs."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    size = sum(len(d.encode()) for d in docs)
    copies = max(FILES, round(megabytes * 1e6 / size))
    paths = [os.path.join(directory, f"text-{i}.jsonl") for i in range(FILES)]
    for i, path in enumerate(paths):
        with open(path, "w") as f:
            for c in range(i, copies, FILES):
                for d in docs:
                    f.write(json.dumps({"text": f"[copy {c}] {d}"}) + "\n")
    return paths


def bench_prepare(paths: list[str], directory: str, workers: int) -> dict:
    from jaxscale.data.prepare import prepare_dataset

    out = os.path.join(directory, f"store-{workers}")
    start = time.perf_counter()
    report = prepare_dataset(paths, out, "byte", workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"store": out, "tokens": sum(report.tokens.values()), "seconds": seconds,
            "documents": sum(report.documents.values())}


def bench_loader(store: str, workers: int, batches: int) -> dict:
    from jaxscale.config import base_config
    from jaxscale.data import build_data

    config = base_config()
    config.data.update(source=store, workers=workers)
    _, data = build_data(config)
    with data:
        start = time.perf_counter()
        next(data)
        first = time.perf_counter()
        for _ in range(batches):
            next(data)
        end = time.perf_counter()
    rows = batches * config.train.global_batch_size
    return {"startup_s": first - start, "rows_per_s": rows / (end - first)}


def bench_train(store: str, workers: int, steps: int, run_dir: str) -> dict:
    from jaxscale.config import base_config
    from jaxscale.train.loop import train

    config = base_config()
    config.data.update(source=store, workers=workers)
    config.train.update(steps=steps, log_every=max(1, steps // 3))
    config.run_dir = run_dir
    config.checkpoint.every = 0
    history = [r for r in train(config, progress=False) if "tokens_per_s" in r]
    seconds = sum(r["data_wait_s"] for r in history)
    step_time = sum(r["data_wait_s"] / (r["data_wait_pct"] / 100) for r in history
                    if r["data_wait_pct"] > 0)
    tokens_per_s = sum(r["tokens_per_s"] for r in history) / len(history)
    return {"rows_per_s": tokens_per_s / config.data.seq_len,
            "step_ms": 1e3 * config.train.global_batch_size * config.data.seq_len / tokens_per_s,
            "wait_pct": 100 * seconds / step_time if step_time else 0.0,
            "wait_ms": 1e3 * seconds / (steps - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=30.0, help="MB of text to prepare")
    parser.add_argument("--steps", type=_host.at_least(4), default=60, help="training steps per run")
    parser.add_argument("--batches", type=_host.at_least(1), default=400, help="loader batches timed")
    parser.add_argument("--out", default=_host.in_repo("docs/results/data.md"))
    args = parser.parse_args()
    from jaxscale.cpu import libtpu_without_tpu, with_xla_cpu_flags

    os.environ.update(with_xla_cpu_flags(os.environ))  # as the jaxscale command starts jax
    if not os.environ.get("JAX_PLATFORMS") and libtpu_without_tpu():
        os.environ["JAX_PLATFORMS"] = "cpu"
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_text(tmp, args.mb)
        mb = sum(os.path.getsize(p) for p in paths) / 1e6
        prepared = {w: bench_prepare(paths, tmp, w) for w in (1, 2)}
        store = prepared[2]["store"]
        loader = {w: bench_loader(store, w, args.batches) for w in WORKERS}
        trained = {w: bench_train(store, w, args.steps, os.path.join(tmp, f"run-{w}")) for w in WORKERS}
    lines = ["# Data pipeline: prepare, loader and the step's wait for data", "",
             "`python3 experiments/bench_data.py` (byte tokenizer; the default config: a 4-layer Llama, "
             "16 rows of 128 tokens per step, one CPU device, `jaxscale train` as it runs here).", "",
             *_host.environment_lines(load), "",
             f"## Prepare ({mb:.0f} MB of text in {FILES} .jsonl files, "
             f"{prepared[1]['documents']:,} documents)", "",
             "| prepare workers | tokens | seconds | tokens/s |", "|---|---|---|---|"]
    for w, r in prepared.items():
        lines.append(f"| {w} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} |")
    lines += ["", "## Loader against the training step", "",
              "| data.workers | loader rows/s (alone) | first batch (s) | step rows/s | step (ms) | "
              "data wait (ms/step) | data wait (% of step) |", "|---|---|---|---|---|---|---|"]
    for w in WORKERS:
        ld, tr = loader[w], trained[w]
        lines.append(f"| {w} | {ld['rows_per_s']:,.0f} | {ld['startup_s']:.2f} | {tr['rows_per_s']:,.0f} | "
                     f"{tr['step_ms']:.1f} | {tr['wait_ms']:.2f} | {tr['wait_pct']:.2f} |")
    lines += ["", f"Training runs: {args.steps} steps each; the wait is `data_wait_s` / `data_wait_pct` of "
              "the metrics rows after the first (compiling) step."]
    _host.write_report(lines, args.out)


if __name__ == "__main__":
    main()
