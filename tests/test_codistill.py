"""codistill_loss: every backend against the float64 reference, the definition against plain torch, the op as torch
sees it (opcheck, compile, gradcheck, determinism), errors, the module, and the loop's co-training mode."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS, DIVERGENCES, REDUCTIONS, requires_ext, requires_triton
from tolerances import assert_close

import fastdistill
from fastdistill.ops import divergences
from fastdistill.ops.inputs import CodistillInputs
from fastdistill.training import ArrayDataset, DistillationLoop


def _inputs(lead=(7,), vocab=33, dtype=torch.float32, dtype_b=None, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (scale * torch.randn(*lead, vocab, generator=g, dtype=torch.float64)).to(dtype)
    b = (scale * torch.randn(*lead, vocab, generator=g, dtype=torch.float64)).to(dtype_b or dtype)
    return a, b


def _run(a, b, labels=None, grad_output=None, grads=(True, True), **kw):
    """Both losses and d(go_a * loss_a + go_b * loss_b)/d(a, b) on fresh leaf copies."""
    A = a.detach().clone().requires_grad_(grads[0])
    B = b.detach().clone().requires_grad_(grads[1])
    la, lb = fastdistill.codistill_loss(A, B, labels, **kw)
    go_a, go_b = grad_output if grad_output is not None else (torch.ones_like(la), torch.ones_like(lb))
    wanted = [x for x, g in zip((A, B), grads) if g]
    total = (la * go_a.to(la.dtype)).sum() + (lb * go_b.to(lb.dtype)).sum()
    out = torch.autograd.grad(total, wanted, materialize_grads=True) if wanted else ()
    return (la, lb), out


def _compare(backend, a, b, labels=None, dtype=torch.float32, grad_output=None, grads=(True, True), **kw):
    (la, lb), g = _run(a, b, labels, grad_output, grads, backend=backend, **kw)
    (ra, rb), rg = _run(a.double(), b.double(), labels, grad_output, grads, backend="reference", **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert la.dtype == acc and lb.dtype == acc
    assert_close(la, ra, dtype, "loss", f"{backend} loss_a")
    assert_close(lb, rb, dtype, "loss", f"{backend} loss_b")
    for name, x, r in zip(("a", "b"), g, rg):
        assert x.dtype == a.dtype
        assert_close(x, r, dtype, "grad", f"{backend} grad_{name}")
    return (la, lb), g


def _options(lead, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels.view(-1)[::3] = -100
    return labels, torch.rand(lead, generator=g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matrix(backend, divergence, reduction):
    lead, vocab = (2, 5), 37
    a, b = _inputs(lead, vocab)
    labels, sw = _options(lead, vocab)
    if reduction == "none":
        go = (torch.rand(lead) + 0.5, torch.rand(lead) + 0.5)
    else:
        go = (torch.tensor(0.7), torch.tensor(1.9))
    _compare(backend, a, b, labels, grad_output=go, divergence=divergence, reduction=reduction, temperature=2.0,
             weight_ab=0.6, weight_ba=1.4, hard_weight=(0.3, 2.0), sample_weight=sw, beta=0.3, skew=0.2)  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float64_no_labels(backend, divergence):
    """Pure mutual distillation (no labels, T = 1) in float64: exact to rounding."""
    a, b = _inputs((9,), 41, torch.float64)
    _compare(backend, a, b, dtype=torch.float64, divergence=divergence)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grads", [(True, False), (False, True)], ids=["a_only", "b_only"])
def test_one_model_trains(backend, grads):
    a, b = _inputs((6,), 19)
    labels, _ = _options((6,), 19)
    _compare(backend, a, b, labels, grads=grads, temperature=1.5, divergence="jsd")


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("scale_sq", [True, False])
def test_definition_against_plain_torch(temperature, scale_sq):
    """loss_b = hard_b CE(b) + weight_ab c KL(P_a || Q_b), mean over labelled rows, P_a constant (and a <-> b)."""
    a, b = _inputs((3, 4), 23, torch.float64)
    labels, _ = _options((3, 4), 23)
    (la, lb), (ga, gb) = _run(a, b, labels, temperature=temperature, weight_ab=0.8, weight_ba=1.7,
                              hard_weight=(0.4, 1.1), scale_by_temperature_sq=scale_sq,
                              backend="reference")  # fmt: skip
    c = temperature**2 if scale_sq else 1.0
    keep = labels.reshape(-1) != -100
    n = int(keep.sum())

    def side(x, other, hard, w):
        x = x.detach().clone().requires_grad_()
        flat, oth = x.reshape(-1, 23)[keep], other.reshape(-1, 23)[keep].detach()
        kl = F.kl_div(F.log_softmax(flat / temperature, -1), F.log_softmax(oth / temperature, -1), log_target=True,
                      reduction="sum")  # fmt: skip
        loss = hard * F.cross_entropy(flat, labels.reshape(-1)[keep], reduction="sum") + w * c * kl
        loss = loss / n
        return loss, torch.autograd.grad(loss, x)[0]

    ea, ega = side(a, b, 0.4, 1.7)
    eb, egb = side(b, a, 1.1, 0.8)
    for got, exp in ((la, ea), (lb, eb), (ga, ega), (gb, egb)):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_equals_two_kd_loss_calls(backend):
    """The fused op is the two one-way calls it replaces (hard 0.25 + weight 0.75 is kd_loss's ce_weight = 0.25)."""
    a, b = _inputs((8,), 29)
    labels, sw = _options((8,), 29)
    kw = dict(temperature=2.0, divergence="skew_kl", skew=0.3, sample_weight=sw, labels=labels)
    la, lb = fastdistill.codistill_loss(a, b, labels, weight_ab=0.75, weight_ba=0.75, hard_weight=0.25,
                                        temperature=2.0, divergence="skew_kl", skew=0.3, sample_weight=sw,
                                        backend=backend)  # fmt: skip
    ka = fastdistill.kd_loss(a, b, ce_weight=0.25, backend=backend, **kw)
    kb = fastdistill.kd_loss(b, a, ce_weight=0.25, backend=backend, **kw)
    assert_close(la, ka, torch.float32, "loss", "loss_a")
    assert_close(lb, kb, torch.float32, "loss", "loss_b")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stop_gradient(backend):
    """Each loss reaches only its own model: the other model's distribution is a constant target."""
    a, b = _inputs((5,), 17)
    A, B = a.clone().requires_grad_(), b.clone().requires_grad_()
    la, lb = fastdistill.codistill_loss(A, B, temperature=2.0, backend=backend)
    ga, gb = torch.autograd.grad(la, [A, B], allow_unused=True, materialize_grads=True, retain_graph=True)
    assert ga.abs().max() > 0 and gb.abs().max() == 0
    ga, gb = torch.autograd.grad(lb, [A, B], allow_unused=True, materialize_grads=True)
    assert ga.abs().max() == 0 and gb.abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vocab", [1, 7, 129])
def test_odd_vocab_and_leading_shapes(backend, vocab):
    a, b = _inputs((2, 3, 2), vocab)
    labels, _ = _options((2, 3, 2), vocab)
    # V = 1 at T != 1: the exact gradient 0 comes back as float32 noise (x / T * T != x), so T = 1 there
    (la, lb), _ = _compare(backend, a, b, labels, reduction="batchmean", temperature=1.3 if vocab > 1 else 1.0)
    (na, _), _ = _run(a, b, labels, backend=backend, reduction="none")
    assert na.shape == (2, 3, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    a, b = _inputs((6,), 50, dtype)
    labels, _ = _options((6,), 50)
    _compare(backend, a, b, labels, dtype=dtype, temperature=2.0, divergence="reverse_kl")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_and_non_contiguous(backend):
    a, b = _inputs((6,), 40, torch.float32, torch.bfloat16)
    (la, lb), (ga, gb) = _run(a, b, backend=backend)
    assert ga.dtype == torch.float32 and gb.dtype == torch.bfloat16
    (ra, rb), _ = _run(a.double(), b.double(), backend="reference")
    assert_close(la, ra, torch.float32, "loss")
    big_a, big_b = _inputs((6,), 80)
    _compare(backend, big_a[:, ::2], big_b[:, 1::2].t().contiguous().t(), temperature=1.7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_vocab(backend):
    """Entries -inf in both models (a padded vocabulary) carry no probability and get a zero gradient."""
    a, b = _inputs((4,), 20)
    a[:, -3:] = -math.inf
    b[:, -3:] = -math.inf
    (la, lb), (ga, gb) = _compare(backend, a, b, divergence="jsd", temperature=2.0)
    assert ga[:, -3:].abs().max() == 0 and gb[:, -3:].abs().max() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_weight_direction_ignores_infinite_divergence(backend):
    """a has -inf where b has mass: KL(P_b || Q_a) = inf, so loss_a is inf when b teaches a, and finite when
    weight_ba = 0 (a then learns from the labels only); loss_b never sees the inf."""
    a, b = _inputs((3,), 11)
    a[:, 0] = -math.inf
    labels = torch.tensor([1, 2, 3])
    (la, lb), _ = _run(a, b, labels, backend=backend, grads=(False, True))
    assert math.isinf(la.item()) and math.isfinite(lb.item())
    (la, lb), (ga, gb) = _run(a, b, labels, backend=backend, weight_ba=0.0)
    assert math.isfinite(la.item()) and torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_side_that_learns_nothing_still_backwards_with_zeros(backend):
    """weight_ab = 0 and hard_b = 0: loss_b is 0 and b's gradient 0 on every backend (the reference's loss_b was cut
    from b: "does not require grad" there, a zero gradient on the fused backends)."""
    a, b = (x.requires_grad_() for x in _inputs((3,), 10))
    la, lb = fastdistill.codistill_loss(a, b, torch.tensor([1, 2, 3]), weight_ab=0.0, hard_weight=(1.0, 0.0),
                                        backend=backend)  # fmt: skip
    lb.backward()
    assert lb.item() == 0 and torch.equal(b.grad, torch.zeros_like(b)) and a.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_and_empty(backend, reduction):
    a, b = _inputs((4,), 9)
    labels = torch.full((4,), -100)
    (la, lb), (ga, gb) = _run(a, b, labels, backend=backend, reduction=reduction)
    assert la.abs().max() == 0 and lb.abs().max() == 0 and ga.abs().max() == 0 and gb.abs().max() == 0
    e_a, e_b = _inputs((0,), 9)
    (la, lb), (ga, _) = _run(e_a, e_b, backend=backend, reduction=reduction)
    assert ga.shape == (0, 9) and not torch.isnan(la).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_num_items(backend):
    a, b = _inputs((6,), 13)
    labels, _ = _options((6,), 13)
    la, lb = fastdistill.codistill_loss(a, b, labels, backend=backend, num_items=10)
    sa, sb = fastdistill.codistill_loss(a, b, labels, backend=backend, reduction="sum")
    assert_close(la, sa / 10, torch.float32, "loss")
    assert_close(lb, sb / 10, torch.float32, "loss")


def test_hard_weight_default_follows_labels():
    a, b = _inputs((5,), 11)
    labels, _ = _options((5,), 11)
    with_labels = fastdistill.codistill_loss(a, b, labels, backend="reference")
    explicit = fastdistill.codistill_loss(a, b, labels, hard_weight=1.0, backend="reference")
    assert torch.equal(with_labels.loss_a, explicit.loss_a)
    none = fastdistill.codistill_loss(a, b, backend="reference")
    zero = fastdistill.codistill_loss(a, b, labels, hard_weight=0.0, backend="reference")
    # without labels every row counts; with them only the labelled ones: compare sums
    s_none = fastdistill.codistill_loss(a, b, backend="reference", reduction="sum")
    assert_close(none.loss_a, s_none.loss_a / 5, torch.float32, "loss")
    assert zero.loss_a < with_labels.loss_a


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight_ab=-1.0), "weight_ab"),
        (dict(weight_ba=math.nan), "weight_ba"),
        (dict(hard_weight=(1.0,)), "hard_weight"),
        (dict(hard_weight=(1.0, -2.0)), r"hard_weight\[1\]"),
        (dict(hard_weight=0.5, labels=None), "needs labels"),
        (dict(divergence="kld"), "divergence"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="avg"), "reduction"),
        (dict(backend="cuda"), "backend='cuda' cannot run"),
        (dict(num_items=3, reduction="sum"), "num_items"),
        (dict(labels=torch.tensor([0, 1, 99, 2])), r"labels must be in \[0, 9\)"),
        (dict(labels=torch.tensor([0, 1, 2])), "labels must have shape"),
        (dict(sample_weight=-torch.ones(4)), "sample_weight"),
    ],
)
def test_errors(kwargs, match):
    a, b = _inputs((4,), 9)
    kwargs = {"labels": torch.tensor([0, 1, 2, 3]), **kwargs}
    labels = kwargs.pop("labels")
    with pytest.raises(ValueError, match=match):
        fastdistill.codistill_loss(a, b, labels, **kwargs)


