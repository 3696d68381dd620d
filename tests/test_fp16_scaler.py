"""float16 logits under a loss scaler (torch.amp.GradScaler) on the fused backends.

The fused backends write the gradient in the forward pass, in the logits' dtype, and backward applies grad_output
after. Unscaled, entries under float16's range (~6e-8; a "mean" over N rows divides each by N) were 0 before the
scale could lift them, where autograd through eager float16 ops keeps them. Where the student gradient has a bound
(every divergence but reverse KL, and skew_reverse_kl at skew 0), the op record passes sample weights x a power of
two S and divides the loss by S (ops/inputs.py: ``_fp16_prescale``), and backward multiplies in float32
(registration._scale). Judged against the same backend's gradient of float32 logits of the same values times the
scale, rounded once to float16 (the kernel's float32 math is the same; only the float16 storage differs), and the
float64 reference.
"""

import pytest
import torch

import fastdistill
from fastdistill.ops import divergences, inputs
from tests.conftest import requires_ext, requires_triton
from tests.tolerances import assert_close

SCALE = 2.0**16  # GradScaler's initial scale


def _inputs(n: int, v: int, k: int = 1, seed: int = 0, spread: float = 6.0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, v, generator=gen) * spread).half()
    teachers = [(torch.randn(n, v, generator=gen) * spread).half() for _ in range(k)]
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::7] = -100
    weights = torch.rand(n, generator=gen) * 3
    return student, teachers, labels, weights


def _grad(student, teachers, backend, scale=SCALE, **kw):
    s = student.clone().requires_grad_()
    loss = fastdistill.kd_loss(s, teachers, backend=backend, **kw)
    (loss.sum() * scale).backward()
    return loss.detach(), s.grad


def _expected(student, teachers, backend, scale=SCALE, **kw):
    """What float16 logits should give: the same backend's gradient of the same values as float32 logits (its
    float32 math, the product with the scale in float32), rounded once to float16 (as autograd through a float32
    loss of float16 logits rounds the scaled gradient at the logits). And the float64 reference's gradient x scale,
    for the suite's tolerance."""
    _, g32 = _grad(student.float(), [t.float() for t in teachers], backend, scale=scale, **kw)
    _, g64 = _grad(student.double(), [t.double() for t in teachers], "reference", scale=scale, **kw)
    return g32.half(), g64


def _check_grad(actual: torch.Tensor, expected: torch.Tensor, g64: torch.Tensor, what: str) -> None:
    assert actual.dtype == torch.float16 and torch.isfinite(expected).all()
    # float16 logits' gradient is rounded twice, x S in the forward pass and x grad_output / S in backward: within
    # 2^-10 relative of the float32 product's single rounding, or one subnormal unit (2^-24)
    lost = (actual == 0) & (expected.abs() > 2**-24)
    assert not lost.any(), f"{what}: {int(lost.sum())} of {expected.numel()} entries lost to float16 underflow"
    err = (actual.double() - expected.double()).abs()
    bad = err > 2**-10 * expected.double().abs() + 2**-24
    assert not bad.any(), f"{what}: {int(bad.sum())} entries off, the worst by {err.max().item():.3e}"
    assert_close(actual, g64, torch.float16, "grad", what)  # and the float64 reference, at the suite's tolerance


CASES = [
    dict(divergence="kl", temperature=2.0),
    dict(divergence="jsd", beta=0.3),
    dict(divergence="tvd"),
    dict(divergence="skew_kl", skew=0.2),
    dict(divergence="skew_reverse_kl", skew=0.1, temperature=0.5),
    dict(divergence="kl", ce_weight=0.4, temperature=3.0),
    dict(divergence="kl", ce_weight=1.0),
]


@requires_ext
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_scaled_fp16_gradients_keep_small_entries_cpu(case, reduction):
    student, teachers, labels, weights = _inputs(4096, 17, k=2)
    kw = dict(case, reduction=reduction, labels=labels, sample_weight=weights,
              ensemble="prob_mean", teacher_weights=[0.7, 0.3])  # fmt: skip
    # (a scale a GradScaler would keep: the scaled gradient in float16's range; "sum" and "none" do not divide by N)
    scale = SCALE if reduction in ("mean", "batchmean") else 2.0**12
    loss, g = _grad(student, teachers, "cpu", scale=scale, **kw)
    _check_grad(g, *_expected(student, teachers, "cpu", scale=scale, **kw), f"{case} {reduction}")
    loss64 = fastdistill.kd_loss(student.double(), [t.double() for t in teachers], backend="reference", **kw)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-5)


