"""Bad input to the methods (fastdistill.methods.noisy_teacher, weak_teacher) gets a clear error naming the argument,
as kd_loss's does: never a crash deep inside, never NaN, never a silently wrong number. One test per finding."""

from __future__ import annotations

import math

import pytest
import torch

import fastdistill
from fastdistill.methods import (
    IsotonicCalibrator,
    SLaMLoss,
    TeacherReliability,
    WeightedKDLoss,
    robust_sampling_distribution,
    slam_loss,
    slam_mix,
    topk_mask,
    weak_teacher_kd_loss,
)
from fastdistill.methods.weak_teacher import SoftWeightSchedule, WeakTeacherKDLoss

V = 5


@pytest.fixture
def st():
    torch.manual_seed(0)
    return torch.randn(6, V), torch.randn(6, V)


@pytest.fixture
def rel():
    torch.manual_seed(1)
    return TeacherReliability.fit(torch.randn(50, V), torch.randint(0, V, (50,)))


# ---------------------------------------------------------------------------------------------------------------
# slam_loss / SLaMLoss


def test_slam_loss_teacher_must_be_shaped_like_the_student(st):
    s, t = st
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(1, 5\), expected \(6, 5\)"):
        slam_loss(s, t[:1], 0.5, 2)  # [1, V] broadcast over the 6 rows before
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(6, 5\), expected \(1, 5\)"):
        slam_loss(s[:1], t, 0.5, 2)  # a loss over the teacher's 6 rows before
    with pytest.raises(ValueError, match="teacher_logits has vocabulary size 4 but student_logits has 5"):
        slam_loss(s, t[:, :4], 0.5, 2)  # a broadcast RuntimeError before
    # the one-teacher forms kd_loss takes: [1, *, V] and a list of one
    torch.testing.assert_close(slam_loss(s, t[None], 0.5, 2), slam_loss(s, t, 0.5, 2))
    torch.testing.assert_close(slam_loss(s, [t], 0.5, 2), slam_loss(s, t, 0.5, 2))


def test_slam_module_refuses_two_stacked_teachers(st, rel):
    s, t = st
    with pytest.raises(ValueError, match="SLaMLoss takes one teacher.*K = 2"):
        SLaMLoss(rel, reduction="none")(s, torch.stack([t, t.flip(0)]))  # returned [2, 6] before
    with pytest.raises(ValueError, match="slam_loss takes one teacher.*K = 2"):
        slam_loss(s, torch.stack([t, t]), 0.5, 2)


def test_slam_loss_num_items_is_checked_as_kd_loss_does(st):
    s, t = st
    with pytest.raises(ValueError, match="num_items must be >= 0, got -1"):
        slam_loss(s, t, 0.5, 2, num_items=-1)
    with pytest.raises(TypeError, match="num_items must be an int or a 0-dim Tensor, got float"):
        slam_loss(s, t, 0.5, 2, num_items=math.nan)
    with pytest.raises(ValueError, match="num_items must be finite and >= 0"):
        slam_loss(s, t, 0.5, 2, num_items=torch.tensor(math.nan))
    with pytest.raises(ValueError, match="num_items overrides the 'mean' denominator.*'sum'"):
        slam_loss(s, t, 0.5, 2, num_items=3, reduction="sum")
    # 0 is a count (no valid row anywhere in the step): the denominator is floored at 1, as in kd_loss (SPEC §1)
    rows = slam_loss(s, t, 0.5, 2, reduction="none")
    torch.testing.assert_close(slam_loss(s, t, 0.5, 2, num_items=0), rows.sum())


def test_slam_loss_k_must_be_an_integer(st):
    s, t = st
    with pytest.raises(TypeError, match="k must be an int or an integer Tensor.*got float"):
        slam_loss(s, t, 0.5, 2.5)  # meant k = 3 before
    with pytest.raises(TypeError, match="k must be an int or an integer Tensor.*torch.float32"):
        slam_loss(s, t, 0.5, torch.full((6,), 2.5))
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        slam_loss(s, t, 0.5, 6)


