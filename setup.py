"""Build fastdistill._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment switches (SPEC §5):
  FASTDISTILL_SKIP_EXT=1    build no extension (the package then runs on the reference backend, with a warning)
  FASTDISTILL_FORCE_CUDA=1  build the CUDA kernels even when no GPU is visible (needs a CUDA build of torch + nvcc)
  FASTDISTILL_CPU_ARCH=avx2|generic   SIMD level of the CPU kernels (default: avx2 when this machine has AVX2+FMA)
"""

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _extensions():
    if os.environ.get("FASTDISTILL_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fastdistill.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP (the
    # libgomp.so.1 that torch ships is the one loaded at run time).
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"]
    arch = os.environ.get("FASTDISTILL_CPU_ARCH", "avx2" if _has_avx2() else "generic")
    if arch == "avx2":
        # at::vec picks its AVX2 Vectorized<> specialisations from these macros.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    elif arch != "generic":
        raise ValueError(f"FASTDISTILL_CPU_ARCH must be 'avx2' or 'generic', got {arch!r}")

    # CUDA: kernels (csrc/cuda/*.cu) are torch-free; the bindings (csrc/cuda/*.cpp) register them.
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    force_cuda = os.environ.get("FASTDISTILL_FORCE_CUDA", "0") == "1"
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    use_cuda = use_cuda and (force_cuda or torch.cuda.is_available())
    kwargs = dict(
        name="fastdistill._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        py_limited_api=True,
        extra_link_args=["-fopenmp"],
        define_macros=[("Py_LIMITED_API", "0x03090000")],
    )
    if use_cuda:
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DFASTDISTILL_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
