"""Time fastdistill.mi_alpha (fused) against the materialised N x N estimator, eager and compiled; forward + backward.

Usage: ``python -m benchmarks.run_mi [--device cpu|cuda] [--quick] ...`` (see ``--help``).

Method, per (N, D, provider): fixed-seed features u, v [N, D] (both require grad, as behind trainable critic
projections) and a Tensor log-baseline [N]; alpha = 0.01, dot critic, T = 1; one warm-up step (compiles);
``--repeats`` timed steps (estimate.backward(), grads dropped), median. Useful work: 3 * 2 * N^2 * D flops per
fwd + bwd (one score matmul forward, two gradient matmuls backward -- what an implementation that stores S would
do; the fused kernels recompute S and do more), against the dense matmul rate of the same dtype measured in the
same run (``--dtype`` [N, D] x [D, N] products at the largest N). Peak memory: as in :mod:`benchmarks.run`. A
provider that runs out of memory is recorded as such (a failed row marked ``oom``), not as a failure of the run.
Each (provider, N, D) runs in its own child process, under ``--budget-s``: see :mod:`benchmarks.isolate`.

The ``loss-*`` providers time ``fastdistill.MIAlphaLoss`` end to end at a distillation step's shapes instead (N
rows of hidden width D, projected to 128; ``loss-compile`` is the module on the materialised reference estimator
under torch.compile): their useful work is the estimator's at width 128 plus the projections' matmuls.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import fastdistill
from fastdistill.ops import gemm, reference

from . import isolate
from .run import (
    MEMORY_NOTE,
    _ints,
    _median_ms,
    environment,
    peak_extra_bytes,
    report,
    run_info,
    save,
    start,
    versions_line,
)

ALPHA = 0.01


def _strips(on: bool) -> None:
    """The Triton backend's path for half-precision features, for this process: strips (cuBLAS) or the tile
    kernels. Every Triton provider sets it, so that cells run in one process (--in-process) do not inherit it."""
    os.environ["FASTDISTILL_MI_STRIPS"] = "1" if on else "0"


# mi_alpha's default: the rows of S (and the log-baseline's index) are the student's features, u
ANCHOR = "student"


def _fused(backend: str) -> Callable:
    _strips(True)

    def fn(u, v, a):  # the estimator _eager writes out: dot critic at temperature 1 (mi_alpha's default is cosine)
        return fastdistill.mi_alpha(u, v, alpha=ALPHA, log_baseline=a, critic="dot", temperature=1.0, anchor=ANCHOR,
                                    backend=backend)  # fmt: skip

    return fn


def _eager(u, v, a):
    """The estimator as written over the materialised N x N matrix (the reference backend's code), the same loss as
    the fused providers': ``reference.mi_alpha(student, teacher)`` anchors its rows on ``teacher``, so
    ``mi_alpha(u, v, anchor="student")`` is ``reference.mi_alpha(v, u)`` (``reference.mi_alpha(u, v)`` is another
    estimator: the same number at a constant baseline, other gradients)."""
    cols, rows = (v, u) if ANCHOR == "student" else (u, v)
    return reference.mi_alpha(cols, rows, alpha=ALPHA, log_baseline=a, critic="dot", temperature=1.0)


def _triton_tiles() -> Callable:
    """The Triton backend's tile kernels for half-precision features too (v1's structure, no cuBLAS strips)."""
    fn = _fused("triton")
    _strips(False)
    return fn


PROJ_DIM = 128  # MIAlphaLoss's default projection width


def _loss_module(backend: str, compiled: bool = False) -> Callable:
    """``fastdistill.MIAlphaLoss`` end to end, as a distillation step uses it: [N, D] student and teacher rows
    (D = the hidden width), the default projections to 128 dims, learned baseline network and cosine critic, in the
    features' dtype; the estimator on ``backend`` (``compiled``: the whole module under torch.compile). The module
    is built on the first call, for the features' shape; its parameters' gradients accumulate (not timed apart)."""
    state: dict[str, Callable] = {}
    _strips(True)

    def fn(u, v, a):
        if "m" not in state:
            m = fastdistill.MIAlphaLoss(u.shape[1], v.shape[1], proj_dim=PROJ_DIM, backend=backend)
            m = m.to(device=u.device, dtype=u.dtype)
            state["m"] = torch.compile(m, dynamic=False) if compiled else m
        return state["m"](u, v)

    return fn


PROVIDERS: dict[str, Callable[[], Callable]] = {
    "loss-triton": lambda: _loss_module("triton"),
    "loss-cpu": lambda: _loss_module("cpu"),
    "loss-compile": lambda: _loss_module("reference", compiled=True),
    "cpu": lambda: _fused("cpu"),
    "triton": lambda: _fused("triton"),
    "triton-tiles": _triton_tiles,
    "auto": lambda: _fused("auto"),
    "eager": lambda: _eager,
    "compile": lambda: torch.compile(_eager, dynamic=False),
}


def unavailable_reason(name: str, device: str) -> str | None:
    if name not in PROVIDERS:
        return f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})"
    if name in ("cpu", "loss-cpu") and (device != "cpu" or not fastdistill.extension_available()):
        return "the cpu backend needs CPU tensors and the built extension"
    if "triton" in name and device != "cuda":
        return "triton is benchmarked on CUDA only"
    return None


def make_inputs(N: int, D: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Fixed-seed u, v [N, D] (correlated, as paired views are) and log-baseline a [N], all requiring grad, drawn on
    ``device`` (on the CPU the values are the same as ever)."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(N, D, generator=g, device=device) / D**0.5
    v = 0.8 * u + 0.6 * torch.randn(N, D, generator=g, device=device) / D**0.5
    a = torch.ones(N, device=device)
    return [x.to(device=device, dtype=dtype if x.dim() == 2 else torch.float32).requires_grad_() for x in (u, v, a)]


def matmul_tflops(N: int, D: int, dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """Dense [N, D] x [D, N] matmul rate (TFLOP/s), the shape of the score products, capped at N = 16384."""
    n = min(N, 16384)
    x = torch.randn(n, D, device=device, dtype=dtype)
    y = torch.randn(D, n, device=device, dtype=dtype)
    (x @ y)
    ms = _median_ms(lambda: x @ y, repeats, device)
    return 2 * n * n * D / (ms * 1e-3) / 1e12


def bench_one(provider: str, N: int, D: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    u, v, a = make_inputs(N, D, dtype, device)
    fn = PROVIDERS[provider]()

    def step():
        fn(u, v, a).backward()
        u.grad = v.grad = a.grad = None

    step()
    ms = _median_ms(step, repeats, device)
    # the loss module: the estimator at the projection width, plus the two projections D -> 128 (fwd + bwd)
    useful = 3 * 2 * N * N * PROJ_DIM + 2 * 6 * N * D * PROJ_DIM if provider.startswith("loss-") else 3 * 2 * N * N * D
    return {"provider": provider, "N": N, "D": D, "dtype": str(dtype).removeprefix("torch."), "ms": ms,
            "peak_bytes": peak_extra_bytes(step, device), "useful_flops": useful,
            "addmm_float32_c": gemm.addmm_takes_float32_c()}  # fmt: skip


def cell(provider: str, N: int, D: int, dtype: str, device: str, repeats: int) -> dict:
    """One row, measured in a child process (``benchmarks/isolate.py`` calls this)."""
    return bench_one(provider, N, D, getattr(torch, dtype), device, repeats)


def _is_oom(error: str) -> bool:
    return "out of memory" in error.lower() or "OutOfMemoryError" in error


def markdown_table(rows: list[dict]) -> str:
    lines = ["| provider | N | D | ms (median) | useful TFLOP/s | % of matmul peak | peak memory |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if r.get("status", "ok") != "ok":
            what = "out of memory" if r.get("oom") else isolate.describe(r)
            lines.append(f"| {r['provider']} | {r['N']} | {r['D']} | {what} | | | |")
            continue
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MiB"
        lines.append(f"| {r['provider']} | {r['N']} | {r['D']} | {r['ms']:.2f} | {r['useful_TFLOPs']:.3f} "
                     f"| {100 * r['fraction_of_peak']:.1f}% | {peak} |")  # fmt: skip
    return "\n".join(lines)


def _shapes(s: str) -> list[tuple[int, int]]:
    return [(int(n), int(d)) for n, _, d in (x.partition("x") for x in s.split(",") if x)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_mi", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rows", type=_ints, default="1024,4096", help="comma-separated N values")
    p.add_argument("--dims", type=_ints, default="128,768", help="comma-separated D values")
    p.add_argument(
        "--shapes",
        type=_shapes,
        default=None,
        help="comma-separated NxD pairs (e.g. 16384x768,16384x128), instead of --rows x --dims",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--repeats", type=isolate.positive_int, default=3)
    p.add_argument(
        "--providers",
        default="cpu,eager,compile",
        help=f"comma-separated, of: {','.join(PROVIDERS)}; run in this order (all shapes of the first provider first)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/mi-<device>-<date>.json; --quick writes none by default)",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes (N=256, D=32, 2 repeats): smoke test")
    isolate.add_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        isolate.apply_quick(p, args, rows=[256], dims=[32], repeats=2, shapes=None)
    if args.shapes is None:
        args.shapes = [(N, D) for N in args.rows for D in args.dims]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = isolate.Budget(args.budget_s, args.deadline)
    device, dtype, today, out, load = start(args, "mi-")
    env = environment(device)
    dims = sorted({D for _, D in args.shapes})
    peak = {D: matmul_tflops(max(N for N, d in args.shapes if d == D), D, dtype, device) for D in dims}
    if device == "cuda":
        torch.cuda.empty_cache()  # the children need the memory, not this process
    print(f"device: {env['device']}; {versions_line(env)}; dtype={args.dtype}; matmul peak TFLOP/s "
          + ", ".join(f"D={D}: {t:.2f}" for D, t in peak.items()), flush=True)  # fmt: skip
    providers = [p for p in args.providers.split(",") if p]
    cells = [isolate.Cell({"provider": prov, "N": N, "D": D},
                          {"dtype": args.dtype, "device": device, "repeats": args.repeats},
                          unavailable_reason(prov, device))
             for prov in providers for N, D in args.shapes]  # fmt: skip

    def result(rows: list[dict], complete: bool) -> dict:
        return {**env, "dtype": args.dtype, "alpha": ALPHA, "matmul_peak_TFLOPs": peak,
                "loadavg_1min_at_start": load, "peak_bytes_note": MEMORY_NOTE[device],
                "work": "fwd+bwd of mi_alpha (dot critic, Tensor log_baseline); useful flops = 3 * 2 * N^2 * D",
                **run_info(args), "complete": complete, "counts": isolate.counts(rows), "rows": rows}  # fmt: skip

    def on_row(r: dict, rows: list[dict]) -> None:
        if r["status"] == "ok":
            r["useful_TFLOPs"] = r["useful_flops"] / (r["ms"] * 1e-3) / 1e12
            r["fraction_of_peak"] = r["useful_TFLOPs"] / peak[r["D"]]
        elif r["status"] == "failed" and _is_oom(r["error"]):
            r["oom"] = True  # the materialised providers at large N: expected, not a failure of the run
        report(r, f"{r['provider']:>8} N={r['N']:<6} D={r['D']:<4}")
        save(out, result(rows, False), quiet=True)

    rows = isolate.run_script(cells, "benchmarks.run_mi", budget, on_row, args)
    if rows is None:
        return 130
    order = {p: i for i, p in enumerate(providers)}
    print(markdown_table(sorted(rows, key=lambda r: (r["N"], r["D"], order[r["provider"]]))))
    save(out, result(rows, True))
    return 1 if any(r["status"] == "failed" and not r.get("oom") for r in rows) else 0  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
