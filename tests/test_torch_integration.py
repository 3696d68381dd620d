"""The ops under the PyTorch machinery a user reaches for (a helper's review, 2026-11-30): compiled code that does not
recompile for reasons of ours, functorch / vectorized Jacobians that give the right numbers or a clear error (never a
silent None), and reprs that show every setting that changes the loss. CPU backends; GPU twins are not needed (the
code is the registration layer's, shared)."""

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import fastdistill

pytestmark = pytest.mark.skipif(not fastdistill.extension_available(), reason="fastdistill._C is not built")


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_kd_loss_does_not_recompile_for_the_hyperparameter_cache():
    """Dynamo guarded on the contents of check_hyperparameters' cache of valid settings: the second call recompiled,
    and every eager call elsewhere with a new temperature recompiled the compiled loss again (fullgraph=True ends
    at the recompile limit)."""
    dynamo.reset()
    counters.clear()
    s, t = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    compiled = torch.compile(lambda s, t: fastdistill.kd_loss(s, t, temperature=2.0, backend="cpu"), backend="eager",
                             fullgraph=True, dynamic=True)  # fmt: skip
    for i in range(4):
        fastdistill.kd_loss(s, t, temperature=1.1 + 0.1 * i)  # an eager call elsewhere, new settings
        compiled(s, t)
    assert _graphs() == 1


def test_codistill_progress_compiles_at_most_twice():
    """CodistillLoss.set_progress(step) before every step: the compiled loss read the step number (a recompile every
    step); it reads whether distillation is on (burn-in over or not): two graphs at most."""
    a, b = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10, requires_grad=True)
    labels = torch.randint(0, 10, (6,))
    for burn_in, graphs in ((0, 1), (3, 2)):
        dynamo.reset()
        counters.clear()
        loss = fastdistill.CodistillLoss(temperature=2.0, burn_in_steps=burn_in, backend="cpu")
        compiled = torch.compile(lambda a, b, y: sum(loss(a, b, y)), backend="eager", fullgraph=True)
        for step in range(9):
            loss.set_progress(step)
            compiled(a, b, labels).backward()
        assert _graphs() == graphs, burn_in


def test_a_labelled_loss_keeps_v_dynamic():
    """With labels, the label-range message (built even though the check is skipped under compile) held V and made
    it static: every new vocabulary recompiled under dynamic=True."""
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda s, t, y: fastdistill.kd_loss(s, t, y, ce_weight=0.3, backend="cpu"),
                             backend="eager", fullgraph=True, dynamic=True)  # fmt: skip
    for v in (11, 13, 17, 19):
        s, t = torch.randn(6, v, requires_grad=True), torch.randn(6, v)
        want = fastdistill.kd_loss(s, t, torch.arange(6) % v, ce_weight=0.3, backend="reference")
        torch.testing.assert_close(compiled(s, t, torch.arange(6) % v), want)
    assert _graphs() == 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vectorized_jacobian_of_the_fused_backends(reduction):
    """torch.autograd.functional.jacobian(vectorize=True) batches grad_output below the Python level: backward asked
    it for a single truth value (grad_output == 1) and failed; it now scales out of place, as the reference."""
    g = torch.Generator().manual_seed(0)
    s, t, b = (torch.randn(3, 5, dtype=torch.float64, generator=g) for _ in range(3))

    def jac(fn):
        return torch.autograd.functional.jacobian(fn, s, vectorize=True)

    for backend in ("cpu", "reference"):
        kd = jac(lambda x: fastdistill.kd_loss(x, t, temperature=2.0, reduction=reduction, backend=backend))
        co = jac(lambda x: fastdistill.codistill_loss(x, b, temperature=2.0, reduction=reduction,
                                                      backend=backend).loss_a)  # fmt: skip
        if backend == "cpu":
            got = (kd, co)
        else:
            torch.testing.assert_close(got[0], kd)
            torch.testing.assert_close(got[1], co)


def test_vmap_then_backward_is_an_error_not_a_missing_gradient():
    """Under torch.func.vmap the wrapped inputs do not show requires_grad, so the fused kernel computed no gradient,
    and backward through the vmapped codistill_loss left .grad None without a word. Now a RuntimeError that names
    the input and backend='reference' (which is right there)."""
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (4,))

    def run(backend):
        return torch.func.vmap(lambda xi: fastdistill.codistill_loss(xi, b, labels, temperature=2.0,
                                                                     backend=backend).loss_a)(x)  # fmt: skip

    with pytest.raises(RuntimeError, match=r"codistill_loss: autograd asks for the gradient of logits_a.*"
                                           r"backend='reference'"):  # fmt: skip
        run("cpu").sum().backward()
    x.grad = None
    run("reference").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_module_reprs_show_every_setting():
    """A repr that hid scale_by_temperature_sq (a factor T^2), beta, skew, ignore_index or the teacher weights
    printed two different losses alike."""
    kd = repr(fastdistill.KDLoss(temperature=2.0, scale_by_temperature_sq=False, teacher_weights=[1.0, 3.0], skew=0.2))
    for part in ("scale_by_temperature_sq=False", "teacher_weights=[1.0, 3.0]", "skew=0.2", "beta=0.5",
                 "ignore_index=-100"):  # fmt: skip
        assert part in kd, (part, kd)
    co = repr(fastdistill.CodistillLoss(divergence="jsd", beta=0.3, reduction="sum"))
    for part in ("beta=0.3", "reduction='sum'", "scale_by_temperature_sq=True", "ignore_index=-100"):
        assert part in co, (part, co)
    assert repr(fastdistill.FusedLinearKDLoss(temperature=2.0, chunk_size=8)) == (
        "FusedLinearKDLoss(temperature=2.0, chunk_size=8)")
