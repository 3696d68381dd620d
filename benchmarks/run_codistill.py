"""Time fastdistill.codistill_loss (two models distilling into each other) against the two one-way kd_loss calls it
replaces, and against eager / compiled PyTorch; forward + backward to both models; print a table, save JSON.

Usage: ``python -m benchmarks.run_codistill [--device cpu|cuda] [--quick] ...`` (see ``--help``).

The loss, per row: half each model's cross-entropy (at 1) plus half T^2 KL(P_other || Q_self) at T (1 and 2), the
other model's distribution a constant (kd_loss's ce_weight = 1/2); mean over rows; both logits [N, V] require grad.
Method as in ``benchmarks.run``: one warm-up step, median of ``--repeats``. Bytes that must move (logits read,
gradients written, sizeof(in) each):
    fused codistill_loss:  2 N V read + 2 N V written  (each row of a and b read once)
    two kd_loss calls:     4 N V read + 2 N V written  (each call reads both models' rows)
so the fused op reads half as much and moves 2/3 of the bytes; ``floor_ms`` is its 4 N V at the copy bandwidth
measured in the same run, for every provider (the least any of them must move). Each (provider, V, T) runs in its
own child process, under ``--budget-s``, and so does the fused-vs-two-calls agreement check: see
:mod:`benchmarks.isolate`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fastdistill

from . import isolate
from .run import (
    MEMORY_NOTE,
    _median_ms,
    _pipelined_ms,
    copy_bandwidth_GBps,
    environment,
    peak_extra_bytes,
    report,
    run_info,
    save,
    start,
    versions_line,
)

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _fused(backend: str, T: float) -> Loss:
    def fn(a, b, labels):
        la, lb = fastdistill.codistill_loss(a, b, labels, temperature=T, hard_weight=0.5, weight_ab=0.5,
                                            weight_ba=0.5, backend=backend)  # fmt: skip
        return la + lb

    return fn


def _two_calls(backend: str, T: float) -> Loss:
    """What a user writes without the fused op: one kd_loss per direction, the other model detached (row loss
    (1 - ce_weight) c D + ce_weight CE = (CE + c D) / 2 at ce_weight = 1/2)."""

    def fn(a, b, labels):
        kw = dict(labels=labels, ce_weight=0.5, temperature=T, backend=backend)
        return fastdistill.kd_loss(a, b.detach(), **kw) + fastdistill.kd_loss(b, a.detach(), **kw)

    return fn


def _eager(T: float) -> Loss:
    def fn(a, b, labels):
        def side(x, other):
            log_q = F.log_softmax(x.float() / T, dim=-1)
            log_p = F.log_softmax(other.detach().float() / T, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T**2
            return 0.5 * (F.cross_entropy(x.float(), labels) + kl)

        return side(a, b) + side(b, a)

    return fn


PROVIDERS: dict[str, Callable[[float], Loss]] = {
    "fused-cpu": lambda T: _fused("cpu", T),
    "two-kd-cpu": lambda T: _two_calls("cpu", T),
    "fused-triton": lambda T: _fused("triton", T),
    "two-kd-triton": lambda T: _two_calls("triton", T),
    "eager": _eager,
    "compile": lambda T: torch.compile(_eager(T), dynamic=False),
}


def unavailable_reason(name: str, device: str) -> str | None:
    if name not in PROVIDERS:
        return f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})"
    if name.endswith("-cpu") and (device != "cpu" or not fastdistill.extension_available()):
        return "the cpu backend needs CPU tensors and the built extension"
    if name.endswith("-triton") and device != "cuda":
        return "triton is benchmarked on CUDA only (on the CPU it would run in Triton's interpreter)"
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA not available"
    return None


def make_inputs(N: int, V: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Fixed-seed logits a, b [N, V] (both require grad) and labels [N], drawn on ``device`` (on the CPU the values
    are the same as ever)."""
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(N, V, generator=g, device=device).mul_(2).to(dtype).requires_grad_()
    b = torch.randn(N, V, generator=g, device=device).mul_(2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    return a, b, labels


def step(fn: Loss, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> None:
    fn(a, b, labels).backward()
    a.grad = b.grad = None


def bench_one(provider: str, N: int, V: int, T: float, dtype: torch.dtype, device: str, repeats: int) -> dict:
    a, b, labels = make_inputs(N, V, dtype, device)
    fn = PROVIDERS[provider](T)
    run = lambda: step(fn, a, b, labels)  # noqa: E731
    run()  # warm-up (compiles for "compile")
    ms = _median_ms(run, repeats, device)
    size = a.element_size()
    reads = 2 if provider.startswith("fused") else 4
    return {
        "provider": provider,
        "N": N,
        "V": V,
        "T": T,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": ms,
        "pipelined_ms": _pipelined_ms(run, repeats, device),  # benchmarks/run.py's docstring
        "peak_bytes": peak_extra_bytes(run, device),
        "bytes_min": 4 * N * V * size,  # the fused op's reads + writes: the least any provider must move
        "bytes_moved": (reads + 2) * N * V * size,  # this provider's own (eager/compile: at least the 2-call count)
    }


def cell(provider: str, V: int, T: float, N: int, dtype: str, device: str, repeats: int) -> dict:
    """One row, measured in a child process (``benchmarks/isolate.py`` calls this)."""
    return bench_one(provider, N, V, T, getattr(torch, dtype), device, repeats)


def check_agreement(N: int, V: int, device: str) -> float:
    """Max |fused - two calls| over the loss and both gradients (float32): the providers compute the same thing."""
    a, b, labels = make_inputs(N, V, torch.float32, device)
    outs = []
    for fn in (_fused("auto", 2.0), _two_calls("auto", 2.0)):
        loss = fn(a, b, labels)
        ga, gb = torch.autograd.grad(loss, [a, b])
        outs.append((loss.detach(), ga, gb))
    return max(float((x - y).abs().max()) for x, y in zip(*outs))


def agreement(N: int, V: int, device: str) -> dict:
    """``check_agreement`` as a child's result (it runs the device's kernels, so it is isolated too)."""
    return {"max_abs_diff": check_agreement(N, V, device)}


def markdown_table(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    base = {(r["V"], r["T"]): r["ms"] for r in ok if r["provider"].startswith("two-kd")}
    lines = [
        "| provider | V | T | ms (median) | pipelined ms | vs two kd_loss calls | floor ms | floor_fraction "
        "| peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['provider']} | {r['V']} | {r['T']:g} | {isolate.describe(r)} | | | | | |")
            continue
        ref = base.get((r["V"], r["T"]))
        rel = f"{ref / r['ms']:.2f}x" if ref else "-"
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MiB"
        piped = f"{r['pipelined_ms']:.2f}" if r.get("pipelined_ms") is not None else "-"
        lines.append(f"| {r['provider']} | {r['V']} | {r['T']:g} | {r['ms']:.2f} | {piped} | {rel} "
                     f"| {r['floor_ms']:.2f} | {r['floor_fraction']:.3f} | {peak} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_codistill", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rows", type=int, default=2048, help="N")
    p.add_argument("--vocab", type=lambda s: [int(x) for x in s.split(",") if x], default="8192,32000")
    p.add_argument(
        "--temperatures",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default="1,2",
        help="comma-separated T values (at T = 1 the cross-entropy shares the softmax: fewer exps)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--repeats", type=isolate.positive_int, default=5)
    p.add_argument("--providers", default=None, help=f"comma-separated, of: {','.join(PROVIDERS)} "
                   "(default: the device's fused and two-call backends, eager, compile)")  # fmt: skip
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/codistill-<device>-<date>.json; none for --quick)",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes (N=64, V=1000,4096, 3 repeats): smoke test")
    isolate.add_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        isolate.apply_quick(p, args, rows=64, vocab=[1000, 4096], repeats=3)
    if args.providers is None:
        fused = "cpu" if args.device == "cpu" else "triton"
        args.providers = f"fused-{fused},two-kd-{fused},eager,compile"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = isolate.Budget(args.budget_s, args.deadline)
    device, dtype, today, out, load = start(args, "codistill-")
    env = environment(device)
    gbps = copy_bandwidth_GBps(device)
    if device == "cuda":
        torch.cuda.empty_cache()  # the children need the memory, not this process
    print(f"device: {env['device']}; {versions_line(env)}; threads {torch.get_num_threads()}; "
          f"copy {gbps:.1f} GB/s; N={args.rows}, dtype={args.dtype}", flush=True)  # fmt: skip
    check = {"N": 64, "V": 1000, "device": device}
    if args.in_process:
        agree = isolate._run_here("benchmarks.run_codistill", "agreement", check)
    elif budget.left() < isolate.MIN_START_S:
        agree = {"status": "skipped", "reason": "budget"}
    else:
        try:
            agree = isolate.run_child("benchmarks.run_codistill", "agreement", check,
                                      min(budget.left(), args.child_timeout_s or math.inf),
                                      echo=lambda s: print(s.rstrip(), file=sys.stderr))  # fmt: skip
        except isolate.Interrupted as e:
            print(f"interrupted ({e}) before the first row", file=sys.stderr)
            return 130
    diff = agree.get("max_abs_diff")
    print("fused vs two calls max |diff| (float32, N=64, V=1000): "
          + (f"{diff:.2e}" if diff is not None else isolate.describe(agree)), flush=True)  # fmt: skip
    providers = [p for p in args.providers.split(",") if p]
    cells = [isolate.Cell({"provider": prov, "V": V, "T": T, "N": args.rows},
                          {"dtype": args.dtype, "device": device, "repeats": args.repeats},
                          unavailable_reason(prov, device))
             for prov in providers for V in args.vocab for T in args.temperatures]  # fmt: skip

    def result(rows: list[dict], complete: bool) -> dict:
        return {
            **env, "threads": torch.get_num_threads(), "copy_GBps": gbps, "loadavg_1min_at_start": load,
            "fused_vs_two_calls_max_abs_diff": diff, "fused_vs_two_calls_check": agree,
            "loss": "per model: (CE + T^2 KL(P_other || Q_self) at T (column T)) / 2, other detached; mean over "
                    "rows; forward + backward to both models",
            "peak_bytes_note": MEMORY_NOTE[device], **run_info(args), "complete": complete,
            "counts": isolate.counts(rows), "rows": rows,
        }  # fmt: skip

    def on_row(r: dict, rows: list[dict]) -> None:
        if r["status"] == "ok":
            floor_ms = r["bytes_min"] / (gbps * 1e9) * 1e3
            r |= {"floor_ms": floor_ms, "floor_fraction": floor_ms / r["ms"]}
        report(r, f"{r['provider']:>13} V={r['V']:<6} T={r['T']:g}")
        save(out, result(rows, False), quiet=True)

    rows = isolate.run_script(cells, "benchmarks.run_codistill", budget, on_row, args)
    if rows is None:
        return 130
    order = {p: i for i, p in enumerate(providers)}
    print(markdown_table(sorted(rows, key=lambda r: (r["V"], r["T"], order[r["provider"]]))))
    save(out, result(rows, True))
    bad_check = agree["status"] == "failed" or (diff is not None and not (math.isfinite(diff) and diff <= 1e-4))
    return 1 if isolate.counts(rows)["failed"] or bad_check else 0


if __name__ == "__main__":
    sys.exit(main())
