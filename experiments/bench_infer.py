"""Inference throughput, memory and quality: weight formats, batch sizes, KV cache options.

    python3 experiments/bench_infer.py [--train-steps N] [--out docs/results/inference.md]

Trains the default model (`jaxscale/config.py`: a 4-layer Llama, d_model 128, byte tokenizer) for
N steps on one device, then on that device: for float32, bfloat16, int8 and int4 weights (and the
int8 KV cache) and batches of 1, 4 and 16 prompts of 64 tokens, times the prefill and 64 greedy
decode steps (the streaming loop, one jitted step per token) and reports weight and cache bytes;
measures each format's held-out perplexity and next-token agreement with float32; and measures
what a sliding-window cache (4 sinks + W recent tokens) costs: perplexity on 128-token held-out rows
attending as that cache does, and agreement of 64 greedy tokens with the full cache's.
"""

# ruff: noqa: E402  (XLA_FLAGS must be set before jax is imported)

import _host

_host.emulate_devices()

import argparse
import os
import statistics
import time

import jax
import numpy as np

from jaxscale.config import base_config
from jaxscale.data import build_data, make_global_batch
from jaxscale.data.tokenizer import ByteTokenizer
from jaxscale.infer import Generator
from jaxscale.infer.evaluate import agreement, document_rows, eval_documents, perplexity
from jaxscale.mesh import make_mesh, mesh_from_config
from jaxscale.models import param_count
from jaxscale.train.trainer import build_trainer

FORMATS = (("float32", "auto"), ("bfloat16", "auto"), ("int8", "auto"), ("int4", "auto"),
           ("float32", "int8"), ("int8", "int8"))
BATCHES = (1, 4, 16)
PROMPT, NEW, REPEATS = 64, 64, 3
WINDOWS = (16, 32, 64)
SINKS = 4
EVAL_ROWS = 256
MIB = 2**20


def train(steps: int):
    """The default config trained for `steps` on one device: (config, float32 params)."""
    c = base_config()
    c.mesh.update(data=1)
    c.train.update(steps=steps)
    trainer = build_trainer(c, mesh_from_config(c.mesh, jax.devices()[:1]))
    _, data = build_data(c)
    state = trainer.init()
    for _ in range(steps):
        state, out = trainer.step(state, make_global_batch(next(data), trainer.batch_sharding))
    print(f"trained {steps} steps: loss {float(out['loss']):.3f}", flush=True)
    return c, state.params, float(out["loss"])


def generator(config, params, weights="float32", cache_dtype="auto", **infer) -> Generator:
    c = config.copy_and_resolve_references()
    c.infer.update(weights=weights, cache_dtype=cache_dtype, **infer)
    c.model.dtype = "bfloat16" if weights == "bfloat16" else "float32"
    return Generator.from_config(c, params=params, mesh=make_mesh({"data": 1}, jax.devices()[:1]))


def prompts(rows: dict, batch: int) -> list[list[int]]:
    return [rows["inputs"][i, :PROMPT].tolist() for i in range(batch)]


def throughput(config, params, rows) -> list[dict]:
    out = []
    for weights, cache in FORMATS:
        g = generator(config, params, weights, cache)
        for batch in BATCHES:
            batch_prompts = prompts(rows, batch)
            g.generate(batch_prompts, NEW)  # compile
            runs = [g.generate(batch_prompts, NEW) for _ in range(REPEATS)]
            prefill = statistics.median(r.prefill_s for r in runs)
            decode = statistics.median(r.decode_s for r in runs)
            row = {"weights": weights, "cache": cache, "batch": batch,
                   "prefill_tok_s": batch * PROMPT / prefill,
                   "decode_tok_s": batch * (NEW - 1) / decode, "step_ms": 1e3 * decode / (NEW - 1),
                   "weight_bytes": g.weight_bytes(), "cache_bytes": g.cache_bytes(batch)}
            out.append(row)
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()},
                  flush=True)
    return out


def quality(config, params, rows) -> list[dict]:
    fp = generator(config, params)
    out = []
    for weights, _ in FORMATS[:4]:
        g = fp if weights == "float32" else generator(config, params, weights)
        ppl = perplexity(g, rows, 64, EVAL_ROWS)
        out.append({"weights": weights, "ppl": ppl["perplexity"], "tokens": ppl["tokens"],
                    "agree": agreement(fp, g, rows, 64, EVAL_ROWS)})
        print(out[-1], flush=True)
    return out


def windows(config, params, rows) -> list[dict]:
    """Perplexity and greedy agreement of sliding-window caches against the full cache."""
    full = generator(config, params)
    starts = prompts(rows, 16)
    short = [p[:32] for p in starts]
    reference = full.generate(short, 96).tokens
    out = []
    for window in (0, *WINDOWS):
        g = full if not window else generator(config, params, window=window, sink_tokens=SINKS)
        tokens = g.generate(short, 96).tokens
        diverge = [int(np.argmin(a == b)) if (a != b).any() else len(a)
                   for a, b in zip(tokens, reference, strict=True)]
        out.append({"window": window, "slots": g.cache_config.slots,
                    "cache_bytes": g.cache_bytes(16),
                    "ppl": perplexity(g, rows, 64, EVAL_ROWS)["perplexity"],
                    "agree": float(np.mean(tokens == reference)),
                    "diverge": statistics.median(diverge)})
        print(out[-1], flush=True)
    return out


