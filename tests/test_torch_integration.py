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
    fl = repr(fastdistill.FusedLinearKDLoss(temperature=2.0, chunk_size=8))
    for part in ("chunk_size=8", "temperature=2.0", "scale_by_temperature_sq=True", "ignore_index=-100",
                 "accum_dtype=None", "memory_budget_bytes=None"):  # fmt: skip
        assert part in fl, (part, fl)
    mi = repr(fastdistill.MIAlphaLoss(8, 16, baseline="constant"))
    for part in ("student_dim=8", "teacher_dim=16", "baseline='constant'", "anchor='student'"):
        assert part in mi, (part, mi)


def test_module_reprs_of_tensor_settings_read_no_values():
    """KDLoss's repr printed tensor teacher weights with .tolist(): an error for weights on the meta device (a model
    built for deferred initialisation), a device sync on CUDA, and 10^5 characters for per-row weights."""
    for tw in (torch.ones(3, 4, 512), torch.ones(2, device="meta")):
        for module in (fastdistill.KDLoss(teacher_weights=tw), fastdistill.FusedLinearKDLoss(teacher_weights=tw)):
            text = repr(module)
            assert f"teacher_weights=Tensor(shape={list(tw.shape)}" in text and len(text) < 500, text


def test_module_settings_changed_after_construction_are_used():
    """FusedLinearKDLoss kept its settings in a dict read by forward: loss.temperature = 2.0 was silently ignored
    (and reading it raised), so the training loop's getattr(loss, "temperature", 1.0) got 1.0; CodistillLoss cached
    whether to distill from burn_in_steps at construction, so changing it did nothing until set_progress."""
    torch.manual_seed(0)
    h, w, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64), torch.randn(6, 9)
    module = fastdistill.FusedLinearKDLoss(chunk_size=4, backend="cpu")
    assert module.temperature == 1.0 and module.chunk_size == 4
    module.temperature, module.ce_weight = 2.0, 0.3
    labels = torch.randint(0, 9, (6,))
    want = fastdistill.fused_linear_kd_loss(h, w, t.double(), labels, chunk_size=4, temperature=2.0, ce_weight=0.3,
                                            backend="cpu")  # fmt: skip
    assert torch.equal(module(h, w, t.double(), labels), want)
    module.temperature = -5.0
    with pytest.raises(ValueError, match="temperature"):
        module(h, w, t.double(), labels)

    a, b = torch.randn(6, 9), torch.randn(6, 9)
    codistill = fastdistill.CodistillLoss(backend="cpu")
    hard_only = fastdistill.codistill_loss(a, b, labels, weight_ab=0.0, weight_ba=0.0, backend="cpu")
    codistill.burn_in_steps = 3
    assert torch.equal(codistill(a, b, labels).loss_a, hard_only.loss_a)
    codistill.burn_in_steps = 0
    assert not torch.equal(codistill(a, b, labels).loss_a, hard_only.loss_a)
    with pytest.raises(ValueError, match="hard_weight must not be 0"):
        fastdistill.CodistillLoss(hard_weight=0.0).burn_in_steps = 2

    mi = fastdistill.MIAlphaLoss(4, 4, backend="reference")
    mi.pooling = "max"
    with pytest.raises(ValueError, match="pooling must be one of"):
        mi(torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_fused_linear_module_moves_its_tensor_teacher_weights():
    """FusedLinearKDLoss kept a tensor teacher_weights in a plain dict: .to(device) left it behind, and the next call
    failed with "teacher_weights is on cpu". Now a buffer, as KDLoss's: it moves, keeps its dtype under .half(),
    and the module gives the functional's value."""
    tw = torch.tensor([0.3, 0.7])
    module = fastdistill.FusedLinearKDLoss(teacher_weights=tw, backend="reference")
    assert module.half().teacher_weights.dtype == torch.float32
    moved = module.to("meta")
    assert moved.teacher_weights.device.type == "meta"
    h, w, t = torch.randn(8, 4, device="meta"), torch.randn(5, 4, device="meta"), torch.randn(2, 8, 5, device="meta")
    with fastdistill.functional.values_checked():  # meta tensors have no values to check
        assert moved(h, w, t).device.type == "meta"
    h, w, t = torch.randn(8, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 8, 5)
    module = fastdistill.FusedLinearKDLoss(teacher_weights=tw, backend="cpu")
    assert torch.equal(module(h, w, t.double()),
                       fastdistill.fused_linear_kd_loss(h, w, t.double(), teacher_weights=tw, backend="cpu"))


def test_method_losses_compile_with_fullgraph():
    """WeightedKDLoss and SLaMLoss entered values_checked (a context variable Dynamo cannot trace) and SLaM's top-k
    mask checked k with a data-dependent branch: torch.compile(fullgraph=True) failed on both."""
    from fastdistill.methods import SLaMLoss, TeacherReliability, WeightedKDLoss

    torch.manual_seed(0)
    rel = TeacherReliability.fit(torch.randn(200, 5), torch.randint(0, 5, (200,)))
    s, t, labels = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    for module in (WeightedKDLoss(rel, temperature=2.0), SLaMLoss(rel)):
        dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(s, t, labels), module(s, t, labels))
        assert "max_k=" in repr(module)


