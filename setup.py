"""Build fastdistill._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment switches (SPEC §5):
  FASTDISTILL_SKIP_EXT=1    build no extension: a pure-Python package whose ops run on the reference backend (or
                            Triton), with a warning; also the way to make an sdist without torch (CONTRIBUTING.md)
  FASTDISTILL_FORCE_CUDA=1  build the CUDA kernels even when no GPU is visible (needs a CUDA build of torch + nvcc)
  FASTDISTILL_CPU_ARCH=avx2|generic   SIMD level of the CPU kernels (default: avx2 when this machine has AVX2+FMA)

The extension is compiled against the torch importable here (the build environment's: with `pip install
--no-build-isolation` the one already installed, else the newest allowed by build-system.requires) and loads only
with that torch's major.minor: build_ext writes fastdistill/_build_info.py (the torch and CUDA versions it built
against; generated, not in git, not in the sdist) and fastdistill/ops/extension.py compares it with the running torch
at import.

The extension is not optional: a failed compile fails the build (and the pip install); FASTDISTILL_SKIP_EXT=1 is the
way to install without it. build_ext recompiles _C on every build (`force`): _C depends on the build torch's headers
and ABI, on csrc/'s headers and on the switches above, none of which distutils' timestamp check (.cpp newer than the
.so) sees, and without ninja it would otherwise keep a stale _C under a _build_info.py describing the new build. With
ninja (build-system.requires; install it yourself with --no-build-isolation) the rebuild stays incremental.
"""

import glob
import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

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


def _limited_api_tag(cpp_extension) -> tuple[str, str]:
    """The Py_LIMITED_API value _C is compiled with and the wheel's matching abi3 tag: torch's BuildExtension defines
    -DPy_LIMITED_API=<its min_supported_cpython> for py_limited_api extensions (0x030A0000, Python 3.10, in torch
    2.11-2.14), so the tag follows it and never claims a Python older than requires-python (3.10)."""
    hexcode = max(int(getattr(cpp_extension, "min_supported_cpython", "0x030A0000"), 16), 0x030A0000)
    return f"0x{hexcode:08X}", f"cp{hexcode >> 24}{(hexcode >> 16) & 0xFF}"


