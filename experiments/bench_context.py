"""Context parallelism: per-device memory, step time and collectives against sequence length.

    python3 experiments/bench_context.py [--steps N] [--cell-seconds S] [--max-time-seq L]
                                         [--budget-mib M] [--max-seq L]
                                         [--out docs/results/context.md]

The small long-context Llama of `configs/long_context.py` (one row per step, `mesh.data=1`) with
each row split over C = 1, 2, 4, 8 devices (`mesh.context=C`) for each attention exchange
(`parallel.context_attention` = ring, all_gather, all_to_all; C = 1 is the plain model):
1. the compiled step's temporary memory per device (`memory_analysis()`, compile only) for
   sequences of 1k to 32k tokens, and the step time where running it is affordable (sequences up
   to `--max-time-seq`: after one warm-up step, up to `--steps` timed steps, fewer once a cell's
   timed steps pass `--cell-seconds` together; the other cells say "not timed");
2. the collectives of the compiled step at `--collective-seq` tokens for C = 2, 4, 8 (count and
   bytes of their per-device results in the optimized HLO, `jaxscale.hlo.collective_stats`) next
   to the analytic volume (`context_parallel.collective_bytes`);
3. the longest sequence whose compiled step fits `--budget-mib` of temporary + argument memory
   per device, for each C and kind (powers of two up to `--max-seq`, then bisected; compile only).
The plot (temporary memory and step time against sequence) is written next to the markdown file
(same name, `.png`); it needs matplotlib (`pip install matplotlib`, not a jaxscale dependency)
and is skipped with a message without it. On a CPU-only host 8 devices are emulated (unless
XLA_FLAGS is already set); they share the host's cores, so step times add up every device's work
and show no parallel speed-up (see the output's header).
"""

# ruff: noqa: E402  (XLA_FLAGS must be set before jax is imported)

import _host

_host.emulate_devices()

import argparse
import os
import statistics
import subprocess
import time

import jax

from jaxscale.config import base_config, validate
from jaxscale.data import build_data, make_global_batch
from jaxscale.hlo import collective_stats, format_stats
from jaxscale.mesh import mesh_from_config
from jaxscale.models import param_count
from jaxscale.parallel import context_parallel, ring_attention
from jaxscale.train.trainer import build_trainer

SEQS = (1024, 2048, 4096, 8192, 16384, 32768)
PARTS = (2, 4, 8)
KINDS = context_parallel.KINDS
# (C, kind): the plain model on one device, then every kind for each C
VARIANTS = ((1, "none"),) + tuple((c, kind) for kind in KINDS for c in PARTS)
ATTENTION_OPS = ("collective-permute", "all-gather", "reduce-scatter", "all-to-all")
WARMUP_STEPS = 1
MIB = 2**20
HOST_FRACTION = 0.6  # time a cell only if all its devices' memory fits this share of host RAM


def bench_config(seq: int, parts: int = 1, kind: str = "ring"):
    """`configs/long_context.py`'s model and batch at sequence `seq`, split over `parts`."""
    c = base_config()
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=256,
                   max_seq_len=seq, rope_theta=500000.0, scan_layers=False)
    c.data.seq_len = seq
    c.mesh.update(data=1, context=parts)
    c.parallel.context_attention = "ring" if kind == "none" else kind
    c.train.update(global_batch_size=1)
    validate(c)
    return c


def label(parts: int, kind: str) -> str:
    return "C=1 (one device)" if parts == 1 else f"C={parts} {kind}"


class Cells:
    """Compiled steps by (seq, C, kind), each compiled once: memory, collectives, or the error."""

    def __init__(self, keep_up_to: int):
        self.keep_up_to, self.cells = keep_up_to, {}
        self.loads = []  # the host's 1-minute load average after each timed cell

    def get(self, seq: int, parts: int, kind: str) -> dict:
        key = (seq, parts, kind)
        if key not in self.cells:
            self.cells[key] = self._compile(seq, parts, kind)
        return self.cells[key]

    def _compile(self, seq: int, parts: int, kind: str) -> dict:
        start = time.perf_counter()
        try:
            config = bench_config(seq, parts, kind)
            trainer = build_trainer(config, mesh_from_config(config.mesh, jax.devices()[:parts]))
            compiled = trainer.compile()
        except Exception as e:  # noqa: BLE001  (reported in the table, never hidden)
            text = " ".join(str(e).split())
            print(f"{label(parts, kind):>20} seq {seq:>6}: FAILED {type(e).__name__}: {text[:300]}",
                  flush=True)
            return {"error": f"{type(e).__name__}: {text}"}
        mem = compiled.memory_analysis()
        cell = {"temp": mem.temp_size_in_bytes, "arg": mem.argument_size_in_bytes,
                "stats": collective_stats(compiled.as_text()),
                "compile_s": time.perf_counter() - start}
        if seq <= self.keep_up_to:
            cell.update(config=config, trainer=trainer)
        print(f"{label(parts, kind):>20} seq {seq:>6}: temp {cell['temp'] / MIB:9.1f} MiB, "
              f"args {cell['arg'] / MIB:5.2f} MiB, compiled in {cell['compile_s']:.1f} s", flush=True)
        return cell


