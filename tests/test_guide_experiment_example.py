"""examples/guide_experiment.py --small: the teacher's curve, every initialisation with and without KD, the gap
reductions and KD contrasts, end to end (~15 s)."""

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastdistill.apps import load_script  # noqa: E402


def test_guide_experiment_small(tmp_path):
    ex = load_script(Path(__file__).resolve().parents[1] / "examples" / "guide_experiment.py", "guide_example")
    s = ex.Settings.small()
    lines = []
    result = ex.run(s, out=tmp_path / "g", log=lines.append)
    assert sorted(result["teacher_curve"]) == [2, 4]
    runs = result["runs"]
    assert len(runs) == len(s.seeds)
    for r in runs:
        assert len(r["curves"]) == 2 * len(ex.INITS)
        assert r["steps"]["random | no KD"] == [0, 2, 4]
        assert r["steps"]["random, budget + teacher steps | KD"][-1] == s.budget + s.teacher_steps
        assert all(math.isfinite(x) and x > 1 for c in r["curves"].values() for x in c)
        # the same random student before any step, whichever loss; the teacher-derived inits start elsewhere
        c = r["curves"]
        assert c["random | no KD"][0] == c["random | KD"][0] == c["random, budget + teacher steps | no KD"][0]
        assert c["GUIDE embeddings | no KD"][0] != c["random | no KD"][0]
        assert c["GUIDE embeddings + first block | no KD"][0] != c["GUIDE embeddings | no KD"][0]
    summary = result["summary"]
    assert len(summary["gap_reduction"]) == 2 * len(ex.INITS) - 1 and len(summary["kd_minus_no_kd"]) == len(ex.INITS)
    assert summary["intervals"] == 3 * len(ex.INITS) - 1
    assert (tmp_path / "g.png").stat().st_size > 10_000 and (tmp_path / "g.json").stat().st_size > 300
    assert any(line.startswith("| GUIDE embeddings + first block | KD |") for line in lines)
