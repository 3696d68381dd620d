"""The Triton backend compiled on a GPU (skipped without CUDA): the matrix on CUDA tensors, then LLM-sized shapes
where bf16 results must stay within 2x the error of PyTorch's own bf16 computation (both against float64)."""

import pytest
import torch
from conftest import (
    DIVERGENCES,
    ENSEMBLES,
    every_option_case,
    loss_and_grads,
    make_inputs,
    reference64,
    stacked_trained_peak,
)
from tolerances import assert_close

import fastdistill

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda(student, teachers):
    return student.cuda(), [t.cuda() for t in teachers]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("ensemble", ENSEMBLES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix_cuda(divergence, ensemble, reduction):
    student, teachers, kw, go = every_option_case(divergence, ensemble, reduction)
    ref_loss, ref_grads = reference64(student, teachers, go, True, **kw)
    s, ts = _cuda(student, teachers)
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, grads = loss_and_grads(s, ts, go.cuda(), True, backend="triton", **kw_cuda)
    assert_close(loss, ref_loss, torch.float32, "loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad")


@pytest.mark.parametrize("k", [1, 4])
def test_llm_shapes_bf16_within_2x_of_torch(k):
    """V = 128256, N = 4096 (1024 rows for K = 4: the float64 reference's [K, N, V] temporaries must fit in 80 GB),
    bf16: error vs float64 at most 2x that of eager PyTorch in bf16."""
    n, v, t = (4096 if k == 1 else 1024), 128256, 2.0
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, v, device="cuda", generator=g).bfloat16().requires_grad_()
    tt = torch.randn(k, n, v, device="cuda", generator=g).bfloat16()
    loss = fastdistill.kd_loss(s, tt, temperature=t, backend="triton")
    (grad,) = torch.autograd.grad(loss, s)

    def torch_loss(student, teachers):
        log_q = torch.log_softmax(student / t, -1)
        log_p = torch.logsumexp(torch.log_softmax(teachers / t, -1), 0) - torch.log(torch.tensor(float(k)))
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t

    s64 = s.detach().double().requires_grad_()
    ref = torch_loss(s64, tt.double())
    (ref_grad,) = torch.autograd.grad(ref, s64)
    sb = s.detach().clone().requires_grad_()
    same = torch_loss(sb, tt)
    (same_grad,) = torch.autograd.grad(same, sb)
    assert (loss.double() - ref).abs() <= 2 * (same.double() - ref).abs() + 1e-6
    assert (grad.double() - ref_grad).abs().max() <= 2 * (same_grad.double() - ref_grad).abs().max() + 1e-9


def test_auto_picks_triton_on_cuda():
    student, teachers = _cuda(*make_inputs((4,), 64, 2))
    inp = fastdistill.functional.kd_inputs(
        student, teachers, divergence="kl", temperature=1.0, scale_by_temperature_sq=True, ensemble="prob_mean",
        teacher_weights=None, beta=0.5, skew=0.1, labels=None, ignore_index=-100, ce_weight=0.0, sample_weight=None,
        reduction="mean", num_items=None, backend="auto",
    )  # fmt: skip
    assert fastdistill.ops.dispatch.select("auto", inp).name == "triton"


@pytest.mark.parametrize("form", ["stacked", "list"])
def test_compile_traces_into_triton(form):
    """Traced, a stacked tensor is read in place and a list is stacked inside the graph (no pointers while tracing:
    kd_loss.teacher_layout); eagerly a list is read in place. The same gradients either way."""
    student, teachers = _cuda(*make_inputs((8,), 300, 2))
    t = torch.stack(teachers) if form == "stacked" else teachers
    fn = torch.compile(lambda s, t: fastdistill.kd_loss(s, t, divergence="jsd", backend="triton"), fullgraph=True)
    a = student.clone().requires_grad_()
    fn(a, t).backward()
    b = student.clone().requires_grad_()
    fastdistill.kd_loss(b, t, divergence="jsd", backend="triton").backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("compiled", [False, True])
