"""The CUDA backend builds on a machine without a GPU (issue 20): every .cu under csrc/cuda compiles with the local
nvcc for sm_80 and sm_90a without a warning, every kernel the launcher dispatches to exists in both, their resources
stay where the launch configuration assumes, and the torch binding type-checks against the installed torch's headers.
What the kernels compute is tested on a GPU (tests/test_cuda_kd_gpu.py)."""

import os
import subprocess
import sysconfig

import pytest
import torch

from fastdistill.ops import cuda_build

pytestmark = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not found")

# (student, teacher, accumulation) pairs the launcher dispatches to: kd_loss_launch.cu and inst/
SAME = ["f32", "bf16", "f16"]
MIXED = [(s, t) for s in SAME for t in SAME if s != t]
EXPECTED = {f"kd_row_kernel<{s}, {s}, f32, {r}>" for s in SAME for r in ("Global", "Smem", "Cluster")}
EXPECTED |= {f"kd_row_kernel<{s}, {s}, f32, {r}, Pipelined>" for s in SAME for r in ("Smem", "Cluster")}
EXPECTED |= {f"kd_row_kernel<{s}, {t}, f32, Global>" for s, t in MIXED}
EXPECTED |= {f"kd_row_kernel<f64, f64, f64, {r}>" for r in ("Global", "Smem")}


@pytest.fixture(scope="module")
def kernels():
    if cuda_build.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found")
    return cuda_build.build_all(jobs=2)


@pytest.mark.parametrize("arch", cuda_build.ARCHS)
def test_every_dispatched_kernel_is_built(kernels, arch):
    names = {cuda_build.short_name(k.kernel) for k in kernels if k.arch == arch}
    assert names == EXPECTED, (sorted(names - EXPECTED), sorted(EXPECTED - names))


@pytest.mark.parametrize("arch", cuda_build.ARCHS)
def test_resources_allow_the_launch(kernels, arch):
    """No local memory; registers that leave the launcher's default of 512 threads a block to the bf16/fp16 v1
    kernels (the benchmarked ones; it clamps to what a kernel allows, but a register blow-up would halve the block)
    and >= 384 to the float32 and mixed ones and to every pipelined kernel (capped at 168 by its launch bounds: no
    more stack than v1 means that the cap did not make it spill); float64 (a correctness path) within the register file;
    static shared memory no more than the 1 KiB the driver reserves (the row and the per-row header are dynamic)."""
    for k in (k for k in kernels if k.arch == arch):
        name = cuda_build.short_name(k.kernel)
        assert k.local == 0, f"{name} on {arch} uses {k.local} B of local memory"
        assert k.shared <= 1024, f"{name} on {arch}: {k.shared} B of static shared memory"
        if "f64" in name:
            assert k.stack <= 128, f"{name} on {arch}: {k.stack} B of stack"
            continue
        assert k.stack <= 64, f"{name} on {arch}: {k.stack} B of stack"
        half = name.startswith(("kd_row_kernel<bf16, bf16", "kd_row_kernel<f16, f16"))
        limit = 128 if half and "Pipelined" not in name else 168
        assert k.registers <= limit, f"{name} on {arch}: {k.registers} registers (limit {limit})"


