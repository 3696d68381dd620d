"""fused_linear_kd_loss (issue 19): kd_loss of head(hidden) chunk by chunk, held to kd_loss on the materialised
logits in float64: every option, ragged last chunk, chunk size 1 and >= N, grad_output != 1, gradient
accumulation, teachers as logits or as hidden states with their own head."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS, DIVERGENCES, PeftLike

import fastdistill
from fastdistill import LoRATerm, TeacherHead, fused_linear_kd_loss

H, V = 7, 11


def _inputs(lead=(2, 5), k=2, seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, H, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.3).requires_grad_() if bias else None
    t_hidden = [torch.randn(*lead, 5, generator=g, dtype=dtype) for _ in range(k)]
    t_heads = [torch.randn(V, 5, generator=g, dtype=dtype) for _ in range(k)]
    labels = torch.randint(0, V, lead, generator=g)
    if labels.numel() > 1:
        labels.view(-1)[1] = -100
    return h, w, b, t_hidden, t_heads, labels


def _materialised(h, w, b, teacher_logits, labels, **kw):
    logits = h @ w.T + (b if b is not None else 0)
    return fastdistill.kd_loss(logits, teacher_logits, labels, **kw)


def _grads(loss, inputs, go=None):
    return torch.autograd.grad(loss, [x for x in inputs if x is not None], grad_outputs=go)


def _check(kw, chunk_size, lead=(2, 5), k=2, as_heads=True, bias=True, backend="reference", go_scale=None):
    h, w, b, t_hidden, t_heads, labels = _inputs(lead, k, bias=bias)
    t_logits = [th @ tw.T for th, tw in zip(t_hidden, t_heads)]
    teachers = [TeacherHead(th, tw) for th, tw in zip(t_hidden, t_heads)] if as_heads else t_logits
    want = _materialised(h, w, b, t_logits, labels, backend="reference", **kw)
    got = fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b, chunk_size=chunk_size,
                               backend=backend, **kw)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    go = None
    if go_scale is not None:
        go = torch.full_like(want, go_scale) if want.dim() == 0 else torch.linspace(-1, 2, want.numel(),
                                                                                   dtype=want.dtype).view_as(want)
    elif want.dim():
        go = torch.ones_like(want)
    for gw_, gg in zip(_grads(want, (h, w, b), go), _grads(got, (h, w, b), go)):
        torch.testing.assert_close(gg, gw_, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_chunks_and_reductions(chunk_size, reduction):
    _check(dict(temperature=2.0, ce_weight=0.3, reduction=reduction), chunk_size, go_scale=0.7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ensemble", ["prob_mean", "logit_mean", "loss_mean"])
def test_divergences_and_ensembles(divergence, ensemble):
    _check(dict(divergence=divergence, ensemble=ensemble, temperature=1.5, beta=0.3, skew=0.2), 3, k=3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends(backend):
    """Each chunk's loss and logit gradient come from the backend's fused row op."""
    _check(dict(divergence="jsd", temperature=2.0, ce_weight=0.2), 4, backend=backend)


def test_options_weights_and_num_items():
    g = torch.Generator().manual_seed(3)
    sw = torch.rand(2, 5, generator=g, dtype=torch.float64)
    tw_rows = torch.rand(2, 2, 5, generator=g, dtype=torch.float64) + 0.1
    for kw in (dict(sample_weight=sw), dict(teacher_weights=[0.2, 0.8]), dict(teacher_weights=tw_rows),
               dict(num_items=7), dict(num_items=torch.tensor(3.0, dtype=torch.float64)),
               dict(scale_by_temperature_sq=False, temperature=3.0), dict(ignore_index=4)):  # fmt: skip
        _check(kw, 3, go_scale=1.3)


def test_teachers_as_logits_stacked_and_mixed():
    h, w, b, t_hidden, t_heads, labels = _inputs()
    t_logits = [th @ tw.T for th, tw in zip(t_hidden, t_heads)]
    want = _materialised(h, w, b, t_logits, labels, backend="reference")
    for teachers in (torch.stack(t_logits), t_logits, [t_logits[0], TeacherHead(t_hidden[1], t_heads[1])]):
        got = fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b, chunk_size=3, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    one = fused_linear_kd_loss(h, w, t_logits[0], labels, student_head_bias=b, backend="reference")
    torch.testing.assert_close(one, _materialised(h, w, b, t_logits[0], labels, backend="reference"))


def test_no_bias_one_row_and_gradient_accumulation():
    _check(dict(), 2, bias=False)
    _check(dict(reduction="none"), 1, lead=(), k=1)
    h, w, b, t_hidden, t_heads, labels = _inputs()
    teachers = [TeacherHead(th, tw) for th, tw in zip(t_hidden, t_heads)]
    for _ in range(2):  # .grad accumulates over two calls as for any loss
        fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b, chunk_size=4, backend="reference").backward()
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    t_logits = [th @ tw.T for th, tw in zip(t_hidden, t_heads)]
    (2 * _materialised(h, w, b, t_logits, labels, backend="reference")).backward()
    for got, x in zip(grads, (h, w, b)):
        torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)


def test_module_and_chunk_from_budget():
    h, w, b, t_hidden, t_heads, labels = _inputs()
    teachers = [TeacherHead(th, tw) for th, tw in zip(t_hidden, t_heads)]
    mod = fastdistill.FusedLinearKDLoss(temperature=2.0, memory_budget_bytes=4096, backend="reference")
    got = mod(h, w, teachers, labels, student_head_bias=b)
    want = fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b, temperature=2.0, chunk_size=1,
                                backend="reference")  # fmt: skip
    torch.testing.assert_close(got, want)
    assert fastdistill.fused_linear.chunk_rows(10, V, 2, 8, None, 2048) == 5  # 2048 B / (11 x 4 x 8 B a row)
    # teachers wider than the student: each counted in its own bytes (12 V B a row for bfloat16 + 2 float32 teachers)
    assert fastdistill.fused_linear.chunk_rows(100, 1000, 2, 2, None, 12000 * 7, teacher_itemsize=4) == 7
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        fastdistill.FusedLinearKDLoss(temprature=2.0)


def test_errors_name_the_argument():
    h, w, b, t_hidden, t_heads, labels = _inputs()
    t = t_hidden[0] @ t_heads[0].T
    with pytest.raises(ValueError, match=r"student_head weight has shape \(11, 6\): expected \[V, 7\]"):
        fused_linear_kd_loss(h, w[:, :6], t)
    with pytest.raises(ValueError, match="teachers\\[0\\].hidden must have shape"):
        fused_linear_kd_loss(h, w, [TeacherHead(t_hidden[0][:1], t_heads[0])])
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 5\) \(student_hidden without H\)"):
        fused_linear_kd_loss(h, w, t, labels[:1])
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
        fused_linear_kd_loss(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"teachers has vocabulary size 10 .* student_head_weight\[:10\]"):
        fused_linear_kd_loss(h, w, t[..., :10])
    with pytest.raises(TypeError, match="share a dtype"):
        fused_linear_kd_loss(h, w.float(), t)


@pytest.mark.parametrize("k", [1, 2])
def test_extra_memory_is_one_chunk_whatever_n(k):
    """The step's peak beyond the inputs and their gradients is one chunk's worth, (K + 2) [c, V] buffers (the
    chunk's logits, its teachers' and its logit gradient: what the budget counts), the same at N = 64 and N = 512
    (the profiler's CPU allocation events, as tests/test_peak_memory.py reads them), and far below one [N, V]. A
    chunk's logit gradient kept alive through the next chunk's kernel made it K + 3."""
    from test_peak_memory import extra_peak

    vocab, width, chunk = 2048, 32, 16

    def step(n):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, width, generator=g, requires_grad=True)
        w = torch.randn(vocab, width, generator=g, requires_grad=True)
        t = [TeacherHead(torch.randn(n, width, generator=g), torch.randn(vocab, width, generator=g)) for _ in range(k)]
        labels = torch.randint(0, vocab, (n,), generator=g)

        def run():
            fused_linear_kd_loss(h, w, t, labels, chunk_size=chunk, ce_weight=0.1, backend="cpu").backward()

        return extra_peak(run) - (h.numel() + w.numel()) * 4  # minus grad_h and grad_w (its accumulator, scaled)

    small, large = step(64), step(512)
    one_chunk = chunk * vocab * 4
    assert large - small < one_chunk, (small, large)  # 8x the rows, not one more chunk of memory
    assert large < (k + 2.05) * one_chunk, large / one_chunk  # the budget's (K + 2) [c, V] buffers, + per-row ones
    assert large < 512 * vocab * 4 / 4, large  # a quarter of the [N, V] float32 logits, which never exist


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_head_gradient_narrowed_in_place(dtype, scale):
    """_HeadGrad: a float32 sum for a 16-bit head, handed out as the 16-bit gradient written over the sum's own
    first block. Bitwise what one rounding of the scaled float32 sum gives, for V below, at and past the first
    copied rows and the block bounds, any H; V > 8 in the first block's memory, no other [V, H] buffer."""
    from fastdistill.fused_linear import _HeadGrad

    g = torch.Generator().manual_seed(0)
    for v in (1, 2, 7, 8, 9, 16, 17, 100, 129, 1000, 1031, 4096):
        for width in (1, 3, 32):
            acc = _HeadGrad(torch.empty(v, width, dtype=dtype), torch.float32)
            for part in acc.parts:
                part.copy_(torch.randn(part.shape, generator=g) * 1e3)
            factor = None if scale is None else torch.tensor(scale)
            whole = torch.cat(acc.parts)
            want = (whole if factor is None else whole * factor).to(dtype)
            first = acc.parts[0]
            got = acc.result(factor)
            assert got.shape == (v, width) and got.dtype == dtype and got.is_contiguous()
            assert torch.equal(got, want), (v, width)
            if v > 8:
                assert got.untyped_storage().data_ptr() == first.untyped_storage().data_ptr(), (v, width)
                assert got.untyped_storage().nbytes() == first.untyped_storage().nbytes()


def test_head_gradient_traced():
    """While tracing (fake tensors: torch.compile, make_fx), _HeadGrad hands out a plain concatenation, no aliasing
    of a float32 buffer by a bfloat16 one; the traced graph gives the eager bits."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fastdistill.fused_linear import _HeadGrad

    def narrowed(first, second, scale):
        acc = _HeadGrad(torch.empty(first.shape[0] + second.shape[0], first.shape[1], dtype=torch.bfloat16,
                                    device=first.device), torch.float32)  # fmt: skip
        acc.parts = [first, second]
        return acc.result(scale)

    g = torch.Generator().manual_seed(0)
    first, second, scale = torch.randn(56, 5, generator=g), torch.randn(50, 5, generator=g), torch.tensor(0.3)
    graph = make_fx(narrowed, tracing_mode="fake")(first, second, scale)
    assert "aten.cat" in graph.code and "view" not in graph.code, graph.code
    want = (torch.cat([first, second]) * scale).bfloat16()
    assert torch.equal(graph(first, second, scale), want)
    assert torch.equal(narrowed(first.clone(), second.clone(), scale), want)


def test_backward_narrows_the_weight_gradient_in_place():
    """A bfloat16 head with the default float32 sum: backward hands out the bfloat16 weight gradient without a
    second [V, H] buffer (before: 2 V H bytes for the result; on the CPU another 4 V H for torch's float32
    temporary), the gradient the same as from the plain conversion."""
    from test_peak_memory import extra_peak

    vocab, width, n = 2048, 32, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, width, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, width, generator=g) / 4).bfloat16().requires_grad_()
    t = TeacherHead(torch.randn(n, width, generator=g).bfloat16(), torch.randn(vocab, width, generator=g).bfloat16())
    grads = {}
    for chunk in (16, n):
        loss = fused_linear_kd_loss(h, w, t, chunk_size=chunk, backend="cpu")
        peak = extra_peak(lambda: (loss * 0.5).backward())
        assert peak < vocab * width * 2 / 4, peak / (vocab * width * 2)  # 1/8 of it: the bounded CPU temporary
        grads[chunk] = w.grad
        h.grad = w.grad = None
    # the same sums (one chunk: the plain conversion of a single block's product) up to float32 summation order
    torch.testing.assert_close(grads[16].float(), grads[n].float(), rtol=1e-2, atol=1e-5)


def test_chunks_from_a_budget_are_whole_tiles():
    from fastdistill.fused_linear import TILE_ROWS, chunk_rows

    rows = chunk_rows(10**6, 128256, 1, 2, None, 768 * 2**20)
    assert rows == 1024 and rows % TILE_ROWS == 0  # 1046 from the budget, rounded down
    assert chunk_rows(10**6, 128256, 1, 2, None, 150 * 2**20) == 204  # under two tiles: as the budget gives
    assert chunk_rows(300, 128256, 1, 2, None, 768 * 2**20) == 300  # all the rows in one chunk
    assert chunk_rows(1046, 128256, 1, 2, None, 768 * 2**20) == 1046  # they fit one chunk: not cut to 1024 + 22


def test_autocast_and_create_graph():
    """Under autocast (float32 weights, bfloat16 products) the step runs, its gradients those of float32 to
    bfloat16's digits; a double backward is a clear error, not a second-order term of 0."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = (torch.randn(300, 16, generator=g) / 4).requires_grad_()
    t = torch.randn(40, 300, generator=g)
    want = torch.autograd.grad(fused_linear_kd_loss(h, w, t, chunk_size=16, backend="cpu"), (h, w))
    for reduction in ("mean", "none"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_kd_loss(h, w, t, chunk_size=16, reduction=reduction, backend="cpu")
        got = torch.autograd.grad(loss.mean() if reduction == "mean" else loss.sum() / 40, (h, w))
        for a, b in zip(got, want):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(fused_linear_kd_loss(h, w, t, reduction=reduction).sum(), (h, w), create_graph=True)


@pytest.mark.parametrize("teacher", ["logits", "head", "float32 head"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_takes_16bit_hidden_states_and_float32_heads(teacher, reduction):
    """The usual mixed precision: float32 weights, bf16 hidden states from an autocast forward. Under autocast the
    heads' matmuls follow it as lm_head(hidden) does there (outside it the dtypes must agree), a float32 teacher head's
    too: the loss of the unfused path (F.linear under autocast, then kd_loss), gradients in the inputs' dtypes and as
    close to it as bf16 allows; "none" recomputes the chunks in backward under the forward's autocast (autograd runs
    backward outside it)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(300, 16, generator=g) / 4).requires_grad_()
    b = torch.randn(300, generator=g).requires_grad_()
    th, tw = torch.randn(40, 24, generator=g), torch.randn(300, 24, generator=g) / 4
    th = th if teacher == "float32 head" else th.bfloat16()
    labels = torch.randint(0, 300, (40,), generator=g)
    kw = dict(ce_weight=0.2, temperature=2.0, reduction=reduction, backend="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fastdistill.kd_loss(F.linear(h, w, b), F.linear(th, tw), labels, **kw)
        t = F.linear(th, tw) if teacher == "logits" else TeacherHead(th, tw)
        got = fused_linear_kd_loss(h, w, t, labels, student_head_bias=b, chunk_size=16, **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    weights = torch.rand(got.shape, generator=g) if reduction == "none" else torch.tensor(1.5)  # grad_output != 1
    for a, r in zip(torch.autograd.grad(got, (h, w, b), weights), torch.autograd.grad(want, (h, w, b), weights)):
        assert a.dtype == r.dtype
        assert (a.double() - r.double()).norm() <= 1e-2 * r.double().norm()
    with pytest.raises(TypeError, match="call under torch.autocast"):  # outside it: one dtype, and how to get there
        fused_linear_kd_loss(h, w, t, labels, student_head_bias=b, **kw)


def test_float16_autocast_runs_outside_it_so_no_gradient_underflows():
    """Under float16 autocast each chunk's logit gradient, taken in the forward pass at grad_output 1 (before a
    GradScaler's factor), would be float16 and mostly 0 (76% of the head's gradient at N = 256, V = 32000 in the
    review's case): the op runs outside float16 autocast, in the heads' dtypes. With a loss scaler's grad_output
    the gradients match float32's."""
    g = torch.Generator().manual_seed(0)
    n, width, v = 64, 16, 4000
    h = torch.randn(n, width, generator=g).half().requires_grad_()
    w = (torch.randn(v, width, generator=g) / 4).requires_grad_()
    th, tw = torch.randn(n, width, generator=g).half(), torch.randn(v, width, generator=g) / 4
    kw = dict(temperature=2.0, num_items=2**20, chunk_size=16, backend="cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = fused_linear_kd_loss(h, w, TeacherHead(th, tw), **kw)
    got = torch.autograd.grad(loss, (h, w), torch.tensor(2.0**16))  # a GradScaler's factor
    h32 = h.detach().float().requires_grad_()
    want = torch.autograd.grad(fused_linear_kd_loss(h32, w, TeacherHead(th.float(), tw), **kw), (h32, w),
                               torch.tensor(2.0**16))  # fmt: skip
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float32
    for a, r in zip(got, want):
        assert (a.double() - r.double()).norm() <= 1e-2 * r.double().norm()
        assert (a == 0).float().mean() < 0.01


def test_meta_tensors_under_no_autocast():
    """Meta tensors (shape propagation, a model built on the meta device) have no autocast: the op runs on them."""
    h = torch.empty(8, 4, device="meta", requires_grad=True)
    w = torch.empty(50, 4, device="meta", requires_grad=True)
    loss = fused_linear_kd_loss(h, w, torch.empty(8, 50, device="meta"), backend="reference")
    assert loss.device.type == "meta" and loss.shape == ()


def test_the_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/run_fused_linear.py (make bench-gpu's stage "fused") at tiny shapes: every CPU row measured."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/ package
    from benchmarks import run_fused_linear

    out = tmp_path / "fused.json"
    assert run_fused_linear.main(["--quick", "--in-process", "--providers", "fused-cpu,unfused-cpu,eager",
                                  "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    # provider-major, as the other benchmarks: a short budget cuts the last providers, not a shape of the first
    assert [(r["provider"], r["K"]) for r in rows if r["status"] == "ok"] == [
        (p, k) for p in ("fused-cpu", "unfused-cpu", "eager") for k in (1, 2)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile(backend, dtype):
    """torch.compile of a step with fused_linear_kd_loss: the same loss and gradients as eager. Not fullgraph: the
    chunks take each logit gradient with torch.autograd.grad inside the forward, where Dynamo breaks the graph.
    bfloat16: the weight gradient's float32 sum narrowed (in place where eager)."""
    if backend == "cpu" and not fastdistill.extension_available():
        pytest.skip("fastdistill._C is not built")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, generator=g).to(dtype).requires_grad_()
    w = torch.randn(20, 8, generator=g).to(dtype).requires_grad_()
    teacher = TeacherHead(torch.randn(6, 5, generator=g).to(dtype), torch.randn(20, 5, generator=g).to(dtype))
    labels = torch.randint(0, 20, (6,), generator=g)
    a, b = torch.randn(2, 8, generator=g).requires_grad_(), torch.randn(20, 2, generator=g).requires_grad_()

    def step(h, w, a, b):  # with a float32 LoRA term (peft's adapters of a 16-bit model)
        return fused_linear_kd_loss(h, w, teacher, labels, student_head_lora=[LoRATerm(a, b, 0.5)], chunk_size=4,
                                    temperature=2.0, ce_weight=0.2, backend=backend)  # fmt: skip

    want = step(h, w, a, b)
    want_grads = torch.autograd.grad(want, (h, w, a, b))
    got = torch.compile(step, backend="aot_eager")(h, w, a, b)
    got_grads = torch.autograd.grad(got, (h, w, a, b))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("trainable", ["hidden", "head", "bias"])
def test_only_the_gradients_asked_for(trainable):
    """A frozen head (LoRA, a tied frozen embedding) or frozen hidden states: the other gradients still equal the
    materialised path's, and the frozen ones are not formed."""
    h, w, b, t_hidden, t_heads, labels = _inputs()
    for name, x in (("hidden", h), ("head", w), ("bias", b)):
        x.requires_grad_(name == trainable)
    x = {"hidden": h, "head": w, "bias": b}[trainable]
    t_logits = [th @ tw.T for th, tw in zip(t_hidden, t_heads)]
    for reduction in ("mean", "none"):
        kw = dict(temperature=2.0, reduction=reduction, backend="reference")
        got = fused_linear_kd_loss(h, w, [TeacherHead(th, tw) for th, tw in zip(t_hidden, t_heads)], labels,
                                   student_head_bias=b, chunk_size=3, **kw)  # fmt: skip
        want = _materialised(h, w, b, t_logits, labels, **kw)
        go = torch.ones_like(want) if want.dim() else None
        torch.testing.assert_close(torch.autograd.grad(got, x, go)[0], torch.autograd.grad(want, x, go)[0],
                                   rtol=1e-9, atol=1e-11)  # fmt: skip


def test_values_are_checked_once_not_per_chunk(monkeypatch):
    """The data-dependent checks (a device sync each on CUDA) run on the whole input, not again in every chunk; a
    bad value is still an error naming its argument."""
    from fastdistill import functional

    original, calls = functional._check_values, []

    def counting(name, x, what, bad):
        if not functional._VALUES_CHECKED.get():
            calls.append(name)
        return original(name, x, what, bad)

    monkeypatch.setattr(functional, "_check_values", counting)
    h, w, b, t_hidden, t_heads, labels = _inputs()
    teachers = [TeacherHead(th, tw) for th, tw in zip(t_hidden, t_heads)]
    kw = dict(ce_weight=0.2, sample_weight=torch.rand(2, 5, dtype=torch.float64), teacher_weights=[0.3, 0.7],
              backend="reference")  # fmt: skip
    counts = []
    for chunk in (1, 64):
        calls.clear()
        fused_linear_kd_loss(h, w, teachers, labels, chunk_size=chunk, **kw).backward()
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0, counts  # 10 chunks or 1: the same checks, once
    bad = labels.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\)"):
        fused_linear_kd_loss(h, w, teachers, bad, chunk_size=1, **kw)
    with pytest.raises(ValueError, match="sample_weight must be finite and >= 0"):
        fused_linear_kd_loss(h, w, teachers, labels, chunk_size=1, **{**kw, "sample_weight": -torch.ones(2, 5)})


def test_accum_dtype():
    """The head's gradients add up in float32 by default (the unfused path's digits), or in the head's dtype when
    asked (one rounding per chunk); anything else is an error naming the argument."""
    h, w, b, t_hidden, t_heads, labels = _inputs(lead=(256,), k=1)
    teachers = [TeacherHead(t_hidden[0], t_heads[0])]
    want = _grads(_materialised(h, w, b, [t_hidden[0] @ t_heads[0].T], labels, backend="reference"), (h, w, b))
    half = [x.detach().to(torch.bfloat16).requires_grad_() for x in (h, w, b)]
    t_half = [TeacherHead(t_hidden[0].to(torch.bfloat16), t_heads[0].to(torch.bfloat16))]
    errors = {}
    for accum in (None, torch.bfloat16):
        loss = fused_linear_kd_loss(half[0], half[1], t_half, labels, student_head_bias=half[2], chunk_size=2,
                                    accum_dtype=accum, backend="reference")  # fmt: skip
        got = _grads(loss, half)
        assert [x.dtype for x in got] == [torch.bfloat16] * 3
        errors[accum] = [(g.double() - e).abs().max().item() / e.abs().max().item() for g, e in zip(got, want)]
        assert max(errors[accum]) < 3e-2, errors  # bfloat16 inputs: ~2-3 digits either way
    assert errors[None][1] < errors[torch.bfloat16][1] / 2, errors  # one rounding of the weight's sum, not 128
    with pytest.raises(ValueError, match="accum_dtype must be None, torch.float64 or the head weight's dtype"):
        fused_linear_kd_loss(h, w, teachers, labels, accum_dtype=torch.float32)
    with pytest.raises(ValueError, match="accum_dtype=torch.float16 is not supported"):  # (see the float16 test)
        fused_linear_kd_loss(h.half(), w.half(), [t_hidden[0].half() @ t_heads[0].half().T], accum_dtype=torch.float16)
    with pytest.raises(TypeError, match=r"teachers\[0\].weight is torch.float32 but its hidden states are"):
        fused_linear_kd_loss(h, w, [TeacherHead(t_hidden[0], t_heads[0].float())], labels)


def test_backward_twice_is_a_clear_error():
    """A reduced loss hands out the gradients it computed with the loss, scaled in place, once."""
    h, w, b, t_hidden, t_heads, labels = _inputs()
    loss = fused_linear_kd_loss(h, w, [TeacherHead(t_hidden[0], t_heads[0])], labels, student_head_bias=b,
                                backend="reference")  # fmt: skip
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()


def test_add_mm():
    """ops.gemm.add_mm, the weight-gradient accumulation: c += a @ b in c's dtype, or half operands into float32."""
    from fastdistill.ops import gemm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(7, 3, generator=g)
    for dtype, acc in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        c0 = torch.randn(5, 3, generator=g, dtype=acc)
        c = c0.clone()
        gemm.add_mm(c, a.to(dtype), b.to(dtype))
        want = c0.double() + a.to(dtype).double() @ b.to(dtype).double()
        torch.testing.assert_close(c.double(), want, rtol=1e-6, atol=1e-6)
    c = torch.zeros(5, 3)
    gemm.add_mm(c, a.bfloat16(), b)  # autocast: a half-precision a, a float32 b (rounded to a's dtype)
    torch.testing.assert_close(c.double(), a.bfloat16().double() @ b.bfloat16().double(), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="a float32 accumulator for half-precision operands"):
        gemm.add_mm(torch.zeros(5, 3, dtype=torch.float64), a.half(), b.half())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hidden_and_head_reads_what_the_head_reads(arch):
    """hidden_and_head: the base model's output (the head's input) and the head, from a forward that keeps no tuple
    of every layer's hidden states (a teacher under no_grad would hold (L + 1) B T H values); the head applied to
    it gives the model's own logits."""
    transformers = pytest.importorskip("transformers")
    from fastdistill.fused_linear import check_fusable, hidden_and_head

    torch.manual_seed(0)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40,
                                                                             bos_token_id=0, eos_token_id=0))
    else:
        cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=40)  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    model.eval()
    check_fusable("model", model)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        head, out = hidden_and_head(model, {"input_ids": ids})
        full = model(input_ids=ids, output_hidden_states=True)
    assert getattr(out, "hidden_states", None) is None
    torch.testing.assert_close(head.hidden, full.hidden_states[-1])
    torch.testing.assert_close(head.hidden @ head.weight.T, full.logits)

    class HeadOnly(torch.nn.Module):  # a head, but no base model distinct from the model
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 40)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(ValueError, match="bare has no base model under its head"):
        check_fusable("bare", HeadOnly())


def test_no_grad_and_inference_mode_compute_the_loss_alone(monkeypatch):
    """Under no_grad / inference_mode (evaluation) a head that requires grad gets no [V, H] gradient buffer, no
    gradient matmuls and no autograd Function; the loss is the same, and inference_mode is no error."""
    from fastdistill import fused_linear as fl

    h, w, b, t_hidden, t_heads, labels = _inputs()
    teachers = [TeacherHead(th, tw) for th, tw in zip(t_hidden, t_heads)]
    kw = dict(student_head_bias=b, chunk_size=3, temperature=2.0, backend="reference")
    for reduction in ("mean", "batchmean", "none"):
        want = fused_linear_kd_loss(h, w, teachers, labels, reduction=reduction, **kw).detach()
        built = []
        monkeypatch.setattr(fl, "_HeadGrad", lambda *a: built.append(a) or pytest.fail("head gradient under no_grad"))
        monkeypatch.setattr(fl._FusedLinearKD, "apply", lambda *a: pytest.fail("autograd Function under no_grad"))
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                got = fused_linear_kd_loss(h, w, teachers, labels, reduction=reduction, **kw)
            assert not got.requires_grad and not built
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        monkeypatch.undo()


def test_zero_rows_reduction_none_is_empty_like_kd_loss():
    h, w, b, t_hidden, t_heads, labels = _inputs(lead=(0, 3))
    t_logits = [th @ tw.T for th, tw in zip(t_hidden, t_heads)]
    want = _materialised(h, w, b, t_logits, labels, reduction="none", backend="reference")
    for teachers in (t_logits, [TeacherHead(th, tw) for th, tw in zip(t_hidden, t_heads)]):
        got = fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b, reduction="none", backend="reference")
        assert got.shape == want.shape == (0, 3) and got.dtype == want.dtype
        got.sum().backward()
        assert h.grad.shape == h.shape and not w.grad.any() and not b.grad.any()


def test_a_bias_of_another_dtype_or_device_is_named():
    h, w, b, t_hidden, t_heads, labels = _inputs()
    with pytest.raises(TypeError, match="student_head_bias is torch.float32 but the head weight is torch.float64"):
        fused_linear_kd_loss(h, w, t_hidden[0] @ t_heads[0].T, student_head_bias=b.float())
    with pytest.raises(ValueError, match="student_head_bias is on meta, the head weight on cpu"):
        fused_linear_kd_loss(h, w, t_hidden[0] @ t_heads[0].T, student_head_bias=b.to("meta"))
    bias = torch.zeros(V, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"teachers\[1\].bias is torch.float32 but the head weight is torch.float64"):
        fused_linear_kd_loss(h, w, [TeacherHead(t_hidden[0], t_heads[0]), TeacherHead(t_hidden[1], t_heads[1], bias)])
    # the same dtype and device: the bias's gradient comes back in its dtype
    loss = fused_linear_kd_loss(h, w, t_hidden[0] @ t_heads[0].T, student_head_bias=b, backend="reference")
    assert torch.autograd.grad(loss, b)[0].dtype == b.dtype



def test_teachers_of_another_device_or_requiring_grad_and_a_float64_teacher():
    """Teachers on another device than the student's hidden states (logits, or a TeacherHead's hidden states) are a
    ValueError naming them, before any chunk; logits that require grad (a co-trained model's) are taken as constants,
    with a warning while a graph is built, also beside a TeacherHead whose matmul writes into the same stacked
    buffer, also under no_grad; a float64 teacher makes the loss float64 whatever the reduction, as kd_loss; an
    explicit backend that cannot run the inputs is named for N = 0 rows too."""
    h, w, b, t_hidden, t_heads, labels = _inputs()
    logits = [th @ tw.T for th, tw in zip(t_hidden, t_heads)]
    for teachers, name in (([logits[0], logits[1].to("meta")], r"teachers\[1\]"), (logits[0].to("meta"), "teachers"),
                           ([TeacherHead(t_hidden[0].to("meta"), t_heads[0])], r"teachers\[0\].hidden"),
                           ([logits[0], TeacherHead(t_hidden[1], t_heads[1].to("meta"))], r"teachers\[1\] weight")):
        with pytest.raises(ValueError, match=rf"{name} is on meta but student_hidden is on cpu"):
            fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b)
    live = logits[0].detach().requires_grad_()
    teachers = [live, TeacherHead(t_hidden[1], t_heads[1], torch.zeros(V, dtype=torch.float64))]
    want = _materialised(h, w, b, [live.detach(), logits[1]], labels, backend="reference")
    for mode in (torch.no_grad, torch.enable_grad):
        # with a graph being built, the dropped teacher gradient is said (at the caller's line); not under no_grad
        with mode(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b, chunk_size=3, backend="reference")
        said = [str(c.message) for c in caught if "teachers get no gradient" in str(c.message)]
        assert len(said) == (mode is torch.enable_grad), said
        assert all("logits require grad" in m and "torch.no_grad()" in m for m in said), said
        assert all(c.filename == __file__ for c in caught if "teachers get no gradient" in str(c.message))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    assert live.grad is None and h.grad is not None  # the teacher is a constant
    # a TeacherHead: its hidden states carrying a graph are said; a head weight that requires grad (a frozen model's
    # parameter, as they usually are) is not
    frozen_w = t_heads[1].detach().clone().requires_grad_()
    for hidden, warned in ((t_hidden[1], False), (t_hidden[1].detach().requires_grad_(), True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused_linear_kd_loss(h, w, TeacherHead(hidden, frozen_w), labels, backend="reference")
        said = [str(c.message) for c in caught if "teachers get no gradient" in str(c.message)]
        assert len(said) == warned and all("TeacherHead's hidden states" in m for m in said), said
    h32, w32 = h.detach().float(), w.detach().float()
    for reduction in ("mean", "sum", "batchmean", "none"):
        for lead in ((2, 5), (0,)):
            hh = h32 if lead == (2, 5) else h32.reshape(-1, H)[:0]
            t64 = torch.randn(*lead, V, dtype=torch.float64)
            got = fused_linear_kd_loss(hh, w32, t64, reduction=reduction, backend="reference")
            want = fastdistill.kd_loss(hh @ w32.T, t64, reduction=reduction, backend="reference")
            assert got.dtype == want.dtype == torch.float64, (reduction, lead)
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs"):
        fused_linear_kd_loss(h[:0], w, logits[0][:0], backend="cuda")

def test_the_first_batch_check_takes_a_head_with_a_bias():
    """check_head_output on a model whose lm_head has a bias (Phi): [B, 1, H] hidden states through the head with
    its bias pass (an addmm of 3-D rows crashed on every such model's first fused batch), and a rescaled model's
    logits still fail."""
    transformers = pytest.importorskip("transformers")
    from fastdistill.fused_linear import check_fusable, check_head_output, hidden_and_head

    torch.manual_seed(0)
    cfg = transformers.PhiConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=40)  # fmt: skip
    model = transformers.PhiForCausalLM(cfg).eval()
    assert model.lm_head.bias is not None
    check_fusable("model", model)
    ids = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        head, out = hidden_and_head(model, {"input_ids": ids})
    check_head_output("model", head, out)
    out.logits = out.logits * 4
    with pytest.raises(ValueError, match="not lm_head"):
        check_head_output("model", head, out)


def test_hidden_and_head_gives_one_dtype_and_names_a_base_model_the_head_does_not_read():
    """A 16-bit last hidden state (a final projection under autocast) with a float32 head comes back in the head's
    dtype (the loss takes one dtype); a model whose head reads another module than base_model (OPT: model.decoder)
    is a RuntimeError saying to use fused_linear=False."""
    transformers = pytest.importorskip("transformers")
    from fastdistill.fused_linear import hidden_and_head

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2))

    def to_bf16(_module, _args, out):
        out["last_hidden_state"] = out["last_hidden_state"].to(torch.bfloat16)
        return out

    gpt2.transformer.register_forward_hook(to_bf16)
    ids = torch.randint(0, 40, (2, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        head, _ = hidden_and_head(gpt2, {"input_ids": ids})
    assert head.hidden.dtype == head.weight.dtype == torch.float32
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=40, hidden_size=16, word_embed_proj_dim=16,
                                                             ffn_dim=32, num_hidden_layers=1, num_attention_heads=2))
    with torch.no_grad(), pytest.raises(RuntimeError, match="ran 0 times.*use fused_linear=False"):
        hidden_and_head(opt, {"input_ids": ids})