def test_modules_pickled_before_their_settings_were_attributes_still_load():
    """CodistillLoss kept burn_in_steps as a plain attribute and FusedLinearKDLoss its settings in one dict: a module
    saved whole (torch.save(loss_fn)) then loaded into an object without _burn_in_steps or chunk_size."""
    import pickle

    codistill = fastdistill.CodistillLoss(burn_in_steps=2)
    state = codistill.__dict__.copy()
    state["burn_in_steps"] = state.pop("_burn_in_steps")  # the old layout
    old = fastdistill.CodistillLoss.__new__(fastdistill.CodistillLoss)
    old.__setstate__(state)
    assert pickle.loads(pickle.dumps(old)).burn_in_steps == 2 and "burn_in_steps=2" in repr(old)

    fused = fastdistill.FusedLinearKDLoss()
    state = {k: v for k, v in fused.__dict__.items() if k not in fused.kd_settings() and k not in (
        "chunk_size", "memory_budget_bytes", "accum_dtype")}  # fmt: skip
    state["options"] = {"temperature": 2.0, "chunk_size": 4, "teacher_weights": torch.tensor([1.0, 3.0])}
    old = fastdistill.FusedLinearKDLoss.__new__(fastdistill.FusedLinearKDLoss)
    old.__setstate__(state)
    assert (old.temperature, old.chunk_size, old.ce_weight) == (2.0, 4, 0.0)
    assert "teacher_weights" in dict(old.named_buffers())
    h, w, t = torch.randn(6, 3), torch.randn(5, 3), torch.randn(2, 6, 5)
    assert torch.equal(old(h, w, t), fastdistill.fused_linear_kd_loss(h, w, t, temperature=2.0, chunk_size=4,
                                                                      teacher_weights=torch.tensor([1.0, 3.0])))


