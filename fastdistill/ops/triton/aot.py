"""Ahead-of-time compilation of every Triton kernel configuration the launchers can choose, for a GPU that is not
here: Triton's whole CUDA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ``ptxas`` its wheel ships) for
``GPUTarget("cuda", 90, 32)`` and sm_80, then the cubin's resources read with the wheel's ``cuobjdump``.

    python -m fastdistill.ops.triton.aot                     # compile everything for sm_90 and sm_80, check, summary
    python -m fastdistill.ops.triton.aot --cover pairs       # a subset holding every pair of switch values (tests)
    python -m fastdistill.ops.triton.aot --report bench      # registers / spills / smem / occupancy, benchmark shapes
    python -m fastdistill.ops.triton.aot --inductor          # Inductor's re-emitted source of every kernel compiles

What is checked, per configuration (exit status 1 on any failure):
  - it compiles to a cubin (the interpreter accepts things the compiler rejects: globals, constexpr rules, types);
  - 64-bit offsets: its TTIR has no 32-bit integer multiplication of two run-time values (a row or teacher index
    times a stride or a size is how an offset wraps past 2**31; see ``i32_products``);
  - the launchers reach exactly the declared constexpr domains (``*_DOMAINS`` next to each kernel), so a switch
    added to a kernel without being enumerated here fails.
The configurations come from each launcher itself (``kd_launch``, ``codistill_launch``, ``mi_launches``) called on
meta tensors over its problem space (``*_space``), so what is compiled is what runs. Must run without
``TRITON_INTERPRET=1`` (the interpreter's kernels are not compilable objects): this module unsets it before the
kernels are imported, so run it as its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

os.environ["TRITON_INTERPRET"] = "0"  # before triton and the kernels are imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from .asm_checks import i32_products, loop_profile, loop_spills, narrowing_not_to_nearest  # noqa: E402
from .launch import TRITON_TYPES, Launch  # noqa: E402

ARCHS = (90, 80)
SPILL_SLACK = 32  # bytes of spill --report bench tolerates per configuration, none of it inside a loop
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# sm_90 / sm_80 per-SM limits (CUDA occupancy rules): registers, warps, blocks, shared memory per SM and per block
SM_LIMITS = {90: dict(regs=65536, warps=64, blocks=32, smem=228 * 1024, smem_block=227 * 1024),
             80: dict(regs=65536, warps=64, blocks=32, smem=164 * 1024, smem_block=163 * 1024)}  # fmt: skip


@dataclass(frozen=True)
class Config:
    """One compiled variant: the kernel object, its full signature (pointers' element types, constexprs), the
    alignment attributes Triton's launcher would specialise on, and the launch options."""

    family: str
    kernel_name: str
    aligned_kernel: bool
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[int, ...]  # parameter indices with tt.divisibility 16
    options: tuple[tuple[str, int], ...]

    def label(self) -> str:
        cx = " ".join(f"{k}={_show(v)}" for k, v in self.constexprs)
        ptrs = ",".join(sorted({t for _, t in self.signature if t.startswith("*") and t != "*i64"}))
        opts = " ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kernel_name} [{ptrs}] {cx} {opts}"


def _show(v) -> str:
    return v.name if hasattr(v, "name") and not isinstance(v, (bool, int, str)) else str(v)


def config_of(family: str, launch: Launch) -> Config:
    """The compile this launch triggers on a GPU (what Triton's JIT would specialise, given the launcher's
    guarantees: see launch.py)."""
    kernel = launch.kernel
    params = kernel.params
    runtime = [p for p in params if not p.is_constexpr]
    assert len(runtime) == len(launch.args), (kernel.__name__, len(runtime), len(launch.args))
    sig, divisible = [], []
    for p, arg in zip(runtime, launch.args):
        assert isinstance(arg, torch.Tensor), f"{kernel.__name__}: argument {p.name} is not a tensor"
        sig.append((p.name, "*" + TRITON_TYPES[arg.dtype]))
        if not p.do_not_specialize_on_alignment:  # the launcher checked it is 16-byte aligned (launch.is_aligned)
            divisible.append(p.num)
    constexprs = []
    for p in params:
        if p.is_constexpr:
            sig.append((p.name, "constexpr"))
            constexprs.append((p.name, launch.constexprs[p.name]))
    name = kernel.fn.__name__
    aligned = not all(p.do_not_specialize_on_alignment for p in runtime)
    return Config(family, name, aligned, tuple(sig), tuple(constexprs), tuple(divisible),
                  tuple(sorted(launch.options.items())))  # fmt: skip


def spaces() -> dict[str, tuple[Iterator[Launch], dict, object]]:
    """family -> (its launches over the problem space, its constexpr domains, its kernel objects)."""
    from . import codistill_loss, kd_loss, mi_alpha, scale

    return {
        "kd_loss": (kd_loss.kd_space(), kd_loss.KD_DOMAINS, kd_loss.KERNELS),
        "codistill_loss": (codistill_loss.codistill_space(), codistill_loss.CODISTILL_DOMAINS,
                           codistill_loss.KERNELS),
        "mi_alpha": (mi_alpha.mi_space(), mi_alpha.MI_DOMAINS, mi_alpha.KERNELS),
        "scale": (scale.scale_space(), scale.SCALE_DOMAINS, scale.KERNELS),
    }  # fmt: skip


def _kernel_object(cfg: Config):
    """The kernel object (of its aligned / unaligned pair) a configuration was collected from."""
    pairs = {pair.aligned.fn.__name__: pair for _, _, family_pairs in spaces().values() for pair in family_pairs}
    return pairs[cfg.kernel_name].pick(cfg.aligned_kernel)


def collect(families: list[str] | None = None) -> tuple[list[Config], list[str]]:
    """Every distinct configuration of the chosen families, and the domain violations (empty when the launchers
    reach exactly the declared domains and the domains name exactly the kernels' constexprs)."""
    configs: dict[Config, None] = {}
    problems = []
    for family, (launches, domains, pairs) in spaces().items():
        if families and family not in families:
            continue
        seen: dict[str, set] = {}
        for launch in launches:
            cfg = config_of(family, launch)
            configs[cfg] = None
            for k, v in cfg.constexprs:
                seen.setdefault(k, set()).add(_show(v))
        names = {p.name for pair in pairs for p in pair.aligned.params if p.is_constexpr}
        if names != set(domains):
            problems.append(f"{family}: constexprs {sorted(names)} but domains for {sorted(domains)}")
        for k, dom in domains.items():
            want = {_show(v) for v in dom}
            if seen.get(k, set()) != want:
                problems.append(f"{family}: {k} reaches {sorted(seen.get(k, set()))}, declared {sorted(want)}")
    return list(configs), problems


def resources(cubin: bytes, sass: bool = False) -> dict[str, int]:
    """Registers per thread, stack and local memory per thread, shared memory per block, from cuobjdump. Register
    spills go to the stack frame (Triton inlines every function, so a non-zero STACK is spills); ``sass`` also
    counts the spill stores and loads (STL / LDL) in the SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        vals = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
        vals["spill"] = vals.get("stack", 0) + vals.get("local", 0)
        if sass:
            dump = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-sass", f.name], capture_output=True,
                                  text=True, check=True).stdout  # fmt: skip
            vals["stl"] = len(re.findall(r"\bSTL\b", dump))
            vals["ldl"] = len(re.findall(r"\bLDL\b", dump))
            vals["loops"] = loop_profile(dump)
    return vals


def occupancy(regs: int, smem: int, num_warps: int, arch: int = 90) -> tuple[int, float]:
    """(programs per SM, fraction of the SM's warp slots in use) that the registers and shared memory allow."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = lim["regs"] // (regs_per_warp * num_warps)
    by_smem = lim["smem"] // (smem + 1024) if smem else lim["blocks"]  # 1 KiB reserved per block
    blocks = min(by_regs, by_smem, lim["warps"] // num_warps, lim["blocks"])
    return blocks, blocks * num_warps / lim["warps"]


def compile_config(cfg: Config, arch: int, sass: bool = False) -> dict:
    """Compile one configuration for sm_<arch>; the result row (never raises)."""
    row = {"family": cfg.family, "config": cfg.label(), "arch": arch}
    t0 = time.perf_counter()
    try:
        kernel = _kernel_object(cfg)
        src = ASTSource(kernel, dict(cfg.signature), dict(cfg.constexprs),
                        attrs={(i,): [["tt.divisibility", 16]] for i in cfg.divisible})  # fmt: skip
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(cfg.options))
        row.update(ok=True, **resources(compiled.asm["cubin"], sass))
        row["i32_products"] = i32_products(compiled.asm["ttir"])
        row["rounding"] = narrowing_not_to_nearest(compiled.asm["ptx"])
        row["shared"] = max(row.get("shared", 0), compiled.metadata.shared)
        warps = dict(cfg.options).get("num_warps", 4)
        row["programs_per_sm"], row["occupancy"] = occupancy(row["reg"], row["shared"], warps, arch)
    except Exception as e:  # a failed compile is a result, reported with the others
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _work(item: tuple) -> dict:
    return compile_config(*item)


def inductor_check(kernel, signature: dict, constexprs: dict, options: dict) -> None:
    """Re-emit ``kernel`` the way Inductor does for a user-defined Triton kernel under torch.compile (its common
    imports, ``@triton.jit``, then the transitive closure of the kernel's source and the globals it reads), import
    the result as a module and compile the imported kernel for sm_90. Raises what Inductor's generated code would
    raise: a NameError for a global it cannot re-emit (the H200 run: ``NEG_INF = tl.constexpr(-inf)``)."""
    import importlib.util

    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    header = TritonKernel.gen_common_triton_imports()
    src = (header.getvalue() if hasattr(header, "getvalue") else str(header)) + "\n@triton.jit\n"
    src += user_defined_triton_kernel_transitive_closure_source_code(kernel)
    name = f"inductor_{kernel.fn.__name__}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name + ".py")
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        emitted = getattr(mod, kernel.fn.__name__)
        triton.compile(ASTSource(emitted, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)


def inductor_sources() -> list[dict]:
    """``inductor_check`` on every kernel of the three families, at its first configuration; one row per kernel."""
    configs, _ = collect()
    first: dict[str, Config] = {}
    for cfg in configs:
        first.setdefault(cfg.kernel_name, cfg)
    rows = []
    for name, cfg in first.items():
        try:
            inductor_check(_kernel_object(cfg), dict(cfg.signature), dict(cfg.constexprs), dict(cfg.options))
            rows.append({"kernel": name, "ok": True})
        except Exception as e:
            rows.append({"kernel": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"})
    return rows


def bench_configs() -> list[tuple[str, Config]]:
    """The configurations the launchers pick at the GPU benchmark shapes (make bench-gpu, bf16)."""
    from . import codistill_loss, kd_loss, mi_alpha

    meta = dict(device="meta", dtype=torch.bfloat16)
    out = []
    for v in (32768, 128256):
        for k in (1, 4):
            s, t = torch.empty(8192, v, **meta), torch.empty(k, 8192, v, **meta)
            for div in ("kl", "jsd"):  # the closed-form gradient; one behind the second barrier
                call = kd_loss.kl_call(s, t, denominator=torch.empty((), device="meta"), reduce=True, divergence=div,
                                       div_params=[0.5] if div == "jsd" else [])  # fmt: skip
                out.append((f"kd_loss {div} V={v} K={k}", config_of("kd_loss", kd_loss.kd_launch(call)[0][0])))
        a = torch.empty(8192, v, **meta)
        den = torch.empty((), device="meta")
        launch = codistill_loss.codistill_launch(codistill_loss.kl_call(a, a, denominator=den, reduce=True))[0]
        out.append((f"codistill kl V={v}", config_of("codistill_loss", launch)))
    for n, d in ((16384, 768), (65536, 768), (16384, 128)):
        u = torch.empty(n, d, **meta)
        for what, launch in mi_alpha.mi_launches(u, u, torch.empty(n, device="meta")):
            out.append((f"mi_alpha {what} N={n} D={d}", config_of("mi_alpha", launch)))
    return out


def _switches(cfg: Config) -> list[tuple[str, ...]]:
    """A configuration's switch values, as (family, switch, value): what --cover must see at least once."""
    ptrs = ",".join(sorted({t for _, t in cfg.signature if t.startswith("*") and t != "*i64"}))
    named = [("kernel", cfg.kernel_name), ("aligned", cfg.aligned_kernel), ("pointers", ptrs),
             *((k, _show(v)) for k, v in cfg.constexprs), *cfg.options]  # fmt: skip
    return [(cfg.family, k, str(v)) for k, v in named]


def covering(configs: list[Config], pairs: bool) -> list[Config]:
    """A small subset of ``configs`` in which every switch value of each family occurs, and with ``pairs`` every two
    values that occur together in some configuration (a greedy set cover: 1530 configurations -> ~80 with pairs,
    ~25 without). Deterministic: ties go to the first in label order."""
    configs = sorted(configs, key=lambda c: (c.family, c.label()))
    features = []
    for cfg in configs:
        sw = _switches(cfg)
        features.append(set(sw) | ({(a, b) for i, a in enumerate(sw) for b in sw[i + 1:]} if pairs else set()))
    todo = set().union(*features) if features else set()
    chosen: list[int] = []
    while todo:
        best = max(range(len(configs)), key=lambda i: (len(features[i] & todo), -i))
        chosen.append(best)
        todo -= features[best]
    return [configs[i] for i in sorted(chosen)]


def report(rows: list[tuple[str, dict]]) -> str:
    lines = ["| shape | kernel configuration | arch | registers | spill bytes (stack) | STL / LDL (in loops) "
             "| shared bytes | programs / SM | warp occupancy | loop bodies: instructions (MUFU) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for what, r in rows:
        if not r["ok"]:
            lines.append(f"| {what} | {r['config']} | sm_{r['arch']} | FAILED: {r['error'][:80]} |||||||")
            continue
        loops = ", ".join(f"{lp['instructions']} ({lp['MUFU']})" for lp in r.get("loops", []) if lp["instructions"] > 1)
        lines.append(f"| {what} | `{r['config']}` | sm_{r['arch']} | {r['reg']} | {r['spill']} | "
                     f"{r.get('stl', '')} / {r.get('ldl', '')} ({loop_spills(r)}) | {r['shared']} | "
                     f"{r['programs_per_sm']} | {r['occupancy']:.0%} | {loops} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--family", nargs="+", default=None, help="kd_loss, codistill_loss, mi_alpha, scale (default: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cover", choices=["values", "pairs"],
                    help="compile a subset in which every value (or every pair of values) of a family's switches "
                         "occurs: kernel, alignment, pointer types, constexprs, options (the tests' pass: the whole "
                         "space, ~1500 configurations, takes ~35 minutes uncached on 2 cores)")
    ap.add_argument("--report", choices=["bench"], help="resource table of the benchmark shapes' configurations")
    ap.add_argument("--inductor", action="store_true", help="check Inductor's re-emitted kernel sources")
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args(argv)

    if args.inductor:
        rows = inductor_sources()
        for r in rows:
            print(("ok    " if r["ok"] else "FAILED ") + r["kernel"] + ("" if r["ok"] else f": {r['error']}"))
        return 0 if all(r["ok"] for r in rows) else 1

    if args.report:
        items = [(what, cfg, arch) for what, cfg in bench_configs() for arch in args.arch]
        with ProcessPoolExecutor(max_workers=args.jobs) as ex:
            results = list(ex.map(_work, [(cfg, arch, True) for _, cfg, arch in items]))
        print(report([(what, r) for (what, _, _), r in zip(items, results)]))
        # a spill of up to SPILL_SLACK bytes outside every loop is reported, not failed (a few STL / LDL per
        # program): the register cap (kd_loss.MAXNREG) trades it for a program more per SM (JSD K = 4: 24 bytes,
        # values parked across the sweeps); a spill inside an innermost loop (each sweep's tile loop), paid per
        # tile, fails
        bad = [r for r in results if not r["ok"] or r["spill"] > SPILL_SLACK or loop_spills(r)]
        return 1 if bad else 0

    t0 = time.perf_counter()
    configs, problems = collect(args.family)
    if args.cover:
        configs = covering(configs, pairs=args.cover == "pairs")
    for p in problems:
        print(f"DOMAIN  {p}")
    work = [(cfg, arch) for cfg in configs for arch in args.arch]
    print(f"compiling {len(configs)} configurations x {len(args.arch)} architectures with {args.jobs} processes",
          flush=True)  # fmt: skip
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        for r in ex.map(_work, work, chunksize=4):
            rows.append(r)
            if len(rows) % 50 == 0:
                print(f"  {len(rows)}/{len(work)} in {time.perf_counter() - t0:.0f} s", flush=True)
    failed = [r for r in rows if not r["ok"]]
    wide = [r for r in rows if r["ok"] and r["i32_products"]]
    rounding = [r for r in rows if r["ok"] and r["rounding"]]
    spills = [r for r in rows if r["ok"] and r["spill"] > 0]
    for r in failed:
        print(f"FAILED  sm_{r['arch']} {r['config']}\n        {r['error']}")
    for r in wide:
        print(f"INT32   sm_{r['arch']} {r['config']}\n        " + "\n        ".join(r["i32_products"]))
    for r in rounding:
        print(f"ROUNDING sm_{r['arch']} {r['config']}: {', '.join(r['rounding'])} (not round-to-nearest)")
    by_family: dict[str, list[dict]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    for fam, rs in by_family.items():
        ok = [r for r in rs if r["ok"]]
        regs = [r["reg"] for r in ok]
        print(f"{fam:16s} {len(ok)}/{len(rs)} compiled; registers {min(regs, default=0)}-{max(regs, default=0)}; "
              f"{sum(r['spill'] > 0 for r in ok)} spill")  # fmt: skip
    print(f"spills anywhere: {len(spills)} configurations (reported, allowed outside the benchmark shapes)")
    print(f"{len(rows) - len(failed)}/{len(rows)} compiled in {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed or wide or rounding or problems else 0


if __name__ == "__main__":
    sys.exit(main())
