"""Where a traced step's accelerator time goes: kernel time by kind and the top kernels.

    python3 experiments/profile_summary.py DIR [--steps 3] [--top 25]

DIR is a `jax.profiler.trace` directory (e.g. `bench_throughput.py --profile DIR`); the newest
`*.xplane.pb` under it is read with `jax.profiler.ProfileData`. Kernels are sorted into kinds by
name (matrix multiplies, attention, XLA's fused element-wise kernels, copies); times are per
step (divided by `--steps`). "Busy" is the union of the kernels' intervals, "span" the first
kernel's start to the last one's end: their difference is time the device waited for work.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re

import _host

KINDS = (  # first match wins
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attn", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|matmul|dot", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("fusion (element-wise)", re.compile(r"fusion|loop_|input_|triton|kernel", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def device_kernels(path: str) -> list[tuple[str, float, float]]:
    """(kernel name, start ns, duration ns) of every kernel on the first accelerator's streams."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:") and "CPU" not in p.name]
    if not planes:
        raise SystemExit(f"{path}: no accelerator plane (planes: {[p.name for p in data.planes]})")
    plane = sorted(planes, key=lambda p: p.name)[0]
    kernels = []
    for line in plane.lines:
        if line.name.startswith("Stream"):
            kernels += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    if not kernels:
        raise SystemExit(f"{path}: no kernels on {plane.name}'s streams "
                         f"(its lines: {[line.name for line in plane.lines]})")
    return kernels


def busy_ns(kernels: list[tuple[str, float, float]]) -> float:
    """Length of the union of the kernels' [start, start + duration) intervals."""
    total, end = 0.0, float("-inf")
    for _, start, dur in sorted(kernels, key=lambda k: k[1]):
        total += max(0.0, start + dur - max(start, end))
        end = max(end, start + dur)
    return total


def summarize(path: str, steps: int, top: int) -> list[str]:
    kernels = device_kernels(path)
    span = max(s + d for _, s, d in kernels) - min(s for _, s, _ in kernels)
    by_kind, by_name = collections.Counter(), collections.defaultdict(lambda: [0.0, 0])
    for name, _, dur in kernels:
        by_kind[kind_of(name)] += dur
        by_name[name][0] += dur
        by_name[name][1] += 1
    total = sum(by_kind.values())
    busy = busy_ns(kernels)
    ms = 1e6 * steps
    lines = [f"trace {path}: {len(kernels) // steps} kernels a step; per step: span "
             f"{span / ms:.1f} ms, busy {busy / ms:.1f} ms, kernel time {total / ms:.1f} ms", "",
             "| kind | ms a step | share of kernel time |", "|---|---:|---:|"]
    lines += [f"| {k} | {v / ms:.1f} | {v / total:.1%} |" for k, v in by_kind.most_common()]
    lines += ["", "| kernel | kind | calls a step | ms a step | share |", "|---|---|---:|---:|---:|"]
    for name, (dur, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {kind_of(name)} | {calls / steps:g} | {dur / ms:.2f} | "
                     f"{dur / total:.1%} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--steps", type=_host.at_least(1), default=3,
                   help="steps in the trace (times are per step)")
    p.add_argument("--top", type=_host.at_least(1), default=25)
    args = p.parse_args()
    paths = glob.glob(os.path.join(args.dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise SystemExit(f"no *.xplane.pb under {args.dir}; trace with jax.profiler.trace first")
    print("\n".join(summarize(max(paths, key=os.path.getmtime), args.steps, args.top)))


if __name__ == "__main__":
    main()