# ---------------------------------------------------------------------------------------------
# Measure


def memory_sweep(cells: Cells, devices: int) -> list[tuple[int, str]]:
    variants = [(c, k) for c, k in VARIANTS if c <= devices]
    for seq in SEQS:
        for parts, kind in variants:
            cells.get(seq, parts, kind)
    return variants


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def time_cell(cell: dict, steps: int, seconds: float) -> None:
    """One warm-up step, then up to `steps` timed (stopping once they pass `seconds` together);
    stores `times` (seconds) in the cell."""
    config, trainer = cell["config"], cell["trainer"]
    _, data = build_data(config)
    state = trainer.init()
    times = []
    for i in range(WARMUP_STEPS + steps):
        batch = make_global_batch(next(data), trainer.batch_sharding)
        start = time.perf_counter()
        state, out = trainer.step(state, batch)
        jax.block_until_ready((state, out))
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
            if sum(times) > seconds:
                break
    cell["times"], cell["loss"] = times, float(out["loss"])
    del cell["trainer"]  # its compiled step is no longer needed


def timing(cells: Cells, variants, steps: int, seconds: float, max_seq: int) -> None:
    ram = host_memory()
    for seq in SEQS:
        if seq > max_seq:
            break
        for parts, kind in variants:
            cell = cells.get(seq, parts, kind)
            if "error" in cell:
                continue
            need = parts * (cell["temp"] + cell["arg"])
            if need > HOST_FRACTION * ram:
                cell["untimed"] = f"needs {need / 2**30:.1f} GiB of host memory"
                continue
            time_cell(cell, steps, seconds)
            cells.loads.append(os.getloadavg()[0])
            print(f"{label(parts, kind):>20} seq {seq:>6}: step {statistics.median(cell['times']):7.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in cell['times'])}), loss {cell['loss']:.3f}",
                  flush=True)


def fits(cell: dict, budget: int) -> bool:
    return "error" not in cell and cell["temp"] + cell["arg"] <= budget


def longest_fitting(cells: Cells, parts: int, kind: str, budget: int, max_seq: int) -> dict:
    """The longest sequence (powers of two from SEQS[0] to max_seq, then bisected to 1/8 of the
    last power that fits) whose step fits `budget` bytes per device; the first that does not."""
    seq, fit = SEQS[0], None
    while seq <= max_seq and fits(cells.get(seq, parts, kind), budget):
        fit, seq = seq, seq * 2
    if fit is None:
        return {"fit": None, "over": seq}
    if seq > max_seq:
        return {"fit": fit, "over": None}
    lo, hi, step = fit, seq, max(1024, fit // 8)  # multiples of 1024: divisible by 2C
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if fits(cells.get(mid, parts, kind), budget):
            lo = mid
        else:
            hi = mid
    return {"fit": lo, "over": hi}


# ---------------------------------------------------------------------------------------------
# Report


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}" if n >= 100 * MIB else f"{n / MIB:.1f}"


def _tokens(n: int | None) -> str:
    return "—" if n is None else (f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}")


def _failed(cell: dict) -> str:
    """How a cell that did not compile ended: refused with a one-line error, or failed."""
    return "refused" if cell["error"].startswith("UserError") else "fails"


def errors_of(cells: Cells) -> dict[str, list[str]]:
    """Distinct compile errors and the cells that hit them."""
    out = {}
    for (seq, parts, kind), cell in sorted(cells.cells.items()):
        if "error" in cell:
            out.setdefault(cell["error"], []).append(f"{label(parts, kind)} at {_tokens(seq)}")
    return out


