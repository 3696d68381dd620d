"""float16 logits under a loss scaler on the GPU backends (tests/test_fp16_scaler.py has the CPU cases and the
design): the prescaled float16 gradient of Triton and of the CUDA kernel against the backend's own float32 math on
the same values, and the float64 reference. Runs in `make bench-gpu`'s test stage (skipped without CUDA)."""

import pytest
import torch
from test_fp16_scaler import SCALE, _check_grad, _grad, _inputs

import fastdistill

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_scaled_fp16_gradients_gpu(backend, reduction):
    """The GPU backends through the same op record: the prescaled float16 gradient against the backend's own
    float32 math on the same values (in place: the Triton scale kernel with factor grad_output / S)."""
    student, teachers, labels, weights = _inputs(2048, 1000, k=2, spread=8.0)
    cuda = [x.cuda() for x in (student, *teachers)]
    kw = dict(divergence="jsd", temperature=2.0, labels=labels.cuda(), sample_weight=weights.cuda(), ce_weight=0.1,
              reduction=reduction)  # fmt: skip
    probe = fastdistill.functional.kd_inputs(
        cuda[0].detach().requires_grad_(), cuda[1:], ensemble="prob_mean", teacher_weights=None,
        scale_by_temperature_sq=True, beta=0.5, skew=0.1, ignore_index=-100, num_items=None, backend=backend,
        **kw)  # fmt: skip
    reasons = fastdistill.ops.dispatch.BACKENDS[backend].not_supported_reasons(probe)
    if reasons:
        pytest.skip("; ".join(reasons))
    scale = SCALE if reduction == "mean" else 2.0**12
    _, g = _grad(cuda[0].detach(), cuda[1:], backend, scale=scale, **kw)
    _, g32 = _grad(cuda[0].detach().float(), [t.float() for t in cuda[1:]], backend, scale=scale, **kw)
    _, g64 = _grad(student.double(), [t.double() for t in teachers], "reference", scale=scale,
                   **{**kw, "labels": labels, "sample_weight": weights})  # fmt: skip
    _check_grad(g.cpu(), g32.half().cpu(), g64, f"{backend} {reduction}")
