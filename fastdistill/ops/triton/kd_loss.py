"""Triton backend of the fused KD loss: one program per row, three sweeps over the row in BLOCK-wide tiles.

Sweep 1 reads the student and the K teachers once ([KP, BLOCK] tiles of the stacked [K, N, V] teachers) and keeps
online-softmax statistics per group of 8 columns, in each thread's registers (``row_math.group_stats``: no block-wide
reduction inside the loop); sweep 2 evaluates the divergence terms (the math of ``csrc/common/kd_math.h``, in
``row_math.divergence_terms``) and the row aggregates the gradients need, writing the student gradient directly when
it has a closed form (KL); sweep 3, only when needed, writes the remaining gradients. Per-row losses go to an [N] buffer
reduced with ``torch.sum`` (no float atomics: bitwise reproducible). float32 accumulation (float64 for float64
inputs); no [K, N, V] temporaries; gradients are written in the forward launch and backward only scales them (on the
GPU in place, skipped where grad_output is 1: ``scale.py``). Design, SASS counts and the prediction of this version
(v2): benchmarks/NOTES.md, issue 17.

Compiled variants (``launch.py``'s rules; ``KD_DOMAINS`` lists them, ``aot.py`` compiles every one): the divergence
(DIV), the ensemble mode (ENS: one teacher, mixture, log-linear pool, one target per teacher), the teacher bucket KP
(K rounded up to a power of two, 1..16; K itself is a runtime value), BLOCK = min(1024, 4096 / KP), ALIGNED and the
dtype; CLOSED and LOG_TARGET follow from the divergence (``ops/divergences.py``). The
optional inputs, the cross-entropy and which gradients are wanted are runtime flags: uniform branches per program.
"""

import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import divergences
from ..inputs import KDInputs
from ..registration import register_triton
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
from .row_math import (
    ce_grad,
    divergence_terms,
    fexp,
    finish_stats,
    flog,
    group_stats,
    label_nll,
    log_probs,
    log_softmax,
    reload,
    row_weight,
)

DIV_CODES = {name: d.code for name, d in divergences.DIVERGENCES.items()}  # the codes divergence_terms branches on
# ENS: 0 one teacher (K = 1, any ensemble), 1 mixture (prob_mean), 2 log-linear pool (logit_mean), 3 one target per
# teacher (loss_mean)
ENS_CODES = {"prob_mean": 1, "logit_mean": 2, "loss_mean": 3}
MAX_TEACHERS = KDInputs.MAX_TEACHERS  # KP buckets 1..16: each bucket is one more set of compiled kernels
# 4 warps of 32 threads x 8 columns = BLOCK: one 16-byte bf16 vector per thread and input row, the group of
# group_stats. v2's benchmark configurations take 79 (K = 1) / 109 (K = 4) registers without spills: 6 / 4 programs
# per SM (v1: 8 warps, [KP, 8192 / KP] tiles, 2 programs): make kernels-report, benchmarks/NOTES.md.
NUM_WARPS = 4


