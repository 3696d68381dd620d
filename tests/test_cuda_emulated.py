"""The CUDA kd_loss kernel (csrc/cuda) run on the CPU and compared with the CPU op: every CI run checks the CUDA
launcher, plan and kernels without a GPU, so an edit to them or to csrc/common/kd_math.h that breaks a result, a
barrier or a memory access fails here, before any GPU run.

tests/cuda_emu/emu_cuda.h emulates the CUDA the kernel uses (a std::thread per CUDA thread; std::barrier for
__syncthreads and cluster.sync; warp shuffles that order no other memory, as on a GPU; per-block shared memory of
exactly the launched size, filled with NaN bytes, and again when the block exits; distributed shared memory; cp.async
copies that make their destination NaN when issued and land only at the wait; the launch checks), and g++ compiles the
real csrc/cuda/kd_loss_launch.cu, kd_loss_plan.h, kd_loss_kernel.cuh and inst/*.cu against it (the kernel's
FASTDISTILL_CUDA_EMULATE hooks replace only its two PTX instructions and its extern shared array). Two builds:
AddressSanitizer with UBSan's alignment check (memcheck: every case) and ThreadSanitizer (racecheck: the barrier-heavy
paths: clusters, the pipelined loop). Each case's per-row loss, student gradient and teacher gradients must match
torch.ops.fastdistill.kd_loss on the same CPU tensors (2e-4 relative, x40 for bf16/fp16 gradients, 1e-9 for
float64; NaN and +-inf where the CPU op has them, exactly). Cases are named by their class: residency (global, smem,
cluster, smem+pipe, cluster+pipe), dtype, divergence, ensemble.

What it cannot show: the GPU's memory model beyond barrier ordering; the accuracy of ex2/lg2.approx beyond flushing
denormals; registers, occupancy and whether a cluster is schedulable (tests/test_cuda_build.py checks the compiled
kernels' resources, the GPU tests the rest); errors only nvcc reports (test_cuda_build.py compiles every .cu).

It skips only where the toolchain cannot build or run it (no g++, no sanitizer runtime); a compile error in the
sources fails. About 3 minutes on 2 cores, both builds included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import DIVERGENCES, ENSEMBLES, requires_ext

from fastdistill.ops import divergences

pytestmark = requires_ext  # the oracle is the CPU op

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
CSRC = ROOT / "csrc"
# __CUDA_ARCH__ 900: the kernel's cluster code is compiled for sm_90 only (the emulated device says 8 or 9 at run time);
# the stub headers in EMU come before any CUDA include directory; nvcc's #pragma unroll means nothing to g++
FLAGS = ["-std=c++20", "-O1", "-g1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-DFASTDISTILL_CUDA_EMULATE",
         "-D__CUDA_ARCH__=900", f"-I{EMU}", f"-I{CSRC}"]  # fmt: skip
SANITIZERS = {
    # memcheck, and a misaligned 8/16-byte access (a vector path the launcher should not have taken) is an error
    "asan": ["-fsanitize=address,alignment", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread"],
}
JOBS = min(2, os.cpu_count() or 1)  # emulator processes at a time
ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",  # (inputs are not freed: the process ends)
    "UBSAN_OPTIONS": "print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
}
PROBE = r"""
#include <barrier>
#include <thread>
int main() {
  std::barrier<> b(2);
  std::thread t([&] { b.arrive_and_wait(); });
  b.arrive_and_wait();
  t.join();
}
"""

# ---- the builds --------------------------------------------------------------------------------------------------


def _sources() -> list[str]:
    """The emulator's main, then the real launcher and every instantiation the launcher dispatches to (a new
    inst/*.cu is built here without an edit)."""
    inst = sorted(str(p) for p in (CSRC / "cuda" / "inst").glob("*.cu"))
    return [str(EMU / "emu_main.cpp"), "-x", "c++", str(CSRC / "cuda" / "kd_loss_launch.cu"), *inst]


def _build(tmp_path_factory, sanitizer: str) -> Path:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    out = tmp_path_factory.mktemp(f"cuda_emu_{sanitizer}")
    # the toolchain first: what it lacks (C++20's <barrier>, the sanitizer's runtime, a kernel TSan can run on) is a
    # skip; after that, a failed compile is our sources' error
    probe = out / "probe.cpp"
    probe.write_text(PROBE)
    r = subprocess.run([gxx, "-std=c++20", "-pthread", *SANITIZERS[sanitizer], str(probe), "-o", str(out / "probe")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"g++ cannot build a C++20 program with {' '.join(SANITIZERS[sanitizer])}: {r.stderr[-500:]}")
    r = subprocess.run([str(out / "probe")], capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})
    if r.returncode != 0:
        pytest.skip(f"the {sanitizer} runtime cannot run here: {r.stderr[-500:]}")
    exe = out / "emu"
    cmd = [gxx, *FLAGS, *SANITIZERS[sanitizer], *_sources(), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"the emulator does not compile ({' '.join(cmd)}):\n{r.stderr[-6000:]}"
    return exe


@pytest.fixture(scope="module")
def asan(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "asan")


@pytest.fixture(scope="module")
def tsan(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "tsan")


# ---- a case: inputs, the emulated launch, the CPU op -------------------------------------------------------------

RESIDENCIES = {  # forced as tests/test_cuda_kd_gpu.py forces them (strict: run as named, or an error)
    "global": dict(residency="global", pipeline="off"),
    "smem": dict(residency="smem", pipeline="off"),
    "cluster": dict(residency="cluster", pipeline="off", cluster=4),
    "smem+pipe": dict(residency="smem", pipeline="on", groups=2),
    "cluster+pipe": dict(residency="cluster", pipeline="on", cluster=4, groups=2),
}
DEFAULTS = dict(n=4, v=1000, k=3, dtype=torch.float32, teacher_dtype=None, divergence="kl", ensemble="prob_mean",
                T=2.0, ce=0.3, w=0.3, kd_scale=None, labels=True, sw=True, tw=True, reduce=True, grad_s=True,
                grad_t=True, residency="auto", pipeline="off", cluster=0, groups=0, threads=64, max_threads=1024,
                off=0, pad=0, specials=None, seed=0, strict=1, sm=9, occupancy_clusters=33, stale_error=0,
                skip_sync=0, ex2_bias=0.0, static_smem=1024, skip_cluster_sync=0)  # fmt: skip
LOW = (torch.bfloat16, torch.float16)


def _bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype in LOW else t).numpy().tobytes()


def _tensor(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    raw = bytearray(path.read_bytes())
    if dtype in LOW:
        return torch.frombuffer(raw, dtype=torch.int16).view(dtype).reshape(shape)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)


def _inputs(c: dict):
    """Student and teachers as views into buffers `off` elements in with rows `pad` elements apart (the kernel gets
    the same bytes), teacher weights (a 0 every third row of teacher 1), labels (every fourth row ignored), sample
    weights (a 0 every fifth row), the denominator."""
    n, v, k, off = c["n"], c["v"], c["k"], c["off"]
    sdt, tdt = c["dtype"], c["teacher_dtype"] or c["dtype"]
    g = torch.Generator().manual_seed(c["seed"])
    stride = v + c["pad"]
    bufs = [(3 * torch.randn(off + n * stride, generator=g, dtype=torch.float64)).to(d) for d in [sdt] + [tdt] * k]
    views = [b[off:].view(n, stride)[:, :v] for b in bufs]
    if c["specials"]:
        c["specials"](views[0], views[1:])
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1::4] = -100
    acc = torch.float64 if sdt == torch.float64 else torch.float32
    sw = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    sw[2::5] = 0.0
    tw = torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
    if k > 1:
        tw[1, ::3] = 0.0
    tw = tw / tw.sum(0)
    den = torch.tensor([float(n - 1)], dtype=acc)
    return bufs, views, labels, sw.to(acc), tw.to(acc), den


def emulate(exe: Path, workdir: Path, allow_failure: bool = False, **kw) -> tuple[dict, dict]:
    """Runs one case in the emulator; returns (what out.txt says, the case with its inputs and outputs). A sanitizer
    or emulator failure fails the test with its report (unless allow_failure: then out.txt may be missing)."""
    c = {**DEFAULTS, **kw}
    # grad_t: True (every teacher's gradient), False, or the op's mask (bit k: teacher k's)
    c["grad_t"] = (1 << c["k"]) - 1 if c["grad_t"] is True else int(c["grad_t"])
    if c["kd_scale"] is None:
        c["kd_scale"] = (1 - c["ce"]) * c["T"] ** 2
    bufs, views, labels, sw, tw, den = _inputs(c)
    d = Path(tempfile.mkdtemp(prefix="case", dir=workdir))
    (d / "student.bin").write_bytes(_bytes(bufs[0]))
    for i, b in enumerate(bufs[1:]):
        (d / f"teacher{i}.bin").write_bytes(_bytes(b))
    for name, t, on in (("tw", tw, c["tw"]), ("labels", labels, c["labels"]), ("sw", sw, c["sw"]),
                        ("den", den, c["reduce"])):  # fmt: skip
        if on:
            (d / f"{name}.bin").write_bytes(_bytes(t))
    tdt = c["teacher_dtype"] or c["dtype"]
    params = {**{key: c[key] for key in ("T", "ce", "w", "kd_scale", "residency", "pipeline", "cluster", "groups",
                                          "threads", "max_threads", "off", "strict", "sm", "occupancy_clusters",
                                          "stale_error", "skip_sync", "ex2_bias", "static_smem",
                                          "skip_cluster_sync", "divergence", "ensemble")},
              "N": c["n"], "V": c["v"], "K": c["k"], "stride": c["v"] + c["pad"], "reduce": int(c["reduce"]),
              "student_dtype": str(c["dtype"]).removeprefix("torch."), "teacher_dtype": str(tdt).removeprefix("torch."),
              "has_tw": int(c["tw"]), "has_labels": int(c["labels"]), "has_sw": int(c["sw"]),
              "has_den": int(c["reduce"]), "grad_s": int(c["grad_s"]), "grad_t": c["grad_t"]}  # fmt: skip
    (d / "params.txt").write_text("".join(f"{key} {value}\n" for key, value in params.items()))
    r = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    c.update(inputs=dict(views=views, labels=labels, sw=sw, tw=tw, den=den), dir=d, rc=r.returncode, stderr=r.stderr)
    if r.returncode not in (0, 3):
        if allow_failure:
            return {}, c
        pytest.fail(f"emulator failed (rc {r.returncode}) on {describe(c)}:\n{r.stderr[-6000:]}")
    info = dict(line.split(" ", 1) for line in (d / "out.txt").read_text().splitlines())
    return info, c


def describe(c: dict) -> str:
    """The case in a line: its class (sizes, dtype, divergence, ensemble, residency) and what differs from DEFAULTS."""
    main = ("n", "v", "k", "dtype", "divergence", "ensemble", "residency", "pipeline")
    extra = [key for key in DEFAULTS if key not in main and c[key] != DEFAULTS[key]]
    return " ".join(f"{key}={getattr(c[key], '__name__', c[key])}" for key in (*main, *extra))


def mismatches(c: dict) -> list[str]:
    """The emulated outputs against torch.ops.fastdistill.kd_loss on the same inputs: [] when they agree."""
    x = c["inputs"]
    s, ts = x["views"][0], x["views"][1:]
    tdt = c["teacher_dtype"] or c["dtype"]
    acc = torch.float64 if c["dtype"] == torch.float64 else torch.float32
    n, v, k = c["n"], c["v"], c["k"]
    dp = [c["w"]] * len(divergences.DIVERGENCES[c["divergence"]].params)
    tw = x["tw"] if c["tw"] else None
    labels = x["labels"] if c["labels"] else None
    sw = x["sw"] if c["sw"] else None
    op = torch.ops.fastdistill.kd_loss
    common = (c["divergence"], c["ensemble"], c["T"], c["kd_scale"], c["ce"], dp, -100)
    rows, _, _ = op(s, ts, tw, labels, sw, None, *common, False, False, 0)
    _, gs, gt = op(s, ts, tw, labels, sw, x["den"] if c["reduce"] else None, *common, c["reduce"], c["grad_s"],
                   c["grad_t"])  # fmt: skip
    limit = 1e-9 if acc == torch.float64 else 2e-4
    low = c["dtype"] in LOW or tdt in LOW
    bad = []

    def check(name: str, got: torch.Tensor, want: torch.Tensor, lim: float) -> None:
        got, want = got.double(), want.double()
        if not torch.equal(got.isnan(), want.isnan()):
            at = (got.isnan() != want.isnan()).nonzero()[:4].tolist()
            bad.append(f"{name}: NaN where the CPU op has none or the reverse, at {at}")
            return
        fin = ~want.isnan()
        if not torch.equal(got[fin].isinf(), want[fin].isinf()) or not torch.equal(
            got[fin][want[fin].isinf()], want[fin][want[fin].isinf()]
        ):
            bad.append(f"{name}: +-inf differs from the CPU op's")
            return
        ok = fin & ~want.isinf()
        if ok.any():
            err = ((got[ok] - want[ok]).abs() / (want[ok].abs() + 1e-3)).max().item()
            if not err <= lim:
                bad.append(f"{name}: relative error {err:.3g} > {lim:.1g}")

    check("row loss", _tensor(c["dir"] / "row_loss.out", acc, (n,)), rows, limit)
    if c["grad_s"]:
        check("student grad", _tensor(c["dir"] / "gs.out", c["dtype"], (n, v)), gs, limit * (40 if low else 1))
    for i in range(k):
        if (c["grad_t"] >> i) & 1:
            check(f"teacher {i} grad", _tensor(c["dir"] / f"gt{i}.out", tdt, (n, v)), gt[i], limit * (40 if low else 1))
        elif gt[i].numel():
            bad.append(f"teacher {i}: the CPU op wrote a gradient that was not asked for")
    return bad


def check_all(exe: Path, workdir: Path, cases: list[dict]) -> list[dict]:
    """Runs cases (JOBS at a time: each emulator process mostly waits on its barriers) that must launch, agree with
    the CPU op, and plan as their `expect` says; fails with every case that does not; returns out.txt's fields."""
    cases = [{"expect": {}, **c} for c in cases]
    with ThreadPoolExecutor(JOBS) as pool:
        runs = list(pool.map(lambda c: emulate(exe, workdir, **{k: v for k, v in c.items() if k != "expect"}), cases))
    failures = []
    for case, (info, c) in zip(cases, runs):
        wrong = [f"{key} {info[key]}, expected {value}" for key, value in case["expect"].items()
                 if info[key] != str(value)]  # fmt: skip
        if info["err"] != "0":
            wrong.insert(0, f"launch error {info['err']}")
        bad = wrong or mismatches(c)
        if bad:
            failures.append(f"{describe(c)} -> {info}:\n    " + "\n    ".join(bad))
        else:
            shutil.rmtree(c["dir"])
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    return [info for info, _ in runs]


def check_case(exe: Path, workdir: Path, expect: dict | None = None, **kw) -> dict:
    return check_all(exe, workdir, [{"expect": expect or {}, **kw}])[0]


def forced(residency: str, **kw) -> dict:
    """A case's arguments for a RESIDENCIES entry (and kw), expecting the plan to keep it."""
    case = {**RESIDENCIES[residency], **kw}
    return {**case, "expect": {"residency": case["residency"], "pipelined": int(case["pipeline"] == "on")}}


# ---- every divergence x ensemble x residency ---------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("residency", RESIDENCIES)
def test_divergence_ensemble(asan, tmp_path, residency, divergence):
    """Each ensemble, K = 3, V = 1000 (ragged: not a multiple of 8), labels with an ignored row, CE 0.3, T = 2,
    teacher weights with 0s, a sample weight 0, reduce (loss_mean: per row), gradients to the student and teachers."""
    check_all(asan, tmp_path, [forced(residency, divergence=divergence, ensemble=e, reduce=e != "loss_mean")
                               for e in ENSEMBLES])  # fmt: skip


# ---- dtypes, ragged V, row layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("residency", RESIDENCIES)
def test_dtype(asan, tmp_path, residency, dtype):
    """bf16 / fp16 / float64 (float64: global and smem, v1 only) at V = 1000, 1001 and 37 (ragged tails, a row
    shorter than one step of the block)."""
    if dtype == torch.float64 and residency not in ("global", "smem"):
        pytest.skip("float64 runs in global or smem residency, v1 (the plan never picks another)")
    check_all(asan, tmp_path, [forced(residency, v=v, k=2, dtype=dtype, divergence="jsd") for v in (1000, 1001, 37)])


@pytest.mark.parametrize("student, teacher", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                              (torch.float16, torch.bfloat16)], ids=str)  # fmt: skip
def test_mixed_dtypes_run_in_global_memory(asan, tmp_path, student, teacher):
    check_case(asan, tmp_path, {"residency": "global"}, v=513, k=2, dtype=student, teacher_dtype=teacher,
               divergence="reverse_kl", ensemble="logit_mean", residency="auto")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("residency", RESIDENCIES)
def test_unaligned_rows_and_padded_strides(asan, tmp_path, residency, dtype):
    """Rows 1, 3 or 4 elements past a 16-byte boundary and row strides 3, 4, 5 elements longer than V: the global
    kernel's 16-byte loads must fall back to scalar ones (UBSan fails a misaligned one), the resident copies too."""
    div, ens = ("reverse_kl", "logit_mean") if dtype == torch.bfloat16 else ("kl", "prob_mean")
    check_all(asan, tmp_path, [forced(residency, v=333, k=2, dtype=dtype, divergence=div, ensemble=ens, off=off,
                                      pad=pad) for off, pad in ((1, 0), (0, 3), (3, 5), (4, 4))])  # fmt: skip


# ---- options -------------------------------------------------------------------------------------------------------

OPTIONS = {
    "K=1, no weights, labels or CE": dict(k=1, divergence="skew_kl", tw=False, labels=False, ce=0.0, sw=False),
    "T=1 with CE": dict(k=1, divergence="tvd", T=1.0),
    "T=0.7, K=4, loss_mean per row": dict(k=4, divergence="skew_reverse_kl", ensemble="loss_mean", T=0.7, reduce=False),
    "pure CE (kd_scale 0)": dict(k=2, divergence="jsd", ce=1.0, kd_scale=0.0),
    "teacher grads only": dict(k=2, divergence="kl", ensemble="logit_mean", grad_s=False),
    "one of 3 teachers' grads": dict(k=3, divergence="jsd", grad_t=0b010),
    "V=5, K=16 (ranks without columns)": dict(n=3, v=5, k=16, divergence="jsd"),
}


@pytest.mark.parametrize("residency", RESIDENCIES)
def test_options(asan, tmp_path, residency):
    """K = 1 bare; T = 1 with CE (CE shares the KD normaliser); T = 0.7; pure CE; teacher gradients alone; the
    middle one of 3 teachers' gradient alone (no buffer for the others: null pointers); V = 5 with 16 teachers."""
    check_all(asan, tmp_path, [forced(residency, **{"v": 500, **case}) for case in OPTIONS.values()])


# ---- non-finite inputs ---------------------------------------------------------------------------------------------


def _padded_vocab(s, ts):  # the last 7 columns -inf in every teacher, and in the student's row 0
    for t in ts:
        t[:, -7:] = float("-inf")
    s[0, -7:] = float("-inf")


def _student_inf_where_target_has_mass(s, ts):  # KL = +inf, a finite gradient
    s[3, 10] = float("-inf")


def _nonfinite_rows(s, ts):  # a NaN, a row of -inf, a teacher's +inf: NaN rows
    s[1, 7] = float("nan")
    s[2] = float("-inf")
    ts[0][3, 0] = float("inf")


def _nonfinite_teacher_rows(s, ts):  # NaN, +inf and all -inf teacher rows: NaN rows (skew 0: logaddexp(NaN, -inf))
    ts[0][0, 3] = float("nan")
    ts[0][1, 4] = float("inf")
    ts[0][2] = float("-inf")


def _poisoned_teacher_alone(s, ts):  # K = 2: teacher 1 has weight 0 in rows 0 and 3 (_inputs), teacher 0 is poisoned
    ts[0][0, 3] = float("nan")
    ts[0][3, 4] = float("inf")


def _nan_beside_padding(s, ts):  # V = 5: a thread's only real column beside three -inf padding lanes
    s[1, 4] = float("nan")


@pytest.mark.parametrize("residency", RESIDENCIES)
def test_nonfinite(asan, tmp_path, residency):
    """A padded vocabulary (-inf columns) for every divergence, in prob_mean over 3 teachers and loss_mean over 2
    (alternately); -inf in the student where the target has mass; NaN, all -inf and +inf rows; a NaN beside padding
    lanes under pure CE; non-finite teacher rows at skew 0, and beside a teacher of weight 0: NaN and +-inf exactly
    where the CPU op has them."""
    alternate = [("prob_mean", 3), ("loss_mean", 2)] * len(DIVERGENCES)
    cases = [forced(residency, v=300, k=k, divergence=div, ensemble=ens, specials=_padded_vocab,
                    reduce=ens != "loss_mean") for div, (ens, k) in zip(DIVERGENCES, alternate)]  # fmt: skip
    cases += [forced(residency, v=300, k=1, specials=_student_inf_where_target_has_mass),
              forced(residency, v=300, k=1, divergence="jsd", specials=_nonfinite_rows, labels=False, sw=False, ce=0.0),
              forced(residency, v=5, k=1, specials=_nan_beside_padding, ce=1.0, kd_scale=0.0)]  # fmt: skip
    cases += [forced(residency, v=300, k=1, divergence=div, w=0.0, specials=_nonfinite_teacher_rows, labels=False,
                     sw=False, ce=0.0) for div in ("skew_kl", "skew_reverse_kl")]  # fmt: skip
    cases += [forced(residency, v=300, k=2, divergence=div, specials=_poisoned_teacher_alone, labels=False, ce=0.0,
                     sw=False, reduce=False) for div in ("kl", "reverse_kl")]  # fmt: skip
    check_all(asan, tmp_path, cases)


# ---- the pipelined loop, the launcher's choices, clusters ---------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3, 7])
@pytest.mark.parametrize("where", ["smem", "cluster"])
def test_pipelined_rows_skipped_and_teachers_dropped(asan, tmp_path, where, groups):
    """17 rows walked by 1, 3 or 7 row groups (uneven shares), with ignored rows, weight-0 rows and weight-0 teachers
    (never copied, never read: their shared memory stays NaN bytes) between kept ones; bf16, V ragged."""
    check_all(asan, tmp_path, [forced(f"{where}+pipe", n=17, v=411, k=3, dtype=torch.bfloat16, divergence=div,
                                      reduce=False, groups=groups) for div in ("kl", "jsd")])  # fmt: skip


@pytest.mark.parametrize("where, v, threads", [("smem", 150, 96), ("cluster", 600, 96), ("smem", 100, 96),
                                               ("cluster", 333, 96), ("smem", 1000, 384)])  # fmt: skip
def test_pipelined_threads_halved_to_whole_warps(asan, tmp_path, where, v, threads):
    """The launcher's own threads for a pipelined launch (the kernel's bound: 384): halved while the half still covers
    the slice, stopping at whole warps (96, not 48)."""
    case = forced(f"{where}+pipe", n=5, v=v, k=2, divergence="jsd", max_threads=384, threads=0, groups=3)
    assert check_all(asan, tmp_path, [case])[0]["threads"] == str(threads)


@pytest.mark.parametrize("max_threads", [512, 320])
def test_resident_v1_threads_halved(asan, tmp_path, max_threads):
    """v1 resident, the launcher's threads (bound 512, or 320: not 2^k warps): halved while the blocks the shared
    memory allows per SM would not fit the registers, and only to whole warps (320 -> 160, never 80)."""
    info = check_case(asan, tmp_path, {"residency": "smem", "pipelined": 0}, n=3, v=2000, k=2, divergence="jsd",
                      threads=0, max_threads=max_threads)  # fmt: skip
    assert int(info["threads"]) < max_threads and int(info["threads"]) % 32 == 0, info


@pytest.mark.parametrize("size", [2, 3, 8, 16])
def test_cluster_sizes(asan, tmp_path, size):
    """Clusters of 2, 3 (not a power of 2), 8 and 16 (non-portable), v1 and pipelined; V = 77: the wide ones have
    ranks without columns."""
    check_all(asan, tmp_path, [forced(where, n=3, v=77, k=2, divergence="skew_reverse_kl", cluster=size)
                               for where in ("cluster", "cluster+pipe")])  # fmt: skip


@pytest.mark.parametrize("v, k, pipeline, expect", [
    (32768, 1, "off", {"residency": "cluster", "cluster": 2, "pipelined": 0}),
    (32771, 2, "auto", {"residency": "cluster", "pipelined": 1}),
], ids=["V=32768 v1", "V=32771 auto"])  # fmt: skip
def test_benchmark_shape_class_as_the_launcher_plans_it(asan, tmp_path, v, k, pipeline, expect):
    """bf16 at the benchmark's vocabulary, residency, cluster, pipelining and threads all the launcher's choice."""
    check_case(asan, tmp_path, expect, n=3, v=v, k=k, dtype=torch.bfloat16, divergence="jsd" if k > 1 else "kl",
               residency="auto", pipeline=pipeline, threads=0, max_threads=384 if pipeline == "auto" else 512,
               groups=2)  # fmt: skip


def test_sm80_plans_without_clusters(asan, tmp_path):
    """An A100 (sm_80): the auto plan keeps the row in one block; a forced cluster is refused under strict."""
    check_case(asan, tmp_path, {"residency": "smem", "cluster": 1}, v=2000, k=2, sm=8, residency="auto")
    info, _ = emulate(asan, tmp_path, v=2000, k=2, sm=8, residency="cluster", cluster=2)
    assert (info["err"], info["dropped"]) == ("800", "residency"), info


# ---- strict launches and the launcher's errors (review findings L1, L2) -------------------------------------------

BIG = dict(n=2, v=60000, k=1)  # f32: 240 KB a row, over a block's shared memory (227 KiB)


def test_strict_forced_residency_the_row_does_not_fit_is_an_error(asan, tmp_path):
    """FASTDISTILL_CUDA_STRICT=1 with FASTDISTILL_CUDA_RESIDENCY=smem for a row one block cannot hold: an error
    (cudaErrorNotPermitted), no launch (before L1: a cluster kernel ran under the name smem)."""
    info, _ = emulate(asan, tmp_path, residency="smem", **BIG)
    assert (info["err"], info["dropped"], info["launches"]) == ("800", "residency", "0"), info


def test_forced_residency_falls_back_when_not_strict(asan, tmp_path):
    check_case(asan, tmp_path, {"residency": "cluster", "dropped": "residency"}, residency="smem", strict=0, **BIG)


def test_strict_forced_pipeline_the_plan_drops_is_an_error(asan, tmp_path):
    """Pipelining forced where it cannot be: float64 (never pipelined), a cluster of 4 whose slices fit a block once
    but not twice; not strict, the latter runs v1 and agrees."""
    info, _ = emulate(asan, tmp_path, n=2, v=100, k=1, dtype=torch.float64, residency="smem", pipeline="on")
    assert (info["err"], info["dropped"]) == ("800", "pipeline"), info
    info, _ = emulate(asan, tmp_path, residency="cluster", cluster=4, pipeline="on", **BIG)
    assert (info["err"], info["dropped"]) == ("800", "pipeline"), info
    check_case(asan, tmp_path, {"residency": "cluster", "cluster": 4, "pipelined": 0, "dropped": "pipeline"},
               residency="cluster", cluster=4, pipeline="on", strict=0, **BIG)  # fmt: skip


def test_global_fallback_of_a_forced_cluster_reports_one_block_per_row(asan, tmp_path):
    """A forced cluster of 2 whose slices do not fit: global memory, and the config says cluster 1 (what ran)."""
    check_case(asan, tmp_path, {"residency": "global", "cluster": 1, "launched_cluster": 1},
               residency="cluster", cluster=2, strict=0, n=2, v=120000, k=1)  # fmt: skip


def test_static_shared_memory_past_the_plans_margin_falls_back(asan, tmp_path):
    """The plan leaves 1 KiB of a block's shared memory for the kernel's static bytes; should ptxas give it more, the
    resident block does not fit: strict, the fallback's error (800, before: cudaFuncSetAttribute's "invalid argument",
    1); otherwise global memory, which agrees."""
    big_static = 232448 - 8192  # sm_90's opt-in minus 8 KiB: the header fits beside it, the 16 KB row does not
    info, _ = emulate(asan, tmp_path, v=1000, k=3, residency="smem", static_smem=big_static)
    assert (info["err"], info["launches"]) == ("800", "0"), info
    check_case(asan, tmp_path, {"launches": 1}, v=1000, k=3, strict=0, static_smem=big_static)


def test_a_cluster_the_device_cannot_hold(asan, tmp_path):
    """cudaOccupancyMaxActiveClusters says 0: strict is an error; otherwise v1, then global memory, which agrees."""
    info, _ = emulate(asan, tmp_path, v=600, k=2, residency="cluster", cluster=4, occupancy_clusters=0)
    assert (info["err"], info["launches"]) == ("800", "0"), info
    check_case(asan, tmp_path, {"launched_cluster": 1}, v=600, k=2, residency="cluster", cluster=4, pipeline="on",
               occupancy_clusters=0, strict=0)  # fmt: skip


def test_an_earlier_uncleared_error_is_not_this_launchs(asan, tmp_path):
    """L2: a launch that succeeded reports success, whatever error an earlier runtime call left for
    cudaGetLastError."""
    check_case(asan, tmp_path, {"launches": 1}, n=3, v=100, k=1, stale_error=1)


# ---- racecheck ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residency", ["cluster", "cluster+pipe", "smem+pipe"])
def test_racecheck(tsan, tmp_path, residency):
    """ThreadSanitizer over the paths with the most barriers: cluster reductions through distributed shared memory
    (v1 and pipelined), the pipelined loop's two buffers; a closed-form and a two-sweep divergence, each ensemble."""
    pairs = (("kl", "prob_mean"), ("jsd", "logit_mean"), ("jsd", "loss_mean"))
    check_all(tsan, tmp_path, [forced(residency, divergence=d, ensemble=e, reduce=e != "loss_mean") for d, e in pairs])


@pytest.mark.parametrize("where", ["smem", "cluster"])
def test_racecheck_pipelined_skipped_rows(tsan, tmp_path, where):
    """Skipped rows and dropped teachers between kept ones, 3 groups over 11 rows: the copies the loop does not
    issue and the barriers it still meets."""
    check_case(tsan, tmp_path, **forced(f"{where}+pipe", n=11, v=411, k=3, dtype=torch.bfloat16, divergence="jsd",
                                        reduce=False, groups=3))  # fmt: skip


def test_racecheck_cluster_of_16(tsan, tmp_path):
    check_case(tsan, tmp_path, **forced("cluster+pipe", n=3, v=77, k=2, divergence="tvd", cluster=16))


# ---- controls: the checks can fail ---------------------------------------------------------------------------------


def test_control_racecheck_reports_a_missing_barrier(tsan, tmp_path):
    """Every thread skips one of its __syncthreads (the emulator's switch, no rebuild): the third, one of the first
    block reduction's, then the next ones. ThreadSanitizer must report the race that opens. (Its shadow memory keeps a
    few accesses a word, and 64 threads read the reductions' results: on a busy machine a run can miss the race.)"""
    reports = []
    for skip in (3, 4, 5, 6):
        _, c = emulate(tsan, tmp_path, allow_failure=True, n=3, k=2, divergence="jsd", skip_sync=skip,
                       **RESIDENCIES["smem"])  # fmt: skip
        if c["rc"] != 0 and "ThreadSanitizer: data race" in c["stderr"]:
            return
        reports.append(f"skip {skip}: rc {c['rc']} {c['stderr'][-500:]}")
    pytest.fail("no race reported without a barrier:\n" + "\n".join(reports))


@pytest.mark.parametrize("residency", ["cluster", "cluster+pipe"])
def test_control_a_block_leaving_before_its_peers_read_is_reported(tsan, tmp_path, residency):
    """Every thread skips its last cluster.sync() (the one that keeps a block's shared memory alive until its peers'
    distributed reads are done): the emulator frees (poisons) a block's shared memory when its last thread exits, as
    a GPU does, so ThreadSanitizer must report the race, or the peers read NaN."""
    case = dict(n=3, k=2, divergence="jsd", **RESIDENCIES[residency])
    info, _ = emulate(tsan, tmp_path, **case)
    last = int(info["cluster_syncs"])
    assert last > 0, info
    reports = []
    for _ in range(3):  # (TSan's shadow keeps a few accesses a word: on a busy machine a run can miss the race)
        info, c = emulate(tsan, tmp_path, allow_failure=True, skip_cluster_sync=last, **case)
        if (c["rc"] != 0 and "ThreadSanitizer: data race" in c["stderr"]) or (info and mismatches(c)):
            return
        reports.append(f"rc {c['rc']} {c['stderr'][-500:]}")
    pytest.fail("a block left before its peers' reads, unreported:\n" + "\n".join(reports))


def test_control_comparison_sees_a_small_exp_error(asan, tmp_path):
    """ex2.approx's argument off by 1e-3 relative (the emulator's switch): the comparison with the CPU op must fail."""
    info, c = emulate(asan, tmp_path, divergence="jsd", ex2_bias=1e-3, **RESIDENCIES["smem"])
    assert info["err"] == "0" and mismatches(c), "a 1e-3 error in exp went unnoticed"


def test_control_misaligned_vector_load_is_reported(asan):
    """The kernel's 16-byte load (load_vec with `whole`) of a row 4 bytes off alignment: UBSan must stop it."""
    r = subprocess.run([str(asan), "--misaligned-load"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **ENV})  # fmt: skip
    assert r.returncode != 0 and "misaligned address" in r.stderr, (r.returncode, r.stderr[-2000:])
