"""What a step costs the host on a GPU (skipped without CUDA), beyond the kernels' own time: the benchmarks time
sync to sync, so host work before the main kernel adds in series, and in training a device sync stops the host
running ahead. The CPU twin (the decisions, not the GPU) is tests/test_launch_overhead.py.
  - a default call of each fused op, forward and backward, never synchronises (sync debug mode "error"); nor does
    a step of the reference loop with labels and sample weights, nor a call with a tensor of teacher weights that
    an earlier call checked, nor reading a batch of a teacher-logit cache onto the GPU;
  - a kd_loss step launches a handful of CUDA kernels besides the row kernel (the argument tensors are cached);
  - repeated steps leave torch's global Triton kernel table as it was (eager launches bypass wrap_triton).
Each check names the op and what it saw."""

import pytest
import torch

import fastdistill
from fastdistill import TeacherHead

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16 = torch.bfloat16


def _kd(backend, **options):
    s = torch.randn(512, 4096, device="cuda").to(BF16).requires_grad_()
    t = torch.randn(2, 512, 4096, device="cuda").to(BF16)

    def step():
        fastdistill.kd_loss(s, t, temperature=2.0, backend=backend, **options).backward()
        s.grad = None

    return step


def _codistill():
    a = torch.randn(512, 4096, device="cuda").to(BF16).requires_grad_()
    b = torch.randn(512, 4096, device="cuda").to(BF16).requires_grad_()

    def step():
        la, lb = fastdistill.codistill_loss(a, b, temperature=2.0, backend="triton")
        (la + lb).backward()
        a.grad = b.grad = None

    return step


def _mi_module():
    torch.manual_seed(0)
    mi = fastdistill.MIAlphaLoss(64, 96, proj_dim=64, backend="triton").to("cuda", BF16)
    hs, ht = torch.randn(1024, 64, device="cuda", dtype=BF16), torch.randn(1024, 96, device="cuda", dtype=BF16)

    def step():
        mi(hs, ht).backward()
        mi.zero_grad(set_to_none=True)

    return step


def _fused_linear():
    h = torch.randn(1000, 256, device="cuda").to(BF16).requires_grad_()
    w = (torch.randn(4096, 256, device="cuda") / 16).to(BF16).requires_grad_()
    th, tw = torch.randn(1000, 256, device="cuda"), torch.randn(4096, 256, device="cuda") / 16
    teacher = TeacherHead(th.to(BF16), tw.to(BF16))
    labels = torch.randint(0, 4096, (1000,), device="cuda")

    def step():
        fastdistill.fused_linear_kd_loss(h, w, teacher, labels, chunk_size=300, backend="triton").backward()
        h.grad = w.grad = None

    return step


def _loop_step():
    """A DistillationLoop optimizer step (two micro-batches; cross-entropy, sample weights and ignored labels; the
    data on the CPU, as a DataLoader gives it): the loop checks labels and weights on the host before the copy."""
    import math

    from torch import nn

    from fastdistill.training import ArrayDataset, DistillationLoop

    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(input=torch.randn(64, 32, generator=g), labels=torch.randint(0, 512, (64,), generator=g),
                      sample_weight=torch.rand(64, generator=g) + 0.5)  # fmt: skip
    ds.tensors["labels"][::5] = -100
    torch.manual_seed(0)
    loop = DistillationLoop(nn.Linear(32, 512), [nn.Linear(32, 512)], device="cuda",
                            loss=fastdistill.KDLoss(temperature=2.0, ce_weight=0.3, backend="triton"),
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), batch_size=16, grad_accum_steps=2,
                            progress=False, log_every=1000)  # fmt: skip
    loop._perm, loop._perm_epoch = None, -1  # as fit() starts (the steps below are fit()'s, without its logging)

    def step():
        loop._train_step(loop._micro_batches(ds, None, None, math.inf))

    return step


STEPS = {"kd_loss triton": lambda: _kd("triton"), "kd_loss cuda": lambda: _kd("cuda"),
         # weights as numbers: checked on the host, copied without a sync
         "kd_loss teacher_weights=[0.3, 0.7]": lambda: _kd("triton", teacher_weights=[0.3, 0.7]),
         # a constant tensor of weights: checked on the warm-up call only
         "kd_loss teacher_weights=<the same tensor>": lambda: _kd(
             "triton", teacher_weights=torch.tensor([0.3, 0.7], device="cuda")),
         "codistill_loss": _codistill,
         "MIAlphaLoss": _mi_module, "fused_linear_kd_loss": _fused_linear,
         "DistillationLoop step (labels, weights)": _loop_step}  # fmt: skip