def test_logit_transforms_are_refused():
    """Models that rescale or slice lm_head(hidden) (Falcon-H1's lm_head_multiplier, Inkling's
    logits_mup_width_multiplier and unpadded_vocab_size): check_fusable names the attribute, and check_head_output
    catches a transform no attribute shows, from the logits of the last position."""
    transformers = pytest.importorskip("transformers")
    from fastdistill.fused_linear import check_fusable, check_head_output, hidden_and_head

    def gpt2(cls=transformers.GPT2LMHeadModel, **kw):
        torch.manual_seed(0)
        return cls(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, bos_token_id=0,
                                           eos_token_id=0, **kw))  # fmt: skip

    for kw, match in ((dict(lm_head_multiplier=4.0), r"model.config.lm_head_multiplier=4.0"),
                      (dict(logits_mup_width_multiplier=24.0), r"model.config.logits_mup_width_multiplier=24.0"),
                      (dict(unpadded_vocab_size=37), r"model.config.unpadded_vocab_size=37 \(vocab_size=40\)"),
                      (dict(logits_scaling=2.0), "logits_scaling=2.0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            check_fusable("model", gpt2(**kw))
    check_fusable("model", gpt2(lm_head_multiplier=1.0, unpadded_vocab_size=40))  # "as is" values pass
    model = gpt2()
    model.base_model.lm_head_multiplier = 4.0  # Falcon-H1 reads it from the base model
    with pytest.raises(ValueError, match=r"model.base_model.lm_head_multiplier=4.0"):
        check_fusable("model", model)

    class Scaled(transformers.GPT2LMHeadModel):  # a transform in code only
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 4
            return out

    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        check_head_output("model", *hidden_and_head(gpt2(), {"input_ids": ids}))
        with pytest.raises(ValueError, match="teachers\\[0\\]'s logits are not lm_head\\(hidden\\)"):
            check_head_output("teachers[0]", *hidden_and_head(gpt2(Scaled), {"input_ids": ids}))


def test_check_fusable_and_hidden_and_head_look_inside_a_peft_wrapper():
    """A PEFT (LoRA) model: its forward(**kwargs) names no logits_to_keep and its own base_model is the adapter
    around the whole causal LM (whose output[0] is the logits). check_fusable and hidden_and_head read the inner
    Hugging Face model (get_base_model(): its forward's signature, its decoder, its head), the wrapper is called."""
    transformers = pytest.importorskip("transformers")
    from fastdistill.fused_linear import check_fusable, check_head_output, hidden_and_head

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40)  # fmt: skip
    llama = transformers.LlamaForCausalLM(cfg).eval()
    model = PeftLike(llama)
    check_fusable("model", model)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        head, out = hidden_and_head(model, {"input_ids": ids})
        full = llama(input_ids=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 1, 40)  # logits_to_keep=1 went through the wrapper
    torch.testing.assert_close(head.hidden, full.hidden_states[-1])
    assert head.weight is llama.lm_head.weight
    check_head_output("model", head, out)

    llama.config.logit_scale = 2.0  # the inner model's config is the one checked
    with pytest.raises(ValueError, match=r"model.get_base_model\(\).config.logit_scale=2.0"):
        check_fusable("model", model)
    del llama.config.logit_scale

    class NoKwargs(PeftLike):  # a wrapper that cannot pass logits_to_keep on
        def forward(self, input_ids=None, attention_mask=None):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask)

    with pytest.raises(ValueError, match="model.forward \\(NoKwargs\\) does not pass logits_to_keep on"):
        check_fusable("model", NoKwargs(llama))

    class LoraLinear(torch.nn.Module):  # an adapter that is not peft's LoRA: its .weight is the base layer's
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.weight = base.weight

        def forward(self, x):
            return self.base_layer(x)

    llama.lm_head = LoraLinear(llama.lm_head)
    for check in (lambda: check_fusable("model", model), lambda: hidden_and_head(model, {"input_ids": ids})):
        with pytest.raises(ValueError, match="output head is wrapped by an adapter .*LoraLinear"):
            check()


