"""Triton backend of co-distillation (``fastdistill::codistill_loss``): two models distil into each other from one
launch that reads both logit rows together and writes both losses and both gradients.

Per row i, with P_a = softmax(a_i / T), P_b = softmax(b_i / T), the other model's distribution a constant:

    loss_a_i = w_i (hard_a CE(a_i) + kd_a D(P_b, Q_a))      kd_a = kd_scale * weight_ba   (b teaches a)
    loss_b_i = w_i (hard_b CE(b_i) + kd_b D(P_a, Q_b))      kd_b = kd_scale * weight_ab   (a teaches b)

One program per row, three sweeps over it in BLOCK-wide tiles, the passes of ``csrc/cpu/codistill_cpu.cpp``:

  sweep 1  reads a and b once: online max / log-sum-exp of both at T (and at T = 1 for the cross-entropy, T != 1),
           per group of 8 columns in each thread's registers (``row_math.group_stats``);
  sweep 2  both divergences' terms (``row_math.divergence_terms``: the math of ``csrc/common/kd_math.h``) and their
           aggregates sum_v Q dphi/dQ; a gradient with a closed form (KL: Q - P; or cross-entropy alone) is written
           here;
  sweep 3  only for the other divergences: dD/d(x / T) = gq - Q sum_v gq, terms recomputed from the logits.

Rows that are skipped (label == ignore_index, or sample weight 0) are not read: their losses and gradients are
written as 0. Per-row losses go to two [N] buffers reduced with ``torch.sum`` (no float atomics: bitwise
reproducible). float32 accumulation (float64 for float64 inputs, parameters included); no [N, V] temporaries;
gradients are written in the forward launch and backward only scales them (``registration._codistill_backward``).

Compiled variants (``launch.py``'s rules; ``CODISTILL_DOMAINS``): the divergence, ALIGNED and the dtype. Which
directions and cross-entropies are on, the optional inputs and the wanted gradients are run-time flags.
"""

import math
import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import divergences
from ..inputs import CodistillInputs
from ..registration import codistill_fake, register_codistill_triton
from .kd_loss import DIV_CODES, NUM_WARPS, pack_params
from .launch import (
    ROW_KERNEL_GPU_DTYPES,
    Launch,
    acc_dtype,
    check_row_dtype,
    fast_math,
    int_tensor,
    is_aligned,
    jit_pair,
    param_tensor,
    tl_acc,
)
from .row_math import ce_grad, divergence_terms, finish_stats, group_stats, label_nll, log_probs, row_weight

BLOCK = 1024  # two [BLOCK] rows per tile, 8 columns (one 16-byte bf16 vector) per thread of 4 warps: kd_loss's
# tile (kd_loss.NUM_WARPS)

@triton.jit
def _side_grad(x, q, gq, gq_sum, m_ce, log_l_ce, cols, label, kd_over_t, hard, CLOSED: tl.constexpr, kd, ce,
               ce_at_t):  # fmt: skip
    """d(row loss) / dx of one model for one tile, before the factor w_i / denominator. m_ce, log_l_ce: the
    normaliser of the cross-entropy's softmax at T = 1 (used when T != 1), split as in log_softmax (kd_loss.py).
    kd, ce, ce_at_t: run-time flags."""
    g = tl.zeros_like(q)
    if kd != 0:
        if CLOSED:  # KL: dD/d(x / T) = Q - P = Q + gq, no aggregate needed
            g = kd_over_t * (q + gq)
        else:
            g = kd_over_t * (gq - q * gq_sum)
    if ce != 0:
        g += hard * ce_grad(x, q, m_ce, log_l_ce, cols, label, ce_at_t)
    return g


