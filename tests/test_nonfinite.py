"""Never a silent wrong number: non-finite inputs, double backward, large logits, extreme weights (issue 14).

The contract (README "Non-finite inputs"): a row that counts and holds a NaN, or a +inf logit (an fp16 overflow),
or has no finite logit at all, gives a NaN loss and an all-NaN gradient row on every backend, as F.kl_div and
log_softmax do; the other rows are untouched. A skipped row (ignored label, sample weight 0) and a teacher of
weight 0 in a row are dropped whatever they hold.
"""

import math

import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    DIVERGENCES,
    ENSEMBLES,
    KD_BACKENDS,
    make_inputs,
    reference64,
    requires_ext,
    requires_triton,
)

import fastdistill

POISONS = {
    "teacher-nan": ("teacher", math.nan),
    "teacher-inf": ("teacher", math.inf),  # fp16 teacher logits that overflowed
    "teacher-all-neginf": ("teacher", "row"),  # a teacher that counts, with no distribution in the row
    "student-nan": ("student", math.nan),
    "student-inf": ("student", math.inf),
    "student-all-neginf": ("student", "row"),
}
BAD_ROW = 2


def _poison(s, ts, where):
    who, value = POISONS[where]
    x = s if who == "student" else ts[0]
    if value == "row":
        x[BAD_ROW] = -math.inf
    else:
        x[BAD_ROW, 5] = value


def _grads(s, ts, teacher_grad=True, **kw):
    s = s.detach().clone().requires_grad_()
    ts = [t.detach().clone().requires_grad_(teacher_grad) for t in ts]
    loss = fastdistill.kd_loss(s, ts, reduction="none", **kw)
    grads = torch.autograd.grad(loss.sum(), [s, *ts] if teacher_grad else [s])
    return loss, grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("where", list(POISONS))
@pytest.mark.parametrize("k,ensemble", [(1, "prob_mean")] + [(2, e) for e in ENSEMBLES])
def test_poisoned_row_is_nan_everywhere(backend, divergence, where, k, ensemble):
    """The poisoned row: NaN loss, all-NaN student gradient (and poisoned teacher's); other rows as if clean."""
    s, ts = make_inputs((5,), 19, k)
    # the float64 reference on the same (clean) inputs
    clean_loss, clean_grads = _grads(s.double(), [t.double() for t in ts], divergence=divergence, ensemble=ensemble,
                                     backend="reference")  # fmt: skip
    _poison(s, ts, where)
    loss, grads = _grads(s, ts, divergence=divergence, ensemble=ensemble, backend=backend)
    assert torch.isnan(loss[BAD_ROW]), f"{backend}: the poisoned row's loss is {loss[BAD_ROW].item()}, not NaN"
    assert torch.isnan(grads[0][BAD_ROW]).all(), f"{backend}: the student gradient row is not all NaN"
    if POISONS[where][0] == "teacher":
        assert torch.isnan(grads[1][BAD_ROW]).all(), f"{backend}: the poisoned teacher's gradient is not all NaN"
    ok = torch.arange(5) != BAD_ROW
    torch.testing.assert_close(loss[ok].double(), clean_loss[ok], rtol=1e-4, atol=1e-5)
    for g, c in zip(grads, clean_grads):
        torch.testing.assert_close(g[ok].double(), c[ok], rtol=1e-4, atol=1e-5)
    mean = fastdistill.kd_loss(s, ts, divergence=divergence, ensemble=ensemble, backend=backend)
    assert torch.isnan(mean)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("where", list(POISONS))
