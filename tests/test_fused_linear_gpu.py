"""fused_linear_kd_loss on a GPU (skipped without CUDA; issue 19), bfloat16 through the Triton row op:
  - against the float64 reference, and as accurate as the unfused path (head matmul + kd_loss);
  - every matmul on half-precision operands, the weight gradient's float32 accumulation included (a float32 GEMM
    runs at ~1/10 of the tensor cores' rate);
  - peak memory: the gradients' buffers plus one chunk, whatever N;
  - torch.compile of a step.
The CPU twin is tests/test_fused_linear.py."""

import pytest
import torch
from tolerances import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import fastdistill
from fastdistill import LoRATerm, TeacherHead, fused_linear_kd_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KW = dict(temperature=2.0, ce_weight=0.2)


def make_inputs(n, width, v, dtype, seed=0):
    """Student hidden [N, H], head [V, H] and bias [V]; one teacher as hidden + head, one as logits [N, V]; labels
    [N] with every 7th ignored. Drawn in float64 on the GPU, then cast."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64) * scale).to(dtype)

    hid, w, b = rnd(n, width), rnd(v, width, scale=2 * width**-0.5), rnd(v, scale=0.1)
    th, tw, t_logits = rnd(n, width), rnd(v, width, scale=2 * width**-0.5), rnd(n, v, scale=2.0)
    labels = torch.randint(0, v, (n,), generator=g, device="cuda")
    labels[::7] = -100
    return hid, w, b, th, tw, t_logits, labels


def loss_and_grads(fn, hid, w, b):
    """(loss, d hidden, d weight, d bias) of fn on fresh leaves, grad_output 0.7."""
    leaves = [x.detach().clone().requires_grad_() for x in (hid, w, b)]
    loss = fn(*leaves)
    go = torch.tensor(0.7, device="cuda", dtype=loss.dtype)
    return [loss.detach(), *torch.autograd.grad(loss, leaves, go)]


def fused(th, tw, t_logits, labels, **kw):
    return lambda h, w, b: fused_linear_kd_loss(h, w, [TeacherHead(th, tw), t_logits], labels, student_head_bias=b,
                                                backend="triton", **KW, **kw)  # fmt: skip


def unfused(th, tw, t_logits, labels, backend="triton"):
    return lambda h, w, b: fastdistill.kd_loss(h @ w.T + b, [th @ tw.T, t_logits], labels, backend=backend, **KW)


@pytest.mark.parametrize("accum", [None, torch.bfloat16])
def test_bfloat16_against_float64(accum):
    """Four chunks (the last ragged). Default accumulation: within 2x the unfused path's own error (one rounding of
    each gradient); the head's dtype: within the bfloat16 tolerance."""
    hid, w, b, th, tw, t_logits, labels = make_inputs(1000, 256, 8192, torch.bfloat16)
    want = loss_and_grads(unfused(*(x.double() for x in (th, tw, t_logits)), labels, "reference"),
                          hid.double(), w.double(), b.double())  # fmt: skip
    base = loss_and_grads(unfused(th, tw, t_logits, labels), hid, w, b)
    got = loss_and_grads(fused(th, tw, t_logits, labels, chunk_size=300, accum_dtype=accum), hid, w, b)
    for name, g, u, e in zip(("loss", "d hidden", "d weight", "d bias"), got, base, want):
        assert g.dtype == u.dtype, name
        if name == "loss":  # both from bfloat16 logits (the float64 ones differ by their rounding): the same sum
            torch.testing.assert_close(g, u, rtol=1e-3, atol=0)
            continue
        assert_close(g, e, torch.bfloat16, "grad", what=f"{name}, accum_dtype={accum}")
        if accum is None:
            err, err_unfused = ((x.double() - e).abs().max().item() for x in (g, u))
            assert err <= 2 * err_unfused + 1e-6 * e.abs().max().item(), (name, err, err_unfused)


