"""The benchmarks' isolation and budget machinery (benchmarks/isolate.py) on the CPU, at tiny shapes: a crashing
child and a raising one become failed rows while the other providers still run; a budget that runs out kills the
running (hanging) child and records the rest as skipped; SIGTERM to a script leaves its JSON and no child behind.
A child that measures is a fresh Python importing torch (~2 s); the whole file takes ~15 s on an idle 2-core VM.
tests/test_bench_isolation.py runs these same tests under ``make test``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from benchmarks import run, run_codistill, run_mi
from benchmarks.isolate import FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]
KD_TINY = ["--device", "cpu", "--rows", "16", "--vocab", "64", "--teachers", "1", "--repeats", "1"]


def _no_bandwidth_run(monkeypatch) -> None:
    # the parent's 1 GiB copy measurement takes ~2 s on the CPU and is not what these tests check
    monkeypatch.setattr(run, "copy_bandwidth_GBps", lambda device: 10.0)
    monkeypatch.setattr(run_codistill, "copy_bandwidth_GBps", lambda device: 10.0)


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert {"device", "date", "torch", "triton", "liger_kernel", "rows", "counts", "complete"} <= data.keys()
    return data


def _by_provider(rows: list[dict]) -> dict[str, dict]:
    return {r["provider"]: r for r in rows}


def test_crash_becomes_a_failed_row_and_the_rest_still_runs(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "reference:abort")
    _no_bandwidth_run(monkeypatch)
    out = tmp_path / "kd.json"
    rc = run.main([*KD_TINY, "--providers", "reference,triton,auto", "--out", str(out)])
    data = _load(out)
    rows = _by_provider(data["rows"])
    assert rc == 1 and data["complete"] and data["counts"] == {"ok": 1, "failed": 1, "skipped": 1}
    assert rows["reference"]["status"] == "failed" and "SIGABRT" in rows["reference"]["error"]
    assert rows["triton"]["status"] == "skipped" and "CUDA only" in rows["triton"]["reason"]
    # after the crash the next provider runs in a fresh process and measures
    assert rows["auto"]["status"] == "ok" and rows["auto"]["ms"] > 0 and rows["auto"]["floor_ms"] > 0


def test_budget_kills_the_running_child_and_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "eager:hang")
    out = tmp_path / "mi.json"
    t0 = time.time()
    rc = run_mi.main(["--device", "cpu", "--shapes", "32x8,64x8", "--providers", "eager,auto", "--repeats", "1",
                      "--budget-s", "5", "--out", str(out)])  # fmt: skip
    assert time.time() - t0 < 15
    data = _load(out)
    statuses = [(r["provider"], r["N"], r["status"], r.get("reason")) for r in data["rows"]]
    assert statuses == [("eager", 32, "failed", None), ("eager", 64, "skipped", "budget"),
                        ("auto", 32, "skipped", "budget"), ("auto", 64, "skipped", "budget")]  # fmt: skip
    assert "the budget ran out" in data["rows"][0]["error"]
    assert rc == 1 and data["complete"] and data["budget_s"] == 5


def test_raising_child_is_a_failed_row_with_its_error(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "eager:raise")
    _no_bandwidth_run(monkeypatch)
    out = tmp_path / "codistill.json"
    rc = run_codistill.main(["--device", "cpu", "--rows", "16", "--vocab", "64", "--temperatures", "2",
                             "--providers", "eager,fused-triton", "--repeats", "1", "--out", str(out)])  # fmt: skip
    data = _load(out)
    rows = _by_provider(data["rows"])
    assert rows["eager"]["status"] == "failed"
    assert rows["eager"]["error"] == "RuntimeError: injected fault for provider 'eager'"
    assert "Traceback" in rows["eager"]["output_tail"]
    assert rows["fused-triton"]["status"] == "skipped"
    # the agreement check ran in its own child, untouched by the fault
    assert data["fused_vs_two_calls_check"]["status"] == "ok" and data["fused_vs_two_calls_max_abs_diff"] < 1e-4
    assert rc == 1


def _processes_with(marker: str) -> list[int]:
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in env.read_bytes():
                pids.append(int(env.parent.name))
        except OSError:
            pass
    return pids


def test_sigterm_leaves_the_json_and_no_child_behind(tmp_path):
    marker = f"marker-{uuid.uuid4().hex}"
    out = tmp_path / "kd.json"
    env = {**os.environ, FAULT_ENV: f"eager:hang,{marker}:none", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.run", *KD_TINY, "--providers", "triton,eager,auto", "--out", str(out)]
    parent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while not out.exists() and time.time() < deadline:  # saved after the first row (triton: skipped on a CPU)
        time.sleep(0.1)
    while len(_processes_with(marker)) < 2 and time.time() < deadline:  # the parent and eager's hanging child
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    output, _ = parent.communicate(timeout=20)
    assert parent.returncode == 130, output
    data = _load(out)
    statuses = [(r["provider"], r["status"]) for r in data["rows"]]
    assert statuses == [("triton", "skipped"), ("eager", "failed"), ("auto", "skipped")], output
    assert "interrupted (SIGTERM)" in data["rows"][1]["error"] and data["rows"][2]["reason"] == "interrupted"
    assert not data["complete"]
    time.sleep(0.2)
    assert _processes_with(marker) == [], "a child outlived its parent"


@pytest.mark.parametrize("script", ["run", "run_mi", "run_codistill", "run_fused_linear"])
def test_arguments_that_would_fail_every_row_are_refused(script, capsys):
    """--quick with an explicit shape option it would override, a 0 timeout (every child killed, the budget
    blamed) and 0 repeats (every child failing): argparse errors naming the option, before any child runs."""
    import importlib

    parse = importlib.import_module(f"benchmarks.{script}").parse_args
    assert parse(["--quick"]).quick
    for argv, said in ((["--quick", "--repeats", "9"], "give --quick or --repeats, not both"),
                       (["--child-timeout-s", "0"], "--child-timeout-s: must be > 0"),
                       (["--repeats", "0"], "--repeats: must be >= 1")):  # fmt: skip
        with pytest.raises(SystemExit):
            parse(argv)
        assert said in capsys.readouterr().err


def test_a_cell_starts_only_with_the_time_its_provider_took(monkeypatch):
    """With 8 s left, a provider whose last row took 10 s is not started again (it would be killed by the budget and
    recorded as a false failure, holding the time); another provider, or one without a row yet, still starts."""
    from benchmarks import isolate

    walls = {"slow": 10.0, "fast": 1.0}
    monkeypatch.setattr(isolate, "_run_here",
                        lambda module, func, args: {"status": "ok", "wall_s": walls[args["provider"]]})
    budget = isolate.Budget()
    monkeypatch.setattr(budget, "left", lambda: 8.0)
    cells = [isolate.Cell({"provider": p, "V": v}) for p, v in (("slow", 1), ("slow", 2), ("fast", 1), ("fast", 2))]
    rows = isolate.run_cells(cells, "m", "f", budget, lambda row, rows: None, isolate=False)
    assert [(r["provider"], r["V"], r["status"]) for r in rows] == [
        ("slow", 1, "ok"), ("slow", 2, "skipped"), ("fast", 1, "ok"), ("fast", 2, "ok")]
    assert rows[1]["reason"] == "budget"


_CELLS_MODULE = '''
import os, time

time.sleep(float(os.environ.get("CELLS_IMPORT_S", "0")))  # a slow start-up (torch, CUDA)


class _Bomb:  # garbage in a reference cycle whose collection (between cells) kills the process
    def __init__(self):
        self.me = self

    def __del__(self):
        os.abort()


def _raise_in_cleanup():  # an error between cells (as a sticky CUDA error surfacing in empty_cache)
    import gc
    import sys

    def boom():
        raise RuntimeError("between cells")

    class Torch:
        class cuda:
            is_initialized = staticmethod(lambda: True)
            empty_cache = staticmethod(boom)

    sys.modules["torch"] = Torch


def f(provider, V, do="ok", sleep_s=0.0):
    """A cell: its process id, after ``sleep_s``; or it raises, aborts, hangs or leaves a bomb for the clean-up."""
    time.sleep(sleep_s)
    if do == "raise":
        raise ValueError(f"cell {provider} {V} raised")
    if do == "abort":
        os.abort()
    if do == "hang":
        time.sleep(3600)
    if do == "bomb":
        _Bomb()
    if do == "cleanup_raises":
        _raise_in_cleanup()
    if do == "nojson":
        return {"pid": object()}
    return {"pid": os.getpid()}
'''


def _cells_module(tmp_path, monkeypatch) -> str:
    name = f"cells_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_CELLS_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return name


def test_a_provider_s_cells_share_a_child_and_a_failure_starts_a_fresh_one(tmp_path, monkeypatch):
    """group=True (the scripts' default): a provider's consecutive cells run in one child (one start-up, not one per
    shape); a cell that raises, aborts or hangs is a failed row (its error, output, or the cell's own timeout) and
    the next cell runs in a fresh child, never in the process where one failed; the next provider gets its own."""
    from benchmarks import isolate

    module = _cells_module(tmp_path, monkeypatch)
    plan = [("a", 1, "ok"), ("a", 2, "ok"), ("a", 3, "raise"), ("a", 4, "ok"), ("a", 5, "abort"), ("a", 6, "ok"),
            ("a", 7, "hang"), ("a", 8, "ok"), ("b", 1, "ok"), ("b", 2, "ok")]  # fmt: skip
    cells = [isolate.Cell({"provider": p, "V": v}, {"do": do}) for p, v, do in plan]
    saved = []
    rows = isolate.run_cells(cells, module, "f", isolate.Budget(120), lambda row, rows: saved.append(len(rows)),
                             child_timeout_s=4, group=True)  # fmt: skip
    assert saved == list(range(1, len(plan) + 1))  # every row handed out (saved) as it comes
    got = [(r["provider"], r["V"], r["status"]) for r in rows]
    assert got == [(p, v, "ok" if do == "ok" else "failed") for p, v, do in plan], got
    pid = [r.get("pid") for r in rows]
    assert pid[0] == pid[1] != pid[3] != pid[5] != pid[7] != pid[8] == pid[9]
    assert "ValueError: cell a 3 raised" in rows[2]["error"] and "Traceback" in rows[2]["output_tail"]
    assert "SIGABRT" in rows[4]["error"]
    assert rows[6]["error"] == "timeout: killed after 4 s" and 4 <= rows[6]["wall_s"] < 8
    assert all(r["wall_s"] >= 0 for r in rows)
    # --child-per-cell: a fresh child for every cell
    rows = isolate.run_cells(cells[:2], module, "f", isolate.Budget(60), lambda row, rows: None, group=False)
    assert rows[0]["pid"] != rows[1]["pid"]


def test_a_grouped_child_starts_a_cell_only_with_the_time_its_last_took(tmp_path, monkeypatch):
    """Within a shared child the budget rule holds as between children: with the deadline 5 s away and 2 s cells,
    the second starts (~2.8 s left), the third does not (~0.7 s left: it would be killed, a false failure); the
    rest are skipped (budget), not failed."""
    from benchmarks import isolate

    module = _cells_module(tmp_path, monkeypatch)
    cells = [isolate.Cell({"provider": "a", "V": v}, {"sleep_s": 2.0}) for v in range(4)]
    rows = isolate.run_cells(cells, module, "f", isolate.Budget(5), lambda row, rows: None, group=True)
    assert [(r["status"], r.get("reason")) for r in rows] == [("ok", None), ("ok", None), ("skipped", "budget"),
                                                              ("skipped", "budget")]  # fmt: skip
    assert rows[0]["pid"] == rows[1]["pid"]


def test_a_grouped_child_s_clocks_and_deaths_between_cells(tmp_path, monkeypatch):
    """A child that dies (or raises) in its clean-up between cells does not blame the next cell (it never started): that
    cell runs in a fresh child. The first cell's timeout counts the child's start-up (as a child per cell does): a 1.5 s
    import and a 1 s cell under a 2 s timeout is a timeout. A result that is not JSON is that cell's error."""
    from benchmarks import isolate

    module = _cells_module(tmp_path, monkeypatch)
    plan = [("a", 1, "bomb"), ("a", 2, "ok"), ("a", 3, "nojson"), ("a", 4, "cleanup_raises"), ("a", 5, "ok")]
    cells = [isolate.Cell({"provider": p, "V": v}, {"do": do}) for p, v, do in plan]
    rows = isolate.run_cells(cells, module, "f", isolate.Budget(60), lambda row, rows: None, group=True)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "ok"], rows
    assert rows[0]["pid"] != rows[1]["pid"] and "TypeError" in rows[2]["error"] and "JSON" in rows[2]["error"]
    assert rows[3]["pid"] != rows[4]["pid"]  # an error in the clean-up: the next cell in a fresh child, not blamed
    monkeypatch.setenv("CELLS_IMPORT_S", "1.5")
    cells = [isolate.Cell({"provider": "a", "V": 1}, {"sleep_s": 1.0})]
    for group in (True, False):
        rows = isolate.run_cells(cells, module, "f", isolate.Budget(60), lambda row, rows: None, child_timeout_s=2,
                                 group=group)  # fmt: skip
        assert rows[0]["status"] == "failed" and rows[0]["error"] == "timeout: killed after 2 s", (group, rows)