@pytest.mark.parametrize("skip", ["ignored-label", "zero-sample-weight", "zero-teacher-weight"])
def test_dropped_rows_and_teachers_stay_exact(backend, where, skip):
    """A skipped row, or a teacher of weight 0 in a row, contributes exactly what it would clean: nothing."""
    if skip == "zero-teacher-weight" and POISONS[where][0] == "student":
        pytest.skip("the student is never dropped")
    s, ts = make_inputs((5,), 19, 2)
    kw = dict(divergence="reverse_kl", ensemble="loss_mean", backend=backend)
    labels = torch.randint(0, 19, (5,))
    weights = torch.ones(2, 5)
    sw = torch.ones(5)
    if skip == "ignored-label":
        labels[BAD_ROW] = -100
    elif skip == "zero-sample-weight":
        sw[BAD_ROW] = 0
    else:
        weights[0, BAD_ROW] = 0
    kw.update(labels=labels, ce_weight=0.25, sample_weight=sw, teacher_weights=weights)
    clean_loss, clean_grads = _grads(s.double(), [t.double() for t in ts], **{**kw, "backend": "reference"})
    _poison(s, ts, where)
    loss, grads = _grads(s, ts, **kw)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss.double(), clean_loss, rtol=1e-4, atol=1e-5)
    for g, c in zip(grads, clean_grads):
        torch.testing.assert_close(g.double(), c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_poisoned_teacher_beside_teachers_of_weight_zero(backend, divergence, value):
    """prob_mean, weights [1, 0, 0] in the poisoned row (teacher 0 counts alone): the row is NaN. The mixture's log,
    a log-sum-exp over the teachers, took its max with tl.max, which drops a NaN: log(w_k P_k) = [NaN, -inf, -inf]
    gave log P = -inf (a +inf or finite loss) on Triton."""
    s, ts = make_inputs((5,), 19, 3)
    weights = torch.ones(3, 5)
    weights[1:, BAD_ROW] = 0.0
    ts[0][BAD_ROW, 5] = value
    loss, grads = _grads(s, ts, divergence=divergence, ensemble="prob_mean", teacher_weights=weights, backend=backend)
    assert torch.isnan(loss[BAD_ROW]), f"{backend}: the poisoned row's loss is {loss[BAD_ROW].item()}, not NaN"
    assert torch.isnan(grads[0][BAD_ROW]).all() and torch.isnan(grads[1][BAD_ROW]).all(), backend
    assert torch.isfinite(loss[torch.arange(5) != BAD_ROW]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_codistill_poisoned_row(backend, side, value):
    """A NaN (or +inf) in one model's row: both losses NaN there (each model is the other's target)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 19, generator=g), torch.randn(5, 19, generator=g)
    (a if side == "a" else b)[BAD_ROW, 3] = value
    a.requires_grad_()
    b.requires_grad_()
    la, lb = fastdistill.codistill_loss(a, b, reduction="none", divergence="jsd", backend=backend)
    assert torch.isnan(la[BAD_ROW]) and torch.isnan(lb[BAD_ROW])
    ok = torch.arange(5) != BAD_ROW
    assert torch.isfinite(la[ok]).all() and torch.isfinite(lb[ok]).all()
    ga, gb = torch.autograd.grad((la + lb).sum(), [a, b])
    assert torch.isnan(ga[BAD_ROW]).all() and torch.isnan(gb[BAD_ROW]).all()
    assert torch.isfinite(ga[ok]).all() and torch.isfinite(gb[ok]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("case", ["pure-ce-at-t2", "row-wider-than-a-cpu-chunk", "codistill-kl"])
def test_poison_reaches_the_whole_row_on_every_path(backend, value, case):
    """Paths the matrices above miss: pure cross-entropy at T != 1 (its own normaliser), a row of two CPU chunks
    (1024 columns each) poisoned in the first, and co-distillation's closed-form KL gradient. The float CPU exp
    clamps its argument, which turned exp(NaN) finite: these rows came back with an inf loss or finite gradients."""
    g = torch.Generator().manual_seed(0)
    vocab = 1100 if case == "row-wider-than-a-cpu-chunk" else 19
    a, b = torch.randn(3, vocab, generator=g), torch.randn(3, vocab, generator=g)
    a[1, 3] = value
    a.requires_grad_()
    b.requires_grad_()
    labels = torch.tensor([0, 5, 7])
    if case == "codistill-kl":
        la, lb = fastdistill.codistill_loss(a, b, labels, hard_weight=0.5, divergence="kl", reduction="none",
                                            backend=backend)  # fmt: skip
        losses = [la, lb]
    else:
        ce = 1.0 if case == "pure-ce-at-t2" else 0.0
        losses = [fastdistill.kd_loss(a, [b], labels, ce_weight=ce, temperature=2.0, reduction="none",
                                      backend=backend)]  # fmt: skip
    grads = torch.autograd.grad(sum(loss.sum() for loss in losses), [a, b], allow_unused=True)
    for loss in losses:
        assert torch.isnan(loss[1]), f"{case}: the poisoned row's loss is {loss[1].item()}"
        assert torch.isfinite(loss[[0, 2]]).all()
    for name, grad in zip("ab", grads):
        if grad is None or (case == "pure-ce-at-t2" and name == "b"):
            continue
        finite = int(torch.isfinite(grad[1]).sum())
        assert torch.isnan(grad[1]).all(), f"{case}: {name}'s gradient row has {finite} finite entries"
        assert torch.isfinite(grad[[0, 2]]).all()


def test_reference_loss_mean_reverse_kl_with_a_dropped_teacher_has_a_finite_gradient():
    """0 * inf in backward: a teacher of weight 0 under reverse KL used to make the reference's gradient NaN."""
    s, ts = make_inputs((4,), 11, 2, dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, (g,) = reference64(s, ts, divergence="reverse_kl", ensemble="loss_mean", teacher_weights=w)
    assert torch.isfinite(g).all()
    # row 1 has teacher 1 alone: its gradient is the single-teacher one
    _, (g1,) = reference64(s[1:2], [ts[1][1:2]], divergence="reverse_kl", reduction="sum")
    torch.testing.assert_close(g[1] * 4, g1[0])


# ---- double backward -------------------------------------------------------------------------------------------


def _second_order_calls():
    x = torch.randn(4, 10, dtype=torch.float64)
    t = torch.randn(4, 10, dtype=torch.float64)
    f = torch.randn(6, 5, dtype=torch.float64)
    calls = {
        "kd_loss": lambda b, x=x: fastdistill.kd_loss(x, t, divergence="jsd", backend=b),
        "codistill_loss": lambda b, x=x: sum(fastdistill.codistill_loss(x, t, backend=b)),
        "mi_alpha": lambda b, x=f: fastdistill.mi_alpha(x, f.flip(0), backend=b),
    }
    return calls, {"kd_loss": x, "codistill_loss": x, "mi_alpha": f}


@pytest.mark.parametrize("op", ["kd_loss", "codistill_loss", "mi_alpha"])
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_ext),
                                     pytest.param("triton", marks=requires_triton)])  # fmt: skip