def test_slam_loss_checks_dtypes(st):
    s, t = st
    labels = torch.randint(0, V, (6,))
    with pytest.raises(TypeError, match="student_logits must be float32, float64, bfloat16 or float16"):
        slam_loss(s.long(), t, 0.5, 2)
    with pytest.raises(TypeError, match="teacher_logits must be float32, float64, bfloat16 or float16"):
        slam_loss(s, t.long(), 0.5, 2)
    with pytest.raises(TypeError, match=r"labels must be int64 \(torch.long\), got torch.float32"):
        slam_loss(s, t, 0.5, 2, labels=labels.float())
    with pytest.raises(TypeError, match="ignore_index must be an int, got float"):
        slam_loss(s, t, 0.5, 2, labels=labels, ignore_index=-100.0)
    with pytest.raises(TypeError, match="sample_weight must be a floating-point Tensor"):
        slam_loss(s, t, 0.5, 2, sample_weight=torch.ones(6, dtype=torch.long))


def test_slam_loss_zero_dim_logits_are_an_error():
    with pytest.raises(ValueError, match=r"student_logits must have shape \[\*, V\].*0-dim"):
        slam_loss(torch.tensor(1.0), torch.tensor(1.0), 0.5, 1)  # IndexError before


def test_slam_loss_alpha_and_k_shapes(st):
    s, t = st
    with pytest.raises(ValueError, match=r"alpha must be a number or a Tensor of shape \[\] or \[\*\] = \(6,\)"):
        slam_loss(s, t, torch.rand(3), 2)
    with pytest.raises(ValueError, match=r"k must be an int or a Tensor of shape \[\] or \[\*\] = \(6,\).*\(3,\)"):
        slam_loss(s, t, 0.5, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="alpha must be a floating-point Tensor"):
        slam_loss(s, t, torch.ones(6, dtype=torch.long), 2)


def test_slam_loss_lists_are_type_errors(st):
    s, t = st
    with pytest.raises(TypeError, match="sample_weight must be a floating-point Tensor"):
        slam_loss(s, t, 0.5, 2, sample_weight=[1.0] * 6)
    with pytest.raises(TypeError, match="labels must be an int64 Tensor, got list"):
        slam_loss(s, t, 0.5, 2, labels=[0] * 6)
    with pytest.raises(ValueError, match="slam_loss takes one teacher.*K = 2"):
        slam_loss(s, [t, t], 0.5, 2)
    with pytest.raises(TypeError, match="teacher_logits must be a Tensor or a sequence of Tensors"):
        slam_loss(s, "t", 0.5, 2)


def test_slam_loss_mixed_devices_name_the_argument(st):
    s, t = st
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="teacher_logits is on meta but student_logits is on cpu"):
        slam_loss(s, t.to(meta), 0.5, 2)
    with pytest.raises(ValueError, match="labels is on meta but student_logits is on cpu"):
        slam_loss(s, t, 0.5, 2, labels=torch.zeros(6, dtype=torch.long, device=meta))
    with pytest.raises(ValueError, match="sample_weight is on meta but student_logits is on cpu"):
        slam_loss(s, t, 0.5, 2, sample_weight=torch.ones(6, device=meta))
    with pytest.raises(ValueError, match="alpha is on meta but student_logits is on cpu"):
        slam_loss(s, t, torch.full((6,), 0.5, device=meta), 2)


# ---------------------------------------------------------------------------------------------------------------
# TeacherReliability, IsotonicCalibrator


def test_reliability_topk_accuracy_k_out_of_range(rel):
    t = torch.randn(6, V)
    for k in (0, -1, V + 1):
        with pytest.raises(ValueError, match=rf"k must be in \[1, max_k\] = \[1, {V}\].*got {k}"):
            rel.topk_accuracy(t, k)  # k = 0 silently gave the top-V curve, k = -1 the top-(V - 1)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        rel.topk_accuracy(t, 2.0)


