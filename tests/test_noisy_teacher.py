"""Issue 7: weighted distillation, SLaM, robust active distillation (fastdistill.methods.noisy_teacher), pinned on
hand-computed small cases, and the example's small mode end to end."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastdistill
from fastdistill.methods import (
    IsotonicCalibrator,
    RobustActiveSampler,
    SLaMLoss,
    TeacherReliability,
    WeightedKDLoss,
    active_distillation,
    distillation_weights,
    robust_sampling_distribution,
    slam_loss,
    slam_mix,
    topk_mask,
)
from fastdistill.methods.noisy_teacher import margin, systematic_sample

ROOT = Path(__file__).resolve().parents[1]


def _logits_with_top_prob(top: list[float], v: int = 3) -> torch.Tensor:
    """Rows whose softmax is [p, (1-p)/(v-1), ...]: confidence p, teacher predicts class 0."""
    rows = [[p] + [(1 - p) / (v - 1)] * (v - 1) for p in top]
    return torch.tensor(rows, dtype=torch.float64).log()


# ---------------------------------------------------------------------------------------------------------------
# calibration and the weights


def test_isotonic_pools_adjacent_violators():
    # targets 1, 0, 1, 1 at increasing scores: the first two violate monotonicity and pool to 0.5
    c = IsotonicCalibrator().fit(torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert c.value.tolist() == [0.5, 1.0, 1.0]
    # step function: below the range -> first block, between blocks -> the lower one, above -> last
    got = c(torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))
    assert got.tolist() == [0.5, 0.5, 0.5, 1.0, 1.0]


def test_isotonic_ties_share_one_value_and_order_is_irrelevant():
    c = IsotonicCalibrator().fit(torch.tensor([0.9, 0.5, 0.5]), torch.tensor([1.0, 1.0, 0.0]))
    assert c(torch.tensor([0.5, 0.9])).tolist() == [0.5, 1.0]
    # a fully decreasing sequence pools into one block: the mean
    c = IsotonicCalibrator().fit(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert c(torch.tensor([0.0, 5.0])).tolist() == pytest.approx([2 / 3, 2 / 3])


def test_reliability_accuracy_topk_and_smallest_k():
    # validation: teacher confidences 0.4 < 0.5 < 0.7 < 0.9, always predicting class 0;
    # labels: 1 (wrong, but 2nd), 0 (right), 0 (right), 0 (right)
    t_val = _logits_with_top_prob([0.4, 0.5, 0.7, 0.9])
    t_val[0, 1] += 0.01  # class 1 second, class 2 third in row 0
    y_val = torch.tensor([1, 0, 0, 0])
    rel = TeacherReliability.fit(t_val, y_val)
    assert rel.max_k == 3
    q = _logits_with_top_prob([0.45, 0.6, 0.95])
    # top-1 correctness by confidence: 0, 1, 1, 1 (already monotone)
    assert rel.accuracy(q).tolist() == [0.0, 1.0, 1.0]
    assert torch.equal(distillation_weights(rel, q), rel.accuracy(q))
    assert rel.topk_accuracy(q, 2).tolist() == [1.0, 1.0, 1.0]
    assert rel.smallest_k(q, target=0.9).tolist() == [2, 1, 1]


def test_a_reliability_pickled_without_tables_or_with_old_ones_still_answers():
    """TeacherReliability caches its curves as per-device tables; a pickle made before the cache existed (no
    _tables) or with tables of the older per-k layout (4-tuples) loads and gives the same smallest_k."""
    import pickle

    g = torch.Generator().manual_seed(3)
    t_val = torch.randn(300, 20, generator=g) * 3
    y_val = torch.where(torch.rand(300, generator=g) < 0.7, t_val.argmax(-1), torch.randint(0, 20, (300,), generator=g))
    rel = TeacherReliability.fit(t_val, y_val)
    q = torch.randn(64, 20, generator=g) * 3
    want = rel.smallest_k(q, 0.8)
    for tables in (None, {torch.device("cpu"): (None, None, None, None)}):
        state = dict(rel.__dict__)
        if tables is None:
            del state["_tables"]
        else:
            state["_tables"] = tables
        old = TeacherReliability.__new__(TeacherReliability)
        old.__setstate__(pickle.loads(pickle.dumps(state)))
        assert torch.equal(pickle.loads(pickle.dumps(old)).smallest_k(q, 0.8), want)


def test_smallest_k_matches_the_curve_by_curve_definition():
    """smallest_k evaluates every top-k curve at once, a chunk of curves per pass (it was ~6 launches per class,
    max_k = V by default): the smallest k whose curve reaches the target, else max_k, exactly as curve by curve,
    over several chunks (100k rows: 41 curves per chunk), on [*] rows, for targets no curve reaches, and after a
    curve is refit."""
    g = torch.Generator().manual_seed(0)
    v = 50
    t_val = torch.randn(400, v, generator=g) * 3
    y_val = torch.where(torch.rand(400, generator=g) < 0.6, t_val.argmax(-1), torch.randint(0, v, (400,), generator=g))
    rel = TeacherReliability.fit(t_val, y_val)
    q = torch.randn(5, 20_000, v, generator=g) * torch.rand(5, 1, 1, generator=g) * 4

    def by_curve(rel, q, target):
        conf = torch.softmax(q.float(), -1).amax(-1)
        k = torch.full(conf.shape, rel.max_k)
        for kk in range(rel.max_k, 0, -1):
            k = torch.where(rel.calibrators[kk - 1](conf) >= target, kk, k)
        return k

    for target in (0.5, 0.9, 0.99, 1.0):
        got = rel.smallest_k(q, target)
        assert got.shape == (5, 20_000) and got.dtype == torch.long
        assert torch.equal(got, by_curve(rel, q, target)), target
    assert len(set(rel.smallest_k(q, 0.9).flatten().tolist())) >= 4  # different k: the test can tell
    rel.calibrators[0] = IsotonicCalibrator().fit(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert torch.equal(rel.smallest_k(q, 0.9), by_curve(rel, q, 0.9))


def test_reliability_fit_shares_unchanged_curves():
    """Curve k's targets, 1[rank < k], change only at ranks some label has: fit shares one calibrator between
    consecutive k with the same targets (at most N + 1 fits, not V), each equal to its own fit, and smallest_k reads
    the runs as the curves they stand for, also after one k of a run is refit alone."""
    g = torch.Generator().manual_seed(1)
    n, v = 60, 400
    t_val = torch.randn(n, v, generator=g) * 2
    y_val = torch.randint(0, v, (n,), generator=g)
    rel = TeacherReliability.fit(t_val, y_val)
    conf = torch.softmax(t_val, -1).amax(-1)
    rank = (t_val > t_val.gather(-1, y_val[:, None])).sum(-1)
    assert rel.max_k == v and len({id(c) for c in rel.calibrators}) == len(set((rank + 1).tolist()) | {1})
    for k in range(1, v + 1):
        own = IsotonicCalibrator().fit(conf, (rank < k).double())
        assert torch.equal(own.lo, rel.calibrators[k - 1].lo) and torch.equal(own.value, rel.calibrators[k - 1].value)
    q = torch.randn(300, v, generator=g) * 3
    qc = torch.softmax(q, -1).amax(-1)

    def by_curve(target):
        k = torch.full((300,), v)
        for kk in range(v, 0, -1):
            k = torch.where(rel.calibrators[kk - 1](qc) >= target, kk, k)
        return k

    for target in (0.01, 0.05, 0.2, 0.9):
        assert torch.equal(rel.smallest_k(q, target), by_curve(target)), target
    assert len(set(rel.smallest_k(q, 0.05).tolist())) >= 3  # several k: the test can tell
    shared = next(k for k in range(2, v) if rel.calibrators[k] is rel.calibrators[k - 1])
    rel.calibrators[shared] = IsotonicCalibrator().fit(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert torch.equal(rel.smallest_k(q, 0.9), by_curve(0.9)) and rel.smallest_k(q, 0.9).min() <= shared + 1


def test_reliability_breaks_ties_as_topk_mask_does():
    """Tied teacher logits (common in bfloat16): the label's rank counts the tied classes before it, as
    topk_mask's order does, so "label in the top k" is what the mask of k classes holds."""
    t = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]] * 4)
    labels = torch.tensor([1, 2, 3, 0])
    rel = TeacherReliability.fit(t, labels)
    for k in range(1, 6):
        in_mask = topk_mask(t, k).gather(-1, labels[:, None]).squeeze(-1).double()
        assert rel.topk_accuracy(t[:1], k).item() == pytest.approx(in_mask.mean().item()), k
    assert [rel.topk_accuracy(t[:1], k).item() for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]


