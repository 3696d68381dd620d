"""The CUDA kernels compiled without a GPU: every ``.cu`` under csrc/cuda with the local ``nvcc`` for the
architectures the package ships (sm_80, sm_90a), and each kernel's resources read from the objects
(``cuobjdump --dump-resource-usage``: registers, stack, shared and local memory). ``make test`` runs it
(tests/test_cuda_build.py: a compile error fails CI); ``make kernels-report`` prints the table.

    python -m fastdistill.ops.cuda_build [--arch sm_90a] [--jobs 2]

Objects are cached by the hash of the sources, flags and compiler (``$FASTDISTILL_CACHE_DIR`` or
``~/.cache/fastdistill/nvcc``): an unchanged tree compiles nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = ("sm_80", "sm_90a")
# the flags setup.py gives nvcc (one list for both)
NVCC_FLAGS = ["-O3", "-std=c++17", "--threads=2"]
# what torch's BuildExtension adds to them (torch.utils.cpp_extension.COMMON_NVCC_FLAGS): no implicit half/bfloat16
# conversions, so the kernels must convert explicitly; the compile test builds with them too
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def gencode(arch: str) -> str:
    num = arch.removeprefix("sm_")
    return f"-gencode=arch=compute_{num},code={arch}"


def nvcc_flags() -> list[str]:
    """nvcc's flags for the extension build: optimisation, standard and one -gencode per shipped architecture."""
    return NVCC_FLAGS + [gencode(a) for a in ARCHS]


def find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def cuda_include() -> str:
    """CUDA's include directory, next to the nvcc found (else /usr/local/cuda/include)."""
    nvcc = find_nvcc()
    if nvcc:
        inc = Path(os.path.realpath(nvcc)).parent.parent / "include"
        if (inc / "cuda_runtime_api.h").exists():
            return str(inc)
    return "/usr/local/cuda/include"


def find_cuobjdump() -> str | None:
    """CUDA's cuobjdump, or the one the triton wheel ships."""
    cand = shutil.which("cuobjdump")
    if cand:
        return cand
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(p) if p.exists() else None
    except ImportError:
        return None


def sources() -> list[Path]:
    return sorted((CSRC / "cuda").rglob("*.cu"))


@dataclass
class KernelResources:
    arch: str
    source: str
    kernel: str  # demangled where c++filt is available
    registers: int
    stack: int
    shared: int
    local: int


def _key(src: Path, arch: str, nvcc: str) -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.rglob("*")):
        if f.suffix in (".h", ".cuh", ".cu") and "cpu" not in f.parts:
            h.update(str(f.relative_to(CSRC)).encode() + f.read_bytes())
    h.update(f"{src.relative_to(CSRC)}|{arch}|{NVCC_FLAGS}|{TORCH_NVCC_FLAGS}".encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:24]


def _cache_dir() -> Path:
    base = os.environ.get("FASTDISTILL_CACHE_DIR")
    return Path(base) / "nvcc" if base else Path.home() / ".cache" / "fastdistill" / "nvcc"


def compile_one(src: Path, arch: str, nvcc: str | None = None) -> Path:
    """``src`` compiled for ``arch`` to an object (cached). Raises RuntimeError with nvcc's output on failure, or
    when nvcc warns (a warning in kernel code is a defect here)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    out = _cache_dir() / f"{src.stem}-{arch}-{_key(src, arch, nvcc)}.o"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp.o")
    cmd = [nvcc, *NVCC_FLAGS, *TORCH_NVCC_FLAGS, gencode(arch), "-I", str(CSRC), "-c", str(src), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or "warning" in r.stderr.lower():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stderr}")
    tmp.replace(out)
    return out


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resources(obj: Path, arch: str, source: str) -> list[KernelResources]:
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA's, or the triton wheel's)")
    text = subprocess.run([tool, "--dump-resource-usage", str(obj)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    names = [m.group(1) for m in _RES.finditer(text)]
    demangled = names
    if names and shutil.which("c++filt"):
        demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                                   text=True).stdout.split("\n")[: len(names)]  # fmt: skip
    return [KernelResources(arch, source, d, int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5)))
            for m, d in zip(_RES.finditer(text), demangled)]  # fmt: skip


def build_all(archs=ARCHS, jobs: int = 2) -> list[KernelResources]:
    """Compiles every .cu for every arch (``jobs`` at a time) and returns every kernel's resources."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    work = [(src, arch) for arch in archs for src in sources()]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        objs = list(pool.map(lambda sa: compile_one(sa[0], sa[1], nvcc), work))
    out: list[KernelResources] = []
    for (src, arch), obj in zip(work, objs):
        out += resources(obj, arch, str(src.relative_to(CSRC)))
    return out


def short_name(kernel: str) -> str:
    """kd_row_kernel<bf16, bf16, f32, Smem> (v1) or kd_row_kernel<bf16, bf16, f32, Smem, Pipelined> from the
    demangled name."""
    m = re.search(r"kd_row_kernel<(.*)>\(", kernel)
    if not m:
        return kernel[:80]
    args = [a.strip() for a in m.group(1).split(",")]
    names = {"__nv_bfloat16": "bf16", "__half": "f16", "float": "f32", "double": "f64"}
    res = {"1": "Global", "2": "Smem", "3": "Cluster"}
    pipelined = args[-1] == "true"
    if args[-1] in ("true", "false"):
        args.pop()
    args = [names.get(a, a) for a in args]
    if args and "Residency" in args[-1]:
        args[-1] = res.get(args[-1].rsplit(")", 1)[-1], args[-1])
    return f"kd_row_kernel<{', '.join(args + ['Pipelined'] * pipelined)}>"


def report(rows: list[KernelResources]) -> str:
    lines = ["| arch | kernel | registers | stack (B) | static shared (B) | local (B) | threads per block at these "
             "registers |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r.arch, r.kernel)):
        regs = -(-max(1, r.registers) // 8) * 8  # allocated per thread in units of 8
        threads = min(1024, 65536 // regs // 32 * 32)
        lines.append(f"| {r.arch} | {short_name(r.kernel)} | {r.registers} | {r.stack} | {r.shared} | {r.local} | "
                     f"{threads} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", action="append", choices=ARCHS, help="default: all shipped architectures")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    print(report(build_all(tuple(args.arch or ARCHS), args.jobs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
