"""kd_loss backends against the float64 reference: values and gradients, every option of SPEC §1."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DIVERGENCES,
    ENSEMBLES,
    KD_BACKENDS,
    REDUCTIONS,
    loss_and_grads,
    make_inputs,
    matrix_params,
    reference64,
    requires_triton,
)
from tolerances import assert_close

import fastdistill


def _compare(backend, student, teachers, dtype=torch.float32, grad_output=None, teacher_grad=False, grad_floor=None,
             **kw):  # fmt: skip
    loss, grads = loss_and_grads(student, teachers, grad_output, teacher_grad, backend=backend, **kw)
    ref_loss, ref_grads = reference64(student, teachers, grad_output, teacher_grad, **kw)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype
    assert_close(loss, ref_loss, dtype, "loss", f"{backend} loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == (student.dtype if i == 0 else teachers[i - 1].dtype)
        assert_close(g, r, dtype, "grad", f"{backend} grad[{i}]", grad_floor if i > 0 else None)
    return loss, grads


def _full_options(lead, k, vocab):
    """Labels with ignored rows, per-row teacher weights, sample weights: everything at once."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels.view(-1)[::3] = -100
    weights = torch.rand(k, *lead, generator=g) + 0.1
    sample_weight = torch.rand(lead, generator=g)
    return labels, weights, sample_weight


# every case on cpu and reference; in Triton's interpreter (~8 s a case on 2 cores) a quarter of them, in which each
# (divergence, ensemble, gradients) case meets one reduction and each reduction meets every divergence and ensemble
@pytest.mark.parametrize("teacher_grad,divergence,ensemble,reduction,backend",
                         matrix_params(KD_BACKENDS, ("grads", ("student", "co")), ("divergence", DIVERGENCES),
                                       ("ensemble", ENSEMBLES), ("reduction", REDUCTIONS)))  # fmt: skip
def test_matrix(backend, divergence, ensemble, reduction, teacher_grad):
    teacher_grad = teacher_grad == "co"
    lead, k, vocab = (2, 5), 3, 37
    student, teachers = make_inputs(lead, vocab, k)
    labels, weights, sample_weight = _full_options(lead, k, vocab)
    go = torch.rand(lead) + 0.5 if reduction == "none" else torch.tensor(0.7)
    _compare(
        backend, student, teachers, grad_output=go, teacher_grad=teacher_grad, divergence=divergence,
        ensemble=ensemble, reduction=reduction, temperature=2.0, labels=labels, ce_weight=0.25,
        teacher_weights=weights, sample_weight=sample_weight, beta=0.3, skew=0.2,
    )  # fmt: skip


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_float64_plain(backend, divergence, k):
    """No labels or weights, T = 1, float64 throughout: the cpu kernel is exact to rounding."""
    student, teachers = make_inputs((9,), 41, k, dtype=torch.float64)
    _compare(backend, student, teachers, torch.float64, teacher_grad=True, divergence=divergence)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_teacher_forms_agree(backend, ensemble):
    """One stacked [K, *, V] tensor, a list and a tuple are the same K teachers; one tensor [*, V] is K = 1."""
    student, teachers = make_inputs((4, 3), 19, 3)
    kw = dict(ensemble=ensemble, temperature=1.5, backend=backend)
    a = fastdistill.kd_loss(student, torch.stack(teachers), **kw)
    b = fastdistill.kd_loss(student, teachers, **kw)
    c = fastdistill.kd_loss(student, tuple(teachers), **kw)
    assert torch.equal(a, b) and torch.equal(b, c)
    single = fastdistill.kd_loss(student, teachers[0], **kw)
    assert torch.equal(single, fastdistill.kd_loss(student, teachers[:1], **kw))


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_stacked_teacher_gradients(backend):
    student, teachers = make_inputs((5,), 13, 2)
    stacked = torch.stack(teachers).requires_grad_(True)
    s = student.clone().requires_grad_(True)
    fastdistill.kd_loss(s, stacked, divergence="jsd", backend=backend).backward()
    _, ref = reference64(student, teachers, teacher_grad=True, divergence="jsd")
    assert_close(stacked.grad, torch.stack(ref[1:]), torch.float32, "grad")


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_teacher_weight_forms(backend):
    """[K] weights, a list of K numbers and the same weights broadcast to [K, *] agree; weights are normalised."""
    student, teachers = make_inputs((3, 4), 17, 3)
    w = torch.tensor([1.0, 2.0, 5.0])
    kw = dict(backend=backend, ensemble="logit_mean")
    a = fastdistill.kd_loss(student, teachers, teacher_weights=w, **kw)
    b = fastdistill.kd_loss(student, teachers, teacher_weights=[2.0, 4.0, 10.0], **kw)
    c = fastdistill.kd_loss(student, teachers, teacher_weights=w[:, None, None].expand(3, 3, 4), **kw)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    # a weight of 0 removes the teacher entirely
    d = fastdistill.kd_loss(student, teachers, teacher_weights=[1.0, 0.0, 0.0], **kw)
    torch.testing.assert_close(d, fastdistill.kd_loss(student, teachers[0], **kw))


