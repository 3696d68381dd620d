"""Time and peak memory of fastdistill.fused_linear_kd_loss (logits never whole) against the unfused path (the
student's and teachers' head matmuls, then kd_loss on the [N, V] logits), Liger-Kernel's LigerFusedLinearJSD
(beta = 0: forward KL, one teacher) and eager PyTorch; forward + backward to the hidden states and the head weight.

Usage: ``python -m benchmarks.run_fused_linear [--device cpu|cuda] [--quick] ...`` (see ``--help``).

The loss: forward KL at T = 1 (Liger's fused JSD has no temperature scaling of its own here), one or K teachers
given by hidden states [N, H] and a frozen head [V, H]; mean over rows. Useful work: the matmuls, 2 N H V flops
each: the student's logits, the K teachers', and two for the student's gradients (hidden, weight): (3 + K) units;
``tflops`` is that over the measured time. Each (provider, K) runs in its own child process under ``--budget-s``
(:mod:`benchmarks.isolate`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import TeacherHead
from fastdistill.ops import gemm

from . import isolate
from .run import MEMORY_NOTE, _median_ms, environment, peak_extra_bytes, report, run_info, save, start, versions_line

Loss = Callable[..., torch.Tensor]


def _fused(backend: str, head_dtype_accum: bool = False) -> Loss:
    """fused_linear_kd_loss; ``head_dtype_accum``: the weight gradient adds up in the head's dtype (accum_dtype),
    not float32."""

    def fn(h, w, teachers, labels):
        return fastdistill.fused_linear_kd_loss(h, w, [TeacherHead(th, tw) for th, tw in teachers], labels,
                                                accum_dtype=w.dtype if head_dtype_accum else None,
                                                backend=backend)  # fmt: skip

    return fn


def _unfused(backend: str) -> Loss:
    """What a user writes without the fused op: the head matmuls, then the fused row op on the whole logits."""

    def fn(h, w, teachers, labels):
        with torch.no_grad():
            t = [th @ tw.T for th, tw in teachers]
        return fastdistill.kd_loss(h @ w.T, t, labels, backend=backend)

    return fn


def _eager(h, w, teachers, labels):
    log_q = F.log_softmax((h @ w.T).float(), dim=-1)
    with torch.no_grad():
        log_p = torch.stack([F.log_softmax((th @ tw.T).float(), dim=-1) for th, tw in teachers]).exp().mean(0).log()
    keep = labels != -100
    return (log_p.exp() * (log_p - log_q)).sum(-1)[keep].mean()


def _liger() -> Loss:
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)

    def fn(h, w, teachers, labels):
        ((th, tw),) = teachers
        return loss(h, w, th, tw, labels)

    return fn


PROVIDERS: dict[str, Callable[[], Loss]] = {
    "fused-cpu": lambda: _fused("cpu"),
    "unfused-cpu": lambda: _unfused("cpu"),
    "fused-triton": lambda: _fused("triton"),
    "fused-triton-acc16": lambda: _fused("triton", head_dtype_accum=True),
    "unfused-triton": lambda: _unfused("triton"),
    "liger": _liger,
    "eager": lambda: _eager,
}


def unavailable_reason(name: str, device: str, k: int) -> str | None:
    if name not in PROVIDERS:
        return f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})"
    if name.endswith("-cpu") and (device != "cpu" or not fastdistill.extension_available()):
        return "the cpu backend needs CPU tensors and the built extension"
    if name == "fused-triton-acc16" and k != 1:
        return "measured at K = 1 only (the accumulator's dtype does not depend on K)"
    if "-triton" in name and device != "cuda":
        return "triton is benchmarked on CUDA only (on the CPU it would run in Triton's interpreter)"
    if name == "liger":
        if k != 1:
            return "LigerFusedLinearJSD takes one teacher"
        if device != "cuda":
            return "Liger-Kernel runs on CUDA"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA not available"
    return None


def make_inputs(N: int, H: int, V: int, K: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Fixed-seed student hidden [N, H] and head [V, H] (both require grad), K teachers' hidden and heads, labels
    [N] with every 8th ignored, drawn on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    h, w = rnd(N, H).requires_grad_(), rnd(V, H, scale=H**-0.5).requires_grad_()
    teachers = [(rnd(N, H), rnd(V, H, scale=H**-0.5)) for _ in range(K)]
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    labels[::8] = -100
    return h, w, teachers, labels


def bench_one(provider: str, N: int, H: int, V: int, K: int, dtype: torch.dtype, device: str, repeats: int) -> dict:
    h, w, teachers, labels = make_inputs(N, H, V, K, dtype, device)
    fn = PROVIDERS[provider]()

    def run():
        fn(h, w, teachers, labels).backward()
        h.grad = w.grad = None

    run()  # warm-up
    ms = _median_ms(run, repeats, device)
    flops = (3 + K) * 2 * N * H * V
    return {"provider": provider, "N": N, "H": H, "V": V, "K": K, "dtype": str(dtype).removeprefix("torch."),
            "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "peak_bytes": peak_extra_bytes(run, device),
            "logits_bytes": N * V * h.element_size(),
            "addmm_float32_c": gemm.addmm_takes_float32_c()}  # fmt: skip


def cell(provider: str, K: int, N: int, H: int, V: int, dtype: str, device: str, repeats: int) -> dict:
    """One row, measured in a child process (``benchmarks/isolate.py`` calls this)."""
    return bench_one(provider, N, H, V, K, getattr(torch, dtype), device, repeats)


def markdown_table(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    base = {r["K"]: r for r in ok if r["provider"].startswith("unfused")}
    lines = ["| provider | K | ms (median) | vs unfused | TFLOP/s (matmuls) | peak memory | vs one [N, V] logits |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['provider']} | {r['K']} | {isolate.describe(r)} | | | | |")
            continue
        ref = base.get(r["K"])
        rel = f"{ref['ms'] / r['ms']:.2f}x" if ref else "-"
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MiB"
        of_logits = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / r['logits_bytes']:.2f}"
        lines.append(f"| {r['provider']} | {r['K']} | {r['ms']:.2f} | {rel} | {r['tflops']:.1f} | {peak} | "
                     f"{of_logits} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_fused_linear", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rows", type=isolate.positive_int, default=1024, help="N (tokens)")
    p.add_argument("--hidden", type=int, default=256, help="H")
    p.add_argument("--vocab", type=int, default=32000, help="V")
    p.add_argument("--teachers", type=lambda s: [int(x) for x in s.split(",") if x], default="1,2")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--repeats", type=isolate.positive_int, default=3)
    p.add_argument("--providers", default=None, help=f"comma-separated, of: {','.join(PROVIDERS)} "
                   "(default: the device's fused and unfused backends, liger, eager)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/fused-linear-<device>-<date>.json; none for --quick)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (N=64, H=32, V=512, 1 repeat): smoke test")
    isolate.add_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        isolate.apply_quick(p, args, rows=64, hidden=32, vocab=512, repeats=1)
    if args.providers is None:
        backend = "cpu" if args.device == "cpu" else "triton"
        args.providers = f"fused-{backend},unfused-{backend},liger,eager"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = isolate.Budget(args.budget_s, args.deadline)
    device, dtype, today, out, load = start(args, "fused-linear-")
    env = environment(device)
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"device: {env['device']}; {versions_line(env)}; threads {torch.get_num_threads()}; N={args.rows}, "
          f"H={args.hidden}, V={args.vocab}, dtype={args.dtype}", flush=True)  # fmt: skip
    providers = [p for p in args.providers.split(",") if p]
    shape = {"N": args.rows, "H": args.hidden, "V": args.vocab}
    # provider-major (all shapes of a provider first), as the other scripts: a budget cuts the last providers
    cells = [isolate.Cell({"provider": prov, "K": k, **shape},
                          {"dtype": args.dtype, "device": device, "repeats": args.repeats},
                          unavailable_reason(prov, device, k))
             for prov in providers for k in args.teachers]  # fmt: skip

    def result(rows: list[dict], complete: bool) -> dict:
        return {**env, "threads": torch.get_num_threads(), "loadavg_1min_at_start": load,
                "loss": "forward KL at T = 1 from hidden states and heads (teachers frozen); mean over labelled rows; "
                        "forward + backward to the student's hidden states and head weight",
                "peak_bytes_note": MEMORY_NOTE[device], **run_info(args), "complete": complete,
                "counts": isolate.counts(rows), "rows": rows}  # fmt: skip

    def on_row(r: dict, rows: list[dict]) -> None:
        report(r, f"{r['provider']:>14} K={r['K']}")
        save(out, result(rows, False), quiet=True)

    rows = isolate.run_script(cells, "benchmarks.run_fused_linear", budget, on_row, args)
    if rows is None:
        return 130
    print(markdown_table(rows))
    save(out, result(rows, True))
    return 1 if isolate.counts(rows)["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
