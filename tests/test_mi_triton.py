"""The Triton MI-alpha ops (fastdistill/ops/triton/mi_alpha.py) on CPU tensors in Triton's interpreter: estimate,
stats and all three gradients against the float64 reference, determinism, opcheck, and no N x N temporaries.

The interpreter runs the kernels with 16-wide tiles, so N = 17 and 70 cross row and column tiles with a ragged last
one and D = 40 crosses feature chunks (score sums and output chunks of the backward)."""

import math

import pytest
import torch
from conftest import requires_triton
from tolerances import assert_close
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from fastdistill.ops import reference
from fastdistill.ops.registration import MI_STATS_ROWS

pytestmark = requires_triton


@pytest.fixture(scope="module")
def mi():
    from fastdistill.ops.triton import mi_alpha  # defines fastdistill::mi_alpha_triton (and its backward)

    return mi_alpha


def make_inputs(n, d, dtype=torch.float64, correlated=True, scale=1.0, seed=0):
    """student u, teacher v [N, D] with |rows| ~ scale (positive pairs v_i = 0.8 u_i + 0.5 noise when
    ``correlated``, else independent), and log-baselines a [N] around 1; all rounded to ``dtype`` first."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(d))
    noise = torch.randn(n, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(d))
    v = 0.8 * u + 0.5 * noise if correlated else noise
    a = 1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    a_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return u.to(dtype), v.to(dtype), a.to(a_dtype)


def run_op(op, u, v, a, alpha, temperature, grad_output=0.7):
    """(estimate, stats, d student, d teacher, d log_baseline) through the op and its registered autograd."""
    u, v, a = (x.detach().clone().requires_grad_() for x in (u, v, a))
    est, stats = op(u, v, a, alpha, temperature)
    est.backward(torch.tensor(grad_output, dtype=est.dtype))
    return est.detach(), stats, u.grad, v.grad, a.grad


def run_reference(u, v, a, alpha, temperature, grad_output=0.7):
    u, v, a = (x.detach().double().requires_grad_() for x in (u, v, a))
    est = reference.mi_alpha(u, v, alpha=alpha, log_baseline=a, critic="dot", temperature=temperature)
    est.backward(torch.tensor(grad_output, dtype=torch.float64))
    # alpha = 1: the estimate does not depend on the baseline (autograd leaves its grad None)
    ga = torch.zeros_like(a) if a.grad is None else a.grad
    return est.detach(), u.grad, v.grad, ga


def check_against_reference(mi, u, v, a, alpha, temperature, tol_dtype, grad_output=0.7):
    est, stats, gu, gv, ga = run_op(mi.mi_alpha_triton, u, v, a, alpha, temperature, grad_output)
    r_est, r_gu, r_gv, r_ga = run_reference(u, v, a, alpha, temperature, grad_output)
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    assert est.dtype == acc and est.dim() == 0 and stats.dtype == acc and stats.shape == (MI_STATS_ROWS, u.shape[0])
    assert gu.dtype == u.dtype and gv.dtype == v.dtype and ga.dtype == a.dtype
    assert_close(est, r_est, tol_dtype, "loss", "estimate")
    assert_close(gu, r_gu, tol_dtype, "mi_grad", "d student")
    assert_close(gv, r_gv, tol_dtype, "mi_grad", "d teacher")
    assert_close(ga, r_ga, tol_dtype, "mi_grad", "d log_baseline")
    # stats[0]: the row log-sum-exp over all columns; stats[5]: the column of the row's largest score
    s = v.double() @ u.double().T / temperature
    assert_close(stats[0], torch.logsumexp(s, dim=1), tol_dtype, "loss", "stats[0] = l")
    if tol_dtype == torch.float64:
        assert torch.equal(stats[5].long(), s.argmax(1)), "stats[5] = k*"


ALPHAS = [0.0, 0.01, 0.5, 1.0]
# (n, d, temperature, correlated, alphas): every alpha on the small shapes, two on N = 70 (the interpreter is slow)
CASES64 = [(2, 1, 0.5, True, ALPHAS), (3, 5, 1.7, False, ALPHAS), (17, 40, 0.5, True, ALPHAS),
           (70, 5, 1.7, True, [0.01, 1.0])]  # fmt: skip
CASES32 = [(3, 5, 0.5, True, ALPHAS), (17, 40, 1.7, False, ALPHAS), (70, 5, 0.5, True, [0.0, 0.5])]


def _expand(cases):
    return [(n, d, t, c, alpha) for n, d, t, c, alphas in cases for alpha in alphas]


@pytest.mark.parametrize("n, d, temperature, correlated, alpha", _expand(CASES64))
def test_float64_matches_reference(mi, n, d, temperature, correlated, alpha):
    u, v, a = make_inputs(n, d, torch.float64, correlated, seed=n + d)
    check_against_reference(mi, u, v, a, alpha, temperature, torch.float64)


@pytest.mark.parametrize("n, d, temperature, correlated, alpha", _expand(CASES32))
def test_float32_matches_reference(mi, n, d, temperature, correlated, alpha):
    u, v, a = make_inputs(n, d, torch.float32, correlated, seed=n)
    check_against_reference(mi, u, v, a, alpha, temperature, torch.float32, grad_output=-1.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["one strip", "strips of 7 rows", "strips of 16 rows", "strips of 7 rows in 2s",
                                 "strips of 4 rows in 3s", "tiles"])  # fmt: skip
def test_half_matches_reference(mi, dtype, how, monkeypatch):
    """Half-precision features: by strips (S from a float32 matmul, G in the features' dtype, scaled by N, to the
    matmuls of the gradients), one strip or several with a ragged last one, N = 33 with 4-row programs, the backward's
    gradient GEMMs over groups of strips (one group, or groups of 2 or 3 with ragged last ones); or by the tile
    kernels (FASTDISTILL_MI_STRIPS=0), where they go to tl.dot as they are. Gradients come back in their dtype."""
    words = how.split()
    if how == "tiles":
        monkeypatch.setenv("FASTDISTILL_MI_STRIPS", "0")
    elif how != "one strip":
        monkeypatch.setenv("FASTDISTILL_MI_STRIP_ROWS", words[2])
        monkeypatch.setenv("FASTDISTILL_MI_GROUP_STRIPS", words[-1][:-1] if words[-1].endswith("s") and
                           words[-1][0].isdigit() else "1000")  # fmt: skip
    assert mi.use_strips(dtype) == (how != "tiles")
    u, v, a = make_inputs(33, 24, dtype, True, seed=3)
    check_against_reference(mi, u, v, a, 0.01, 0.5, dtype)


def test_strip_rows(mi, monkeypatch):
    """S (float32) and G of a strip fit max(64 MiB, 2 N D bytes of features), in rows that are a multiple of 64, at
    least 512 (or N)."""
    assert mi.strip_rows(16384, 768, torch.bfloat16) == 640  # 64 MiB / (6 B x 16384) = 682
    assert mi.strip_rows(65536, 768, torch.bfloat16) == 512  # 2 N D x 2 B = 192 MiB / (6 B x 65536)
    assert mi.strip_rows(65536, 128, torch.bfloat16) == 512  # (64 MiB alone: 128 rows, 512 strips)
    assert mi.strip_rows(262144, 768, torch.bfloat16) == 512  # (256 rows: the same)
    assert mi.strip_rows(33, 24, torch.float16) == 33
    assert mi.strip_rows(100, 8, torch.bfloat16) == 100
    monkeypatch.setenv("FASTDISTILL_MI_STRIP_ROWS", "0")
    with pytest.raises(ValueError, match="FASTDISTILL_MI_STRIP_ROWS"):
        mi.strip_rows(100, 8, torch.bfloat16)
    # the backward's groups: G of a group fits the same budget alone
    assert mi.group_strips(16384, 768, torch.bfloat16, 640) == 3  # 64 MiB / (2 B x 640 x 16384)
    assert mi.group_strips(65536, 768, torch.bfloat16, 512) == 3  # 192 MiB / (2 B x 512 x 65536)
    assert mi.group_strips(65536, 128, torch.bfloat16, 512) == 1
    assert mi.group_strips(33, 24, torch.bfloat16, 7) == 5  # at most every strip
    monkeypatch.setenv("FASTDISTILL_MI_GROUP_STRIPS", "0")
    with pytest.raises(ValueError, match="FASTDISTILL_MI_GROUP_STRIPS"):
        mi.group_strips(100, 8, torch.bfloat16, 8)
    assert not mi.use_strips(torch.float32) and not mi.use_strips(torch.float64)


def test_saturated_rows(mi):
    """Large scores (the positive pair dominates its row, p_ii ~ 1): float64 still matches to 1e-9, float32 to
    ~2e-5 of the largest gradient."""
    u, v, a = make_inputs(20, 40, torch.float64, True, scale=3.0, seed=5)
    check_against_reference(mi, u, v, a, 1.0, 0.5, torch.float64)
    u32, v32, a32 = u.float(), v.float(), a.float()
    est, _, gu, gv, _ = run_op(mi.mi_alpha_triton, u32, v32, a32, 1.0, 0.5)
    r_est, r_gu, r_gv, _ = run_reference(u32, v32, a32, 1.0, 0.5)
    assert_close(est, r_est, torch.float32, "loss", "estimate")
    for g, r in ((gu, r_gu), (gv, r_gv)):
        assert (g.double() - r).abs().max() <= 2e-4 * r.abs().max()


def test_saturated_rows_float32_diagonal(mi):
    """dI/dS_ii = 1/N - p_ii C_i would cancel in float32 as p_ii -> 1 (true value ~1e-10, ~3e-7 computed that way:
    ~1% of the largest feature gradient); mi_math.h's q_ii C_i + sum g / D form keeps it to float32 tolerance."""
    u, v, a = make_inputs(17, 40, torch.float32, True, scale=6.3, seed=1)
    check_against_reference(mi, u, v, a, 1.0, 1.7, torch.float32, grad_output=1.0)