def _codistill_row(
    a_ptr, b_ptr, lab_ptr, sw_ptr, den_ptr, loss_a_ptr, loss_b_ptr, ga_ptr, gb_ptr, prm_ptr, int_ptr,
    BLOCK: tl.constexpr, DIV: tl.constexpr, CLOSED: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    """One program per row; the kernel pair ``_codistill_row_kernel`` (launch.py). DIV: the divergence's code;
    CLOSED: its student gradient has a closed form (both from ops/divergences.py)."""
    row = tl.program_id(0).to(tl.int64)
    # integer arguments, int64 (the order of codistill_launch's int_tensor): offsets are 64-bit from the start
    V = tl.load(int_ptr + 0)
    a_stride = tl.load(int_ptr + 1)
    b_stride = tl.load(int_ptr + 2)
    ignore_index = tl.load(int_ptr + 3)
    has_labels = tl.load(int_ptr + 4)
    has_sw = tl.load(int_ptr + 5)
    has_den = tl.load(int_ptr + 6)
    # a direction is on when its weight != 0; off, its D is never evaluated (no 0 * inf); ce_*: hard weight != 0
    kd_a_on = tl.load(int_ptr + 7)
    kd_b_on = tl.load(int_ptr + 8)
    ce_a = tl.load(int_ptr + 9)
    ce_b = tl.load(int_ptr + 10)
    ce_at_t = tl.load(int_ptr + 11)
    grad_a = tl.load(int_ptr + 12)
    grad_b = tl.load(int_ptr + 13)
    if ALIGNED:  # the launcher checked these are multiples of 16: said so, the loads become 16-byte vectors
        V = V // 16 * 16
        a_stride = a_stride // 16 * 16
        b_stride = b_stride // 16 * 16
    V32 = V.to(tl.int32)  # column indices within a row stay 32-bit; row offsets are 64-bit
    if ALIGNED:
        V32 = V32 // 16 * 16
    # float parameters come in a tensor of the accumulation dtype (scalar kernel arguments would be float32), in the
    # order of CODISTILL_PARAMS
    inv_t = tl.load(prm_ptr + 0)
    kd_a = tl.load(prm_ptr + 1)  # kd_scale * weight_ba: b teaches a
    kd_b = tl.load(prm_ptr + 2)  # kd_scale * weight_ab: a teaches b
    kd_a_over_t = tl.load(prm_ptr + 3)
    kd_b_over_t = tl.load(prm_ptr + 4)
    hard_a = tl.load(prm_ptr + 5)
    hard_b = tl.load(prm_ptr + 6)
    dw = tl.load(prm_ptr + 7)  # the divergence's parameter vector (ops/divergences.py: kernel_params)
    log_dw = tl.load(prm_ptr + 8)
    log_1m_dw = tl.load(prm_ptr + 9)
    sw, f, label, valid = row_weight(row, sw_ptr, lab_ptr, den_ptr, ignore_index, has_sw, has_labels, has_den,
                                      ce_a | ce_b, V, ACC)  # fmt: skip
    a_row = a_ptr + row * a_stride
    b_row = b_ptr + row * b_stride
    ga_row = ga_ptr + row * V
    gb_row = gb_ptr + row * V
    n_blocks = tl.cdiv(V32, BLOCK)
    n_live = tl.where(valid, n_blocks, 0)  # a skipped row is never read (its logits may be anything, -inf rows too)
    own_ca = (ce_a != 0) & (ce_at_t == 0)  # the cross-entropy is at T = 1: its own normaliser unless T = 1
    own_cb = (ce_b != 0) & (ce_at_t == 0)
    # a gradient with a closed form (KL, or no distillation term) is written in sweep 2, the others in sweep 3
    late_a = (grad_a != 0) & (kd_a_on != 0)  # (read only when not CLOSED)
    late_b = (grad_b != 0) & (kd_b_on != 0)
    early_a = grad_a != 0
    early_b = grad_b != 0
    if not CLOSED:
        early_a = early_a & (kd_a_on == 0)
        early_b = early_b & (kd_b_on == 0)

    # ---- sweep 1: both rows read once; normalisers per group of 8 columns (row_math.group_stats) ----------------
    m_a = tl.full((BLOCK // 8,), float("-inf"), ACC)
    l_a = tl.zeros((BLOCK // 8,), ACC)
    m_b = tl.full((BLOCK // 8,), float("-inf"), ACC)
    l_b = tl.zeros((BLOCK // 8,), ACC)
    m_ca = tl.full((BLOCK // 8,), float("-inf"), ACC)
    l_ca = tl.zeros((BLOCK // 8,), ACC)
    m_cb = tl.full((BLOCK // 8,), float("-inf"), ACC)
    l_cb = tl.zeros((BLOCK // 8,), ACC)
    for blk in range(0, n_live):
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < V32
        a = tl.load(a_row + cols, mask=cmask, other=float("-inf")).to(ACC)
        b = tl.load(b_row + cols, mask=cmask, other=float("-inf")).to(ACC)
        m_a, l_a = group_stats(m_a, l_a, a * inv_t)
        m_b, l_b = group_stats(m_b, l_b, b * inv_t)
        if own_ca:
            m_ca, l_ca = group_stats(m_ca, l_ca, a)
        if own_cb:
            m_cb, l_cb = group_stats(m_cb, l_cb, b)
    # normalisers kept split, as (max, log of the exp-sum below it): see row_math.log_softmax
    m_a, ll_a = finish_stats(m_a, l_a)
    m_b, ll_b = finish_stats(m_b, l_b)
    m_ca, ll_ca = finish_stats(m_ca, l_ca)
    m_cb, ll_cb = finish_stats(m_cb, l_cb)
    if ce_at_t != 0:  # x * (1 / T) is x itself
        m_ca = m_a
        ll_ca = ll_a
        m_cb = m_b
        ll_cb = ll_b

    # ---- sweep 2: both divergences and their aggregates; gradients with a closed form ---------------------------
    # summed per column across the tiles, reduced once after the loop (no tile-wide reduction inside it); the
    # closed-form gradient (KL) needs no aggregate, so gq_sum_* are read only in sweep 3
    phi_a = tl.zeros((BLOCK,), ACC)
    phi_b = tl.zeros((BLOCK,), ACC)
    gq_sum_a = tl.zeros((BLOCK,), ACC)
    gq_sum_b = tl.zeros((BLOCK,), ACC)
    for blk in range(0, n_live):
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < V32
        a, logq_a, q_a = log_probs(a_row, cols, cmask, inv_t, m_a, ll_a, ACC)
        b, logq_b, q_b = log_probs(b_row, cols, cmask, inv_t, m_b, ll_b, ACC)
        gq_a = q_a  # (unused unless kd_a_on)
        gq_b = q_b
        if kd_a_on != 0:  # a learns from b: P = P_b, Q = Q_a
            t_phi, gq_a, _ = divergence_terms(q_b, q_a, logq_b, logq_a, DIV, dw, log_dw, log_1m_dw, FAST)  # fmt: skip
            phi_a += tl.where(cmask, t_phi, 0.0)
            if not CLOSED:
                gq_sum_a += tl.where(cmask, gq_a, 0.0)
        if kd_b_on != 0:  # b learns from a: P = P_a, Q = Q_b
            t_phi, gq_b, _ = divergence_terms(q_a, q_b, logq_a, logq_b, DIV, dw, log_dw, log_1m_dw, FAST)  # fmt: skip
            phi_b += tl.where(cmask, t_phi, 0.0)
            if not CLOSED:
                gq_sum_b += tl.where(cmask, gq_b, 0.0)
        if early_a:  # (no aggregate: early means closed form or no distillation term)
            g = _side_grad(a, q_a, gq_a, 0.0, m_ca, ll_ca, cols, label, kd_a_over_t, hard_a, CLOSED, kd_a_on, ce_a,
                           ce_at_t)  # fmt: skip
            tl.store(ga_row + cols, f * g, mask=cmask)
        if early_b:
            g = _side_grad(b, q_b, gq_b, 0.0, m_cb, ll_cb, cols, label, kd_b_over_t, hard_b, CLOSED, kd_b_on, ce_b,
                           ce_at_t)  # fmt: skip
            tl.store(gb_row + cols, f * g, mask=cmask)

    phi_a = tl.sum(phi_a, 0)
    phi_b = tl.sum(phi_b, 0)
    gq_sum_a = tl.sum(gq_sum_a, 0)
    gq_sum_b = tl.sum(gq_sum_b, 0)
    # a direction with weight 0 adds exactly 0, even where its D would be inf
    loss_a = tl.zeros((), ACC)
    loss_b = tl.zeros((), ACC)
    if kd_a_on != 0:
        loss_a = kd_a * phi_a
    if kd_b_on != 0:
        loss_b = kd_b * phi_b
    lab_ok = valid & (label >= 0) & (label < V)  # (never read outside the row, whatever the labels)
    if ce_a != 0:
        loss_a += hard_a * label_nll(tl.load(a_row + label, mask=lab_ok, other=0.0).to(ACC), m_ca, ll_ca)
    if ce_b != 0:
        loss_b += hard_b * label_nll(tl.load(b_row + label, mask=lab_ok, other=0.0).to(ACC), m_cb, ll_cb)
    tl.store(loss_a_ptr + row, tl.where(valid, sw * loss_a, 0.0))
    tl.store(loss_b_ptr + row, tl.where(valid, sw * loss_b, 0.0))

    # ---- sweep 3: gradients that needed the aggregates (divergences other than KL) ------------------------------
    if not CLOSED:
        if late_a | late_b:
            for blk in range(0, n_live):
                cols = blk * BLOCK + tl.arange(0, BLOCK)
                cmask = cols < V32
                a, logq_a, q_a = log_probs(a_row, cols, cmask, inv_t, m_a, ll_a, ACC)
                b, logq_b, q_b = log_probs(b_row, cols, cmask, inv_t, m_b, ll_b, ACC)
                if late_a:
                    _, gq_a, _ = divergence_terms(q_b, q_a, logq_b, logq_a, DIV, dw, log_dw, log_1m_dw,
                                                  FAST)  # fmt: skip
                    g = _side_grad(a, q_a, gq_a, gq_sum_a, m_ca, ll_ca, cols, label, kd_a_over_t, hard_a, CLOSED,
                                   kd_a_on, ce_a, ce_at_t)  # fmt: skip
                    tl.store(ga_row + cols, f * g, mask=cmask)
                if late_b:
                    _, gq_b, _ = divergence_terms(q_a, q_b, logq_a, logq_b, DIV, dw, log_dw, log_1m_dw,
                                                  FAST)  # fmt: skip
                    g = _side_grad(b, q_b, gq_b, gq_sum_b, m_cb, ll_cb, cols, label, kd_b_over_t, hard_b, CLOSED,
                                   kd_b_on, ce_b, ce_at_t)  # fmt: skip
                    tl.store(gb_row + cols, f * g, mask=cmask)

    # ---- skipped rows: zero gradients (the sweeps above did not run) ----------------------------------------------
    if (grad_a != 0) | (grad_b != 0):
        for blk in range(0, n_blocks - n_live):
            cols = blk * BLOCK + tl.arange(0, BLOCK)
            cmask = cols < V32
            zero = tl.zeros((BLOCK,), ACC)
            if grad_a != 0:
                tl.store(ga_row + cols, zero, mask=cmask)
            if grad_b != 0:
                tl.store(gb_row + cols, zero, mask=cmask)


_codistill_row_kernel = jit_pair(
    _codistill_row, small=("lab_ptr", "sw_ptr", "den_ptr", "loss_a_ptr", "loss_b_ptr", "prm_ptr", "int_ptr")
)
# the compiled variants: every value each constexpr can take (aot.py checks the launcher reaches exactly these)
CODISTILL_DOMAINS = {"BLOCK": (BLOCK,), "DIV": tuple(DIV_CODES.values()), "CLOSED": (False, True),
                     "ALIGNED": (False, True), "ACC": ("fp32",), "FAST": (True,)}  # fmt: skip
KERNELS = [_codistill_row_kernel]
# The float parameters, in the order the kernel loads them from prm_ptr (kd_loss.pack_params).
CODISTILL_PARAMS = ("inv_t", "kd_a", "kd_b", "kd_a_over_t", "kd_b_over_t", "hard_a", "hard_b", "div")


def _codistill_loss_triton(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Triton twin of ``fastdistill::codistill_loss`` (arguments: ``CodistillInputs.ARGS``; math:
    ``reference.codistill_loss``). a, b: [N, V] logits of one dtype; labels int64 [N] or None; sample_weight [N] or
    None; denominator 0-dim or None (used when ``reduce``). Returns (loss_a, loss_b, grad_a, grad_b): the losses
    0-dim (``reduce``) or [N], float32 (float64 for float64 inputs); d(loss_a)/da and d(loss_b)/db [N, V] in the
    inputs' dtype, or empty [0] tensors when ``grad_a`` / ``grad_b`` is False."""
    x = CodistillInputs.named(args)
    if x.a.dim() != 2 or x.b.shape != x.a.shape:
        raise ValueError(f"fastdistill::codistill_loss_triton: a, b must be [N, V] of one shape, got "
                         f"{tuple(x.a.shape)} and {tuple(x.b.shape)}")  # fmt: skip
    if x.a.dtype != x.b.dtype:
        raise TypeError(f"fastdistill::codistill_loss_triton: a and b must share a dtype, got {x.a.dtype}, "
                        f"{x.b.dtype}")  # fmt: skip
    divergences.get(x.divergence)
    if not (math.isfinite(x.temperature) and x.temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {x.temperature}")
    if (x.hard_a != 0 or x.hard_b != 0) and x.labels is None:
        raise ValueError("a hard-label weight > 0 needs labels")
    # rows of unit stride along V (the row stride is a kernel argument)
    x.a = x.a if x.a.stride(-1) == 1 else x.a.contiguous()
    x.b = x.b if x.b.stride(-1) == 1 else x.b.contiguous()
    launch, rows_a, rows_b, ga, gb = codistill_launch(x)
    launch.run()
    if not x.reduce:
        return rows_a, rows_b, ga, gb
    # ordered reductions of the [N] buffers: deterministic
    total_a, total_b = rows_a.sum(), rows_b.sum()
    if x.denominator is not None:
        total_a, total_b = total_a / x.denominator.to(total_a.dtype), total_b / x.denominator.to(total_a.dtype)
    return total_a, total_b, ga, gb


def codistill_launch(x: SimpleNamespace) -> tuple[Launch, Tensor, Tensor, Tensor, Tensor]:
    """The launch of ``_codistill_row_kernel`` for a call's arguments by name (``CodistillInputs.named``, rows of
    unit stride) and its outputs (per-row losses [N] x 2, the two gradients). Works on meta tensors (aot.py)."""
    a, b = x.a, x.b
    check_row_dtype("codistill_loss", a.dtype)
    div = divergences.get(x.divergence)
    if len(x.div_params) != len(div.params):
        raise ValueError(f"div_params: {div.name} takes {len(div.params)} parameter(s), got {len(x.div_params)}")
    n, v = a.shape
    dev = a.device
    acc = acc_dtype(a.dtype)
    empty = n == 0 or v == 0
    alloc = torch.zeros if empty else torch.empty
    rows_a = alloc(n, device=dev, dtype=acc)
    rows_b = alloc(n, device=dev, dtype=acc)
    ga = torch.empty((n, v) if x.grad_a else (0,), device=dev, dtype=a.dtype)
    gb = torch.empty((n, v) if x.grad_b else (0,), device=dev, dtype=b.dtype)
    dummy = rows_a
    sw = x.sample_weight.to(acc).contiguous() if x.sample_weight is not None else dummy
    has_den = x.reduce and x.denominator is not None
    den = x.denominator.to(acc).reshape(1) if has_den else dummy
    lab = x.labels.to(torch.int64).contiguous() if x.labels is not None else torch.empty(1, device=dev,
                                                                                        dtype=torch.int64)  # fmt: skip
    kd_a, kd_b = x.kd_scale * x.weight_ba, x.kd_scale * x.weight_ab  # b teaches a (in loss_a); a teaches b (in loss_b)
    prm = param_tensor(pack_params(CODISTILL_PARAMS, inv_t=1.0 / x.temperature, kd_a=kd_a, kd_b=kd_b,
                                   kd_a_over_t=kd_a / x.temperature, kd_b_over_t=kd_b / x.temperature,
                                   hard_a=x.hard_a, hard_b=x.hard_b, div=x.div_params), acc, a)  # fmt: skip
    ints = int_tensor([v, a.stride(0), b.stride(0), x.ignore_index, x.labels is not None, x.sample_weight is not None,
                       has_den, kd_a != 0, kd_b != 0, x.hard_a != 0, x.hard_b != 0, x.temperature == 1.0, x.grad_a,
                       x.grad_b], a)  # fmt: skip
    aligned = is_aligned([a, b, ga, gb], [v, a.stride(0), b.stride(0)])
    launch = Launch(
        _codistill_row_kernel.pick(aligned), (0 if empty else n,),
        (a, b, lab, sw, den, rows_a, rows_b, ga, gb, prm, ints),
        dict(BLOCK=BLOCK, DIV=div.code, CLOSED=div.closed_form, ALIGNED=aligned, ACC=tl_acc(a.dtype),
             FAST=fast_math(a.dtype)),
        {"num_warps": NUM_WARPS},
    )  # fmt: skip
    return launch, rows_a, rows_b, ga, gb


def kl_call(a: Tensor, b: Tensor, **changes) -> SimpleNamespace:
    """The arguments by name of a plain KL co-distillation call (T = 2, both directions, no optional inputs, both
    gradients, per-row losses), ``changes`` replacing any of them: for launchers built outside a call."""
    args = dict(a=a, b=b, labels=None, sample_weight=None, denominator=None, divergence="kl", temperature=2.0,
                kd_scale=4.0, weight_ab=1.0, weight_ba=1.0, hard_a=0.0, hard_b=0.0, div_params=[], ignore_index=-100,
                reduce=False, grad_a=True, grad_b=True)  # fmt: skip
    return CodistillInputs.named(CodistillInputs.bind(**{**args, **changes}))


def codistill_space():
    """The launches of the whole problem space on meta tensors (aot.py compiles each distinct one): every dtype
    and divergence, aligned and not, the run-time flags both ways (they must not fork the compile)."""
    for dtype in ROW_KERNEL_GPU_DTYPES:
        for name, div in divergences.DIVERGENCES.items():
            for v in (4096, 4097):
                for on in (False, True):
                    x = torch.empty(8, v, device="meta", dtype=dtype)
                    opt = (lambda t: t if on else None)  # noqa: E731
                    yield codistill_launch(CodistillInputs.named(CodistillInputs.bind(
                        a=x, b=x, labels=opt(torch.empty(8, device="meta", dtype=torch.int64)),
                        sample_weight=opt(torch.empty(8, device="meta")),
                        denominator=opt(torch.empty((), device="meta")), divergence=name,
                        temperature=1.0 if on else 2.0, kd_scale=4.0, weight_ab=1.0, weight_ba=0.0 if on else 1.0,
                        hard_a=0.5 if on else 0.0, hard_b=0.0, div_params=[p.default for p in div.params],
                        ignore_index=-100, reduce=on, grad_a=True, grad_b=on)))[0]  # fmt: skip


CodistillInputs.typed(_codistill_loss_triton)
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Triton's interpreter cannot be traced (wrap_triton needs a compiled JITFunction), so here the op is opaque to
    # torch.compile, with a fake kernel (the C++ op's); on a GPU it is a triton_op and torch.compile traces into it.
    codistill_loss_triton = torch.library.custom_op("fastdistill::codistill_loss_triton", mutates_args=())(
        _codistill_loss_triton
    )
    codistill_loss_triton.register_fake(codistill_fake)
else:
    codistill_loss_triton = torch.library.triton_op("fastdistill::codistill_loss_triton", mutates_args=())(
        _codistill_loss_triton
    )
register_codistill_triton(codistill_loss_triton)
