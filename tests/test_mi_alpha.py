"""fastdistill.mi_alpha and MIAlphaLoss: every backend against the float64 reference (SPEC §2, §6), the estimator's
properties, registration (opcheck, compile, gradcheck), errors, and that the fused kernels stay O(N D) in memory.

The Triton kernels have their own file (tests/test_mi_triton.py: interpreter shapes are kept small there); the
numerically hard cases here run on them too."""

import functools
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_ext, requires_triton
from tolerances import assert_close

import fastdistill
from fastdistill.ops import reference

ALPHAS = (0.0, 0.01, 0.5, 1.0)
FUSED = [pytest.param("cpu", marks=requires_ext)]
BACKENDS = FUSED + ["reference"]
# the numerically hard cases run on the Triton kernels too (in the interpreter: small shapes only)
HARD = FUSED + [pytest.param("triton", marks=requires_triton)]
# SPEC §6 writes the estimator for the dot critic, T = 1, rows anchored on the teacher: these tests hold the backends
# to it there (other critics, temperatures and the student anchor are passed where a test is about them).
SPEC6 = dict(critic="dot", temperature=1.0, anchor="teacher")


def mi_alpha(u, v, **kw):
    return fastdistill.mi_alpha(u, v, **{**SPEC6, **kw})


def make_feats(n, d, dtype=torch.float64, corr=0.8, scale=1.0, seed=0):
    """Student u and teacher v = corr * u + noise: positive pairs (row i of both) are correlated."""
    g = torch.Generator().manual_seed(seed)
    u = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    v = corr * u + scale * math.sqrt(max(1 - corr**2, 0.0)) * torch.randn(n, d, generator=g, dtype=torch.float64)
    a = 1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return u.to(dtype), v.to(dtype), a


def estimate_and_grads(u, v, a, grad_output=1.0, **kw):
    """mi_alpha and its gradients w.r.t. u, v (and a when it is a Tensor) on fresh leaf copies."""
    u = u.detach().clone().requires_grad_()
    v = v.detach().clone().requires_grad_()
    leaves = [u, v]
    if isinstance(a, torch.Tensor):
        a = a.detach().clone().requires_grad_()
        leaves.append(a)
    est = mi_alpha(u, v, log_baseline=a, **kw)
    grads = torch.autograd.grad(est, leaves, torch.tensor(grad_output, dtype=est.dtype), materialize_grads=True)
    return est, grads


