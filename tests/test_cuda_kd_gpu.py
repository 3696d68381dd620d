"""The CUDA C++ kd_loss kernel (csrc/cuda) on a GPU, against the float64 reference (skipped without CUDA).

Written before any GPU ran it (issue 20): each test names the shape class and residency it checks, so a first run
says which part of the kernel is wrong. Residencies are forced through FASTDISTILL_CUDA_RESIDENCY (the binding
reads it at every call): ``global`` (the fallback), ``smem`` (the row in one block's shared memory) and ``cluster``
(the row spread over a thread-block cluster, sm_90 only), each resident one as v1 (a block or cluster per row) and
pipelined (``+pipe``: a persistent grid whose blocks copy their next row while computing this one; limited here to
two row groups, FASTDISTILL_CUDA_GROUPS, so that every block loops over many rows and both of its buffers)."""

import pytest
import torch
from conftest import (
    DIVERGENCES,
    ENSEMBLES,
    every_option_case,
    loss_and_grads,
    make_inputs,
    reference64,
    stacked_trained_peak,
)
from tolerances import assert_close

import fastdistill
from fastdistill.ops import extension

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RESIDENCIES = ["global", "smem", "cluster", "smem+pipe", "cluster+pipe"]


def _skip_unavailable(residency: str) -> None:
    if residency.startswith("cluster") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")


def force_residency(monkeypatch, residency: str, groups: int = 2) -> None:
    """FASTDISTILL_CUDA_* for one of RESIDENCIES (the binding reads them at every call); strict: a configuration the
    GPU cannot hold fails instead of falling back to another kernel, so each test checks the kernel it names."""
    where, _, pipe = residency.partition("+")
    monkeypatch.setenv("FASTDISTILL_CUDA_STRICT", "1")
    monkeypatch.setenv("FASTDISTILL_CUDA_RESIDENCY", where)
    monkeypatch.setenv("FASTDISTILL_CUDA_PIPELINE", "1" if pipe else "0")
    monkeypatch.setenv("FASTDISTILL_CUDA_GROUPS", str(groups) if pipe else "")
    if where == "cluster":
        monkeypatch.setenv("FASTDISTILL_CUDA_CLUSTER", "4")  # small rows still spread over 4 blocks


@pytest.fixture
def residency(request, monkeypatch):
    _skip_unavailable(request.param)
    force_residency(monkeypatch, request.param)
    return request.param


def _cuda(x):
    return x.cuda() if isinstance(x, torch.Tensor) else x


def test_the_cuda_kernel_is_built():
    """On a GPU machine the extension must carry the CUDA kernel (else every other test here is moot)."""
    assert extension.available(), extension.IMPORT_ERROR
    assert extension.has_kernel("kd_loss", "CUDA"), "fastdistill._C was built without csrc/cuda (setup.py's switch)"


