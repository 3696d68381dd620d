"""Triton backend of the fused KD loss (v3): a row cut into C chunks of TPC tiles (BLOCK columns), one program per
chunk, three sweeps over the chunk's tiles with a barrier among the row's programs between them.

Sweep 1 reads the chunk of the student and the K teachers ([KP, BLOCK] tiles, teacher k at an offset from the base
pointer: a stacked [K, N, V] tensor or K separate [N, V] tensors, ``teacher_layout``) and keeps online-softmax
statistics per group of 8 columns, in each thread's registers (``row_math.group_stats``: no block-wide reduction
inside the loop); the chunk's share of each normaliser goes to a small [N, C, 8 + 3 KP] buffer,
and after the row's barrier each program combines the row's shares (``finish_stats``). Sweep 2 reads the chunk again,
a few microseconds after sweep 1, so from L2 rather than HBM (a chunk is ~16 KB of input: ``row_split``), evaluates
the divergence terms (the math of ``csrc/common/kd_math.h``, in ``row_math.divergence_terms``) and the aggregates the
gradients need, writing the student gradient directly when it has a closed form (KL); sweep 3, only when needed,
exchanges the aggregates' shares behind a second barrier and writes the remaining gradients. HBM then sees each input
read about once and the gradient written once, for every divergence, where one program per row (v2, C = 1: a row
longer than L2 can hold between its sweeps) reads the inputs two or three times. Design and prediction:
benchmarks/NOTES.md, issue 17, "v3".

A barrier never deadlocks: a program takes its (row, chunk) from a ticket counter when it starts, not from its program
id, so every row before the newest ticket has all its programs running, reaches its barriers and finishes, whatever
order the hardware starts programs in; the newest row's missing chunks start as slots free. That needs a row's C
programs to fit on the GPU beside whatever else runs: C <= CMAX and <= half the SM count (a program fits any SM), so
it would take ~8 such launches spinning at once on one GPU (streams, MPS clients) to fill every slot with waiting
programs. A wait that still gives up makes the row's loss NaN (and its gradients, where they depend on what the wait
could not see) rather than hang the GPU (``_arrive_and_wait``).

Each chunk's loss share goes to the buffer, summed over C with ``torch.sum`` (no float atomics: bitwise
reproducible). float32 accumulation (float64 for float64 inputs); no [K, N, V] temporaries; gradients are written in
the forward launch and backward only scales them (on the GPU in place, skipped where grad_output is 1: ``scale.py``).

STAGES: 0 on a GPU (one launch, the barriers as above). Triton's interpreter runs a grid's programs one after another,
so a barrier could never be passed there: with C > 1 the launcher runs the kernel once per stage (1: sweep 1; 2: up
to the aggregates' shares, only when needed; 3: the rest), each launch skipping the waits. The math between the
barriers is the same code either way; the barriers themselves are compiled for a GPU only (aot.py: sm_90 PTX has the
acq_rel arrival, the acquire polls and the bar.syncs) and tested there (tests/test_triton_gpu.py).

Compiled variants (``launch.py``'s rules; ``KD_DOMAINS`` lists them, ``aot.py`` compiles every one): the divergence
(DIV), the ensemble mode (ENS: one teacher, mixture, log-linear pool, one target per teacher), the teacher bucket KP
(K rounded up to a power of two, 1..16; K itself is a runtime value), BLOCK = min(1024, 4096 / KP), ALIGNED and the
dtype; CLOSED and LOG_TARGET follow from the divergence (``ops/divergences.py``). C, TPC, the optional inputs, the
cross-entropy and which gradients are wanted are runtime values: uniform branches per program.
"""

import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import divergences
from ..inputs import KDInputs, gradient_slots, op_teachers, stacked_teachers
from ..registration import register_triton
from .launch import (
    INTERPRET,
    ROW_KERNEL_GPU_DTYPES,
    Launch,
    acc_dtype,
    cdiv,
    check_row_dtype,
    fast_math,
    int_tensor,
    is_aligned,
    is_eager,
    jit_pair,
    param_tensor,
    tl_acc,
)
from .row_math import (
    ce_grad,
    combine_stats,
    finish_stats,
    group_stats,
    label_nll,
    log_probs,
    reload,
    row_weight,
    target_terms,
    teacher_aggregates,
    teacher_grad,
)

