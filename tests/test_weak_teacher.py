"""Distillation from a weak teacher (fastdistill.methods.weak_teacher): the soft-weight schedules against
hand-computed values, the loss and its gradient against the formula written out in plain torch (float64), and the
loss inside DistillationLoop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdistill.methods.weak_teacher import SoftWeightSchedule, WeakTeacherKDLoss, weak_teacher_kd_loss
from fastdistill.training import ArrayDataset, DistillationLoop

# ---------------------------------------------------------------------------------------------------------------
# the schedule: hand-computed values


def test_linear_schedule_values():
    s = SoftWeightSchedule(start=4.0, end=1.0, shape="linear")
    # total 10: 4 - 3 * step / 10; end from step 10 on
    got = [s(k, 10) for k in (0, 1, 5, 9, 10, 11, 1000)]
    assert got == pytest.approx([4.0, 3.7, 2.5, 1.3, 1.0, 1.0, 1.0], abs=1e-15)
    # decay over the first half of 10 steps: 4 - 3 * step / 5, then 1
    h = SoftWeightSchedule(start=4.0, end=1.0, shape="linear", decay_fraction=0.5)
    assert [h(k, 10) for k in (0, 2, 4, 5, 7)] == pytest.approx([4.0, 2.8, 1.6, 1.0, 1.0], abs=1e-15)


def test_cosine_schedule_values():
    s = SoftWeightSchedule(start=4.0, end=1.0, shape="cosine")
    # 1 + 1.5 * (1 + cos(pi * step / 4))
    r = math.sqrt(0.5)
    expected = [4.0, 1 + 1.5 * (1 + r), 2.5, 1 + 1.5 * (1 - r), 1.0, 1.0]
    assert [s(k, 4) for k in range(6)] == pytest.approx(expected, abs=1e-15)


def test_step_schedule_values():
    # 3 drops: four equal plateaus 4, 3, 2, 1; the last one inside training
    s = SoftWeightSchedule(start=4.0, end=1.0, shape="step", num_drops=3)
    assert [s(k, 8) for k in range(10)] == [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    # 2 drops from 1 to 0 over 7 steps: level floor(step * 3 / 7) -> 0,0,0,1,1,2,2
    s2 = SoftWeightSchedule(start=1.0, end=0.0, shape="step", num_drops=2)
    assert [s2(k, 7) for k in range(8)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]
    # decay over the first half: plateaus of one step each in 8 steps (decay window 4)
    s3 = SoftWeightSchedule(shape="step", num_drops=3, decay_fraction=0.5)
    assert [s3(k, 8) for k in range(8)] == [4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # a decay_fraction with no exact float product: 0.14 * 100 is 14.000000000000002 in floats, and the plateaus
    # (3 drops over 14 steps: 4 until 3.5, 3 until 7, 2 until 10.5) must switch at the exact boundaries
    s4 = SoftWeightSchedule(shape="step", num_drops=3, decay_fraction=0.14)
    assert [s4(k, 100) for k in range(6, 9)] == [3.0, 2.0, 2.0]
    assert [s4(k, 200) for k in range(6, 9)] == [4.0, 3.0, 3.0]
    # and "linear" reaches end exactly at step decay_fraction * total (0.07 * 100 = 7.000000000000001 in floats)
    assert SoftWeightSchedule(shape="linear", decay_fraction=0.07)(7, 100) == 1.0


def test_constant_schedule_needs_no_total():
    s = SoftWeightSchedule(start=2.5, end=0.0, shape="constant")
    assert [s(k) for k in (0, 3, 10**6)] == [2.5, 2.5, 2.5]
    assert s(7, 10) == 2.5


@pytest.mark.parametrize("shape", ["linear", "cosine", "step"])
@pytest.mark.parametrize("start,end", [(4.0, 1.0), (0.3, 0.1), (0.1, 0.7)])
@pytest.mark.parametrize("total,frac", [(1, 1.0), (7, 1.0), (50, 0.3), (13, 0.77)])
def test_schedule_monotone_with_exact_endpoints(shape, start, end, total, frac):
    s = SoftWeightSchedule(start=start, end=end, shape=shape, decay_fraction=frac)
    vals = [s(k, total) for k in range(total + 3)]
    assert vals[0] == start  # exactly, not up to rounding
    decay_end = math.ceil(frac * total)
    assert all(v == end for v in vals[decay_end:])
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    assert all(d <= 0 for d in diffs) if start >= end else all(d >= 0 for d in diffs)
    lo, hi = min(start, end), max(start, end)
    assert all(lo <= v <= hi for v in vals)


def test_schedule_own_total_steps_wins_over_the_call():
    s = SoftWeightSchedule(start=4.0, end=1.0, total_steps=4)
    assert s(2) == 2.5
    assert s(2, 1000) == 2.5  # the schedule's horizon, not the loop's
    assert s(4, 1000) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# the loss against the formula written out in plain torch


def hand_loss(s, t, y, a_h, a_s, temperature, *, scale_sq=True, ignore_index=-100, num_items=None,
              sample_weight=None, reduction="mean"):  # fmt: skip
    """a_h * CE(s, y) + a_s * c * KL(softmax(t/T) || softmax(s/T)) per row, c = T^2 or 1, rows labelled
    ignore_index dropped; mean over kept rows (or / num_items), or sum, or per row."""
    v = s.shape[-1]
    s2, t2 = s.reshape(-1, v), t.reshape(-1, v)
    n = s2.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if y is None else y.reshape(-1) != ignore_index
    row_ce = torch.zeros(n, dtype=s2.dtype)
    if y is not None and a_h > 0:
        row_ce = row_ce.masked_scatter(keep, F.cross_entropy(s2[keep], y.reshape(-1)[keep], reduction="none"))
    log_p = torch.log_softmax(t2 / temperature, dim=-1)
    log_q = torch.log_softmax(s2 / temperature, dim=-1)
    row_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    c = temperature**2 if scale_sq else 1.0
    row = (a_h * row_ce + a_s * c * row_kl) * keep.to(s2.dtype)
    if sample_weight is not None:
        row = row * sample_weight.reshape(-1)
    if reduction == "none":
        return row.reshape(s.shape[:-1])
    if reduction == "sum":
        return row.sum()
    denom = num_items if num_items is not None else int(keep.sum())
    return row.sum() / max(denom, 1)


def _inputs(lead=(6,), v=9, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    s = (2.0 * torch.randn(*lead, v, generator=g, dtype=torch.float64)).requires_grad_()
    t = 3.0 * torch.randn(*lead, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, lead, generator=g)
    if ignore:
        y.view(-1)[::3] = -100
    return s, t, y


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("a_h,a_s", [(1.0, 4.0), (1.0, 1.0), (0.3, 2.5), (0.0, 2.5), (0.7, 0.0), (0.0, 0.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("num_items", [None, 11])
def test_loss_and_gradient_match_the_hand_formula(a_h, a_s, temperature, num_items):
    s, t, y = _inputs(lead=(3, 4))
    fn = WeakTeacherKDLoss(hard_weight=a_h, soft_weight=a_s, temperature=temperature)
    got = fn(s, [t], y, num_items=num_items)
    ref = hand_loss(s, t, y, a_h, a_s, temperature, num_items=num_items)
    assert got.dim() == 0 and got.dtype == torch.float64
    _close(got, ref)
    (g_got,) = torch.autograd.grad(got, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    _close(g_got, g_ref)
    assert torch.all(g_got[y == -100] == 0)  # ignored rows: no loss, no gradient, in both terms


@pytest.mark.parametrize("a_s", [0.0, 1.5])
def test_no_labels_needed_without_the_hard_term(a_s):
    s, t, _ = _inputs()
    got = WeakTeacherKDLoss(hard_weight=0.0, soft_weight=a_s, temperature=2.0)(s, t)
    ref = hand_loss(s, t, None, 0.0, a_s, 2.0)  # mean over all rows
    _close(got, ref)
    _close(torch.autograd.grad(got, s)[0], torch.autograd.grad(ref, s)[0])


def test_without_temperature_scaling_it_is_the_papers_eq3():
    s, t, y = _inputs()
    got = WeakTeacherKDLoss(hard_weight=1.0, soft_weight=4.0, temperature=3.0, scale_by_temperature_sq=False)(s, t, y)
    _close(got, hand_loss(s, t, y, 1.0, 4.0, 3.0, scale_sq=False))


def test_teacher_layouts_and_sample_weight():
    s, t, y = _inputs(lead=(2, 5))
    w = torch.rand(2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fn = WeakTeacherKDLoss(hard_weight=0.5, soft_weight=2.0, temperature=1.5)
    ref = hand_loss(s, t, y, 0.5, 2.0, 1.5, sample_weight=w)
    for teacher in (t, [t], t.unsqueeze(0)):  # [*, V], a list of one, a stacked [1, *, V] (the cache's layout)
        _close(fn(s, teacher, y, sample_weight=w), ref)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_functional_reductions(reduction):
    s, t, y = _inputs()
    got = weak_teacher_kd_loss(s, t, y, hard_weight=0.4, soft_weight=3.0, temperature=2.0, reduction=reduction)
    _close(got, hand_loss(s, t, y, 0.4, 3.0, 2.0, reduction=reduction))


def test_set_progress_changes_the_weight_used():
    s, t, y = _inputs()
    fn = WeakTeacherKDLoss(hard_weight=1.0, soft_weight=SoftWeightSchedule(4.0, 1.0, "linear"), temperature=2.0)
    for step, weight in ((0, 4.0), (5, 2.5), (10, 1.0)):
        fn.set_progress(step, 10)
        assert fn.current_soft_weight == weight
        _close(fn(s, t, y), hand_loss(s, t, y, 1.0, weight, 2.0))
    fn.set_progress(3, 4)  # a new total is taken too
    assert fn.current_soft_weight == pytest.approx(1.75)


def test_extra_repr_names_the_settings():
    text = repr(WeakTeacherKDLoss(hard_weight=0.5, soft_weight=SoftWeightSchedule(shape="cosine"), temperature=2.0))
    assert "hard_weight=0.5" in text and "shape='cosine'" in text and "temperature=2.0" in text


# ---------------------------------------------------------------------------------------------------------------
# inside the training loop


def _loop_data(n=16, d=6, v=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return x, y


def _student_and_teacher(d=6, v=5):
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, v))  # the bigger model
    teacher = nn.Linear(d, v)  # the weak one
    return student, teacher


def test_runs_in_the_loop():
    """Works with or without the loop's set_progress hook: this schedule carries its own horizon."""
    x, y = _loop_data()
    student, teacher = _student_and_teacher()
    fn = WeakTeacherKDLoss(soft_weight=SoftWeightSchedule(4.0, 1.0, "cosine", total_steps=6), temperature=2.0)
    loop = DistillationLoop(student, [teacher], loss=fn, batch_size=8, progress=False, log_every=1,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1))  # fmt: skip
    out = loop.fit(ArrayDataset(input=x, labels=y), max_steps=6)
    assert out["step"] == 6
    losses = [h["loss"] for h in loop.history if h["split"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)


class _Recording(WeakTeacherKDLoss):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls: list[tuple[int, int | None]] = []

    def set_progress(self, step, total_steps) -> None:
        self.calls.append((step, total_steps))
        super().set_progress(step, total_steps)


def test_loop_reports_progress_before_every_optimizer_step():
    """NEEDS THE LOOP HOOK (DistillationLoop calls ``loss_fn.set_progress(step, total_steps)`` before every
    optimizer step, step 0-based). Without it the schedule has no total and the first forward raises.

    Checks: one call per optimizer step (not per micro-batch), with the fit's total; the trained parameters equal
    a replay by hand that uses schedule(k, total) at step k; after fit the weight is schedule(total - 1, total)."""
    x, y = _loop_data()
    student, teacher = _student_and_teacher()
    schedule = SoftWeightSchedule(4.0, 1.0, "linear")
    temperature, lr, total = 2.0, 0.2, 4
    fn = _Recording(hard_weight=1.0, soft_weight=schedule, temperature=temperature)
    loop = DistillationLoop(copy.deepcopy(student), [teacher], loss=fn, batch_size=8, grad_accum_steps=2,
                            shuffle=False, progress=False, log_every=1,
                            optimizer=lambda p: torch.optim.SGD(p, lr=lr))  # fmt: skip
    loop.fit(ArrayDataset(input=x, labels=y), max_steps=total)

    assert fn.calls == [(k, total) for k in range(total)]
    assert fn.current_soft_weight == schedule(total - 1, total)

    # replay: each step is one batch of all 16 rows (2 micro-batches of 8), mean over the labelled ones
    ref = copy.deepcopy(student)
    with torch.no_grad():
        t = teacher(x)
    for k in range(total):
        loss = hand_loss(ref(x), t, y, 1.0, schedule(k, total), temperature)
        ref.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    for p_loop, p_ref in zip(loop.student.parameters(), ref.parameters()):
        torch.testing.assert_close(p_loop, p_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# errors name the argument


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(start=-1.0), ValueError, "start"),
        (dict(end=float("nan")), ValueError, "end"),
        (dict(start=float("inf")), ValueError, "start"),
        (dict(start="4"), TypeError, "start"),
        (dict(shape="exponential"), ValueError, "shape"),
        (dict(total_steps=0), ValueError, "total_steps"),
        (dict(total_steps=2.5), TypeError, "total_steps"),
        (dict(decay_fraction=0.0), ValueError, "decay_fraction"),
        (dict(decay_fraction=1.5), ValueError, "decay_fraction"),
        (dict(num_drops=0), ValueError, "num_drops"),
        (dict(num_drops=True), TypeError, "num_drops"),
    ],
)
def test_schedule_errors_name_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        SoftWeightSchedule(**kwargs)


