"""The host-side work around a Triton launch (fastdistill/ops/triton/launch.py), which no kernel test sees but which
a GPU benchmark at sub-millisecond kernels measures in series: kernel-argument tensors cached by value in eager
calls (not rebuilt from ~25 fills per call), built fresh while torch.compile traces; the kernel launched directly in
eager (wrap_triton's higher-order op costs ~0.2 ms a launch outside a triton_op and registers every kernel in a
global table); denominators known on the host made without a synchronising host-to-device copy."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import requires_triton

pytestmark = requires_triton


def test_argument_tensors_are_cached_in_eager_and_built_while_tracing():
    from fastdistill.ops.triton import launch

    like = torch.empty(3)
    ints = launch.int_tensor([7, 8, True], like)
    assert ints.tolist() == [7, 8, 1] and ints.dtype == torch.int64
    assert launch.int_tensor([7, 8, 1], like) is ints  # the same values: the same tensor, nothing launched
    assert launch.int_tensor([7, 9, 1], like) is not ints
    prm = launch.param_tensor([0.5, 0.0], torch.float32, like)
    assert launch.param_tensor([0.5, 0.0], torch.float32, like) is prm
    neg = launch.param_tensor([0.5, -0.0], torch.float32, like)  # -0.0 == 0.0, but not the same bits
    assert neg is not prm and torch.signbit(neg[1]) and not torch.signbit(prm[1])
    assert launch.param_tensor([0.5, 0.0], torch.float64, like).dtype == torch.float64
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(like)
        traced = launch.int_tensor([7, 8, 1], fake)
    assert traced is not ints and launch.is_traced(traced)


class _Kernel:
    """Stands for a JITFunction: records kernel[grid](...) calls."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(grid)


def test_eager_launches_skip_wrap_triton(monkeypatch):
    from fastdistill.ops.triton import launch

    wrapped = []

    def wrap_triton(kernel):
        wrapped.append(kernel)
        return kernel

    monkeypatch.setattr(torch.library, "wrap_triton", wrap_triton)
    monkeypatch.setattr(launch, "INTERPRET", False)  # the decision on a GPU (the interpreter's is below)
    kernel = _Kernel()
    launch.Launch(kernel, (2,), (torch.zeros(2),), {}).run()
    assert kernel.calls == [(2,)] and wrapped == []  # eager: the kernel itself

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        launch.Launch(kernel, (3,), (torch.zeros(2),), {}).run()
    with FakeTensorMode() as mode:
        launch.Launch(kernel, (4,), (mode.from_tensor(torch.zeros(2)),), {}).run()
    assert wrapped == [kernel, kernel] and kernel.calls == [(2,), (3,), (4,)]  # watched or traced: wrap_triton
    launch.Launch(kernel, (0,), (torch.zeros(2),), {}).run()
    assert len(kernel.calls) == 3  # an empty grid launches nothing
    # Triton's interpreter: its kernels are plain Python, never wrapped (torch 2.11's wrap_triton rejects them)
    monkeypatch.setattr(launch, "INTERPRET", True)
    with Watch():
        launch.Launch(kernel, (5,), (torch.zeros(2),), {}).run()
    assert wrapped == [kernel, kernel] and kernel.calls[-1] == (5,)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [dict(), dict(num_items=5), dict(reduction="batchmean")])
def test_host_denominators_are_device_fills(kw):
    """torch.tensor(n, device=cuda) is a host-to-device copy that synchronises; a fill is not. (On the CPU the copy
    shows as aten.lift_fresh: host data turned into a tensor.)"""
    from fastdistill import functional

    logits = torch.randn(4, 6)
    with _Ops() as ops:
        _, _, den = functional.row_arguments(logits, labels=None, ignore_index=-100, check_label_range=False,
                                             label_use="", sample_weight=None, reduction=kw.get("reduction", "mean"),
                                             num_items=kw.get("num_items"), acc=torch.float32)  # fmt: skip
    assert "lift_fresh" not in ops.names and "_to_copy" not in ops.names, ops.names
    assert den.item() == {"num_items": 5.0}.get(next(iter(kw), ""), 4.0)