def test_shape_and_dtype_errors():
    a, b = _inputs((4,), 9)
    with pytest.raises(ValueError, match="logits_b has shape"):
        fastdistill.codistill_loss(a, b[:, :8])
    with pytest.raises(TypeError, match="logits_a must be"):
        fastdistill.codistill_loss(a.long(), b)
    with pytest.raises(ValueError, match="one model's logits"):
        fastdistill.CodistillLoss()(a, [b, b])


def test_module_matches_functional():
    a, b = _inputs((3, 4), 15)
    labels, sw = _options((3, 4), 15)
    kw = dict(temperature=2.0, weight_ab=0.5, weight_ba=2.0, hard_weight=(1.0, 0.5), divergence="jsd", beta=0.4)
    module = fastdistill.CodistillLoss(**kw)
    got = module(a, [b], labels, sample_weight=sw)
    exp = fastdistill.codistill_loss(a, b, labels, sample_weight=sw, **kw)
    assert torch.equal(got.loss_a, exp.loss_a) and torch.equal(got.loss_b, exp.loss_b)
    assert torch.equal(module(a, b[None], labels, sample_weight=sw).loss_b, exp.loss_b)
    assert "weight_ab=0.5" in repr(module)



def test_burn_in_trains_on_the_hard_losses_alone_until_its_step():
    """CodistillLoss(burn_in_steps=2): steps 0 and 1 are codistill_loss with both distillation weights 0, from step
    2 on the full loss; checked arguments; no labels or hard_weight 0 have nothing to burn in on."""
    a, b = _inputs((3, 4), 15)
    labels, _ = _options((3, 4), 15)
    kw = dict(temperature=2.0, weight_ab=0.5, weight_ba=2.0, divergence="jsd")
    module = fastdistill.CodistillLoss(burn_in_steps=2, **kw)
    hard = fastdistill.codistill_loss(a, b, labels, **{**kw, "weight_ab": 0.0, "weight_ba": 0.0})
    full = fastdistill.codistill_loss(a, b, labels, **kw)
    for step, want in ((None, hard), (0, hard), (1, hard), (2, full), (7, full)):
        if step is not None:
            module.set_progress(step, 10)
        got = module(a, b, labels)
        assert torch.equal(got.loss_a, want.loss_a) and torch.equal(got.loss_b, want.loss_b), step
    assert not torch.equal(hard.loss_a, full.loss_a)
    assert "burn_in_steps=2" in repr(module)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="burn_in_steps must be an int >= 0"):
            fastdistill.CodistillLoss(burn_in_steps=bad)
    with pytest.raises(ValueError, match="hard_weight must not be 0"):
        fastdistill.CodistillLoss(burn_in_steps=1, hard_weight=0.0)
    with pytest.raises(ValueError, match="it needs labels"):
        module(a, b)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        module.set_progress(-1, 10)
    # a weight set after construction is checked at the next call, also during burn-in (where it is passed as 0)
    module.set_progress(0, 10)
    module.weight_ba = float("nan")
    with pytest.raises(ValueError, match="weight_ba"):
        module(a, b, labels)