@requires_ext
def test_the_measured_case_of_the_cpu_fuzz():
    """The case the review measured (N = 4096, mean, scale 65536): 3532 of 69632 entries were 0, reference none."""
    student, teachers, _, _ = _inputs(4096, 17)
    _, g = _grad(student, teachers, "cpu", temperature=2.0)
    expected, g64 = _expected(student, teachers, "cpu", temperature=2.0)
    assert int(((expected != 0) & (expected.abs() < 2**-14 * SCALE / 4096)).sum()) > 1000  # it has small entries
    _check_grad(g, expected, g64, "kl mean")


@requires_ext
@pytest.mark.parametrize("scale", [1.0, 3.0, 2.0**20])
def test_unscaled_and_odd_factors(scale):
    """grad_output 1 (no scaler), a factor that is no power of two, and a large scale: one rounding each."""
    student, teachers, labels, _ = _inputs(512, 33)
    kw = dict(temperature=2.0, labels=labels, ce_weight=0.2)
    _, g = _grad(student, teachers, "cpu", scale=scale, **kw)
    _check_grad(g, *_expected(student, teachers, "cpu", scale=scale, **kw), f"scale {scale}")


@requires_ext
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_codistill_scaled_fp16_gradients(reduction):
    a, (b,), labels, weights = _inputs(4096, 17)
    kw = dict(divergence="jsd", temperature=2.0, labels=labels, sample_weight=weights, hard_weight=(0.3, 0.1),
              weight_ab=0.5, reduction=reduction)  # fmt: skip
    grads = {}
    for name, x, y in (("fp16", a, b), ("fp32", a.float(), b.float()), ("fp64", a.double(), b.double())):
        xa, xb = x.clone().requires_grad_(), y.clone().requires_grad_()
        la, lb = fastdistill.codistill_loss(xa, xb, backend="reference" if name == "fp64" else "cpu", **kw)
        ((la.sum() + lb.sum()) * (SCALE if reduction == "mean" else 2.0**12)).backward()
        grads[name] = (xa.grad, xb.grad)
    for i, name in enumerate("ab"):
        _check_grad(grads["fp16"][i], grads["fp32"][i].half(), grads["fp64"][i], f"codistill {name}")


@requires_ext
def test_prescale_is_a_power_of_two_that_keeps_the_bound_in_range():
    student, teachers, labels, weights = _inputs(64, 9)
    inp = fastdistill.functional.kd_inputs(
        student.requires_grad_(), teachers, divergence="jsd", temperature=4.0, scale_by_temperature_sq=True,
        ensemble="prob_mean", teacher_weights=None, beta=0.5, skew=0.1, labels=labels, ignore_index=-100,
        ce_weight=0.5, sample_weight=weights, reduction="mean", num_items=None, backend="cpu")  # fmt: skip
    _, s = inp.kernel_args()
    coefficient = 0.5 * 16 / 4 * 1.0 + 0.5  # kd_scale / T x the bound + ce_weight
    bound = coefficient * weights.max() / (labels != -100).sum()
    mantissa, _ = torch.frexp(s)
    assert mantissa == 0.5  # a power of two
    assert inputs.FP16_GRAD_TOP / 2 < s * bound <= inputs.FP16_GRAD_TOP


