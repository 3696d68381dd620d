"""examples/lm_methods.py --small: weak-teacher KD, co-distillation and GUIDE on tiny GPT-2s, end to end (~20 s)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastdistill.apps import single_thread  # noqa: E402


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "lm_methods.py"
    spec = importlib.util.spec_from_file_location("lm_methods_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_lm_methods_example_small(tmp_path):
    ex = _example()
    lines = []
    with single_thread():
        (run,) = ex.run(ex.Settings.small(), log=lines.append, plot_path=tmp_path / "plot.png")
    keys = {key for rows in ex.EXPERIMENTS.values() for _, key in rows}
    assert keys <= set(run) and all(math.isfinite(run[k]) and run[k] > 1 for k in keys)
    # GUIDE's initialisation alone carries the teacher's knowledge: far better than a random model before training
    assert run["guide: GUIDE init, before training"] < 0.85 * run["guide: random init, before training"]
    # the co-trained pair differs from the independently trained one (both models took the KL term)
    assert run["large: co-distillation"] != run["large: independent"]
    assert run["small: co-distillation"] != run["small: independent"]
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert any(line.startswith("| paired difference") for line in lines)
