"""Time fastdistill.kd_loss against eager / compiled PyTorch, forward + backward; print a table, save JSON.

Usage: ``python -m benchmarks.run [--device cpu|cuda] [--quick] ...`` (see ``--help``).

Method, per (V, K, provider): fixed-seed inputs (student [N, V] requires grad, teachers [K, N, V]); one warm-up
step (``torch.compile`` compiles here); ``--repeats`` timed steps (loss.backward(), student.grad = None), median.
Floor: the bytes that must move, (K+1)*N*V*sizeof(in) + N*V*sizeof(grad), at the copy bandwidth measured in the
same run (1 GiB float32 ``copy_``, bytes = read + write, median of 5); floor_fraction = floor_ms / ms.
``ms`` synchronises before and after each step, so the host's work before the first kernel adds in series (the
issues' gates use it); ``pipelined_ms`` is the time per step of ``--repeats`` steps issued back to back with one
synchronisation at the end, as in a training loop whose GPU is busy: the host's work overlaps the GPU's, and
``ms - pipelined_ms`` is about the host's exposed share. A sweep provider (``SWEEPS``) times each setting of a
launch override in one child process; its row's ``ms`` is the best setting's, all of them under ``sweep``.
Peak memory: see ``MEMORY_NOTE``. Each (provider, V, K) runs in its own child process (``benchmarks/isolate.py``):
a crash or a CUDA error becomes a failed row and the other providers still run; ``--budget-s`` / ``--deadline``
bound the run (cells not started in time are recorded as skipped) and the JSON is saved after every row.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import isolate
from .providers import DIVERGENCE_PROVIDERS, PROVIDERS, SWEEPS, fwd_bwd, make_inputs, unavailable_reason

TEMPERATURE = 2.0
MEMORY_NOTE = {
    "cpu": (
        "peak_bytes = peak RSS during one extra fwd+bwd step minus the RSS before it (the inputs are resident): "
        "the peak is reset with /proc/self/clear_refs ('5') and read from VmHWM. Includes the student gradient "
        "(N*V*sizeof). Large buffers are mmapped by glibc and returned on free, so they count; small blocks "
        "(< glibc's mmap threshold, <= 32 MiB) reused from the heap may not. null when /proc cannot be used."
    ),
    "cuda": (
        "peak_bytes = torch.cuda.max_memory_allocated during one extra fwd+bwd step minus memory_allocated before "
        "it (the inputs). Includes the student gradient (N*V*sizeof)."
    ),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(step: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _pipelined_ms(step: Callable[[], object], repeats: int, device: str) -> float:
    """Time per step of ``repeats`` steps issued back to back, one synchronisation at the end (see the docstring)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / repeats


