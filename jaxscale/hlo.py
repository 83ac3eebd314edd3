"""Read the collectives out of a compiled program's HLO text: what a layout really communicates."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTR = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def collective_stats(hlo_text: str, sent: bool = False) -> dict[str, tuple[int, float]]:
    """`{op: (count, bytes)}` for each collective in the HLO; bytes are the results' sizes, or
    with `sent` what each device sends under the usual algorithms (`sent_bytes`).

    Async pairs (`-start`/`-done`) count once; a tuple-shaped collective counts once with the
    bytes of all its arrays (for async starts this includes the operand aliases).
    """
    stats = {op: [0, 0] for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        shape, op = m.groups()
        size = 0
        for dtype, dims in _ARRAY.findall(shape):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            size += n * _BYTES[dtype]
        stats[op][0] += 1
        stats[op][1] += sent_bytes(op, size, replica_groups(line)) if sent else size
    return {op: (c, b) for op, (c, b) in stats.items()}


def sent_bytes(op: str, result_bytes: int, groups: frozenset[frozenset[int]] | None) -> float:
    """What each device of a group of n sends for a collective whose result has `result_bytes`:
    a ring all-reduce 2 (n-1)/n of it, an all-gather or all-to-all (n-1)/n, a reduce-scatter
    (n-1) times it (its result is 1/n of its input), a collective-permute all of it. Unread
    groups count as one group of unknown size: the result's bytes."""
    n = max(len(g) for g in groups) if groups else 0
    if op == "collective-permute" or n == 0:
        return float(result_bytes)
    if n == 1:
        return 0.0
    factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
              "reduce-scatter": n - 1}[op]
    return factor * result_bytes


ABBREVIATIONS = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS",
                 "all-to-all": "A2A", "collective-permute": "CP"}


def format_bytes(n: float) -> str:
    """`1.5 MiB`, `64.0 KiB` or `320 B`."""
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_stats(stats: dict[str, tuple[int, int]]) -> str:
    """`AR 1 (1.2 MiB), AG 21 (3.4 MiB)` from `collective_stats`; `none` when there are none."""
    parts = [f"{ABBREVIATIONS[op]} {count} ({format_bytes(size)})"
             for op, (count, size) in stats.items() if count]
    return ", ".join(parts) or "none"


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(?:body|condition|calls|branch_computations|true_computation|"
                    r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d, ]*\},?\s*)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\]"
                          r"(?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}")


def _iota(dims: str, perm: str | None) -> np.ndarray:
    ids = np.arange(math.prod(int(d) for d in dims.split(","))).reshape(
        [int(d) for d in dims.split(",")])
    return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def replica_groups(line: str) -> frozenset[frozenset[int]] | None:
    """The replica groups of a collective as a set of device-id sets, in any of the notations
    XLA prints (a list, `[groups,size]<=[dims]T(perm)`, `mesh[axes] {axes}`); None when absent
    or unread (then it cannot be told apart from any other)."""
    if m := _LIST_GROUPS.search(line):
        groups = frozenset(frozenset(int(i) for i in g.split(",") if i.strip())
                           for g in re.findall(r"\{([\d, ]*)\}", m.group(1)))
        return groups or None  # `{}`: every device, in a program that may not say how many
    if m := _IOTA_GROUPS.search(line):
        ids = _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2)))
    elif m := _MESH_GROUPS.search(line):
        axes = dict(re.findall(r"'([^']*)'=(\d+)", m.group(1)))
        sizes = [int(n) for n in axes.values()]
        ids = (_iota(m.group(2), m.group(3)) if m.group(2) else np.arange(math.prod(sizes)))
        ids = ids.reshape(sizes)
        inner = [list(axes).index(a) for a in re.findall(r"'([^']*)'", m.group(4))]
        outer = [i for i in range(len(sizes)) if i not in inner]
        ids = ids.transpose(outer + inner).reshape(-1, math.prod(sizes[i] for i in inner))
    else:
        return None
    return frozenset(frozenset(int(i) for i in row) for row in ids)


