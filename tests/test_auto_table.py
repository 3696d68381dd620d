"""backend="auto" on a GPU follows what a GPU run measured (issues 17, 20): benchmarks/auto_table.py turns a run's
rows into dispatch.AUTO_MEASURED, and dispatch.measured_choice picks the backend fastest at the nearest measured
shape of the same GPU, dtype and divergence (forward KL's where that divergence was not measured)."""

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest

from fastdistill.ops import dispatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/ package

from benchmarks import auto_table  # noqa: E402

GPU = "NVIDIA H200"


def _row(provider, v, k, ms, divergence=None, status=None):
    r = {"provider": provider, "V": v, "K": k, "N": 8192, "dtype": "bfloat16", "ms": ms}
    if divergence:
        r["divergence"] = divergence
    if status:
        r["status"] = status
    return r


ROWS = [
    _row("triton", 32768, 1, 0.9), _row("cuda", 32768, 1, 0.6), _row("compile", 32768, 1, 0.5),
    _row("triton", 128256, 4, 6.0), _row("cuda", 128256, 4, 7.0), _row("cuda-global", 128256, 4, 1.0),
    _row("triton", 128256, 1, 3.0), _row("cuda", 128256, 1, 1.0, status="failed"),
    _row("triton", 128256, 4, 9.0, "jsd"), _row("cuda", 128256, 4, 5.0, "jsd"),
]  # fmt: skip


def test_fastest_backend_per_cell():
    table, lines = auto_table.fastest(ROWS, GPU)
    assert table == {
        ("kd_loss", GPU, "bfloat16", "jsd"): [(128256, 4, "cuda")],
        ("kd_loss", GPU, "bfloat16", "kl"): [(32768, 1, "cuda"), (128256, 1, "triton"), (128256, 4, "triton")],
    }  # baselines and cuda-global are not backends; a failed row does not count
    assert lines[1] == "bfloat16 kl V=32768 K=1: cuda  (cuda 0.600 ms, triton 0.900 ms)" and len(lines) == 4


def test_measured_choice(monkeypatch):
    table, _ = auto_table.fastest(ROWS, GPU)
    monkeypatch.setattr(dispatch, "AUTO_MEASURED", table)
    choice = dispatch.measured_choice
    assert choice("kd_loss", GPU, "bfloat16", "kl", 32000, 1) == "cuda"  # nearest: V = 32768, K = 1
    assert choice("kd_loss", GPU, "bfloat16", "kl", 150000, 8) == "triton"  # nearest: V = 128256, K = 4
    assert choice("kd_loss", GPU, "bfloat16", "jsd", 32768, 1) == "cuda"  # jsd's own cell
    assert choice("kd_loss", GPU, "bfloat16", "tvd", 32768, 1) == "cuda"  # not measured: forward KL's
    assert choice("kd_loss", "NVIDIA A100", "bfloat16", "kl", 32768, 1) is None  # another GPU: PRIORITY
    assert choice("kd_loss", GPU, "float32", "kl", 32768, 1) is None


def test_written_table_is_the_module_source(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "kd-cuda.json").write_text(json.dumps({"device": GPU, "rows": ROWS[:8]}))
    (run / "divergences-cuda.json").write_text(json.dumps({"device": GPU, "rows": ROWS[8:]}))
    copy = tmp_path / "dispatch.py"
    shutil.copy(auto_table.DISPATCH, copy)
    rows, device = auto_table.load(run)
    table, _ = auto_table.fastest(rows, device)
    auto_table.write(table, copy)
    tree = ast.parse(copy.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.AnnAssign) and n.target.id == "AUTO_MEASURED"]
    assert ast.literal_eval(node.value) == table
    auto_table.write({}, copy)  # and back: the block stays one block
    assert copy.read_text() == auto_table.DISPATCH.read_text()
    assert auto_table.main([str(run)]) == 0 and "4 measured cells" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        auto_table.load(tmp_path)


def test_the_shipped_table_is_well_formed():
    for (op, gpu, dtype, div), entries in dispatch.AUTO_MEASURED.items():
        assert op == "kd_loss" and gpu and dtype in ("bfloat16", "float16", "float32") and entries
        assert all(v > 0 and k > 0 and b in auto_table.BACKENDS for v, k, b in entries)
