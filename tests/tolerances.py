"""Tolerances, one row per input dtype, for comparing a backend with the float64 reference.

An error passes when |actual - expected| <= rtol * |expected| + atol * max|expected| (atol is relative to the
tensor's scale, so the same row serves losses and gradients of any magnitude; see SCALE_FLOOR). Half-precision
rows are set by the output rounding: gradients come back in the input's dtype (bf16 keeps 8 bits of mantissa,
fp16 11), while the loss is float32 computed from the same rounded inputs.
"""

import torch

# dtype -> {"loss": (rtol, atol), "grad": (rtol, atol)}
# "mi_grad": gradients of mi_alpha, each a sum over N rows of dI/dS (itself a difference of per-row float32 sums)
# times features, judged against the largest gradient: float32 keeps ~5 digits of that, not 6.
TOLERANCES = {
    torch.float64: {"loss": (1e-10, 1e-12), "grad": (1e-9, 1e-11), "mi_grad": (1e-9, 1e-11)},
    torch.float32: {"loss": (2e-5, 2e-6), "grad": (1e-4, 2e-6), "mi_grad": (1e-4, 2e-5)},
    torch.bfloat16: {"loss": (1e-4, 1e-5), "grad": (1.6e-2, 4e-3), "mi_grad": (1.6e-2, 8e-3)},
    torch.float16: {"loss": (1e-4, 1e-5), "grad": (2e-3, 5e-4), "mi_grad": (2e-3, 1e-3)},
}


# The smallest scale atol is applied to: losses are O(1) nats; gradients carry a 1/N factor but are judged at
# least on 1e-3 (so an exactly-zero expected gradient tolerates float32 noise, not a wrong formula).
SCALE_FLOOR = {"loss": 1.0, "grad": 1e-3, "mi_grad": 1e-3}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str, what: str = "", scale_floor=None
) -> None:
    """Compare in float64 with the (rtol, atol) of ``TOLERANCES[dtype][kind]``; infinities must match exactly.
    ``scale_floor`` overrides ``SCALE_FLOOR[kind]`` where the inputs set a larger natural scale."""
    rtol, atol = TOLERANCES[dtype][kind]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: nan in result"
    inf = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], e[inf]), f"{what}: infinities differ"
    a, e = a[~inf], e[~inf]
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), SCALE_FLOOR[kind] if scale_floor is None else scale_floor)
    err = (a - e).abs()
    bound = rtol * e.abs() + atol * max(scale, 1e-30)
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: max error {err.max().item():.3e} (at {worst.item()}: got {a.flatten()[worst].item():.6e}, "
        f"expected {e.flatten()[worst].item():.6e}); rtol={rtol}, atol={atol} x scale {scale:.3e}"
    )