@requires_ext
def test_no_prescale_where_there_is_no_bound_or_no_float16():
    student, teachers, _, _ = _inputs(64, 9)

    def s_of(x, ts, **kw):
        inp = fastdistill.functional.kd_inputs(
            x, ts, **{**dict(divergence="kl", temperature=1.0, scale_by_temperature_sq=True, ensemble="prob_mean",
                             teacher_weights=None, beta=0.5, skew=0.1, labels=None, ignore_index=-100,
                             ce_weight=0.0, sample_weight=None, reduction="mean", num_items=None,
                             backend="cpu"), **kw})  # fmt: skip
        return inp.kernel_args()[1]

    assert divergences.get("reverse_kl").grad_bound([]) is None
    assert s_of(student.clone().requires_grad_(), teachers, divergence="reverse_kl") is None
    assert s_of(student.clone().requires_grad_(), teachers, divergence="skew_reverse_kl", skew=0.0) is None
    assert s_of(student.clone().requires_grad_(), teachers) is not None
    assert s_of(student.clone(), teachers) is None  # no gradient
    assert s_of(student.clone().requires_grad_(), [t.clone().requires_grad_() for t in teachers]) is None
    assert s_of(student.float().requires_grad_(), teachers) is None
    assert s_of(student.bfloat16().requires_grad_(), teachers) is None

    def dtypes(x, ts, **kw):  # the kernel's student and teachers
        args = fastdistill.functional.kd_inputs(
            x, ts, **{**dict(divergence="kl", temperature=1.0, scale_by_temperature_sq=True, ensemble="prob_mean",
                             teacher_weights=None, beta=0.5, skew=0.1, labels=None, ignore_index=-100,
                             ce_weight=0.0, sample_weight=None, reduction="mean", num_items=None,
                             backend="cpu"), **kw}).kernel_args()[0]  # fmt: skip
        return args[0].dtype, {t.dtype for t in args[1]}

    f16, f32 = torch.float16, torch.float32
    # widened to float32 only where a float16 gradient is asked for and no prescale lifts it
    assert dtypes(student.clone().requires_grad_(), teachers) == (f16, {f16})
    assert dtypes(student.clone().requires_grad_(), teachers, divergence="reverse_kl") == (f32, {f16})
    assert dtypes(student.clone(), teachers, divergence="reverse_kl") == (f16, {f16})
    assert dtypes(student.clone(), [t.clone().requires_grad_() for t in teachers]) == (f16, {f32})
    assert dtypes(student.clone().requires_grad_(), [t.clone().requires_grad_() for t in teachers]) == (f32, {f32})
    assert dtypes(student.bfloat16().requires_grad_(), teachers, divergence="reverse_kl") == (torch.bfloat16, {f16})


def test_divergence_bounds_hold():
    """|dD/dz| of every bounded divergence, at adversarial pairs of distributions (near one-hot, flat, disjoint),
    stays under the table's bound (float64 reference, autograd)."""
    from fastdistill.ops import reference

    gen = torch.Generator().manual_seed(1)
    for name, d in divergences.DIVERGENCES.items():
        for params in ([0.5], [0.01], [0.99]) if d.params else ([],):
            bound = d.grad_bound(params)
            if bound is None:
                continue
            worst = 0.0
            for spread in (0.1, 3.0, 30.0, 300.0):
                for v in (2, 3, 40):
                    z = (torch.randn(256, v, generator=gen, dtype=torch.float64) * spread).requires_grad_()
                    log_p = torch.log_softmax(torch.randn(256, v, generator=gen, dtype=torch.float64) * spread, -1)
                    rows = reference.divergence(log_p, torch.log_softmax(z, -1), name, params)
                    (g,) = torch.autograd.grad(rows.sum(), z)
                    worst = max(worst, g.abs().max().item())
            assert worst <= bound * (1 + 1e-12), f"{name} {params}: |dD/dz| reached {worst} > bound {bound}"


@requires_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_scaled_fp16_gradients_triton(reduction):
    # 64 rows (Triton's interpreter: ~0.5 s a row on 2 cores), weights as small as 256 rows' under "mean"
    student, teachers, labels, weights = _inputs(64, 40, k=2, spread=8.0)
    kw = dict(divergence="kl", temperature=2.0, labels=labels, sample_weight=weights * 2.5e-4, ce_weight=0.1,
              reduction=reduction)  # fmt: skip
    _, g = _grad(student, teachers, "triton", **kw)
    _check_grad(g, *_expected(student, teachers, "triton", **kw), f"triton {reduction}")


@requires_ext
def test_compiled_fp16_kd_loss_keeps_small_entries():
    student, teachers, _, _ = _inputs(4096, 17)

    def step(x):
        return fastdistill.kd_loss(x, teachers, temperature=2.0, backend="cpu") * SCALE

    s = student.clone().requires_grad_()
    torch.compile(step, fullgraph=True, backend="aot_eager")(s).backward()
    _check_grad(s.grad, *_expected(student, teachers, "cpu", temperature=2.0), "compiled")