def test_reliability_fit_max_k_at_least_one():
    with pytest.raises(ValueError, match="max_k must be >= 1"):
        TeacherReliability.fit(torch.randn(10, V), torch.zeros(10, dtype=torch.long), max_k=0)
    with pytest.raises(TypeError, match="max_k must be an int"):
        TeacherReliability.fit(torch.randn(10, V), torch.zeros(10, dtype=torch.long), max_k=2.5)


def test_reliability_fit_labels_checked():
    t = torch.randn(10, V)
    for bad in (-100, V):
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\)"):
            TeacherReliability.fit(t, torch.full((10,), bad))  # RuntimeError from gather before
    with pytest.raises(TypeError, match=r"labels must be int64 \(torch.long\), got torch.float32"):
        TeacherReliability.fit(t, torch.zeros(10))
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        TeacherReliability.fit(t, torch.zeros(9, dtype=torch.long))


def test_reliability_other_vocabulary_refused(rel):
    # a confidence over another V is on another scale (1/V at chance): the fitted curves do not apply to it
    for call in (rel.accuracy, lambda t: rel.topk_accuracy(t, 1), rel.smallest_k):
        with pytest.raises(ValueError, match=rf"teacher_logits must be \[\*, V\] with V = {V} .*got \(6, {V + 1}\)"):
            call(torch.randn(6, V + 1))
    assert rel.num_classes == V and rel.accuracy(torch.randn(6, V)).shape == (6,)
    unknown = TeacherReliability(rel.calibrators)  # built from curves alone: V not known, not checked
    assert unknown.accuracy(torch.randn(6, V + 1)).shape == (6,)
    with pytest.raises(ValueError, match=rf"num_classes must be >= the number of top-k curves \({V}\)"):
        TeacherReliability(rel.calibrators, num_classes=V - 1)


@pytest.mark.parametrize("make", [lambda r: WeightedKDLoss(r), lambda r: WeightedKDLoss(r, hard=True),
                                  lambda r: SLaMLoss(r)], ids=["weighted", "weighted-hard", "slam"])
def test_ignored_rows_may_hold_anything(rel, st, make):
    # padding rows (label ignore_index) may hold NaN / -inf teacher logits, as kd_loss allows: the teacher's
    # statistics (alpha, w, k) are not computed from them (the calibrator's NaN check raised on them)
    s, t = st
    s = s.clone().requires_grad_()
    labels = torch.tensor([0, -100, 2, -100, 4, 1])
    loss_fn = make(rel)
    clean = loss_fn(s, t, labels)
    (g_clean,) = torch.autograd.grad(clean, s)
    bad = t.clone()
    bad[1] = math.nan
    bad[3] = -math.inf
    dirty = loss_fn(s, bad, labels)
    (g_dirty,) = torch.autograd.grad(dirty, s)
    assert torch.isfinite(clean) and torch.equal(clean, dirty)
    assert torch.equal(g_clean, g_dirty) and not g_dirty[[1, 3]].any()


def test_slam_module_topk_target_checked_on_construction(rel):
    for bad in (math.nan, 2.0, -0.1):
        with pytest.raises(ValueError, match=r"topk_target must be finite and in \[0.0, 1.0\]"):
            SLaMLoss(rel, topk_target=bad)
    with pytest.raises(ValueError, match=r"target must be finite and in \[0.0, 1.0\]"):
        rel.smallest_k(torch.randn(6, V), math.nan)