def test_one_trained_teacher_of_three(compiled):
    """A co-distilled peer beside two frozen teachers: the kernel writes one teacher's gradient (its slot of an
    [M, N, V] buffer, M = 1), eagerly and traced by torch.compile, against the float64 reference."""
    student, teachers = make_inputs((8,), 300, 3)
    ref_loss, ref = reference64(student, teachers, teacher_grad=True, divergence="jsd", ensemble="logit_mean")
    s, ts = _cuda(student, teachers)
    s.requires_grad_()
    ts[1].requires_grad_()

    def fn(s, ts):
        return fastdistill.kd_loss(s, ts, divergence="jsd", ensemble="logit_mean", backend="triton")

    loss = (torch.compile(fn, fullgraph=True) if compiled else fn)(s, ts)
    loss.backward()
    assert ts[0].grad is None and ts[2].grad is None
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(s.grad, ref[0], torch.float32, "grad")
    assert_close(ts[1].grad, ref[2], torch.float32, "grad")
    if not compiled:  # the op itself: one [N, V] gradient buffer for the one trained teacher, not three
        from test_registration import _op_args

        _, _, gt = torch.ops.fastdistill.kd_loss_triton(*_op_args(s.detach(), [t.detach() for t in ts],
                                                                  grad_teachers=0b010, divergence="jsd"))  # fmt: skip
        assert gt.shape == (1, 8, 300)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nonfinite_row_is_nan_compiled(divergence, who, poison):
    """tests/test_nonfinite.py on the compiled kernels (the interpreter is not the compiler: tl.max and NaN, d - d):
    the poisoned row's loss and student gradient are NaN, the others match the float64 reference."""
    student, teachers = make_inputs((5,), 300, 2)
    (student if who == "student" else teachers[0])[2, 7] = poison
    s, ts = _cuda(student, teachers)
    s.requires_grad_()
    loss = fastdistill.kd_loss(s, ts, divergence=divergence, reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    ok = torch.tensor([0, 1, 3, 4])
    ref_loss, (ref_grad,) = reference64(student[ok], [t[ok] for t in teachers], divergence=divergence,
                                        reduction="none")  # fmt: skip
    torch.testing.assert_close(loss[ok.cuda()].double().cpu(), ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[ok.cuda()].double().cpu(), ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_scale_on_device(dtype, reduction):
    """Backward's in-place scale on CUDA is the Triton kernel of ops/triton/scale.py (no host sync on grad_output):
    the same bits as the out-of-place product a retained graph takes (both in float32, one rounding; float16 with
    its prescale's factor grad_output / S), rows whose factor is 1 untouched."""
    from fastdistill.ops import registration

    student, teachers = make_inputs((64,), 4099, 2)
    s = student.cuda().to(dtype)
    t = torch.stack(teachers).cuda().to(dtype)
    go = torch.tensor(0.7, device="cuda") if reduction == "mean" else torch.rand(64, device="cuda") + 0.5
    if reduction == "none":
        go[::3] = 1.0
    assert registration._device_scale(torch.empty(4, 16, device="cuda", dtype=dtype))

    def grad(retain: bool):
        x = s.detach().clone().requires_grad_()
        loss = fastdistill.kd_loss(x, t, temperature=2.0, reduction=reduction, backend="triton")
        loss.backward(go, retain_graph=retain)
        return x.grad

    in_place, out_of_place = grad(False), grad(True)
    assert torch.equal(in_place, out_of_place)
    if reduction == "none":  # rows of factor 1: the saved gradient itself (out of place, times 1, is exact)
        x = s.detach().clone().requires_grad_()
        fastdistill.kd_loss(x, t, temperature=2.0, reduction="none", backend="triton").backward(
            torch.ones_like(go), retain_graph=True)
        assert torch.equal(in_place[::3], x.grad[::3])


def test_stacked_trained_teachers_peak_is_the_gradients():
    """Forward + backward with K = 4 stacked trained teachers allocate the gradients only (conftest's
    stacked_trained_peak): the student's and the teachers' one [K, N, V], read and written in place."""
    extra, grads = stacked_trained_peak("triton")
    assert extra <= 1.1 * grads + 16 * 2**20, f"{extra / 2**20:.1f} MiB, gradients {grads / 2**20:.0f} MiB"
