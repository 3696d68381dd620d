"""benchmarks.run_mi on the CPU at a tiny shape: the fused op and MIAlphaLoss end to end (fused and under
torch.compile on the reference estimator) produce rows, each in its own child process (~30 s)."""

import json
import sys
from pathlib import Path

import pytest

import fastdistill

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/ package

from benchmarks import run_mi  # noqa: E402


@pytest.mark.skipif(not fastdistill.extension_available(), reason="needs the built extension")
def test_run_mi_loss_providers(tmp_path):
    out = tmp_path / "mi.json"
    rc = run_mi.main(["--device", "cpu", "--rows", "64", "--dims", "24", "--providers", "cpu,loss-cpu,loss-compile",
                      "--repeats", "1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["cpu", "loss-cpu", "loss-compile"]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    op, loss = rows[0], rows[1]
    assert op["useful_flops"] == 3 * 2 * 64 * 64 * 24
    assert loss["useful_flops"] == 3 * 2 * 64 * 64 * run_mi.PROJ_DIM + 12 * 64 * 24 * run_mi.PROJ_DIM
    assert run_mi.unavailable_reason("loss-triton", "cpu") and run_mi.unavailable_reason("triton-tiles", "cpu")


def test_providers_compute_one_estimator():
    """The fused providers and the materialised ones (eager, compile) estimate the same thing: the dot critic at
    temperature 1 (mi_alpha's own default is the cosine critic at 0.1, a different number)."""
    import torch

    u, v, a = run_mi.make_inputs(96, 16, torch.float64, "cpu")
    want = run_mi.PROVIDERS["eager"]()(u, v, a)
    for name in ("cpu", "auto"):
        if run_mi.unavailable_reason(name, "cpu"):
            continue
        torch.testing.assert_close(run_mi.PROVIDERS[name]()(u, v, a).double(), want.double(), rtol=1e-6, atol=1e-8)


def test_baselines_are_the_fused_providers_loss_with_its_gradients():
    """mi_alpha(u, v) anchors on the student (rows of S are u's; anchor="student", the default): the eager and
    compile baselines compute that estimator, not reference.mi_alpha(u, v) (the sides swapped: the same number at a
    constant baseline, other gradients). float64, a non-constant baseline: estimate and gradients to ~1e-12."""
    import torch

    u, v, _ = run_mi.make_inputs(40, 12, torch.float64, "cpu")
    a = torch.linspace(-1.0, 1.0, 40, dtype=torch.float64)

    def run(fn):
        xs = [t.detach().clone().requires_grad_() for t in (u, v, a)]
        est = fn(*xs)
        est.backward()
        return [est.detach()] + [x.grad for x in xs]

    want = run(lambda x, y, z: fastdistill.mi_alpha(x, y, alpha=run_mi.ALPHA, log_baseline=z, critic="dot",
                                                    temperature=1.0, backend="reference"))  # fmt: skip
    names = ["eager", "compile"] + [n for n in ("cpu",) if not run_mi.unavailable_reason(n, "cpu")]
    for name in names:
        for got, ref in zip(run(run_mi.PROVIDERS[name]()), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=name)
