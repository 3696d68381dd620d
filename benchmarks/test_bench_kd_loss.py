"""pytest-benchmark suite: forward + backward of the prob_mean forward-KL loss, fastdistill vs eager vs compile.

Run with ``pytest benchmarks/ --benchmark-enable`` (the project's addopts disable benchmarks, which then run once).
"""

from __future__ import annotations

import pytest
import torch

from .providers import PROVIDERS, fwd_bwd, make_inputs, unavailable_reason

N = 256
TEMPERATURE = 2.0
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("V", [8192, 32000])
@pytest.mark.parametrize("provider", ["cpu", "eager", "compile"])
def test_kd_loss_fwd_bwd(benchmark, provider: str, V: int, K: int) -> None:
    reason = unavailable_reason(provider, "cpu")
    if reason:
        pytest.skip(reason)
    student, teachers = make_inputs(N, V, K)
    fn = PROVIDERS[provider](K, TEMPERATURE)
    loss = fn(student, teachers)  # warm-up (compiles for "compile") and a sanity check against the eager loss
    expected = PROVIDERS["eager"](K, TEMPERATURE)(student.detach(), teachers)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    loss.backward()
    student.grad = None
    benchmark.group = f"V={V} K={K}"
    benchmark.extra_info.update(N=N, V=V, K=K, dtype="float32")
    benchmark.pedantic(fwd_bwd, args=(fn, student, teachers), rounds=5, warmup_rounds=1)