def code_version() -> str:
    """The commit the jaxscale package was imported from, and whether its files differ from it."""
    def git(*cmd):
        return subprocess.run(["git", "-C", str(_host.ROOT), *cmd], capture_output=True, text=True,
                              check=False).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    return f"commit {commit}" + (" with uncommitted changes under jaxscale/"
                                 if git("status", "--porcelain", "jaxscale") else "")


def header(args, load: float, loads: list[float]) -> list[str]:
    c = bench_config(SEQS[0])
    m = c.model
    cmd = (f"python3 experiments/bench_context.py --steps {args.steps} --cell-seconds "
           f"{args.cell_seconds:g} --max-time-seq "
           f"{args.max_time_seq} --collective-seq {args.collective_seq} --budget-mib {args.budget_mib} "
           f"--max-seq {args.max_seq}")
    dev, n = jax.devices()[0], jax.device_count()
    lines = ["# Context parallelism: memory, step time and collectives against sequence length", "",
             f"Generated by `{cmd}`.", "", *_host.environment_lines(load),
             f"- Code: jaxscale at {code_version()}.",
             f"- Model (`configs/long_context.py`'s): Llama, d_model {m.d_model}, {m.n_layers} layers "
             f"(unrolled), {m.n_heads} heads ({m.n_kv_heads} kv, head_dim {m.head_dim}), d_ff {m.d_ff}, "
             f"vocab {m.vocab_size}, {m.dtype}, `model.attention={m.attention}` (the plain model's and "
             f"all_to_all's), no remat; {param_count(m) / 1e6:.2f}M parameters, AdamW. One row per "
             "step (`train.global_batch_size=1`, `mesh.data=1`), from the embedded corpus; "
             "`model.max_seq_len` = the sequence.",
             "- C = `mesh.context` (the first C devices; other axes 1), "
             "`parallel.context_attention` = ring | all_gather | all_to_all. C = 1 is the plain "
             "model on one device (no split; the kind does not apply).",
             "- Memory: the compiled train step's `memory_analysis()` per device; temporaries "
             "(`temp_size_in_bytes`) unless said otherwise. Compile only: no step runs for it.",
             f"- Step time: after {WARMUP_STEPS} warm-up step, the median of up to {args.steps} "
             f"timed steps, fewer (their number in brackets) where a cell's timed steps passed "
             f"{args.cell_seconds:g} s together; for "
             f"sequences up to {_tokens(args.max_time_seq)}; longer ones are not run (too slow on this "
             "host) and say \"not timed\"."
             + (f" Host load average (1 min) after each timed cell: {min(loads):.1f} to {max(loads):.1f} "
                f"(on {os.cpu_count()} cores; this script alone keeps it near 1 to 2, more means other "
                f"processes shared the cores)."
                if loads else "")]
    if dev.platform == "cpu":
        lines.append(
            f"- **CPU caveat.** The {n} devices are emulated and share {os.cpu_count()} cores: a "
            "step's time is the sum of every device's work (plus the copies that stand in for "
            "collectives), not parallel speed-up. C devices splitting a row do not make a step C "
            "times faster here; the time shows how much total work each kind does (the ring "
            "skips the causally masked half-blocks, all_gather and all_to_all do not). Memory per "
            "device is what the compiler plans for each device and does not depend on sharing cores.")
    return lines + [""]


def memory_tables(cells: Cells, variants) -> list[str]:
    cols = " | ".join(_tokens(s) for s in SEQS)
    rule = "|---|" + "---:|" * len(SEQS)
    lines = ["## Temporary memory per device (MiB)", "", f"| C, kind | {cols} |", rule]
    for parts, kind in variants:
        row = []
        for seq in SEQS:
            cell = cells.get(seq, parts, kind)
            row.append(_failed(cell) + " (below)" if "error" in cell else _mib(cell["temp"]))
        lines.append(f"| {label(parts, kind)} | {' | '.join(row)} |")
    lines += ["", "Arguments (parameters, optimizer state, the batch) add "
              f"{_mib(cells.get(SEQS[0], 1, 'none')['arg'])}–{_mib(cells.get(SEQS[-1], 1, 'none')['arg'])} "
              "MiB per device (the same on every device: parameters are replicated over `context`).",
              "", "Temporary memory per device relative to the plain model's (C = 1) at the same "
              "sequence (1/C would be a perfect split):", "", f"| C, kind | 1/C | {cols} |",
              "|---|---:|" + "---:|" * len(SEQS)]
    for parts, kind in variants[1:]:
        row = []
        for seq in SEQS:
            cell, one = cells.get(seq, parts, kind), cells.get(seq, 1, "none")
            row.append("—" if "error" in cell or "error" in one else f"{cell['temp'] / one['temp']:.3f}")
        lines.append(f"| {label(parts, kind)} | {1 / parts:.3f} | {' | '.join(row)} |")
    return lines + [""]