def test_only_some_inputs_require_grad(mi):
    """Gradients only where asked (the backward op is skipped for the features when neither requires grad)."""
    u, v, a = make_inputs(9, 6, torch.float64, seed=1)
    uu = u.clone().requires_grad_()
    est, _ = mi.mi_alpha_triton(uu, v, a, 0.01, 1.0)
    est.backward()
    r_est, r_gu, _, _ = run_reference(u, v, a, 0.01, 1.0, grad_output=1.0)
    assert_close(uu.grad, r_gu, torch.float64, "mi_grad", "d student")
    aa = a.clone().requires_grad_()
    est, _ = mi.mi_alpha_triton(u, v, aa, 0.01, 1.0)
    est.backward()
    assert aa.grad is not None and u.grad is None and v.grad is None


def test_deterministic(mi):
    u, v, a = make_inputs(40, 5, torch.float32, seed=2)
    first = run_op(mi.mi_alpha_triton, u, v, a, 0.01, 0.5)
    second = run_op(mi.mi_alpha_triton, u, v, a, 0.01, 0.5)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_backward_op_scales_by_grad(mi):
    """mi_alpha_backward_triton(grad, ...) is linear in grad: grad = 0 gives exact zeros, 2.5 gives 2.5x grad 1."""
    u, v, a = make_inputs(17, 5, torch.float64, seed=4)
    _, stats = mi.mi_alpha_triton(u, v, a, 0.5, 0.5)
    one = mi.mi_alpha_backward_triton(torch.tensor(1.0, dtype=torch.float64), u, v, a, stats, 0.5, 0.5)
    zero = mi.mi_alpha_backward_triton(torch.tensor(0.0, dtype=torch.float64), u, v, a, stats, 0.5, 0.5)
    big = mi.mi_alpha_backward_triton(torch.tensor(2.5, dtype=torch.float64), u, v, a, stats, 0.5, 0.5)
    for g1, g0, g2 in zip(one, zero, big):
        assert not g0.any() and g1.abs().max() > 0
        torch.testing.assert_close(g2, 2.5 * g1, rtol=1e-12, atol=0)