def test_binding_type_checks_against_torch_headers(tmp_path):
    """csrc/cuda/kd_loss_binding.cpp with g++ -fsyntax-only against this torch's headers and CUDA's (a CPU torch
    ships c10/cuda but not its generated cuda_cmake_macros.h, stubbed here)."""
    cuda_include = cuda_build.cuda_include()
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 12) else "-std=c++17"
    api = os.path.join(torch_include, "torch", "csrc", "api", "include")
    includes = [cuda_build.CSRC, torch_include, api, tmp_path, cuda_include, sysconfig.get_paths()["include"]]
    cmd = ["g++", std, "-fsyntax-only", "-Wall", "-Werror", *(f"-I{d}" for d in includes),
           str(cuda_build.CSRC / "cuda" / "kd_loss_binding.cpp")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


PLAN_PROBE = r"""
#include <cstdio>
#include "cuda/kd_loss_plan.h"
using namespace fastdistill::cuda;
int main() {
  const detail::DeviceInfo devices[2] = {{9, 132, 232448}, {8, 108, 166912}};  // H100/H200, A100
  const long long vocabs[3] = {32768, 128256, 1000};
  const int teachers[3] = {1, 4, 8};
  const Pipeline modes[3] = {Pipeline::Auto, Pipeline::Off, Pipeline::On};
  for (int d = 0; d < 2; ++d)
    for (long long v : vocabs)
      for (int k : teachers)
        for (int f64 = 0; f64 < 2; ++f64)
          for (int m = 0; m < 3; ++m) {
            KDCudaArgs a;
            a.problem.vocab = v;
            a.problem.teachers = k;
            a.student_dtype = a.teacher_dtype = f64 ? DType::Float64 : DType::BFloat16;
            a.pipeline = modes[m];
            const KDCudaConfig c = detail::plan_for(a, devices[d]);
            std::printf("%d %lld %d %d %d %d %d %d %lld\n", devices[d].major, v, k, f64, m, int(c.residency),
                        c.cluster, int(c.pipelined), static_cast<long long>(c.smem_bytes));
          }
  return 0;
}
"""


def test_plan_at_the_benchmark_shapes(tmp_path):
    """The launch plan (csrc/cuda/kd_loss_plan.h, host code) at the shapes benchmarks/NOTES.md predicts for: the
    residency, cluster size and pipelining it says, never more shared memory than the device allows, float64 or sm_80
    never on a cluster, float64 never pipelined, and v1 (pipeline off) as it was before pipelining existed."""
    cuda_include = cuda_build.cuda_include()
    src = tmp_path / "plan.cpp"
    src.write_text(PLAN_PROBE)
    exe = tmp_path / "plan"
    out = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", f"-I{cuda_build.CSRC}", f"-I{cuda_include}",
                          str(src), "-o", str(exe)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    plans = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n"):
        if line:
            major, v, k, f64, mode, res, cluster, pipelined, smem = map(int, line.split())
            key = (major, v, k, bool(f64), ["auto", "off", "on"][mode])
            plans[key] = (["auto", "global", "smem", "cluster"][res], cluster, bool(pipelined), smem)
    limits = {9: 232448, 8: 166912}
    for (major, v, k, f64, mode), (res, cluster, pipelined, smem) in plans.items():
        assert smem <= limits[major], (major, v, k, f64, mode, smem)
        if major < 9 or f64:
            assert res != "cluster", (major, v, k, f64, mode)
        if f64 or mode == "off":
            assert not pipelined, (major, v, k, f64, mode)
        if pipelined:  # two row buffers
            assert res in ("smem", "cluster") and mode != "off"
    # NOTES.md's prediction tables (bf16, H200): v1 (issue 20's first table), then what auto picks now
    v1 = {key[:4]: plan[:3] for key, plan in plans.items() if key[4] == "off"}
    assert v1[(9, 32768, 1, False)] == ("cluster", 2, False)
    assert v1[(9, 32768, 4, False)] == ("cluster", 4, False)
    assert v1[(9, 128256, 1, False)] == ("cluster", 8, False)
    assert v1[(9, 128256, 4, False)] == ("cluster", 8, False)
    assert v1[(9, 1000, 1, False)] == ("smem", 1, False)
    auto = {key[:4]: plan[:3] for key, plan in plans.items() if key[4] == "auto"}
    assert auto[(9, 32768, 1, False)] == ("cluster", 2, True)
    assert auto[(9, 32768, 4, False)] == ("cluster", 4, True)
    assert auto[(9, 128256, 1, False)] == ("cluster", 8, True)
    assert auto[(9, 128256, 4, False)] == ("cluster", 8, False)  # two slices need 16 blocks: v1 unless asked
    assert plans[(9, 128256, 4, False, "on")][:3] == ("cluster", 16, True)
    assert auto[(9, 1000, 1, False)] == ("smem", 1, False)  # a row one block holds: v1 unless asked
    assert plans[(9, 1000, 1, False, "on")][:3] == ("smem", 1, True)
    # sm_80 (no clusters): the row in one block while it fits, v1 unless asked; else global memory
    assert auto[(8, 32768, 1, False)] == ("smem", 1, False)
    assert auto[(8, 128256, 4, False)][0] == "global"