def time_table(cells: Cells, variants, steps: int) -> list[str]:
    lines = ["## Step time (s)", "", f"| C, kind | {' | '.join(_tokens(s) for s in SEQS)} |",
             "|---|" + "---:|" * len(SEQS)]
    for parts, kind in variants:
        row = []
        for seq in SEQS:
            cell = cells.cells.get((seq, parts, kind), {})
            if "error" in cell:
                row.append(_failed(cell))
            elif "times" in cell:
                t, n = statistics.median(cell["times"]), len(cell["times"])
                row.append((f"{t:.2f}" if t < 10 else f"{t:.1f}") + (f" ({n})" if n < steps else ""))
            else:
                row.append(f"not timed ({cell['untimed']})" if "untimed" in cell else "not timed")
        lines.append(f"| {label(parts, kind)} | {' | '.join(row)} |")
    tok = []
    for seq in SEQS:
        cell = cells.cells.get((seq, 1, "none"), {})
        if "times" in cell:
            tok.append(f"{_tokens(seq)}: {seq / statistics.median(cell['times']):,.0f}")
    if tok:
        lines += ["", f"Plain model tokens/s (C = 1): {', '.join(tok)}."]
    return lines + [""]


def collective_rows(cells: Cells, seq: int, devices: int) -> list[dict]:
    rows = []
    for kind in KINDS:
        for parts in PARTS:
            if parts > devices:
                continue
            cell = cells.get(seq, parts, kind)
            if "error" in cell:
                rows.append({"kind": kind, "C": parts, "error": _failed(cell)})
                continue
            config = bench_config(seq, parts, kind)
            want = context_parallel.collective_bytes(kind, config.model, seq, 1, parts)
            got = {op: cell["stats"][op] for op in ATTENTION_OPS}
            rows.append({"kind": kind, "C": parts, "seq": seq, "got": got,
                         "want": {op: want.get(op, (0, 0)) for op in ATTENTION_OPS},
                         "other": {op: v for op, v in cell["stats"].items() if op not in ATTENTION_OPS}})
    return rows


def collective_table(rows: list[dict], seq: int) -> list[str]:
    lines = [f"## Collectives per step at {_tokens(seq)} tokens: compiled HLO against the analysis", "",
             "| kind | C | op | count (HLO) | bytes/device (HLO) | count (analytic) | bytes (analytic) "
             "| match | other collectives |", "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kind']} | {r['C']} | — | {r['error']} (below) | | | | | |")
            continue
        ops = [op for op in ATTENTION_OPS if r["got"][op][0] or r["want"][op][0]]
        for i, op in enumerate(ops):
            (gc, gb), (wc, wb) = r["got"][op], r["want"][op]
            other = format_stats(r["other"]) if i == 0 else ""
            lines.append(f"| {r['kind']} | {r['C']} | {op} | {gc} | {gb:,} | {wc} | {wb:,} | "
                         f"{'yes' if (gc, gb) == (wc, wb) else '**no**'} | {other} |")
    matched = sum(all(r["got"][op] == r["want"][op] for op in ATTENTION_OPS) for r in rows if "got" in r)
    lines += ["", f"{matched} of {sum('got' in r for r in rows)} compiled layouts hold exactly the "
              "analytic attention collectives (every op of the four compared, counts and bytes; an op "
              "absent from both is not listed). Bytes are the per-device results of each op "
              "(`jaxscale.hlo.collective_stats`; both layers are in the program, unrolled). The "
              "all-reduce under other collectives is the gradient sum over `context` (parameters are "
              "replicated over it, as under data parallelism), the same for every kind and C; the "
              "analysis covers the attention exchanges only."]
    return lines + [""]


