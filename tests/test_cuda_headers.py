"""The shared per-element math header compiles as CUDA device code with nvcc alone (no torch), for the
architectures CI checks. The CUDA kernel (csrc/cuda) will instantiate the same templates with ScalarOps."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)

PROBE = r"""
#include "common/kd_math.h"
#include "common/kd_params.h"
#include "common/mi_math.h"
using namespace fastdistill;
__global__ void probe(DivParams<float> prm, const float* p, const float* q, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  auto t = divergence_terms<ScalarOps<float>>(prm, p[i], q[i], logf(p[i]), logf(q[i]));
  out[i] = t.phi + t.gq + t.hp;
}
__global__ void probe_mi(const float* s, const float* l, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  auto c = mi::row_consts<float>(l[i], 1.0f, logf(n - 1.0f), logf(0.01f), log1pf(-0.01f));
  float u = expf(s[i] - l[i]);
  mi::Pass2<float> p2{1.0f, 2.0f, 0.5f};
  auto r = mi::row_result<float>(c, l[i], l[i] - 1.0f, l[i] - 2.0f, s[i], i == 0, p2, float(n), 1.0f / n,
                                 1.0f / (n * (n - 1.0f)));
  out[i] = mi::grad_offdiag<float>(c.alpha_, c.beta_, u, 0.5f, r.Crest, r.Phi, 0.1f) +
           mi::grad_star<float>(u, 1.0f, r.m) + mi::g_of<float>(c.alpha_, c.beta_, u, 2.0f) + r.part + r.gdiag + r.da;
}
int main() { return 0; }
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_math_headers_compile_for_cuda(tmp_path, arch):
    src = tmp_path / "probe.cu"
    src.write_text(PROBE)
    cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "probe.o"),
           "-I", os.path.join(ROOT, "csrc")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