def test_teacher_weights_as_numbers_are_checked_on_the_host(monkeypatch):
    """Weights given as numbers are checked in Python, so a call makes no data-dependent check on the device (each
    would synchronise a GPU's stream on every call); a tensor of weights still is; the bad values raise the same."""
    from fastdistill import functional

    checked = []
    original = functional._check_values
    monkeypatch.setattr(functional, "_check_values", lambda name, *a: (checked.append(name), original(name, *a)))
    student, teachers = make_inputs((3, 4), 17, 2)
    fastdistill.kd_loss(student, teachers, teacher_weights=[1.0, 3.0], backend="reference")
    assert "teacher_weights" not in checked
    fastdistill.kd_loss(student, teachers, teacher_weights=torch.tensor([1.0, 3.0]), backend="reference")
    assert checked.count("teacher_weights") == 2
    for bad, msg in (([1.0, math.nan], "finite and >= 0"), ([2.0, -1.0], "finite and >= 0"),
                     ([0.0, 0.0], "positive in every row"), ([1.0, 2.0, 3.0], r"\[K\] = \[2\]")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            fastdistill.kd_loss(student, teachers, teacher_weights=bad)


def test_constructors_check_what_they_can_and_ensemble_errors_name_their_arguments():
    """KDLoss / CodistillLoss check their weights at construction (SPEC: hyper-parameters checked on construction),
    not at the first forward; ensemble_soft_targets names its own arguments."""
    for kw, err, said in ((dict(teacher_weights=[1.0, -1.0]), ValueError, "finite and >= 0"),
                          (dict(teacher_weights=[0.0, 0.0]), ValueError, "positive in every row"),
                          (dict(teacher_weights="uniform"), TypeError, "sequence of K numbers"),
                          (dict(teacher_weights=torch.tensor([1, 2])), TypeError, "floating-point")):  # fmt: skip
        with pytest.raises(err, match=said):
            fastdistill.KDLoss(**kw)
    for kw, err, said in ((dict(weight_ab=-1.0), ValueError, "weight_ab must be finite"),
                          (dict(weight_ba="x"), TypeError, "weight_ba must be a real number"),
                          (dict(hard_weight=(1.0, 2.0, 3.0)), ValueError, "a float or a pair")):  # fmt: skip
        with pytest.raises(err, match=said):
            fastdistill.CodistillLoss(**kw)
    with pytest.raises(ValueError, match="teacher_logits is empty"):
        fastdistill.ensemble_soft_targets([])
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] is on meta but teacher_logits\[0\] is on cpu"):
        fastdistill.ensemble_soft_targets([torch.randn(2, 5), torch.randn(2, 5, device="meta")])


def test_kdloss_weights_tensor_moves_with_the_module():
    """KDLoss(teacher_weights=tensor) keeps the tensor as a non-persistent buffer: loss_fn.to(device) (as
    DistillationLoop does) moves it with the module, and checkpoints of a model holding the loss do not change."""
    w = torch.tensor([1.0, 3.0])
    loss_fn = fastdistill.KDLoss(teacher_weights=w)
    assert "teacher_weights" in dict(loss_fn.named_buffers()) and "teacher_weights" not in loss_fn.state_dict()
    assert loss_fn.to("meta").teacher_weights.device.type == "meta"
    assert fastdistill.KDLoss(teacher_weights=[1.0, 3.0]).teacher_weights == [1.0, 3.0]
    student, teachers = make_inputs((3, 4), 17, 2)
    moved = fastdistill.KDLoss(teacher_weights=w).to("cpu")
    torch.testing.assert_close(moved(student, teachers), fastdistill.kd_loss(student, teachers, teacher_weights=w))
    # .half() / .to(bfloat16) on the loss (or a module holding it) keeps the weights' dtype: 1/3 in bfloat16 is 0.334
    w = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: torch.nn.Sequential(m).bfloat16()[0]):
        kept = cast(fastdistill.KDLoss(teacher_weights=w)).teacher_weights
        assert kept.dtype == torch.float64 and torch.equal(kept, w)