def budget_table(budgets: dict, budget: int, max_seq: int) -> list[str]:
    lines = [f"## Longest sequence within {budget / MIB:,.0f} MiB per device (temporaries + arguments)", "",
             f"Compile only: powers of two from {_tokens(SEQS[0])} up to {_tokens(max_seq)}, then "
             "bisected between the last that fits and the first that does not, to 1/8 of the former "
             "(at least 1k).", "",
             "| C, kind | longest that fits | its memory (MiB) | shortest tried that does not "
             "| its memory (MiB) | vs C = 1 |", "|---|---:|---:|---:|---:|---:|"]
    one = budgets[(1, "none")]["fit"]
    for (parts, kind), b in budgets.items():
        fit_mem = _mib(b["fit_mem"]) if b["fit"] else "—"
        over_mem = "—" if not b["over"] else (b.get("over_error") or _mib(b["over_mem"]))
        ratio = f"{b['fit'] / one:.1f}x" if b["fit"] and one else "—"
        lines.append(f"| {label(parts, kind)} | {_tokens(b['fit'])} | {fit_mem} | "
                     f"{_tokens(b['over']) if b['over'] else f'none up to {_tokens(max_seq)}'} | "
                     f"{over_mem} | {ratio} |")
    return lines + [""]


def error_lines(cells: Cells) -> list[str]:
    errors = errors_of(cells)
    if not errors:
        return []
    lines = ["## Refused or failed to compile", ""]
    for error, where in errors.items():
        lines.append(f"- {', '.join(where)}: `{error}`")
    return lines + [""]


def footer(seconds: float, commentary: list[str]) -> list[str]:
    return ["## What the numbers show", "", *commentary, "", f"Script run time: {seconds:.0f} s."]


def _step(cells: Cells, seq: int, parts: int, kind: str) -> float | None:
    cell = cells.cells.get((seq, parts, kind), {})
    return statistics.median(cell["times"]) if "times" in cell else None