def test_double_backward_raises_not_zero(op, backend):
    """create_graph=True through a fused backend: a clear error, never a second-order term of 0."""
    if op == "mi_alpha" and backend == "triton":
        pytest.skip("the Triton mi_alpha runs float32 only; covered by the cpu case and test_mi_triton")
    calls, inputs = _second_order_calls()
    x = inputs[op].clone().requires_grad_()
    loss = calls[op](backend, x)
    with pytest.raises(RuntimeError, match=r"create_graph=True \(double backward\) is not supported.*reference"):
        torch.autograd.grad(loss, x, create_graph=True)
    # first order is unaffected, and the reference gives the second order
    (g,) = torch.autograd.grad(calls[op](backend, x), x)
    (g_ref,) = torch.autograd.grad(calls[op]("reference", x), x, create_graph=True)
    torch.testing.assert_close(g, g_ref.detach())
    (h,) = torch.autograd.grad(g_ref.pow(2).sum(), x)
    assert h.abs().sum() > 0


# ---- out-of-range labels where the Python check does not run (torch.compile) -----------------------------------


@requires_triton
def test_triton_out_of_range_label_gives_nan_row():
    """The op itself (what torch.compile calls, the range check skipped): NaN in that row, never a read outside."""
    from fastdistill.ops.triton.kd_loss import kd_loss_triton

    s, ts = make_inputs((4,), 13, 1)
    labels = torch.tensor([1, 13, -7, 2])
    loss, gs, _ = kd_loss_triton(s, [torch.stack(ts)], None, labels, None, None, "kl", "prob_mean", 2.0, 2.0, 0.5,
                                 [], -100, False, True, False)  # fmt: skip
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(gs[1:3]).all() and torch.isfinite(gs[[0, 3]]).all()


@requires_triton
def test_triton_codistill_out_of_range_label_gives_nan_row():
    from fastdistill.ops.triton.codistill_loss import codistill_loss_triton

    a, b = torch.randn(3, 13), torch.randn(3, 13)
    labels = torch.tensor([1, 99, 2])
    la, lb, ga, gb = codistill_loss_triton(a, b, labels, None, None, "kl", 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, [], -100,
                                           False, True, True)  # fmt: skip
    assert torch.isnan(la[1]) and torch.isfinite(la[[0, 2]]).all()
    assert torch.isnan(ga[1]).all() and torch.isfinite(ga[[0, 2]]).all()


@requires_ext
def test_cpu_out_of_range_label_raises_in_the_kernel():
    s, ts = make_inputs((4,), 13, 1)
    with pytest.raises(ValueError, match=r"labels\[1\] = 13 is out of range \[0, 13\)"):
        torch.ops.fastdistill.kd_loss(s, ts, None, torch.tensor([1, 13, 0, 2]), None, None, "kl", "prob_mean", 1.0,
                                      0.5, 0.5, [], -100, True, True, 0)  # fmt: skip


