"""Packaging (issue 15): the sdist builds a working wheel, the wheel's tags and metadata are honest, a _C built
against another torch says so (and how to rebuild), and `fastdistill demo` without its extra says which to install.

The sdist test compiles the extension once more (about 2 minutes on 2 cores); `-m "not packaging"` skips it.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
import torch

import fastdistill
from fastdistill.ops import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd=None, env=None, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _python(code: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTDISTILL_DISABLE_EXT": "0", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.packaging
def test_sdist_builds_a_wheel_with_the_extension(tmp_path):
    """sdist from the checkout -> unpacked in a clean folder -> `pip wheel --no-build-isolation` against the installed
    torch: the wheel holds _C, every package module and the license, is tagged abi3 from cp310, records the torch it
    was built against, and its _C loads."""
    pytest.importorskip("build", reason="the [test] extra's `build` (python -m build --sdist)")
    sdist_dir, src, wheel_dir, unpacked = (tmp_path / d for d in ("sdist", "src", "wheel", "unpacked"))
    # FASTDISTILL_SKIP_EXT: an sdist needs no compiler; build's dependency check would ask for build-system.requires'
    # torch range, which is the wheel build's business
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check", "-o", str(sdist_dir),
          ROOT], env={"FASTDISTILL_SKIP_EXT": "1"})  # fmt: skip
    (sdist,) = glob.glob(str(sdist_dir / "fastdistill-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(src, **kwargs)
    for header in glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True):
        assert os.path.relpath(header, ROOT) in names, f"{header} is missing from the sdist"
    assert {"LICENSE", "README.md", "setup.py", "pyproject.toml"} <= names
    assert not [n for n in names if n.endswith(".so") or n.endswith("_build_info.py")], names

    (project,) = glob.glob(str(src / "fastdistill-*"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir", "-w",
          str(wheel_dir), project], env={"FASTDISTILL_SKIP_EXT": "0"})  # fmt: skip
    (wheel,) = glob.glob(str(wheel_dir / "*.whl"))
    # abi3 from the Python that requires-python names (_C uses only the limited API); the torch it needs is checked
    # at import, since no wheel tag can say it
    assert re.search(r"-cp310-abi3-linux_\w+\.whl$", os.path.basename(wheel)), wheel
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        metadata = z.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
        z.extractall(unpacked)
    assert [f for f in files if re.fullmatch(r"fastdistill/_C\.[\w.-]*so", f)], sorted(files)
    package = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "fastdistill", "**", "*.py"),
                                                            recursive=True)}  # fmt: skip
    package.discard(os.path.join("fastdistill", "_build_info.py"))
    assert package <= files, sorted(package - files)
    assert "fastdistill/_build_info.py" in files
    assert "fastdistill/py.typed" in files  # PEP 561: users' type checkers see the annotations
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files), sorted(files)
    assert "License-Expression: Apache-2.0" in metadata

    # the wheel's own _C, imported from the unpacked wheel (not from the checkout: run outside it)
    out = _python(
        """
        import fastdistill, fastdistill._build_info as b, torch
        print(fastdistill.__file__, fastdistill.extension_available(), b.TORCH_VERSION == torch.__version__)
        """,
        cwd=str(tmp_path), env={"PYTHONPATH": str(unpacked)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    path, available, same_torch = out.stdout.split()
    assert path.startswith(str(unpacked)), path
    assert (available, same_torch) == ("True", "True"), out.stdout + out.stderr


def test_mismatch_compares_major_minor_and_cuda():
    class Build:
        TORCH_VERSION, CUDA_VERSION, WITH_CUDA = "2.12.1+cpu", None, False

    assert extension.mismatch(Build, "2.12.0", None) is None  # patch releases keep the ABI
    assert extension.mismatch(Build, "2.12.1+cu130", "13.0") is None  # CPU kernels run under a CUDA torch
    reason = extension.mismatch(Build, "2.13.0+cpu", None)
    assert reason and "built against torch 2.12.1+cpu" in reason and "torch 2.13.0+cpu is running" in reason
    Build.TORCH_VERSION, Build.CUDA_VERSION, Build.WITH_CUDA = "2.11.0+cu130", "13.0", True
    assert extension.mismatch(Build, "2.11.0+cu130", "13.0") is None
    assert "CUDA 13.0" in extension.mismatch(Build, "2.11.0+cu126", "12.6")
    assert "CUDA 13.0" in extension.mismatch(Build, "2.11.0+cpu", None)


def test_a_mismatched_build_is_not_loaded_and_says_how_to_rebuild():
    """_build_info naming another torch: _C is not even imported, one warning at import names both torch versions and
    the rebuild command, and the fallback warning of the first op carries the same reason."""
    out = _python(
        """
        import sys, types, warnings
        build = types.ModuleType("fastdistill._build_info")
        build.TORCH_VERSION, build.CUDA_VERSION, build.WITH_CUDA = "2.5.1", None, False
        sys.modules["fastdistill._build_info"] = build
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, fastdistill
            from fastdistill.ops import extension
            n = len(w)
            fastdistill.kd_loss(torch.randn(3, 5), torch.randn(3, 5))
        ours = [str(x.message) for x in w]  # only fastdistill's (torch or triton may warn at import too)
        at_import = [m for m in ours[:n] if m.startswith("fastdistill")]
        at_call = [m for m in ours[n:] if m.startswith("fastdistill")]
        assert "fastdistill._C" not in sys.modules
        assert not fastdistill.extension_available()
        print(repr(extension.IMPORT_ERROR)); print(repr(at_import)); print(repr(at_call))
        """,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    error, at_import, at_call = (eval(line) for line in out.stdout.splitlines())
    assert f"built against torch 2.5.1, but torch {torch.__version__} is running" in error, error
    assert "-m pip install --no-build-isolation --no-deps" in error, error
    assert len(at_import) == 1 and error in at_import[0], at_import
    assert len(at_call) == 1 and "slow reference backend" in at_call[0] and error in at_call[0], at_call


def test_an_unbuilt_extension_says_how_to_build_it():
    out = _python(
        """
        import sys, warnings
        sys.modules["fastdistill._C"] = None  # what an install with FASTDISTILL_SKIP_EXT=1 finds
        sys.modules["fastdistill._build_info"] = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing at import: an unbuilt _C is a choice; the first op warns
            import fastdistill
        from fastdistill.ops import extension
        print(extension.IMPORT_ERROR)
        """,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fastdistill._C is not built"), out.stdout
    assert f"torch {torch.__version__}" in out.stdout and "--no-build-isolation" in out.stdout, out.stdout


def test_rebuild_command_from_a_checkout():
    if os.path.dirname(os.path.dirname(os.path.abspath(fastdistill.__file__))) != ROOT:
        pytest.skip("fastdistill is not imported from this checkout")
    cmd = extension.rebuild_command()
    assert cmd.endswith(f"-m pip install --no-build-isolation --no-deps -e {ROOT}"), cmd


def test_demo_without_its_extra_is_one_line(tmp_path):
    code = f"""
        import sys
        sys.modules["sklearn"] = None  # as if the [demo] extra were not installed
        from fastdistill.cli import main
        sys.exit(main(["demo", "--smoke", "--out", {str(tmp_path)!r}]))
        """
    out = _python(code, cwd=ROOT)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        'fastdistill demo: error: scikit-learn not installed: pip install "fastdistill[demo]"'
    ], out.stderr


def test_declared_versions():
    """One torch range for the build and for the runtime, containing the torch under test; no CPU-only pins in the
    test extra (a CUDA torch brings its own Triton); the SPDX license and its file."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    build_torch = [Requirement(r) for r in meta["build-system"]["requires"] if r.startswith("torch")]
    run_torch = [Requirement(r) for r in meta["project"]["dependencies"] if r.startswith("torch")]
    assert len(build_torch) == len(run_torch) == 1 and build_torch[0].specifier == run_torch[0].specifier
    assert run_torch[0].specifier.contains(torch.__version__.split("+")[0]), (run_torch, torch.__version__)
    test_extra = [Requirement(r) for r in meta["project"]["optional-dependencies"]["test"]]
    assert not [r for r in test_extra if r.name in ("triton", "numpy") and r.specifier], test_extra
    assert meta["project"]["license"] == "Apache-2.0" and meta["project"]["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def _setup_py(code: str, env=None, path_prefix=None) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh Python in the checkout, where ``run_setup()`` executes setup.py (its setup() call
    captured, not run: nothing is built or written)."""
    prelude = """
        import runpy, sys
        import setuptools
        captured = {}
        def run_setup(argv=("setup.py", "--version"), capture=True):
            if capture:
                setuptools.setup = lambda **kwargs: captured.update(kwargs)
            sys.argv = list(argv)
            runpy.run_path("setup.py", run_name="__main__")
        """
    env = {**os.environ, **(env or {})}
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_setup_without_torch_says_what_to_install():
    """`pip install --no-build-isolation` in an environment without torch: one message naming the torch to install
    first and FASTDISTILL_SKIP_EXT=1, not a ModuleNotFoundError traceback."""
    out = _setup_py(
        """
        sys.modules["torch"] = None  # as if torch were not installed
        run_setup(capture=False)
        """,
        env={"FASTDISTILL_SKIP_EXT": "0"},
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    message = out.stderr.strip()
    assert message.startswith("fastdistill: building the C++ extension fastdistill._C needs torch"), message
    for part in ("pip install torch==2.13.0", "--no-build-isolation", "FASTDISTILL_SKIP_EXT=1", "ninja"):
        assert part in message, (part, message)


def test_version_is_written_once():
    """pyproject.toml reads the version from fastdistill/__init__.py, statically: setup.py gives it without torch
    (FASTDISTILL_SKIP_EXT=1, as for an sdist), and the installed metadata agrees."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"], meta["project"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastdistill.__version__"}
    out = _setup_py(
        """
        sys.modules["torch"] = None  # reading the version must not import the package (which imports torch)
        run_setup(capture=False)
        """,
        env={"FASTDISTILL_SKIP_EXT": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == fastdistill.__version__, out.stdout
    import importlib.metadata

    try:
        installed = importlib.metadata.version("fastdistill")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fastdistill is not installed")
    assert installed == fastdistill.__version__


def test_build_ext_recompiles_even_without_ninja(tmp_path):
    """build_ext always compiles _C (force), also where ninja is missing and torch's BuildExtension falls back to
    distutils' timestamp check, which sees neither the torch upgrade, the build switches nor the headers: else a
    reinstall would keep a stale _C and write a _build_info.py that describes a build that did not happen."""
    shim = tmp_path / "ninja"
    shim.write_text("#!/bin/sh\nexit 127\n")  # is_ninja_available() -> False
    shim.chmod(0o755)
    out = _setup_py(
        """
        run_setup()
        from setuptools import Distribution
        dist = Distribution({"ext_modules": captured["ext_modules"], "cmdclass": captured["cmdclass"]})
        cmd = captured["cmdclass"]["build_ext"](dist)
        cmd.ensure_finalized()
        print(cmd.use_ninja, bool(cmd.force))
        """,
        env={"FASTDISTILL_SKIP_EXT": "0"}, path_prefix=str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False True", out.stdout


def test_without_ninja_sources_compile_in_parallel_and_a_failure_fails_the_build(tmp_path):
    """Without ninja, torch's BuildExtension compiles one source at a time (the CUDA kernels: ~10 minutes, past the GPU
    run's install slot); setup.py's replacement for compiler.compile runs up to MAX_JOBS at once in forked children.
    Every object is built, and one source that does not compile fails the build, naming it."""
    for name, body in (("a.c", "int a(void) { return 1; }"), ("b.c", "int b(void) { return 2; }"),
                       ("bad.c", "int c(void) { return }")):  # fmt: skip
        (tmp_path / name).write_text(body + "\n")
    out = _setup_py(
        f"""
        setuptools.setup = lambda **kwargs: None
        g = runpy.run_path("setup.py", run_name="__main__")
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools.errors import CompileError
        cc = new_compiler()
        cc.compiler_so = ["cc", "-c"]  # (distutils' bare default, without sysconfig's flags)
        g["_compile_in_parallel"](cc, 2)
        objs = cc.compile([r"{tmp_path}/a.c", r"{tmp_path}/b.c"], output_dir=r"{tmp_path}/out")
        import os
        print(all(os.path.getsize(o) > 0 for o in objs), len(objs))
        try:
            cc.compile([r"{tmp_path}/a.c", r"{tmp_path}/bad.c"], output_dir=r"{tmp_path}/out")
        except CompileError as e:
            print("failed:", e)
        """,
        env={"FASTDISTILL_SKIP_EXT": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "True 2", out.stdout + out.stderr
    assert lines[-1].startswith("failed: fastdistill: compiling") and "bad.c" in lines[-1] and "a.c," not in lines[-1]


class _AVX2Build:
    TORCH_VERSION, CUDA_VERSION, WITH_CUDA, CPU_ARCH = torch.__version__, torch.version.cuda, False, "avx2"


def test_arch_mismatch():
    no_avx2 = {"fpu", "sse2", "sse4_2", "avx"}
    reason = extension.arch_mismatch(_AVX2Build, no_avx2)
    assert reason and "FASTDISTILL_CPU_ARCH=avx2" in reason and "lacks avx2, fma, f16c" in reason, reason
    assert extension.arch_mismatch(_AVX2Build, no_avx2 | {"avx2", "fma", "f16c"}) is None
    assert extension.arch_mismatch(_AVX2Build, None) is None  # flags unknown: load as before

    class Generic(_AVX2Build):
        CPU_ARCH = "generic"

    class Older:  # a _build_info from before CPU_ARCH was recorded
        TORCH_VERSION = torch.__version__

    assert extension.arch_mismatch(Generic, no_avx2) is None
    assert extension.arch_mismatch(Older, no_avx2) is None


def test_an_avx2_build_is_not_loaded_on_a_cpu_without_avx2(monkeypatch):
    """_load() with _build_info saying avx2 and the CPU probe saying no AVX2: _C is not imported (it would die with
    SIGILL), the reason names the build arch, the CPU and the rebuild with FASTDISTILL_CPU_ARCH=generic."""
    import importlib
    import types

    build = types.ModuleType("fastdistill._build_info")
    for name in ("TORCH_VERSION", "CUDA_VERSION", "WITH_CUDA", "CPU_ARCH"):
        setattr(build, name, getattr(_AVX2Build, name))
    monkeypatch.setitem(sys.modules, "fastdistill._build_info", build)
    monkeypatch.delenv("FASTDISTILL_DISABLE_EXT", raising=False)
    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))

    monkeypatch.setattr(extension, "cpu_features", lambda: {"fpu", "sse2", "sse4_2"})
    error, warn = extension._load()
    assert "fastdistill._C" not in imported, imported
    assert warn and error, (error, warn)
    for part in ("FASTDISTILL_CPU_ARCH=avx2", "lacks avx2, fma, f16c", "CPU capability",
                 "FASTDISTILL_CPU_ARCH=generic", "-m pip install --no-build-isolation --no-deps"):  # fmt: skip
        assert part in error, (part, error)

    imported.clear()  # a CPU with the features: _C is loaded as before
    monkeypatch.setattr(extension, "cpu_features", lambda: {"sse2", "avx2", "fma", "f16c"})
    error, warn = extension._load()
    assert "fastdistill._C" in imported, imported
    assert (error is None) == extension.available(), error  # whatever this checkout's _C gives otherwise


def test_the_ops_fall_back_on_a_cpu_without_avx2():
    """The whole path, in a fresh process whose /proc/cpuinfo has no AVX2: one warning at import, _C never imported,
    and the ops run (on the reference backend) instead of crashing."""
    out = _python(
        """
        import builtins, io, sys, types, warnings
        real_open = builtins.open
        def fake_open(file, *args, **kwargs):
            if file == "/proc/cpuinfo":
                return io.StringIO("processor\\t: 0\\nflags\\t\\t: fpu sse sse2 sse4_2 avx\\n")
            return real_open(file, *args, **kwargs)
        builtins.open = fake_open
        import torch
        build = types.ModuleType("fastdistill._build_info")
        build.TORCH_VERSION, build.CUDA_VERSION, build.WITH_CUDA = torch.__version__, torch.version.cuda, False
        build.CPU_ARCH = "avx2"
        sys.modules["fastdistill._build_info"] = build
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fastdistill
            loss = fastdistill.kd_loss(torch.randn(3, 5), torch.randn(3, 5))
        assert "fastdistill._C" not in sys.modules
        assert not fastdistill.extension_available()
        assert torch.isfinite(loss).all()
        print(repr([str(x.message) for x in w if str(x.message).startswith("fastdistill")]))
        """,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    messages = eval(out.stdout.strip().splitlines()[-1])
    assert messages and "FASTDISTILL_CPU_ARCH=avx2" in messages[0] and "FASTDISTILL_CPU_ARCH=generic" in messages[0]


def test_skip_ext_ships_no_stale_extension(tmp_path):
    """FASTDISTILL_SKIP_EXT=1 from a checkout whose ./build still holds an earlier build's _C: the pure-Python
    package's build folder (what its wheel holds) keeps neither that _C nor its _build_info.py."""
    import shutil

    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "fastdistill"), tmp_path / "fastdistill",
                    ignore=shutil.ignore_patterns("_C.*", "_build_info.py", "__pycache__"))  # fmt: skip
    stale = tmp_path / "build" / "lib" / "fastdistill"
    stale.mkdir(parents=True)
    (stale / "_C.abi3.so").write_bytes(b"an earlier build")
    (stale / "_build_info.py").write_text("CPU_ARCH = 'avx2'\n")
    _run([sys.executable, "setup.py", "-q", "build_py"], cwd=str(tmp_path), env={"FASTDISTILL_SKIP_EXT": "1"})
    assert (stale / "__init__.py").is_file()
    assert not [p.name for p in stale.iterdir() if p.name.startswith(("_C.", "_build_info"))]