def non_monotonic(cells: Cells, variants) -> list[str]:
    """Where a longer sequence compiled to less temporary memory than a shorter one (of all the
    sequences compiled, the budget search's included), with the ring's query tiling at each."""
    out = []
    tile = ring_attention.QUERY_TILE
    for parts, kind in variants:
        points = sorted((seq, c["temp"]) for (seq, p, k), c in cells.cells.items()
                        if (p, k) == (parts, kind) and "error" not in c)
        drops = [(a, b) for a, b in zip(points, points[1:], strict=False) if b[1] < a[1]]
        if not drops:
            continue
        text = "; ".join(f"{_tokens(a)} needs {_mib(ma)} MiB, {_tokens(b)} only {_mib(mb)}"
                         for (a, ma), (b, mb) in drops)
        line = f"- Temporary memory is not monotonic in the sequence for {label(parts, kind)}: {text}."
        if kind == "ring":
            untiled = [seq for seq, _ in points if any(
                q > tile and ring_attention.query_tiles(q) == 1 for q in (seq // parts, seq // parts // 2))]
            line += (f" The ring takes a block's queries in equal tiles of {tile // 4} to {tile} "
                     f"(`query_tiles`); a device's blocks have seq/C or seq/2C queries, and at "
                     f"{', '.join(_tokens(x) for x in untiled) or 'none of them'} (of the sequences "
                     "compiled) some have no such divisor and are computed whole, scores and all. "
                     "The budget search assumes memory grows with the sequence; lengths between the "
                     "points compiled may fit or not either way.")
        out.append(line)
    return out


def commentary(cells: Cells, variants, budgets: dict, coll_rows: list[dict]) -> list[str]:
    """What the measurements show: every number here is computed from this run's cells."""
    m = bench_config(SEQS[0]).model
    top = max(p for p, _ in variants)
    out = []

    def temp(seq, parts, kind):
        cell = cells.get(seq, parts, kind)
        return None if "error" in cell else cell["temp"]

    for seq in sorted({8192, SEQS[-1]} & set(SEQS)):
        one = temp(seq, 1, "none")
        text = ", ".join(f"{k} {temp(seq, top, k) / one:.3f}" for k in KINDS if temp(seq, top, k))
        failed = [f"{k} is {_failed(cells.get(seq, top, k))}" for k in KINDS if not temp(seq, top, k)]
        out.append(f"- At {_tokens(seq)} tokens the plain model needs {_mib(one)} MiB of temporaries "
                   f"(mostly [heads, seq, seq] attention scores and their gradients); with C = {top} a "
                   f"device needs {text} of that (1/C = {1 / top:.3f})"
                   + (f"; {', '.join(failed)}." if failed else "."))
    growth = {k: temp(SEQS[-1], top, k) / temp(SEQS[-3], top, k) for k in KINDS if temp(SEQS[-1], top, k)}
    quad = (SEQS[-1] / SEQS[-3]) ** 2
    out.append(
        f"- **ring** holds its own K/V and one visiting block and computes each block's scores "
        f"{ring_attention.QUERY_TILE} queries at a time (`QUERY_TILE`), so no device holds a "
        f"[seq, seq] or [seq/C, seq] array: its memory falls faster than 1/C. It still grows faster "
        f"than the sequence: x{growth.get('ring', float('nan')):.1f} from {_tokens(SEQS[-3])} to "
        f"{_tokens(SEQS[-1])} at C = {top} (x{SEQS[-1] // SEQS[-3]} linear, x{quad:.0f} quadratic).")
    kv_row = SEQS[-1] * m.n_kv_heads * m.head_dim * 4
    out.append(
        f"- **all_gather** gathers the whole row's K/V (cheap with {m.n_kv_heads} kv heads: "
        f"{_mib(kv_row)} MiB each of K and V at {_tokens(SEQS[-1])}) and scores its seq/C queries "
        f"against all of it: [heads, seq/C, seq] scores, 1/C of the plain model's and quadratic in "
        f"the sequence (x{growth.get('all_gather', float('nan')):.1f} from {_tokens(SEQS[-3])} to "
        f"{_tokens(SEQS[-1])}).")
    a2a = [p for p in PARTS if p <= top and temp(SEQS[-1], p, "all_to_all")]
    a2a_text = ", ".join(f"C = {p}: {temp(SEQS[-1], p, 'all_to_all') / temp(SEQS[-1], 1, 'none'):.3f}"
                         for p in a2a)
    out.append(
        f"- **all_to_all** gives each device whole rows of heads/C heads and runs the model's own "
        f"attention on them: [heads/C, seq, seq] scores, about 1/C of the plain model's ({a2a_text} at "
        f"{_tokens(SEQS[-1])}), quadratic in the sequence. It needs the heads ({m.n_heads}) divisible "
        f"by C" + (f", so with this model C = {top} is refused (below)."
                     if m.n_heads % top else "."))
    one = budgets[(1, "none")]["fit"]
    fit_text = "; ".join(f"{label(p, k)} {_tokens(b['fit'])}"
                         + (f" ({b['fit'] / one:.1f}x)" if b["fit"] and one else "")
                         for (p, k), b in budgets.items() if p > 1)
    reach = f"{_tokens(one)} tokens" if one else f"no sequence from {_tokens(SEQS[0])}"
    out.append(f"- Within the budget the plain model reaches {reach}; {fit_text}.")
    out += non_monotonic(cells, variants)
    bad = [r for r in coll_rows if "got" in r and any(r["got"][op] != r["want"][op] for op in ATTENTION_OPS)]
    if not bad:
        out.append("- Collectives: every compiled layout's attention collectives equal the analysis.")
    for r in bad:
        diffs = [f"{op} {r['got'][op][0]} ops / {r['got'][op][1]:,} B measured against "
                 f"{r['want'][op][0]} / {r['want'][op][1]:,} B" for op in ATTENTION_OPS
                 if r["got"][op] != r["want"][op]]
        line = f"- Collectives: **mismatch** for {r['kind']} C = {r['C']}: {'; '.join(diffs)}."
        out.append(line)
    timed = [s for s in SEQS if _step(cells, s, 1, "none")]
    if timed:
        seq = timed[-1]
        one = _step(cells, seq, 1, "none")
        text = ", ".join(f"{label(p, k)} {_step(cells, seq, p, k) / one:.2f}"
                         for p, k in variants[1:] if _step(cells, seq, p, k))
        out.append(f"- Step time at {_tokens(seq)} relative to the plain model's ({one:.1f} s), all "
                   f"devices' work on {os.cpu_count()} shared cores: {text}. Below 1 means less total "
                   "work or better-cached work than the plain model's [seq, seq] attention, not "
                   "parallel speed-up; above 1, extra work (all_gather and all_to_all compute the "
                   "causally masked half of the scores, as the plain model does; the ring skips it) "
                   "and the exchanges' copies.")
    return out


def plot(cells: Cells, variants, budget: int, path: str) -> None:
    """Temporary memory per device and step time against sequence, one line per (C, kind)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"none": "black", "ring": "tab:blue", "all_gather": "tab:orange", "all_to_all": "tab:green"}
    styles = {1: ("-", "o"), 2: (":", "s"), 4: ("--", "^"), 8: ("-", "D")}
    for parts, kind in variants:
        style, marker = styles.get(parts, ("-", "o"))
        kw = dict(color=colors[kind], linestyle=style, marker=marker, markersize=4,
                  label=label(parts, kind), alpha=1.0 if parts in (1, 8) else 0.75)
        mem = [(s, cells.get(s, parts, kind)) for s in SEQS]
        mem = [(s, c["temp"] / MIB) for s, c in mem if "error" not in c]
        if mem:
            mem_ax.plot(*zip(*mem, strict=True), **kw)
        timed = [(s, cells.cells.get((s, parts, kind), {})) for s in SEQS]
        timed = [(s, statistics.median(c["times"])) for s, c in timed if "times" in c]
        if timed:
            time_ax.plot(*zip(*timed, strict=True), **kw)
    mem_ax.axhline(budget / MIB, color="gray", linewidth=0.8)
    mem_ax.text(SEQS[-1], budget / MIB * 1.1, f"budget {budget / MIB:,.0f} MiB (with args)",
                fontsize=7, color="gray", ha="right")
    for ax, ylabel in ((mem_ax, "temporary memory per device (MiB)"), (time_ax, "step time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(SEQS, [_tokens(s) for s in SEQS])
        ax.set_xlabel("sequence length (tokens, one row)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    mem_ax.set_title("compiled temporaries per device", fontsize=10)
    time_ax.set_title(f"step time where measured ({jax.device_count()} devices share "
                      f"{os.cpu_count()} cores: total work)", fontsize=10)
    mem_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Context parallelism; {jax.devices()[0].platform}, jax {jax.__version__}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_host.at_least(1), default=3, help="most timed steps per cell")
    parser.add_argument("--cell-seconds", type=float, default=20.0,
                        help="stop timing a cell once its timed steps pass this many seconds together")
    parser.add_argument("--max-time-seq", type=_host.at_least(0), default=8192,
                        help="time steps for sequences up to this (0: time none)")
    parser.add_argument("--collective-seq", type=_host.at_least(1024), default=8192,
                        help="sequence of the collectives table (a multiple of 16)")
    parser.add_argument("--budget-mib", type=_host.at_least(1), default=1024,
                        help="per-device memory budget (temporaries + arguments), MiB")
    parser.add_argument("--max-seq", type=_host.at_least(SEQS[0]), default=131072,
                        help="longest sequence the budget search tries")
    parser.add_argument("--out", default=_host.in_repo("docs/results/context.md"), help="markdown file")
    args = parser.parse_args()
    if args.collective_seq % 16:
        parser.error("--collective-seq must be a multiple of 16 (2 x the largest C)")
    begin, load = time.perf_counter(), os.getloadavg()[0]
    devices = jax.device_count()
    cells = Cells(keep_up_to=args.max_time_seq)
    variants = memory_sweep(cells, devices)
    coll = collective_rows(cells, args.collective_seq, devices)
    budget = args.budget_mib * MIB
    budgets = {}
    for parts, kind in variants:
        b = longest_fitting(cells, parts, kind, budget, args.max_seq)
        if b["fit"]:
            c = cells.get(b["fit"], parts, kind)
            b["fit_mem"] = c["temp"] + c["arg"]
        if b["over"]:
            c = cells.get(b["over"], parts, kind)
            if "error" in c:
                b["over_error"] = _failed(c)
            else:
                b["over_mem"] = c["temp"] + c["arg"]
        budgets[(parts, kind)] = b
        print(f"{label(parts, kind):>20}: longest within budget {_tokens(b['fit'])}", flush=True)
    timing(cells, variants, args.steps, args.cell_seconds, args.max_time_seq)
    lines = (header(args, load, cells.loads) + memory_tables(cells, variants)
             + time_table(cells, variants, args.steps)
             + collective_table(coll, args.collective_seq) + budget_table(budgets, budget, args.max_seq)
             + error_lines(cells))
    lines += footer(time.perf_counter() - begin, commentary(cells, variants, budgets, coll))
    _host.write_report(lines, args.out)
    plot(cells, variants, budget, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