@pytest.mark.parametrize("name", list(STEPS))
def test_a_default_step_never_synchronises(name):
    step = STEPS[name]()
    try:
        step()  # warm-up: compiles, fills the argument-tensor cache (one host-to-device copy each, once)
    except ValueError as e:
        if "cannot run these inputs" in str(e):  # the CUDA kernel not built: test_cuda_kd_gpu.py reports that
            pytest.skip(str(e))
        raise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as e:
        pytest.fail(f"{name}: a default forward + backward synchronised with the device: {e}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", ["kd_loss", "mi_alpha"])
def test_a_new_row_count_does_not_synchronise(op):
    """Each call with a row count not seen before (dynamic padding; tokens kept by labels != -100) builds its argument
    tensors anew: copied from page-locked memory, asynchronously, not by torch.tensor(values, device=cuda), which
    waits for the GPU."""
    t = torch.randn(2, 300, 4096, device="cuda").to(BF16)
    s = torch.randn(300, 4096, device="cuda").to(BF16).requires_grad_()

    def call(n):
        if op == "kd_loss":
            fastdistill.kd_loss(s[:n], t[:, :n], temperature=2.0, backend="triton").backward()
        else:
            fastdistill.mi_alpha(s[:n, :256], t[0, :n, :256], backend="triton").backward()

    call(200)  # warm-up: compiles, the host allocator's first page-locked block
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n in (201, 202, 203):
            call(n)
    except RuntimeError as e:
        pytest.fail(f"{op} at a new row count synchronised with the device: {e}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_runs_on_the_tensors_device_not_the_current_one():
    """Triton launches on the current device: the launcher switches to the tensors' device for the launch."""
    s = torch.randn(64, 1000, device="cuda:1").requires_grad_()
    t = torch.randn(64, 1000, device="cuda:1")
    s_cpu = s.detach().cpu().requires_grad_()
    want = fastdistill.kd_loss(s_cpu, t.cpu(), backend="reference")
    want.backward()
    with torch.cuda.device(0):
        got = fastdistill.kd_loss(s, t, backend="triton")
        got.backward()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    assert s.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(s.grad.cpu(), s_cpu.grad, rtol=1e-4, atol=1e-7)


def test_kd_loss_step_launches_few_kernels():
    """Row kernel, the denominator's fill, the rows' sum and division, autograd's seed, the scale: about 6."""
    from torch.profiler import ProfilerActivity, profile

    step = _kd("triton")
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 1 <= len(kernels) <= 10, f"{len(kernels)} CUDA kernels in one kd_loss step: {kernels}"


def test_repeated_steps_leave_the_triton_kernel_table_alone():
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    step = _kd("triton")
    step()
    before = len(kernel_side_table.id_to_kernel)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    assert len(kernel_side_table.id_to_kernel) == before, "each step registered kernels in torch's global table"


@pytest.mark.parametrize("kind", ["full", "topk"])
def test_teacher_cache_rows_reach_the_gpu_without_a_sync(tmp_path, kind):
    """A teacher-logit cache gathers rows into page-locked memory and copies them asynchronously: the same values as
    on the CPU, and no device sync (sync debug mode "error"), so the host can run ahead to the next step."""
    from torch import nn

    from fastdistill.training import ArrayDataset, write_teacher_cache

    torch.manual_seed(0)
    data = ArrayDataset(input=torch.randn(13, 5, 8))
    extra = {} if kind == "full" else {"topk": 4}
    cache = write_teacher_cache(tmp_path / "c.safetensors", [nn.Linear(8, 17), nn.Linear(8, 17)], data, **extra)
    rows = [3, 0, 12, 7]
    cache.get(rows, device="cuda")  # warm-up: the host allocator's first page-locked block
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = [cache.get(rows, device="cuda", dtype=BF16) for _ in range(3)]
        parts = cache.topk(rows, device="cuda") if kind == "topk" else None
    except RuntimeError as e:
        pytest.fail(f"reading {kind} cache rows onto the GPU synchronised with the device: {e}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for x in on_gpu:
        assert x.device.type == "cuda" and x.dtype == BF16 and x.shape == (2, 4, 5, 17)
        torch.testing.assert_close(x.cpu(), cache.get(rows, dtype=BF16), rtol=0, atol=0)
    if parts is not None:
        for a, b in zip(parts, cache.topk(rows), strict=True):
            assert a.device.type == "cuda" and torch.equal(a.cpu(), b)
