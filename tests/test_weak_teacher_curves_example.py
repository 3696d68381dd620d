"""examples/weak_teacher_curves.py --small: one small teacher snapshotted at two qualities, the student's curves for
every soft weight, split over (seed, teacher, weight) tasks and put back together, end to end (~10 s)."""

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastdistill.apps import load_script, single_thread  # noqa: E402


def test_weak_teacher_curves_small(tmp_path):
    ex = load_script(Path(__file__).resolve().parents[1] / "examples" / "weak_teacher_curves.py",
                     "weak_teacher_curves_example")  # fmt: skip
    s = ex.Settings.small()
    lines = []
    with single_thread():
        (run,) = ex.run(s, log=lines.append, out=tmp_path / "wt")
    assert run["steps"] == [2, 4]  # a curve: eval_every = 2 of 4 steps
    assert set(run["teacher_ppl"]) == set(s.teacher_steps)
    # the teacher keeps training between snapshots: a different (here better) model at each quality
    assert run["teacher_ppl"][4] != run["teacher_ppl"][2]
    assert len(run["curves"]) == 1 + len(s.teacher_steps) * (len(ex.WEIGHTS) - 1)
    assert all(len(c) == 2 and all(math.isfinite(x) and x > 1 for x in c) for c in run["curves"].values())
    assert (tmp_path / "wt.png").stat().st_size > 10_000 and (tmp_path / "wt.json").stat().st_size > 300
    assert any(line.startswith("| no KD |") for line in lines)