def test_a_weights_tensor_is_checked_once_until_it_changes(monkeypatch):
    """A tensor of weights used again (KDLoss(teacher_weights=tensor), or the same tensor on every call) is checked on
    its first use only (the checks are two syncs per call on CUDA); an in-place change, another accumulation dtype,
    an inference tensor or a caller's values_checked() make it checked again; bad values still raise."""
    from fastdistill import functional

    checked = []
    original = functional._check_values
    monkeypatch.setattr(functional, "_check_values", lambda name, *a: (checked.append(name), original(name, *a)))
    student, teachers = make_inputs((3, 4), 17, 2)
    w = torch.tensor([1.0, 3.0])
    loss_fn = fastdistill.KDLoss(teacher_weights=w, backend="reference")
    first = loss_fn(student, teachers)
    assert checked.count("teacher_weights") == 2
    torch.testing.assert_close(loss_fn(student, teachers), first)
    fastdistill.kd_loss(student, teachers, teacher_weights=w, backend="reference")
    assert checked.count("teacher_weights") == 2  # the same tensor, unchanged: not checked again
    fastdistill.kd_loss(student.double(), [t.double() for t in teachers], teacher_weights=w, backend="reference")
    assert checked.count("teacher_weights") == 4  # checked in float64 now
    w[1] = 1.0  # an in-place change: checked again, and the loss follows the new weights
    changed = loss_fn(student, teachers)
    assert checked.count("teacher_weights") == 6
    assert not torch.allclose(changed, first)
    w[1] = -1.0
    with pytest.raises(ValueError, match="teacher_weights must be finite and >= 0"):
        loss_fn(student, teachers)
    with torch.no_grad():
        w.fill_(0.0)  # in-place under no_grad bumps the version counter too
    with pytest.raises(ValueError, match="teacher_weights must be positive in every row"):
        loss_fn(student, teachers)
    # vouched for by a caller: skipped, and not remembered as checked
    v = torch.tensor([2.0, 1.0])
    with functional.values_checked("teacher_weights"):
        fastdistill.kd_loss(student, teachers, teacher_weights=v, backend="reference")
    before = checked.count("teacher_weights")
    fastdistill.kd_loss(student, teachers, teacher_weights=v, backend="reference")
    assert checked.count("teacher_weights") == before + 2
    # inference tensors have no version counter: checked on every call
    with torch.inference_mode():
        u = torch.tensor([1.0, 1.0])
    for _ in range(2):
        fastdistill.kd_loss(student, teachers, teacher_weights=u, backend="reference")
    assert checked.count("teacher_weights") == before + 6
    # a new tensor at a checked, dead tensor's address (CPython reuses them) is not taken for it
    for _ in range(3):
        good = torch.tensor([1.0, 1.0])
        fastdistill.kd_loss(student, teachers, teacher_weights=good, backend="reference")
        del good
        bad = torch.tensor([math.inf, 1.0])
        with pytest.raises(ValueError, match="finite"):
            fastdistill.kd_loss(student, teachers, teacher_weights=bad, backend="reference")
        del bad


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(backend, reduction):
    """No valid row: loss 0, zero gradients, never nan."""
    student, teachers = make_inputs((2, 3), 11, 2)
    labels = torch.full((2, 3), -100)
    loss, grads = loss_and_grads(student, teachers, teacher_grad=True, labels=labels, ce_weight=0.5,
                                 reduction=reduction, backend=backend)  # fmt: skip
    assert not torch.isnan(loss).any() and torch.all(loss == 0)
    for g in grads:
        assert torch.all(g == 0)


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_ignored_rows_and_mean_denominator(backend):
    """mean divides by the rows not ignored; num_items (int or 0-dim tensor) replaces that count."""
    student, teachers = make_inputs((6,), 9, 1)
    labels = torch.tensor([1, -100, 2, 3, -100, 4])
    rows = fastdistill.kd_loss(student, teachers, labels=labels, reduction="none", backend=backend)
    assert torch.all(rows[labels == -100] == 0)
    total = rows.sum()
    mean = fastdistill.kd_loss(student, teachers, labels=labels, backend=backend)
    torch.testing.assert_close(mean, total / 4)
    for n in (10, torch.tensor(10)):
        torch.testing.assert_close(fastdistill.kd_loss(student, teachers, labels=labels, num_items=n,
                                                       backend=backend), total / 10)  # fmt: skip
    torch.testing.assert_close(fastdistill.kd_loss(student, teachers, labels=labels, reduction="sum",
                                                   backend=backend), total)  # fmt: skip
    # a floating num_items is used as it is, below 1 too: num_items=w.sum() is the weighted mean at any scale of w
    w = torch.tensor([0.01, 0.02, 0.0, 0.005, 0.03, 0.015])
    rows_w = fastdistill.kd_loss(student, teachers, labels=labels, sample_weight=w, reduction="none", backend=backend)
    for scale in (1.0, 100.0):
        torch.testing.assert_close(fastdistill.kd_loss(student, teachers, labels=labels, sample_weight=w * scale,
                                                       num_items=(w * scale).sum(), backend=backend),
                                   rows_w.sum() / w.sum())  # fmt: skip
    # a different ignore_index
    labels7 = torch.where(labels == -100, 7, labels)
    torch.testing.assert_close(
        fastdistill.kd_loss(student, teachers, labels=labels7, ignore_index=7, backend=backend), mean
    )


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_batchmean_and_leading_shapes(backend):
    """[B, T, V]: batchmean divides by B (torch's meaning), mean by B*T, none keeps [B, T]."""
    student, teachers = make_inputs((3, 4), 10, 2)
    rows = fastdistill.kd_loss(student, teachers, reduction="none", backend=backend)
    assert rows.shape == (3, 4)
    torch.testing.assert_close(fastdistill.kd_loss(student, teachers, reduction="batchmean", backend=backend),
                               rows.sum() / 3)  # fmt: skip
    torch.testing.assert_close(fastdistill.kd_loss(student, teachers, backend=backend), rows.sum() / 12)
    flat = fastdistill.kd_loss(student.reshape(12, 10), [t.reshape(12, 10) for t in teachers], reduction="none",
                               backend=backend)  # fmt: skip
    torch.testing.assert_close(flat, rows.reshape(12))


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_matches_torch_kl_div_and_cross_entropy(backend):
    """Single teacher, KL at temperature T with T^2 = Hinton's loss; ce_weight = 1 is F.cross_entropy."""
    student, (teacher,) = make_inputs((8,), 21, 1)
    t = 3.0
    hinton = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                      log_target=True) * t * t  # fmt: skip
    torch.testing.assert_close(fastdistill.kd_loss(student, teacher, temperature=t, backend=backend), hinton)
    raw = fastdistill.kd_loss(student, teacher, temperature=t, scale_by_temperature_sq=False, backend=backend)
    torch.testing.assert_close(raw, hinton / (t * t))
    labels = torch.randint(0, 21, (8,))
    labels[2] = -100
    ce = fastdistill.kd_loss(student, teacher, labels=labels, ce_weight=1.0, temperature=t, backend=backend)
    torch.testing.assert_close(ce, F.cross_entropy(student, labels))
    mix = fastdistill.kd_loss(student, teacher, labels=labels, ce_weight=0.3, temperature=t, backend=backend)
    kd_valid = fastdistill.kd_loss(student, teacher, labels=labels, temperature=t, backend=backend)
    torch.testing.assert_close(mix, 0.7 * kd_valid + 0.3 * F.cross_entropy(student, labels))


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_sample_weight(backend):
    student, teachers = make_inputs((5,), 12, 2)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0])
    rows = fastdistill.kd_loss(student, teachers, reduction="none", backend=backend)
    weighted = fastdistill.kd_loss(student, teachers, reduction="none", sample_weight=w, backend=backend)
    torch.testing.assert_close(weighted, rows * w)
    # mean still divides by the number of valid rows (weights are not renormalised)
    torch.testing.assert_close(fastdistill.kd_loss(student, teachers, sample_weight=w, backend=backend),
                               (rows * w).sum() / 5)  # fmt: skip
    _compare(backend, student, teachers, sample_weight=w, teacher_grad=True, divergence="tvd")


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("vocab", [1, 3, 8, 9, 1025, 50257])
def test_odd_vocab(backend, vocab):
    rows = 2 if vocab > 1000 else 5
    student, teachers = make_inputs((rows,), vocab, 2)
    for divergence in ("kl", "jsd") if vocab > 1000 else DIVERGENCES:
        loss, _ = _compare(backend, student, teachers, divergence=divergence, temperature=1.3, teacher_grad=True)
        if vocab == 1:  # one class: P = Q = 1
            assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ensemble", ENSEMBLES)