class _MatmulOperands(TorchDispatchMode):
    """Every matmul's operand dtypes, as aten sees them."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul"):
            mats = args[:2] if name in ("mm", "bmm", "matmul") else args[1:3]
            self.seen.append((str(func), tuple(m.dtype for m in mats)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("accum", [None, torch.bfloat16])
def test_every_matmul_on_half_operands(accum):
    hid, w, b, th, tw, t_logits, labels = make_inputs(600, 128, 4096, torch.bfloat16)
    with _MatmulOperands() as spy:
        loss_and_grads(fused(th, tw, t_logits, labels, chunk_size=256, accum_dtype=accum), hid, w, b)
    assert len(spy.seen) >= 3 * 4, spy.seen  # per chunk: student and teacher logits, d hidden, d weight
    wide = [s for s in spy.seen if any(d not in (torch.bfloat16, torch.float16) for d in s[1])]
    assert not wide, f"matmuls on float32 operands: {wide}"


@pytest.mark.parametrize("accum", [None, torch.bfloat16])
def test_peak_memory(accum):
    """Peak beyond the inputs: the weight-gradient accumulator (float32 4 V H, narrowed to bfloat16 in its own
    memory; or the head's dtype 2 V H), d hidden (2 N H), one chunk (its (K + 2) [c, V] buffers: a chunk's logit
    gradient kept through the next chunk's kernel would add a third of that) and 8 MiB of slack (per-row buffers);
    where torch's addmm refused a float32 C (gemm.addmm_takes_float32_c), the float32 product of the larger block
    of rows too."""
    from fastdistill.fused_linear import _HeadGrad, chunk_rows
    from fastdistill.ops import gemm

    n, width, v, budget = 8192, 1024, 32768, 64 << 20
    hid, w, _, th, tw, _, labels = make_inputs(n, width, v, torch.bfloat16)
    hid.requires_grad_()
    w.requires_grad_()
    teacher = TeacherHead(th, tw)

    def step():
        fused_linear_kd_loss(hid, w, teacher, labels, memory_budget_bytes=budget, accum_dtype=accum,
                             backend="triton", **KW).backward()  # fmt: skip
        hid.grad = w.grad = None

    step()  # warm-up: Triton's compile, cuBLAS's workspace
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    acc = (4 if accum is None else 2) * v * width
    chunk = chunk_rows(n, v, 1, 2, None, budget) * v * 3 * 2
    product = 0
    if accum is None and gemm.addmm_takes_float32_c() is False:
        product = 4 * _HeadGrad(w.to("meta"), torch.float32).parts[0].numel()
    bound = acc + chunk + 2 * n * width + product + (8 << 20)
    assert peak <= bound, (f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB (addmm_float32_c: "
                           f"{gemm.addmm_takes_float32_c()})")  # fmt: skip


def test_lora_head_float32_adapters_on_a_bfloat16_head():
    """A LoRA lm_head as peft keeps it for a bfloat16 model: frozen bfloat16 base weight, float32 adapters (r = 16).
    Against float64: within the bfloat16 tolerance; peak memory beyond the inputs is one chunk, the hidden states'
    clone and gradient and the adapters' gradients: no [V, H] weight W + s B A and no [V, H] gradient."""
    from fastdistill.fused_linear import chunk_rows

    n, width, v, r, budget = 4096, 1024, 32768, 16, 64 << 20
    hid, w, b, th, tw, _, labels = make_inputs(n, width, v, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    a32 = torch.randn(r, width, generator=g, device="cuda") * width**-0.5
    b32 = torch.randn(v, r, generator=g, device="cuda") * 0.1

    def run(h, w, a, bb, lora_dtype, backend):
        leaves = [h.detach().clone().requires_grad_(), a.detach().to(lora_dtype).requires_grad_(),
                  bb.detach().to(lora_dtype).requires_grad_()]  # fmt: skip
        loss = fused_linear_kd_loss(leaves[0], w, TeacherHead(th.to(h.dtype), tw.to(h.dtype)), labels,
                                    student_head_lora=[LoRATerm(leaves[1], leaves[2], 2.0)],
                                    memory_budget_bytes=budget, backend=backend, **KW)  # fmt: skip
        return [loss.detach(), *torch.autograd.grad(loss, leaves, torch.tensor(0.7, device="cuda", dtype=loss.dtype))]

    want = run(hid.double(), w.double(), a32, b32, torch.float64, "reference")
    got = run(hid, w, a32, b32, torch.float32, "triton")
    torch.testing.assert_close(got[0].double(), want[0], rtol=5e-3, atol=0)  # from bfloat16-rounded logits
    for name, x, e in zip(("d hidden", "d a", "d b"), got[1:], want[1:]):
        assert x.dtype == (torch.bfloat16 if name == "d hidden" else torch.float32), name
        assert_close(x, e, torch.bfloat16, "grad", what=name)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(hid, w, a32, b32, torch.float32, "triton")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    chunk = chunk_rows(n, v, 1, 2, None, budget) * v * 3 * 2
    bound = chunk + 2 * (2 * n * width) + 2 * 4 * (r * width + v * r) + (8 << 20)  # h's clone and d hidden
    assert peak <= bound < 2 * v * width + chunk, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"


def test_compile():
    """torch.compile (Inductor) of a step: the same loss and gradients as eager (the float32 accumulation is traced
    as a float32-output matmul and an add)."""
    hid, w, b, th, tw, t_logits, labels = make_inputs(500, 128, 4096, torch.bfloat16)
    fn = fused(th, tw, t_logits, labels, chunk_size=200)
    want = loss_and_grads(fn, hid, w, b)
    got = loss_and_grads(torch.compile(fn), hid, w, b)
    for name, g, e in zip(("loss", "d hidden", "d weight", "d bias"), got, want):
        torch.testing.assert_close(g, e, rtol=2e-2, atol=1e-3 * e.abs().max().item(), msg=name)


def test_loop_runs_the_fused_loss_under_its_autocast(monkeypatch):
    """DistillationLoop(fused_linear=True, amp="bf16"): the loss's head matmuls under the student's autocast, as its
    lm_head in the logits path (they once ran in float32: several times slower on the tensor cores)."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastdistill.training import ArrayDataset, DistillationLoop, loop

    seen, real = [], loop.fused_linear_kd_loss

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.float32)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "fused_linear_kd_loss", spy)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(0))
    run = DistillationLoop(GPT2LMHeadModel(cfg), [GPT2LMHeadModel(cfg)], device="cuda", amp="bf16", batch_size=4,
                           progress=False, fused_linear=True)  # fmt: skip
    run.fit(ArrayDataset(input_ids=ids, labels=ids.clone()), max_steps=1)
    assert seen and set(seen) == {torch.bfloat16}, seen
