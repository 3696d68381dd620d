"""Run each benchmark cell (one provider at one shape) in its own child process, under a time budget.

Why a child per cell: a CUDA error such as an illegal memory access poisons the CUDA context for the rest of the
process (every later call fails), and a crash (abort, segfault) or a hang would otherwise take the whole run with
it. Here such a cell becomes a ``failed`` row with its error, and the next cell starts in a fresh process.

Why a budget: the GPU runs this project gets are short. ``Budget`` is the time left to a script (``--budget-s``,
and ``--deadline``, an absolute end shared by the stages of ``make bench-gpu``); a cell that cannot start in time (less
time left than its provider's last row took, or than ``MIN_START_S``) is recorded as ``skipped`` (reason ``budget``)
and a child still running when the budget ends is killed (``failed``, "timeout"). The scripts save their JSON after
every row, so a run killed from outside still leaves its results.

A child is ``python -m benchmarks.isolate MODULE FUNC ARGS_JSON RESULT_PATH``: it calls ``MODULE.FUNC(**ARGS)`` and
writes ``{"result": ...}`` or ``{"error": ...}`` to RESULT_PATH.

Why one child for a provider's consecutive cells (``run_cells(group=True)``, the scripts' default): a fresh process
costs ~3-5 s before it measures (Python, torch, the CUDA context), which at make bench-gpu's 40 kd rows was most of
the stage's slot. The child (``ARGS_JSON`` ``{"cells": [...], "deadline": ...}``) runs the cells in order and appends a
line per event to RESULT_PATH (``start``, ``done`` with ``result`` or ``error``, ``skip``); the parent reads them as
they come, so each row is saved as soon as it is measured. Isolation is kept where it matters: a cell that raises
ends its child (a CUDA error poisons the context), a crash or a hang (killed after ``--child-timeout-s`` of that one
cell) ends it too, and the cells after it start in a fresh child; a cell never runs in a process where another
failed. Between cells the child collects garbage and empties PyTorch's CUDA cache.

For tests, ``FASTDISTILL_BENCH_FAULT`` (e.g. ``"eager:abort,compile:hang"``) makes the child of a given provider
abort, hang, raise or exit before it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

FAULT_ENV = "FASTDISTILL_BENCH_FAULT"
# Do not start a child with less time than this left: importing torch alone takes ~2 s.
MIN_START_S = 3.0
# What a failed row keeps of its child's output (the whole output goes to the log).
TAIL_CHARS = 2000
# How often the parent looks at its child (and at a SIGTERM / SIGINT it received).
POLL_S = 0.05
_ROOT = Path(__file__).resolve().parents[1]
# Inductor's pool of compile workers costs seconds to start in every fresh process and buys nothing for the few
# small kernels of one loss; the setting does not change the code that is timed.
CHILD_ENV_DEFAULTS = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}


class Budget:
    """The time a script has left: the earlier of ``seconds`` from now and ``deadline`` (Unix time); both optional."""

    def __init__(self, seconds: float | None = None, deadline: float | None = None) -> None:
        ends = [t for t in (None if seconds is None else time.time() + seconds, deadline) if t is not None]
        self.end = min(ends) if ends else math.inf

    def left(self) -> float:
        return self.end - time.time()


@dataclass
class Cell:
    """One row to measure: ``key`` names it (provider and shape, copied into the row); the child is called with
    ``FUNC(**key, **args)``. A cell with ``skip`` set is recorded as skipped with that reason and not run."""

    key: dict
    args: dict = field(default_factory=dict)
    skip: str | None = None


class Interrupted(Exception):
    """SIGTERM / SIGINT reached the parent: the current child is killed, the rest recorded as skipped."""


def _kill_group(pid: int) -> None:
    # The child leads its own process group: this also ends its children (e.g. Inductor's compile workers).
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _error_text(e: BaseException, limit: int = 2000) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-n:])


_stop_signal: int | None = None


def _note_signal(signum: int, frame: object) -> None:
    # Only note it: raising here could interrupt Popen between fork and return (the child would then be lost) or
    # a JSON save half-way; run_child and run_cells act on it where that is safe.
    global _stop_signal
    _stop_signal = signum


def _check_stop() -> None:
    if _stop_signal is not None:
        raise Interrupted(signal.Signals(_stop_signal).name)


@contextlib.contextmanager
def _noting_signals() -> Iterator[None]:
    """SIGTERM / SIGINT only noted (``_check_stop`` raises ``Interrupted``) inside; nested uses share the outer."""
    global _stop_signal
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _note_signal:
        yield
        return
    _stop_signal = None
    old = {s: signal.signal(s, _note_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_child(module: str, func: str, args: dict, timeout_s: float | None = None, budget_limited: bool = False,
              echo: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Call ``module.func(**args)`` in a fresh Python process, killed after ``timeout_s``. Returns ``{"status": "ok",
    **result}`` or ``{"status": "failed", "error": ..., "output_tail": ...}``, each with ``wall_s`` (the child's
    whole life: start-up, compilation, measurement). ``echo`` receives the child's output (stdout and stderr)."""
    env = {**CHILD_ENV_DEFAULTS, **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fastdistill-bench-") as tmp:
        result_path, log_path = Path(tmp) / "result.json", Path(tmp) / "output.txt"
        cmd = [sys.executable, "-m", "benchmarks.isolate", module, func, json.dumps(args), str(result_path)]
        end = None if timeout_s is None or math.isinf(timeout_s) else t0 + timeout_s
        timed_out = False
        with _noting_signals(), open(log_path, "w") as log:
            # Output to a file, not a pipe: a grandchild that outlives the child would hold a pipe open.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # fmt: skip
            try:
                # Poll rather than wait: a SIGTERM / SIGINT is acted on here, where the child is known.
                while proc.poll() is None:
                    _check_stop()
                    if end is not None and time.time() > end:
                        timed_out = True
                        break
                    time.sleep(POLL_S)
            except Interrupted:  # end the child, keep what it printed, pass the signal on
                _kill_group(proc.pid)
                proc.wait()
                if echo is not None:
                    echo(log_path.read_text(errors="replace"))
                raise
            finally:
                _kill_group(proc.pid)
                proc.wait()
        wall = time.time() - t0
        output = log_path.read_text(errors="replace")
        payload = None
        if result_path.exists():
            try:
                payload = json.loads(result_path.read_text())
            except ValueError:
                payload = None
    if echo is not None and output.strip():
        echo(output)
    row: dict = {"wall_s": round(wall, 2)}
    if timed_out:
        why = " (the budget ran out)" if budget_limited else ""
        row |= {"status": "failed", "error": f"timeout: killed after {timeout_s:.0f} s{why}"}
    elif payload is not None and "result" in payload and proc.returncode == 0:
        return {"status": "ok", **payload["result"], **row}
    elif payload is not None and "error" in payload:
        row |= {"status": "failed", "error": payload["error"]}
    else:
        row |= {"status": "failed", "error": _death(proc.returncode, output)}
    row["output_tail"] = output[-TAIL_CHARS:]
    return row


def _death(returncode: int, output: str) -> str:
    """The error of a child that ended without a result: the signal that killed it, or its exit status."""
    if returncode < 0:
        return f"child died of {signal.Signals(-returncode).name}; last output: {_last_lines(output)}"
    return f"child exited with status {returncode} and no result; last output: {_last_lines(output)}"


def _run_here(module: str, func: str, args: dict) -> dict:
    """The ``--in-process`` path (debugging, profilers): no isolation, exceptions still become failed rows."""
    t0 = time.time()
    try:
        result = getattr(importlib.import_module(module), func)(**args)
        return {"status": "ok", **result, "wall_s": round(time.time() - t0, 2)}
    except Exception as e:
        traceback.print_exc()
        return {"status": "failed", "error": _error_text(e), "wall_s": round(time.time() - t0, 2)}


def _line_events(path: Path, seen: int) -> tuple[list[dict], int]:
    """The complete JSON lines of ``path`` past the first ``seen`` (a line still being written is left for later)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [], seen
    lines = text.split("\n")[:-1]  # the last piece has no newline yet (or is empty)
    events = []
    for ln in lines[seen:]:
        try:
            events.append(json.loads(ln))
        except ValueError:
            events.append({})
    return events, len(lines)


def _echo(text: str) -> None:
    print(text.rstrip(), file=sys.stderr, flush=True)


def run_batch(module: str, func: str, cells: list[Cell], budget: Budget, child_timeout_s: float | None,
              echo: Callable[[str], None] | None = None) -> Iterator[dict]:  # fmt: skip
    """Run ``cells`` (none with ``skip``) in one child, in order; yield a row for each cell it got to, as soon as it is
    known: ``ok``, ``failed`` (the child then ended: the cells after it get no row here, the caller starts them
    afresh) or ``skipped`` (``budget``: the child saw too little time left for the next cell; no rows after it).
    A cell is killed after ``child_timeout_s`` of its own (the first cell's time includes the child's start-up) and
    at the budget's end. Raises ``Interrupted`` (the child killed) on SIGTERM / SIGINT."""
    env = {**CHILD_ENV_DEFAULTS, **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)
    deadline = None if math.isinf(budget.end) else budget.end
    spec = {"cells": [{**c.key, **c.args} for c in cells], "deadline": deadline}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fastdistill-bench-") as tmp:
        result_path, log_path = Path(tmp) / "events.jsonl", Path(tmp) / "output.txt"
        cmd = [sys.executable, "-m", "benchmarks.isolate", module, func, json.dumps(spec), str(result_path)]
        done = 0  # cells with a row
        seen = 0  # event lines read
        cell_start = t0
        stopped = None  # why the child was killed: "timeout" / "budget"
        held = None  # a failed cell's row (the child then exits by itself)
        started = -1  # the last cell the child said it started
        with _noting_signals(), open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # fmt: skip
            pending: list[dict] = []
            try:
                while True:
                    alive = proc.poll() is None
                    events, seen = _line_events(result_path, seen)
                    for ev in events:
                        if "start" in ev:
                            started = ev["start"]
                        elif "done" in ev and ev["done"] == done:
                            wall = round(ev.get("t", time.time()) - cell_start, 2)
                            # the next cell's clock runs from here: the child's clean-up between cells counts
                            # toward it (a hang there is killed too), as the start-up counts toward the first's
                            cell_start = ev.get("t", time.time())
                            if "result" in ev:
                                pending.append({**cells[done].key, "status": "ok", **ev["result"], "wall_s": wall})
                            else:  # the child ends after it (see the module docstring): its row, with the output's
                                # tail, once it has
                                held = {**cells[done].key, "status": "failed",
                                        "error": ev.get("error", "no error text"), "wall_s": wall}  # fmt: skip
                            done += 1
                        elif "skip" in ev and ev["skip"] == done:
                            pending += [{**c.key, "status": "skipped", "reason": "budget"} for c in cells[done:]]
                            done = len(cells)
                    while pending:
                        yield pending.pop(0)
                    if not alive or (done == len(cells) and held is None):
                        break
                    _check_stop()
                    now = time.time()
                    if child_timeout_s is not None and now - cell_start > child_timeout_s:
                        stopped = "timeout"
                        break
                    if now > budget.end:
                        stopped = "budget"
                        break
                    time.sleep(POLL_S)
            except Interrupted:
                _kill_group(proc.pid)
                proc.wait()
                text = log_path.read_text(errors="replace")
                if echo is not None:
                    echo(text)
                if held is not None:  # a failed cell's own error, not the signal's, is its row
                    yield {**held, "output_tail": text[-TAIL_CHARS:]}
                raise
            finally:
                _kill_group(proc.pid)
                proc.wait()
        output = log_path.read_text(errors="replace")
    if echo is not None and output.strip():
        echo(output)
    if held is not None:  # the child ended after a failed cell: the cells after it start afresh
        yield {**held, "output_tail": output[-TAIL_CHARS:]}
        return
    if done == len(cells) or (done > 0 and started < done):
        # every cell has its row; or the child died (or was killed) between cells, in its clean-up: the next cell
        # never started, so it is not blamed; the caller starts it in a fresh child (or skips it for the budget)
        return
    # the cell that was running (or starting: the child's start-up) when the child died or was killed
    ran = time.time() - cell_start
    row: dict = {"wall_s": round(ran, 2)}
    if stopped == "timeout":
        row |= {"status": "failed", "error": f"timeout: killed after {child_timeout_s:.0f} s"}
    elif stopped == "budget":
        row |= {"status": "failed", "error": f"timeout: killed after {ran:.0f} s (the budget ran out)"}
    else:
        row |= {"status": "failed", "error": _death(proc.returncode, output)}
    row["output_tail"] = output[-TAIL_CHARS:]
    yield {**cells[done].key, **row}


def run_cells(cells: list[Cell], module: str, func: str, budget: Budget, on_row: Callable[[dict, list[dict]], None],
              child_timeout_s: float | None = None, isolate: bool = True,
              group: bool = False) -> list[dict]:  # fmt: skip
    """Measure ``cells`` in order, each in its own child (see the module docstring); ``on_row(row, rows)`` is called
    after every row (the scripts print it and save their JSON there). Every cell gets a row: ``status`` ``ok`` (with
    the child's result), ``failed`` (``error``) or ``skipped`` (``reason``). SIGTERM / SIGINT kill the running child,
    record it as failed and the cells after it as skipped ("interrupted"), then raise ``Interrupted``. ``group``: a
    provider's consecutive cells share a child (``run_batch``; see the module docstring)."""
    rows: list[dict] = []
    running = False
    # A cell starts only with the time left that its provider's last row took (MIN_START_S for a provider's first):
    # one started with less would be killed by the budget, a false failure, holding time a cheaper provider after it
    # (or the next stage of make bench-gpu) could use.
    took: dict[object, float] = {}
    # In-process cells get no handler: the default action (exit, KeyboardInterrupt) is what stops them.
    with _noting_signals() if isolate else contextlib.nullcontext():
        try:
            i = 0
            while i < len(cells):
                cell = cells[i]
                _check_stop()
                left = budget.left()
                if cell.skip is not None:
                    row = {**cell.key, "status": "skipped", "reason": cell.skip}
                elif left < max(MIN_START_S, took.get(cell.key.get("provider"), 0.0)):
                    row = {**cell.key, "status": "skipped", "reason": "budget"}
                elif isolate and group:
                    provider = cell.key.get("provider")
                    end = i
                    while end < len(cells) and cells[end].skip is None and cells[end].key.get("provider") == provider:
                        end += 1
                    running, first = True, None
                    for row in run_batch(module, func, cells[i:end], budget, child_timeout_s, echo=_echo):
                        running = False
                        rows.append(row)
                        on_row(row, rows)
                        if isinstance(row.get("wall_s"), int | float):
                            # what a fresh child for this provider's next cell would need: the batch's first row
                            # (start-up and a cell) and, past it, the latest row's cell again
                            first = row["wall_s"] if first is None else first
                            took[provider] = first + (row["wall_s"] if len(rows) > i + 1 else 0.0)
                        running = len(rows) < end and row.get("status") == "ok"  # the child goes on with the next
                    running = False
                    i = len(rows)
                    continue
                else:
                    running = True
                    if isolate:
                        timeout = left if child_timeout_s is None else min(left, child_timeout_s)
                        res = run_child(module, func, {**cell.key, **cell.args}, timeout_s=timeout,
                                        budget_limited=timeout < (child_timeout_s or math.inf),
                                        echo=_echo)  # fmt: skip
                    else:
                        res = _run_here(module, func, {**cell.key, **cell.args})
                    running = False
                    row = {**cell.key, **res}
                    if isinstance(row.get("wall_s"), int | float):
                        took[cell.key.get("provider")] = row["wall_s"]
                rows.append(row)
                on_row(row, rows)
                i += 1
        except Interrupted as e:
            for j, cell in enumerate(cells[len(rows) :]):
                if j == 0 and running:
                    row = {**cell.key, "status": "failed", "error": f"interrupted ({e}) while running"}
                else:
                    row = {**cell.key, "status": "skipped", "reason": "interrupted"}
                rows.append(row)
                on_row(row, rows)
            raise
    return rows


def run_script(cells: list[Cell], module: str, budget: Budget, on_row: Callable[[dict, list[dict]], None],
               args: argparse.Namespace) -> list[dict] | None:
    """``run_cells`` for a benchmark script's ``cell`` function with the options of ``add_arguments``; None when
    the run was interrupted (the rows so far are saved by ``on_row``: the script then exits 130)."""
    try:
        return run_cells(cells, module, "cell", budget, on_row, args.child_timeout_s, not args.in_process,
                         group=not args.child_per_cell)  # fmt: skip
    except Interrupted as e:
        print(f"interrupted ({e}); the rows so far are saved", file=sys.stderr)
        return None


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (0 repeats or rows would fail every child, each with its own error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a float > 0 (a timeout of 0 would kill every child at once, and blame the budget)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def apply_quick(p: argparse.ArgumentParser, args: argparse.Namespace, **shapes: object) -> None:
    """``--quick``'s tiny shapes into ``args``; an option among ``shapes`` also given on the command line is an error
    (``p.error``), not silently overridden."""
    defaults = vars(p.parse_args(["--quick"]))  # the parsed defaults (types applied, as args has them)
    given = [name for name in shapes if getattr(args, name) != defaults[name]]
    if given:
        p.error(f"--quick sets {', '.join('--' + n.replace('_', '-') for n in shapes)}; give --quick or "
                f"{', '.join('--' + n.replace('_', '-') for n in given)}, not both")
    for name, value in shapes.items():
        setattr(args, name, value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The isolation and budget options every benchmark script takes."""
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=None,
        help="stop after this many seconds: cells not started by then are recorded as skipped (budget)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="Unix time by which to stop (make bench-gpu's end for the stage); with --budget-s, the earlier of the two",
    )
    p.add_argument(
        "--child-timeout-s",
        type=positive_float,
        default=None,
        help="kill a cell's child after this many seconds (recorded as failed: timeout)",
    )
    p.add_argument(
        "--child-per-cell",
        action="store_true",
        help="a fresh child for every cell (default: one per provider's run of cells, a fresh one after a failure)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every cell in this process (debugging, profilers): a crash then ends the run",
    )


def describe(row: dict) -> str:
    """A row's outcome in a few words for the tables: 'skipped: budget', 'FAILED: ...', '' when ok."""
    if row.get("status") == "skipped":
        return f"skipped: {row.get('reason', '')}"
    if row.get("status") == "failed":
        return f"FAILED: {row.get('error', '').splitlines()[0][:80]}" if row.get("error") else "FAILED"
    return ""


def counts(rows: list[dict]) -> dict[str, int]:
    return {s: sum(r.get("status") == s for r in rows) for s in ("ok", "failed", "skipped")}


def _inject_fault(provider: str | None) -> None:
    """Test hook (``FASTDISTILL_BENCH_FAULT="provider:kind,..."``): make this child fail the way a GPU run can."""
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, kind = item.partition(":")
        if not item or name != provider:
            continue
        print(f"injected fault: {kind} ({FAULT_ENV})", file=sys.stderr, flush=True)
        if kind == "abort":
            os.abort()  # like a crash in a native library
        if kind == "hang":
            time.sleep(3600)
        if kind == "exit":
            os._exit(3)
        raise RuntimeError(f"injected fault for provider {provider!r}")


# A grouped child starts its next cell only with at least this much time before the deadline (and at least what its
# last cell took): no import or CUDA start-up to pay, unlike a fresh child (MIN_START_S).
MIN_NEXT_S = 1.0


def _between_cells() -> None:
    """Free what the last cell left (its tensors, PyTorch's cached CUDA blocks) before the next one measures."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _child_cells(module: str, func: str, spec: dict, result_path: str) -> None:
    """A grouped child: the cells of ``spec`` in order, one JSON line per event appended to ``result_path``; ends at
    the first cell that raises (its context may be poisoned) and when the deadline leaves too little time."""
    cells, deadline = spec["cells"], spec.get("deadline")
    with open(result_path, "a") as events:

        def event(**e: object) -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            events.write(json.dumps({**e, "t": time.time()}) + "\n")
            events.flush()

        code, last, k, started = 0, 0.0, 0, False
        try:
            _inject_fault(cells[0].get("provider") if cells else None)  # before the imports, as _child_main
            fn = getattr(importlib.import_module(module), func)
            for k, args in enumerate(cells):
                if k > 0:
                    if deadline is not None and deadline - time.time() < max(MIN_NEXT_S, last):
                        event(skip=k, reason="budget")
                        break
                    started = False
                    _between_cells()
                event(start=k)
                started = True
                t = time.time()
                try:
                    result = fn(**args)
                except Exception as e:  # e.g. torch.AcceleratorError after an illegal memory access
                    traceback.print_exc()
                    event(done=k, error=_error_text(e))
                    code = 1
                    break
                last = time.time() - t
                event(done=k, result=result)
        except Exception as e:  # the import or an injected fault (the first cell's start-up), a result that is not
            # JSON: cell k's error; in the clean-up between cells (cell k not started): no row, k starts afresh
            traceback.print_exc()
            if k == 0 or started:
                event(done=k, error=_error_text(e))
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _child_main(argv: list[str]) -> None:
    module, func, args_json, result_path = argv
    args = json.loads(args_json)
    if "cells" in args:
        _child_cells(module, func, args, result_path)
    try:
        _inject_fault(args.get("provider"))  # before the imports: the tests need not wait for torch
        payload, code = {"result": getattr(importlib.import_module(module), func)(**args)}, 0
    except Exception as e:  # e.g. torch.AcceleratorError after an illegal memory access
        traceback.print_exc()
        payload, code = {"error": _error_text(e)}, 1
    Path(result_path).write_text(json.dumps(payload))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: after a CUDA error it can hang, and it costs time for nothing.
    os._exit(code)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