# ---------------------------------------------------------------------------------------------------------------------
# the op as torch sees it


def _op_args(a, b, *, labels=None, sample_weight=None, denominator=None, divergence="kl", temperature=2.0,
             reduce=True, grad_a=True, grad_b=True, hard=(0.0, 0.0)):  # fmt: skip
    return CodistillInputs.bind(
        a=a, b=b, labels=labels, sample_weight=sample_weight, denominator=denominator, divergence=divergence,
        temperature=temperature, kd_scale=temperature**2, weight_ab=0.7, weight_ba=1.3, hard_a=hard[0],
        hard_b=hard[1], div_params=divergences.param_vector(divergence, {"beta": 0.5, "skew": 0.1}),
        ignore_index=-100, reduce=reduce, grad_a=grad_a, grad_b=grad_b,
    )  # fmt: skip


def _sample_args():
    a, b = _inputs((6,), 11)
    labels = torch.tensor([0, -100, 3, 4, 10, 2])
    yield _op_args(a.requires_grad_(), b.requires_grad_())
    yield _op_args(a.detach().requires_grad_(), b.detach(), labels=labels, hard=(0.5, 1.0), reduce=False,
                   divergence="jsd", grad_b=False)  # fmt: skip
    yield _op_args(a.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_(), labels=labels,
                   sample_weight=torch.rand(6), denominator=torch.tensor(5.0), divergence="tvd",
                   hard=(1.0, 0.0))  # fmt: skip
    yield _op_args(a.detach(), b.detach(), grad_a=False, grad_b=False, divergence="reverse_kl")