def _grads(student, teachers, backend, scale=SCALE, **kw):
    """The gradients of (loss x scale) to the student and each teacher (all of them require grad; ``teachers`` a
    list, or one stacked [K, N, V] tensor: its one gradient)."""
    s = student.clone().requires_grad_()
    stacked = isinstance(teachers, torch.Tensor)
    ts = [teachers.clone().requires_grad_()] if stacked else [t.clone().requires_grad_() for t in teachers]
    (fastdistill.kd_loss(s, ts[0] if stacked else ts, backend=backend, **kw).sum() * scale).backward()
    return [s.grad, *(t.grad for t in ts)]


UNBOUNDED = [  # float16 gradients no prescale lifts
    dict(divergence="reverse_kl", temperature=2.0),
    dict(divergence="skew_reverse_kl", skew=0.0),
    dict(divergence="reverse_kl", temperature=0.5, ce_weight=0.3),
]


@requires_ext
@pytest.mark.parametrize("case", UNBOUNDED, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unbounded_fp16_gradients_are_formed_in_float32(case, reduction):
    """A divergence whose student gradient has no bound gets no prescale: the float16 student is widened to a float32
    copy before the op, so its gradient meets the scale before it is rounded to float16 (it lost 8 % of its entries
    to underflow at N = 4096, V = 2000, mean)."""
    student, teachers, labels, weights = _inputs(4096, 17, k=2)
    kw = dict(case, reduction=reduction, labels=labels, sample_weight=weights, teacher_weights=[0.6, 0.4])
    scale = SCALE if reduction == "mean" else 2.0**12
    _, g = _grad(student, teachers, "cpu", scale=scale, **kw)
    _check_grad(g, *_expected(student, teachers, "cpu", scale=scale, **kw), f"{case} {reduction}")


@requires_ext
@pytest.mark.parametrize("case", [dict(divergence="kl", temperature=2.0), dict(divergence="jsd", ce_weight=0.2),
                                  dict(divergence="reverse_kl", ensemble="logit_mean"),
                                  dict(divergence="tvd", ensemble="loss_mean")],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))  # fmt: skip
@pytest.mark.parametrize("stacked", [False, True])
def test_fp16_teacher_gradients_are_formed_in_float32(case, stacked):
    """Teachers that require grad (co-distillation through kd_loss): theirs have no bound, so neither they nor the
    student's get a prescale; the float16 logits that need a gradient are widened to float32 copies, and every
    gradient keeps its small entries (the student's lost 14 %, the teacher's 8 %, at N = 4096, V = 2000)."""
    student, teachers, labels, _ = _inputs(4096, 17, k=2)
    kw = dict(case, labels=labels)
    if stacked:
        teachers = torch.stack(teachers)
    got = _grads(student, teachers, "cpu", **kw)
    g32 = _grads(student.float(), teachers.float() if stacked else [t.float() for t in teachers], "cpu", **kw)
    g64 = _grads(student.double(), teachers.double() if stacked else [t.double() for t in teachers], "reference",
                 **kw)  # fmt: skip
    assert len(got) == (2 if stacked else 3)
    for i, (a, e, r) in enumerate(zip(got, g32, g64)):
        _check_grad(a, e.half(), r, f"{case} {'student' if i == 0 else f'teacher {i - 1}'}")


@requires_ext
def test_codistill_unbounded_fp16_gradients_are_formed_in_float32():
    a, (b,), labels, _ = _inputs(4096, 17)
    kw = dict(divergence="reverse_kl", temperature=2.0, labels=labels, hard_weight=(0.3, 0.1))
    grads = {}
    for name, x, y in (("fp16", a, b), ("fp32", a.float(), b.float()), ("fp64", a.double(), b.double())):
        xa, xb = x.clone().requires_grad_(), y.clone().requires_grad_()
        la, lb = fastdistill.codistill_loss(xa, xb, backend="reference" if name == "fp64" else "cpu", **kw)
        ((la + lb) * SCALE).backward()
        grads[name] = (xa.grad, xb.grad)
    for i, name in enumerate("ab"):
        _check_grad(grads["fp16"][i], grads["fp32"][i].half(), grads["fp64"][i], f"codistill reverse_kl {name}")