DIV_CODES = {name: d.code for name, d in divergences.DIVERGENCES.items()}  # the codes divergence_terms branches on
# ENS: 0 one teacher (K = 1), 1 mixture (prob_mean), 2 log-linear pool (logit_mean), 3 a target per teacher (loss_mean)
ENS_CODES = {"prob_mean": 1, "logit_mean": 2, "loss_mean": 3}
# 4 warps of 32 threads x 8 columns = BLOCK: one 16-byte bf16 vector per thread and input row, the group of
# group_stats (v1: 8 warps, [KP, 8192 / KP] tiles, 2 programs per SM): make kernels-report, benchmarks/NOTES.md.
NUM_WARPS = 4
# Register caps by teacher bucket (ptxas's .maxnreg): uncapped, ptxas took 93 (K = 1) and 137-227 (K = 4) registers
# for v3's kernels, 5 and 2-3 programs per SM; capped, 6 and 4 programs, no spill for KL at the benchmark shapes and
# at most 72 bytes of spill elsewhere (benchmarks/NOTES.md, "v3")
MAXNREG = {1: 80, 2: 96, 4: 128}
CMAX = 128  # the most chunks a row may have (the combine reads a row's chunk partials as one [CMAX] vector)
CHUNK_BYTES = 16384  # a chunk's input bytes, all K + 1 rows (row_split)
ROW_KERNEL_ENV = "FASTDISTILL_TRITON_ROW"  # "v2": one program per row (benchmarks compare the two in one run)
CHUNK_TILES_ENV = "FASTDISTILL_TRITON_CHUNK_TILES"
INTERPRET_BLOCK: int | None = None  # test hook, see _block


