"""The measured table behind ``backend="auto"`` on a GPU (``fastdistill.ops.dispatch.AUTO_MEASURED``), from a GPU
run's benchmark rows: for each (GPU, dtype, divergence, V, K) the faster of the GPU backends ``triton`` and ``cuda``
(the ``cuda`` provider is the kernel's own choice of residency; ``cuda-v1``, ``cuda-v2``, ``cuda-global`` and the
baselines are not backends).

Usage: ``python -m benchmarks.auto_table RUN_DIR [--write]``: reads ``RUN_DIR/kd-cuda.json`` and
``RUN_DIR/divergences-cuda.json`` (what ``make bench-gpu`` writes), prints the table with each cell's times, and with
``--write`` replaces the block between ``# <auto-measured>`` and ``# </auto-measured>`` in dispatch.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BACKENDS = ("triton", "cuda")
DISPATCH = Path(__file__).resolve().parents[1] / "fastdistill" / "ops" / "dispatch.py"
_BLOCK = re.compile(r"(# <auto-measured>\n).*?(# </auto-measured>\n)", re.S)

Table = dict[tuple[str, str, str, str], list[tuple[int, int, str]]]


def fastest(rows: list[dict], device: str) -> tuple[Table, list[str]]:
    """The table from benchmark rows of one run on ``device`` (its GPU's name), and one line per cell saying what
    was compared. Rows that failed or were skipped do not count; a cell with one backend measured takes it."""
    cells: dict[tuple[str, str, int, int], dict[str, float]] = {}
    for r in rows:
        if r.get("status", "ok") != "ok" or r.get("provider") not in BACKENDS:
            continue
        key = (r["dtype"], r.get("divergence", "kl"), int(r["V"]), int(r["K"]))
        cells.setdefault(key, {})[r["provider"]] = float(r["ms"])
    table: Table = {}
    lines = []
    for (dtype, div, v, k), times in sorted(cells.items()):
        best = min(times, key=times.get)
        table.setdefault(("kd_loss", device, dtype, div), []).append((v, k, best))
        lines.append(f"{dtype} {div} V={v} K={k}: {best}  (" + ", ".join(f"{b} {ms:.3f} ms" for b, ms in
                                                                        sorted(times.items())) + ")")  # fmt: skip
    return table, lines


def render(table: Table) -> str:
    """The Python source of AUTO_MEASURED (the block's body)."""
    if not table:
        return "AUTO_MEASURED: dict[tuple[str, str, str, str], list[tuple[int, int, str]]] = {}\n"
    out = ["AUTO_MEASURED: dict[tuple[str, str, str, str], list[tuple[int, int, str]]] = {"]
    for key in sorted(table):
        out.append(f"    {key!r}: {sorted(table[key])!r},")
    return "\n".join(out) + "\n}  # fmt: skip\n"


def write(table: Table, path: Path = DISPATCH) -> None:
    text = path.read_text()
    if not _BLOCK.search(text):
        raise ValueError(f"{path}: no '# <auto-measured>' ... '# </auto-measured>' block")
    path.write_text(_BLOCK.sub(lambda m: m.group(1) + render(table) + m.group(2), text, count=1))


def load(run_dir: Path) -> tuple[list[dict], str]:
    """The rows of the run's kd and divergences stages, and the GPU's name (as torch.cuda.get_device_name says)."""
    rows, device = [], None
    for name in ("kd-cuda.json", "divergences-cuda.json"):
        path = run_dir / name
        if path.exists():
            data = json.loads(path.read_text())
            rows += data["rows"]
            device = device or data["device"]
    if device is None:
        raise FileNotFoundError(f"{run_dir}: neither kd-cuda.json nor divergences-cuda.json")
    return rows, device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.auto_table", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--write", action="store_true", help=f"write the table into {DISPATCH}")
    args = p.parse_args(argv)
    rows, device = load(args.run_dir)
    table, lines = fastest(rows, device)
    print(f"{device}: {len(lines)} measured cells")
    print("\n".join(lines))
    if args.write:
        write(table)
        print(f"written: {DISPATCH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