def test_ties_and_largest_score_across_tiles(mi):
    """Duplicated student rows give every teacher row tied scores in columns 3, 5 (one tile) and 20, 40 (other
    tiles); rows 0..2 score column 3 highest, so k* must be the first of the tie (stats[5]: a later tile takes over
    only with a strictly larger score), and the largest-score terms (z, c*, dI/dS at k*) must match the reference.
    Features are multiples of 1/8, so every score is exact and the ties are exact in any summation order."""
    g = torch.Generator().manual_seed(11)
    u = torch.randint(-8, 9, (45, 6), generator=g).double() / 8
    v = torch.randint(-8, 9, (45, 6), generator=g).double() / 8
    a = 1.0 + torch.randint(-4, 5, (45,), generator=g).double() / 8
    for j in (5, 20, 40):
        u[j] = u[3]
    v[:3] = 2.0 * u[3] + v[:3] / 8
    _, stats, *_ = run_op(mi.mi_alpha_triton, u, v, a, 0.5, 0.5)
    s = v @ u.T / 0.5
    assert torch.equal(stats[5].long(), s.argmax(1)) and (stats[5, :3] == 3).all()
    check_against_reference(mi, u, v, a, 0.5, 0.5, torch.float64)
    check_against_reference(mi, u, v, a, 1.0, 0.5, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stats_match_cpu_kernel(mi, dtype):
    """The same algebra as csrc/cpu/mi_alpha_cpu.cpp: stats (all rows; k* exactly), estimate and gradients agree."""
    if not hasattr(torch.ops.fastdistill, "mi_alpha") or not torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastdistill::mi_alpha", "CPU"
    ):
        pytest.skip("fastdistill._C has no CPU mi_alpha kernel")
    u, v, a = make_inputs(37, 9, dtype, True, seed=12)
    got = mi.mi_alpha_triton(u, v, a, 0.01, 0.7)
    want = torch.ops.fastdistill.mi_alpha(u, v, a, 0.01, 0.7)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=rtol)
    assert torch.equal(got[1][5], want[1][5])
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=rtol * want[1].abs().max().item())
    g = torch.tensor(0.9, dtype=got[0].dtype)
    for x, y in zip(mi.mi_alpha_backward_triton(g, u, v, a, got[1], 0.01, 0.7),
                    torch.ops.fastdistill.mi_alpha_backward(g, u, v, a, want[1], 0.01, 0.7)):  # fmt: skip
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item())