def _kd_row(
    s_ptr, t_ptr, tw_ptr, lab_ptr, sw_ptr, den_ptr, part_ptr, gs_ptr, gt_ptr, prm_ptr, int_ptr, sync_ptr,
    KP: tl.constexpr, BLOCK: tl.constexpr, CMAX: tl.constexpr, DIV: tl.constexpr, CLOSED: tl.constexpr,
    LOG_TARGET: tl.constexpr, ENS: tl.constexpr, FAST: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """One program per chunk of a row (C chunks of TPC tiles; C = 1: the whole row); the kernel pair
    ``_kd_row_kernel`` (launch.py). DIV: the divergence's code; CLOSED: its student gradient has a closed form (both
    from ops/divergences.py); ENS: see ENS_CODES; CMAX: the most chunks a row may have; STAGES: 0, or the stage of a
    staged launch (the module docstring). part_ptr: [N, C, 8 + 3 KP] partials of the accumulation dtype, the last slot
    the chunk's loss; sync_ptr: int32 [4 + 2 N], zero: the tickets of STAGES 0..3, then the two barriers' arrival
    counters per row."""
    # integer arguments, int64 (the order of kd_args' ints: the chunks per row and tiles per chunk, then the K
    # teachers' offsets and their gradients' slots, last): every offset below is 64-bit from the start
    N = tl.load(int_ptr + 0)
    V = tl.load(int_ptr + 1)
    s_stride = tl.load(int_ptr + 2)
    t_stride_n = tl.load(int_ptr + 3)
    ignore_index = tl.load(int_ptr + 4)
    K = tl.load(int_ptr + 5)
    has_tw = tl.load(int_ptr + 6)
    has_labels = tl.load(int_ptr + 7)
    has_sw = tl.load(int_ptr + 8)
    has_den = tl.load(int_ptr + 9)
    ce = tl.load(int_ptr + 10)  # cross-entropy term on (ce_weight > 0)
    ce_at_t = tl.load(int_ptr + 11)  # T == 1: the cross-entropy's softmax is Q itself
    grad_s = tl.load(int_ptr + 12)
    grad_t = tl.load(int_ptr + 13)
    C = tl.load(int_ptr + 14)
    TPC = tl.load(int_ptr + 15)
    ks = tl.arange(0, KP)
    ks64 = ks.to(tl.int64)
    kmask = ks < K
    # teacher k's first element, in elements from t_ptr (k x the K stride of a stacked [K, N, V] tensor, or the
    # distance between the pointers of K separate [N, V] tensors: no stacked copy of them is made)
    t_off = tl.load(int_ptr + 16 + ks64, mask=kmask, other=0)
    if ALIGNED:  # the launcher checked these are multiples of 16: said so, the loads become 16-byte vectors
        V = V // 16 * 16
        s_stride = s_stride // 16 * 16
        t_stride_n = t_stride_n // 16 * 16
        t_off = t_off // 16 * 16
    V32 = V.to(tl.int32)  # column indices within a row stay 32-bit (V < 2**31); row offsets are 64-bit
    if ALIGNED:
        V32 = V32 // 16 * 16
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
    # (row, chunk) from a ticket taken at the start, not the program id: the module docstring's no-deadlock argument
    ticket = tl.atomic_add(sync_ptr + STAGES, 1).to(tl.int64)
    row = ticket // C
    chunk = ticket - row * C
    b0 = (chunk * TPC).to(tl.int32)  # the chunk's tiles [b0, b1)
    b1 = tl.minimum(b0 + TPC.to(tl.int32), tl.cdiv(V32, BLOCK))
    w = tl.where(kmask, uniform, 0.0)
    if has_tw != 0:
        w = tl.load(tw_ptr + ks64 * N + row, mask=kmask, other=0.0).to(ACC)
    logw = tl.log(w)
    kuse = w > 0  # the teachers this row reads: one of weight 0 is dropped, whatever its logits (NaN included)
    sw, f, label, valid = row_weight(row, sw_ptr, lab_ptr, den_ptr, ignore_index, has_sw, has_labels, has_den, ce, V,
                                      ACC)  # fmt: skip
    ce_own = (ce != 0) & (ce_at_t == 0)  # the cross-entropy needs its own normaliser (at T = 1)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride_n + t_off[:, None]
    gs_row = gs_ptr + row * V
    # partial slots: 0, 1 student (max, exp-sum); 2, 3 the cross-entropy's; 4, 5 the pooled logits'; 6 + k, 6 + KP + k
    # teacher k's; 6 + 2 KP the aggregate sum_v gq; 7 + 2 KP + k teacher k's aggregate; 7 + 3 KP the chunk's loss
    PS: tl.constexpr = 8 + 3 * KP
    own = part_ptr + ticket * PS  # (ticket = row * C + chunk)

    # ---- sweep 1: normalisers, per group of 8 columns (group_stats), combined once after the loop ---------------
    if STAGES <= 1:
        m_q = tl.full((BLOCK // 8,), float("-inf"), ACC)
        l_q = tl.zeros((BLOCK // 8,), ACC)
        m_ce = tl.full((BLOCK // 8,), float("-inf"), ACC)
        l_ce = tl.zeros((BLOCK // 8,), ACC)
        m_t = tl.full((KP, BLOCK // 8), float("-inf"), ACC)
        l_t = tl.zeros((KP, BLOCK // 8), ACC)
        m_c = tl.full((BLOCK // 8,), float("-inf"), ACC)
        l_c = tl.zeros((BLOCK // 8,), ACC)
        # the next two tiles' loads in flight (cp.async into shared memory: 8 KB a program at K = 1, 20 KB at K = 4)
        # while this one is reduced; sweeps 2 and 3 stay unpipelined (they read L2; pipelined, K = 4 spilled 744 bytes)
        for b in tl.range(b0, b1, num_stages=3):
            cols = b * BLOCK + tl.arange(0, BLOCK)
            cmask = cols < V32
            s = tl.load(s_row + cols, mask=cmask, other=float("-inf")).to(ACC)
            m_q, l_q = group_stats(m_q, l_q, s * inv_t)
            if ce_own:
                m_ce, l_ce = group_stats(m_ce, l_ce, s)
            x = tl.load(t_row + cols[None, :], mask=kuse[:, None] & cmask[None, :],
                        other=float("-inf")).to(ACC) * inv_t  # fmt: skip
            if ENS == 2:  # pooled logits sum_k w_k t_k / T (a zero weight drops the teacher, -inf included)
                c = tl.sum(tl.where(w[:, None] > 0, w[:, None] * x, 0.0), 0)
                c = tl.where(cmask, c, float("-inf"))
                m_c, l_c = group_stats(m_c, l_c, c)
            else:
                m_t, l_t = group_stats(m_t, l_t, x)
        _publish(own + 0, own + 1, m_q, l_q)
        if ce_own:
            _publish(own + 2, own + 3, m_ce, l_ce)
        if ENS == 2:
            _publish(own + 4, own + 5, m_c, l_c)
        else:
            _publish(own + 6 + ks, own + 6 + KP + ks, m_t, l_t)
    if STAGES == 1:
        return
    seen_all = row >= 0  # (True) whether this program saw the row's statistics: False only if its wait gave up
    if STAGES == 0:
        seen_all = _arrive_and_wait(sync_ptr + 4 + row, C)
        # gave up: its loss share and gradient NaN (so the row's loss is), and below its aggregate shares, so that the
        # row's other programs' aggregate-based gradients are NaN too
        sw = tl.where(seen_all, sw, float("nan"))
        f = tl.where(seen_all, f, float("nan"))
    pmask = tl.arange(0, CMAX) < C
    parts = part_ptr + (row * C + tl.arange(0, CMAX)) * PS  # the row's chunks' slots, [CMAX]
    # the row's normalisers, kept split, as (max, log of the exp-sum below it): see log_softmax
    m_q, ll_q = _combined(parts + 0, parts + 1, pmask)
    m_ce = m_q
    ll_ce = ll_q
    if ce_own:
        m_ce, ll_ce = _combined(parts + 2, parts + 3, pmask)
    m_c = tl.full((), float("-inf"), ACC)
    ll_c = tl.full((), float("-inf"), ACC)
    m_t = tl.full((KP,), float("-inf"), ACC)
    ll_t = tl.full((KP,), float("-inf"), ACC)
    if ENS == 2:
        m_c, ll_c = _combined(parts + 4, parts + 5, pmask)
    else:
        m_t, ll_t = _combined(parts[None, :] + 6 + ks[:, None], parts[None, :] + 6 + KP + ks[:, None],
                              pmask[None, :])  # fmt: skip
    # Dropped teachers (padded, weight 0): (0, 0), so that (x - 0) - 0 stays -inf. A teacher that counts but has no
    # finite logit in the row has no distribution: NaN (as log_softmax gives); a NaN logit makes l_t NaN by itself.
    dead = m_t == float("-inf")
    m_t = tl.where(dead, tl.where(kuse, float("nan"), 0.0), m_t)
    ll_t = tl.where(dead, 0.0, ll_t)

    # ---- sweep 2: loss terms and aggregates (a chunk's tiles still in L2, one barrier after sweep 1) -------------
    # summed per column across the tiles and reduced once after the loop (no tile-wide reduction inside it)
    phi_acc = tl.zeros((BLOCK,), ACC)
    gq_acc = tl.zeros((BLOCK,), ACC)
    agg = tl.zeros((KP,), ACC)  # per-teacher aggregates for the teacher gradients (rare: reduced per tile)
    for b in range(b0, b1):
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
            agg += teacher_aggregates(hp, logp, lwp, cmask, ks, ENS)
    loss = sw * tl.where(kd_scale != 0, kd_scale * tl.sum(phi_acc, 0), 0.0)  # kd_scale 0: pure CE
    if (ce != 0) & (chunk == 0):  # the cross-entropy, once per row
        lab_ok = valid & (label >= 0) & (label < V)  # never read outside the row, whatever the labels
        s_lab = tl.load(s_row + label, mask=lab_ok, other=0.0).to(ACC)
        loss += sw * ce_w * label_nll(s_lab, m_ce, ll_ce)
    tl.store(own + 7 + 3 * KP, tl.where(valid, loss, 0.0))

    # ---- sweep 3: gradients that needed the row aggregates ------------------------------------------------------
    need_agg = grad_t != 0
    if not CLOSED:
        need_agg = need_agg | (grad_s != 0)
    if need_agg:
        tl.store(own + 6 + 2 * KP, tl.where(seen_all, tl.sum(gq_acc, 0), float("nan")))
        tl.store(own + 7 + 2 * KP + ks, tl.where(seen_all, agg, float("nan")))
        if STAGES == 0:
            f = tl.where(_arrive_and_wait(sync_ptr + 4 + N + row, C), f, float("nan"))
    if STAGES == 2:
        return
    if need_agg:
        cm = tl.arange(0, CMAX)
        slots = part_ptr + (row * C + cm) * PS + 6 + 2 * KP  # (a second expression: not kept alive from the first)
        gq_sum = tl.sum(_partials(slots, cm < C, 0.0), 0)
        agg = tl.sum(_partials(slots[None, :] + 1 + ks[:, None], (cm < C)[None, :], 0.0), 1)
        # teacher k's gradient goes to slot g_slot[k] of gt ([M, N, V], the M trained teachers'), or nowhere (-1)
        g_slot = tl.load(int_ptr + 16 + K + ks64, mask=kmask, other=-1)
        g_on = kmask & (g_slot >= 0)
        gt_row = gt_ptr + g_slot[:, None] * (N * V) + row * V
        for b in range(b0, b1):
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
                gt = teacher_grad(hp, pk, p, logp, lwp, w, agg, ks, f, kd_over_t, ENS)
                tl.store(gt_row + cols[None, :], tl.where(valid, gt, 0.0),
                         mask=g_on[:, None] & cmask[None, :])  # fmt: skip


@triton.jit
def _publish(m_ptr, sum_ptr, m, sums):
    """A chunk's share of a normaliser: its groups' statistics (group_stats) combined, stored for the row's other
    programs."""
    mx, total = combine_stats(m, sums)
    tl.store(m_ptr, mx)
    tl.store(sum_ptr, total)


@triton.jit
def _partials(ptrs, mask, other):
    """The row's chunks' partials, read past L1 (.cg): L1 is not coherent across SMs, and a line of the buffer may
    have been cached on this SM before the row's other programs wrote it."""
    return tl.load(ptrs, mask=mask, other=other, cache_modifier=".cg")


@triton.jit
def _combined(m_ptrs, sum_ptrs, mask):
    """A normaliser of the row from its chunks' shares ([CMAX] or [KP, CMAX], along the last axis), split as
    finish_stats gives it."""
    return finish_stats(_partials(m_ptrs, mask, float("-inf")), _partials(sum_ptrs, mask, 0.0))


@triton.jit
def _arrive_and_wait(counter_ptr, count):
    """Barrier of the ``count`` programs of one row. This program's stores happen before its arrival (bar.sync, then
    the arrival's release by the thread that does the atomic); the others' are visible after the wait (acquire,
    bar.sync). One program alone only needs the bar.sync (its threads read each other's stores). Returns False if
    the wait gave up: after 2^22 polls (~1 us each: seconds, where a row's programs arrive within microseconds), so
    that a broken guarantee (the module docstring's) shows as NaN rows, never as a hung GPU."""
    tl.debug_barrier()
    ok = count > 0
    if count > 1:
        seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") + 1
        polls = 0
        while (seen < count) & (polls < 4194304):
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            polls += 1
        ok = seen >= count
        tl.debug_barrier()
    return ok


@triton.jit
def _tile(b, s_row, t_row, V, inv_t, m_q, ll_q, w, logw, m_t, ll_t, m_c, ll_c, ks, kuse, ENS: tl.constexpr,
          DIV: tl.constexpr, LOG_TARGET: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, dw, log_dw, log_1m_dw,
          FAST: tl.constexpr, RELOAD: tl.constexpr = False):  # fmt: skip
    """Block b of the row, read again after sweep 1: the student's Q and the targets' terms (row_math.target_terms)."""
    cols = b * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < V
    s, logq, q = log_probs(s_row, cols, cmask, inv_t, m_q, ll_q, ACC, RELOAD)
    t, logpk, pk = log_probs(t_row, cols[None, :], kuse[:, None] & cmask[None, :], inv_t, m_t[:, None],
                              ll_t[:, None], ACC, RELOAD)  # fmt: skip
    phi, gq, hp, p, logp, lwp = target_terms(t, logpk, pk, q, logq, inv_t, w, logw, m_c, ll_c, ks, kuse, cmask, ENS,
                                             DIV, LOG_TARGET, dw, log_dw, log_1m_dw, FAST)  # fmt: skip
    return cols, cmask, s, q, logq, phi, gq, hp, p, logp, lwp, pk


_kd_row_kernel = jit_pair(_kd_row, small=("tw_ptr", "lab_ptr", "sw_ptr", "den_ptr", "part_ptr", "prm_ptr", "int_ptr",
                                          "sync_ptr"))  # fmt: skip
# the compiled variants: every value each constexpr can take (aot.py checks the launcher reaches exactly these)
KD_DOMAINS = {"KP": (1, 2, 4, 8, 16), "BLOCK": (256, 512, 1024), "CMAX": (CMAX,), "STAGES": (0,),
              "DIV": tuple(DIV_CODES.values()),
              "CLOSED": (False, True), "LOG_TARGET": (False, True), "ENS": (0, *ENS_CODES.values()),
              "ALIGNED": (False, True), "ACC": ("fp32",), "FAST": (True,)}  # fmt: skip
KERNELS = [_kd_row_kernel]
# The float parameters, in the order the kernel loads them from prm_ptr ("div": the divergence's parameter vector,
# divergences.kernel_params).
KD_PARAMS = ("inv_t", "kd_scale", "kd_over_t", "ce_weight", "uniform", "div")


def _teacher_bucket(k: int) -> int:
    """KP: K rounded up to a power of two (a [KP, BLOCK] tile of teachers; K = 1 has no padded row)."""
    return 1 << (k - 1).bit_length()  # k >= 1; not triton.next_power_of_2, ~4 µs a call (see launch.cdiv)


def _block(kp: int, v: int = 0) -> int:
    # 1024 columns: 4 warps x 32 threads x 8 (one 16-byte vector of bf16 per thread and row, the group of
    # group_stats); teacher tiles kept at <= 4096 elements (32 per thread) for KP >= 8. Independent of V, so that V
    # never forks the compile; a small V runs masked lanes. In the interpreter, INTERPRET_BLOCK where a test sets it
    # and V is small (narrow tiles: many tiles and chunks per row, at an interpreted loop's cost)
    if INTERPRET and INTERPRET_BLOCK and v <= 64 * INTERPRET_BLOCK:
        return INTERPRET_BLOCK
    return min(1024, 4096 // kp)


def pack_params(layout: tuple[str, ...], **values) -> list[float]:
    """The float parameters of a row kernel in ``layout`` order; "div" is the divergence's parameter vector."""
    out: list[float] = []
    for name in layout:
        out += divergences.kernel_params(values[name]) if name == "div" else [float(values[name])]
    return out


def _kd_loss_triton(*args) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton twin of ``fastdistill::kd_loss`` (arguments: ``KDInputs.ARGS``): student [N, V], ``teachers`` K
    tensors [N, V] or one stacked [K, N, V] (unit stride along V). Returns (loss, grad_student, grad_teachers), the
    teachers' gradient one [M, N, V] tensor: the M teachers of ``grad_teachers``'s bits, in teacher order (M = 0: a
    [0] placeholder)."""
    a = KDInputs.named(args)
    launches, chunk_losses, gs, gt = kd_launch(a)
    for launch in launches:
        launch.run()
    # torch's sums of a fixed shape run in a fixed order: bitwise reproducible; one sum over [N, C] when reduced
    if not a.reduce:
        return chunk_losses.sum(1), gs, gt
    total = chunk_losses.sum()
    return (total / a.denominator.to(total.dtype) if a.denominator is not None else total), gs, gt


def kd_args(a: SimpleNamespace) -> SimpleNamespace:
    """What every kd_loss kernel takes from a call's arguments by name (``KDInputs.named``), checked: the outputs'
    shapes and dtype, the small argument tensors (teacher and sample weights, denominator, labels, float parameters in
    KD_PARAMS order), the int arguments (in the order the kernel loads them; kd_launch appends the chunking, the
    teachers' offsets and their gradients' slots) and the constexprs that follow from the call. Works on meta
    tensors."""
    student = a.student
    n, v = student.shape
    stacked, k = op_teachers(student, a.teachers)  # the shapes the C++ kernels take, checked the same
    base, t_stride_n, offsets = teacher_layout(a.teachers)
    check_row_dtype("kd_loss", student.dtype)
    check_row_dtype("kd_loss", base.dtype)
    div = divergences.get(a.divergence)
    if len(a.div_params) != len(div.params):
        raise ValueError(f"div_params: {div.name} takes {len(div.params)} parameter(s), got {len(a.div_params)}")
    dev = student.device
    acc = acc_dtype(student.dtype)
    gs = torch.empty((n, v) if a.grad_student else (0,), device=dev, dtype=student.dtype)
    slots = gradient_slots(a.grad_teachers, k, stacked)
    m = k - slots.count(-1)
    gt = torch.empty((m, n, v) if m else (0,), device=dev, dtype=base.dtype)
    prm = param_tensor(pack_params(KD_PARAMS, inv_t=1.0 / a.temperature, kd_scale=a.kd_scale,
                                   kd_over_t=a.kd_scale / a.temperature, ce_weight=a.ce_weight, uniform=1.0 / k,
                                   div=a.div_params), acc, student)  # fmt: skip
    dummy = prm  # in place of an absent optional input (never read: its flag is off), of the accumulation dtype
    tw = a.teacher_weights.to(acc).contiguous() if a.teacher_weights is not None else dummy
    sw = a.sample_weight.to(acc).contiguous() if a.sample_weight is not None else dummy
    has_den = a.reduce and a.denominator is not None
    den = a.denominator.to(acc).reshape(1) if has_den else dummy
    lab = a.labels.to(torch.int64).contiguous() if a.labels is not None else torch.empty(1, device=dev,
                                                                                        dtype=torch.int64)  # fmt: skip
    ints = [n, v, student.stride(0), t_stride_n, a.ignore_index, k, a.teacher_weights is not None,
            a.labels is not None, a.sample_weight is not None, has_den, a.ce_weight > 0, a.temperature == 1.0,
            a.grad_student, m > 0]  # fmt: skip
    kp = _teacher_bucket(k)
    # (teacher k's pointer: the base's plus offsets[k] elements, aligned when both are)
    aligned = is_aligned([student, base, gs, gt], [v, student.stride(0), t_stride_n, *offsets])
    constexprs = dict(KP=kp, DIV=div.code, CLOSED=div.closed_form, LOG_TARGET=div.log_target,
                      ENS=ENS_CODES[a.ensemble] if k > 1 else 0, ALIGNED=aligned, ACC=tl_acc(student.dtype),
                      FAST=fast_math(student.dtype))  # fmt: skip
    return SimpleNamespace(n=n, v=v, k=k, kp=kp, acc=acc, dev=dev, gs=gs, gt=gt, base=base, closed=div.closed_form,
                           tensors=(student, base, tw, lab, sw, den), prm=prm, ints=ints, offsets=offsets,
                           slots=slots, constexprs=constexprs)  # fmt: skip


def teacher_layout(teachers: list[Tensor]) -> tuple[Tensor, int, list[int]]:
    """(base, row stride, offsets): the tensor whose pointer the kernel takes, the teachers' common row stride, and
    teacher k's first element as an element offset from the base's. ``teachers``: a list of one stacked [K, N, V]
    tensor, offsets k x its K stride; or K tensors [N, V] of one dtype, device and row stride, read in place in an
    eager call (offsets: the distances between their pointers), stacked into one copy otherwise (while
    torch.compile traces the op there is no pointer yet)."""
    if stacked_teachers(teachers):
        t = teachers[0]
        return t, t.stride(1), [k * t.stride(0) for k in range(t.shape[0])]
    if not teachers or any(t.dim() != 2 for t in teachers):
        raise ValueError("teachers: one stacked [K, N, V] tensor or K tensors [N, V], got shapes "
                         f"{[tuple(t.shape) for t in teachers]}")  # fmt: skip
    t0 = teachers[0]
    if any(t.dtype != t0.dtype or t.device != t0.device for t in teachers):
        raise ValueError(f"teachers: one dtype and device, got {[(t.dtype, str(t.device)) for t in teachers]}")
    size = t0.element_size()
    if is_eager(t0) and all(t.stride(0) == t0.stride(0) for t in teachers):
        gaps = [t.data_ptr() - t0.data_ptr() for t in teachers]
        if all(g % size == 0 for g in gaps):
            return t0, t0.stride(0), [g // size for g in gaps]
    t = torch.stack(teachers)
    return t, t.stride(1), [k * t.stride(0) for k in range(t.shape[0])]


def kd_launch(a: SimpleNamespace) -> tuple[list[Launch], Tensor, Tensor, Tensor]:
    """The launches of ``_kd_row_kernel`` for a call's arguments by name (``KDInputs.named``; one launch, or one per
    stage in Triton's interpreter) and its outputs: the chunks' losses [N, C] (their sum over C: the per-row losses),
    the student's gradient, the teachers' gradient. Works on meta tensors: aot.py compiles what it returns."""
    c = kd_args(a)
    block = _block(c.kp, c.v)
    n_tiles = cdiv(c.v, block)
    chunks, tiles = row_split(n_tiles, c.k, max(a.student.element_size(), c.base.element_size()), block, c.dev,
                              c.n)  # fmt: skip
    ps = 8 + 3 * c.kp
    # V = 0 launches no program (only torch.ops reaches it: the functional API rejects V = 0): the losses are 0
    part = (torch.zeros if c.v == 0 else torch.empty)(c.n, chunks, ps, device=c.dev, dtype=c.acc)
    sync = torch.zeros(4 + 2 * c.n, device=c.dev, dtype=torch.int32)
    ints = int_tensor([*c.ints, chunks, tiles, *c.offsets, *c.slots], a.student)
    args = (*c.tensors, part, c.gs, c.gt, c.prm, ints, sync)
    need_agg = c.gt.dim() == 3 or (a.grad_student and not c.closed)
    stages = (0,) if not INTERPRET or chunks == 1 else ((1, 2, 3) if need_agg else (1, 3))
    grid = (c.n * chunks if c.v > 0 else 0,)
    cx = dict(c.constexprs, BLOCK=block, CMAX=CMAX)
    options = {"num_warps": NUM_WARPS, **({"maxnreg": MAXNREG[c.kp]} if c.kp in MAXNREG else {})}
    launches = [Launch(_kd_row_kernel.pick(cx["ALIGNED"]), grid, args, dict(cx, STAGES=st), options)
                for st in stages]  # fmt: skip
    return launches, part[:, :, ps - 1], c.gs, c.gt


def row_split(n_tiles: int, k: int, itemsize: int, block: int, device: torch.device, n: int) -> tuple[int, int]:
    """(C, TPC): the chunks a row of ``n_tiles`` tiles is cut into, and the tiles per chunk. A chunk holds about
    CHUNK_BYTES of input (its K + 1 rows), so that its second read, one barrier after its first, still finds it in
    L2; C <= CMAX and <= half the GPU's SMs (a row's programs must fit on the GPU at once, beside other work). C = 1
    (the whole row in one program, v2) with FASTDISTILL_TRITON_ROW=v2; FASTDISTILL_TRITON_CHUNK_TILES sets TPC
    (benchmarks, tests)."""
    if n_tiles <= 1 or os.environ.get(ROW_KERNEL_ENV, "") == "v2":
        return 1, max(n_tiles, 1)
    env = os.environ.get(CHUNK_TILES_ENV, "")
    if env:
        tiles = int(env)
    elif INTERPRET:
        tiles = 1  # many chunks per row at the tests' small V
    else:
        tiles = max(1, round(CHUNK_BYTES / ((k + 1) * itemsize * block)))
    tiles = max(tiles, cdiv(n_tiles, min(CMAX, max(1, _sm_count(device) // 2))))
    chunks = cdiv(n_tiles, tiles)
    if n * chunks >= 2**31:  # the int32 ticket
        return 1, n_tiles
    return chunks, tiles


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # meta tensors (aot.py) stand for the H200 of the benchmarks; the interpreter, any GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def kl_call(student: Tensor, teachers: Tensor, **changes) -> SimpleNamespace:
    """The arguments by name of a plain KL call (T = 2, T^2 scaling, no optional inputs, the student's gradient
    only, per-row losses) with the teachers stacked [K, N, V], ``changes`` replacing any of them: for launchers built
    outside a call (aot.py, tests)."""
    args = dict(student=student, teachers=[teachers], teacher_weights=None, labels=None, sample_weight=None,
                denominator=None, divergence="kl", ensemble="prob_mean", temperature=2.0, kd_scale=4.0, ce_weight=0.0,
                div_params=[], ignore_index=-100, reduce=False, grad_student=True, grad_teachers=0)  # fmt: skip
    return KDInputs.named(KDInputs.bind(**{**args, **changes}))


def _space_calls():
    """The calls of the whole problem space on meta tensors, by name: every pair of student and teacher dtypes,
    divergence, ensemble and teacher bucket, aligned and not; the run-time flags both ways (they must not fork the
    compile)."""
    for dtype, t_dtype in ((a, b) for a in ROW_KERNEL_GPU_DTYPES for b in ROW_KERNEL_GPU_DTYPES):
        for name, div in divergences.DIVERGENCES.items():
            for k in (1, 2, 3, 4, 5, 8, 9, 16):
                for ens in ENS_CODES if k > 1 else ("prob_mean",):
                    for v in (4096, 4097):  # aligned; odd V (unaligned rows)
                        for on in (False, True):
                            opt = (lambda x: x if on else None)  # noqa: E731
                            yield KDInputs.named(KDInputs.bind(
                                student=torch.empty(8, v, device="meta", dtype=dtype),
                                teachers=[torch.empty(k, 8, v, device="meta", dtype=t_dtype)],
                                teacher_weights=opt(torch.empty(k, 8, device="meta")),
                                labels=opt(torch.empty(8, device="meta", dtype=torch.int64)),
                                sample_weight=opt(torch.empty(8, device="meta")),
                                denominator=opt(torch.empty((), device="meta")), divergence=name, ensemble=ens,
                                temperature=1.0 if on else 2.0, kd_scale=4.0, ce_weight=0.5 if on else 0.0,
                                div_params=[p.default for p in div.params], ignore_index=-100, reduce=on,
                                grad_student=True, grad_teachers=(1 << k) - 1 if on else 0))  # fmt: skip


def kd_space():
    """The launches of the whole problem space (aot.py compiles each distinct one)."""
    for a in _space_calls():
        yield from kd_launch(a)[0]


def _kd_loss_triton_fake(*args) -> tuple[Tensor, Tensor, Tensor]:
    a = KDInputs.named(args)
    n, v = a.student.shape
    acc = torch.float64 if a.student.dtype == torch.float64 else torch.float32
    loss = a.student.new_empty(() if a.reduce else (n,), dtype=acc)
    gs = a.student.new_empty((n, v) if a.grad_student else (0,))
    stacked, k = op_teachers(a.student, a.teachers)
    m = sum(i >= 0 for i in gradient_slots(a.grad_teachers, k, stacked))
    gt = a.teachers[0].new_empty((m, n, v) if m else (0,))
    return loss, gs, gt


# fastdistill::kd_loss's arguments (the teachers: K [N, V] tensors or one stacked [K, N, V]), the teachers' gradient
# one [M, N, V] tensor (the M trained teachers')
KDInputs.typed(_kd_loss_triton, returns="(Tensor, Tensor, Tensor)")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Triton's interpreter cannot be traced (wrap_triton needs a compiled JITFunction), so here the op is opaque to
    # torch.compile, with a fake kernel; on a GPU it is a triton_op and torch.compile traces into the kernel.
    kd_loss_triton = torch.library.custom_op("fastdistill::kd_loss_triton", mutates_args=())(_kd_loss_triton)
    kd_loss_triton.register_fake(_kd_loss_triton_fake)
else:
    kd_loss_triton = torch.library.triton_op("fastdistill::kd_loss_triton", mutates_args=())(_kd_loss_triton)
register_triton(kd_loss_triton)
