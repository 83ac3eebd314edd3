"""Read the collectives out of a compiled program's HLO text: what a layout really communicates."""

from __future__ import annotations

import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTR = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def collective_stats(hlo_text: str) -> dict[str, tuple[int, int]]:
    """`{op: (count, bytes)}` for each collective in the HLO; bytes are the results' sizes.

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
        stats[op][1] += size
    return {op: (c, b) for op, (c, b) in stats.items()}


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
