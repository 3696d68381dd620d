"""Peak memory of backward = the gradient (issue 13, item 5).

kd_loss and codistill_loss compute the input gradients in the forward and save them; backward hands the saved
buffer out when grad_output is exactly 1 and otherwise scales it in place, so it allocates no second [N, V] buffer.
Measured on the CPU (C++ kernel, Triton interpreter) from the profiler's allocation events: the running sum of the
bytes allocated minus freed while backward runs, whose maximum is the backward's extra peak (the saved gradient was
allocated before, in the forward, and is not counted). A backward through a retained graph must stay out of place
(a second backward reads the saved gradient): it is the positive control of the measure, and gives the expected
values, bitwise.
"""

import pytest
import torch
from conftest import requires_ext, requires_triton
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastdistill
from fastdistill.ops import registration

N, V = 8, 300
BACKENDS = [pytest.param("cpu", marks=requires_ext), pytest.param("triton", marks=requires_triton)]
# grad_output of the fused op: exactly 1 (loss.backward()), a scalar != 1, a random [N] (reduction="none"), and
# all ones [N] (reduction="none" then .sum()).
MODES = ("one", "scaled", "rows", "rows_ones")
FACTOR = 0.3  # not a power of two: the scaled gradient is rounded, in place as out of place


def extra_peak(fn) -> int:
    """Bytes: the maximum over time of (CPU bytes allocated - bytes freed) while ``fn`` runs. Blocks allocated
    before (the saved gradient) count 0 and their frees are not seen, so this is an upper bound of the growth."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # the raw allocation events (as torch.profiler._memory_profiler reads them); prof.events() folds them into ops
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            sizes.append((e.start_time_ns, e.extra_fields.alloc_size))
    running = peak = 0
    for _, size in sorted(sizes):
        running += size
        peak = max(peak, running)
    return peak


class GradBuffers(TorchDispatchMode):
    """Storage addresses of the gradient buffers the fused ops return (their [N, V] / [K, N, V] outputs). Kept as
    ints: a reference to the tensors would stop autograd from adopting them as .grad without a copy."""

    def __init__(self):
        super().__init__()
        self.ptrs = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "fastdistill":
            self.ptrs |= {t.untyped_storage().data_ptr() for t in tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.numel() > 0}  # fmt: skip
        return out


def _leaf(seed, dtype, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(N, V, generator=g)).to(dtype).requires_grad_(requires_grad)


def _forward(op, backend, mode, dtype):
    """(leaves whose gradient is checked, the losses) for one case."""
    reduction = "none" if mode.startswith("rows") else "mean"
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(7))
    labels[1] = -100
    if op == "codistill":
        a, b = _leaf(1, dtype), _leaf(2, dtype)
        losses = fastdistill.codistill_loss(a, b, labels, temperature=2.0, reduction=reduction, backend=backend)
        return [a, b], list(losses)
    k = 1 if op == "kd1" else 2
    s = _leaf(1, dtype)
    if op == "kd2s":  # one stacked [2, N, V] teacher tensor: one input, its one gradient written by the kernel
        t = torch.stack([_leaf(2 + i, dtype, requires_grad=False) for i in range(k)]).requires_grad_()
        loss = fastdistill.kd_loss(s, t, divergence="jsd", temperature=2.0, reduction=reduction, backend=backend)
        return [s, t], [loss]
    ts = [_leaf(2 + i, dtype, requires_grad=k > 1) for i in range(k)]
    loss = fastdistill.kd_loss(s, ts, labels=labels, ce_weight=0.2, temperature=2.0, reduction=reduction,
                               backend=backend)  # fmt: skip
    return [s, *ts] if k > 1 else [s], [loss]


def _roots(mode, losses):
    """(outputs, grad_outputs) of the backward for ``mode``."""
    if mode == "one":
        return [sum(losses)], None
    if mode == "scaled":  # codistill: loss_a scaled in place, loss_b handed out, in one backward
        return [FACTOR * losses[0] + sum(losses[1:])], None
    if mode == "rows":
        g = torch.Generator().manual_seed(11)
        return losses, [torch.rand(N, generator=g) + 0.5 for _ in losses]
    return [sum(losses).sum()], None


# (op, grad_output, dtype, whether grad_output == 1 is checked): off is the CUDA path (no sync), mul_ by 1
CASES = [(op, mode, torch.float32, True) for mode in MODES for op in ("kd1", "kd2", "codistill")]
CASES += [("kd1", mode, torch.bfloat16, True) for mode in MODES[1:]]
CASES += [(op, mode, torch.float32, False) for mode in ("one", "rows_ones") for op in ("kd1", "codistill")]
CASES += [("kd2s", mode, torch.float32, True) for mode in ("one", "rows")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, mode, dtype, check_one", CASES)
def test_backward_peak_is_the_gradient(backend, op, mode, dtype, check_one, monkeypatch):
    if not check_one:
        monkeypatch.setattr(registration, "_exactly_one", lambda grad_loss: False)
    with GradBuffers() as buffers:
        leaves, losses = _forward(op, backend, mode, dtype)
    grad_bytes = sum(x.numel() * x.element_size() for x in leaves)
    # one buffer per input; the Triton op returns the trained teachers' gradient as one [M, N, V] tensor
    # (a stacked one: one [K, N, V] on every backend, never K [N, V] re-stacked by autograd)
    assert len(buffers.ptrs) == {"kd1": 1, "kd2": 2 if backend == "triton" else 3, "kd2s": 2, "codistill": 2}[op]
    outputs, grad_outputs = _roots(mode, losses)

    # Graph retained: out of place (a second backward must read the saved gradient unchanged). The measure sees
    # that second buffer, and its values are what the in-place backward below must give, bit for bit.
    expected = []
    retained = extra_peak(lambda: expected.extend(torch.autograd.grad(outputs, leaves, grad_outputs,
                                                                      retain_graph=True)))  # fmt: skip
    assert retained >= grad_bytes, f"the measure misses the out-of-place buffer: {retained} < {grad_bytes} bytes"
    assert not {e.untyped_storage().data_ptr() for e in expected} & buffers.ptrs
    again = torch.autograd.grad(outputs, leaves, grad_outputs, retain_graph=True)
    for e, a in zip(expected, again):
        assert torch.equal(e, a)

    # Graph freed: the saved buffers become .grad, handed out or scaled in place.
    peak = extra_peak(lambda: torch.autograd.backward(outputs, grad_outputs))
    assert peak < grad_bytes // 16, f"backward allocated {peak} bytes beyond the {grad_bytes}-byte gradient"
    for x, e in zip(leaves, expected):
        assert x.grad.dtype == dtype
        assert torch.equal(x.grad, e)
        assert x.grad.untyped_storage().data_ptr() in buffers.ptrs


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_raises_and_keeps_the_saved_gradient(backend):
    """create_graph=True (backward recorded for a second derivative) raises: the fused gradient has no derivative
    of its own. It raises before touching the saved gradient, so the graph, kept, still gives the first-order
    gradient."""
    s = _leaf(1, torch.float32)
    t = _leaf(2, torch.float32, requires_grad=False)
    loss = fastdistill.kd_loss(s, t, temperature=2.0, reduction="none", backend=backend)
    w = (torch.rand(N) + 0.5).requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, w, create_graph=True)
    (g,) = torch.autograd.grad(loss, s, w.detach(), retain_graph=True)
    (g1,) = torch.autograd.grad(loss, s, torch.ones(N))  # graph freed: the saved gradient itself
    assert torch.equal(g, g1 * w.detach()[:, None])