def copy_bandwidth_GBps(device: str, repeats: int = 5, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in GB/s (1e9): ``dst.copy_(src)`` of ``nbytes`` float32, counting read + write."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: fault in the pages
    ms = _median_ms(lambda: dst.copy_(src), repeats, device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _rss_stats() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


def peak_extra_bytes(step: Callable[[], None], device: str) -> int | None:
    """Peak memory of one ``step`` above what was allocated before it (see ``MEMORY_NOTE``); None if unmeasurable."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _rss_stats()["VmRSS"]
        step()
        return max(0, _rss_stats()["VmHWM"] - before)
    except OSError:
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def dist_version(*names: str) -> str | None:
    """The installed version of the first distribution of ``names`` found (no import), or None."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def environment(device: str) -> dict:
    """What ran: device, date and the versions that matter for these numbers (for every result JSON)."""
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": dist_version("triton", "pytorch-triton"),
        "liger_kernel": dist_version("liger-kernel"),
    }


def versions_line(env: dict) -> str:
    liger = env["liger_kernel"] or "not installed"
    return f"torch {env['torch']} (CUDA {env['cuda']}); triton {env['triton']}; liger-kernel {liger}; " \
           f"Python {env['python']}"  # fmt: skip


def bench_one(provider: str, N: int, V: int, K: int, dtype: torch.dtype, device: str, repeats: int,
              divergence: str = "kl") -> dict:  # fmt: skip
    student, teachers = make_inputs(N, V, K, dtype, device)
    kw = {"divergence": divergence} if divergence != "kl" else {}

    def step_of(setting: str | None) -> Callable[[], None]:
        make = PROVIDERS[provider] if setting is None else SWEEPS[provider].make(setting)
        fn = make(K, TEMPERATURE, **kw)
        return lambda: fwd_bwd(fn, student, teachers)

    sweep = []
    for setting in SWEEPS[provider].settings if provider in SWEEPS else (None,):
        step = step_of(setting)
        step()  # warm-up (compiles for "compile")
        sweep.append({"setting": setting, "ms": _median_ms(step, repeats, device),
                      "pipelined_ms": _pipelined_ms(step, repeats, device)})  # fmt: skip
    best = min(range(len(sweep)), key=lambda i: sweep[i]["ms"])
    # the peak of the best setting (the last one made is still current: remaking it would recompile "compile")
    peak = peak_extra_bytes(step if best == len(sweep) - 1 else step_of(sweep[best]["setting"]), device)
    size = student.element_size()
    nbytes = (K + 1) * N * V * size + N * V * size  # inputs read + gradient written (grad dtype = student dtype)
    return {
        "provider": provider,
        "V": V,
        "K": K,
        "N": N,
        "divergence": divergence,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": sweep[best]["ms"],
        "pipelined_ms": sweep[best]["pipelined_ms"],
        "peak_bytes": peak,
        "bytes": nbytes,
        "exps": (K + 1) * N * V,
    } | ({"liger_kernel": dist_version("liger-kernel")} if provider == "liger" else {}) \
      | ({"sweep": SWEEPS[provider].what, "setting": sweep[best]["setting"], "settings": sweep}
         if provider in SWEEPS else {})  # fmt: skip


def cell(provider: str, V: int, K: int, N: int, dtype: str, device: str, repeats: int, divergence: str = "kl") -> dict:
    """One row, measured in a child process (``benchmarks/isolate.py`` calls this)."""
    return bench_one(provider, N, V, K, getattr(torch, dtype), device, repeats, divergence)


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def markdown_table(rows: list[dict]) -> str:
    eager = {(r["V"], r["K"]): r["ms"] for r in rows if r["provider"] == "eager" and r.get("status", "ok") == "ok"}
    lines = [
        "| provider | V | K | ms (median) | pipelined ms | speedup vs eager | GB/s | floor ms | floor_fraction "
        "| peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        div = r.get("divergence", "kl")
        name = r["provider"] + (f" ({div})" if div != "kl" else "") + (f" [{r['setting']}]" if "sweep" in r else "")
        if r.get("status", "ok") != "ok":
            lines.append(f"| {name} | {r['V']} | {r['K']} | {isolate.describe(r)} | | | | | | |")
            continue
        base = eager.get((r["V"], r["K"])) if div == "kl" else None
        speedup = f"{base / r['ms']:.2f}x" if base else "-"
        piped = f"{r['pipelined_ms']:.2f}" if r.get("pipelined_ms") is not None else "-"
        lines.append(
            f"| {name} | {r['V']} | {r['K']} | {r['ms']:.2f} | {piped} | {speedup} | {r['achieved_GBps']:.1f} "
            f"| {r['floor_ms']:.2f} | {r['floor_fraction']:.3f} | {_fmt_bytes(r['peak_bytes'])} |"
        )
    return "\n".join(lines)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rows", type=isolate.positive_int, default=2048, help="N")
    p.add_argument("--vocab", type=_ints, default="8192,32000", help="comma-separated V values")
    p.add_argument("--teachers", type=_ints, default="1,4", help="comma-separated K values")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--repeats", type=isolate.positive_int, default=5)
    p.add_argument("--providers", default="cpu,eager,compile",
                   help=f"comma-separated, of: {','.join(PROVIDERS)}; run in this order (all shapes of the first "
                        "provider first), so that a budget cuts the last ones")  # fmt: skip
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/<device>-<date>.json; --quick writes none by default)",
    )
    p.add_argument("--divergences", default="kl",
                   help="comma-separated divergences; other than kl only fastdistill's providers "
                        f"({','.join(DIVERGENCE_PROVIDERS)}) run them")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny shapes (N=64, V=1000,4096, K=1,2, 3 repeats): smoke test")
    isolate.add_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        isolate.apply_quick(p, args, rows=64, vocab=[1000, 4096], teachers=[1, 2], repeats=3)
    return args


def start(args: argparse.Namespace, prefix: str = "") -> tuple[str, torch.dtype, str, Path | None, float]:
    """The common start of a benchmark script: (device, dtype, today, JSON path or None, 1-min load average).
    Exits when CUDA is asked for and missing; warns when the machine is busy (timings would be contended). The
    default path is ``benchmarks/results/<prefix><device>-<date>.json``, none for ``--quick``."""
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    today = datetime.date.today().isoformat()
    out = args.out or (None if args.quick else Path("benchmarks/results") / f"{prefix}{device}-{today}.json")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: 1-min load average {load:.2f} before starting; timings may be contended", file=sys.stderr)
    return device, dtype, today, out, load