def test_weighted_kd_loss_is_kd_loss_with_the_weights():
    torch.manual_seed(0)
    rel = TeacherReliability.fit(_logits_with_top_prob([0.4, 0.5, 0.7, 0.9]), torch.tensor([1, 0, 1, 0]))
    s, t = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64) * 3
    w = distillation_weights(rel, t).double()
    assert (w >= 0).all() and (w <= 1).all() and w.unique().numel() > 1
    # hard: mean over rows of w_i * CE(student, teacher's label)
    hard = (F.cross_entropy(s, t.argmax(-1), reduction="none") * w).mean()
    torch.testing.assert_close(WeightedKDLoss(rel, hard=True)(s, t), hard)
    # soft at T = 2: mean of w_i * T^2 * KL(p_t || q_s)
    p, logq = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    soft = (4 * (p * (p.log() - logq)).sum(-1) * w).mean()
    torch.testing.assert_close(WeightedKDLoss(rel, temperature=2.0)(s, [t]), soft)
    torch.testing.assert_close(fastdistill.kd_loss(s, t, temperature=2.0, sample_weight=w), soft)


# ---------------------------------------------------------------------------------------------------------------
# SLaM


def test_topk_mask():
    t = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 2.0]])
    m = topk_mask(t, torch.tensor([2, 1]))
    assert m.tolist() == [[False, True, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\].*got 0"):
        topk_mask(t, 0)


def test_slam_mix_by_hand():
    f = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    top2 = torch.tensor([[True, True, False]])
    all3 = torch.ones(1, 3, dtype=torch.bool)
    # alpha f + (1 - alpha)(1 - f) * top with alpha = 0.8
    assert slam_mix(f, torch.tensor([0.8]), top2).tolist()[0] == pytest.approx([0.5, 0.38, 0.16])
    assert slam_mix(f, torch.tensor([0.8]), all3).tolist()[0] == pytest.approx([0.5, 0.38, 0.32])
    # normalised: the second term over k - 1 = 2; a full mask then gives a distribution
    got = slam_mix(f, torch.tensor([0.8]), all3, normalize=True)
    assert got.tolist()[0] == pytest.approx([0.45, 0.31, 0.24])
    assert float(got.sum()) == pytest.approx(1.0)
    # k = 2 normalised divides by 1: same as unnormalised; alpha = 1 is the identity
    torch.testing.assert_close(slam_mix(f, 0.8, top2, normalize=True), slam_mix(f, 0.8, top2))
    torch.testing.assert_close(slam_mix(f, 1.0, top2), f)


@pytest.mark.parametrize("normalize", [False, True])
def test_slam_loss_matches_probability_space(normalize):
    torch.manual_seed(1)
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    alpha, k = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.99], dtype=torch.float64), torch.tensor([1, 2, 3, 4, 2])
    mix = slam_mix(torch.softmax(s, -1), alpha, topk_mask(t, k), normalize=normalize)
    want = -(torch.softmax(t, -1) * mix.log()).sum(-1)
    # float64 logits: computed and returned in float64 (SPEC §1), to float64 rounding
    got = slam_loss(s, t, alpha, k, normalize=normalize, reduction="none")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slam_loss(s, t, alpha, k, normalize=normalize), want.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slam_loss(s.float(), t.float(), alpha, k, normalize=normalize), want.mean().float())