# ---- precision at large logits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_large_logits_keep_float32_accuracy(backend, divergence, temperature):
    """Logits around 1e4 (a common offset): within float32's accuracy of the float64 result on the same inputs.
    Forming log Q as x - lse loses ulp(1e4) ~ 1e-3 to the rounding of lse; (x - max) - log sum does not."""
    g = torch.Generator().manual_seed(1)
    rows = 3 if backend == "triton" else 8  # (Triton's interpreter: ~10 s a row on 2 cores)
    s = (1e4 + 2 * torch.randn(rows, 301, generator=g, dtype=torch.float64)).float()
    t = (1e4 + 2 * torch.randn(rows, 301, generator=g, dtype=torch.float64)).float()
    labels = torch.randint(0, 301, (rows,), generator=g)
    kw = dict(divergence=divergence, temperature=temperature, labels=labels, reduction="none")
    for ce in (0.0, 0.5, 1.0):
        got = fastdistill.kd_loss(s, t, ce_weight=ce, backend=backend, **kw).double()
        want = fastdistill.kd_loss(s.double(), t.double(), ce_weight=ce, backend="reference", **kw)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6, msg=f"ce_weight={ce}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_logits_codistill_cross_entropy(backend):
    g = torch.Generator().manual_seed(2)
    a = (1e4 + torch.randn(6, 101, generator=g, dtype=torch.float64)).float()
    b = (-1e4 + torch.randn(6, 101, generator=g, dtype=torch.float64)).float()
    labels = torch.randint(0, 101, (6,), generator=g)
    for temperature in (1.0, 3.0):
        kw = dict(temperature=temperature, reduction="none", divergence="kl")
        got = fastdistill.codistill_loss(a, b, labels, backend=backend, **kw)
        want = fastdistill.codistill_loss(a.double(), b.double(), labels, backend="reference", **kw)
        for x, y in zip(got, want):
            # T = 3: s / T itself carries the rounding of float32 at 3e3 (as F.log_softmax(s / 3) does)
            torch.testing.assert_close(x.double(), y, rtol=2e-5 if temperature == 1 else 1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew", [0.0, 1e-40, 1e-3])
def test_skew_near_zero_gradients_stay_finite(backend, divergence, skew):
    """skew = 0 is allowed (0 <= skew < 1) and is plain KL / reverse KL. With log-ratios past float32's exp range
    (logits 60 apart at T = 0.5), the gradient used to form P/M alone (unbounded at skew 0; inf) and multiply it by
    an underflowed probability: NaN. It now uses the mixture's shares, which lie in [0, 1]."""
    g = torch.Generator().manual_seed(4)
    s = (30 * torch.randn(6, 37, generator=g, dtype=torch.float64)).float()
    ts = [(30 * torch.randn(6, 37, generator=g, dtype=torch.float64)).float()]
    kw = dict(divergence=divergence, skew=skew, temperature=0.5)
    loss, grads = _grads(s, ts, backend=backend, **kw)
    want_loss, want_grads = reference64(s, ts, teacher_grad=True, reduction="none", **kw)
    assert all(torch.isfinite(x).all() for x in (loss, *grads)), f"{backend}: non-finite loss or gradient"
    # logits / T up to ~400: float32 holds them to ~3e-5, so probabilities and gradients (<= 1) carry that much
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    if skew == 0:  # the same gradients as the divergence it reduces to, on the same backend
        plain = {"skew_kl": "kl", "skew_reverse_kl": "reverse_kl"}[divergence]
        _, plain_grads = _grads(s, ts, backend=backend, divergence=plain, temperature=0.5)
        for got, want in zip(grads, plain_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", [p for p in KD_BACKENDS if p != "reference"])
@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl"])
def test_skew_zero_is_the_plain_divergence_on_infinite_rows(backend, divergence):
    """At skew 0 the mixture is the other distribution itself: a row whose loss is +inf (the mixture 0 where the
    outer distribution has mass: the teacher padded with -inf under skew_reverse_kl, the student under skew_kl) gets
    the loss and gradients of reverse_kl / kl on the same backend, not 0/0 = NaN."""
    s, ts = make_inputs((4,), 23, 2)
    for t in ts:
        t[1, -3:] = -math.inf  # teacher padding where the student has mass
    s[2, :2] = -math.inf  # student -inf where the teachers have mass
    plain = {"skew_kl": "kl", "skew_reverse_kl": "reverse_kl"}[divergence]
    loss, grads = _grads(s, ts, divergence=divergence, skew=0.0, backend=backend)
    want_loss, want_grads = _grads(s, ts, divergence=plain, backend=backend)
    assert torch.isinf(loss).any()
    torch.testing.assert_close(loss, want_loss, equal_nan=True)
    ref_loss, _ = reference64(s, ts, divergence=divergence, skew=0.0, reduction="none")  # the loss is specified
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl"])
def test_codistill_skew_zero_gradients_stay_finite(backend, divergence):
    g = torch.Generator().manual_seed(5)
    a = (30 * torch.randn(5, 29, generator=g, dtype=torch.float64)).float()
    b = (30 * torch.randn(5, 29, generator=g, dtype=torch.float64)).float()
    kw = dict(divergence=divergence, skew=0.0, temperature=0.5, reduction="sum")
    got = _codistill_grads(a, b, backend=backend, **kw)
    want = _codistill_grads(a.double(), b.double(), backend="reference", **kw)
    for x, y in zip(got, want):
        assert torch.isfinite(x).all(), f"{backend}: non-finite gradient"
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-4)


def _codistill_grads(a, b, **kw):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss_ab, loss_ba = fastdistill.codistill_loss(a, b, **kw)
    return torch.autograd.grad(loss_ab + 0.7 * loss_ba, [a, b])


# ---- extreme weights and arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_huge_teacher_weights_normalise_without_overflow(backend):
    s, ts = make_inputs((5,), 9, 2)
    want = fastdistill.kd_loss(s, ts, teacher_weights=[1.0, 1.0], backend=backend)
    got = fastdistill.kd_loss(s, ts, teacher_weights=[3e38, 3e38], backend=backend)
    torch.testing.assert_close(got, want)
    p = fastdistill.ensemble_soft_targets(ts, teacher_weights=torch.tensor([3e38, 1e38]))
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    torch.testing.assert_close(p, fastdistill.ensemble_soft_targets(ts, teacher_weights=[3.0, 1.0]))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=1e300), "temperature must be finite and in"),
        (dict(temperature=1e-300), "temperature must be finite and in"),
        (dict(ignore_index=2**70), "ignore_index must fit in int64"),
        (dict(num_items=torch.tensor(math.nan)), "num_items must be finite"),
        (dict(num_items=torch.tensor(math.inf)), "num_items must be finite"),
    ],
)
def test_argument_errors_name_the_argument(kw, match):
    s, ts = make_inputs((3,), 5, 1)
    with pytest.raises(ValueError, match=match):
        fastdistill.kd_loss(s, ts, **kw)
    with pytest.raises(ValueError, match=match):
        fastdistill.codistill_loss(s, ts[0], **kw)