def _lora_terms(seed=1, ranks=(3, 2), dtype=torch.float64, width=H, scalings=(0.5, 2.0), requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [LoRATerm(torch.randn(r, width, generator=g, dtype=dtype).requires_grad_(requires_grad),
                     (0.4 * torch.randn(V, r, generator=g, dtype=dtype)).requires_grad_(requires_grad), s)
            for r, s in zip(ranks, scalings)]  # fmt: skip


def _plus_lora(x, lora):
    return sum((t.scaling * (x @ t.a.T) @ t.b.T for t in lora), torch.zeros(()))


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "none"])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_lora_terms_are_the_formed_heads(chunk_size, reduction, frozen_head, monkeypatch):
    """A student head with two LoRA terms (and a teacher head with one): the loss and the gradients of the hidden
    states, the head, its bias and every a and b are the materialised path's on W + sum s B A; a frozen base
    weight builds no [V, H] gradient buffer."""
    from fastdistill import fused_linear as fl

    h, w, b, t_hidden, t_heads, labels = _inputs()
    w.requires_grad_(not frozen_head)
    lora = _lora_terms()
    t_lora = _lora_terms(seed=2, ranks=(2,), width=5, requires_grad=False)
    teachers = [TeacherHead(t_hidden[0], t_heads[0], None, tuple(t_lora)), t_hidden[1] @ t_heads[1].T]
    t_logits = [t_hidden[0] @ t_heads[0].T + _plus_lora(t_hidden[0], t_lora), teachers[1]]
    kw = dict(temperature=2.0, ce_weight=0.3, reduction=reduction, divergence="jsd", backend="reference")
    want = fastdistill.kd_loss(h @ w.T + b + _plus_lora(h, lora), t_logits, labels, **kw)
    if frozen_head:
        monkeypatch.setattr(fl, "_HeadGrad", None)  # would raise if called
    got = fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b, student_head_lora=lora,
                               chunk_size=chunk_size, **kw)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    go = torch.linspace(-1, 2, want.numel(), dtype=want.dtype).view_as(want) if want.dim() else torch.tensor(0.7,
                                                                                                       dtype=want.dtype)
    params = [h, b, *(m for t in lora for m in (t.a, t.b))] + ([] if frozen_head else [w])
    for name, gg, gw_ in zip(range(len(params)), _grads(got, params, go), _grads(want, params, go)):
        torch.testing.assert_close(gg, gw_, rtol=1e-9, atol=1e-11, msg=f"parameter {name}")


