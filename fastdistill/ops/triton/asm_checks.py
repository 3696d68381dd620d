"""Checks read from a compiled Triton kernel's text (TTIR, PTX, SASS): 64-bit offsets, round-to-nearest narrowing,
the innermost loops' instruction mix and spills. Text only, no triton import and no environment change, so tests
can use them beside kernels running in Triton's interpreter (aot.py, which compiles, must run as its own process)."""

from __future__ import annotations

import re

_I32_MUL = re.compile(r"^\s*(%[\w.#]+) = arith\.muli (%[\w.#]+), (%[\w.#]+)(?: overflow<[^>]*>)? : (\S+)")
_CONST = re.compile(r"^\s*(%[\w.#]+) = arith\.constant ")
_FROM = re.compile(r"^\s*(%[\w.#]+) = tt\.(?:splat|broadcast|expand_dims) (%[\w.#]+)")


def i32_products(ttir: str) -> list[str]:
    """The TTIR lines that multiply two run-time 32-bit integers. Each offset into a [N, V] or [K, N, V] tensor is
    a product of an index and a size or stride; done in 32 bits it wraps past 2**31 (an H200 run died with an
    illegal address at K = 4, N = 8192, V = 128256). A product with a compile-time constant (a block index times
    BLOCK, bounded by V) is fine and not reported."""
    const = set()
    for line in ttir.splitlines():
        m = _CONST.match(line)
        if m:
            const.add(m.group(1))
            continue
        m = _FROM.match(line)
        if m and m.group(2) in const:
            const.add(m.group(1))
    bad = []
    for line in ttir.splitlines():
        m = _I32_MUL.match(line)
        if m and (m.group(4) == "i32" or m.group(4).endswith("xi32>")):
            if m.group(2) not in const and m.group(3) not in const:
                bad.append(line.strip().split(" loc(")[0])
    return bad


# a float narrowed by a PTX cvt (f32/f64 -> bf16/f16, f64 -> f32) and its modifiers (rn, rz, rm, rp, sat, relu,
# satfinite); f32 -> f32 with rmi / rzi (floor, trunc) rounds to an integer on purpose and is not matched
_NARROW = re.compile(r"\bcvt((?:\.\w+)*?)\.(?:(?:bf16x2|bf16|f16x2|f16)\.(?:f32|f64)|f32\.f64)\b")


def narrowing_not_to_nearest(ptx: str) -> list[str]:
    """The PTX conversions to a narrower float (f32 -> bf16/f16, f64 -> f32) that do not round to nearest even.
    Triton's interpreter truncates on the cast to bfloat16 (numpy has no bfloat16), so the interpreter tests cannot
    see a kernel whose gradients lost round-to-nearest (a bias of half an ulp per element, ~2e-3 relative in bf16,
    that accumulates in the optimizer); the compiled PTX can."""
    bad = set()
    for m in _NARROW.finditer(ptx):
        mods = m.group(1).split(".")
        if "rn" not in mods:
            bad.add(m.group(0))
    return sorted(bad)


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LOOP_CLASSES = ("MUFU", "SHFL", "BAR", "LDG", "STG", "LDS", "STS", "STL", "LDL")


def loop_profile(sass: str) -> list[dict]:
    """The innermost loops of a SASS dump (a backward branch and the instructions from its target to it, with no
    other backward branch inside): per loop its instruction count and the count of each class in LOOP_CLASSES, in
    address order. What one iteration of a sweep issues per warp: benchmarks/NOTES.md divides it by the columns a
    warp covers per iteration."""
    ins = []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    backs = []
    for i, (addr, op, rest) in enumerate(ins):
        t = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if t and int(t.group(1), 16) <= addr:
            backs.append((int(t.group(1), 16), addr))
    out = []
    for lo, hi in backs:
        if any(lo <= a < b < hi or lo < a < b <= hi for a, b in backs if (a, b) != (lo, hi)):
            continue  # contains an inner loop
        body = [op for addr, op, _ in ins if lo <= addr <= hi]
        row = {"instructions": len(body)}
        row.update({c: sum(op.startswith(c) for op in body) for c in LOOP_CLASSES})
        out.append(row)
    return out


def loop_spills(row: dict) -> int:
    """Spill stores and loads (STL / LDL) inside the innermost loops of a compiled row (``sass=True``)."""
    return sum(loop["STL"] + loop["LDL"] for loop in row.get("loops", []))