def test_forward_mode_ad_is_refused_by_the_fused_backends_and_auto_takes_the_reference():
    """The kernels have no forward derivative: jacfwd / jvp / forward_ad dual tensors ran them on the primal values
    and dropped the tangent (a Jacobian of 0, no error). A fused backend named there now refuses, naming the way
    out; "auto" under a torch.func transform or forward AD is the reference, so grad, jacfwd and hessian just work."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    s, t, b, tangent = (torch.randn(4, 7, dtype=torch.float64, generator=g) for _ in range(4))
    labels = torch.tensor([0, 3, 6, 2])
    ops = {
        "kd": lambda x, backend: fastdistill.kd_loss(x, t, labels, temperature=2.0, ce_weight=0.3, backend=backend),
        "codistill": lambda x, backend: fastdistill.codistill_loss(x, b, labels, backend=backend).loss_a,
        "mi": lambda x, backend: fastdistill.mi_alpha(x, b, alpha=0.5, backend=backend),
    }
    for name, op in ops.items():
        want = torch.func.jacfwd(lambda x: op(x, "reference"))(s)
        assert want.abs().max() > 1e-3, name
        torch.testing.assert_close(torch.func.jacfwd(lambda x: op(x, "auto"))(s), want)
        torch.testing.assert_close(torch.func.grad(lambda x: op(x, "auto"))(s),
                                   torch.func.grad(lambda x: op(x, "reference"))(s))  # fmt: skip
        with pytest.raises(ValueError, match=r"backend='cpu' cannot run.*forward-mode AD.*backend='reference'"):
            torch.func.jvp(lambda x: op(x, "cpu"), (s,), (tangent,))
        with fwAD.dual_level():
            dual = fwAD.make_dual(s, tangent)
            torch.testing.assert_close(fwAD.unpack_dual(op(dual, "auto")).tangent, (want * tangent).sum((-2, -1)))
            with pytest.raises(ValueError, match="forward-mode AD"):
                op(dual, "cpu")
            op(s, "cpu")  # no tangent reaches the op: the fused kernel runs
        # reverse-mode transforms: torch's message about autograd.Function's setup_context said nothing useful
        for transform in (torch.func.grad, torch.func.jacrev):
            with pytest.raises(ValueError, match=r"backend='cpu' cannot run.*torch.func gradient transform.*"
                                                 r"backend='reference'"):  # fmt: skip
                transform(lambda x: op(x, "cpu"))(s)


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_a_tangent_on_a_constant_is_refused(backend):
    """sample_weight / teacher_weights / num_items are constants (SPEC §1): one that requires grad is a ValueError,
    but one given a forward-mode tangent (jvp / jacfwd, a dual tensor) came back with a derivative of 0 on every
    backend (0.0 for a true 0.46 in the review's case). Now the same kind of error, naming it; a constant closed over
    by a transform over the logits still runs."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    b, labels = torch.randn(4, 5, generator=g), torch.tensor([0, 3, 1, 2])
    cases = {
        "sample_weight": (torch.rand(4, generator=g) + 0.5, lambda x: fastdistill.kd_loss(s, t, sample_weight=x,
                                                                                          backend=backend)),
        "teacher_weights": (torch.tensor([1.0, 3.0]), lambda x: fastdistill.kd_loss(s, t, teacher_weights=x,
                                                                                    backend=backend)),
        "num_items": (torch.tensor(3.0), lambda x: fastdistill.kd_loss(s, t, num_items=x, backend=backend)),
        "codistill sample_weight": (torch.rand(4, generator=g) + 0.5, lambda x: fastdistill.codistill_loss(
            s, b, labels, sample_weight=x, backend=backend).loss_a),
    }  # fmt: skip
    for name, (x, op) in cases.items():
        arg = name.split()[-1]
        with pytest.raises(ValueError, match=f"{arg} carries a forward-mode tangent"):
            torch.func.jvp(op, (x,), (torch.ones_like(x),))
        with fwAD.dual_level(), pytest.raises(ValueError, match=f"{arg} carries a forward-mode tangent"):
            op(fwAD.make_dual(x, torch.ones_like(x)))
    w = cases["sample_weight"][0]
    if backend != "cpu":  # (a fused backend refuses the logits' tangent itself: the test above)
        torch.func.jacfwd(lambda x: fastdistill.kd_loss(x, t, sample_weight=w, backend=backend))(s)


def test_vmap_of_kd_loss_with_a_fused_backend_names_the_way_out():
    """kd_loss takes its teachers as a list of tensors, for which torch's batching fallback does not exist: a fused
    backend named under vmap gave torch's "Batching rule not implemented" RuntimeError; now the package's ValueError
    naming backend='reference', which "auto" picks there (the other ops run through the fallback)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run.*vmap.*backend='reference'"):
        torch.func.vmap(lambda x, y: fastdistill.kd_loss(x, y, backend="cpu"))(s, t)
    got = torch.func.vmap(lambda x, y: fastdistill.kd_loss(x, y, temperature=2.0))(s, t)
    want = torch.stack([fastdistill.kd_loss(x, y, temperature=2.0, backend="reference") for x, y in zip(s, t)])
    torch.testing.assert_close(got, want)


def test_create_graph_under_dynamo_is_refused_like_in_eager():
    """torch.compile(backend="eager") differentiates twice as eager code does, but the create_graph check was
    skipped whenever compiling: a gradient penalty through the fused op dropped its second-order term silently
    (0.26 off a 0.30 gradient). Now the eager error; the reference backend still gives the exact answer there."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(5, 7, dtype=torch.float64, generator=g)
    h = torch.randn(9, 4, dtype=torch.float64, generator=g)
    w0 = torch.randn(7, 4, dtype=torch.float64, generator=g)

    def penalty(op):
        def f(w):
            (gw,) = torch.autograd.grad(op(w), w, create_graph=True)
            return (gw * gw).sum()

        return f

    kd = {b: (lambda w, b=b: fastdistill.kd_loss(x @ w.T, t, temperature=2.0, backend=b)) for b in ("cpu", "reference")}
    linear = lambda w: fastdistill.fused_linear_kd_loss(h, w, torch.randn(9, 7, dtype=torch.float64))  # noqa: E731
    for op in (kd["cpu"], linear):
        dynamo.reset()
        with pytest.raises(RuntimeError, match="create_graph=True"):
            penalty(op)(w0.clone().requires_grad_())
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.compile(penalty(op), backend="eager")(w0.clone().requires_grad_())
    dynamo.reset()
    want = torch.autograd.grad(penalty(kd["reference"])(w := w0.clone().requires_grad_()), w)[0]
    compiled = torch.compile(penalty(kd["reference"]), backend="eager")
    got = torch.autograd.grad(compiled(w := w0.clone().requires_grad_()), w)[0]
    torch.testing.assert_close(got, want)


def test_non_strict_export_with_stacked_teachers_and_a_dynamic_batch():
    """torch.export's default (non-strict) tracing compared the stacked teachers' [K, B, V] with the student's [B, V]
    element by element: K == B became a guard "batch != K" that export refused for Dim("batch")."""
    from torch.export import Dim

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = fastdistill.KDLoss(temperature=2.0, backend="cpu")

        def forward(self, s, t):
            return self.loss(s, t)

    batch = Dim("batch", min=2, max=1024)
    for k in (2, 3):
        s, t = torch.randn(4, 12), torch.randn(k, 4, 12)
        program = torch.export.export(Step(), (s, t), dynamic_shapes=({0: batch}, {1: batch}), strict=False)
        for b in (k, 9):
            s, t = torch.randn(b, 12), torch.randn(k, b, 12)
            torch.testing.assert_close(program.module()(s, t), Step()(s, t))


def test_weak_teacher_schedule_does_not_recompile_the_callers_step():
    """WeakTeacherKDLoss read the step set by set_progress inside the graph: a compiled training step recompiled at
    every step, then (torch's recompile limit, 8) ran the whole frame, model included, in eager mode. A scheduled
    weight now runs outside the graph: the model's graph compiles once and the losses equal eager's; a constant
    weight is still traced (fullgraph=True)."""
    from fastdistill.methods import SoftWeightSchedule, WeakTeacherKDLoss

    lin = torch.nn.Linear(5, 10, dtype=torch.float64)
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,))
    for shape in ("linear", "cosine", "step"):
        dynamo.reset()
        counters.clear()
        loss = WeakTeacherKDLoss(soft_weight=SoftWeightSchedule(4.0, 1.0, shape=shape), backend="cpu")
        compiled = torch.compile(lambda x, t, y: loss(torch.tanh(lin(x)), t, y), backend="eager")
        for step in range(12):
            loss.set_progress(step, 12)
            torch.testing.assert_close(compiled(x, t, labels), loss(torch.tanh(lin(x)), t, labels))
        assert _graphs() == 1 and counters["recompiles"] == {}, shape
    dynamo.reset()
    counters.clear()
    loss = WeakTeacherKDLoss(soft_weight=SoftWeightSchedule(2.0, shape="constant"), backend="cpu")
    compiled = torch.compile(lambda x, t, y: loss(lin(x), t, y), backend="eager", fullgraph=True)
    for step in range(3):
        loss.set_progress(step, 12)
        torch.testing.assert_close(compiled(x, t, labels), loss(lin(x), t, labels))
    assert _graphs() == 1


