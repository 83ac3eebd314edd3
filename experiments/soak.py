"""Soak: the default job for thousands of steps with async saves every 10 steps, keeping 3.

    python3 experiments/soak.py [--steps 3000] [--every 10] [--keep 3] [--out docs/results/soak.md]

Runs `jaxscale train`'s loop in this process on the embedded default config (the README's job,
on the devices jax finds), then reports:
- host resident memory and device memory over the run (`host_rss_mib`, `mem_in_use_gib` of the
  metrics), and how much the resident memory grew after warm-up (goal: under 5%);
- checkpoint saves started, steps deleted by `checkpoint.keep`, and the steps left on disk, which
  must be the last `keep` multiples of `every` (no step lost);
- save latency, from Orbax's own events: the part that blocks training and the whole write;
- restore latency of every kept step into the trainer's state, and a read of all its arrays
  (`Checkpointer.verify`): every kept step must restore.
"""

import argparse
import collections
import os
import statistics
import tempfile
import time

import _host
import jax
from absl import logging as absl_logging

from jaxscale.checkpoint import Checkpointer
from jaxscale.config import base_config
from jaxscale.mesh import mesh_from_config
from jaxscale.train.loop import train
from jaxscale.train.trainer import build_trainer

BLOCKING = "/jax/checkpoint/write/async/blocking_duration_secs"
TOTAL = "/jax/checkpoint/write/async/total_duration_secs"
WARM_UP = 0.1  # of the steps: compilation, allocator pools and the first saves settle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_host.at_least(20), default=3000)
    parser.add_argument("--every", type=_host.at_least(1), default=10)
    parser.add_argument("--keep", type=_host.at_least(1), default=3)
    parser.add_argument("--log-every", type=_host.at_least(1), default=50)
    parser.add_argument("--out", default=_host.in_repo("docs/results/soak.md"))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    absl_logging.set_verbosity(absl_logging.ERROR)  # as the command does: Orbax's info lines

    events = collections.defaultdict(list)
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: events[name].append(secs))
    with tempfile.TemporaryDirectory(prefix="jaxscale-soak-") as run_dir:
        config = base_config()
        config.run_dir = run_dir
        config.train.update(steps=args.steps, log_every=args.log_every)
        config.checkpoint.update(every=args.every, keep=args.keep)
        start = time.perf_counter()
        rows = train(config, progress=False)
        seconds = time.perf_counter() - start
        restores = _restore_each(config)

    saved = len(events[TOTAL])
    expected = list(range(args.steps - (args.keep - 1) * args.every, args.steps + 1, args.every))
    kept = [step for step, *_ in restores]
    rss = [r["host_rss_mib"] for r in rows if r["step"] >= WARM_UP * args.steps]
    window = max(1, len(rss) // 10)  # medians of windows: a save's buffers come and go
    first, last = statistics.median(rss[:window]), statistics.median(rss[-window:])
    growth, peak = last / first - 1, max(rss) / first - 1
    lines = ["# Soak: long run with async saves", "",
             f"`python3 experiments/soak.py --steps {args.steps} --every {args.every} "
             f"--keep {args.keep}`: the default job (embedded config) for {args.steps} steps in "
             f"{seconds:.0f} s, an async save every {args.every} steps, keeping {args.keep}.", "",
             *_host.environment_lines(load), "",
             "| result | value |", "|---|---|",
             f"| host RSS after warm-up (median of the first {window} rows from step "
             f"{int(WARM_UP * args.steps)}) | {first:.1f} MiB |",
             f"| host RSS at the end (median of the last {window} rows) | {last:.1f} MiB |",
             f"| growth after warm-up (goal < 5%) | {100 * growth:+.2f}% |",
             f"| highest row after warm-up, against the first median | {100 * peak:+.2f}% |",
             f"| saves started / finished | {args.steps // args.every} / {saved} |",
             f"| steps deleted by keep={args.keep} | {saved - len(kept)} |",
             f"| steps on disk at the end (expected {expected}) | {kept} |",
             f"| save: blocking part, median / max | {_ms(events[BLOCKING])} |",
             f"| save: whole write, median / max | {_ms(events[TOTAL])} |",
             f"| restore of each kept step | {', '.join(f'{r:.2f} s' for _, r, _ in restores)} |",
             f"| every array of each kept step read back | "
             f"{', '.join(f'{v / 2**20:.1f} MiB' for *_, v in restores)} |", "",
             "Memory over the run (rows of `metrics.jsonl`):", "",
             "| step | host RSS MiB | device memory in use GiB | tokens/s |", "|---|---|---|---|"]
    stride = max(1, len(rows) // 12)
    for r in rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else []):
        device = f"{r['mem_in_use_gib']:.3f}" if "mem_in_use_gib" in r else "n/a (CPU)"
        lines.append(f"| {r['step']} | {r['host_rss_mib']:.1f} | {device} | "
                     f"{r.get('tokens_per_s', float('nan')):,.0f} |")
    lines += ["", f"Verdict: RSS growth {'under' if growth < 0.05 else 'OVER'} 5%; "
                  f"{'no step lost' if kept == expected else 'STEPS MISSING'}; "
                  f"{len(kept)} of {len(kept)} kept steps restored and read back."]
    _host.write_report(lines, args.out)


def _restore_each(config) -> list[tuple[int, float, int]]:
    """(step, restore seconds, bytes read by `verify`) for every step left on disk."""
    trainer = build_trainer(config, mesh_from_config(config.mesh))
    ckpt = Checkpointer(os.path.join(config.run_dir, "checkpoints"), read_only=True)
    out = []
    for step in ckpt.steps():
        start = time.perf_counter()
        state, _, _ = ckpt.restore(trainer.abstract_state(canonical=True), step)
        jax.block_until_ready(state)
        out.append((step, time.perf_counter() - start, ckpt.verify(step)))
    return out


def _ms(values: list[float]) -> str:
    if not values:
        return "n/a (no event from Orbax)"
    return f"{1e3 * statistics.median(values):.1f} / {1e3 * max(values):.1f} ms ({len(values)} saves)"


if __name__ == "__main__":
    main()