def _kd_row(
    s_ptr, t_ptr, tw_ptr, lab_ptr, sw_ptr, den_ptr, loss_ptr, gs_ptr, gt_ptr, prm_ptr, int_ptr,
    KP: tl.constexpr, BLOCK: tl.constexpr, DIV: tl.constexpr, CLOSED: tl.constexpr, LOG_TARGET: tl.constexpr,
    ENS: tl.constexpr, FAST: tl.constexpr,
    ALIGNED: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One program per row; the kernel pair ``_kd_row_kernel`` (launch.py). DIV: the divergence's code; CLOSED: its
    student gradient has a closed form (both from ops/divergences.py); ENS: see ENS_CODES."""
    row = tl.program_id(0).to(tl.int64)
    # integer arguments, int64 (the order of kd_launch's int_tensor): every offset below is 64-bit from the start
    N = tl.load(int_ptr + 0)
    V = tl.load(int_ptr + 1)
    s_stride = tl.load(int_ptr + 2)
    t_stride_k = tl.load(int_ptr + 3)
    t_stride_n = tl.load(int_ptr + 4)
    ignore_index = tl.load(int_ptr + 5)
    K = tl.load(int_ptr + 6)
    has_tw = tl.load(int_ptr + 7)
    has_labels = tl.load(int_ptr + 8)
    has_sw = tl.load(int_ptr + 9)
    has_den = tl.load(int_ptr + 10)
    ce = tl.load(int_ptr + 11)  # cross-entropy term on (ce_weight > 0)
    ce_at_t = tl.load(int_ptr + 12)  # T == 1: the cross-entropy's softmax is Q itself
    grad_s = tl.load(int_ptr + 13)
    grad_t = tl.load(int_ptr + 14)
    if ALIGNED:  # the launcher checked these are multiples of 16: said so, the loads become 16-byte vectors
        V = V // 16 * 16
        s_stride = s_stride // 16 * 16
        t_stride_k = t_stride_k // 16 * 16
        t_stride_n = t_stride_n // 16 * 16
    V32 = V.to(tl.int32)  # column indices within a row stay 32-bit (V < 2**31); row offsets are 64-bit
    if ALIGNED:
        V32 = V32 // 16 * 16
    n_blocks = tl.cdiv(V32, BLOCK)
    # float parameters come in a tensor of the accumulation dtype (scalar kernel arguments would be float32), in the
    # order of KD_PARAMS
    inv_t = tl.load(prm_ptr + 0)
    kd_scale = tl.load(prm_ptr + 1)
    kd_over_t = tl.load(prm_ptr + 2)
    ce_w = tl.load(prm_ptr + 3)
    uniform = tl.load(prm_ptr + 4)  # 1 / K
    dw = tl.load(prm_ptr + 5)  # the divergence's parameter vector (ops/divergences.py: kernel_params)
    log_dw = tl.load(prm_ptr + 6)
    log_1m_dw = tl.load(prm_ptr + 7)
    ks = tl.arange(0, KP)
    ks64 = ks.to(tl.int64)
    kmask = ks < K
    w = tl.where(kmask, uniform, 0.0)
    if has_tw != 0:
        w = tl.load(tw_ptr + ks64 * N + row, mask=kmask, other=0.0).to(ACC)
    logw = tl.log(w)
    kuse = w > 0  # the teachers this row reads: one of weight 0 is dropped, whatever its logits (NaN included)
    sw, f, label, valid = row_weight(row, sw_ptr, lab_ptr, den_ptr, ignore_index, has_sw, has_labels, has_den, ce, V,
                                      ACC)  # fmt: skip
    ce_own = (ce != 0) & (ce_at_t == 0)  # the cross-entropy needs its own normaliser (at T = 1)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride_n + ks64[:, None] * t_stride_k
    gs_row = gs_ptr + row * V

    # ---- sweep 1: normalisers, per group of 8 columns (group_stats), combined once after the loop ---------------
    m_q = tl.full((BLOCK // 8,), float("-inf"), ACC)
    l_q = tl.zeros((BLOCK // 8,), ACC)
    m_ce = tl.full((BLOCK // 8,), float("-inf"), ACC)
    l_ce = tl.zeros((BLOCK // 8,), ACC)
    m_t = tl.full((KP, BLOCK // 8), float("-inf"), ACC)
    l_t = tl.zeros((KP, BLOCK // 8), ACC)
    m_c = tl.full((BLOCK // 8,), float("-inf"), ACC)
    l_c = tl.zeros((BLOCK // 8,), ACC)
    for b in range(0, n_blocks):
        cols = b * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < V32
        s = tl.load(s_row + cols, mask=cmask, other=float("-inf")).to(ACC)
        m_q, l_q = group_stats(m_q, l_q, s * inv_t)
        if ce_own:
            m_ce, l_ce = group_stats(m_ce, l_ce, s)
        x = tl.load(t_row + cols[None, :], mask=kuse[:, None] & cmask[None, :], other=float("-inf")).to(ACC) * inv_t
        if ENS == 2:  # pooled logits sum_k w_k t_k / T (a zero weight drops the teacher, -inf included)
            c = tl.sum(tl.where(w[:, None] > 0, w[:, None] * x, 0.0), 0)
            c = tl.where(cmask, c, float("-inf"))
            m_c, l_c = group_stats(m_c, l_c, c)
        else:
            m_t, l_t = group_stats(m_t, l_t, x)
    # normalisers kept split, as (max, log of the exp-sum below it): see log_softmax
    m_q, ll_q = finish_stats(m_q, l_q)
    m_ce, ll_ce = finish_stats(m_ce, l_ce)
    if ce_at_t != 0:  # s * (1 / T) is s itself
        m_ce = m_q
        ll_ce = ll_q
    # Dropped teachers (padded, weight 0): (0, 0), so that (x - 0) - 0 stays -inf. A teacher that counts but has no
    # finite logit in the row has no distribution: NaN (as log_softmax gives); a NaN logit makes l_t NaN by itself.
    m_t, ll_t = finish_stats(m_t, l_t)
    dead = m_t == float("-inf")
    m_t = tl.where(dead, tl.where(kuse, float("nan"), 0.0), m_t)
    ll_t = tl.where(dead, 0.0, ll_t)
    m_c, ll_c = finish_stats(m_c, l_c)

    # ---- sweep 2: loss terms and aggregates ---------------------------------------------------------------------
    # summed per column across the tiles and reduced once after the loop (no tile-wide reduction inside it)
    phi_acc = tl.zeros((BLOCK,), ACC)
    gq_acc = tl.zeros((BLOCK,), ACC)
    agg = tl.zeros((KP,), ACC)  # per-teacher aggregates for the teacher gradients (rare: reduced per tile)
    for b in range(0, n_blocks):
        cols, cmask, s, q, logq, phi, gq, hp, p, logp, lwp, pk = _tile(
            b, s_row, t_row, V32, inv_t, m_q, ll_q, w, logw, m_t, ll_t, m_c, ll_c, ks, kuse, ENS, DIV, LOG_TARGET,
            BLOCK, ACC, dw, log_dw, log_1m_dw, FAST,
        )  # fmt: skip
        phi_acc += phi  # 0 where masked: p = q = 0 there, and every divergence's terms vanish (xlogr(0, .) = 0)
        if CLOSED:  # KL: dD/da = Q - P (= q + gq) needs no aggregate
            if grad_s != 0:
                g = tl.where(kd_over_t != 0, kd_over_t * (q + gq), 0.0)
                if ce != 0:
                    g += ce_w * ce_grad(reload(s_row + cols, cmask, True).to(ACC), q, m_ce, ll_ce, cols, label,
                                         ce_at_t)  # fmt: skip
                tl.store(gs_row + cols, tl.where(valid, f * g, 0.0), mask=cmask)
        else:
            gq_acc += gq
        if grad_t != 0:  # the tile again, from the cache (reload)
            cols, cmask, s, q, logq, phi, gq, hp, p, logp, lwp, pk = _tile(
                b, s_row, t_row, V32, inv_t, m_q, ll_q, w, logw, m_t, ll_t, m_c, ll_c, ks, kuse, ENS, DIV,
                LOG_TARGET, BLOCK, ACC, dw, log_dw, log_1m_dw, FAST, True,
            )  # fmt: skip
            if ENS == 3:  # sum_v hp_kv
                agg += tl.sum(tl.where(cmask[None, :], hp, 0.0), 1)
            elif ENS == 2 or ENS == 0:  # sum_v hp_v, in lane 0
                agg += tl.where(ks == 0, tl.sum(tl.where(cmask, hp, 0.0), 0), 0.0)
            else:  # sum_v r_kv hp_v, responsibilities r_k = w_k P_k / P in log space
                resp = tl.where(logp[None, :] == float("-inf"), 0.0, fexp(lwp - logp[None, :]))
                agg += tl.sum(tl.where(cmask[None, :], resp * hp[None, :], 0.0), 1)
    phi_sum = tl.sum(phi_acc, 0)
    gq_sum = tl.sum(gq_acc, 0)

    ce_loss = tl.zeros((), ACC)
    if ce != 0:
        lab_ok = valid & (label >= 0) & (label < V)  # never read outside the row, whatever the labels
        s_lab = tl.load(s_row + label, mask=lab_ok, other=0.0).to(ACC)
        ce_loss = label_nll(s_lab, m_ce, ll_ce)
    loss = sw * (tl.where(kd_scale != 0, kd_scale * phi_sum, 0.0) + ce_w * ce_loss)  # kd_scale 0: pure CE
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    # ---- sweep 3: gradients that needed the aggregates ----------------------------------------------------------
    need_agg = grad_t != 0
    if not CLOSED:
        need_agg = need_agg | (grad_s != 0)
    if need_agg:
        gt_row = gt_ptr + ks64[:, None] * (N * V) + row * V
        for b in range(0, n_blocks):
            cols, cmask, s, q, logq, phi, gq, hp, p, logp, lwp, pk = _tile(
                b, s_row, t_row, V32, inv_t, m_q, ll_q, w, logw, m_t, ll_t, m_c, ll_c, ks, kuse, ENS, DIV,
                LOG_TARGET, BLOCK, ACC, dw, log_dw, log_1m_dw, FAST,
            )  # fmt: skip
            if not CLOSED:
                if grad_s != 0:
                    g = tl.where(kd_over_t != 0, kd_over_t * (gq - q * gq_sum), 0.0)
                    if ce != 0:
                        g += ce_w * ce_grad(reload(s_row + cols, cmask, True).to(ACC), q, m_ce, ll_ce, cols,
                                             label, ce_at_t)  # fmt: skip
                    tl.store(gs_row + cols, tl.where(valid, f * g, 0.0), mask=cmask)
                if grad_t != 0:  # the tile again (reload) rather than the first read's values kept alive across the
                    # student's store: 110 instead of 144 registers (K = 4 JSD, bf16), for every call, not only the
                    # rare ones that want teacher gradients
                    cols, cmask, s, q, logq, phi, gq, hp, p, logp, lwp, pk = _tile(
                        b, s_row, t_row, V32, inv_t, m_q, ll_q, w, logw, m_t, ll_t, m_c, ll_c, ks, kuse, ENS, DIV,
                        LOG_TARGET, BLOCK, ACC, dw, log_dw, log_1m_dw, FAST, True,
                    )  # fmt: skip
            if grad_t != 0:
                if ENS == 3:
                    gt = w[:, None] * (hp - pk * agg[:, None])
                elif ENS == 2 or ENS == 0:
                    agg0 = tl.sum(tl.where(ks == 0, agg, 0.0), 0)
                    gt = w[:, None] * (hp - p * agg0)[None, :]
                else:
                    resp = tl.where(logp[None, :] == float("-inf"), 0.0, fexp(lwp - logp[None, :]))
                    gt = resp * hp[None, :] - pk * agg[:, None]
                gt = tl.where(kd_over_t != 0, f * kd_over_t * gt, 0.0)
                gt = tl.where(w[:, None] > 0, gt, 0.0)  # dropped teachers get exactly 0
                tl.store(gt_row + cols[None, :], tl.where(valid, gt, 0.0),
                         mask=kmask[:, None] & cmask[None, :])  # fmt: skip


@triton.jit
def _tile(b, s_row, t_row, V, inv_t, m_q, ll_q, w, logw, m_t, ll_t, m_c, ll_c, ks, kuse, ENS: tl.constexpr,
          DIV: tl.constexpr, LOG_TARGET: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, dw, log_dw, log_1m_dw,
          FAST: tl.constexpr, RELOAD: tl.constexpr = False):  # fmt: skip
    """Block b of the row, read again after sweep 1: the student's Q and the targets' terms (see _element)."""
    cols = b * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < V
    s, logq, q = log_probs(s_row, cols, cmask, inv_t, m_q, ll_q, ACC, RELOAD)
    t, logpk, pk = log_probs(t_row, cols[None, :], kuse[:, None] & cmask[None, :], inv_t, m_t[:, None],
                              ll_t[:, None], ACC, RELOAD)  # fmt: skip
    phi, gq, hp, p, logp, lwp = _element(t, logpk, pk, q, logq, inv_t, w, logw, m_c, ll_c, ks, kuse, cmask, ENS, DIV,
                                         LOG_TARGET, dw, log_dw, log_1m_dw, FAST)  # fmt: skip
    return cols, cmask, s, q, logq, phi, gq, hp, p, logp, lwp, pk


@triton.jit
def _element(t, logpk, pk, q, logq, inv_t, w, logw, m_c, ll_c, ks, kuse, cmask, ENS: tl.constexpr,
             DIV: tl.constexpr, LOG_TARGET: tl.constexpr, dw, log_dw, log_1m_dw, FAST: tl.constexpr):  # fmt: skip
    """Targets and divergence terms of one tile, from the teachers' logits t, log P_k and P_k ([KP, BLOCK]; padded
    teachers -inf and 0). Returns phi, gq (ensemble-combined, [BLOCK]); hp ([K, BLOCK] for loss_mean, else
    [BLOCK]); the single target p, log p; log(w_k P_k) ([KP, BLOCK])."""
    lwp = logpk + logw[:, None]
    if ENS == 3:
        phi_k, gq_k, hp = divergence_terms(pk, q[None, :], logpk, logq[None, :], DIV, dw, log_dw,
                                           log_1m_dw, FAST)  # fmt: skip
        wk = w[:, None]
        use = kuse[:, None]  # a teacher with weight 0 is dropped (0 * inf would be nan)
        phi = tl.sum(tl.where(use, wk * phi_k, 0.0), 0)
        gq = tl.sum(tl.where(use, wk * gq_k, 0.0), 0)
        p = q  # unused
        logp = logq
    else:
        if ENS == 2:
            c = tl.sum(tl.where(w[:, None] > 0, w[:, None] * (t * inv_t), 0.0), 0)
            logp = log_softmax(c, m_c, ll_c)
        elif ENS == 0:  # the one teacher's own log P and P (KP = 1: no padded row, no second exp)
            logp = tl.sum(tl.where((ks == 0)[:, None], logpk, 0.0), 0)
            p = tl.sum(tl.where((ks == 0)[:, None], pk, 0.0), 0)
        elif LOG_TARGET:  # log of the mixture, as a log-sum-exp over the teachers (exact where P underflows)
            mx = tl.max(lwp, 0)
            safe = tl.where(mx == float("-inf"), 0.0, mx)
            logp = tl.where(mx == float("-inf"), float("-inf"),
                            safe + flog(tl.sum(fexp(lwp - safe[None, :]), 0), FAST))  # (the sum is >= 1)
        else:  # the mixture sum_k w_k P_k and the log of it: one lg2 instead of K exps and a log (divergences.py)
            p = tl.sum(w[:, None] * pk, 0)
            p = tl.where(p < 1.1754943508222875e-38, 0.0, p)  # a subnormal P (< 1e-38) is 0: flog's domain
            logp = flog(p, FAST)
        if ENS == 2:  # (the pool of masked columns is -inf already unless every weight is 0)
            logp = tl.where(cmask, logp, float("-inf"))
        if ENS == 2 or (ENS == 1 and LOG_TARGET):
            p = fexp(logp)
        phi, gq, hp = divergence_terms(p, q, logp, logq, DIV, dw, log_dw, log_1m_dw, FAST)
    return phi, gq, hp, p, logp, lwp


_kd_row_kernel = jit_pair(_kd_row, small=("tw_ptr", "lab_ptr", "sw_ptr", "den_ptr", "loss_ptr", "prm_ptr", "int_ptr"))
# the compiled variants: every value each constexpr can take (aot.py checks the launcher reaches exactly these)
KD_DOMAINS = {"KP": (1, 2, 4, 8, 16), "BLOCK": (256, 512, 1024), "DIV": tuple(DIV_CODES.values()),
              "CLOSED": (False, True), "LOG_TARGET": (False, True), "ENS": (0, *ENS_CODES.values()),
              "ALIGNED": (False, True), "ACC": ("fp32",), "FAST": (True,)}  # fmt: skip
KERNELS = [_kd_row_kernel]
# The float parameters, in the order the kernel loads them from prm_ptr ("div": the divergence's parameter vector,
# divergences.kernel_params).
KD_PARAMS = ("inv_t", "kd_scale", "kd_over_t", "ce_weight", "uniform", "div")


def _teacher_bucket(k: int) -> int:
    """KP: K rounded up to a power of two (a [KP, BLOCK] tile of teachers; K = 1 has no padded row)."""
    return triton.next_power_of_2(k)


def _block(kp: int) -> int:
    # 1024 columns: 4 warps x 32 threads x 8 (one 16-byte vector of bf16 per thread and row, the group of
    # group_stats); teacher tiles kept at <= 4096 elements (32 per thread) for KP >= 8. Independent of V, so that V
    # never forks the compile; a small V runs masked lanes.
    return min(1024, 4096 // kp)


def pack_params(layout: tuple[str, ...], **values) -> list[float]:
    """The float parameters of a row kernel in ``layout`` order; "div" is the divergence's parameter vector."""
    out: list[float] = []
    for name in layout:
        out += divergences.kernel_params(values[name]) if name == "div" else [float(values[name])]
    return out