def test_meta_tensors_propagate_shapes_with_every_argument():
    """Meta tensors (shape propagation, a model built on the meta device) have no values: kd_loss ran on them, but
    labels with ce_weight > 0, a tensor sample_weight / teacher_weights / num_items, codistill's labels and mi_alpha
    raised torch errors naming no argument (.item() of a value check; autocast on the meta device). The value checks
    skip meta tensors; a meta num_items with real logits is an error naming it."""
    m = dict(device="meta")
    s, t, b = torch.empty(4, 7, **m), torch.empty(2, 4, 7, **m), torch.empty(4, 7, **m)
    labels, w = torch.zeros(4, dtype=torch.long, **m), torch.empty(4, **m)
    results = [
        fastdistill.kd_loss(s, t, labels, ce_weight=0.5, backend="reference"),
        fastdistill.kd_loss(s, t, sample_weight=w, backend="reference"),
        fastdistill.kd_loss(s, t, teacher_weights=torch.empty(2, **m), backend="reference"),
        fastdistill.kd_loss(s, t, num_items=torch.empty((), **m), backend="reference"),
        fastdistill.codistill_loss(s, b, labels, backend="reference").loss_a,
        fastdistill.mi_alpha(torch.empty(4, 3, **m), torch.empty(4, 3, **m), backend="reference"),
        fastdistill.mi_alpha(torch.empty(4, 3, **m), torch.empty(4, 3, **m), log_baseline=w, backend="reference"),
    ]
    assert all(r.device.type == "meta" and r.shape == () for r in results)
    with pytest.raises(ValueError, match="num_items is a meta tensor"):
        fastdistill.kd_loss(torch.randn(4, 7), torch.randn(4, 7), num_items=torch.empty((), **m))
