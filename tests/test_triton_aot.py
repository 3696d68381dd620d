"""The Triton kernels as a GPU would compile them, on a machine without one (fastdistill/ops/triton/aot.py):
configurations the launchers can choose compile to a Hopper (sm_90) and an Ampere (sm_80) cubin (a covering subset: see
below),
offsets are 64-bit, Inductor's re-emitted source imports and compiles, and the checks themselves catch what they claim
to.

The compiler runs in child processes without TRITON_INTERPRET (this test process runs the kernels in Triton's
interpreter, whose kernel objects cannot be compiled)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FULL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def run_child(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_snippet(code: str, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` as a module file (Triton reads a kernel's source from its file) in a compiling child."""
    path = tmp_path / "snippet.py"
    path.write_text(textwrap.dedent(code))
    return run_child([str(path)], timeout)


# All ~1500 configurations take ~35 minutes on 2 cores with Triton's cache cold (as on CI): the test compiles a subset
# in which every pair of switch values (kernel, alignment, pointer types, each constexpr, each option) of a family
# occurs for sm_90, and every single value for sm_80; `make test-full` (FASTDISTILL_TEST_FULL=1) compiles them all.


@pytest.mark.parametrize("arch,cover", [(90, "pairs"), (80, "values")])
def test_every_launcher_configuration_compiles(arch, cover, tmp_path):
    """aot.py enumerates each launcher's problem space (meta tensors, the launcher itself choosing the kernel,
    constexprs and options), checks the launchers reach exactly the declared constexpr domains (all of them, compiled
    or not), compiles the configurations to a cubin with the ptxas of the triton wheel, and rejects 32-bit products
    of run-time integers in the TTIR. Triton's cache is the user's: a kernel whose source changed is really compiled,
    an unchanged one comes from the cache."""
    args = ["-m", "fastdistill.ops.triton.aot", "--arch", str(arch), "--jobs", str(os.cpu_count() or 1),
            "--json", str(tmp_path / "rows.json"), *([] if FULL else ["--cover", cover])]  # fmt: skip
    out = run_child(args, timeout=3600)
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-4000:]
    assert "DOMAIN" not in out.stdout and "FAILED" not in out.stdout and "INT32" not in out.stdout
    assert "ROUNDING" not in out.stdout  # every float narrowing rounds to nearest (the interpreter cannot tell)
    families = {r["family"] for r in json.loads((tmp_path / "rows.json").read_text())}
    assert families == {"kd_loss", "codistill_loss", "mi_alpha", "scale"}, families