def report(c, loss, steps, tput, qual, wins, load, seconds) -> list[str]:
    m = c.model
    lines = [
        "# Inference: throughput, memory and quality of weight formats and KV caches", "",
        f"Generated by `python3 experiments/bench_infer.py --train-steps {steps}`.", "",
        *_host.environment_lines(load),
        f"- Model: the default config (`jaxscale/config.py`): Llama, d_model {m.d_model}, "
        f"{m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv, head_dim {m.head_dim}), "
        f"d_ff {m.d_ff}, vocab {m.vocab_size}, byte tokenizer, {param_count(m):,} "
        f"parameters, trained {steps} steps on the embedded corpus (final training loss "
        f"{loss:.2f}). Everything runs on one device (`jax.devices()[0]`).",
        f"- Throughput: {PROMPT}-token prompts (held-out text), {NEW} greedy tokens, cache of "
        f"{m.max_seq_len} slots. Prefill tok/s = batch × {PROMPT} / (time to the first generated "
        f"token on the host); decode tok/s = batch × {NEW - 1} / (time of the other {NEW - 1} "
        f"steps, each a jitted step whose token is fetched to the host, as streaming does). "
        f"Medians of {REPEATS} runs after a compiling one. bfloat16 rows store bf16 weights and "
        "compute in bf16 (`model.dtype=bfloat16`); int8/int4 dequantize each weight to float32 "
        "right before its matmul. Bytes: all weight arrays (scales included) and the KV cache "
        "for that batch (keys, values, int8 scales, slot positions).",
        "- Reading the times: this model is tiny (3.5 MiB of float32 weights), so on a CPU a decode "
        "step is mostly the cost of dispatching one jitted step and fetching its token, and every "
        "time moves with the other processes on the host (load above). Weight-only int8/int4 "
        "expand each weight to float32 for its matmul: extra work here, and nothing saved, "
        "because nothing is bound by memory bandwidth at this size; bfloat16 is slower here too "
        "(no fast bf16 matmul on this CPU). What these formats buy where decode is bound by reading "
        "the weights (large models on accelerators) is the bytes column; rerun this script there "
        "for speed.",
        "",
        "| weights | KV cache | batch | prefill tok/s | decode tok/s | decode ms/step | weights MiB "
        "| fp32 bytes / these | KV cache MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    fp_bytes = next(r["weight_bytes"] for r in tput if r["weights"] == "float32")
    for r in tput:
        lines.append(f"| {r['weights']} | {'int8' if r['cache'] == 'int8' else 'compute dtype'} "
                     f"| {r['batch']} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
                     f"{r['step_ms']:.1f} | {r['weight_bytes'] / MIB:.3f} | "
                     f"{fp_bytes / r['weight_bytes']:.2f} | {r['cache_bytes'] / MIB:.3f} |")
    lines += [
        "", f"## Quality of the weight formats ({qual[0]['tokens']:,} held-out tokens)", "",
        "Held-out text: the embedded corpus's held-out split (every "
        f"{c.data.heldout_every}th document, which training skips; `infer.eval_source=heldout`), rows of "
        f"{c.data.seq_len} tokens. Agreement: positions where the format's most likely next token "
        "is float32's. int8: one scale per output channel; int4: groups of "
        f"{c.infer.group_size} inputs (the whole input when shorter).", "",
        "| weights | perplexity | next-token agreement with float32 |", "|---|---:|---:|"]
    lines += [f"| {r['weights']} | {r['ppl']:.3f} | {r['agree']:.2%} |" for r in qual]
    lines += [
        "", "## Sliding-window KV cache: memory against quality", "",
        f"A ring of {SINKS} attention sinks + W recent tokens (`infer.window=W`, "
        f"`infer.sink_tokens={SINKS}`). Perplexity: the held-out rows above, each position "
        "attending to exactly the tokens such a cache holds (teacher-forced; equal to decoding "
        "with it, `tests/test_infer.py`). Generation: 16 held-out 32-token prompts, 96 greedy "
        "tokens each, compared position by position with the full cache's; divergence is the "
        "median step of the first different token (96 = never).", "",
        "| cache | slots | KV cache MiB (16 rows) | perplexity | tokens equal to full cache "
        "| first difference (median step) |", "|---|---:|---:|---:|---:|---:|"]
    for r in wins:
        name = "full" if not r["window"] else f"window {r['window']} + {SINKS} sinks"
        lines.append(f"| {name} | {r['slots']} | {r['cache_bytes'] / MIB:.3f} | {r['ppl']:.3f} | "
                     f"{r['agree']:.1%} | {r['diverge']:.0f} |")
    return lines + ["", f"Script run time: {seconds:.0f} s."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=_host.at_least(1), default=300)
    parser.add_argument("--out", default=_host.in_repo("docs/results/inference.md"))
    args = parser.parse_args()
    begin, load = time.perf_counter(), os.getloadavg()[0]
    config, params, loss = train(args.train_steps)
    tokenizer = ByteTokenizer()
    long_rows = document_rows(eval_documents(config), tokenizer, config.data.seq_len)
    tput = throughput(config, params, long_rows)
    qual = quality(config, params, long_rows)
    wins = windows(config, params, long_rows)
    _host.write_report(report(config, loss, args.train_steps, tput, qual, wins, load,
                              time.perf_counter() - begin), args.out)


if __name__ == "__main__":
    main()
