"""The Triton MI-alpha kernels compiled on a GPU (skipped without CUDA): every dtype against the float64 reference,
LLM-sized shapes (N up to 16384, D = 768) within O(N D) memory, determinism, and torch.compile(fullgraph=True)
tracing into the triton_ops. The interpreter twin of these checks is tests/test_mi_triton.py."""

import math

import pytest
import torch
from tolerances import assert_close

from fastdistill.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def mi():
    from fastdistill.ops.triton import mi_alpha

    return mi_alpha


def make_inputs(n, d, dtype, seed=0, correlated=True, normalise=False):
    """CUDA student u, teacher v [N, D] (v_i = 0.8 u_i + 0.5 noise: correlated positive pairs), rows of norm ~1
    (exactly 1 with ``normalise``, as the cosine critic hands them over), and log-baselines a [N]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    u = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float64) / math.sqrt(d)
    noise = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float64) / math.sqrt(d)
    v = 0.8 * u + 0.5 * noise if correlated else noise
    if normalise:
        u, v = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(v, dim=-1)
    a = 1.0 + 0.3 * torch.randn(n, device="cuda", generator=g, dtype=torch.float64)
    return u.to(dtype), v.to(dtype), a.to(torch.float64 if dtype == torch.float64 else torch.float32)


def run(fn, u, v, a, grad_output):
    """(estimate, d student, d teacher, d log_baseline) of fn(u, v, a) -> 0-dim, on fresh leaves."""
    u, v, a = (x.detach().clone().requires_grad_() for x in (u, v, a))
    est = fn(u, v, a)
    grads = torch.autograd.grad(est, (u, v, a), torch.tensor(grad_output, dtype=est.dtype, device="cuda"),
                                materialize_grads=True)  # fmt: skip
    return (est.detach(), *grads)


def run_op(mi, u, v, a, alpha, temperature, grad_output=0.7):
    return run(lambda x, y, b: mi.mi_alpha_triton(x, y, b, alpha, temperature)[0], u, v, a, grad_output)


def run_reference(u, v, a, alpha, temperature, grad_output=0.7):
    def fn(x, y, b):
        return reference.mi_alpha(x, y, alpha=alpha, log_baseline=b, critic="dot", temperature=temperature)

    return run(fn, u.double(), v.double(), a.double(), grad_output)


def check(mi, u, v, a, alpha, temperature, dtype, grad_output=0.7, expected=None):
    got = run_op(mi, u, v, a, alpha, temperature, grad_output)
    want = expected if expected is not None else run_reference(u, v, a, alpha, temperature, grad_output)
    n = u.shape[0]
    assert got[1].dtype == u.dtype and got[2].dtype == v.dtype
    assert_close(got[0], want[0], dtype, "loss", "estimate", scale_floor=1.0 + want[0].abs().item())
    for name, g, r in zip(("student", "teacher", "log_baseline"), got[1:], want[1:]):
        assert_close(g, r, dtype, "mi_grad", f"d {name}", scale_floor=1.0 / n)
    return got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("n, d", [(2, 1), (3, 5), (257, 64), (1000, 768), (300, 1024)])
def test_matches_reference_cuda(mi, n, d, alpha, dtype):
    """N not a multiple of the tiles; D from 1 (padded to 16) to 1024 (several feature chunks)."""
    u, v, a = make_inputs(n, d, dtype, seed=n + d, correlated=n % 2 == 1)
    check(mi, u, v, a, alpha, 0.5 if n % 2 else 1.7, dtype, grad_output=-1.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_n4096_d768_against_float64_reference(mi, dtype):
    u, v, a = make_inputs(4096, 768, dtype, seed=1, normalise=True)
    check(mi, u, v, a, 0.01, 0.1, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_n16384_d768(mi, dtype):
    """N = 16384: the float64 reference's N x N temporaries (2 GiB each, dozens of them with autograd) do not fit, so
    the yardstick is the float64 Triton kernel on the same rounded inputs (checked against the reference above) and
    the reference's estimate without gradients."""
    u, v, a = make_inputs(16384, 768, dtype, seed=2, normalise=True)
    expected = run_op(mi, u.double(), v.double(), a.double(), 0.01, 0.1)
    with torch.no_grad():
        ref = reference.mi_alpha(u.double(), v.double(), alpha=0.01, log_baseline=a.double(), critic="dot",
                                 temperature=0.1)  # fmt: skip
    assert_close(expected[0], ref, torch.float64, "loss", "float64 kernel estimate", scale_floor=1.0 + ref.abs().item())
    del ref
    torch.cuda.empty_cache()
    check(mi, u, v, a, 0.01, 0.1, dtype, expected=expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["strips of 128 rows", "tiles"])
