"""cuDNN attention on packed rows: forward+backward time of each way to keep documents apart.

    python3 experiments/bench_attention.py [--batch 16] [--seq 2048] [--heads 32] [--kv-heads 8]
        [--head-dim 64] [--documents 1,2,4,6,8,16,32] [--out docs/results/attention_gpu.md]

The 1B benchmark's attention shape (configs/bench_1b.py) in bfloat16 under a nonlinear loss, a
quarter of the rows holding two documents: plain causal attention (documents not kept apart:
the floor), the same-document mask passed as a [batch, 1, seq, seq] bias, and cuDNN's packed
layout (`layers.causal_attention`) for each `model.max_documents`. Each row gives the median
of 20 jitted forward+backward calls, the causal FLOPs over that time, and the largest relative
error of the q, k, v gradients against the bias version's. Needs an NVIDIA GPU (Hopper or later
for the packed layout).
"""

import argparse
import os
import statistics
import sys
import time

import _host
import jax
import jax.numpy as jnp

from jaxscale.models.layers import causal_attention


def variants(documents: list[int]):
    def causal(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def bias(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            implementation="cudnn")

    yield "causal, documents not kept apart", causal
    yield "same-document mask as a bias", bias
    for n in documents:
        yield (f"packed layout, max_documents={n}",
               lambda q, k, v, mask, n=n: causal_attention(q, k, v, mask, "cudnn", n))


def time_grads(attention, args: tuple) -> tuple[float, list[jax.Array]]:
    def loss(q, k, v, mask):
        out = attention(q, k, v, mask).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(out))

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))
    out = jax.block_until_ready(grads(*args))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        jax.block_until_ready(grads(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=_host.at_least(1), default=16)
    p.add_argument("--seq", type=_host.at_least(1), default=2048)
    p.add_argument("--heads", type=_host.at_least(1), default=32)
    p.add_argument("--kv-heads", type=_host.at_least(1), default=8)
    p.add_argument("--head-dim", type=_host.at_least(1), default=64)
    p.add_argument("--documents", default="1,2,4,6,8,16,32")
    p.add_argument("--out", default=_host.in_repo("docs/results/attention_gpu.md"))
    args = p.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit(f"bench_attention.py times cuDNN attention and needs an NVIDIA GPU; jax found "
                 f"{jax.default_backend()}")
    b, t, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, t, kv, d), jnp.bfloat16) for key in keys[1:])
    segments = jnp.ones((b, t), jnp.int32).at[:max(b // 4, 1), 3 * t // 4:].set(2)
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]
    flops = 3.5 * 4 * b * h * t * t * d / 2  # causal: forward 2 matmuls, backward 5
    lines = [f"# cuDNN attention on packed rows ({b} x {t} tokens, {h} query and {kv} KV heads "
             f"of {d}; bfloat16)", "", *_host.environment_lines(os.getloadavg()[0]),
             "- Median of 20 forward+backward calls (`experiments/bench_attention.py`); gradient "
             "error: the largest relative error of q, k, v's against the bias version's", "",
             "| documents kept apart by | ms | TFLOP/s | gradient error |", "|---|---:|---:|---:|"]
    reference = None
    for name, attention in variants([int(n) for n in args.documents.split(",") if n]):
        seconds, grads = time_grads(attention, (q, k, v, mask))
        if name.startswith("same-document"):
            reference = grads
        err = "-" if reference is None or name.startswith("same-document") else \
            f"{max(rel_err(a, r) for a, r in zip(grads, reference, strict=True)):.1e}"
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {flops / seconds / 1e12:.1f} | {err} |")
        print(lines[-1], flush=True)
    _host.write_report(lines, args.out)


if __name__ == "__main__":
    main()
