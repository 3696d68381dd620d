"""fastdistill.ops.eager: plain eager calls run the fused ops through a hand-written autograd.Function instead of
torch's custom-op autograd wrapper (its per-call pytree and fill_defaults), everything else through the op. Both
routes must give the same bits, the same gradients to every input, and the same autograd behaviour."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdistill
from fastdistill.ops import eager
from tests.conftest import CPU_BACKENDS, make_inputs, requires_ext


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: it makes eager.call take the op's own autograd."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _node_names(loss):
    return type(loss.grad_fn).__name__


@pytest.fixture
def spy_fill_defaults(monkeypatch):
    """Counts torch's custom-op autograd forwards (torch._library.autograd calls fill_defaults in each)."""
    import torch._library.utils as utils

    calls = []
    orig = utils.fill_defaults

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(utils, "fill_defaults", spy)
    return calls


def _kd_step(backend, divergence, k, teacher_grad, mode=None):
    student, teachers = make_inputs((5,), 37, k, seed=3)
    s = student.clone().requires_grad_(True)
    ts = [t.clone().requires_grad_(teacher_grad) for t in teachers]
    labels = torch.randint(0, 37, (5,), generator=torch.Generator().manual_seed(1))
    labels[1] = -100
    kw = dict(divergence=divergence, temperature=2.0, labels=labels, ce_weight=0.3, backend=backend)
    if mode is None:
        loss = fastdistill.kd_loss(s, ts, **kw)
    else:
        with mode:
            loss = fastdistill.kd_loss(s, ts, **kw)
    (loss * 0.7).backward()
    return loss, s.grad, [t.grad for t in ts], type(loss.grad_fn).__name__


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if getattr(b, "values", (b,))[0] != "reference"])
@pytest.mark.parametrize("divergence,k,teacher_grad", [("kl", 1, False), ("jsd", 3, True), ("skew_kl", 2, True)])
def test_routes_agree_bit_for_bit(backend, divergence, k, teacher_grad, spy_fill_defaults):
    """The eager Function and the op's own autograd: the same loss and gradients (student and a teacher list with
    grads; div_params empty for KL, one value for JSD and skew), and only the op route enters torch's wrapper."""
    loss, gs, gts, node = _kd_step(backend, divergence, k, teacher_grad)
    assert node.startswith("Eager_fastdistill") and spy_fill_defaults == []
    loss2, gs2, gts2, node2 = _kd_step(backend, divergence, k, teacher_grad, mode=_Passthrough())
    assert not node2.startswith("Eager_") and spy_fill_defaults != []
    assert torch.equal(loss, loss2) and torch.equal(gs, gs2)
    for a, b in zip(gts, gts2):
        assert (a is None and b is None) if not teacher_grad else torch.equal(a, b)


@requires_ext
def test_codistill_and_mi_alpha_take_the_eager_route(spy_fill_defaults):
    a = torch.randn(6, 11, requires_grad=True)
    b = torch.randn(6, 11, requires_grad=True)
    la, lb = fastdistill.codistill_loss(a, b, temperature=2.0, backend="cpu")
    (la + 2 * lb).backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    with _Passthrough():
        la2, lb2 = fastdistill.codistill_loss(a, b, temperature=2.0, backend="cpu")
    (la2 + 2 * lb2).backward()
    assert torch.equal(la, la2) and torch.equal(lb, lb2) and torch.equal(ga, a.grad) and torch.equal(gb, b.grad)

    u = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    calls = len(spy_fill_defaults)
    est = fastdistill.mi_alpha(u, v, backend="cpu")
    assert type(est.grad_fn).__name__.startswith("Eager_fastdistill_mi_alpha") and len(spy_fill_defaults) == calls
    assert torch.autograd.gradcheck(lambda x, y: fastdistill.mi_alpha(x, y, backend="cpu"), (u, v))


@requires_ext
def test_autograd_contract_on_the_eager_route():
    """What the op's autograd promises holds on the eager route too: no graph without grad, retain_graph leaves
    the saved gradient intact (two backwards, the same answer), create_graph is refused, a non-leaf student."""
    s, (t,) = make_inputs((4,), 9, 1)
    with torch.no_grad():
        assert fastdistill.kd_loss(s.requires_grad_(), t, backend="cpu").grad_fn is None
    x = torch.randn(4, 9, requires_grad=True)
    loss = fastdistill.kd_loss(x * 2, t, backend="cpu")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)
    loss = fastdistill.kd_loss(x, t, backend="cpu")
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, x, create_graph=True)
    assert torch.autograd.gradcheck(
        lambda a, b: fastdistill.kd_loss(a, [b], divergence="jsd", backend="cpu"),
        (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),
         torch.randn(3, 5, dtype=torch.float64, requires_grad=True)),
    )  # fmt: skip