def test_lora_terms_gradcheck_and_module():
    """gradcheck of the hidden states and one term's a and b through the chunks (reduction "none": its backward
    runs the chunks again, so gradcheck's repeated backward calls work), and FusedLinearKDLoss passing
    student_head_lora on."""
    h, w, b, t_hidden, t_heads, labels = _inputs(lead=(5,), k=1)
    (term,) = _lora_terms(ranks=(2,), scalings=(1.5,))
    teacher = TeacherHead(t_hidden[0], t_heads[0])

    def f(h, a, bb, reduction="none"):
        return fused_linear_kd_loss(h, w.detach(), teacher, labels, student_head_lora=[LoRATerm(a, bb, 1.5)],
                                    chunk_size=2, temperature=2.0, ce_weight=0.4, reduction=reduction,
                                    backend="reference")  # fmt: skip

    assert torch.autograd.gradcheck(f, (h, term.a, term.b))
    module = fastdistill.FusedLinearKDLoss(chunk_size=2, temperature=2.0, ce_weight=0.4, reduction="none",
                                           backend="reference")  # fmt: skip
    torch.testing.assert_close(module(h, w.detach(), teacher, labels, student_head_lora=[term]), f(h, term.a, term.b))


def test_lora_terms_in_their_own_dtype():
    """peft keeps the adapters of a bfloat16 model in float32: x @ a.T in float32, its product with b in the
    logits' dtype; every gradient comes back in its parameter's dtype, close to a float64 evaluation."""
    h64, w64, b64, t_hidden, t_heads, labels = _inputs()
    lora64 = _lora_terms(requires_grad=False)
    h, w = h64.detach().bfloat16().requires_grad_(), w64.detach().bfloat16().requires_grad_()
    lora = [LoRATerm(t.a.float().requires_grad_(), t.b.float().requires_grad_(), t.scaling) for t in lora64]
    teacher = (t_hidden[0] @ t_heads[0].T).bfloat16()
    got = fused_linear_kd_loss(h, w, teacher, labels, student_head_lora=lora, chunk_size=4, temperature=2.0)
    params = [h, w, *(m for t in lora for m in (t.a, t.b))]
    grads = torch.autograd.grad(got, params)
    assert [g.dtype for g in grads] == [p.dtype for p in params]
    ref = [x.detach().double().requires_grad_() for x in params]
    logits = ref[0] @ ref[1].T + sum(t.scaling * (ref[0] @ ref[2 + 2 * i].T) @ ref[3 + 2 * i].T
                                     for i, t in enumerate(lora))  # fmt: skip
    want = fastdistill.kd_loss(logits, teacher.double(), labels, temperature=2.0, backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-3)
    for gg, gw_ in zip(grads, torch.autograd.grad(want, ref)):
        assert (gg.double() - gw_).norm() <= 3e-2 * gw_.norm()


