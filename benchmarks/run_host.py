"""Host time of a fused-op call, by route: torch's custom-op autograd wrapper ("op") against the plain
autograd.Function of :mod:`fastdistill.ops.eager` ("eager"), on inputs so small that the kernel costs nothing.

Usage: ``python -m benchmarks.run_host [--device cpu|cuda] [--repeats N] [--triton-stub] [--json PATH]``.

Per (call, route), interleaved rounds, medians in µs: ``to_kernel`` (from the call to the moment the op is
dispatched to its kernel: what a synchronised GPU step adds in series before the kernel starts), ``forward`` (the
whole forward call) and ``step`` (forward, then ``backward()``; the gradient is written by the forward kernel, so
backward is host work and one scale). The route is switched in the same process (``eager._plain_eager`` forced to
the op route), so both see the same interpreter, caches and machine.

``--triton-stub`` (no GPU needed) adds the Triton backend's kd_loss on CPU tensors with the launch itself replaced by
a time stamp: the GPU code path up to the kernel launch (argument preparation, row split, constexprs), which on a GPU
machine is in series with every synchronised step; ``to_kernel`` is then the time to the launch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

import fastdistill
from fastdistill.ops import eager

from .run import environment, save

_stamps: list[float] = []


class _Stamp:
    """torch._C._AutoDispatchBelowAutograd, noting when it is entered: both routes enter it just before the
    kernel (the op's wrapper in its forward, eager.call in its Function's)."""

    def __init__(self) -> None:
        self.guard = _GUARD()

    def __enter__(self):
        self.guard.__enter__()
        _stamps.append(time.perf_counter())

    def __exit__(self, *exc):
        return self.guard.__exit__(*exc)


_GUARD = torch._C._AutoDispatchBelowAutograd


@contextmanager
def _route(name: str):
    plain = eager._plain_eager
    if name == "op":
        eager._plain_eager = lambda args: None
    try:
        yield
    finally:
        eager._plain_eager = plain


@contextmanager
def _triton_stub():
    """The Triton kd_loss's GPU code path on CPU tensors, its launches replaced by a stamp (see the docstring)."""
    env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the dispatch takes CPU tensors to Triton only under the interpreter
    from fastdistill.ops.triton import kd_loss, launch

    saved = (kd_loss.INTERPRET, launch.INTERPRET, launch.Launch.run)
    kd_loss.INTERPRET = launch.INTERPRET = False  # the GPU's row split and launch path, not the interpreter's
    launch.Launch.run = lambda self: _stamps.append(time.perf_counter())
    try:
        yield
    finally:
        kd_loss.INTERPRET, launch.INTERPRET, launch.Launch.run = saved
        if env is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = env


def calls(device: str, triton_stub: bool = False) -> dict[str, Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]]:
    """name -> a function making (loss, leaves) for one call on small inputs."""
    backend = "cpu" if device == "cpu" else "auto"
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    s, t, t4 = leaf(8, 64), torch.randn(8, 64, device=device), torch.randn(4, 8, 64, device=device)
    a, b = leaf(8, 64), leaf(8, 64)
    u, v = leaf(16, 8), leaf(16, 8)
    out = {}
    if triton_stub:
        sb = torch.randn(64, 4096, generator=g).bfloat16().requires_grad_()
        tb = torch.randn(64, 4096, generator=g).bfloat16()
        out["kd_loss triton K=1 (launch stubbed)"] = lambda: (fastdistill.kd_loss(sb, tb, temperature=2.0,
                                                                                  backend="triton"), [sb])  # fmt: skip
    return out | {
        "kd_loss K=1": lambda: (fastdistill.kd_loss(s, t, temperature=2.0, backend=backend), [s]),
        "kd_loss K=4": lambda: (fastdistill.kd_loss(s, t4, temperature=2.0, backend=backend), [s]),
        "codistill_loss": lambda: (sum(fastdistill.codistill_loss(a, b, temperature=2.0, backend=backend)), [a, b]),
        "mi_alpha": lambda: (fastdistill.mi_alpha(u, v, backend=backend), [u, v]),
    }


def measure(make, device: str) -> tuple[float, float, float]:
    """(to_kernel, forward, step) in µs for one call of ``make``."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    _stamps.clear()
    t0 = time.perf_counter()
    loss, leaves = make()
    t1 = time.perf_counter()
    to_kernel = _stamps[-1] - t0 if _stamps else float("nan")  # the last stamp of the forward: the kernel's start
    loss.backward()
    t2 = time.perf_counter()
    for x in leaves:
        x.grad = None
    sync()
    return to_kernel * 1e6, (t1 - t0) * 1e6, (t2 - t0) * 1e6


def run(device: str, repeats: int, triton_stub: bool = False) -> list[dict]:
    rows = []
    torch._C._AutoDispatchBelowAutograd = _Stamp
    try:
        for name, make in calls(device, triton_stub).items():
            if "stubbed" in name:
                with _triton_stub():
                    rows += _rows(name, make, device, repeats)
            else:
                rows += _rows(name, make, device, repeats)
    finally:
        torch._C._AutoDispatchBelowAutograd = _GUARD
    return rows


def _rows(name: str, make, device: str, repeats: int) -> list[dict]:
    """The two rows (op, eager) of one call: medians over ``repeats`` interleaved rounds after 20 of warm-up."""
    samples: dict[str, list[tuple[float, float, float]]] = {"op": [], "eager": []}
    for i in range(repeats + 20):
        # interleaved, in alternating order: both routes see the same drift of the machine, neither goes first
        for r in ("op", "eager") if i % 2 else ("eager", "op"):
            with _route(r):
                m = measure(make, device)
            if i >= 20:
                samples[r].append(m)
    rows = []
    for r, ms in samples.items():
        med = [statistics.median(x[j] for x in ms) for j in range(3)]
        rows.append({"call": name, "route": r, "to_kernel_us": med[0], "forward_us": med[1], "step_us": med[2]})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| call | route | to kernel (µs) | forward (µs) | forward + backward (µs) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['call']} | {r['route']} | {r['to_kernel_us']:.1f} | {r['forward_us']:.1f} | "
                   f"{r['step_us']:.1f} |")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--triton-stub", action="store_true", help="add the Triton kd_loss, its launch stubbed")
    p.add_argument("--json", default=None, help="save the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the host path, not the kernels' threads
    rows = run(args.device, args.repeats, args.triton_stub)
    env = environment(args.device)
    print(f"{env['device']}, torch {env['torch']}, {env['date']}\n")
    print(table(rows))
    if args.json:
        save(Path(args.json), {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
