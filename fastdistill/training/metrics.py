"""The training logs: :class:`MetricsLogger` keeps every record in memory and, on rank 0, appends it to
``metrics.jsonl``, ``metrics.csv`` and (optionally) TensorBoard under the run's ``output_dir``.

(Named ``metrics``, not ``logging``, so that it never reads as the standard library's module.)
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Any

CSV_HEADER = ["step", "epoch", "split", "name", "value"]


def _plain(split: str, name: str, value: Any) -> Any:
    """A metric's value as JSON, CSV and TensorBoard take it: a one-element tensor or numpy scalar as its Python
    number (``(pred == y).float().mean()`` is a tensor); a TypeError naming the metric for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):  # more than one element
            pass
    shape = getattr(value, "shape", None)
    of_shape = f" of shape {list(shape)}" if shape is not None else ""
    raise TypeError(f"metric {split}/{name}: expected a number (or a one-element tensor), got {type(value).__name__}"
                    f"{of_shape}")  # fmt: skip


class MetricsLogger:
    """Metrics at a step: in :attr:`history`, and on rank 0 in ``output_dir/metrics.jsonl`` (one record a line),
    ``output_dir/metrics.csv`` (long format: step, epoch, split, name, value) and TensorBoard events
    (``output_dir/tensorboard``, tag ``<split>/<name>``).

    Args:
        output_dir: where the files go (None: :attr:`history` only).
        rank: this process's rank; only rank 0 writes files.
        tensorboard: also write TensorBoard events (needs the ``tensorboard`` package; skipped with a warning).
        warn_stacklevel: the ``stacklevel`` of that warning, so that it points at the user's code.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None,
        *,
        rank: int = 0,
        tensorboard: bool = False,
        warn_stacklevel: int = 2,
    ) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.rank = rank
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if tensorboard and self._writes:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard=True but tensorboard is not installed; skipping its logs",
                              stacklevel=warn_stacklevel)  # fmt: skip

    @property
    def _writes(self) -> bool:
        """Whether this process writes the files (rank 0 of a run with an output_dir)."""
        return self.rank == 0 and self.output_dir is not None

    def log(self, split: str, metrics: dict[str, float], *, step: int, epoch: int) -> dict[str, Any]:
        """Record ``metrics`` of ``split`` ("train", "eval", ...) at ``step``; returns the record
        (``{"step", "epoch", "split", **metrics}``)."""
        metrics = {k: _plain(split, k, v) for k, v in metrics.items()}
        record = {"step": step, "epoch": epoch, "split": split, **metrics}
        self.history.append(record)
        if not self._writes:
            return record
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        csv_path = self.output_dir / "metrics.csv"
        new = not csv_path.exists()
        with open(csv_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_HEADER)
            for k, v in metrics.items():
                w.writerow([step, epoch, split, k, v])
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)
        return record

    def truncate(self, step: int) -> None:
        """Keep only the rows of ``metrics.jsonl`` / ``metrics.csv`` up to ``step`` (and the CSV header), so that a
        resumed run's logs are those of a run that never stopped; a line cut short by a crash goes too. Each file
        is rewritten atomically (a temporary file, then a rename). TensorBoard events are not rewritten."""
        if not self._writes:
            return

        def keep_jsonl(line: str) -> bool:
            try:
                return json.loads(line)["step"] <= step
            except (ValueError, TypeError, KeyError):
                return False

        def keep_csv(line: str) -> bool:
            row = next(csv.reader([line]), [])
            return len(row) == len(CSV_HEADER) and row[0].isdigit() and int(row[0]) <= step

        for name, keep, header in (("metrics.jsonl", keep_jsonl, 0), ("metrics.csv", keep_csv, 1)):
            path = self.output_dir / name
            if not path.exists():
                continue
            lines = path.read_text().splitlines(keepends=True)
            kept = lines[:header] + [ln for ln in lines[header:] if ln.endswith("\n") and keep(ln)]
            if kept != lines:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)

    def close(self) -> None:
        """Close the TensorBoard writer (the other files are closed after every record)."""
        if self._tb is not None:
            self._tb.close()
