"""Bad input to the core API, from an adversarial review (2026-11-30): each case got a NaN, a crash deep inside, or
a message that named the wrong thing. Now a clear error naming the argument, or the right number."""

import numpy as np
import pytest
import torch

import fastdistill
from fastdistill import FusedLinearKDLoss, TeacherHead, fused_linear_kd_loss


def _st(n=4, v=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=gen), torch.randn(n, v, generator=gen)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_teacher_weights_past_float32s_range_are_normalised_not_nan(backend):
    """Numbers finite in float64 but inf or 0 in float32 (1e39, 1e-46) were cast before normalising: NaN."""
    s, t = _st()
    u = t + 1
    first = fastdistill.kd_loss(s, [t, u], teacher_weights=[1.0, 0.0], backend=backend)
    even = fastdistill.kd_loss(s, [t, u], backend=backend)
    torch.testing.assert_close(fastdistill.kd_loss(s, [t, u], teacher_weights=[1e39, 1.0], backend=backend), first)
    torch.testing.assert_close(fastdistill.kd_loss(s, [t, u], teacher_weights=[1e-46, 1e-46], backend=backend), even)
    big = torch.tensor([1e308, 1e308], dtype=torch.float64)  # a float64 tensor: inf in float32 ("must be finite")
    torch.testing.assert_close(fastdistill.kd_loss(s, [t, u], teacher_weights=big, backend=backend), even)
    p = fastdistill.ensemble_soft_targets([t, u], teacher_weights=[1e308, 1e308])
    torch.testing.assert_close(p, fastdistill.ensemble_soft_targets([t, u]))


def test_num_items_of_bool_or_complex_dtype():
    s, t = _st()
    for bad in (torch.tensor(3 + 0j), torch.tensor(True)):
        with pytest.raises(TypeError, match="num_items must be an integer or floating-point count"):
            fastdistill.kd_loss(s, t, num_items=bad)


def test_codistill_module_names_a_list_given_as_logits_a():
    s, t = _st()
    with pytest.raises(TypeError, match="logits_a must be a Tensor, got list"):
        fastdistill.CodistillLoss()([s], t)


def test_mi_module_hidden_states_and_mask():
    mi = fastdistill.MIAlphaLoss(4, 3, proj_dim=8, pooling="mean")
    hs, ht = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match="student_hidden must be floating point"):
        mi(torch.randint(0, 3, (6, 4)), torch.randn(6, 3))
    with pytest.raises(TypeError, match="student_hidden must be a Tensor"):
        mi(torch.randn(6, 4).numpy(), torch.randn(6, 3))
    with pytest.raises(TypeError, match="attention_mask must be a bool or 0/1 Tensor"):
        mi(hs, ht, [[1] * 5] * 2)
    with pytest.raises(ValueError, match="pooling='cls' takes position 0 of student_hidden"):
        fastdistill.MIAlphaLoss(4, 3, pooling="cls")(torch.randn(3, 0, 4), torch.randn(3, 0, 3))
    # the mask is read as kept / not kept by both poolings: a 0/1 float, an int and a bool mask give one estimate
    # (a weight of 0.5 or -1 was a weighted mean in "mean" pooling and a kept row in "none")
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1]])
    want = mi(hs, ht, keep.bool())
    torch.testing.assert_close(mi(hs, ht, keep), want)
    torch.testing.assert_close(mi(hs, ht, keep.float() * torch.tensor([1.0, 0.5, 1.0, -1.0, 1.0])), want)


def test_mi_module_takes_numpy_integer_dimensions():
    mi = fastdistill.MIAlphaLoss(np.int64(4), np.int32(3), proj_dim=np.int64(8))
    assert (mi.student_dim, mi.teacher_dim) == (4, 3) and type(mi.student_dim) is int
    with pytest.raises(TypeError, match="proj_dim must be a positive int"):
        fastdistill.MIAlphaLoss(4, 3, proj_dim=8.0)


def test_messages_name_the_arguments_of_the_call():
    s, t = _st()
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] has shape \(3, 5\), expected \(4, 5\) like "
                                         r"teacher_logits\[0\]"):  # fmt: skip
        fastdistill.ensemble_soft_targets([t, t[:3]])
    with pytest.raises(ValueError, match="vocabulary size 4 but teacher_logits\\[0\\] has 5; the teachers must"):
        fastdistill.ensemble_soft_targets([t, t[:, :4]])
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"teachers has vocabulary size 4 .* student_head_weight\[:4\]"):
        fused_linear_kd_loss(h, w, t[:, :4])
    with pytest.raises(ValueError, match=r"teachers\[1\] has vocabulary size 4 .* student_head_weight\[:4\]"):
        fused_linear_kd_loss(h, w, [t, t[:, :4]])
    with pytest.raises(TypeError, match=r"teachers\[0\].hidden must be a floating-point Tensor"):
        fused_linear_kd_loss(h, w, TeacherHead(np.ones((4, 2), "f"), torch.randn(5, 2)))
    with pytest.raises(TypeError, match="scale_by_temperature_sq must be a Python bool .* got numpy"):
        fastdistill.kd_loss(s, t, scale_by_temperature_sq=np.bool_(True))


def test_fused_linear_module_checks_at_construction():
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
        FusedLinearKDLoss(chunk_size=0)
    with pytest.raises(TypeError, match="memory_budget_bytes must be None or an int"):
        FusedLinearKDLoss(memory_budget_bytes=1e9)
    with pytest.raises(TypeError, match="accum_dtype must be None or a floating-point torch.dtype"):
        FusedLinearKDLoss(accum_dtype="bf16")
    with pytest.raises(ValueError, match="teacher_weights must be finite and >= 0"):
        FusedLinearKDLoss(teacher_weights=[-1.0, 1.0])
    FusedLinearKDLoss(chunk_size=np.int64(2), memory_budget_bytes=2**20)  # numpy integers are integers


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_constants_that_require_grad_are_refused_not_silently_dropped(backend):
    """sample_weight, teacher_weights and num_items are constants (SPEC §1): a tensor of them that requires grad got
    no gradient and no word (a loss of only such a weight could not even backward). Now a ValueError naming it,
    in every entry point; under no_grad, or detached, they are fine."""
    s, t = _st()
    s.requires_grad_()
    w = torch.rand(4, requires_grad=True)
    tw = torch.rand(2, requires_grad=True)
    n = torch.tensor(3.0, requires_grad=True)
    cases = [
        ("sample_weight", lambda: fastdistill.kd_loss(s, t, sample_weight=w, backend=backend)),
        ("teacher_weights", lambda: fastdistill.kd_loss(s, [t, t + 1], teacher_weights=tw, backend=backend)),
        ("num_items", lambda: fastdistill.kd_loss(s, t, num_items=n, backend=backend)),
        ("teacher_weights", lambda: fastdistill.KDLoss(teacher_weights=tw, backend=backend)(s, [t, t + 1])),
        ("sample_weight", lambda: fastdistill.codistill_loss(s, t.requires_grad_(), sample_weight=w,
                                                              backend=backend)),  # fmt: skip
        ("teacher_weights", lambda: fastdistill.ensemble_soft_targets([t, t + 1], teacher_weights=tw)),
        ("sample_weight", lambda: fused_linear_kd_loss(s, torch.randn(6, 5, requires_grad=True), [torch.randn(4, 6)],
                                                       sample_weight=w, backend=backend)),  # fmt: skip
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name} requires grad, but the loss takes it as a constant"):
            call()
        with torch.no_grad():
            call()
    fastdistill.kd_loss(s, t, sample_weight=w.detach(), num_items=n.detach(), backend=backend).backward()