def test_slam_loss_keeps_its_gradient_however_unlikely_a_class_becomes():
    """log f is never floored: a class the teacher gives mass and the student puts e^-gap on costs gap (plus a
    constant) and pulls back with the teacher's mass, at gap 50 as at gap 500 (a floor at -100 capped the loss
    and zeroed the gradient)."""
    t = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    for gap in (50.0, 120.0, 500.0):
        s = torch.tensor([[0.0, 0.0, -gap]], dtype=torch.float64, requires_grad=True)
        loss = slam_loss(s, t, torch.tensor([0.7], dtype=torch.float64), 2)
        loss.backward()
        mix = slam_mix(torch.softmax(s.detach(), -1), 0.7, topk_mask(t, 2))
        want = -(torch.softmax(t, -1) * mix.log()).sum()  # log(0.7 e^-gap / Z) for class 2, outside the top 2
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
        assert float(s.grad[0, 2]) == pytest.approx(-0.2, rel=1e-9)


def test_slam_loss_with_a_masked_vocabulary_entry_stays_finite():
    """-inf logits at a class, in the student and the teacher (a masked or padded vocabulary, which SPEC allows): the
    class carries no term, the loss and gradients stay finite and equal those without the class."""
    torch.manual_seed(4)
    s, t = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    s[:, -1] = t[:, -1] = -math.inf
    for alpha in (0.0, 0.5, 1.0):
        a, b = s.clone().requires_grad_(), s[:, :-1].clone().requires_grad_()
        loss, want = slam_loss(a, t, alpha, 2), slam_loss(b, t[:, :-1], alpha, 2)
        (loss + want).backward()
        torch.testing.assert_close(loss, want)
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad[:, :-1], b.grad)