def test_schedule_call_errors():
    s = SoftWeightSchedule()
    with pytest.raises(ValueError, match="total_steps"):
        s(3)
    with pytest.raises(ValueError, match="step"):
        s(-1, 10)
    with pytest.raises(TypeError, match="step"):
        s(1.5, 10)
    with pytest.raises(ValueError, match="total_steps"):
        s(1, 0)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(hard_weight=-0.5), ValueError, "hard_weight"),
        (dict(hard_weight=float("nan")), ValueError, "hard_weight"),
        (dict(soft_weight=-2.0), ValueError, "soft_weight"),
        (dict(soft_weight="linear"), TypeError, "soft_weight"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(divergence="l2"), ValueError, "divergence"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_loss_errors_name_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        WeakTeacherKDLoss(**kwargs)


def test_forward_and_progress_errors():
    s, t, y = _inputs()
    with pytest.raises(ValueError, match="labels"):
        WeakTeacherKDLoss(soft_weight=1.0)(s, t)  # hard_weight 1 > 0 needs labels
    fn = WeakTeacherKDLoss()  # a schedule without its own total, and no set_progress yet
    with pytest.raises(ValueError, match="set_progress"):
        fn(s, t, y)
    with pytest.raises(ValueError, match="step"):
        fn.set_progress(-1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        fn.set_progress(0, 0)