# ---- torch.library -------------------------------------------------------------------------------------------------


def _opcheck_samples():
    u, v, a = make_inputs(5, 3, torch.float32, seed=6)
    yield "fwd", (u.clone().requires_grad_(), v.clone().requires_grad_(), a.clone().requires_grad_(), 0.01, 0.7)
    u64, v64, a64 = make_inputs(4, 17, torch.float64, seed=7)
    yield "fwd", (u64.requires_grad_(), v64, a64, 1.0, 2.0)
    yield "fwd", (u.bfloat16().requires_grad_(), v.bfloat16(), a, 0.0, 1.0)
    yield "bwd", (torch.tensor(0.5), u, v, a, None, 0.3, 1.5)


@pytest.mark.parametrize("i", range(4))
def test_opcheck(mi, i):
    """All of opcheck's checks (schema, autograd registration, fake tensor, aot_dispatch_dynamic) run: under the
    interpreter the ops are opaque custom_ops with fake kernels (wrap_triton cannot trace the interpreter), which
    every check supports, so none is skipped here. The triton_op form is traced on a GPU (test_mi_triton_gpu.py)."""
    kind, args = list(_opcheck_samples())[i]
    if kind == "fwd":
        torch.library.opcheck(mi.mi_alpha_triton._opoverload, args)
    else:
        grad, u, v, a, _, alpha, t = args
        _, stats = mi.mi_alpha_triton(u, v, a, alpha, t)
        torch.library.opcheck(mi.mi_alpha_backward_triton._opoverload, (grad, u, v, a, stats, alpha, t))