def test_mi_alpha_tensor_baseline_must_be_finite():
    u, v = torch.randn(6, 4), torch.randn(6, 4)
    for bad in (math.inf, -math.inf, math.nan):
        a = torch.zeros(6)
        a[2] = bad
        with pytest.raises(ValueError, match="log_baseline must be finite"):
            fastdistill.mi_alpha(u, v, log_baseline=a)


def test_mi_alpha_loss_checks_feature_widths():
    mi = fastdistill.MIAlphaLoss(3, 5, proj_dim=4)
    with pytest.raises(ValueError, match="student_hidden has width D = 4, but this MIAlphaLoss was built for "
                                         "student_dim = 3"):  # fmt: skip
        mi(torch.randn(6, 4), torch.randn(6, 5))
    with pytest.raises(ValueError, match="teacher_hidden has width D = 3, .* teacher_dim = 5"):
        mi(torch.randn(2, 6, 3), torch.randn(2, 6, 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mi_alpha_nan_feature_gives_nan(backend):
    u, v = torch.randn(8, 4), torch.randn(8, 4)
    u[3, 1] = math.nan
    u.requires_grad_()
    est = fastdistill.mi_alpha(u, v, backend=backend)
    (g,) = torch.autograd.grad(est, u)
    assert torch.isnan(est) and torch.isnan(g).any()


@requires_triton
def test_triton_op_with_no_classes_sums_zeros_not_garbage():
    """V = 0 through torch.ops (the functional API rejects it): no program runs, so the rows must be zeros, not
    uninitialised memory summed into the loss."""
    from fastdistill.ops.triton.kd_loss import kd_loss_triton

    s = torch.empty(3, 0)
    t = torch.empty(1, 3, 0)
    for _ in range(3):  # reuse of freed memory is what would expose garbage
        torch.full((64,), 7.0).sum()
        loss, _, _ = kd_loss_triton(s, [t], None, None, None, None, "kl", "prob_mean", 1.0, 1.0, 0.0, [], -100, False,
                                    False, False)  # fmt: skip
        assert torch.equal(loss, torch.zeros(3))
