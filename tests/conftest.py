import importlib.util
import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen before the kernels
# are defined (first import of fastdistill.ops.triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdistill  # noqa: E402
from fastdistill.ops import divergences  # noqa: E402

DIVERGENCES = divergences.NAMES
ENSEMBLES = ("prob_mean", "logit_mean", "loss_mean")
REDUCTIONS = ("mean", "sum", "batchmean", "none")

requires_ext = pytest.mark.skipif(not fastdistill.extension_available(), reason="fastdistill._C is not built")
requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="triton is not installed, or runs compiled (GPU): see test_triton_gpu.py",
)
# Backends compared with the float64 reference on CPU tensors ("triton" in its interpreter when there is no GPU;
# on a GPU machine tests/test_triton_gpu.py runs it on CUDA tensors). "reference" in float32 is checked this way too.
CPU_BACKENDS = [pytest.param("cpu", marks=requires_ext), "reference", pytest.param("triton", marks=requires_triton)]
# kd_loss's: the Triton kernel twice in the interpreter, with its rows cut into chunks of one 16-column tile (so the
# tests' small V spans several chunks: the row-split path of v3) and with one program per row and 1024-column tiles
# (FASTDISTILL_TRITON_ROW=v2: masked lanes, the path of C = 1), by the row_kernel marker (_triton_row_kernel below)
KD_BACKENDS = [*CPU_BACKENDS, pytest.param("triton", marks=[requires_triton, pytest.mark.row_kernel("v2")],
                                           id="triton-v2")]  # fmt: skip

# FASTDISTILL_TEST_FULL=1 (make test-full): the whole matrices where `make test` runs a covering part of them on the
# slow paths (Triton's interpreter, the sm_90/sm_80 compile of every Triton configuration): CI's 2 cores, cold caches.
FULL = os.environ.get("FASTDISTILL_TEST_FULL") == "1"


def covered(backend: str, *switches: tuple[int, int]) -> bool:
    """Whether a test matrix runs this case for ``backend``: every case on the cpu and reference backends (and under
    FULL), and on Triton's interpreter a Latin-square slice of it, ``switches`` given as (index, count): the last
    switch's index must be the sum of the others' modulo its count. Every value of each switch, and every pair of
    values of the last switch with any other, still occurs."""
    if FULL or backend != "triton":
        return True
    *rest, (last, count) = switches
    return last == sum(i for i, _ in rest) % count


def matrix_params(backends, *axes: tuple[str, tuple]) -> list:
    """pytest params over ``axes`` (name, values) x ``backends`` (KD_BACKENDS-like), thinned by ``covered`` with the
    last axis as the one thinned; ids and marks as @pytest.mark.parametrize would give."""
    out = []
    for combo in itertools.product(*(range(len(vals)) for _, vals in axes)):
        values = [vals[i] for (_, vals), i in zip(axes, combo)]
        for b in backends:
            name, marks, bid = (b.values[0], b.marks, b.id) if hasattr(b, "values") else (b, (), None)
            if covered(name, *((i, len(vals)) for (_, vals), i in zip(axes, combo))):
                out.append(pytest.param(*values, name, marks=marks, id="-".join([*map(str, values), bid or name])))
    return out


@pytest.fixture(autouse=True)
def _triton_row_kernel(request, monkeypatch):
    """Triton's interpreter: chunked rows of narrow tiles by default, one program per row where a test is marked
    row_kernel("v2") (see KD_BACKENDS)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        yield
        return
    from fastdistill.ops.triton import kd_loss

    marker = request.node.get_closest_marker("row_kernel")
    if marker is not None and marker.args[0] == "v2":
        monkeypatch.setenv(kd_loss.ROW_KERNEL_ENV, "v2")
    else:
        monkeypatch.setattr(kd_loss, "INTERPRET_BLOCK", 16)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(lead=(7,), vocab=33, k=3, dtype=torch.float32, teacher_dtype=None, scale=3.0, seed=0):
    """Random student [*lead, V] and K teachers (a list), on CPU, leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(*lead, vocab, generator=g, dtype=torch.float64)).to(dtype)
    ts = [
        (scale * torch.randn(*lead, vocab, generator=g, dtype=torch.float64)).to(teacher_dtype or dtype)
        for _ in range(k)
    ]
    return s, ts


