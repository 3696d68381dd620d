"""Host time of a fused-op call, by route: torch's custom-op autograd wrapper ("op") against the plain
autograd.Function of :mod:`fastdistill.ops.eager` ("eager"), on inputs so small that the kernel costs nothing.

Usage: ``python -m benchmarks.run_host [--device cpu|cuda] [--repeats N] [--json PATH]``.

Per (call, route), interleaved rounds, medians in µs: ``to_kernel`` (from the call to the moment the op is
dispatched to its kernel: what a synchronised GPU step adds in series before the kernel starts), ``forward`` (the
whole forward call) and ``step`` (forward, then ``backward()``; the gradient is written by the forward kernel, so
backward is host work and one scale). The route is switched in the same process (``eager._plain_eager`` forced to
the op route), so both see the same interpreter, caches and machine.
"""

from __future__ import annotations

import argparse
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


def calls(device: str) -> dict[str, Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]]:
    """name -> a function making (loss, leaves) for one call on small inputs."""
    backend = "cpu" if device == "cpu" else "auto"
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    s, t, t4 = leaf(8, 64), torch.randn(8, 64, device=device), torch.randn(4, 8, 64, device=device)
    a, b = leaf(8, 64), leaf(8, 64)
    u, v = leaf(16, 8), leaf(16, 8)
    return {
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
    to_kernel = _stamps[0] - t0 if _stamps else float("nan")
    loss.backward()
    t2 = time.perf_counter()
    for x in leaves:
        x.grad = None
    sync()
    return to_kernel * 1e6, (t1 - t0) * 1e6, (t2 - t0) * 1e6


def run(device: str, repeats: int) -> list[dict]:
    rows = []
    torch._C._AutoDispatchBelowAutograd = _Stamp
    try:
        for name, make in calls(device).items():
            samples = {r: [] for r in ("op", "eager")}
            for i in range(repeats + 20):
                for r in samples:  # interleaved: both routes see the same drift of the machine
                    with _route(r):
                        m = measure(make, device)
                    if i >= 20:  # warm-up
                        samples[r].append(m)
            for r, ms in samples.items():
                med = [statistics.median(x[j] for x in ms) for j in range(3)]
                rows.append({"call": name, "route": r, "to_kernel_us": med[0], "forward_us": med[1],
                             "step_us": med[2]})  # fmt: skip
    finally:
        torch._C._AutoDispatchBelowAutograd = _GUARD
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
    p.add_argument("--json", default=None, help="save the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the host path, not the kernels' threads
    rows = run(args.device, args.repeats)
    env = environment(args.device)
    print(f"{env['device']}, torch {env['torch']}, {env['date']}\n")
    print(table(rows))
    if args.json:
        save(Path(args.json), {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
