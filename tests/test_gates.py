"""benchmarks/gates.py: the open issues' GPU gates read off a run's JSON files (synthetic rows here)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/ package

from benchmarks import gates  # noqa: E402


def _write(run: Path, stage: str, rows: list[dict]) -> None:
    (run / f"{stage}-cuda.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))


def test_gates_read_a_run(tmp_path, capsys):
    n, v = 8192, 32768
    grad = n * v * 2
    _write(tmp_path, "kd", [
        {"provider": "triton", "V": v, "K": 1, "N": n, "ms": 0.8, "floor_fraction": 0.5, "peak_bytes": grad},
        {"provider": "compile", "V": v, "K": 1, "N": n, "ms": 1.4},
        {"provider": "cuda", "V": v, "K": 1, "N": n, "ms": 0.6, "floor_fraction": 0.7, "peak_bytes": 2 * grad},
        {"provider": "triton", "V": v, "K": 4, "N": n, "status": "failed", "error": "boom"},
    ])  # fmt: skip
    _write(tmp_path, "fused", [
        {"provider": "fused-triton", "K": 1, "ms": 130.0, "peak_bytes": 3.3e9},
        {"provider": "unfused-triton", "K": 1, "ms": 120.0, "peak_bytes": 12.6e9},
        {"provider": "liger", "K": 1, "ms": 170.0, "peak_bytes": 11e9},
    ])  # fmt: skip
    results = {g.what: (value, verdict) for g, value, verdict in gates.check(gates.load(tmp_path))}
    assert results["kd triton V=32768 K=1: floor fraction"] == (0.5, "PASS")
    assert results["kd triton V=32768 K=1: time / torch.compile"][1] == "PASS"
    assert results["kd triton V=32768 K=1: peak / gradient"] == (1.0, "PASS")
    assert results["kd cuda V=32768 K=1: floor fraction"] == (0.7, "FAIL")  # 0.80 at V = 32768
    assert results["kd cuda V=32768 K=1: peak / gradient"] == (2.0, "FAIL")
    assert results["kd triton V=32768 K=4: floor fraction"] == (None, "MISSING")  # a failed row does not count
    assert results["fused K=1: time / unfused"][1] == "PASS"  # 1.083 <= 1.1
    assert results["fused K=1: peak / unfused peak"][1] == "FAIL"  # 0.262 > 0.25
    assert results["fused K=1: time / Liger"][1] == "PASS" and results["fused K=1: peak / Liger's"][1] == "PASS"
    assert results["mi triton N=16384 D=768: fraction of the matmul peak"] == (None, "MISSING")
    assert gates.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "issue 17" in out and "FAIL    kd cuda V=32768 K=1: floor fraction: 0.700 (>= 0.8)" in out