def _nvcc_flags() -> list[str]:
    """nvcc's flags, -gencode for sm_80 and sm_90a among them, from fastdistill/ops/cuda_build.py (the compile test
    uses the same list). Loaded by path: importing the package would import torch and the extension."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fd_cuda_build", os.path.join(ROOT, "fastdistill", "ops",
                                                                                  "cuda_build.py"))  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where its dataclass looks its module up
    spec.loader.exec_module(module)
    return module.nvcc_flags()


class BuildPyWithoutExt(build_py):
    """FASTDISTILL_SKIP_EXT=1: also drops a _C and its _build_info.py left in the build folder by an earlier build
    from this checkout (pip builds a local folder in place, ./build), which the wheel would otherwise still ship."""

    def run(self):
        super().run()
        package = os.path.join(self.build_lib, "fastdistill")
        for stale in glob.glob(os.path.join(package, "_C.*")) + glob.glob(os.path.join(package, "_build_info.py")):
            os.remove(stale)


def _compile_in_parallel(compiler, jobs: int) -> None:
    """Without ninja, torch's BuildExtension compiles one source at a time (~10 min for the CUDA kernels, against
    ~1 min with ninja on a 16-core machine): ``compiler.compile`` replaced by one that runs up to ``jobs`` sources at
    once, each in a forked child. Not threads: torch's per-source wrapper swaps the compiler executable (nvcc / c++)
    on the shared compiler object, which threads would race on. The children's output goes where the build's does."""
    from setuptools.errors import CompileError

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):  # fmt: skip
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)  # fmt: skip
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        todo = [obj for obj in objects if obj in build]
        running, failed = {}, []
        while todo or running:
            while todo and len(running) < jobs:
                obj = todo.pop(0)
                src, ext = build[obj]
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the child: one source, then out without running the parent's exit handlers
                    code = 1
                    try:
                        compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
                        code = 0
                    except BaseException as e:  # noqa: BLE001  (reported by the parent)
                        print(f"fastdistill: compiling {src} failed: {e}", file=sys.stderr)
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                running[pid] = src
            pid, status = os.wait()
            if pid in running and status != 0:
                failed.append(running[pid])
            running.pop(pid, None)
        if failed:
            raise CompileError(f"fastdistill: compiling {', '.join(failed)} failed (the errors are above)")
        return objects

    compiler.compile = compile


def _extensions():
    if os.environ.get("FASTDISTILL_SKIP_EXT", "0") == "1":
        return [], {"build_py": BuildPyWithoutExt}, {}
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            f"fastdistill: building the C++ extension fastdistill._C needs torch importable here ({e}). Install the "
            "torch to build against first, e.g. `pip install torch==2.13.0` (a CPU-only machine: add --index-url "
            "https://download.pytorch.org/whl/cpu), then `pip install ninja` and `pip install --no-build-isolation "
            "...`; or set FASTDISTILL_SKIP_EXT=1 to build the pure-Python package without the extension (its ops "
            "then run on the reference backend, or Triton)."
        ) from None
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/fastdistill.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std= here: BuildExtension adds the C++ standard the build torch's headers need, to g++'s and nvcc's flags
    # alike, when none is given (torch 2.11: c++17; 2.12 on: c++20; torch 2.14's ATen/ATen.h #errors below C++20).
    # The kernels compile as either (checked against the 2.11 and 2.14 headers).
    # -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP (the
    # libgomp.so.1 that torch ships is the one loaded at run time).
    cxx = ["-O3", "-fno-math-errno", "-fopenmp"]
    arch = os.environ.get("FASTDISTILL_CPU_ARCH", "avx2" if _has_avx2() else "generic")
    if arch == "avx2":
        # at::vec picks its AVX2 Vectorized<> specialisations from these macros.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    elif arch != "generic":
        raise ValueError(f"FASTDISTILL_CPU_ARCH must be 'avx2' or 'generic', got {arch!r}")

    # CUDA: kernels csrc/cuda/**/*.cu, torch-free (one translation unit per dtype pair under inst/, so the build
    # compiles them in parallel); the torch binding csrc/cuda/*.cpp.
    cuda_sources = sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True)) + sorted(glob.glob("csrc/cuda/*.cpp"))
    force_cuda = os.environ.get("FASTDISTILL_FORCE_CUDA", "0") == "1"
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    use_cuda = use_cuda and (force_cuda or torch.cuda.is_available())
    # _C uses only CPython's limited API (PyModule_Create; the ops register through torch's C++ dispatcher), so one
    # binary serves every CPython >= the tag: abi3. Wheel tags cannot say which torch a binary needs (its C++ ABI
    # changes with every torch minor release); that is checked at import (fastdistill/ops/extension.py).
    limited_api, abi3_tag = _limited_api_tag(cpp_extension)
    kwargs = dict(name="fastdistill._C", include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=True,
                  extra_link_args=["-fopenmp"])  # fmt: skip
    if not hasattr(cpp_extension, "min_supported_cpython"):  # a torch whose BuildExtension does not define it
        kwargs["define_macros"] = [("Py_LIMITED_API", limited_api)]
    if use_cuda:
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DFASTDISTILL_WITH_CUDA"], "nvcc": _nvcc_flags()},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)

    build_info = (
        '"""What fastdistill._C was built against (written by setup.py\'s build_ext; not in git)."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {torch.version.cuda!r}  # torch.version.cuda of the build torch\n"
        f"WITH_CUDA = {use_cuda!r}  # CUDA kernels compiled into _C\n"
        f"CPU_ARCH = {arch!r}\n"
    )

    class BuildExtensionWithInfo(BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            # Always recompile (see the module docstring): torch's BuildExtension forces it only when ninja is found,
            # and then ninja itself skips what is up to date. So _build_info.py, written below after a compile that
            # succeeded, always describes the _C next to it.
            self.force = True

        def build_extensions(self):
            if not self.use_ninja and hasattr(os, "fork"):  # (BuildExtension's __init__ found no ninja)
                cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
                jobs = int(os.environ.get("MAX_JOBS") or cpus or 1)
                _compile_in_parallel(self.compiler, max(1, jobs))
            super().build_extensions()

        def run(self):
            super().run()
            # next to _C: in the build folder (what the wheel holds) and, in place / editable, in the source tree
            dirs = {os.path.dirname(os.path.join(self.build_lib, self.get_ext_filename(ext.name)))}
            if self.inplace:
                dirs.add(os.path.dirname(self.get_ext_fullpath(ext.name)))
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "_build_info.py"), "w") as f:
                    f.write(build_info)

    return [ext], {"build_ext": BuildExtensionWithInfo}, {"bdist_wheel": {"py_limited_api": abi3_tag}}


ext_modules, cmdclass, options = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