def loss_and_grads(student, teachers, grad_output=None, teacher_grad=False, **kw):
    """kd_loss and its gradients w.r.t. student (and teachers), on fresh leaf copies of the inputs."""
    s = student.detach().clone().requires_grad_(True)
    ts = [t.detach().clone().requires_grad_(teacher_grad) for t in teachers]
    loss = fastdistill.kd_loss(s, ts, **kw)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    # materialize_grads: an input the loss does not use (teachers at ce_weight = 1) has a zero gradient
    grads = torch.autograd.grad(loss, [s, *ts] if teacher_grad else [s], grad_output.to(loss.dtype),
                                materialize_grads=True)  # fmt: skip
    return loss, grads


def reference64(student, teachers, grad_output=None, teacher_grad=False, **kw):
    """The float64 reference on the same (already rounded) inputs."""
    kw = {**kw, "backend": "reference"}
    return loss_and_grads(student.double(), [t.double() for t in teachers], grad_output, teacher_grad, **kw)


def stacked_trained_peak(backend: str) -> tuple[int, int]:
    """(bytes: the extra peak of kd_loss forward + backward on CUDA, bytes of the gradients) for bf16, N = 2048,
    V = 32768 and K = 4 stacked teachers trained (the gradients: the student's [N, V] and the teachers' one
    [K, N, V], 640 MiB). Measured on a second call, the first having compiled and warmed up the kernels."""
    n, v, k = 2048, 32768, 4
    gen = torch.Generator(device="cuda").manual_seed(11)
    s = (3 * torch.randn(n, v, device="cuda", generator=gen)).bfloat16().requires_grad_()
    t = (3 * torch.randn(k, n, v, device="cuda", generator=gen)).bfloat16().requires_grad_()
    for _ in range(2):  # the second call is measured
        s.grad = t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fastdistill.kd_loss(s, t, divergence="jsd", temperature=2.0, backend=backend).backward()
        torch.cuda.synchronize()
    assert t.grad.shape == t.shape and s.grad.shape == s.shape
    return torch.cuda.max_memory_allocated() - before, (k + 1) * n * v * s.element_size()


def every_option_case(divergence: str, ensemble: str, reduction: str):
    """(student, teachers, kd_loss keywords, grad_output) exercising every option at once, on CPU: K = 3 over
    [3, 7] rows, V = 1000 (not a multiple of 8: ragged tails), labels with ignored rows, CE, teacher and sample
    weights, T = 2, grad_output != 1. The GPU test matrices run it against the float64 reference."""
    student, teachers = make_inputs((3, 7), 1000, 3)
    labels = torch.randint(0, 1000, (3, 7))
    labels[0, :3] = -100
    kw = dict(divergence=divergence, ensemble=ensemble, reduction=reduction, temperature=2.0, labels=labels,
              ce_weight=0.2, teacher_weights=torch.rand(3, 3, 7) + 0.1, sample_weight=torch.rand(3, 7))  # fmt: skip
    go = torch.rand(3, 7) + 0.5 if reduction == "none" else torch.tensor(0.7)
    return student, teachers, kw, go


# --- a stand-in for peft (not a test dependency): test_hf_trainer.py and test_fused_linear.py ---


class LoraModelLike(torch.nn.Module):
    """peft's LoraModel, as far as the trainer sees it: ``.model`` is the Hugging Face model, forward passes on."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftLike(torch.nn.Module):
    """A stand-in for a peft PeftModel (peft is not a test dependency): ``base_model`` is the LoraModel-like wrapper
    of the whole causal LM, ``get_base_model()`` the causal LM, ``forward(**kwargs)`` names no ``logits_to_keep`` or
    ``use_cache`` and passes them on, and other attributes are looked up inside (peft's ``__getattr__``)."""

    def __init__(self, model):
        super().__init__()
        self.base_model = LoraModelLike(model)

    def get_base_model(self):
        return self.base_model.model

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model.model, name)