def test_compile_fullgraph_aot_eager(mi):
    """torch.compile(fullgraph=True) takes the op (opaque here) and its autograd without graph breaks."""
    u, v, a = make_inputs(9, 4, torch.float32, seed=8)

    def fn(u, v, a):
        return mi.mi_alpha_triton(u, v, a, 0.01, 0.5)[0] * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = [t.clone().requires_grad_() for t in (u, v, a)]
    y = [t.clone().requires_grad_() for t in (u, v, a)]
    out_c, out_e = compiled(*x), fn(*y)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    for p, q in zip(x, y):
        torch.testing.assert_close(p.grad, q.grad)


# ---- memory --------------------------------------------------------------------------------------------------------


class _RecordSizes(TorchDispatchMode):
    """Records the size in bytes of every tensor an aten op returns (bytes, since Triton's interpreter moves
    storages around as uint8 tensors)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel() * t.element_size(), str(func)))
        return out


def _biggest_allocation(mi, u, v, a) -> tuple[tuple[int, str], Tensor]:
    """(bytes, op) of the largest tensor an aten op returns in one forward + backward of the plain implementations,
    and the forward's stats."""
    with _RecordSizes() as rec:
        _, stats = mi._mi_alpha_triton(u, v, a, 0.01, 0.5)
        mi._mi_alpha_backward_triton(torch.tensor(1.0), u, v, a, stats, 0.01, 0.5)
    assert len(rec.sizes) > 5, "the recorder saw no ops"
    return max(rec.sizes), stats


def test_no_n_by_n_temporaries(mi):
    """The plain implementations (the ops' bodies: allocations and kernel launches) allocate nothing of N x N size:
    no aten op returns more bytes than an [N, D] feature tensor or the [7, N] stats. The recorder does see the
    reference's N x N score matrix (N = 40 > 6 D), so the check can fail."""
    n, d = 40, 5
    u, v, a = make_inputs(n, d, torch.float32, seed=9)
    biggest, stats = _biggest_allocation(mi, u, v, a)
    assert biggest[0] <= max(u.nbytes, stats.nbytes), f"{biggest[1]} returned {biggest[0]} bytes"
    assert n * n * 4 > 2 * max(u.nbytes, stats.nbytes)
    with _RecordSizes() as rec_ref:
        reference.mi_alpha(u, v, alpha=0.01, log_baseline=1.0, critic="dot", temperature=0.5)
    assert max(rec_ref.sizes)[0] >= n * n * 4


def test_strips_hold_one_strip(mi, monkeypatch):
    """By strips (bfloat16), the largest temporaries are one strip's S (float32 [rows, N]), a group's G (here 2
    strips: bf16 [16, N], as large) and the float32 d(student) accumulator [N, D]: never N x N. N = 40 in strips of 8
    rows; the check can fail (N x N float32 is bigger than both)."""
    monkeypatch.setenv("FASTDISTILL_MI_STRIP_ROWS", "8")
    monkeypatch.setenv("FASTDISTILL_MI_GROUP_STRIPS", "2")
    n, d = 40, 5
    u, v, a = make_inputs(n, d, torch.bfloat16, seed=9)
    biggest, stats = _biggest_allocation(mi, u, v, a)
    group32 = 16 * n * 4  # (a group's G in float32: the CPU's matmul operand here; cuBLAS takes bf16 on a GPU)
    assert biggest[0] <= max(group32, n * d * 4, stats.nbytes), f"{biggest[1]} returned {biggest[0]} bytes"
    assert n * n * 4 > 2 * max(group32, n * d * 4, stats.nbytes)