@requires_ext
def test_op_route_where_the_call_is_not_plain_eager():
    """Tensor subclasses, functorch and dispatch modes keep the op's own autograd (they must see the op)."""
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    args = (s, [t], None, None, None, None, "kl", "prob_mean", 1.0, 1.0, 0.0, [], -100, True, True, False)
    assert eager._plain_eager(args) is True
    assert eager._plain_eager((s.detach(), *args[1:])) is False
    with torch.no_grad():
        assert eager._plain_eager(args) is False
    with _Passthrough():
        assert eager._plain_eager(args) is None

    class Sub(torch.Tensor):
        pass

    assert eager._plain_eager((s.as_subclass(Sub), *args[1:])) is None
    assert eager._plain_eager((torch.nn.Parameter(s.detach()), *args[1:])) is True
    seen = []
    torch.func.grad(lambda x: seen.append(eager._plain_eager((x, *args[1:]))) or x.sum())(s.detach())
    assert seen == [None]
    # a transform over closed-over plain tensors: autograd.Function without setup_context would refuse it
    out = torch.func.vmap(lambda w: fastdistill.kd_loss(s, t, backend="cpu") * w)(torch.ones(2))
    out.sum().backward()
    assert torch.allclose(s.grad, 2 * torch.autograd.grad(fastdistill.kd_loss(s, t, backend="cpu"), s)[0])


def _eager_node(fn) -> bool:
    """Whether the graph from autograd node ``fn`` has a node of the eager route (codistill's sum: AddBackward; its
    losses each on an _OwnLoss node)."""
    if fn is None:
        return False
    return type(fn).__name__.startswith(("Eager_", "_OwnLoss")) or any(_eager_node(f) for f, _ in fn.next_functions)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_codistill_losses_backpropagate_one_after_the_other(backend, monkeypatch):
    """loss_a.backward(); loss_b.backward() (one optimizer per model) works on the fused backends as on the
    reference: each loss has its own graph node on the eager route, so the first backward frees only its own
    gradient; the gradients equal one backward of the sum, and a second backward of one loss is autograd's error."""
    if backend == "cpu" and not fastdistill.extension_available():
        pytest.skip("the C++ extension is not built")
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton")
    torch.manual_seed(0)
    a0, b0 = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4])
    grads = {}
    for how in ("apart", "sum"):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        la, lb = fastdistill.codistill_loss(a, b, labels, temperature=2.0, hard_weight=0.3, backend=backend)
        if how == "apart":
            la.backward()
            lb.backward()
            with pytest.raises(RuntimeError, match="second time"):
                la.backward()
        else:
            (la + lb).backward()
        grads[how] = (a.grad, b.grad)
    for x, y in zip(grads["apart"], grads["sum"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@requires_ext
def test_host_benchmark_runs_both_routes():
    """benchmarks.run_host (make bench): every call, both routes, finite times, and the route switch restored."""
    from benchmarks import run_host

    plain = eager._plain_eager
    nodes = []
    measure = run_host.measure

    def spy(make, device):  # which route each timed call took
        def recording():
            loss, leaves = make()
            nodes.append(_eager_node(loss.grad_fn))
            return loss, leaves

        return measure(recording, device)

    run_host.measure = spy
    try:
        rows = run_host.run("cpu", repeats=2)
    finally:
        run_host.measure = measure
    assert nodes.count(True) == nodes.count(False) == 4 * 22  # every call, 20 warm-up rounds + 2
    assert eager._plain_eager is plain and torch._C._AutoDispatchBelowAutograd is run_host._GUARD
    assert [(r["call"], r["route"]) for r in rows][:2] == [("kd_loss K=1", "op"), ("kd_loss K=1", "eager")]
    assert len(rows) == 8 and all(0 < r["to_kernel_us"] <= r["forward_us"] <= r["step_us"] for r in rows)
    assert "| kd_loss K=1 | eager |" in run_host.table(rows)