@pytest.mark.parametrize("residency", RESIDENCIES, indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("ensemble", ENSEMBLES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix_against_float64(residency, divergence, ensemble, reduction):
    """Every divergence and ensemble, K = 3, labels with ignored rows, CE, teacher and sample weights, T = 2,
    gradients to the student and the teachers, grad_output != 1; V = 1000 (not a multiple of 8: ragged tails)."""
    student, teachers, kw, go = every_option_case(divergence, ensemble, reduction)
    ref_loss, ref_grads = reference64(student, teachers, go, True, **kw)
    loss, grads = loss_and_grads(student.cuda(), [t.cuda() for t in teachers], go.cuda(), True, backend="cuda",
                                 **{k: _cuda(v) for k, v in kw.items()})  # fmt: skip
    assert_close(loss, ref_loss, torch.float32, "loss", f"loss ({residency})")
    for name, g, r in zip(["student", "teacher 0", "teacher 1", "teacher 2"], grads, ref_grads):
        assert_close(g, r, torch.float32, "grad", f"grad {name} ({residency})")


@pytest.mark.parametrize("residency", RESIDENCIES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(residency, dtype):
    if dtype == torch.float64 and (residency.startswith("cluster") or "pipe" in residency):
        pytest.skip("float64 runs in global or smem residency, v1")
    student, teachers = make_inputs((16,), 4099, 2, dtype=dtype)
    ref_loss, ref_grads = reference64(student, teachers, None, True, temperature=1.5)
    loss, grads = loss_and_grads(student.cuda(), [t.cuda() for t in teachers], None, True, backend="cuda",
                                 temperature=1.5)  # fmt: skip
    assert grads[0].dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss", f"loss {dtype} ({residency})")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, dtype, "grad", f"grad {dtype} ({residency})")


def test_mixed_dtypes_run_in_global_memory():
    student, _ = make_inputs((8,), 513, 1, dtype=torch.bfloat16)
    _, teachers = make_inputs((8,), 513, 2, dtype=torch.float32)
    ref_loss, ref_grads = reference64(student, teachers, None, False)
    loss, grads = loss_and_grads(student.cuda(), [t.cuda() for t in teachers], None, False, backend="cuda")
    assert_close(loss, ref_loss, torch.bfloat16, "loss")
    assert_close(grads[0], ref_grads[0], torch.bfloat16, "grad")


# the shape classes of issue 20: (name, rows, vocab, teachers)
SHAPE_CLASSES = [
    ("fits one SM: V=32768 K=1", 64, 32768, 1),
    ("needs a cluster: V=128256 K=4", 16, 128256, 4),
    ("needs a cluster: V=128256 K=1", 32, 128256, 1),
    ("ragged V=32771 K=2", 32, 32771, 2),
    ("tiny V=5 K=8", 64, 5, 8),
    ("K=8 V=4096", 32, 4096, 8),
]


@pytest.mark.parametrize("pipeline", ["", "0"], ids=["auto", "v1"])
@pytest.mark.parametrize("name, n, v, k", SHAPE_CLASSES, ids=[c[0] for c in SHAPE_CLASSES])
def test_shape_classes_bf16_auto_residency(monkeypatch, name, n, v, k, pipeline):
    """bf16 at the launcher's own choice of residency (auto: pipelined where the row needs a cluster on sm_90), and
    the same with pipelining off (v1): loss and student gradient against float64."""
    monkeypatch.setenv("FASTDISTILL_CUDA_PIPELINE", pipeline)
    name = f"{name}, {'v1' if pipeline else 'auto'}"
    student, teachers = make_inputs((n,), v, k, dtype=torch.bfloat16)
    ref_loss, ref_grads = reference64(student, teachers, None, False, temperature=2.0, reduction="none")
    loss, grads = loss_and_grads(student.cuda(), [t.cuda() for t in teachers], None, False, backend="cuda",
                                 temperature=2.0, reduction="none")  # fmt: skip
    assert_close(loss, ref_loss, torch.bfloat16, "loss", f"loss [{name}]")
    assert_close(grads[0], ref_grads[0], torch.bfloat16, "grad", f"grad [{name}]")


@pytest.mark.parametrize("groups", [1, 3, 7])
@pytest.mark.parametrize("where", ["smem", "cluster"])
def test_pipelined_rows_skipped_and_dropped_between_kept_ones(monkeypatch, where, groups):
    """The pipelined kernel copies row r + groups while it computes row r, deciding from global memory what to copy:
    ignored rows, weight-0 rows and weight-0 teachers (never copied, never read) interleaved with kept rows, over
    41 rows that 1, 3 or 7 groups walk (uneven shares), V ragged (4099), two-sweep and closed-form divergences. Each
    row's loss and every gradient against float64."""
    _skip_unavailable(where)
    force_residency(monkeypatch, f"{where}+pipe", groups)
    n, v, k = 41, 4099, 3
    student, teachers = make_inputs((n,), v, k, dtype=torch.bfloat16)
    labels = torch.randint(0, v, (n,))
    labels[1::5] = -100
    sw = torch.rand(n) + 0.5
    sw[2::7] = 0.0
    tw = torch.rand(k, n) + 0.1
    tw[0, 3::4] = 0.0
    tw[2, ::3] = 0.0
    for divergence in ("kl", "jsd"):
        kw = dict(divergence=divergence, temperature=2.0, labels=labels, ce_weight=0.3, sample_weight=sw,
                  teacher_weights=tw / tw.sum(0), reduction="none")  # fmt: skip
        ref_loss, ref_grads = reference64(student, teachers, None, True, **kw)
        loss, grads = loss_and_grads(student.cuda(), [t.cuda() for t in teachers], None, True, backend="cuda",
                                     **{a: _cuda(b) for a, b in kw.items()})  # fmt: skip
        what = f"{where}+pipe, {groups} groups, {divergence}"
        assert_close(loss, ref_loss, torch.bfloat16, "loss", f"loss ({what})")
        for name, g, r in zip(["student", "teacher 0", "teacher 1", "teacher 2"], grads, ref_grads):
            assert_close(g, r, torch.bfloat16, "grad", f"grad {name} ({what})")


@pytest.mark.parametrize("where, v", [("smem", 150), ("cluster", 600), ("smem", 100), ("cluster", 333)])
def test_pipelined_short_slices_use_whole_warps(monkeypatch, where, v):
    """Slices of 129-192 columns (V = 150 in one block, V = 600 over a cluster of 4): the launcher shortens the block
    of a pipelined launch to what the slice needs, and must stop at whole warps (96 threads, not 48, whose second,
    partial warp's sums would be dropped); and shorter slices (100, 84 columns)."""
    _skip_unavailable(where)
    force_residency(monkeypatch, f"{where}+pipe", 3)
    student, teachers = make_inputs((20,), v, 2)
    ref_loss, ref_grads = reference64(student, teachers, None, False, divergence="jsd", reduction="none")
    loss, grads = loss_and_grads(student.cuda(), [t.cuda() for t in teachers], None, False, backend="cuda",
                                 divergence="jsd", reduction="none")  # fmt: skip
    assert_close(loss, ref_loss, torch.float32, "loss", f"loss ({where}+pipe, V={v})")
    assert_close(grads[0], ref_grads[0], torch.float32, "grad", f"grad ({where}+pipe, V={v})")


def test_past_2_to_the_31_elements():
    """N V > 2^31 within one tensor (the student, each teacher, the gradient: int64 offsets; the teachers reach the
    kernel one pointer each, so N V K alone would not test it): rows far into the tensors agree with the reference
    computed on those rows."""
    n, v, k = 17000, 131072, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16)
    ts = torch.randn(k, n, v, device="cuda", generator=g, dtype=torch.bfloat16)
    assert n * v > 2**31
    rows = fastdistill.kd_loss(s, ts, reduction="none", backend="cuda")
    pick = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    ref = fastdistill.kd_loss(s[pick].double(), ts[:, pick].double(), reduction="none", backend="reference")
    assert_close(rows[pick], ref, torch.bfloat16, "loss", "far rows")


@pytest.mark.parametrize("residency", RESIDENCIES, indirect=True)
def test_bitwise_reproducible(residency):
    # V = 12000, K = 2: two copies of the row fit one block (smem+pipe runs as named)
    student, teachers = make_inputs((64,), 12000, 2, dtype=torch.bfloat16)
    s, ts = student.cuda(), [t.cuda() for t in teachers]
    a = loss_and_grads(s, ts, None, True, backend="cuda")
    b = loss_and_grads(s, ts, None, True, backend="cuda")
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.mark.parametrize("residency", RESIDENCIES, indirect=True)
def test_nonfinite_rows_are_nan_not_errors(residency):
    student, teachers = make_inputs((4,), 300, 1)
    student[1, 7] = float("nan")
    student[2] = float("-inf")
    teachers[0][3, 0] = float("inf")
    rows = fastdistill.kd_loss(student.cuda(), [t.cuda() for t in teachers], reduction="none", backend="cuda")
    assert torch.isfinite(rows[0]) and rows[1:].isnan().all()


@pytest.mark.parametrize("residency", RESIDENCIES, indirect=True)
def test_nan_alone_in_a_thread_group_with_padding(residency):
    """V = 5: the last column is a thread's only real one beside three padding lanes (-inf); a NaN there must make
    the normaliser NaN (a max that skips NaN would lose it), for the KD term and for pure cross-entropy."""
    student, teachers = make_inputs((3,), 5, 1)
    student[1, 4] = float("nan")
    labels = torch.tensor([0, 1, 2], device="cuda")
    s, ts = student.cuda(), [t.cuda() for t in teachers]
    for kw in ({}, {"labels": labels, "ce_weight": 1.0}):
        rows = fastdistill.kd_loss(s, ts, reduction="none", backend="cuda", **kw)
        assert torch.isfinite(rows[[0, 2]]).all() and rows[1].isnan(), kw


def test_out_of_range_label_through_the_op_is_nan_loss_and_gradient():
    """The functional API rejects it first; a direct op call gets NaN for that row's loss and gradients (the cpu
    kernel raises), never a finite gradient without its label term."""
    student, teachers = make_inputs((3,), 50, 1)
    labels = torch.tensor([1, 99, 2], device="cuda")
    loss, gs, _ = torch.ops.fastdistill.kd_loss(student.cuda(), [teachers[0].cuda()], None, labels, None, None, "kl",
                                                "prob_mean", 1.0, 0.5, 0.5, [], -100, False, True, 0)  # fmt: skip
    assert loss[1].isnan() and gs[1].isnan().all() and torch.isfinite(gs[[0, 2]]).all()


def test_ignored_and_zero_weight_rows_have_zero_gradient():
    student, teachers = make_inputs((6,), 777, 2)
    labels = torch.tensor([1, -100, 3, -100, 5, 6])
    sw = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 2.0])
    loss, grads = loss_and_grads(student.cuda(), [t.cuda() for t in teachers], None, True, backend="cuda",
                                 labels=labels.cuda(), ce_weight=0.5, sample_weight=sw.cuda())  # fmt: skip
    for g in grads:
        assert (g[[1, 2, 3]] == 0).all()
    ref_loss, _ = reference64(student, teachers, None, True, labels=labels, ce_weight=0.5, sample_weight=sw)
    assert_close(loss, ref_loss, torch.float32, "loss")