def test_strips_and_tiles_cuda(mi, dtype, how, monkeypatch):
    """Half-precision features by strips (cuBLAS S and gradient matmuls), here 8 of them with a ragged last one, and
    by the tile kernels (FASTDISTILL_MI_STRIPS=0), both against the float64 reference."""
    if how == "tiles":
        monkeypatch.setenv("FASTDISTILL_MI_STRIPS", "0")
    else:
        monkeypatch.setenv("FASTDISTILL_MI_STRIP_ROWS", "128")
        monkeypatch.setenv("FASTDISTILL_MI_GROUP_STRIPS", "3")  # 8 strips: groups of 3, 3 and 2
    assert mi.use_strips(dtype) == (how != "tiles")
    u, v, a = make_inputs(1000, 768, dtype, seed=6, normalise=True)
    check(mi, u, v, a, 0.01, 0.1, dtype, grad_output=0.4)


def test_memory_is_o_of_n_d(mi):
    """Forward + backward at N = 16384, D = 768 (bf16) allocate O(N D): far less than one N x N float32 (1 GiB).
    By strips: the gradients, the float32 d(student) accumulator and one strip's S (float32) and G (bf16)."""
    n, d = 16384, 768
    u, v, a = make_inputs(n, d, torch.bfloat16, seed=3, normalise=True)
    u, v, a = (x.requires_grad_() for x in (u, v, a))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    est, _ = mi.mi_alpha_triton(u, v, a, 0.01, 0.1)
    est.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # the gradients (2 N D bf16 + N float32), the accumulator (N D float32), one strip's S (4 R N bytes) and its
    # group's G (2 k R N), stats and buffers: ~180 MiB; an N x N float32 matrix would be 1 GiB
    rows = mi.strip_rows(n, d, torch.bfloat16)
    strip = (4 + 2 * mi.group_strips(n, d, torch.bfloat16, rows)) * rows * n
    assert extra < 2 * n * d * 2 + n * d * 4 + strip + 16 * 2**20, f"{extra / 2**20:.1f} MiB"


def test_deterministic_cuda(mi):
    u, v, a = make_inputs(4096, 768, torch.bfloat16, seed=4, normalise=True)
    first = run_op(mi, u, v, a, 0.01, 0.1)
    second = run_op(mi, u, v, a, 0.01, 0.1)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_traces_into_kernels(mi, dtype):
    """torch.compile(fullgraph=True) with inductor: no graph break, the generated code launches the user kernels of
    both triton_ops (forward and, in the compiled backward, the backward's: both tile kernels, or for bf16 the
    strips' gradient kernel between cuBLAS matmuls), and the results match eager."""
    from torch._inductor.utils import run_and_get_code

    u, v, a = make_inputs(300, 96, dtype, seed=5)

    def fn(x, y, b):
        return 2.0 * mi.mi_alpha_triton(x, y, b, 0.01, 0.5)[0]

    compiled = torch.compile(fn, fullgraph=True)
    got, codes = run_and_get_code(run, compiled, u, v, a, 1.0)
    code = "\n".join(codes)
    kernels = ("def _mi_fwd", "def _mi_strip_grad") if mi.use_strips(dtype) else ("def _mi_fwd", "def _mi_bwd_rows",
                                                                                   "def _mi_bwd_cols")  # fmt: skip
    for kernel in kernels:  # Inductor's copies of the kernels
        assert kernel in code, f"{kernel} is not in the compiled code"
    want = run(fn, u, v, a, 1.0)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * y.abs().max().item())
