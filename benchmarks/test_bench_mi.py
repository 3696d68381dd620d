"""pytest-benchmark suite: forward + backward of mi_alpha, the fused cpu kernel vs the materialised estimator.

Run with ``pytest benchmarks/ --benchmark-enable`` (the project's addopts disable benchmarks, which then run once).
"""

from __future__ import annotations

import pytest
import torch

from .run_mi import PROVIDERS, make_inputs, unavailable_reason


@pytest.mark.parametrize("D", [128])
@pytest.mark.parametrize("N", [1024, 4096])
@pytest.mark.parametrize("provider", ["cpu", "eager"])
def test_mi_alpha_fwd_bwd(benchmark, provider: str, N: int, D: int) -> None:
    reason = unavailable_reason(provider, "cpu")
    if reason:
        pytest.skip(reason)
    u, v, a = make_inputs(N, D, torch.float32, "cpu")
    fn = PROVIDERS[provider]()
    expected = PROVIDERS["eager"]()(u, v, a)  # a sanity check against the materialised estimator
    torch.testing.assert_close(fn(u, v, a), expected, rtol=1e-4, atol=1e-4)

    def step():
        fn(u, v, a).backward()
        u.grad = v.grad = a.grad = None

    benchmark.group = f"mi_alpha N={N} D={D}"
    benchmark.extra_info.update(N=N, D=D, dtype="float32")
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