@requires_ext
@pytest.mark.parametrize("i", range(4))
def test_opcheck(i):
    torch.library.opcheck(torch.ops.fastdistill.codistill_loss.default, list(_sample_args())[i])


@requires_triton
@pytest.mark.parametrize("i", range(4))
def test_triton_opcheck(i):
    """The Triton op as registered under the interpreter (an opaque custom op with the shared fake kernel)."""
    from fastdistill.ops.triton.codistill_loss import codistill_loss_triton

    args = list(list(_sample_args())[i])
    args[0], args[1] = args[0].contiguous(), args[1].contiguous()
    torch.library.opcheck(codistill_loss_triton._opoverload, args)


@pytest.mark.parametrize(
    "op_backend, compiler",
    [pytest.param("cpu", "aot_eager", marks=requires_ext), pytest.param("cpu", "inductor", marks=requires_ext),
     pytest.param("triton", "aot_eager", marks=requires_triton)],
)  # fmt: skip
def test_compile_fullgraph(op_backend, compiler):
    """The module under torch.compile(fullgraph=True): values and both gradients as in eager mode."""
    a, b = _inputs((3, 4), 17)
    labels, sw = _options((3, 4), 17)
    module = fastdistill.CodistillLoss(temperature=2.0, weight_ba=0.5, hard_weight=(0.3, 0.5),
                                       divergence="skew_reverse_kl", backend=op_backend)  # fmt: skip

    def fn(x, y):
        la, lb = module(x, y, labels, sample_weight=sw)
        return la + 2 * lb

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    A1, B1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    A2, B2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    out_c, out_e = compiled(A1, B1), fn(A2, B2)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(A1.grad, A2.grad)
    torch.testing.assert_close(B1.grad, B2.grad)