def _ancestors(name: str, deps: dict[str, list[str]]) -> set[str]:
    seen, todo = set(), list(deps.get(name, []))
    while todo:
        if (x := todo.pop()) not in seen:
            seen.add(x)
            todo.extend(deps.get(x, []))
    return seen


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """`{name: its instruction lines}` of every computation in the HLO text."""
    comps: dict[str, list[str]] = {}
    body: list[str] | None = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and (m := _HEADER.match(line)):
            body = comps.setdefault(m.group(1), [])
        elif body is not None and " = " in line:
            body.append(line.strip())
    return comps


def _called(line: str) -> list[str]:
    """The computations an instruction line calls (loop bodies, branches, fusions)."""
    return [c.strip(" {}%") for m in _CALLS.finditer(line) for c in m.group(1).split(",")]


def branch_collective_stats(hlo_text: str, keep: Callable[[str], bool] | None = None,
                            sent: bool = False) -> tuple[dict, dict]:
    """`collective_stats` (bytes `sent` or not) of the collectives outside any conditional's
    branches (run every time) and of those inside them, in what the branches call too (run
    when taken); only those whose instruction line `keep` accepts, when given."""
    comps = _computations(hlo_text)
    todo = [c for lines in comps.values() for line in lines if " conditional(" in line
            for c in _called(line)]
    inside: set[str] = set()
    while todo:
        if (c := todo.pop()) in comps and c not in inside:
            inside.add(c)
            todo += [d for line in comps[c] for d in _called(line)]
    text = {True: [], False: []}
    for name, lines in comps.items():
        text[name in inside] += [line for line in lines if keep is None or keep(line)]
    return (collective_stats("\n".join(text[False]), sent),
            collective_stats("\n".join(text[True]), sent))


def unordered_collectives(hlo_text: str) -> list[tuple[str, str, str]]:
    """Pairs of collectives that may meet the wrong partners: `(computation, a, b)`.

    XLA:CPU runs a program's collectives in program order, but a loop (or call) holding some
    runs as one operation, next to any other with no path between them; and its in-process
    collectives tell collectives apart by kind, channel (jax gives all of `shard_map`'s the
    same) and group only. So a loop and a collective (or two loops) of one computation with no
    path between them, holding collectives of one kind, channel and group, can pair one
    emulated device's `a` with another's `b`: an abort, or mixed data. Buffers the two share
    may still order them; groups that cannot be read count as any group.
    """
    comps = _computations(hlo_text)
    held: dict[str, set] = {}

    def holds(line: str) -> set:
        """(kind, channel, groups) of the collectives `line` runs, itself or in what it calls."""
        if m := _COLLECTIVE.search(line):
            channel = re.search(r"channel_id=(\d+)", line)
            return {(m.group(1), channel and int(channel.group(1)), replica_groups(line))}
        out = set()
        for comp in _called(line):
            if comp in comps and comp not in held:  # each called computation read once
                held[comp] = set().union(*map(holds, comps[comp]))
            out |= held.get(comp, set())
        return out

    def clash(a: set, b: set) -> bool:
        return any(ka == kb and ca == cb and (ga == gb or ga is None or gb is None)
                   for ka, ca, ga in a for kb, cb, gb in b)

    pairs = []
    for comp, lines in comps.items():
        deps, nodes, loops = {}, {}, set()
        for line in lines:
            name, rhs = line.split(" = ", 1)
            name = name.removeprefix("ROOT ").strip().lstrip("%")
            deps[name] = [d for d in re.findall(r"%([\w.\-]+)", rhs) if d not in comps]
            if found := holds(line):
                nodes[name] = found
                if not _COLLECTIVE.search(line):
                    loops.add(name)
        before = {n: _ancestors(n, deps) for n in nodes}
        names = list(nodes)
        pairs += [(comp, a, b) for i, a in enumerate(names) for b in names[i + 1:]
                  if (a in loops or b in loops) and clash(nodes[a], nodes[b])
                  and a not in before[b] and b not in before[a]]
    return pairs


