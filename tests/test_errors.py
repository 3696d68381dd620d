"""Every bad input of SPEC §1 "Errors" raises ValueError/TypeError naming the argument, on every backend."""

import math

import pytest
import torch
from conftest import CPU_BACKENDS, make_inputs

import fastdistill

S, TS = make_inputs((4, 3), 10, 2)
LABELS = torch.randint(0, 10, (4, 3))


def _call(backend, student=S, teachers=TS, **kw):
    return fastdistill.kd_loss(student, teachers, backend=backend, **kw)


CASES = [
    # (id, exception, message regex, kwargs for _call)
    ("student-not-tensor", TypeError, "student_logits must be a Tensor", dict(student=[[1.0]])),
    ("student-int", TypeError, "student_logits must be float32", dict(student=torch.ones(4, 3, 10, dtype=torch.long))),
    ("student-0dim", ValueError, "student_logits must have shape", dict(student=torch.tensor(1.0))),
    ("student-v0", ValueError, "V = 0 classes", dict(student=torch.zeros(4, 3, 0), teachers=torch.zeros(4, 3, 0))),
    ("teachers-empty-list", ValueError, "K >= 1", dict(teachers=[])),
    ("teachers-k0", ValueError, "K = 0", dict(teachers=torch.empty(0, 4, 3, 10))),
    ("teachers-not-tensor", TypeError, "teacher_logits must be a Tensor", dict(teachers=3.0)),
    ("teachers-bad-shape", ValueError, r"teacher_logits must be \[\*, V\]", dict(teachers=torch.zeros(5, 7))),
    ("teacher-vocab-larger", ValueError, r"vocabulary size 12 .* has 10; slice the teacher.*\[\.\.\., :10\]",
     dict(teachers=torch.zeros(4, 3, 12))),
    ("teacher-vocab-smaller-stacked", ValueError, "vocabulary size 8 but student_logits has 10; slice the student",
     dict(teachers=torch.zeros(2, 4, 3, 8))),
    ("teacher-list-vocab", ValueError, r"teacher_logits\[1\] has vocabulary size 11",
     dict(teachers=[TS[0], torch.zeros(4, 3, 11)])),
    ("teacher-list-shape", ValueError, r"teacher_logits\[0\] has shape", dict(teachers=[torch.zeros(4, 2, 10)])),
    ("teacher-int", TypeError, r"teacher_logits\[0\] must be float32", dict(teachers=[TS[0].long()])),
    ("temperature-zero", ValueError, "temperature must be finite and in", dict(temperature=0.0)),
    ("temperature-negative", ValueError, "temperature", dict(temperature=-1.0)),
    ("temperature-inf", ValueError, "temperature", dict(temperature=math.inf)),
    ("temperature-nan", ValueError, "temperature", dict(temperature=math.nan)),
    ("temperature-str", TypeError, "temperature must be a real number", dict(temperature="2")),
    ("beta-0", ValueError, "beta", dict(divergence="jsd", beta=0.0)),
    ("beta-1", ValueError, "beta", dict(divergence="jsd", beta=1.0)),
    ("skew-1", ValueError, "skew", dict(divergence="skew_kl", skew=1.0)),
    ("skew-negative", ValueError, "skew", dict(divergence="skew_kl", skew=-0.1)),
    ("divergence", ValueError, "divergence must be one of", dict(divergence="kld")),
    ("ensemble", ValueError, "ensemble must be one of", dict(ensemble="mean")),
    ("reduction", ValueError, "reduction must be one of", dict(reduction="avg")),
    ("ce-weight-range", ValueError, "ce_weight", dict(labels=LABELS, ce_weight=1.5)),
    ("ce-weight-needs-labels", ValueError, "ce_weight > 0 needs labels", dict(ce_weight=0.5)),
    ("labels-shape", ValueError, r"labels must have shape \(4, 3\)", dict(labels=torch.zeros(4, dtype=torch.long))),
    ("labels-dtype", TypeError, "labels must be int64", dict(labels=LABELS.int())),
    ("labels-float", TypeError, "labels must be int64", dict(labels=LABELS.float())),
    ("labels-range-high", ValueError, r"labels must be in \[0, 10\) or ignore_index",
     dict(labels=torch.full((4, 3), 10), ce_weight=0.5)),
    ("labels-range-negative", ValueError, "labels must be in", dict(labels=torch.full((4, 3), -1), ce_weight=0.5)),
    ("sample-weight-shape", ValueError, "sample_weight must have shape", dict(sample_weight=torch.ones(12))),
    ("sample-weight-negative", ValueError, "sample_weight must be finite and >= 0",
     dict(sample_weight=-torch.ones(4, 3))),
    ("sample-weight-nan", ValueError, "sample_weight must be finite",
     dict(sample_weight=torch.full((4, 3), math.nan))),
    ("sample-weight-int", TypeError, "sample_weight must be a floating-point",
     dict(sample_weight=torch.ones(4, 3).long())),
    ("teacher-weights-shape", ValueError, r"teacher_weights must be \[K\] = \[2\]",
     dict(teacher_weights=torch.ones(3))),
    ("teacher-weights-per-row-shape", ValueError, "teacher_weights must be", dict(teacher_weights=torch.ones(2, 4))),
    ("teacher-weights-negative", ValueError, "teacher_weights must be finite and >= 0",
     dict(teacher_weights=[1.0, -1.0])),
    ("teacher-weights-inf", ValueError, "teacher_weights must be finite", dict(teacher_weights=[1.0, math.inf])),
    ("teacher-weights-zero-row", ValueError, "positive in every row", dict(teacher_weights=[0.0, 0.0])),
    ("teacher-weights-type", TypeError, "teacher_weights must be", dict(teacher_weights="uniform")),
    ("num-items-with-sum", ValueError, "num_items overrides the 'mean' denominator",
     dict(reduction="sum", num_items=3)),
    ("num-items-negative", ValueError, "num_items must be (finite and )?>= 0", dict(num_items=-1)),
    ("num-items-negative-tensor", ValueError, "num_items must be (finite and )?>= 0", dict(num_items=torch.tensor(-3))),
    ("num-items-float", TypeError, "num_items must be an int", dict(num_items=2.5)),
    ("num-items-shape", ValueError, "num_items must be an int or a 0-dim Tensor", dict(num_items=torch.ones(2))),
    ("backend", ValueError, "backend must be one of", dict(backend_override="fast")),
    ("ignore-index-type", TypeError, "ignore_index must be an int", dict(ignore_index=1.5)),
    ("scale-t2-type", TypeError, "scale_by_temperature_sq must be a Python bool", dict(scale_by_temperature_sq=1)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("exc,match,kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(backend, exc, match, kw):
    kw = dict(kw)
    if "backend_override" in kw:
        backend = kw.pop("backend_override")
    with pytest.raises(exc, match=match):
        _call(backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_device_mismatch(backend):
    meta = torch.empty(4, 3, 10, device="meta")
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] is on meta but student_logits is on cpu"):
        _call(backend, teachers=meta)
    with pytest.raises(ValueError, match="labels is on meta"):
        _call(backend, labels=torch.empty(4, 3, dtype=torch.long, device="meta"))


def test_explicit_backend_that_cannot_run():
    """A named backend that cannot run the inputs raises with its reasons (meta tensors: no backend runs them; the
    environment is left alone, since Triton reads TRITON_INTERPRET once)."""
    meta_s, meta_t = torch.empty(4, 3, 10, device="meta"), torch.empty(4, 3, 10, device="meta")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: .*needs all tensors on cuda"):
        fastdistill.kd_loss(meta_s, meta_t, backend="triton")
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run these inputs: .*needs all tensors on cpu"):
        fastdistill.kd_loss(meta_s, meta_t, backend="cpu")
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run these inputs: .*(without cuda|tensors on cuda)"):
        _call("cuda")


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        fastdistill.KDLoss(temperature=0)
    with pytest.raises(ValueError, match="divergence"):
        fastdistill.KDLoss(divergence="l2")


def test_entirely_neg_inf_row():
    """A row with no finite logit is not a distribution: NaN in that row on every backend (a GPU kernel cannot
    raise; log_softmax gives NaN too), the other rows untouched. tests/test_nonfinite.py has the full matrix."""
    s, ts = make_inputs((3,), 5, 1)
    ts[0][1] = -math.inf
    backends = ["reference"] + (["cpu"] if fastdistill.extension_available() else [])
    for backend in backends:
        loss = fastdistill.kd_loss(s, ts, backend=backend, reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), backend
