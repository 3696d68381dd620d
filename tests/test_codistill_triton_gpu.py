"""The Triton co-distillation kernel compiled on a GPU (skipped without CUDA): the matrix on CUDA tensors against the
float64 reference (both losses, both gradients), an LLM-sized bf16 shape whose error must stay within 2x that of
PyTorch's own bf16 computation, O(N V) memory, determinism, and torch.compile(fullgraph=True) tracing into the
kernel. Without a GPU the same kernel runs in Triton's interpreter through tests/test_codistill.py."""

import math

import pytest
import torch
from conftest import DIVERGENCES, REDUCTIONS
from tolerances import assert_close

import fastdistill
from fastdistill.ops import dispatch
from fastdistill.ops.inputs import CodistillInputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_pair(n, v, dtype, seed=0, pad=0, scale=3.0):
    """CUDA logits a, b [N, V] in ``dtype`` (the last ``pad`` vocabulary entries -inf in both)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = scale * torch.randn(n, v, device="cuda", generator=g, dtype=torch.float64)
    b = scale * torch.randn(n, v, device="cuda", generator=g, dtype=torch.float64)
    if pad:
        a[:, v - pad :] = -math.inf
        b[:, v - pad :] = -math.inf
    return a.to(dtype), b.to(dtype)


def losses_and_grads(a, b, grad_outputs, want=(True, True), **kw):
    """(loss_a, loss_b, d a, d b) of fastdistill.codistill_loss on fresh leaves: each loss is differentiated with
    respect to its own model (d(loss_a)/db = 0 by the stop-gradient); a gradient not wanted is None."""
    a = a.detach().clone().requires_grad_(want[0])
    b = b.detach().clone().requires_grad_(want[1])
    loss_a, loss_b = fastdistill.codistill_loss(a, b, **kw)
    d_a = d_b = None
    if want[0]:
        (d_a,) = torch.autograd.grad(loss_a, a, grad_outputs[0].to(loss_a.dtype), retain_graph=True)
    if want[1]:
        (d_b,) = torch.autograd.grad(loss_b, b, grad_outputs[1].to(loss_b.dtype))
    return loss_a.detach(), loss_b.detach(), d_a, d_b


def check(a, b, grad_outputs, dtype, want=(True, True), **kw):
    """The triton backend on CUDA a, b against the float64 reference on the same (already rounded) inputs."""
    got = losses_and_grads(a, b, grad_outputs, want, backend="triton", **kw)
    ref = losses_and_grads(a.double(), b.double(), grad_outputs, want, backend="reference", **kw)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, x, r in zip(("loss_a", "loss_b"), got[:2], ref[:2]):
        assert x.dtype == loss_dtype
        assert_close(x, r, loss_dtype, "loss", name)
    for name, x, r in zip(("d a", "d b"), got[2:], ref[2:]):
        if r is None:
            assert x is None
            continue
        assert x.dtype == dtype and x.device.type == "cuda"
        assert_close(x, r, dtype, "grad", name)
    return got


def _grad_outputs(reduction, lead):
    g = torch.Generator(device="cuda").manual_seed(1)
    if reduction == "none":  # a different grad_output per row and per loss
        return (torch.rand(lead, device="cuda", generator=g) + 0.5, torch.rand(lead, device="cuda", generator=g) - 1)
    return torch.tensor(0.7, device="cuda"), torch.tensor(-1.3, device="cuda")


@pytest.mark.parametrize("vocab", [1000, 5003])  # one tile; several tiles with a ragged last one
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix_cuda(divergence, reduction, weighted, vocab):
    """float32, [3, 7] rows; weighted: labels (some ignored, one of them an all -inf row, never read) with
    cross-entropy on both sides, sample weights (one 0), T = 2; else neither, T = 1."""
    a, b = make_pair(21, vocab, torch.float32, seed=vocab + weighted)
    a, b = a.reshape(3, 7, vocab), b.reshape(3, 7, vocab)
    kw = dict(divergence=divergence, reduction=reduction, weight_ab=0.6, weight_ba=1.3)
    if weighted:
        labels = torch.randint(0, vocab, (3, 7), device="cuda")
        labels[0, :3] = -100
        a[0, 1] = -math.inf
        b[0, 1] = -math.inf
        sw = torch.rand(3, 7, device="cuda") + 0.1
        sw[2, 5] = 0.0
        kw.update(labels=labels, hard_weight=(0.3, 0.7), sample_weight=sw, temperature=2.0)
    check(a, b, _grad_outputs(reduction, (3, 7)), torch.float32, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dtypes_padded_vocab_cuda(divergence, dtype):
    """Every compiled dtype, with padded -inf vocabulary entries and an odd V (the unaligned kernel)."""
    a, b = make_pair(16, 1029, dtype, seed=3, pad=29)
    labels = torch.randint(0, 1000, (16,), device="cuda")
    labels[3] = -100
    kw = dict(divergence=divergence, labels=labels, hard_weight=(1.0, 0.5), temperature=2.0, reduction="mean")
    check(a, b, _grad_outputs("mean", (16,)), dtype, **kw)


def test_float64_goes_to_the_reference_on_cuda():
    """The row kernels are not compiled for float64 (launch.ROW_KERNEL_GPU_DTYPES): backend="triton" names the
    reason, "auto" computes float64 on the reference backend."""
    a, b = make_pair(4, 300, torch.float64, seed=6)
    with pytest.raises(ValueError, match="float64"):
        fastdistill.codistill_loss(a, b, backend="triton")
    got = fastdistill.codistill_loss(a, b)  # (warns once per process that it fell back to the reference)
    ref = fastdistill.codistill_loss(a, b, backend="reference")
    for x, r in zip(got, ref):
        torch.testing.assert_close(x, r)


@pytest.mark.parametrize("want", [(True, False), (False, True)])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])  # the closed-form gradient and the three-sweep one
def test_one_model_trains_cuda(divergence, want):
    """Only one model requires grad: the kernel writes that gradient alone (the other is never allocated)."""
    a, b = make_pair(9, 777, torch.float32, seed=4)
    labels = torch.randint(0, 777, (9,), device="cuda")
    kw = dict(divergence=divergence, labels=labels, temperature=2.0, reduction="sum")
    check(a, b, _grad_outputs("sum", (9,)), torch.float32, want, **kw)


@pytest.mark.parametrize("on", [False, True])
@pytest.mark.parametrize("divergence", ["reverse_kl", "kl"])
def test_infinite_divergence_cuda(divergence, on):
    """b is -inf at one column where a is not, so D(P_b, Q_a) = inf for reverse KL (the direction into a) and
    D(P_a, Q_b) = inf for KL (into b). With that direction's weight 0 it adds exactly 0 (finite losses, gradients
    as the reference's); with weight 1 its loss is inf, like the reference's."""
    a, b = make_pair(6, 300, torch.float32, seed=5)
    b[:, 7] = -math.inf
    labels = torch.randint(8, 300, (6,), device="cuda")
    into_a = divergence == "reverse_kl"
    w = 1.0 if on else 0.0
    kw = dict(divergence=divergence, labels=labels, weight_ba=w if into_a else 1.0,
              weight_ab=1.0 if into_a else w, reduction="none")  # fmt: skip
    with torch.no_grad():
        got = fastdistill.codistill_loss(a, b, backend="triton", **kw)
        ref = fastdistill.codistill_loss(a.double(), b.double(), backend="reference", **kw)
    for x, r in zip(got, ref):
        assert_close(x, r, torch.float32, "loss")  # (infinities must match exactly)
    infinite = got.loss_a if into_a else got.loss_b
    assert bool(torch.isinf(infinite).all()) if on else bool(torch.isfinite(infinite).all())
    if not on:
        check(a, b, _grad_outputs("none", (6,)), torch.float32, **kw)


def test_llm_shape_bf16_within_2x_of_torch():
    """V = 128256, N = 2048 (the float64 yardstick's [N, V] temporaries must fit in 80 GB), bf16, KL at T = 2 with
    cross-entropy on both sides: the error of both losses and both gradients against float64 is at most 2x that of
    the same losses computed by eager PyTorch in bf16."""
    n, v, t = 2048, 128256, 2.0
    a, b = make_pair(n, v, torch.bfloat16, seed=6, scale=2.0)
    labels = torch.randint(0, v, (n,), device="cuda")

    def torch_losses(x, y):
        lx, ly = torch.log_softmax(x / t, -1), torch.log_softmax(y / t, -1)
        kl_yx = (ly.detach().exp() * (ly.detach() - lx)).sum(-1)  # D(P_b, Q_a): b teaches a
        kl_xy = (lx.detach().exp() * (lx.detach() - ly)).sum(-1)
        ce = torch.nn.functional.cross_entropy
        return ((ce(x, labels, reduction="none") + t * t * kl_yx).mean(),
                (ce(y, labels, reduction="none") + t * t * kl_xy).mean())  # fmt: skip

    def run(fn, x, y):
        x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        la, lb = fn(x, y)
        (ga,) = torch.autograd.grad(la, x, retain_graph=True)
        (gb,) = torch.autograd.grad(lb, y)
        return la.detach().double(), lb.detach().double(), ga, gb

    ours = run(lambda x, y: fastdistill.codistill_loss(x, y, labels, temperature=t, backend="triton"), a, b)
    ref = run(torch_losses, a.double(), b.double())
    torch.cuda.empty_cache()
    same = run(torch_losses, a, b)
    for k, name in enumerate(("loss_a", "loss_b")):
        err, err_torch = (ours[k] - ref[k]).abs().item(), (same[k] - ref[k]).abs().item()
        assert err <= 2 * err_torch + 1e-6, f"{name}: {err:.3e} vs torch bf16 {err_torch:.3e}"
    for k, name in zip((2, 3), ("d a", "d b")):
        assert ours[k].dtype == torch.bfloat16
        err = (ours[k].double() - ref[k]).abs().max().item()
        err_torch = (same[k].double() - ref[k]).abs().max().item()
        assert err <= 2 * err_torch + 1e-9, f"{name}: {err:.3e} vs torch bf16 {err_torch:.3e}"


def test_memory_is_the_gradients():
    """Forward + backward at N = 4096, V = 128256 (bf16) allocate the two [N, V] gradients the kernel writes and the
    two that backward scales from them, nothing else of size N V (one float32 [N, V] temporary would be 2 GiB)."""
    n, v = 4096, 128256
    a, b = make_pair(n, v, torch.bfloat16, seed=7)
    a, b = a.requires_grad_(), b.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss_a, loss_b = fastdistill.codistill_loss(a, b, temperature=2.0, divergence="jsd", backend="triton")
    (loss_a + loss_b).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 4 * n * v * a.element_size() + 64 * 2**20, f"{extra / 2**20:.1f} MiB"


def test_deterministic_cuda():
    a, b = make_pair(1024, 32000, torch.bfloat16, seed=8)
    labels = torch.randint(0, 32000, (1024,), device="cuda")
    kw = dict(labels=labels, temperature=2.0, divergence="skew_kl", backend="triton")
    go = _grad_outputs("mean", (1024,))
    first = losses_and_grads(a, b, go, **kw)
    second = losses_and_grads(a, b, go, **kw)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_auto_picks_triton_on_cuda():
    a, b = make_pair(4, 64, torch.float32)
    inp = CodistillInputs(
        a=a, b=b, labels=None, sample_weight=None, denominator=None, divergence="kl", temperature=1.0,
        kd_scale=1.0, weight_ab=1.0, weight_ba=1.0, hard_a=0.0, hard_b=0.0, div_params=[], ignore_index=-100,
        reduce=True,
    )  # fmt: skip
    assert dispatch.select("auto", inp).name == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_traces_into_kernel(dtype):
    """torch.compile(fullgraph=True) with inductor: no graph break, the generated code launches the user kernel of
    the triton_op, and losses and gradients match eager."""
    from torch._inductor.utils import run_and_get_code

    a, b = make_pair(64, 3001, dtype, seed=9)
    labels = torch.randint(0, 3001, (64,), device="cuda")
    labels[:5] = -100

    def fn(x, y):
        loss_a, loss_b = fastdistill.codistill_loss(x, y, labels, temperature=2.0, divergence="jsd",
                                                    hard_weight=(0.5, 1.0), backend="triton")  # fmt: skip
        return loss_a + 0.5 * loss_b

    def run(f, x, y):
        x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        out = f(x, y)
        out.backward()
        return out.detach(), x.grad, y.grad

    torch._dynamo.reset()
    got, codes = run_and_get_code(run, torch.compile(fn, fullgraph=True), a, b)
    assert "def _codistill_row" in "\n".join(codes), "the kernel is not in the compiled code"
    want = run(fn, a, b)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * y.abs().max().item())
