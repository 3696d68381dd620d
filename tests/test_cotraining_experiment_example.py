"""examples/cotraining_experiment.py --small: independent, one-way KD and co-training at each small -> large
weight, split over (seed, condition) tasks and put back together, end to end (~25 s)."""

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastdistill.apps import load_script  # noqa: E402


def test_cotraining_experiment_small(tmp_path):
    ex = load_script(Path(__file__).resolve().parents[1] / "examples" / "cotraining_experiment.py", "cotrain_example")
    s = ex.Settings.small()
    lines = []
    result = ex.run(s, out=tmp_path / "c", log=lines.append)
    assert result["steps"] == [0, 2, 4]
    curves = result["curves"]
    expected = {"large: independent", "medium: independent", "medium: one-way KD"}
    expected |= {f"{m}: co-training, w={w:g}" for m in ("large", "medium") for w in s.weights if m == "medium" or w}
    assert set(curves) == expected
    for label, by_seed in curves.items():
        assert sorted(by_seed) == list(s.seeds), label
        assert all(len(c) == 3 and all(math.isfinite(x) and x > 1 for x in c) for c in by_seed.values()), label
    # one initialisation per model and seed, whatever the condition
    for seed in s.seeds:
        assert curves["large: independent"][seed][0] == curves["large: co-training, w=1"][seed][0]
        assert curves["medium: one-way KD"][seed][0] == curves["medium: co-training, w=0"][seed][0]
    assert len(result["summary"]) == 3 * len(s.weights) - 1  # the w = 0 large model is the independent one
    assert (tmp_path / "c.png").stat().st_size > 10_000 and (tmp_path / "c.json").stat().st_size > 300