def _kd_loss_triton(*args) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton twin of ``fastdistill::kd_loss`` (arguments: ``KDInputs.ARGS``) with the teachers stacked:
    student [N, V], teachers [K, N, V] (unit stride along V). Returns (loss, grad_student, grad_teachers)."""
    a = KDInputs.named(args)
    launch, rows, gs, gt = kd_launch(a)
    launch.run()
    if not a.reduce:
        return rows, gs, gt
    total = rows.sum()
    return (total / a.denominator.to(rows.dtype) if a.denominator is not None else total), gs, gt


def kd_launch(a: SimpleNamespace) -> tuple[Launch, Tensor, Tensor, Tensor]:
    """The launch of ``_kd_row_kernel`` for a call's arguments by name (``KDInputs.named``) and its outputs (per-row
    losses [N], student gradient, teachers' gradient). Works on meta tensors: aot.py compiles what it returns."""
    student, teachers = a.student, a.teachers
    n, v = student.shape
    k = teachers.shape[0]
    if not 1 <= k <= MAX_TEACHERS:
        raise ValueError(f"teachers: the Triton kd_loss takes 1..{MAX_TEACHERS} teachers, got K = {k}")
    check_row_dtype("kd_loss", student.dtype)
    check_row_dtype("kd_loss", teachers.dtype)
    div = divergences.get(a.divergence)
    if len(a.div_params) != len(div.params):
        raise ValueError(f"div_params: {div.name} takes {len(div.params)} parameter(s), got {len(a.div_params)}")
    dev = student.device
    acc = acc_dtype(student.dtype)
    kp = _teacher_bucket(k)
    # V = 0 launches no program (only torch.ops reaches it: the functional API rejects V = 0): the rows are 0
    rows = (torch.zeros if v == 0 else torch.empty)(n, device=dev, dtype=acc)
    gs = torch.empty((n, v) if a.grad_student else (0,), device=dev, dtype=student.dtype)
    gt = torch.empty((k, n, v) if a.grad_teachers else (0,), device=dev, dtype=teachers.dtype)
    dummy = rows
    tw = a.teacher_weights.to(acc).contiguous() if a.teacher_weights is not None else dummy
    sw = a.sample_weight.to(acc).contiguous() if a.sample_weight is not None else dummy
    has_den = a.reduce and a.denominator is not None
    den = a.denominator.to(acc).reshape(1) if has_den else dummy
    lab = a.labels.to(torch.int64).contiguous() if a.labels is not None else torch.empty(1, device=dev,
                                                                                        dtype=torch.int64)  # fmt: skip
    ens = ENS_CODES[a.ensemble] if k > 1 else 0
    prm = param_tensor(pack_params(KD_PARAMS, inv_t=1.0 / a.temperature, kd_scale=a.kd_scale,
                                   kd_over_t=a.kd_scale / a.temperature, ce_weight=a.ce_weight, uniform=1.0 / k,
                                   div=a.div_params), acc, student)  # fmt: skip
    strides = [student.stride(0), teachers.stride(0), teachers.stride(1)]
    ints = int_tensor([n, v, *strides, a.ignore_index, k, a.teacher_weights is not None, a.labels is not None,
                       a.sample_weight is not None, has_den, a.ce_weight > 0, a.temperature == 1.0, a.grad_student,
                       a.grad_teachers], student)  # fmt: skip
    aligned = is_aligned([student, teachers, gs, gt], [v, *strides])
    launch = Launch(
        _kd_row_kernel.pick(aligned), (n if v > 0 else 0,),
        (student, teachers, tw, lab, sw, den, rows, gs, gt, prm, ints),
        dict(KP=kp, BLOCK=_block(kp), DIV=div.code, CLOSED=div.closed_form, LOG_TARGET=div.log_target, ENS=ens,
             ALIGNED=aligned, ACC=tl_acc(student.dtype), FAST=fast_math(student.dtype)),
        {"num_warps": NUM_WARPS},
    )  # fmt: skip
    return launch, rows, gs, gt