@pytest.mark.parametrize("student_padded", [False, True], ids=["teachers", "both"])
def test_padded_vocab(backend, divergence, ensemble, student_padded):
    """-inf columns in the teachers (padded vocabularies) get probability 0, and the loss stays finite; so do
    columns padded in the student and the teachers alike."""
    student, teachers = make_inputs((4,), 23, 2)
    teachers[0][:, 18:] = -math.inf
    teachers[1][:, 20:] = -math.inf
    teachers[1][0, 3] = -math.inf
    if student_padded:
        student[:, 20:] = -math.inf
    if divergence == "reverse_kl":  # Q log(Q / P) is +inf where only P is 0: pad the student alike
        student[:, 18:] = -math.inf
        student[0, 3] = -math.inf
    loss, _ = _compare(backend, student, teachers, divergence=divergence, ensemble=ensemble, teacher_grad=True)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_student_neg_inf_where_target_has_mass(backend):
    """KL is +inf (its true value) when the student gives 0 to a class the teacher doesn't: never nan."""
    student, teachers = make_inputs((3,), 7, 1)
    student[1, 2] = -math.inf
    loss = fastdistill.kd_loss(student, teachers, backend=backend, reduction="none")
    assert loss[1].item() == math.inf and torch.isfinite(loss[[0, 2]]).all()
    # reverse KL puts Q first: Q = 0 there contributes nothing
    rkl = fastdistill.kd_loss(student, teachers, backend=backend, reduction="none", divergence="reverse_kl")
    assert torch.isfinite(rkl).all()


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_huge_logits(backend, divergence):
    """Logits of magnitude 1e4: probabilities underflow to exact zeros, the loss must not."""
    student, teachers = make_inputs((4,), 16, 3, scale=1e4)
    # Row losses reach ~1e4 nats; a teacher gradient is a difference of terms of that size (r hp - P sum r hp),
    # so float32 resolves it to ~1e4 * eps: judge gradients on that scale.
    rows = fastdistill.kd_loss(student.double(), teachers, divergence=divergence, reduction="none",
                               backend="reference")  # fmt: skip
    loss, _ = _compare(backend, student, teachers, divergence=divergence, teacher_grad=True,
                       grad_floor=rows.abs().max().item() / 4)  # fmt: skip
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "skew_kl", "skew_reverse_kl"])
def test_dominant_class_far_from_zero(backend, divergence):
    """Pins how log Q and log P are formed: (x / T - max) - log(sum exp(x / T - max)), never x / T - lse. Rows
    where one class holds 0.5-0.9 of the mass and the logits sit near 50: the rounding of lse (ulp ~4e-6) would shift
    every log-probability and so 1 - Q at the top class, putting float32 gradients (student's and teacher's) up to
    7x past the tolerance, where the split form (and the CPU kernel's e / sum) stays under 0.4x of it."""
    vocab, rows = 37, 8
    i = torch.arange(vocab, dtype=torch.float64)
    r = torch.arange(rows, dtype=torch.float64)[:, None]  # a different offset per row: varied rounding of lse
    student = torch.sin(1.3 * i + r) + 50.0 + 1.7 * r
    student[:, 3] += 5.0  # the dominant class
    teacher = student + 0.5 * torch.cos(0.9 * i + r)
    _compare(backend, student.float(), [teacher.float()], teacher_grad=True, divergence=divergence)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mixture_that_underflows_under_the_student(backend, divergence):
    """prob_mean of 2 teachers that both put ~e^-150 on some columns where the student does not: the mixture P
    underflows float32 there while Q does not. Reverse KL and skew reverse KL weigh log P by Q, so their kernels form
    log P in log space (divergences.py: log_target); the others may take the log of the float32 sum (Triton), whose
    underflow their terms do not see. Every divergence must match the float64 reference, finite."""
    vocab = 40
    g = torch.Generator().manual_seed(3)
    student = torch.randn(6, vocab, generator=g)
    teachers = [torch.randn(6, vocab, generator=g) * 0.5 for _ in range(2)]
    for t in teachers:
        t[:, :5] -= 150.0  # P ~ e^-150 < float32's smallest normal (e^-87) in columns 0-4
    loss, _ = _compare(backend, student, teachers, teacher_grad=True, divergence=divergence, ensemble="prob_mean",
                       temperature=1.0)  # fmt: skip
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_half_precision(backend, dtype, divergence):
    """bf16/fp16 logits: float32 loss, gradients in the input dtype, accurate to that dtype's rounding."""
    student, teachers = make_inputs((6, 3), 29, 2, dtype=dtype)
    labels = torch.randint(0, 29, (6, 3))
    _compare(backend, student, teachers, dtype, teacher_grad=True, divergence=divergence, temperature=2.0,
             labels=labels, ce_weight=0.1)  # fmt: skip


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_mixed_dtypes(backend):
    """Student and teachers may differ in dtype; a float64 input makes the whole computation float64."""
    student, teachers = make_inputs((5,), 14, 2)
    mixed = [teachers[0].bfloat16(), teachers[1].half()]
    _compare(backend, student, mixed, torch.bfloat16, teacher_grad=True, divergence="skew_kl")
    loss = fastdistill.kd_loss(student, [teachers[0].double(), teachers[1]], backend=backend)
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_non_contiguous_inputs(backend):
    student, teachers = make_inputs((6,), 40, 2)
    s_nc = student[:, ::2]  # unit stride broken along V
    t_nc = [t[:, ::2] for t in teachers]
    rows_view = [t[::2] for t in teachers]  # row stride 2V, unit stride along V
    _compare(backend, s_nc, t_nc, teacher_grad=True)
    _compare(backend, student[::2], rows_view, teacher_grad=True)


def test_loss_mean_equals_prob_mean_gradient_for_kl():
    """SPEC §1: under forward KL, loss_mean and prob_mean differ by a constant; the student gradient is the same."""
    student, teachers = make_inputs((5,), 12, 3, dtype=torch.float64)
    _, g_loss = loss_and_grads(student, teachers, ensemble="loss_mean", backend="reference")
    _, g_prob = loss_and_grads(student, teachers, ensemble="prob_mean", backend="reference")
    torch.testing.assert_close(g_loss[0], g_prob[0])
    _, g_rkl_loss = loss_and_grads(student, teachers, ensemble="loss_mean", divergence="reverse_kl",
                                   backend="reference")  # fmt: skip
    _, g_rkl_prob = loss_and_grads(student, teachers, ensemble="prob_mean", divergence="reverse_kl",
                                   backend="reference")  # fmt: skip
    assert not torch.allclose(g_rkl_loss[0], g_rkl_prob[0])