def test_compile_traces_into_the_cuda_kernel():
    student, teachers = make_inputs((8,), 300, 2)
    s, stacked = student.cuda(), torch.stack(teachers).cuda()
    fn = torch.compile(lambda a, t: fastdistill.kd_loss(a, t, divergence="jsd", backend="cuda"), fullgraph=True)
    a = s.clone().requires_grad_()
    fn(a, stacked).backward()
    b = s.clone().requires_grad_()
    fastdistill.kd_loss(b, stacked, divergence="jsd", backend="cuda").backward()
    assert_close(a.grad, b.grad, torch.float32, "grad", "compiled grad")


@pytest.mark.parametrize("v", [300, 301])  # 301: rows and teachers' slices of the one buffer off 16-byte alignment
def test_stacked_trained_teachers_get_one_gradient_from_the_kernel(v):
    """A stacked [K, N, V] teacher tensor is one input of the cuda op: trained, its one [K, N, V] gradient is the
    kernel's (teacher k's rows a slice of it), equal to the float64 reference, eagerly and compiled; opcheck on the
    op with all bits and with none."""
    student, teachers = make_inputs((7,), v, 3)
    g = torch.rand(7) + 0.5
    kw = dict(divergence="jsd", ensemble="logit_mean", temperature=2.0, reduction="none", backend="cuda")
    ref_loss, ref = reference64(student, teachers, g.double(), True, **kw)
    for compiled in (False, True):
        s = student.cuda().requires_grad_()
        t = torch.stack(teachers).cuda().requires_grad_()
        fn = lambda a, b: fastdistill.kd_loss(a, b, **kw)  # noqa: E731
        loss = (torch.compile(fn, fullgraph=True) if compiled else fn)(s, t)
        loss.backward(g.cuda())
        assert_close(loss, ref_loss, torch.float32, "loss", f"compiled={compiled}")
        assert_close(t.grad, torch.stack(ref[1:]), torch.float32, "grad", f"compiled={compiled}")
        assert_close(s.grad, ref[0], torch.float32, "grad", f"compiled={compiled}")
    flat = torch.stack(teachers).reshape(3, 7, v).cuda()
    for mask in (0b111, 0):
        args = (student.cuda().requires_grad_(), [flat.clone().requires_grad_(mask != 0)], None, None, None, None,
                "jsd", "logit_mean", 2.0, 4.0, 0.0, [0.5], -100, False, True, mask)  # fmt: skip
        torch.library.opcheck(torch.ops.fastdistill.kd_loss.default, args)


def test_stacked_trained_teachers_peak_is_the_gradients():
    """Forward + backward with K = 4 stacked trained teachers allocate the gradients only (conftest's
    stacked_trained_peak; the unbind route this replaced re-stacked K [N, V] gradients: +512 MiB)."""
    extra, grads = stacked_trained_peak("cuda")
    assert extra <= 1.1 * grads + 16 * 2**20, f"{extra / 2**20:.1f} MiB, gradients {grads / 2**20:.0f} MiB"


def test_opcheck_cuda():
    student, teachers = make_inputs((5,), 130, 2)
    args = (student.cuda(), [t.cuda() for t in teachers], None, None, None, None, "kl", "prob_mean", 2.0, 4.0, 0.0,
            [], -100, True, True, 0)  # fmt: skip
    torch.library.opcheck(torch.ops.fastdistill.kd_loss.default, args)