def test_lora_terms_errors_name_the_argument():
    h, w, b, t_hidden, t_heads, labels = _inputs()
    (term,) = _lora_terms(ranks=(2,), scalings=(1.0,))
    cases = [(term, TypeError, r"student_head_lora must be a sequence of LoRATerm"),
             ([(term.a, term.b)], TypeError, r"student_head_lora\[0\] must be a LoRATerm"),
             ([LoRATerm(term.a, term.b[:, :1], 1.0)], ValueError, r"lora\[0\]: a has shape \(2, 7\), b \(11, 1\)"),
             ([LoRATerm(term.a.T, term.b, 1.0)], ValueError, r"expected a \[r, 7\] and b \[11, r\]"),
             ([LoRATerm(term.a.to("meta"), term.b, 1.0)], ValueError, r"student_head_lora\[0\].a is on meta"),
             ([LoRATerm(term.a, term.b, float("nan"))], ValueError, r"scaling must be finite, got nan"),
             ([LoRATerm(term.a, term.b, "2")], TypeError, r"scaling must be a real number, got str")]  # fmt: skip
    for lora, error, match in cases:
        with pytest.raises(error, match=match):
            fused_linear_kd_loss(h, w, t_hidden[0] @ t_heads[0].T, student_head_lora=lora)
    with pytest.raises(ValueError, match=r"teachers\[0\].lora\[0\]: a has shape"):
        fused_linear_kd_loss(h, w, [TeacherHead(t_hidden[0], t_heads[0], None, (term,))])
    with pytest.raises(TypeError, match="scaling"):
        LoRATerm(term.a, term.b)  # no default: lora_alpha / r is not dropped by accident
    teacher = t_hidden[0] @ t_heads[0].T  # a 0-d tensor or numpy scaling (peft's layer.scaling) is a number
    as_tensor, as_float = (fused_linear_kd_loss(h, w, teacher, student_head_lora=[term._replace(scaling=s)])
                           for s in (torch.tensor(2.0), 2.0))  # fmt: skip
    torch.testing.assert_close(as_tensor, as_float)