def check_against_reference(backend, u, v, a, dtype, grad_output=1.0, **kw):
    est, grads = estimate_and_grads(u, v, a if not isinstance(a, torch.Tensor) else a.to(dtype), grad_output,
                                    backend=backend, **kw)  # fmt: skip
    ref_a = a.double() if isinstance(a, torch.Tensor) else a
    ref, ref_grads = estimate_and_grads(u.double(), v.double(), ref_a, grad_output, backend="reference", **kw)
    assert est.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert est.shape == ()
    # the estimate is 1 + J - M with J and M of order |S|: judge it on that scale
    s_max = reference.mi_scores(u.double(), v.double(), kw.get("critic", "dot"), kw.get("temperature", 1.0)).abs()
    assert_close(est, ref, dtype, "loss", f"{backend} estimate", scale_floor=1.0 + s_max.max().item())
    for name, g, r in zip(("student", "teacher", "log_baseline"), grads, ref_grads):
        assert g.dtype == (dtype if name != "log_baseline" else g.dtype)
        assert_close(g, r, dtype, "mi_grad", f"{backend} d/d{name}", scale_floor=1.0 / u.shape[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n,d", [(2, 1), (3, 7), (65, 5), (130, 33)])
def test_matches_reference(backend, dtype, alpha, n, d):
    if backend == "reference" and dtype == torch.float64:
        pytest.skip("the reference against itself")
    u, v, a = make_feats(n, d, dtype, scale=0.7, seed=n + d)
    check_against_reference(backend, u, v, a, dtype, grad_output=-1.7, alpha=alpha, temperature=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("critic", ["dot", "cosine"])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("baseline", ["float", "tensor"])
def test_critics_temperatures_baselines(backend, critic, temperature, baseline):
    u, v, a = make_feats(37, 6, torch.float64, seed=3)
    a = 0.5 if baseline == "float" else a
    check_against_reference(backend, u, v, a, torch.float64, grad_output=0.6, alpha=0.01, critic=critic,
                            temperature=temperature)  # fmt: skip


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n,d", [(1031, 64), (300, 1024)])
def test_larger_shapes_float32(backend, n, d):
    """N not a multiple of the 64-row strips; D up to 1024 (scores of order 10 with cosine / T = 0.1)."""
    u, v, a = make_feats(n, d, torch.float32, seed=1)
    check_against_reference(backend, u, v, a, torch.float32, alpha=0.01, critic="cosine", temperature=0.1)


@pytest.mark.parametrize("backend", HARD)
@pytest.mark.parametrize("alpha", [0.01, 1.0])
def test_saturated_positive_pairs_float32(backend, alpha):
    """The positive pair dominates every row (p_ii -> 1, a trained critic): dI/dS_ii is tiny, and the naive
    1/N - p_ii C_i would lose it to cancellation in float32; the kernels keep float32 accuracy."""
    u, v, a = make_feats(17, 40, torch.float32, corr=0.999, scale=6.3, seed=1)
    s = (v.double() @ u.double().T).softmax(1)
    assert (s.diagonal() > 1 - 1e-6).all()  # saturated, so the test means something
    check_against_reference(backend, u, v, a, torch.float32, alpha=alpha, temperature=1.7)


@pytest.mark.parametrize("backend", HARD)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [0.01, 0.5, 1.0])  # alpha = 0 (TUBA): exp(S_ij - a_i) overflows every dtype here
@pytest.mark.parametrize("corr", [0.999, 0.0])
def test_extreme_scores(backend, dtype, alpha, corr):
    """Scores in the hundreds (a diverging dot critic): every row has one score that takes all the mass, on the
    diagonal (corr 0.999) or off it (corr 0). Leave-one-out sums, c* and m then under/overflow when formed the
    naive way; the estimate and gradients must stay finite and match the reference."""
    u, v, a = make_feats(23, 40, dtype, corr=corr, scale=5.0, seed=2)
    s = reference.mi_scores(u.double(), v.double(), "dot", 0.5)
    top2 = s.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1] > 60).any()  # beyond float32's exp range, so the test means something
    est, grads = estimate_and_grads(u, v, a.to(dtype), 0.4, backend=backend, alpha=alpha, temperature=0.5)
    ref, ref_grads = estimate_and_grads(u.double(), v.double(), a, 0.4, backend="reference", alpha=alpha,
                                        temperature=0.5)  # fmt: skip
    # The reference's own float64 gradients cancel here (the marginal term's O(e^8) summands and their chain
    # through B_ii), to ~1e-10 of the gradient's scale, so float64 is judged on the float32 row.
    tol = torch.float32
    assert_close(est, ref, tol, "loss", "estimate", scale_floor=1.0 + s.abs().max().item())
    for name, g, r in zip(("student", "teacher", "log_baseline"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert_close(g, r, tol, "mi_grad", f"d/d{name}", scale_floor=1.0 / u.shape[0])


@pytest.mark.parametrize("backend", HARD)
@pytest.mark.parametrize("alpha", [0.01, 1.0])
@pytest.mark.parametrize("gap", [1e3, 1e4])
def test_off_diagonal_score_far_ahead_of_its_row_float32(backend, alpha, gap):
    """One off-diagonal score per row ahead of the rest by ``gap`` (student = I, so the scores are the teacher's
    features and dI/dv = dI/dS): log q* - log t* cancelled two terms of the gap's size, so Phi, and every gradient of
    the row, had a relative error of ~gap * 2^-24 in float32 (8e-5 at 1e4); taken whole, float32 accuracy."""
    s = torch.tensor([[0.3, gap, -0.2, 0.1], [0.5, -0.4, 0.2, gap], [gap, 0.1, 0.0, -0.3], [-0.1, 0.2, gap, 0.4]],
                     dtype=torch.float64)  # fmt: skip
    u = torch.eye(4, dtype=torch.float64)
    a = torch.zeros(4, dtype=torch.float64)
    est, grads = estimate_and_grads(u.float(), s.float(), a.float(), 0.7, backend=backend, alpha=alpha)
    ref, ref_grads = estimate_and_grads(u, s, a, 0.7, backend="reference", alpha=alpha)
    g, r = grads[1].double(), ref_grads[1]
    assert (r.abs() > 1e-3).sum() >= 8  # the entries that carried the error are not negligible here
    assert (g - r).abs().max() <= 2e-6 * r.abs().max(), (g - r).abs().max() / r.abs().max()


@pytest.mark.parametrize("backend", HARD)
@pytest.mark.parametrize("temperature", [1e-3, 1e-4])
def test_small_temperature_gradients_float32(backend, temperature):
    """At small T the scores are ~|<v, u>| / T (1e3-1e4) and each row's largest has p = exp(S - l) ~ 1: the backward
    must see the forward's S bitwise. The cpu kernel's x * (1/T) - l was contracted to one fma (-mfma) whose unrounded
    product differs from the forward's rounded S by up to ulp(S) / 2, so p, and the gradient at every row's largest
    score, were off by ~5e-4 relative at T = 1e-3 (2e-3 at 1e-4); the float32 reference is within ~1e-6 here."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        u, v = torch.randn(16, 8, generator=g).float(), torch.randn(16, 8, generator=g).float()
        kw = dict(alpha=0.9, temperature=temperature, anchor="student")  # (no near-ties here: the float32 floor)
        _, grads = estimate_and_grads(u, v, 1.0, 0.7, backend=backend, **kw)
        _, ref_grads = estimate_and_grads(u.double(), v.double(), 1.0, 0.7, backend="reference", **kw)
        for name, gr, r in zip(("student", "teacher"), grads, ref_grads):
            err = ((gr.double() - r).abs().max() / r.abs().max()).item()
            assert err <= 1e-5, (seed, name, err)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    """Half inputs are computed in float32 from the rounded values; gradients come back in the input dtype."""
    u, v, a = make_feats(40, 16, dtype, scale=0.5, seed=2)
    est, grads = estimate_and_grads(u, v, a, backend=backend, alpha=0.5)
    ref, ref_grads = estimate_and_grads(u.double(), v.double(), a.double(), backend="reference", alpha=0.5)
    assert est.dtype == torch.float32 and grads[0].dtype == dtype and grads[1].dtype == dtype
    assert_close(est, ref, torch.float32, "loss", "estimate", scale_floor=1.0 + ref.abs().item())
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, dtype, "mi_grad", "gradient", scale_floor=1.0 / 40)


@pytest.mark.parametrize("backend", HARD)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_cosine_normalises_in_float32(backend, dtype):
    """For "cosine" the fused ops take unit rows normalised in float32 and rounded once to the input dtype (bf16 rows
    stay bf16 for the tensor cores): the estimate is exact for those rounded unit rows, i.e. the dot critic on them.
    The normalisation's backward runs in float32: at D = 1 (unit rows are +-1, the exact gradient 0) it leaves no
    residue (normalised in fp16, it left up to 8e-3)."""
    u, v, a = make_feats(40, 16, dtype, scale=0.5, seed=2)
    est, _ = estimate_and_grads(u, v, a, backend=backend, alpha=0.9, critic="cosine", temperature=0.1)
    un, vn = (torch.nn.functional.normalize(x.float(), dim=-1).to(dtype).double() for x in (u, v))
    ref, _ = estimate_and_grads(un, vn, a.double(), backend="reference", alpha=0.9, temperature=0.1)
    assert_close(est, ref, torch.float32, "loss", "estimate", scale_floor=1.0 + 1 / 0.1)  # scores up to 1/T
    u1, v1, a1 = make_feats(8, 1, dtype, seed=3)
    _, grads = estimate_and_grads(u1, v1, a1, backend=backend, alpha=0.5, critic="cosine", temperature=0.1)
    for g in grads[:2]:
        assert g.abs().max().item() < 1e-5, g


@pytest.mark.parametrize("backend", HARD)
@pytest.mark.parametrize("critic", ["dot", "cosine"])
def test_student_anchor_is_the_teacher_anchor_with_sides_swapped(backend, critic):
    """anchor="student" (Distiller's orientation) scores each student row against the teachers: the same op with
    the sides exchanged, gradients included; and a different estimator from anchor="teacher" (not a transpose)."""
    u, v, a = make_feats(24, 8, torch.float64, seed=4)
    kw = dict(alpha=0.9, critic=critic, temperature=0.5, backend=backend)
    est, (gu, gv, ga) = estimate_and_grads(u, v, a, anchor="student", **kw)
    swapped, (gv2, gu2, ga2) = estimate_and_grads(v, u, a, anchor="teacher", **kw)
    assert_close(est, swapped, torch.float64, "loss", "estimate")
    for got, want, name in ((gu, gu2, "student"), (gv, gv2, "teacher"), (ga, ga2, "log_baseline")):
        assert_close(got, want, torch.float64, "mi_grad", f"d/d{name}")
    other = estimate_and_grads(u, v, a, anchor="teacher", **kw)[0]
    assert abs(est.item() - other.item()) > 1e-3


def test_mixed_dtypes_promote():
    u, v, a = make_feats(9, 3, torch.float64)
    est = mi_alpha(u.float(), v, log_baseline=a)
    assert est.dtype == torch.float64


# --------------------------------------------------------------------------------------------------------------------
# properties of the estimator (SPEC §6)


def scores(u, v, temperature=1.0):
    return v @ u.T / temperature


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha0_baseline1_is_nwj(backend):
    u, v, _ = make_feats(20, 4, seed=5)
    s = scores(u, v)
    off = ~torch.eye(20, dtype=torch.bool)
    nwj = 1 + (s.diagonal() - 1).mean() - torch.exp(s - 1)[off].mean()
    est = mi_alpha(u, v, alpha=0.0, log_baseline=1.0, backend=backend)
    assert_close(est, nwj, torch.float64, "loss", "NWJ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha0_is_tuba(backend):
    """alpha = 0 with any a: TUBA, 1 + mean_i(S_ii - a_i) - mean_{i != j} exp(S_ij - a_i)."""
    u, v, a = make_feats(20, 4, seed=6)
    s = scores(u, v)
    off = ~torch.eye(20, dtype=torch.bool)
    tuba = 1 + (s.diagonal() - a).mean() - torch.exp(s - a[:, None])[off].mean()
    est = mi_alpha(u, v, alpha=0.0, log_baseline=a, backend=backend)
    assert_close(est, tuba, torch.float64, "loss", "TUBA")


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha1_is_loo_infonce_and_bounded(backend):
    """alpha = 1: the marginal term is exactly 1, so I_1 = mean_{i, j != i}(S_ii - L_ij) <= log(N - 1), whatever
    the critic (here a strongly correlated pair, so the bound is nearly reached)."""
    n = 33
    u, v, a = make_feats(n, 8, corr=0.999, seed=7)
    u, v = torch.nn.functional.normalize(u, dim=1), torch.nn.functional.normalize(v, dim=1)  # a near-optimal critic
    s = scores(u, v, 0.05)
    off = ~torch.eye(n, dtype=torch.bool)
    loo = torch.stack([torch.logsumexp(s[:, torch.arange(n) != j], dim=1) for j in range(n)], dim=1)
    loo = loo - math.log(n - 1)
    expected = (s.diagonal()[:, None] - loo)[off].mean()
    est = mi_alpha(u, v, alpha=1.0, log_baseline=a, temperature=0.05, backend=backend)
    assert_close(est, expected, torch.float64, "loss", "InfoNCE")
    assert est.item() <= math.log(n - 1) + 1e-12
    assert est.item() > math.log(n - 1) - 0.5  # the bound is nearly reached: the test can tell a wrong baseline
    # and the marginal term alone: M = mean_{i != j} exp(S_ij - L_ii) = 1
    marginal = torch.exp(s - loo.diagonal()[:, None])[off].mean()
    assert abs(marginal.item() - 1.0) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_one_gives_the_baseline_alone_a_zero_gradient(backend):
    """At alpha = 1 the estimate does not depend on log_baseline: with only it requiring grad, backward gives zeros
    on every backend (the reference once had no graph to it: torch's "does not require grad")."""
    u, v, a = make_feats(6, 4, seed=3)
    a.requires_grad_(True)
    mi_alpha(u, v, alpha=1.0, log_baseline=a, backend=backend).backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.01, 0.5])
def test_permutation_invariance(backend, alpha):
    u, v, a = make_feats(50, 5, seed=8)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    e1 = mi_alpha(u, v, alpha=alpha, log_baseline=a, backend=backend)
    e2 = mi_alpha(u[perm], v[perm], alpha=alpha, log_baseline=a[perm], backend=backend)
    assert_close(e2, e1, torch.float64, "loss", "permuted")
    # and swapping only the student's rows breaks the pairing: the estimate drops
    e3 = mi_alpha(u[perm], v, alpha=alpha, log_baseline=a, backend=backend)
    assert e3.item() < e1.item() - 0.1


def test_gradients_match_finite_differences():
    """gradcheck of the fused op through the public API (u, v and a Tensor log_baseline), float64."""
    if not fastdistill.extension_available():
        pytest.skip("fastdistill._C is not built")
    u, v, a = make_feats(11, 3, seed=9)
    for alpha in ALPHAS:
        for critic in ("dot", "cosine"):
            def f(u, v, a):
                return mi_alpha(u, v, alpha=alpha, log_baseline=a, critic=critic, temperature=0.7,
                                backend="cpu")  # fmt: skip

            args = [x.clone().requires_grad_() for x in (u, v, a)]
            assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8)


@requires_ext
def test_deterministic():
    u, v, a = make_feats(300, 40, torch.float32, seed=10)
    runs = [estimate_and_grads(u, v, a, backend="cpu", alpha=0.01) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for g0, g1 in zip(runs[0][1], runs[1][1]):
        assert torch.equal(g0, g1)


@requires_ext
def test_only_needed_gradients():
    """A frozen teacher (features without grad) and a float baseline: only the student gets a gradient."""
    u, v, _ = make_feats(10, 3)
    u = u.requires_grad_()
    est = mi_alpha(u, v, backend="cpu")
    (g,) = torch.autograd.grad(est, [u])
    assert g.shape == u.shape and torch.isfinite(g).all()
    with torch.no_grad():
        assert mi_alpha(u, v, backend="cpu").requires_grad is False


# --------------------------------------------------------------------------------------------------------------------
# registration


@requires_ext
def test_opcheck():
    u, v, a = make_feats(70, 5, torch.float32)
    args = (u.requires_grad_(), v.requires_grad_(), a.float().requires_grad_(), 0.3, 0.9)
    torch.library.opcheck(torch.ops.fastdistill.mi_alpha.default, args)
    est, stats = torch.ops.fastdistill.mi_alpha(*[x.detach() if isinstance(x, torch.Tensor) else x for x in args])
    bargs = (torch.tensor(0.7), u.detach(), v.detach(), a.float(), stats, 0.3, 0.9)
    torch.library.opcheck(torch.ops.fastdistill.mi_alpha_backward.default, bargs)


@requires_ext
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    u, v, a = make_feats(30, 4, torch.float32)

    def f(u, v, a):
        return -mi_alpha(u, v, alpha=0.01, log_baseline=a, critic="cosine", temperature=0.5,
                         backend="cpu")  # fmt: skip

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    eager = estimate_and_grads(u, v, a.float(), backend="cpu", alpha=0.01, critic="cosine", temperature=0.5)
    args = [x.clone().requires_grad_() for x in (u, v, a.float())]
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    assert_close(-loss, eager[0], torch.float32, "loss", "compiled estimate")
    for g, r in zip(grads, eager[1]):
        assert_close(-g, r, torch.float32, "mi_grad", "compiled gradient", scale_floor=1 / 30)


@requires_ext
def test_module_compiles():
    torch._dynamo.reset()
    torch.manual_seed(0)
    mi = fastdistill.MIAlphaLoss(6, 10, proj_dim=8, hidden_dim=16, pooling="mean")
    hs, ht, mask = torch.randn(4, 5, 6), torch.randn(4, 5, 10), torch.ones(4, 5)
    mask[1, 3:] = 0
    expected = mi(hs, ht, mask)
    got = torch.compile(mi, fullgraph=True, backend="aot_eager")(hs, ht, mask)
    assert_close(got, expected, torch.float32, "loss", "compiled module")


def test_module_takes_half_hidden_states_and_reference_keeps_float32_under_autocast():
    """bf16 / fp16 hidden states (an autocast forward's) into a float32 MIAlphaLoss called outside autocast: cast to
    the projections' dtype (a Linear refused them), the value that of the upcast features. The reference estimator
    inside an autocast region stays float32 (its critic matmul was taken in bf16: 3e-3 off)."""
    torch.manual_seed(0)
    mi = fastdistill.MIAlphaLoss(6, 10, proj_dim=8, hidden_dim=16, pooling="mean", backend="reference")
    hs, ht, mask = torch.randn(4, 5, 6), torch.randn(4, 5, 10), torch.ones(4, 5)
    for dtype in (torch.bfloat16, torch.float16):
        got = mi(hs.to(dtype), ht.to(dtype), mask)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, mi(hs.to(dtype).float(), ht.to(dtype).float(), mask))
    u, v, a = make_feats(12, 4, torch.float32)
    kw = dict(alpha=0.01, log_baseline=a, critic="dot", temperature=1.0, backend="reference")
    exact = fastdistill.mi_alpha(u.double(), v.double(), **{**kw, "log_baseline": a.double()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastdistill.mi_alpha(u, v, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_reference_estimator_compiles_to_one_graph():
    """The benchmarks' eager and compile baselines are the reference estimator: one graph under torch.compile, no
    data-dependent shape (a boolean index was a nonzero: three graphs, and a host sync per step on a GPU)."""
    torch._dynamo.reset()
    u, v, a = (x.requires_grad_() for x in make_feats(12, 4, torch.float32))  # as benchmarked: fwd + bwd
    f = functools.partial(reference.mi_alpha, alpha=0.01, critic="dot", temperature=1.0)
    explained = torch._dynamo.explain(f)(u, v, log_baseline=a)
    assert explained.graph_count == 1, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()
    expected = f(u, v, log_baseline=a)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(u, v, log_baseline=a)
    assert_close(got, expected, torch.float32, "loss", "compiled reference estimate")


# --------------------------------------------------------------------------------------------------------------------
# memory: the fused kernels never hold the N x N matrix

MEMORY_PROBE = r"""
import resource, sys, torch, fastdistill
torch.set_num_threads(2)
n, d = int(sys.argv[1]), 8
u = torch.randn(n, d, requires_grad=True); v = (u.detach() + torch.randn(n, d)).requires_grad_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
est = fastdistill.mi_alpha(u, v, alpha=0.01, backend="cpu")
est.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(est) and torch.isfinite(u.grad).all()
print((after - before) * 1024)
"""


@requires_ext
def test_memory_is_linear_in_n():
    """N = 16384: the N x N float32 matrix alone is 1 GiB; the kernels use [64, N] strips per thread."""
    n = 16384
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(n)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 64 * 2**20, f"peak RSS grew by {grew / 2**20:.0f} MiB; n x n would be {n * n * 4 / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.5}, "alpha must be finite and in \\[0.0, 1.0\\]"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"temperature": 0.0}, "temperature must be finite and in \\[1e-19"),
        ({"temperature": float("inf")}, "temperature"),
        ({"critic": "bilinear"}, "critic must be one of 'dot', 'cosine'"),
        ({"anchor": "both"}, "anchor must be one of 'student', 'teacher'"),
        ({"backend": "gpu"}, "backend must be one of"),
        ({"log_baseline": float("nan")}, "log_baseline must be finite"),
        ({"log_baseline": torch.zeros(4)}, "log_baseline must be a float or a Tensor of shape \\[N\\] = \\[5\\]"),
        ({"log_baseline": torch.zeros(5, 1)}, "log_baseline must be a float or a Tensor of shape"),
    ],
)
def test_bad_arguments(kwargs, match):
    u, v, _ = make_feats(5, 3)
    with pytest.raises(ValueError, match=match):
        mi_alpha(u, v, **kwargs)


def test_bad_shapes_and_types():
    u, v, _ = make_feats(5, 3)
    with pytest.raises(ValueError, match="N >= 2"):
        mi_alpha(u[:1], v[:1])
    with pytest.raises(ValueError, match="teacher_feats has shape \\(5, 4\\), expected \\(5, 3\\)"):
        mi_alpha(u, torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="student_feats must have shape \\[N, D\\], got \\(5,\\)"):
        mi_alpha(u[:, 0], v[:, 0])
    with pytest.raises(TypeError, match="student_feats must be float32"):
        mi_alpha(u.long(), v)
    with pytest.raises(TypeError, match="teacher_feats must be a Tensor"):
        mi_alpha(u, v.tolist())
    with pytest.raises(TypeError, match="log_baseline must be a floating Tensor"):
        mi_alpha(u, v, log_baseline=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="D = 0"):
        mi_alpha(u[:, :0], v[:, :0])


@requires_ext
def test_raw_op_checks_its_own_arguments():
    """torch.ops.fastdistill.mi_alpha (what torch.compile and opcheck call) names a wrong log_baseline shape and
    refuses integer features itself, not only through the functional API."""
    u, v, a = make_feats(4, 3)
    with pytest.raises(ValueError, match=r"log_baseline must be \[N\] = \[4\], got \[2, 2\]"):
        torch.ops.fastdistill.mi_alpha(u, v, a.reshape(2, 2), 0.5, 1.0)
    with pytest.raises(TypeError, match="student and teacher must be floating point, got Int"):
        torch.ops.fastdistill.mi_alpha(u.int(), v.int(), a, 0.5, 1.0)


def test_named_backend_that_cannot_run_says_why():
    u, v, _ = make_feats(5, 3)
    with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs: .*needs all tensors on cuda"):
        mi_alpha(u, v, backend="cuda")


# --------------------------------------------------------------------------------------------------------------------
# MIAlphaLoss


def test_module_pooling_and_rows():
    torch.manual_seed(0)
    mi = fastdistill.MIAlphaLoss(6, 10, proj_dim=8, baseline="constant", pooling="none", backend="reference")
    hs, ht = torch.randn(3, 4, 6), torch.randn(3, 4, 10)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    rows_s, rows_t = hs[mask.bool()], ht[mask.bool()]  # 7 token rows
    expected = -fastdistill.mi_alpha(mi.student_proj(rows_s), mi.teacher_proj(rows_t), log_baseline=1.0,
                                                 backend="reference")  # fmt: skip
    assert_close(mi(hs, ht, mask), expected, torch.float32, "loss", "pooling=none")
    mi.pooling = "mean"
    m = mask.float().unsqueeze(-1)
    ps, pt = (hs * m).sum(1) / m.sum(1), (ht * m).sum(1) / m.sum(1)
    expected = -fastdistill.mi_alpha(mi.student_proj(ps), mi.teacher_proj(pt), backend="reference")
    assert_close(mi(hs, ht, mask), expected, torch.float32, "loss", "pooling=mean")
    mi.pooling = "cls"
    expected = -fastdistill.mi_alpha(mi.student_proj(hs[:, 0]), mi.teacher_proj(ht[:, 0]), backend="reference")
    assert_close(mi(hs, ht), expected, torch.float32, "loss", "pooling=cls")


def test_module_defaults_are_the_functions():
    """MIAlphaLoss passes its estimator options to mi_alpha: the same defaults (Distiller's setup, SPEC §2)."""
    fn = inspect.signature(fastdistill.mi_alpha).parameters
    mod = inspect.signature(fastdistill.MIAlphaLoss).parameters
    for name in ("alpha", "critic", "temperature", "anchor", "backend"):
        assert mod[name].default == fn[name].default, name
    assert (fn["alpha"].default, fn["critic"].default, fn["anchor"].default) == (0.9, "cosine", "student")


def test_module_learned_baseline_starts_at_one_and_trains():
    torch.manual_seed(0)
    mi = fastdistill.MIAlphaLoss(4, 4, proj_dim=8, hidden_dim=16, alpha=0.0)
    x = torch.randn(32, 4)
    y = x + 0.1 * torch.randn(32, 4)
    a = mi.baseline(y).squeeze(-1)
    assert torch.equal(a, torch.ones(32))
    expected = -fastdistill.mi_alpha(mi.student_proj(x), mi.teacher_proj(y), alpha=0.0, log_baseline=1.0)
    loss = mi(x, y)
    assert_close(loss, expected, torch.float32, "loss", "learned baseline at init")
    loss.backward()
    for name, p in mi.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert mi.baseline[2].weight.grad.abs().sum() > 0  # the baseline network receives a gradient


def test_module_errors():
    with pytest.raises(ValueError, match="pooling must be one of"):
        fastdistill.MIAlphaLoss(4, 4, pooling="max")
    with pytest.raises(ValueError, match="baseline must be one of"):
        fastdistill.MIAlphaLoss(4, 4, baseline="zero")
    with pytest.raises(ValueError, match="anchor must be one of"):
        fastdistill.MIAlphaLoss(4, 4, anchor="rows")
    with pytest.raises(ValueError, match="proj_dim must be a positive int"):
        fastdistill.MIAlphaLoss(4, 4, proj_dim=0)
    mi = fastdistill.MIAlphaLoss(4, 6)
    with pytest.raises(ValueError, match="attention_mask must be \\[B, L\\] = \\[2, 3\\]"):
        mi(torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.ones(2, 4))
    with pytest.raises(ValueError, match="student_hidden gives 2 rows but teacher_hidden gives 3"):
        mi(torch.randn(2, 4), torch.randn(3, 6))
    with pytest.raises(ValueError, match="student_hidden must be \\[N, D\\] or \\[B, L, D\\]"):
        mi(torch.randn(4), torch.randn(4, 6))


def test_reference_is_the_spec_formula():
    """The reference itself against a literal transcription of SPEC §6 (leave-one-out sums by brute force)."""
    n = 9
    u, v, a = make_feats(n, 4, seed=11)
    for alpha in ALPHAS:
        s = scores(u, v, 0.6)
        loo = torch.stack([torch.logsumexp(s[:, torch.arange(n) != j], 1) for j in range(n)], 1) - math.log(n - 1)
        b = torch.log(alpha * loo.exp() + (1 - alpha) * a.exp()[:, None])
        off = ~torch.eye(n, dtype=torch.bool)
        joint = (s.diagonal()[:, None] - b)[off].mean()
        marginal = torch.exp(s - b.diagonal()[:, None])[off].mean()
        got = reference.mi_alpha(u, v, alpha=alpha, log_baseline=a, critic="dot", temperature=0.6)
        assert_close(got, 1 + joint - marginal, torch.float64, "loss", f"alpha={alpha}")


@pytest.mark.parametrize("temperature", [0.0, 1e-30, 1e30, float("inf")])
def test_mialphaloss_checks_temperature_at_construction(temperature):
    """MIAlphaLoss takes mi_alpha's temperature range, checked when the module is built (not at the first call)."""
    with pytest.raises(ValueError, match=r"temperature must be finite and in \[1e-19, 1e\+19\]"):
        fastdistill.MIAlphaLoss(6, 10, proj_dim=8, temperature=temperature)


def test_mi_alpha_loss_of_masked_tokens_compiles_fullgraph():
    """pooling="none" with an attention mask: one index set picks both sides' rows, so torch.compile(fullgraph=True)
    sees one data-dependent row count (two masks gave two it could not tell apart), and N >= 2 is asserted, not
    branched on; the compiled loss and gradients are eager's."""
    torch.manual_seed(0)
    loss_fn = fastdistill.MIAlphaLoss(5, 3, proj_dim=4, pooling="none", baseline="constant")
    hs, ht = torch.randn(3, 4, 5), torch.randn(3, 4, 3)
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[0, 2:] = 0
    torch._dynamo.reset()
    a, b = hs.clone().requires_grad_(), hs.clone().requires_grad_()
    got = torch.compile(lambda x: loss_fn(x, ht, mask), fullgraph=True, backend="aot_eager")(a)
    want = loss_fn(b, ht, mask)
    (got + want).backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", FUSED + [pytest.param("triton", marks=requires_triton)])
def test_more_rows_than_float32_statistics_index_are_refused(backend):
    """The fused kernels keep each row's argmax column in float32 statistics: exact up to 2**24 rows. Past that the
    backend says so (auto would take the reference) instead of pairing rows with the wrong columns."""
    u = torch.zeros(2**24 + 1, 1)
    with pytest.raises(ValueError, match=r"at most 2\*\*24 rows in float32"):
        mi_alpha(u, u, backend=backend)