def test_inductor_reemitted_sources_import_and_compile():
    out = run_child(["-m", "fastdistill.ops.triton.aot", "--inductor"], timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == 7, out.stdout  # kd, codistill, 4 mi (3 tile kernels, strip gradient), scale


def test_checks_catch_what_they_claim(tmp_path):
    """The checks can fail: a constexpr -inf global breaks Inductor's re-emitted source (as on the H200), and an
    index times a stride in 32 bits is reported, while the same in 64 bits is not."""
    out = run_snippet(
        """
        import triton
        import triton.language as tl
        from fastdistill.ops.triton import aot

        NEG_INF = tl.constexpr(float("-inf"))

        @triton.jit
        def bad_global(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), NEG_INF, tl.float32))

        @triton.jit
        def offsets(x_ptr, stride, WIDE: tl.constexpr, BLOCK: tl.constexpr):
            k = tl.arange(0, BLOCK)
            if WIDE:
                k = k.to(tl.int64)
            tl.store(x_ptr + k * stride, tl.zeros((BLOCK,), tl.float32))

        @triton.jit
        def narrow(x_ptr, y_ptr, RTZ: tl.constexpr, BLOCK: tl.constexpr):
            k = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + k)
            y = x.to(tl.bfloat16, fp_downcast_rounding="rtz") if RTZ else x.to(tl.bfloat16)
            tl.store(y_ptr + k, y)

        for rtz in (False, True):
            sig = {"x_ptr": "*fp32", "y_ptr": "*bf16", "RTZ": "constexpr", "BLOCK": "constexpr"}
            k = triton.compile(triton.compiler.ASTSource(narrow, sig, {"RTZ": rtz, "BLOCK": 16}),
                               target=triton.backends.compiler.GPUTarget("cuda", 90, 32))
            print("rtz" if rtz else "rn", aot.narrowing_not_to_nearest(k.asm["ptx"]))
        try:
            aot.inductor_check(bad_global, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16}, {})
            print("inductor: no error")
        except NameError as e:
            print("inductor: NameError", e)
        for wide in (False, True):
            sig = {"x_ptr": "*fp32", "stride": "i32", "WIDE": "constexpr", "BLOCK": "constexpr"}
            k = triton.compile(triton.compiler.ASTSource(offsets, sig, {"WIDE": wide, "BLOCK": 16}),
                               target=triton.backends.compiler.GPUTarget("cuda", 90, 32))
            print("wide" if wide else "narrow", len(aot.i32_products(k.asm["ttir"])))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "inductor: NameError" in out.stdout and "'inf'" in out.stdout, out.stdout
    assert "narrow 1" in out.stdout and "wide 0" in out.stdout, out.stdout
    assert "rn []" in out.stdout and "rtz ['cvt.rz.bf16.f32']" in out.stdout, out.stdout


def test_rmul_keeps_the_product_rounded_once(tmp_path):
    """Compiled for a GPU, a product used as itself (a max) and in a difference (exp(S - l)) is two numbers: the
    compiler contracts x * y - c into one fma.rn.f32 with the product unrounded. row_math.rmul's explicitly rounded
    multiply is never fused, so the MI kernels, whose backward recomputes S = acc * (1/T) and takes exp(S - l) against
    the forward's l (formed from the rounded S), see one S: each MI kernel a bf16 or float32 call launches has it."""
    out = run_snippet(
        """
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import torch
        from fastdistill.ops.triton import aot, mi_alpha
        from fastdistill.ops.triton.row_math import rmul

        @triton.jit
        def k(x_ptr, o_ptr, y, z, FAST: tl.constexpr):
            i = tl.arange(0, 128)
            s = rmul(tl.load(x_ptr + i), y, FAST)
            tl.store(o_ptr + i, s - z + tl.max(s, 0))

        for fast in (False, True):
            sig = {"x_ptr": "*fp32", "o_ptr": "*fp32", "y": "fp32", "z": "fp32", "FAST": "constexpr"}
            ptx = triton.compile(ASTSource(k, sig, {"FAST": fast}), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            print("fast" if fast else "plain", "fma" if "fma.rn.f32" in ptx else "no-fma")
        for dtype in (torch.bfloat16, torch.float32):  # the strips' kernels, the tile kernels
            u = torch.empty(4096, 128, device="meta", dtype=dtype)
            for what, launch in mi_alpha.mi_launches(u, u, torch.empty(4096, device="meta")):
                cfg = aot.config_of("mi_alpha", launch)
                src = ASTSource(aot._kernel_object(cfg), dict(cfg.signature), dict(cfg.constexprs))
                ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(cfg.options)).asm["ptx"]
                print(what, dtype, "rn" if "mul.rn.f32" in ptx else "MISSING")
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    print(out.stdout)
    assert "plain fma" in out.stdout and "fast no-fma" in out.stdout, out.stdout
    assert out.stdout.count(" rn\n") >= 4 and "MISSING" not in out.stdout, out.stdout


def test_rounding_check_reads_float_narrowings_only():
    from fastdistill.ops.triton import asm_checks

    ptx = """cvt.rn.bf16.f32 %rs1, %f1;  cvt.rz.bf16.f32 %rs2, %f2;  cvt.rn.f16x2.f32 %r1, %f5, %f6;
             cvt.rm.f16.f32 %rs4, %f10;  cvt.rz.f32.f64 %f7, %fd1;  cvt.rn.f32.f64 %f11, %fd2;
             cvt.rmi.f32.f32 %f3, %f4;  cvt.f32.bf16 %f8, %rs3;  cvt.rzi.s32.f32 %r2, %f9;"""
    # floor (rmi), a widening and a float-to-int conversion round as they must: not reported
    assert asm_checks.narrowing_not_to_nearest(ptx) == ["cvt.rm.f16.f32", "cvt.rz.bf16.f32", "cvt.rz.f32.f64"]


def test_loop_profile_finds_spills_inside_loops_only():
    """A spill store / load inside an innermost loop (paid per tile) is counted against the loop; one before or
    after the loops (paid once per program) is not: --report bench fails on the first kind only."""
    from fastdistill.ops.triton import asm_checks

    sass = "\n".join(f"        /*{addr:04x}*/                   {ins} ;" for addr, ins in [
        (0x00, "STL.64 [R1], R40"), (0x10, "LDG.E R2, desc[UR4][R4.64]"), (0x20, "MUFU.EX2 R3, R2"),
        (0x30, "LDL.LU.64 R6, [R1]"), (0x40, "BRA `(.L_x_1) 0x10"), (0x50, "LDL.64 R8, [R1+0x8]"),
        (0x60, "FADD R2, R2, R3"), (0x70, "BRA `(.L_x_2) 0x60"), (0x80, "EXIT")])  # fmt: skip
    loops = asm_checks.loop_profile(sass)
    assert [(lp["instructions"], lp["LDG"], lp["MUFU"], lp["STL"], lp["LDL"]) for lp in loops] == [
        (4, 1, 1, 0, 1), (2, 0, 0, 0, 0)]  # fmt: skip
    assert asm_checks.loop_spills({"loops": loops}) == 1 and asm_checks.loop_spills({"loops": loops[1:]}) == 0


def test_resource_report_of_the_benchmark_shapes():
    """make kernels-report: registers, spills, shared memory and occupancy of what the launchers pick at the GPU
    benchmark shapes, from the cubins; exit status 0 means none of them spills more than aot.SPILL_SLACK bytes."""
    out = run_child(["-m", "fastdistill.ops.triton.aot", "--report", "bench", "--arch", "90"], timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "`" in line]
    # kd (2 V x 2 K x kl, jsd), codistill (2 V), mi (3 shapes x a strip's 2 kernels)
    assert len(rows) == 8 + 2 + 6, out.stdout


def test_launcher_alignment_decision():
    """The aligned kernel object (16-byte vector loads) is picked only when the pointers are 16-byte aligned and V
    and the strides are multiples of 16; it must never see anything else."""
    from fastdistill.ops.triton import kd_loss

    def launch(student, teachers):
        return kd_loss.kd_launch(kd_loss.kl_call(student, teachers))[0][0]

    aligned = launch(torch.zeros(4, 64), torch.zeros(2, 4, 64))
    assert aligned.constexprs["ALIGNED"] and aligned.kernel is kd_loss._kd_row_kernel.aligned
    odd_v = launch(torch.zeros(4, 65), torch.zeros(2, 4, 65))
    assert not odd_v.constexprs["ALIGNED"] and odd_v.kernel is kd_loss._kd_row_kernel.unaligned
    base = torch.zeros(5 * 64 + 1)
    offset_view = base[1:].view(5, 64)[:4]  # rows of 64, but the data pointer is 4 bytes past an aligned address
    assert not launch(offset_view, torch.zeros(2, 4, 64)).constexprs["ALIGNED"]
    strided = torch.zeros(4, 72)[:, :64]  # row stride 72, not a multiple of 16
    assert not launch(strided, torch.zeros(2, 4, 64)).constexprs["ALIGNED"]


@pytest.mark.filterwarnings("error:Accessing the data pointer")
def test_launchers_build_under_fake_tensors():
    """torch.compile traces a triton_op's body with fake tensors, which have no data pointer: the launchers must
    still decide (from storage offsets) and build their launch records."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastdistill.ops.triton import codistill_loss, kd_loss, mi_alpha

    with FakeTensorMode():
        s, t = torch.empty(4, 64), torch.empty(2, 4, 64)
        launch = kd_loss.kd_launch(kd_loss.kl_call(s, t))[0][0]
        assert launch.constexprs["ALIGNED"]
        shifted = torch.empty(4 * 64 + 1)[1:].view(4, 64)
        launch = codistill_loss.codistill_launch(codistill_loss.kl_call(shifted, shifted))[0]
        assert not launch.constexprs["ALIGNED"]
        u = torch.empty(8, 32)
        assert [w for w, _ in mi_alpha.mi_launches(u, u, torch.empty(8))] == ["fwd", "bwd_rows", "bwd_cols"]
        h = torch.empty(8, 32, dtype=torch.bfloat16)
        assert [w for w, _ in mi_alpha.mi_launches(h, h, torch.empty(8))] == ["strip_fwd", "strip_grad"]