def test_slam_loss_skips_ignored_rows_and_takes_num_items():
    torch.manual_seed(3)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    alpha, k = torch.rand(6, dtype=torch.float64), torch.tensor([1, 2, 3, 4, 5, 2])
    labels = torch.tensor([0, -100, 3, 1, -100, 2])
    rows = slam_loss(s, t, alpha, k, reduction="none")
    kept = labels != -100
    got = slam_loss(s, t, alpha, k, labels=labels, reduction="none")
    torch.testing.assert_close(got, torch.where(kept, rows, 0.0))
    torch.testing.assert_close(slam_loss(s, t, alpha, k, labels=labels), rows[kept].mean())
    torch.testing.assert_close(slam_loss(s, t, alpha, k, labels=labels, num_items=10), rows[kept].sum() / 10)
    torch.testing.assert_close(slam_loss(s, t, alpha, k, labels=labels, num_items=torch.tensor(10)),
                               rows[kept].sum() / 10)  # fmt: skip
    torch.testing.assert_close(slam_loss(s, t, alpha, k, labels=labels, ignore_index=1, reduction="sum"),
                               torch.where(labels != 1, rows, 0.0).sum())  # fmt: skip
    all_ignored = slam_loss(s, t, alpha, k, labels=torch.full((6,), -100))
    assert float(all_ignored) == 0.0


@pytest.mark.parametrize("alpha", [1.2, -0.1, math.nan])
def test_slam_loss_alpha_out_of_range_is_an_error(alpha):
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="alpha must be in"):
        slam_loss(s, t, torch.full((3,), alpha), 2)
    with pytest.raises(ValueError, match="reduction must be"):
        slam_loss(s, t, 0.5, 2, reduction="batchmean")