def kl_call(student: Tensor, teachers: Tensor, **changes) -> SimpleNamespace:
    """The arguments by name of a plain KL call (T = 2, T^2 scaling, no optional inputs, the student's gradient
    only, per-row losses), ``changes`` replacing any of them: for launchers built outside a call (aot.py, tests)."""
    args = dict(student=student, teachers=teachers, teacher_weights=None, labels=None, sample_weight=None,
                denominator=None, divergence="kl", ensemble="prob_mean", temperature=2.0, kd_scale=4.0, ce_weight=0.0,
                div_params=[], ignore_index=-100, reduce=False, grad_student=True, grad_teachers=False)  # fmt: skip
    return KDInputs.named(KDInputs.bind(**{**args, **changes}))


def kd_space():
    """The launches of the whole problem space on meta tensors (aot.py compiles each distinct one): every pair of
    student and teacher dtypes, divergence, ensemble and teacher bucket, aligned and not; the run-time flags both
    ways (they must not fork the compile)."""
    for dtype, t_dtype in ((a, b) for a in ROW_KERNEL_GPU_DTYPES for b in ROW_KERNEL_GPU_DTYPES):
        for name, div in divergences.DIVERGENCES.items():
            for k in (1, 2, 3, 4, 5, 8, 9, 16):
                for ens in ENS_CODES if k > 1 else ("prob_mean",):
                    for v in (4096, 4097):  # aligned; odd V (unaligned rows)
                        for on in (False, True):
                            opt = (lambda x: x if on else None)  # noqa: E731
                            yield kd_launch(KDInputs.named(KDInputs.bind(
                                student=torch.empty(8, v, device="meta", dtype=dtype),
                                teachers=torch.empty(k, 8, v, device="meta", dtype=t_dtype),
                                teacher_weights=opt(torch.empty(k, 8, device="meta")),
                                labels=opt(torch.empty(8, device="meta", dtype=torch.int64)),
                                sample_weight=opt(torch.empty(8, device="meta")),
                                denominator=opt(torch.empty((), device="meta")), divergence=name, ensemble=ens,
                                temperature=1.0 if on else 2.0, kd_scale=4.0, ce_weight=0.5 if on else 0.0,
                                div_params=[p.default for p in div.params], ignore_index=-100, reduce=on,
                                grad_student=True, grad_teachers=on)))[0]  # fmt: skip