def run_info(args: argparse.Namespace) -> dict:
    """How the rows were run, for the JSON: isolation, budget, the children's environment defaults."""
    return {
        "isolation": "in-process" if args.in_process else (
            "one child process per row (benchmarks/isolate.py)" if args.child_per_cell else
            "one child process per provider's run of rows, a fresh one after a failure (benchmarks/isolate.py)"),
        "child_env_defaults": {} if args.in_process else isolate.CHILD_ENV_DEFAULTS,
        "budget_s": args.budget_s,
        "deadline_unix": args.deadline,
        "child_timeout_s": args.child_timeout_s,
        "repeats": args.repeats,
    }


def save(out: Path | None, result: dict, quiet: bool = False) -> None:
    """Write ``result`` as JSON to ``out`` (nothing when None), atomically: a run killed while saving keeps the last
    complete file."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        if not quiet:
            print(f"saved {out}")


def report(row: dict, label: str, ms_width: int = 9) -> None:
    """One progress line on stderr per row: its time, or why it failed or was skipped."""
    if row["status"] == "ok":
        print(f"  {label}: {row['ms']:{ms_width}.2f} ms   (child {row.get('wall_s', 0):.1f} s)", file=sys.stderr,
              flush=True)  # fmt: skip
    elif row["status"] == "failed":
        print(f"FAILED {label}: {row['error']}", file=sys.stderr, flush=True)
    else:
        print(f"skip {label}: {row['reason']}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = isolate.Budget(args.budget_s, args.deadline)
    device, dtype, today, out, load = start(args)
    env = environment(device)
    gbps = copy_bandwidth_GBps(device)
    if device == "cuda":
        torch.cuda.empty_cache()  # the children need the memory, not this process
    print(
        f"device: {env['device']}; {versions_line(env)}; threads {torch.get_num_threads()}; "
        f"copy {gbps:.1f} GB/s; N={args.rows}, dtype={args.dtype}, T={TEMPERATURE}",
        flush=True,
    )

    providers = [p for p in args.providers.split(",") if p]
    cells = []
    divs = [d for d in args.divergences.split(",") if d]
    for prov in providers:  # provider-major: a budget that runs out cuts the last providers, not the last shapes
        for V in args.vocab:
            for K in args.teachers:
                for div in divs:
                    reason = unavailable_reason(prov, device)
                    if reason is None and prov == "liger" and K != 1:
                        reason = "Liger's JSD takes one teacher"
                    if reason is None and div != "kl" and prov not in DIVERGENCE_PROVIDERS:
                        reason = f"{prov} is the five-line forward KL only"
                    key = {"provider": prov, "V": V, "K": K, "N": args.rows} | ({"divergence": div} if div != "kl"
                                                                                else {})  # fmt: skip
                    args_ = {"dtype": args.dtype, "device": device, "repeats": args.repeats}
                    cells.append(isolate.Cell(key, args_, reason))

    def result(rows: list[dict], complete: bool) -> dict:
        return {
            **env, "threads": torch.get_num_threads(), "copy_GBps": gbps, "loadavg_1min_at_start": load,
            "temperature": TEMPERATURE,
            "loss": "forward KL (or the row's divergence) to the prob_mean ensemble, T^2-scaled, mean over rows; "
                    "time = forward + backward",
            "peak_bytes_note": MEMORY_NOTE[device], **run_info(args), "complete": complete,
            "counts": isolate.counts(rows), "rows": rows,
        }  # fmt: skip

    def on_row(r: dict, rows: list[dict]) -> None:
        if r["status"] == "ok":
            floor_ms = r["bytes"] / (gbps * 1e9) * 1e3
            r |= {
                "floor_ms": floor_ms,
                "floor_fraction": floor_ms / r["ms"],
                "achieved_GBps": r["bytes"] / (r["ms"] * 1e-3) / 1e9,
            }
        report(r, f"{r['provider']:>9} V={r['V']:<6} K={r['K']}" + (f" {r['divergence']}" if "divergence" in r
                                                                    and r["divergence"] != "kl" else ""))  # fmt: skip
        save(out, result(rows, False), quiet=True)

    rows = isolate.run_script(cells, "benchmarks.run", budget, on_row, args)
    if rows is None:
        return 130
    order = {p: i for i, p in enumerate(providers)}
    print(markdown_table(sorted(rows, key=lambda r: (r["V"], r["K"], order[r["provider"]]))))
    save(out, result(rows, True))
    return 1 if isolate.counts(rows)["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