@requires_ext
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence):
    a, b = _inputs((3,), 5, torch.float64, scale=1.0)
    labels = torch.tensor([1, -100, 4])

    def losses(x, y):
        return fastdistill.codistill_loss(x, y, labels, temperature=1.7, weight_ab=0.6, weight_ba=1.5,
                                          hard_weight=(0.3, 0.8), divergence=divergence, reduction="none",
                                          beta=0.3, skew=0.25, backend="cpu")  # fmt: skip

    # Each loss is differentiated w.r.t. its own model, the other held fixed (numerically, loss_a does move with b:
    # the stop-gradient is the method). The fixed model still requires grad, so both kernel gradients are on.
    a_leaf, b_leaf = a.clone().requires_grad_(), b.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: losses(x, b_leaf).loss_a, (a_leaf,))
    assert torch.autograd.gradcheck(lambda y: losses(a_leaf, y).loss_b, (b_leaf,))


@requires_ext
def test_bitwise_deterministic():
    a, b = _inputs((64,), 3000)
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            (la, lb), (ga, gb) = _run(a, b, backend="cpu", divergence="jsd")
            runs.append((la, lb, ga, gb))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(run, runs[0]))


@requires_ext
def test_gradients_only_when_needed(monkeypatch):
    calls = []
    op = torch.ops.fastdistill.codistill_loss

    class Spy:
        def __call__(self, *args):
            calls.append(args[-2:])
            return op(*args)

    monkeypatch.setattr(torch.ops.fastdistill, "codistill_loss", Spy())
    a, b = _inputs((3,), 7)
    fastdistill.codistill_loss(a, b, backend="cpu")
    fastdistill.codistill_loss(a.requires_grad_(), b, backend="cpu")
    with torch.no_grad():
        fastdistill.codistill_loss(a, b.requires_grad_(), backend="cpu")
    assert calls == [(False, False), (True, False), (False, False)]