def test_isotonic_calibrator_targets_in_unit_interval():
    for bad in (7.0, -0.5, math.nan):
        with pytest.raises(ValueError, match=r"target must be in \[0, 1\]"):
            IsotonicCalibrator().fit(torch.rand(5), torch.full((5,), bad))
    with pytest.raises(ValueError, match="score must be"):
        IsotonicCalibrator().fit(torch.tensor([0.1, math.nan]), torch.ones(2))
    fitted = IsotonicCalibrator().fit(torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="score must be a number in every entry, not NaN"):  # (was: 1.0, the top)
        fitted(torch.tensor([0.2, math.nan]))


# ---------------------------------------------------------------------------------------------------------------
# topk_mask, slam_mix


def test_topk_mask_k_of_the_wrong_shape():
    t = torch.randn(2, V)
    with pytest.raises(ValueError, match=r"k must be an int or a Tensor of shape \[\] or \[\*\] = \(2,\).*\(3,\)"):
        topk_mask(t, torch.tensor([1, 2, 3]))  # RuntimeError from expand before


def test_slam_mix_mask_of_the_wrong_shape():
    f = torch.softmax(torch.randn(1, 3), -1)
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 3\) like student_probs, got \(1, 2\)"):
        slam_mix(f, 0.8, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool Tensor"):
        slam_mix(f, 0.8, torch.ones(1, 3))


def test_slam_mix_alpha_out_of_range():
    f = torch.softmax(torch.randn(1, 3), -1)
    top2 = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match=r"alpha must be finite and in \[0.0, 1.0\]; got 2"):
        slam_mix(f, 2, top2)  # negative "probabilities" before
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        slam_mix(f, torch.tensor([2.0]), top2)


# ---------------------------------------------------------------------------------------------------------------
# WeightedKDLoss, construction


def test_weighted_kd_stacked_teachers_blame_the_teacher(st, rel):
    s, t = st
    with pytest.raises(ValueError, match="WeightedKDLoss takes one teacher.*K = 2") as e:
        WeightedKDLoss(rel)(s, torch.stack([t, t]))
    assert "sample_weight" not in str(e.value)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(6,\)"):
        WeightedKDLoss(rel)(s, t, sample_weight=torch.ones(1))  # broadcast over the rows before


def test_modules_check_their_arguments_on_construction(rel):
    with pytest.raises(ValueError, match="temperature must be finite"):
        WeightedKDLoss(rel, temperature=0)
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        SLaMLoss(rel, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        WeightedKDLoss(rel, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        SLaMLoss(rel, ignore_index=1.5)
    with pytest.raises(TypeError, match="reliability must be a TeacherReliability"):
        SLaMLoss(None)


# ---------------------------------------------------------------------------------------------------------------
# robust active distillation


def test_robust_sampling_budget_and_gains_shape():
    with pytest.raises(TypeError, match="budget must be an int, got float"):
        robust_sampling_distribution(torch.rand(6), 2.5)
    with pytest.raises(ValueError, match=r"gains must have shape \[N\].*\(2, 3\)"):
        robust_sampling_distribution(torch.rand(2, 3), 2)  # flattened silently before


# ---------------------------------------------------------------------------------------------------------------
# weak teacher


def test_weak_teacher_weight_sum_must_be_finite(st):
    s, t = (x.double() for x in st)  # float64: 1e300 times the loss is finite
    labels = torch.randint(0, V, (6,))
    with pytest.raises(ValueError, match="hard_weight \\+ soft_weight must be finite"):
        weak_teacher_kd_loss(s, t, labels, hard_weight=1e308, soft_weight=1e308)  # an inf loss before
    with pytest.raises(ValueError, match="hard_weight \\+ soft_weight must be finite"):
        WeakTeacherKDLoss(hard_weight=1e308, soft_weight=SoftWeightSchedule(1e308, 1.0))
    # large but finite weights still give the weighted sum
    got = weak_teacher_kd_loss(s, t, labels, hard_weight=1e300, soft_weight=1e300)
    want = 1e300 * (fastdistill.kd_loss(s, t, labels, ce_weight=1.0) + fastdistill.kd_loss(s, t))
    torch.testing.assert_close(got, want)