def test_divergence_definitions():
    """The reference formulas against direct evaluations of SPEC §1's definitions, in float64."""
    student, (teacher,) = make_inputs((4,), 9, 1, dtype=torch.float64)
    p, q = teacher.softmax(-1), student.softmax(-1)

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)

    beta, alpha = 0.3, 0.2
    m = beta * p + (1 - beta) * q
    expected = {
        "kl": kl(p, q),
        "reverse_kl": kl(q, p),
        "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m),
        "tvd": 0.5 * (p - q).abs().sum(-1),
        "skew_kl": kl(p, alpha * p + (1 - alpha) * q),
        "skew_reverse_kl": kl(q, (1 - alpha) * p + alpha * q),
    }
    for name, value in expected.items():
        got = fastdistill.kd_loss(student, teacher, divergence=name, beta=beta, skew=alpha, reduction="none",
                                  backend="reference")  # fmt: skip
        torch.testing.assert_close(got, value, msg=name)
    # skew = 0 is plain KL; jsd is symmetric at beta = 1/2
    torch.testing.assert_close(
        fastdistill.kd_loss(student, teacher, divergence="skew_kl", skew=0.0, backend="reference"),
        fastdistill.kd_loss(student, teacher, divergence="kl", backend="reference"),
    )
    torch.testing.assert_close(
        fastdistill.kd_loss(student, teacher, divergence="jsd", backend="reference"),
        fastdistill.kd_loss(teacher, student, divergence="jsd", backend="reference"),
    )


def test_ensembles_and_soft_targets():
    _, teachers = make_inputs((3, 2), 8, 3, dtype=torch.float64)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    t = 2.0
    mix = sum(wk * (tk / t).softmax(-1) for wk, tk in zip(w, teachers))
    torch.testing.assert_close(fastdistill.ensemble_soft_targets(teachers, temperature=t, teacher_weights=w), mix)
    pooled = (sum(wk * tk for wk, tk in zip(w, teachers)) / t).softmax(-1)
    got = fastdistill.ensemble_soft_targets(teachers, temperature=t, teacher_weights=w, ensemble="logit_mean")
    torch.testing.assert_close(got, pooled)
    one = fastdistill.ensemble_soft_targets([teachers[0]], temperature=t)
    torch.testing.assert_close(one, (teachers[0] / t).softmax(-1))
    with pytest.raises(ValueError, match="ensemble"):
        fastdistill.ensemble_soft_targets(teachers, ensemble="loss_mean")


def test_stacked_teachers_mean_k_teachers_everywhere():
    """A stacked [K, *, V] tensor is K teachers for kd_loss and ensemble_soft_targets alike; labels are
    positional in kd_loss, as in F.cross_entropy, KDLoss and codistill_loss."""
    s, teachers = make_inputs((3, 2), 8, 3, dtype=torch.float64)
    stacked = torch.stack(teachers)
    torch.testing.assert_close(fastdistill.ensemble_soft_targets(stacked, temperature=2.0),
                               fastdistill.ensemble_soft_targets(teachers, temperature=2.0))  # fmt: skip
    torch.testing.assert_close(fastdistill.kd_loss(s, stacked, backend="reference"),
                               fastdistill.kd_loss(s, teachers, backend="reference"))  # fmt: skip
    with pytest.raises(ValueError, match=r"stacked \[K, \*, V\].*\[t\] or t.unsqueeze\(0\)"):
        fastdistill.ensemble_soft_targets(teachers[0][0, 0])
    labels = torch.randint(0, 8, (3, 2))
    torch.testing.assert_close(fastdistill.kd_loss(s, teachers, labels, ce_weight=0.5, backend="reference"),
                               fastdistill.kd_loss(s, teachers, labels=labels, ce_weight=0.5, backend="reference"))


