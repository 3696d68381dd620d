"""One divergence table on each side of the language line, held to each other: the C++ list (FD_DIVERGENCES in
csrc/common/kd_math.h) and the Python registry (fastdistill/ops/divergences.py) agree on names, codes, parameter
counts and closed forms; the header's per-element terms agree with the reference's divergence (values and
gradients) and, element for element, with the Triton terms (row_math.divergence_terms, in the interpreter)."""

import importlib.util
import math
import os
import re
import typing

import pytest
import torch
from conftest import requires_ext, requires_triton

import fastdistill
from fastdistill.ops import divergences, reference
from fastdistill.training import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = {"beta": 0.3, "skew": 0.2}


def cpp_table() -> list[tuple[str, str, int, bool]]:
    text = open(os.path.join(ROOT, "csrc", "common", "kd_math.h")).read()
    block = text[text.index("#define FD_DIVERGENCES(X)") :].split("\n\n", 1)[0]
    rows = re.findall(r'X\((\w+), "(\w+)", (\d+), (true|false)\)', block)
    return [(e, name, int(n), closed == "true") for e, name, n, closed in rows]


def test_the_two_tables_agree():
    rows = cpp_table()
    assert [name for _, name, _, _ in rows] == list(divergences.NAMES)  # the order is the code
    for code, (_, name, n_params, closed) in enumerate(rows):
        d = divergences.DIVERGENCES[name]
        assert (d.code, len(d.params), d.closed_form) == (code, n_params, closed), name
    header = open(os.path.join(ROOT, "csrc", "common", "kd_math.h")).read()
    assert f"constexpr int kMaxDivParams = {divergences.MAX_PARAMS};" in header


def test_everything_reads_the_registry():
    """The API's choices, the config's, the reference's and the Triton codes are the registry's."""
    assert reference.DIVERGENCES == divergences.NAMES
    hints = typing.get_type_hints(config.KDConfig)
    assert typing.get_args(hints["divergence"]) == divergences.NAMES
    with pytest.raises(ValueError, match="divergence must be one of 'kl', 'reverse_kl'"):
        fastdistill.kd_loss(torch.randn(2, 3), torch.randn(2, 3), divergence="hellinger")
    if importlib.util.find_spec("triton") is not None:
        from fastdistill.ops.triton import kd_loss

        assert kd_loss.DIV_CODES == {n: d.code for n, d in divergences.DIVERGENCES.items()}


def _points(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Element values the kernels meet: random probabilities, exact zeros on either side (log = -inf), equal P and
    Q, a NaN (a NaN logit in the row)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(n, generator=g, dtype=torch.float64) * 3 - 2
    logq = torch.randn(n, generator=g, dtype=torch.float64) * 3 - 2
    logp[:10], logq[10:20] = -math.inf, -math.inf
    logq[20:30] = logp[20:30]
    logp[30] = math.nan
    return logp.exp(), logq.exp(), logp, logq


@requires_ext
@pytest.mark.parametrize("name", divergences.NAMES)
def test_header_terms_are_the_reference_divergence(name):
    """phi summed over a row is the reference's D(P, Q); gq and hp give, through softmax, the gradients autograd
    takes of the reference (kd_math.h's header comment: dD/da = gq - Q sum gq, dD/dc = hp - P sum hp)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 17, generator=g, dtype=torch.float64, requires_grad=True)  # student logits / T
    c = torch.randn(5, 17, generator=g, dtype=torch.float64, requires_grad=True)  # target logits / T
    logq, logp = torch.log_softmax(a, -1), torch.log_softmax(c, -1)
    params = divergences.param_vector(name, PARAMS)
    want = reference.divergence(logp, logq, name, params)
    da, dc = torch.autograd.grad(want.sum(), (a, c))
    phi, gq, hp = torch.ops.fastdistill._divergence_terms(logp.exp().detach(), logq.exp().detach(), logp.detach(),
                                                         logq.detach(), name, params)  # fmt: skip
    q, p = logq.exp().detach(), logp.exp().detach()
    torch.testing.assert_close(phi.sum(-1), want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gq - q * gq.sum(-1, keepdim=True), da, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(hp - p * hp.sum(-1, keepdim=True), dc, rtol=1e-10, atol=1e-13)
    if divergences.DIVERGENCES[name].closed_form:  # the student aggregate is -1: dD/da = Q - P
        torch.testing.assert_close(gq.sum(-1), -torch.ones(5, dtype=torch.float64), rtol=1e-12, atol=1e-14)


@requires_ext
def test_header_checks_the_parameter_vector():
    x = torch.rand(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="takes 1 parameter"):
        torch.ops.fastdistill._divergence_terms(x, x, x.log(), x.log(), "jsd", [])
    with pytest.raises(ValueError, match="takes 0 parameter"):
        torch.ops.fastdistill._divergence_terms(x, x, x.log(), x.log(), "kl", [0.5])
    with pytest.raises(ValueError, match="divergence must be one of kl, reverse_kl, jsd, tvd, skew_kl, skew_rev"):
        torch.ops.fastdistill._divergence_terms(x, x, x.log(), x.log(), "hellinger", [])


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from fastdistill.ops.triton.row_math import divergence_terms

    @triton.jit
    def _terms_kernel(p_ptr, q_ptr, lp_ptr, lq_ptr, prm_ptr, out_ptr, n, DIV: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n
        phi, gq, hp = divergence_terms(tl.load(p_ptr + i, mask=m), tl.load(q_ptr + i, mask=m),
                                       tl.load(lp_ptr + i, mask=m), tl.load(lq_ptr + i, mask=m), DIV,
                                       tl.load(prm_ptr + 0), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2))  # fmt: skip
        tl.store(out_ptr + i, phi, mask=m)
        tl.store(out_ptr + n + i, gq, mask=m)
        tl.store(out_ptr + 2 * n + i, hp, mask=m)


def _triton_terms(name: str, p, q, logp, logq, params) -> tuple[torch.Tensor, ...]:
    n = p.numel()
    prm = torch.tensor(divergences.kernel_params(params), dtype=torch.float64)
    out = torch.empty(3 * n, dtype=torch.float64)
    _terms_kernel[(1,)](p, q, logp, logq, prm, out, n, DIV=divergences.DIVERGENCES[name].code,
                        BLOCK=triton.next_power_of_2(n))  # fmt: skip
    return out.view(3, n).unbind(0)


@requires_ext
@requires_triton
@pytest.mark.parametrize("name", divergences.NAMES)
def test_triton_terms_are_the_header_terms(name):
    """Element for element, zeros, -inf logs and NaN included: the Triton mirror of kd_math.h is the header."""
    p, q, logp, logq = _points()
    params = divergences.param_vector(name, PARAMS)
    want = torch.ops.fastdistill._divergence_terms(p, q, logp, logq, name, params)
    got = _triton_terms(name, p, q, logp, logq, params)
    for part, w, t in zip(("phi", "gq", "hp"), want, got):
        torch.testing.assert_close(t, w, rtol=1e-12, atol=1e-15, equal_nan=True, msg=lambda m: f"{name} {part}: {m}")