def test_slam_loss_alpha_one_is_soft_cross_entropy_and_gradients_stay_finite():
    torch.manual_seed(2)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    ce = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(slam_loss(s, t, torch.ones(4), 2), ce)
    # extremes: alpha 0 and 1, a student sure of one class (f = 1, 1 - f = 0), k = 1
    s = torch.tensor([[80.0, -80.0, 0.0], [0.0, 0.0, 0.0], [-50.0, 50.0, 0.0]], requires_grad=True)
    t = torch.tensor([[5.0, 0.0, -5.0], [0.0, 1.0, 2.0], [9.0, -9.0, 0.0]])
    loss = slam_loss(s, t, torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1, 3, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_slam_loss_module_uses_the_reliability():
    rel = TeacherReliability.fit(_logits_with_top_prob([0.4, 0.5, 0.7, 0.9]), torch.tensor([1, 0, 0, 0]))
    s, t = torch.randn(3, 3), _logits_with_top_prob([0.45, 0.6, 0.95]).float()
    want = slam_loss(s, t, rel.accuracy(t), rel.smallest_k(t), normalize=True)
    torch.testing.assert_close(SLaMLoss(rel, normalize=True)(s, t), want)


# ---------------------------------------------------------------------------------------------------------------
# robust active distillation


def test_sampling_distribution_by_hand():
    # lambda = 2 / 8: p = g / 4
    assert robust_sampling_distribution(torch.tensor([4.0, 1, 1, 2]), 2).tolist() == [1.0, 0.25, 0.25, 0.5]
    # 10 / 14 * 2 > 1: the top gain saturates at 1, the other budget unit spreads over the four 1s
    assert robust_sampling_distribution(torch.tensor([10.0, 1, 1, 1, 1]), 2).tolist() == [1.0, 0.25, 0.25, 0.25, 0.25]
    # fewer positive gains than the budget: those get 1, the rest is uniform over the zeros
    assert robust_sampling_distribution(torch.tensor([0.0, 0, 3]), 2).tolist() == [0.5, 0.5, 1.0]
    p = robust_sampling_distribution(torch.rand(50), 7)
    assert float(p.sum()) == pytest.approx(7) and (p <= 1).all() and (p >= 0).all()
    # gains of very different sizes: the capped ones leave the small ones' sum intact (a running sum less 1e17
    # left nothing of the ten 1s, and gave negative p)
    p = robust_sampling_distribution(torch.tensor([1e17, 1e17] + [1.0] * 10), 3)
    torch.testing.assert_close(p, torch.tensor([1.0, 1.0] + [0.1] * 10))
    p = robust_sampling_distribution(torch.tensor([1e20] + [1.0] * 10), 3)
    torch.testing.assert_close(p, torch.tensor([1.0] + [0.2] * 10))
    with pytest.raises(ValueError, match="gains must be finite"):
        robust_sampling_distribution(torch.tensor([0.5, math.nan, 0.2, 0.9, 0.1]), 2)
    with pytest.raises(ValueError, match=r"budget must be in \[0, 3\], got 4"):
        robust_sampling_distribution(torch.ones(3), 4)


def test_systematic_sample_draws_budget_points_with_the_inclusion_probabilities():
    p = torch.tensor([1.0, 0.25, 0.25, 0.5, 0.0, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(4000):
        idx = systematic_sample(p, g)
        assert idx.numel() == 2 and idx.unique().numel() == 2
        counts[idx] += 1
    assert (counts / 4000 - p).abs().max() < 0.03


def test_gains_trade_margin_against_teacher_risk():
    def two_class(ps):
        return torch.tensor([[q, 1 - q] for q in ps]).log()

    # validation margins 0.1, 0.3, 0.7, 0.9; the teacher is wrong only on the least certain one
    val, correct = two_class([0.55, 0.65, 0.85, 0.95]), torch.tensor([0.0, 1, 1, 1])
    pool = two_class([0.6, 0.9, 0.5])  # margins 0.2, 0.8, 0.0
    assert margin(pool).tolist() == pytest.approx([0.2, 0.8, 0.0], abs=1e-6)
    # gain = (1 - m) * P(teacher right | m): the most uncertain points are the riskiest -> gain 0
    g = RobustActiveSampler().gains(pool, val, correct)
    assert g.tolist() == pytest.approx([0.0, 0.2, 0.0], abs=1e-6)
    # budget 1 then goes to the only point with positive gain, with certainty
    assert RobustActiveSampler().select(pool, val, correct, 1).tolist() == [1]


def test_active_distillation_rounds():
    pool = torch.arange(10.0)[:, None]
    seen, trained = [], []

    def query(x):
        seen.append(x.squeeze(1).tolist())
        return torch.zeros(len(x), 2)

    def train(model, x, t):
        trained.append(len(x))

    picked = active_distillation(torch.nn.Identity(), pool, query, train, budgets=[3, 2],
                                 select=lambda m, cand, b: torch.arange(b))  # fmt: skip
    # round 1 takes the first 3 candidates, round 2 the first 2 of the rest; training sees all queried so far
    assert picked.tolist() == [0, 1, 2, 3, 4]
    assert seen == [[0.0, 1.0, 2.0], [3.0, 4.0]]
    assert trained == [3, 5]


# ---------------------------------------------------------------------------------------------------------------
# the example, small mode


def test_example_small_mode_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("noisy_teacher_example", ROOT / "examples" / "noisy_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    threads = torch.get_num_threads()
    r = mod.run(mod.Settings.small(), tmp_path, log=lambda *_: None)
    assert torch.get_num_threads() == threads  # restored
    assert (tmp_path / "noisy_teacher.png").stat().st_size > 1000
    assert (tmp_path / "noisy_teacher.json").stat().st_size > 500
    for name in ("digits", "breast_cancer"):
        rows = r.acc[mod.column(name, 20)]
        for row in ("teacher", "student: labelled only", "student: KD soft (T = 1)", "student: weighted hard",
                    "student: SLaM (unnormalised)", "active random, 20 queries", "active margin, 20 queries",
                    "active robust, 20 queries", "teacher mislabels among the queried: margin, 20"):
            assert len(rows[row]) == 1 and 0.0 <= rows[row][0] <= 1.0 and not math.isnan(rows[row][0])
    assert "| teacher " in r.table and "wall time" in r.table and "intervals" in r.table


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("which", ["weighted", "slam"])
def test_losses_in_the_loop_accumulate_like_one_batch(which, hard):
    """In DistillationLoop with labels (some of them ignore_index), two micro-batches of 8 take the step one batch of
    16 takes: the losses divide by the loop's num_items and skip ignored rows (they returned per-micro-batch means
    before, so accumulation multiplied the gradient by grad_accum_steps)."""
    import copy

    from torch import nn

    from fastdistill.training import ArrayDataset, DistillationLoop

    if which == "slam" and hard:
        pytest.skip("SLaM has no hard mode")
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    y[[1, 2, 3, 9]] = -100  # uneven: 3 ignored in the first micro-batch, 1 in the second
    teacher, student0 = nn.Linear(6, 4), nn.Linear(6, 4)
    rel = TeacherReliability.fit(teacher(torch.randn(40, 6)).detach(), torch.randint(0, 4, (40,)))
    loss = WeightedKDLoss(rel, hard=hard, temperature=2.0) if which == "weighted" else SLaMLoss(rel)

    def step(accum):
        st = copy.deepcopy(student0)
        loop = DistillationLoop(st, [teacher], loss=loss, optimizer=torch.optim.SGD(st.parameters(), lr=1.0),
                                batch_size=16 // accum, grad_accum_steps=accum, shuffle=False, progress=False,
                                device="cpu")  # fmt: skip
        loop.fit(ArrayDataset(input=x, labels=y), max_steps=1)
        return student0.weight.detach() - st.weight.detach()

    torch.testing.assert_close(step(2), step(1), rtol=1e-5, atol=1e-7)
    # and the step is the loss over the 12 kept rows only
    with torch.no_grad():
        kept = y != -100
        t = teacher(x)
    st = copy.deepcopy(student0)
    loss(st(x[kept]), t[kept]).backward()
    torch.testing.assert_close(step(1), st.weight.grad, rtol=1e-5, atol=1e-7)


def test_slam_loss_skipped_rows_keep_nan_out_of_the_gradient():
    """A padded row's logits may hold anything (NaN, inf): a row skipped by its label or by weight 0 gives 0 and a
    zero gradient, and the other rows' loss and gradients are what they are without it (as kd_loss's contract)."""
    torch.manual_seed(4)
    s, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    alpha, k = torch.rand(4, dtype=torch.float64), torch.tensor([2, 3, 1, 2])
    labels, weight = torch.tensor([0, -100, 3, 1]), torch.tensor([1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1], t_bad[1, 2], s_bad[2, 0], t_bad[2] = math.nan, math.inf, math.nan, math.nan
    grads = []
    for a, b in ((s, t), (s_bad, t_bad)):
        a = a.clone().requires_grad_()
        loss = slam_loss(a, b, alpha, k, labels=labels, sample_weight=weight, reduction="none")
        loss.sum().backward()
        grads.append((loss.detach(), a.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])
    assert grads[1][0][1:3].eq(0).all() and grads[1][1][1:3].eq(0).all()
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(4,\)"):
        slam_loss(s, t, alpha, k, sample_weight=weight[:3])
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="sample_weight must be finite and >= 0"):
            slam_loss(s, t, alpha, k, sample_weight=torch.where(weight > 0.6, bad, weight))