def _kd_loss_triton_fake(*args) -> tuple[Tensor, Tensor, Tensor]:
    a = KDInputs.named(args)
    n, v = a.student.shape
    acc = torch.float64 if a.student.dtype == torch.float64 else torch.float32
    loss = a.student.new_empty(() if a.reduce else (n,), dtype=acc)
    gs = a.student.new_empty((n, v) if a.grad_student else (0,))
    gt = a.teachers.new_empty(tuple(a.teachers.shape) if a.grad_teachers else (0,))
    return loss, gs, gt


# fastdistill::kd_loss's arguments with the teachers as one [K, N, V] tensor
KDInputs.typed(_kd_loss_triton, teachers="Tensor", returns="(Tensor, Tensor, Tensor)")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Triton's interpreter cannot be traced (wrap_triton needs a compiled JITFunction), so here the op is opaque to
    # torch.compile, with a fake kernel; on a GPU it is a triton_op and torch.compile traces into the kernel.
    kd_loss_triton = torch.library.custom_op("fastdistill::kd_loss_triton", mutates_args=())(_kd_loss_triton)
    kd_loss_triton.register_fake(_kd_loss_triton_fake)
else:
    kd_loss_triton = torch.library.triton_op("fastdistill::kd_loss_triton", mutates_args=())(_kd_loss_triton)
register_triton(kd_loss_triton)