@pytest.mark.parametrize("k", [1, 2])
def test_sliced_teacher_logits_are_read_by_chunk_and_not_kept(k):
    """A [:, :-1] slice of [B, T, V] teacher logits (a causal LM's shift) was reshaped to [N, V] up front: a whole
    copy, the buffer this op exists to avoid. And the loss's graph kept the teachers (its plan) until the loss was
    freed, so a step's teacher logits lived on through the next step's forward."""
    from fastdistill import fused_linear

    h, w, b, _, _, labels = _inputs(lead=(3, 5))
    full = torch.randn(k, 3, 6, V, dtype=torch.float64)
    sliced = [full[i, :, :-1] for i in range(k)]
    assert fused_linear._flat_rows(sliced[0], V) is sliced[0]  # no view exists: kept as it is, not copied
    assert torch.equal(fused_linear._rows(sliced[0], slice(4, 11)), sliced[0].reshape(-1, V)[4:11])
    got = fused_linear_kd_loss(h, w, sliced, labels, student_head_bias=b, chunk_size=4, backend="cpu")
    want = fused_linear_kd_loss(h, w, [t.contiguous() for t in sliced], labels, student_head_bias=b, chunk_size=4,
                                backend="cpu")  # fmt: skip
    assert torch.equal(got, want)
    for x, y in zip(_grads(got, (h, w, b)), _grads(want, (h, w, b))):
        assert torch.equal(x, y)
    assert fused_linear_kd_loss(h, w, sliced, labels, backend="cpu").grad_fn.plan is None


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("case", ["float16 head", "float16 head + float32 LoRA terms under float16 autocast"])
def test_float16_gradients_are_lifted_above_underflow(case, divergence):
    """A float16 head's chunk gradients are formed in the forward pass, before a loss scaler's factor: at
    grad_output 1 most entries, (q - p) / N, lie under float16's range (6e-8), and a review measured the gradients
    5-25% off at N = 2048, V = 16384 (here num_items plays the large N). Taken at the float16 prescale S of all the
    rows (one for every chunk) and summed in float32, they are as close to float64's as kd_loss's on the
    materialised float16 logits (which has the op's own prescale). Reverse KL's gradient has no bound, so no
    prescale: its chunks are recomputed in backward at the scaler's grad_output (they were ~100 % off: all 0)."""
    g = torch.Generator().manual_seed(0)
    n, width, v, lora = 48, 16, 512, case != "float16 head"
    h64, w64 = torch.randn(n, width, generator=g, dtype=torch.float64), torch.randn(v, width, generator=g) / 4
    a64, b64 = torch.randn(3, width, generator=g) / 4, torch.randn(v, 3, generator=g) / 4
    t = (torch.randn(n, v, generator=g) * 2).half()
    labels = torch.randint(0, v, (n,), generator=g)
    kw = dict(temperature=2.0, ce_weight=0.1, num_items=2**20, divergence=divergence,
              sample_weight=torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
    scaler = torch.tensor(2.0**16)  # a GradScaler's factor, applied in backward

    def grads(dtype, fused):
        h, w = h64.to(dtype).requires_grad_(not lora), w64.to(dtype).requires_grad_(not lora)
        a = a64.to(torch.float32 if dtype == torch.float16 else dtype).requires_grad_()
        b = b64.to(a.dtype).requires_grad_()
        ins = (a, b) if lora else (h, w)
        with torch.autocast("cpu", dtype=torch.float16, enabled=lora and dtype == torch.float16):
            if fused:
                loss = fused_linear_kd_loss(h, w, t, labels, student_head_lora=[LoRATerm(a, b, 0.5)] if lora else (),
                                            chunk_size=20, backend="cpu", **kw)  # fmt: skip
            else:
                logits = h @ w.T + (0.5 * (h @ a.T) @ b.T if lora else 0)
                loss = fastdistill.kd_loss(logits, t.to(logits.dtype), labels,
                                           backend="cpu" if dtype == torch.float16 else "reference", **kw)
        return [x.double() / scaler.double() for x in torch.autograd.grad(loss, ins, scaler.to(loss.dtype))]

    want = grads(torch.float64, False)
    unfused, fused = grads(torch.float16, False), grads(torch.float16, True)
    for e, u, f in zip(want, unfused, fused):
        err_u, err_f = ((u - e).norm() / e.norm()).item(), ((f - e).norm() / e.norm()).item()
        assert err_f < max(2 * err_u, 2e-3), (case, err_u, err_f)  # was 0.25 (hidden), 0.26 (weight)
        assert (f == 0).double().mean() < 0.01
    h = torch.randn(0, width).half().requires_grad_()  # no rows: the float32 buffer of the hidden states' gradient
    fused_linear_kd_loss(h, w64.half(), t[:0], backend="cpu").backward()
    assert h.grad.shape == (0, width) and h.grad.dtype == torch.float16


@pytest.mark.parametrize("changed", ["teacher logits", "teacher hidden states", "labels", "sample_weight"])
def test_reduction_none_refuses_inputs_changed_in_place_before_backward(changed):
    """reduction="none" recomputes the chunks in backward from the teachers, labels and weights: one changed in
    place in between gave a different gradient, silently (kd_loss keeps what its backward needs); now autograd's
    error names it."""
    h, w, b, t_hidden, t_heads, labels = _inputs(k=1)
    logits = t_hidden[0] @ t_heads[0].T
    sw = torch.rand(labels.shape, dtype=torch.float64)
    teachers = [TeacherHead(t_hidden[0], t_heads[0]) if changed == "teacher hidden states" else logits]
    loss = fused_linear_kd_loss(h, w, teachers, labels, student_head_bias=b, sample_weight=sw, ce_weight=0.5,
                                reduction="none", chunk_size=3, backend="cpu")  # fmt: skip
    {"teacher logits": logits, "teacher hidden states": t_hidden[0], "labels": labels, "sample_weight": sw}[
        changed].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_shifted_teacher_hidden_states_are_read_by_chunk_not_copied():
    """TeacherHead.shifted() (the training loop's causal shift) is a [:, :-1] slice with no [N, H_t] view: it was
    reshaped, a whole copy whose size grows with N; its rows are now gathered chunk by chunk, as sliced logits'."""
    from fastdistill import fused_linear

    h, w, b, t_hidden, t_heads, labels = _inputs(lead=(3, 5))
    full = TeacherHead(torch.randn(3, 6, 5, dtype=torch.float64), t_heads[0])
    shifted = full.shifted()
    kept = fused_linear._teacher_list([shifted], torch.Size((3, 5)), V, h.device)[0].hidden
    assert kept.data_ptr() == full.hidden.data_ptr() and kept.shape == (3, 5, 5)
    got = fused_linear_kd_loss(h, w, shifted, labels, student_head_bias=b, chunk_size=4, backend="cpu")
    want = fused_linear_kd_loss(h, w, TeacherHead(shifted.hidden.contiguous(), t_heads[0]), labels,
                                student_head_bias=b, chunk_size=4, backend="cpu")  # fmt: skip
    assert torch.equal(got, want)
    for x, y in zip(_grads(got, (h, w, b)), _grads(want, (h, w, b))):
        assert torch.equal(x, y)