_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_WHILE = re.compile(r"\swhile\(%([\w.\-]+)\), condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_DEF = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(([^)]*)\)(.*)$")
_BOUND = {"LT": 0, "LE": 1}  # `i < N` runs N - start times, `i <= N` one more


def _definitions(lines: list[str]) -> dict[str, tuple[str, str, str]]:
    """`{name: (opcode, operands, the rest of the line)}` of a computation's instructions."""
    return {m.group(1): m.group(2, 3, 4) for line in lines if (m := _DEF.match(line))}


def _constant(name: str, defs: dict) -> int | None:
    """The integer an instruction holds, seen through copies and bitcasts; None if not a constant."""
    while defs.get(name, ("",))[0] in ("copy", "copy-done", "bitcast"):
        name = defs[name][1].strip().lstrip("%")
    if defs.get(name, ("",))[0] == "constant" and re.fullmatch(r"-?\d+", defs[name][1].strip()):
        return int(defs[name][1])
    return None


def trip_count(line: str, caller: list[str], condition: list[str]) -> int:
    """How many times the while loop of `line` (an instruction of `caller`) runs its body: XLA's
    `known_trip_count` where printed (XLA:CPU), else read from a condition `i < N` (or `N > i`,
    `<=`) on a loop counter whose start is a constant of `caller` (the TPU compiler's loops)."""
    if m := _KNOWN_TRIPS.search(line):
        return int(m.group(1))
    defs, start = _definitions(condition), None
    root = next((d for d in condition if d.startswith("ROOT ")), "")
    compare = _DEF.match(root)
    if compare and compare.group(2) == "compare":
        a, b = (x.strip().lstrip("%") for x in compare.group(3).split(","))
        direction = re.search(r"direction=(\w+)", compare.group(4)).group(1)
        if direction in ("GT", "GE"):
            a, b, direction = b, a, {"GT": "LT", "GE": "LE"}[direction]
        counter, bound = defs.get(a), _constant(b, defs)
        if direction in _BOUND and bound is not None and counter and counter[0] == "get-tuple-element":
            index = int(re.search(r"index=(\d+)", counter[2]).group(1))
            tuple_name = _WHILE.search(line).group(1)
            outer = _definitions(caller)
            if outer.get(tuple_name, ("",))[0] == "tuple":
                operand = outer[tuple_name][1].split(",")[index]
                start = _constant(re.sub(r"/\*.*?\*/", "", operand).strip().lstrip("%"), outer)
    if start is None:
        raise ValueError(f"cannot read the trip count of a while loop: {line[:200]}")
    return max(bound - start + _BOUND[direction], 0)


def executions(hlo_text: str) -> dict[str, int]:
    """How many times each computation runs when the entry computation runs once: a while loop's
    body `trip_count` times its caller's count (nested loops multiply), everything else a
    computation calls (fusions, calls, conditional branches: as if taken) once per call."""
    comps = _computations(hlo_text)
    entry = next(m.group(1) for line in hlo_text.splitlines()
                 if line.startswith("ENTRY") and (m := _HEADER.match(line)))
    calls: dict[str, list[tuple[str, int]]] = {}  # callee: [(caller, times per caller's run)]
    for name, lines in comps.items():
        for line in lines:
            loop = _WHILE.search(line)
            trips = trip_count(line, lines, comps[loop.group(2)]) if loop else 1
            for callee in _called(line):
                calls.setdefault(callee, []).append((name, trips + (loop is not None and
                                                                    callee == loop.group(2))))
    counts: dict[str, int] = {entry: 1}

    def count(name: str) -> int:
        if name not in counts:
            counts[name] = 0  # no cycles in HLO; this only guards the recursion
            counts[name] = sum(count(caller) * times for caller, times in calls.get(name, []))
        return counts[name]

    return {name: count(name) for name in comps}
