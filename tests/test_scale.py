"""Backward's in-place scale of a saved gradient (fastdistill/ops/triton/scale.py), in Triton's interpreter: the
bits of torch's ``grad * factor`` (bfloat16 within one unit in the last place: the interpreter truncates float32 to
bfloat16 where the compiled kernel rounds to nearest), a factor of exactly 1 leaving rows untouched, per-row factors
over [N, V] and [K, N, V], ragged V."""

import pytest
import torch

from tests.conftest import requires_triton

pytestmark = requires_triton


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if actual.dtype == torch.bfloat16:  # one bf16 ulp: 2**-7 relative
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 33), (3, 5, 4100)])
def test_scale_matches_torch(dtype, shape):
    from fastdistill.ops.triton.scale import scale_

    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=gen).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for value in (0.37, 1 / 3, -2.5, 1e-3):
        factor = torch.tensor(value, dtype=acc)
        _check(scale_(grad.clone(), factor, 5), grad * factor)
    # per row as registration._scale passes them: in the loss's precision, 1/3 and 2^-30 not rounded to a 16-bit
    # dtype first (2^-30 is 0 in float16)
    rows = torch.tensor([1.0, 1 / 3, 2.0**-30 * 3, 1.0, -2.0], dtype=acc)
    out = scale_(grad.clone(), rows, 5)
    _check(out, (grad.to(acc) * rows.unsqueeze(-1)).to(dtype))
    one = (rows == 1).nonzero().flatten()
    assert torch.equal(out[..., one, :], grad[..., one, :])  # factor 1: exactly the saved gradient
    assert torch.equal(scale_(grad.clone(), torch.tensor(1.0, dtype=acc), 5), grad)


def test_scale_nan_factor_propagates():
    from fastdistill.ops.triton.scale import scale_

    grad = torch.randn(4, 40)
    out = scale_(grad.clone(), torch.tensor([1.0, float("nan"), 2.0, 1.0]), 4)
    assert torch.isnan(out[1]).all() and torch.equal(out[0], grad[0]) and torch.equal(out[2], grad[2] * 2)