@requires_triton
def test_unbounded_fp16_gradients_triton():
    student, teachers, labels, _ = _inputs(64, 40, k=2, spread=8.0)
    kw = dict(divergence="reverse_kl", temperature=2.0, labels=labels, ce_weight=0.1)
    got = _grads(student, teachers, "triton", **kw)
    g32 = _grads(student.float(), [t.float() for t in teachers], "triton", **kw)
    g64 = _grads(student.double(), [t.double() for t in teachers], "reference", **kw)
    for i, (x, e, r) in enumerate(zip(got, g32, g64)):
        _check_grad(x, e.half(), r, f"triton reverse_kl {i}")


@requires_ext
def test_prescale_keeps_huge_sample_weights_finite():
    """S is capped so that the largest sample weight x S stays finite in float32 (w = 1e30 with num_items = 1e35 gave
    an inf loss)."""
    student, teachers, _, _ = _inputs(64, 9)
    kw = dict(temperature=2.0, sample_weight=torch.full((64,), 1e30), num_items=torch.tensor(1e35))
    loss, g = _grad(student, teachers, "cpu", scale=1.0, **kw)
    loss32, g32 = _grad(student.float(), [t.float() for t in teachers], "cpu", scale=1.0, **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, loss32, rtol=1e-5, atol=0)


@requires_ext
def test_fused_linear_chunks_are_lifted_by_one_prescale(monkeypatch):
    """fused_linear forms a float16 chunk's gradient in the forward pass, before a loss scaler's factor: it takes it
    at grad_output S, the prescale of all the rows (one for every chunk, so their sums share it), and each chunk's
    op prescales as kd_loss's does (its S >= the whole input's: backward's factor <= 1, exact). Chunks of "none"
    take their rows' grad_output in backward, as kd_loss does: no lift. (The accuracy: test_fused_linear.py.)"""
    calls = []
    original = inputs._fp16_prescale
    monkeypatch.setattr(inputs, "_fp16_prescale", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    h = torch.randn(32, 8).half().requires_grad_()
    w = torch.randn(17, 8).half().requires_grad_()
    t = torch.randn(32, 17).half()
    fastdistill.fused_linear_kd_loss(h, w, t, temperature=2.0, chunk_size=8, backend="cpu").backward()
    assert sorted(calls) == [8] * 5  # the first chunk's rows stand for the whole input's (the weights are all N's)
    calls.clear()
    fastdistill.fused_linear_kd_loss(h, w, t, temperature=2.0, chunk_size=8, reduction="none",
                                     backend="cpu").sum().backward()  # fmt: skip
    assert calls == [8] * 4  # each chunk's op, in backward
    calls.clear()
    fastdistill.kd_loss((h @ w.T).detach().requires_grad_(), t, temperature=2.0, backend="cpu")
    assert calls == [32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 50), (3, 37, 50), (259, 50), (3, 259, 50)])
def test_cpu_product_by_blocks_is_one_rounding(dtype, shape, monkeypatch):
    """registration._product on the CPU with per-row float32 factors converts a 16-bit gradient by blocks of rows
    (torch's mixed-dtype loop is ~25x slower and copies it to float32 twice): the bits of the float32 product rounded
    once, in place and out of place, across block edges (blocks of 4 rows here, a ragged last one: 259 rows; fewer
    than 64 rows go one by one), factors 16-bit dtypes cannot hold."""
    from fastdistill.ops import registration

    n, row = shape[-2], 50 * (shape[0] if len(shape) == 3 else 1)
    monkeypatch.setattr(registration, "_BLOCK_ELEMENTS", 4 * row)
    # the blocks really run where the test says (the first version's shapes all took the row-by-row fallback)
    assert min(4 * row, n * row // 64) // row == (4 if n >= 64 else 0)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=gen).to(dtype)
    rows = torch.rand(n, generator=gen) / 3 + 2.0**-30
    want = (grad.float() * rows[:, None]).to(dtype)
    assert torch.equal(registration._product(grad, rows, False, torch.empty_like(grad)), want)
    assert torch.equal(registration._product(grad.clone(), rows, False, grad.clone()), want)
    inplace = grad.clone()
    assert registration._product(inplace, rows, False, inplace) is inplace and torch.equal(inplace, want)
    factor = torch.tensor(1 / 3)
    assert torch.equal(registration._product(grad, factor, True, torch.empty_like(grad)),
                       (grad.float() * factor).to(dtype))  # fmt: skip