@pytest.mark.parametrize("beta, other", [(0, "kl"), (1, "reverse_kl"), (0.0, "kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_name_the_one_sided_kl(beta, other):
    """TRL and Liger switch to a one-sided KL at beta = 0 / 1; the generalized JSD tends to 0 there: the error
    names the divergence that computes what they mean."""
    s, teachers = make_inputs((3,), 8, 1)
    with pytest.raises(ValueError, match=f"beta must be in \\(0, 1\\).*divergence='{other}'"):
        fastdistill.kd_loss(s, teachers, divergence="jsd", beta=beta)


def test_an_unused_beta_out_of_range_says_it_is_unused():
    """A TRL config's beta = 0 carried over with divergence="kl" (what TRL's beta = 0 is): still refused (a bad
    value is an error whatever the divergence), with a message that says kl does not use beta, not only "use kl"."""
    s, teachers = make_inputs((3,), 8, 1)
    with pytest.raises(ValueError, match="divergence='kl' does not use it; leave beta at its default"):
        fastdistill.kd_loss(s, teachers, divergence="kl", beta=0.0)
    for kw in (dict(beta=2.0), dict(skew=1.0)):  # any out-of-range value of a parameter the divergence does not use
        with pytest.raises(ValueError, match=f"divergence='kl' does not use {next(iter(kw))}"):
            fastdistill.kd_loss(s, teachers, divergence="kl", **kw)
    with pytest.raises(ValueError, match=r"skew must be finite and in \[0.0, 1.0\); got 1.0$"):  # its own: no note
        fastdistill.kd_loss(s, teachers, divergence="skew_kl", skew=1.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_modules_pass_every_setting_on(divergence):
    """KDLoss and FusedLinearKDLoss give what their functions give with the same settings, for every divergence,
    with beta and skew apart from each other and from their defaults (a setting passed on under another name, as
    skew=beta, showed only in a repr)."""
    student, teachers = make_inputs((5,), 13, 2, dtype=torch.float64)
    labels = torch.tensor([0, 3, -100, 12, 7])
    kw = dict(divergence=divergence, temperature=2.0, ce_weight=0.2, beta=0.3, skew=0.25, ensemble="logit_mean",
              teacher_weights=[3.0, 1.0])  # fmt: skip
    torch.testing.assert_close(fastdistill.KDLoss(**kw)(student, teachers, labels),
                               fastdistill.kd_loss(student, teachers, labels=labels, **kw))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(13, 4, dtype=torch.float64, generator=g)
    torch.testing.assert_close(fastdistill.FusedLinearKDLoss(**kw)(h, w, teachers, labels),
                               fastdistill.fused_linear_kd_loss(h, w, teachers, labels, **kw))  # fmt: skip


def test_module_matches_functional():
    student, teachers = make_inputs((4, 2), 15, 2)
    labels = torch.randint(0, 15, (4, 2))
    kw = dict(divergence="jsd", temperature=2.0, ce_weight=0.2, beta=0.4)
    module = fastdistill.KDLoss(**kw)
    torch.testing.assert_close(module(student, teachers, labels), fastdistill.kd_loss(student, teachers,
                                                                                      labels=labels, **kw))
    w = torch.tensor([3.0, 1.0])
    torch.testing.assert_close(module(student, teachers, labels, teacher_weights=w),
                               fastdistill.kd_loss(student, teachers, labels=labels, teacher_weights=w, **kw))
    assert "jsd" in repr(module)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_sixteen_teachers(backend, ensemble):
    student, teachers = make_inputs((3,), 21, 16)
    _compare(backend, student, teachers, ensemble=ensemble, divergence="skew_reverse_kl", teacher_grad=True,
             teacher_weights=torch.rand(16) + 0.05)  # fmt: skip


def test_more_teachers_than_the_kernel_takes():
    """K = 17: auto runs the reference backend (with the one warning), an explicit cpu backend says why not."""
    student, teachers = make_inputs((3,), 9, 17)
    if fastdistill.extension_available():
        with pytest.raises(ValueError, match="at most 16 teachers, got K = 17"):
            fastdistill.kd_loss(student, teachers, backend="cpu")
    expected = fastdistill.kd_loss(student, teachers, backend="reference")
    torch.testing.assert_close(fastdistill.kd_loss(student, teachers), expected)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    """N = 0 rows: loss 0 (or an empty [0]), an empty gradient, never nan."""
    student = torch.randn(0, 7, requires_grad=True)
    loss = fastdistill.kd_loss(student, torch.randn(2, 0, 7), reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert student.grad is not None and student.grad.shape == (0, 7)
    assert not torch.isnan(loss).any()


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_skipped_rows_never_leak_nan(backend):
    """An ignored row (label = ignore_index) or a zero-weight row gives 0 and a zero gradient whatever its logits."""
    student, teachers = make_inputs((4,), 9, 2)
    student[1] = -math.inf  # ignored by label
    student[2, 3] = -math.inf  # zero sample weight; the teachers have mass at 3
    labels = torch.tensor([1, -100, 2, 3])
    weight = torch.tensor([1.0, 1.0, 0.0, 2.0])
    for divergence in DIVERGENCES:
        kw = dict(labels=labels, sample_weight=weight, ce_weight=0.2, divergence=divergence, reduction="none")
        loss, grads = loss_and_grads(student, teachers, teacher_grad=True, backend=backend, **kw)
        assert torch.isfinite(loss).all() and torch.all(loss[1:3] == 0)
        for g in grads:
            assert torch.isfinite(g).all() and torch.all(g[1:3] == 0)


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("ensemble", ENSEMBLES)
def test_zero_weight_teacher_is_dropped(backend, ensemble):
    """A teacher with weight 0 contributes nothing, even where it alone has mass and the student has none, and even
    where its whole row is -inf (per-row weights [K, *] exclude it there)."""
    student, teachers = make_inputs((3,), 8, 2)
    teachers[0][:, 5] = -math.inf
    teachers[1][:, 5] = 10.0  # only teacher 1 has mass in class 5 ...
    student[:, 5] = -math.inf  # ... which the student rules out: KL to teacher 1 would be inf
    teachers[1][2] = -math.inf  # and teacher 1 has no distribution at all in row 2
    w = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss, grads = _compare(backend, student, teachers, teacher_grad=True, ensemble=ensemble, teacher_weights=w,
                           reduction="none")  # fmt: skip
    torch.testing.assert_close(loss, fastdistill.kd_loss(student, teachers[0], reduction="none", backend=backend))
    assert torch.all(grads[2] == 0)


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_pure_cross_entropy_ignores_infinite_divergence(backend):
    """ce_weight = 1 is cross-entropy alone: an infinite divergence (student -inf where the teacher has mass) must not
    turn 0 * inf into nan."""
    student, (teacher,) = make_inputs((3,), 6, 1)
    student[1, 4] = -math.inf
    labels = torch.tensor([0, 1, 2])
    loss, grads = loss_and_grads(student, [teacher], teacher_grad=True, labels=labels, ce_weight=1.0,
                                 reduction="none", backend=backend)  # fmt: skip
    torch.testing.assert_close(loss, F.cross_entropy(student, labels, reduction="none"))
    assert torch.isfinite(grads[0]).all() and torch.all(grads[1] == 0)


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_pure_cross_entropy_reaches_a_teacher_alone_with_zeros(backend):
    """With only the teacher requiring grad, ce_weight = 1 gives it a zero gradient on every backend (the reference
    once had no graph to it there: torch's "does not require grad"), -inf entries included."""
    student, (teacher,) = make_inputs((4,), 6, 1)
    teacher[0, 2] = -math.inf
    teacher.requires_grad_(True)
    loss = fastdistill.kd_loss(student, teacher, labels=torch.tensor([0, 1, 2, 3]), ce_weight=1.0, backend=backend)
    loss.backward()
    assert torch.equal(teacher.grad, torch.zeros_like(teacher))


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_batchmean_of_one_row_follows_torch(backend):
    """batchmean divides by student_logits.shape[0], which for a single [V] row is V (torch's kl_div does too)."""
    student, (teacher,) = make_inputs((), 7, 1)
    total = fastdistill.kd_loss(student, teacher, reduction="sum", backend=backend)
    torch.testing.assert_close(fastdistill.kd_loss(student, teacher, reduction="batchmean", backend=backend),
                               total / 7)  # fmt: skip


def _trl_generalized_jsd(s, t, labels, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (reduction "batchmean", labels given), as its source defines it."""
    ls, lt = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    if beta == 0:
        jsd = torch.nn.functional.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = torch.nn.functional.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        m = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), 0)
        jsd = beta * torch.nn.functional.kl_div(m, lt, reduction="none", log_target=True) + (1 - beta) * (
            torch.nn.functional.kl_div(m, ls, reduction="none", log_target=True))
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def _torchtune_forward_kl(s, t, labels):
    """torchtune's ForwardKLLoss: the soft cross-entropy -sum P log Q, mean over tokens not ignored."""
    x = (t.softmax(-1) * s.log_softmax(-1)).sum(-1)
    mask = labels != -100
    return -(x * mask).sum() / mask.sum()


def test_the_readme_table_of_other_libraries():
    """README "The same loss elsewhere": TRL's generalized JSD (every beta, its endpoints the one-sided KLs) and
    torchtune's ForwardKLLoss (same gradient as KL, value larger by the teacher's entropy), as stated there."""
    s, (t,) = make_inputs((2, 5), 11, 1, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    s = s.requires_grad_()
    for beta, kw in ((0.3, dict(divergence="jsd", beta=0.3)), (0, dict(divergence="kl")),
                     (1, dict(divergence="reverse_kl"))):  # fmt: skip
        ours = fastdistill.kd_loss(s, t, labels, temperature=2.0, scale_by_temperature_sq=False, **kw)
        torch.testing.assert_close(ours, _trl_generalized_jsd(s, t, labels, beta, 2.0))
    tune = _torchtune_forward_kl(s, t, labels)
    ours = fastdistill.kd_loss(s, t, labels)
    entropy = -(t.softmax(-1) * t.log_softmax(-1)).sum(-1)[labels != -100].mean()
    torch.testing.assert_close(tune, ours + entropy)
    torch.testing.assert_close(torch.autograd.grad(tune, s)[0], torch.autograd.grad(ours, s)[0])


def test_the_readme_migration_notes():
    """README's notes under "The same loss elsewhere": TRL's reductions without labels and its "mean", Liger's
    chunked w_h CE + w_s JSD through fused_linear_kd_loss, torch's label smoothing as a uniform teacher."""
    s, (t,) = make_inputs((3, 4), 9, 1, dtype=torch.float64)
    labels = torch.randint(0, 9, (3, 4))
    labels[1, :3] = -100
    n = int((labels != -100).sum())
    for_trl = dict(divergence="jsd", beta=0.3, temperature=2.0, scale_by_temperature_sq=False)
    per_token = fastdistill.kd_loss(s, t, **for_trl, reduction="none")
    # TRL without labels divides the sum by the batch size B: our (torch's) "batchmean"
    torch.testing.assert_close(fastdistill.kd_loss(s, t, **for_trl, reduction="batchmean"), per_token.sum() / 3)
    # its "mean" divides by tokens x V
    torch.testing.assert_close(fastdistill.kd_loss(s, t, labels, **for_trl, num_items=n * 9),
                               _trl_generalized_jsd(s, t, labels, 0.3, 2.0) / 9)  # fmt: skip
    # Liger's chunked base: w_h CE / n + w_s JSD_T / n, CE at T = 1
    h, w = torch.randn(12, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    w_h, w_s = 0.7, 0.6
    logits = (h @ w.T).reshape(3, 4, 9)
    liger = w_h * torch.nn.functional.cross_entropy(logits.reshape(12, 9), labels.reshape(12), reduction="sum") / n
    liger = liger + w_s * _trl_generalized_jsd(logits, t, labels, 0.3, 2.0)
    ours = (w_h + w_s) * fastdistill.fused_linear_kd_loss(h.reshape(3, 4, 5), w, t, labels, **for_trl,
                                                          ce_weight=w_h / (w_h + w_s))  # fmt: skip
    torch.testing.assert_close(ours, liger)
    # label smoothing: a uniform teacher (zero logits), (1 - eps) CE, plus eps log V
    flat, y = s.reshape(12, 9), labels.reshape(12)
    smooth = torch.nn.functional.cross_entropy(flat, y, label_smoothing=0.2)
    torch.testing.assert_close(fastdistill.kd_loss(flat, torch.zeros_like(flat), y, ce_weight=0.8)
                               + 0.2 * math.log(9), smooth)  # fmt: skip


@requires_triton
@pytest.mark.parametrize("tiles,chunks", [("2", 4), ("3", 3)])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_triton_chunks_of_several_tiles(monkeypatch, tiles, chunks, divergence):
    """v3's rows in chunks of several 16-column tiles (Triton's interpreter): V = 100 is 7 tiles, so 4 chunks of 2 or
    3 of 3, the last of one tile in both (its tile range clamped to the row's end); every option at once (labels with
    ignored rows, teacher and sample weights, CE), teacher gradients, grad_output 0.7, against float64."""
    from fastdistill.ops.triton import kd_loss

    monkeypatch.setenv(kd_loss.CHUNK_TILES_ENV, tiles)
    assert kd_loss.row_split(7, 3, 4, 16, torch.device("cpu"), 5)[0] == chunks
    student, teachers = make_inputs((5,), 100, 3)
    labels, weights, sample_weight = _full_options((5,), 3, 100)
    _compare("triton", student, teachers, grad_output=torch.tensor(0.7), teacher_grad=True, divergence=divergence,
             ensemble="loss_mean", temperature=2.0, ce_weight=0.3, labels=labels, teacher_weights=weights,
             sample_weight=sample_weight)  # fmt: skip



@requires_triton
def test_triton_reads_listed_teachers_in_place(monkeypatch):
    """K teachers given as a list reach the Triton kernel as pointer offsets from the first one, not as a stacked
    [K, N, V] copy (K x the logits' bytes, read and written once more a step), in every layout the offsets can take:
    separate tensors; views of one buffer in reverse order (a negative offset), their gradients flowing back to it;
    rows of another stride (stacked instead). One teacher of two requiring grad gets its gradient."""
    from fastdistill.ops.triton import kd_loss

    student, teachers = make_inputs((6,), 40, 2)
    buf = torch.stack(teachers[::-1]).requires_grad_()  # buf[1] is teacher 0, buf[0] teacher 1
    wide = torch.cat([teachers[1], torch.zeros(6, 8)], 1)[:, :40]  # row stride 48, not 40
    kw = dict(divergence="jsd", ensemble="logit_mean", temperature=2.0, backend="triton")
    ref_loss, ref = reference64(student, teachers, torch.tensor(0.7), teacher_grad=True, **kw)
    stacks = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda ts, *a, **k: stacks.append(len(ts)) or real_stack(ts, *a, **k))
    for listed, copies in (([teachers[0], teachers[1]], 0), ([buf[1], buf[0]], 0), ([teachers[0], wide], 1)):
        stacks.clear()
        base, _, offsets = kd_loss.teacher_layout(listed)
        assert len(stacks) == copies and (copies or base is listed[0])
        assert copies or offsets[1] == (listed[1].data_ptr() - listed[0].data_ptr()) // 4
        stacks.clear()
        s = student.clone().requires_grad_()
        loss = fastdistill.kd_loss(s, listed, **kw)
        assert len(stacks) == copies, "the op stacked listed teachers it could read in place"
        (loss * 0.7).backward()
        assert_close(loss, ref_loss, torch.float32, "loss")
        assert_close(s.grad, ref[0], torch.float32, "grad")
    monkeypatch.setattr(torch, "stack", real_stack)
    assert kd_loss.teacher_layout([buf[1], buf[0]])[2] == [0, -240]
    # while torch.compile traces the op there are no pointers: a list is stacked (one copy, inside the graph)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in teachers]
        base, _, offsets = kd_loss.teacher_layout(fakes)
        assert base.shape == (2, 6, 40) and offsets == [0, 240]
    assert_close(buf.grad[1], ref[1], torch.float32, "grad")
    assert_close(buf.grad[0], ref[2], torch.float32, "grad")
    # one of two teachers trained: its gradient, and none for the other
    s, t0, t1 = student.clone().requires_grad_(), teachers[0].clone().requires_grad_(), teachers[1].clone()
    fastdistill.kd_loss(s, [t0, t1], divergence="reverse_kl", backend="triton").backward()
    _, ref = reference64(student, teachers, teacher_grad=True, divergence="reverse_kl")
    assert t1.grad is None
    assert_close(s.grad, ref[0], torch.float32, "grad")
    assert_close(t0.grad, ref[1], torch.float32, "grad")


@requires_triton
def test_triton_writes_only_the_trained_teachers_gradients():
    """The Triton op's grad_teachers is a mask, as the C++ op's: of K teachers the M whose bit is set get one
    [M, N, V] gradient, in teacher order, each what the full mask gives it (the others' are not written, so a
    co-distilled peer beside frozen teachers costs one [N, V] buffer, not K). A stacked [K, N, V] tensor is one
    input: all bits or none."""
    from test_registration import _op_args

    from fastdistill.ops.triton import kd_loss

    assert kd_loss.gradient_slots(0b0100, 4, stacked=False) == [-1, -1, 0, -1]
    assert kd_loss.gradient_slots(0b1010, 4, stacked=False) == [-1, 0, -1, 1]
    op = torch.ops.fastdistill.kd_loss_triton.default
    # none, one (first, middle, last), two apart, three of four teachers; V = 37 (unaligned rows) with JSD, V = 32
    # (aligned) with KL (Triton's interpreter: ~1 s a call)
    for v, div, masks in ((37, "jsd", (0, 0b0001, 0b0100, 0b1000, 0b1010, 0b0111)), (32, "kl", (0b0101,))):
        student, teachers = make_inputs((3,), v, 4)
        kw = dict(divergence=div, ensemble="logit_mean", reduce=False)
        loss, gs, full = op(*_op_args(student, teachers, grad_teachers=0b1111, **kw))
        assert full.shape == (4, 3, v)
        for mask in masks:
            loss_m, gs_m, gt = op(*_op_args(student, teachers, grad_teachers=mask, **kw))
            trained = [k for k in range(4) if mask >> k & 1]
            assert gt.shape == ((len(trained), 3, v) if trained else (0,))
            torch.testing.assert_close(loss_m, loss, rtol=0, atol=0)
            torch.testing.assert_close(gs_m, gs, rtol=0, atol=0)
            for slot, k in enumerate(trained):
                torch.testing.assert_close(gt[slot], full[k], rtol=0, atol=0)
    student, teachers = make_inputs((7,), 37, 4)
    kw = dict(divergence="jsd", ensemble="logit_mean", reduce=False)
    # through autograd: the trained teachers get their gradient, the frozen ones none
    s = student.clone().requires_grad_()
    ts = [t.clone().requires_grad_(k in (1, 3)) for k, t in enumerate(teachers)]
    fastdistill.kd_loss(s, ts, divergence="jsd", ensemble="logit_mean", reduction="sum", backend="triton").backward()
    assert [t.grad is None for t in ts] == [True, False, True, False]
    _, ref = reference64(student, teachers, teacher_grad=True, divergence="jsd", ensemble="logit_mean",
                         reduction="sum")  # fmt: skip
    assert_close(ts[1].grad, ref[2], torch.float32, "grad")
    assert_close(ts[3].grad, ref[4], torch.float32, "grad")
    with pytest.raises(ValueError, match="all 4 bits or none"):
        op(*_op_args(student, [torch.stack(teachers)], grad_teachers=0b0010, **kw))
    with pytest.raises(ValueError, match="a mask of K = 4"):
        kd_loss.gradient_slots(0b10000, 4, stacked=False)


@requires_triton
def test_triton_untrained_teachers_write_nowhere(monkeypatch):
    """An untrained teacher's gradient (slot -1) is not stored anywhere: the gradient buffer, placed between two
    NaN guard bands, keeps them whole (a store mask without the slot test would write one [N, V] band below it)."""
    from test_registration import _op_args

    from fastdistill.ops.triton import kd_loss

    student, teachers = make_inputs((5,), 37, 4)
    bands = []
    real_args = kd_loss.kd_args

    def banded(a):
        c = real_args(a)
        m, n, v = c.gt.shape
        buf = torch.full((m + 2, n, v), float("nan"), dtype=c.gt.dtype)
        bands.append(buf)
        c.gt = buf[1 : m + 1]
        return c

    monkeypatch.setattr(kd_loss, "kd_args", banded)
    op = torch.ops.fastdistill.kd_loss_triton.default
    _, _, gt = op(*_op_args(student, teachers, grad_teachers=0b0100, divergence="jsd", reduce=False))
    (buf,) = bands
    assert gt.shape == (1, 5, 37) and gt.data_ptr() == buf[1].data_ptr() and torch.isfinite(gt).all()
    assert buf[0].isnan().all() and buf[2].isnan().all(), "an untrained teacher's gradient was stored"