# ---------------------------------------------------------------------------------------------------------------------
# the loop's co-training mode


def _loop_setup(tmp_path, **kw):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = ArrayDataset(input=x, labels=y)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b = torch.nn.Linear(8, 3)
    loop = DistillationLoop(a, [b], loss=fastdistill.CodistillLoss(temperature=2.0, weight_ab=0.5),
                            train_teachers=True, batch_size=16, progress=False, log_every=2, seed=0,
                            output_dir=tmp_path, **kw)  # fmt: skip
    return loop, data, a, b


def test_loop_co_trains_both_models(tmp_path):
    loop, data, a, b = _loop_setup(tmp_path)
    b0 = [p.detach().clone() for p in b.parameters()]
    out = loop.fit(data, max_steps=6, eval_data=data, checkpoint_every=3)
    assert all(not torch.equal(p, q) for p, q in zip(b.parameters(), b0))  # model b trained too
    train = [r for r in loop.history if r["split"] == "train"][-1]
    assert {"loss_a", "loss_b", "kd"} <= set(train)
    assert train["kd"] == pytest.approx(train["loss_a"] + train["loss_b"], rel=1e-5)
    assert {"loss", "accuracy", "teacher0/loss", "teacher0/accuracy"} <= set(out)
    assert out["teacher0/loss"] == pytest.approx(loop.evaluate(data, model=b)["loss"])

    # burn-in: the loop reports its progress to the loss; with burn_in_steps=3 the first three steps are those of
    # weights 0 (each model its cross-entropy alone), the rest those of the full loss
    runs = {}
    for name, loss in (("burn", fastdistill.CodistillLoss(temperature=2.0, weight_ab=0.5, burn_in_steps=3)),
                       ("hard", fastdistill.CodistillLoss(temperature=2.0, weight_ab=0.0, weight_ba=0.0))):  # fmt: skip
        run, _, ra, rb = _loop_setup(tmp_path / name)
        run.loss_fn = loss
        run.fit(data, max_steps=3)
        after3 = [p.detach().clone() for p in [*ra.parameters(), *rb.parameters()]]
        run.fit(data, max_steps=4)
        runs[name] = after3, [p.detach().clone() for p in [*ra.parameters(), *rb.parameters()]]
    assert all(torch.equal(p, q) for p, q in zip(runs["burn"][0], runs["hard"][0]))
    assert not all(torch.equal(p, q) for p, q in zip(runs["burn"][1], runs["hard"][1]))

    # checkpoints hold both models: resuming continues exactly
    loop2, _, a2, b2 = _loop_setup(tmp_path / "resumed")
    loop2.load_checkpoint(tmp_path / "checkpoints" / "step-00000003")
    loop2.fit(data, max_steps=6)
    for p, q in zip([*a.parameters(), *b.parameters()], [*a2.parameters(), *b2.parameters()]):
        assert torch.equal(p, q)
