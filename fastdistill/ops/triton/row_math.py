"""The per-element and per-row math the Triton row kernels (kd_loss.py, codistill_loss.py) share: the divergence
terms (csrc/common/kd_math.h's, element for element), online softmax statistics per group of columns, split log-softmax
normalisers, the row's weight and label, the cross-entropy's loss and gradient."""

import triton
import triton.language as tl


@triton.jit
def fexp(x):
    """exp(x) as one ex2 of x log2(e). tl.exp lowers to a non-flushing ex2.approx.f32, which ptxas wraps in a
    denormal fix-up (a compare and two multiplies per call: 97 FMUL beside 27 MUFU in kd_loss's first sweep at
    K = 1); tl.exp2 flushes results below 2^-126 to 0 and issues the MUFU alone. (Those results only ever enter sums
    and products with probabilities: a term under 1e-38 of a loss or gradient.)"""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def xlogr(x, log_x, log_y):
    """x * (log x - log y) with 0 * log 0 = 0; a NaN x gives NaN (never a silent 0)."""
    return tl.where(x == 0, 0.0, x * (log_x - log_y))


@triton.jit
def flog(x, FAST: tl.constexpr):
    """log(x). FAST (compiled for a GPU): one lg2.approx.ftz times ln 2, where tl.log is libdevice's logf, ~20
    instructions. Its error is absolute, ~2^-22 in log2 x, not relative: fine where the log is added to O(1) terms
    or multiplied by a probability, not for a log near 0 that must keep its relative precision (Goldberg's log1p in
    mi_alpha.py keeps tl.log). A subnormal x gives -inf, so callers keep x normal or 0 (flushing first). Not FAST
    (the interpreter, which runs no PTX, and float64): tl.log."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1) * 0.6931471805599453  # fmt: skip
    else:
        return tl.log(x)


@triton.jit
def rmul(x, y, FAST: tl.constexpr):
    """x * y (float32) rounded on its own. A plain product is contracted by the compiler into an FMA with a later
    addition (x * y - c as one fma.rn.f32, the product unrounded) wherever the compiler sees fit, so a value used
    both as itself (a max) and inside a difference (exp(x * y - c)) would be two different numbers, ~ulp(x * y) / 2
    apart; PTX never fuses a multiply with an explicit rounding mode. FAST: compiled, float32 (see flog); else the
    plain product (the interpreter runs numpy, which never contracts)."""
    if FAST:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip
    else:
        return x * y


@triton.jit
def logaddexp(x, y, FAST: tl.constexpr):
    m = tl.maximum(x, y)
    r = m + flog(1.0 + fexp(-tl.abs(x - y)), FAST)
    return tl.where(m == float("-inf"), m, r)


@triton.jit
def divergence_terms(p, q, logp, logq, DIV: tl.constexpr, dw, log_dw, log_1m_dw, FAST: tl.constexpr = False):
    """phi (loss term), gq = Q dphi/dQ, hp = P dphi/dP: csrc/common/kd_math.h's divergence_terms, element for
    element (tests/test_divergence_table.py). DIV: the divergence's code in ops/divergences.py; dw, log dw,
    log(1 - dw): its mixture weight (jsd: beta; skew_*: skew), unused by the others. FAST: see flog."""
    if DIV == 0:  # kl
        phi = xlogr(p, logp, logq)
        gq = -p
        hp = phi + p
    elif DIV == 1:  # reverse_kl
        phi = xlogr(q, logq, logp)
        gq = phi + q
        hp = -q
    elif DIV == 2:  # jsd
        logm = logaddexp(logp + log_dw, logq + log_1m_dw, FAST)
        hp = dw * xlogr(p, logp, logm)
        gq = (1.0 - dw) * xlogr(q, logq, logm)
        phi = hp + gq
    elif DIV == 3:  # tvd
        d = q - p
        phi = 0.5 * tl.abs(d)
        sg = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)) + (d - d)  # NaN stays NaN (kd_math.h's sign)
        gq = 0.5 * q * sg
        hp = -0.5 * p * sg
    elif DIV == 4:  # skew_kl
        logm = logaddexp(logp + log_dw, logq + log_1m_dw, FAST)
        phi = xlogr(p, logp, logm)
        s = tl.where(p == 0, 0.0, tl.where(logm == float("-inf"), 1.0, fexp(log_1m_dw + logq - logm)))  # Q's share
        gq = -p * s
        hp = phi + p * s
    else:  # skew_reverse_kl
        logm = logaddexp(logp + log_1m_dw, logq + log_dw, FAST)
        phi = xlogr(q, logq, logm)
        s = tl.where(q == 0, 0.0, tl.where(logm == float("-inf"), 1.0, fexp(log_1m_dw + logp - logm)))  # P's share
        gq = phi + q * s
        hp = -q * s
    return phi, gq, hp


@triton.jit
def group_stats(m, sums, z):
    """Online softmax statistics of one tile, kept per group of 8 adjacent columns: z [BLOCK] or [KP, BLOCK]
    (logits / T, -inf where masked) is viewed as [..., BLOCK // 8, 8]; m, sums [..., BLOCK // 8] are each group's
    running max and sum of exp(z - m). A group is what one thread loads in one 16-byte
    vector (8 bf16 / fp16), so the max and the sum stay in its registers: no shuffle, no barrier in the sweep's loop
    (one tile-wide reduction per tile cost ~10 of v1's ~56 instructions per column: benchmarks/NOTES.md). -inf
    safe; a NaN logit makes its group's sum NaN. ``finish_stats`` combines the groups once, after the sweep."""
    if len(z.shape) == 1:
        zg = tl.reshape(z, (z.shape[0] // 8, 8))
        nm = tl.maximum(m, tl.max(zg, 1))
        safe = tl.where(nm == float("-inf"), 0.0, nm)
        total = sums * fexp(m - safe) + tl.sum(fexp(zg - safe[:, None]), 1)
    else:
        zg = tl.reshape(z, (z.shape[0], z.shape[1] // 8, 8))
        nm = tl.maximum(m, tl.max(zg, 2))
        safe = tl.where(nm == float("-inf"), 0.0, nm)
        total = sums * fexp(m - safe) + tl.sum(fexp(zg - safe[:, :, None]), 2)
    return nm, total


@triton.jit
def combine_stats(m, sums):
    """Groups' (or chunks') online-softmax statistics combined along the last axis: (m, sums [..., G]) -> the max M
    and the sum of exp(z - M) below it. A row with no finite logit gives (-inf, 0)."""
    if len(m.shape) == 1:
        mx = tl.max(m, 0)
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        total = tl.sum(sums * fexp(m - safe), 0)
    else:
        mx = tl.max(m, 1)
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        total = tl.sum(sums * fexp(m - safe[:, None]), 1)
    return mx, total


@triton.jit
def finish_stats(m, sums):
    """The row's normaliser from ``group_stats``' groups (m, sums [..., G], reduced along the last axis): its max M and
    the log of the sum of exp(z - M) (the split form log_softmax reads). A row with no finite logit gives (-inf,
    log 0 = -inf)."""
    mx, total = combine_stats(m, sums)
    return mx, tl.log(total)


@triton.jit
def row_weight(row, sw_ptr, lab_ptr, den_ptr, ignore_index, has_sw, has_labels, has_den, uses_label, V,
                ACC: tl.constexpr):  # fmt: skip
    """Row ``row``'s sample weight sw, the factor f = sw / denominator its gradient carries, its label (-1 without
    labels; int64) and whether it counts (valid: weight != 0 and label != ignore_index). has_*, uses_label (a
    cross-entropy term reads the label): runtime flags. A label out of [0, V) that is read makes sw and f NaN, so
    the row's loss and gradient are NaN: the Python range check does not run under torch.compile, and a kernel
    cannot raise (the label's logit itself is never loaded outside the row)."""
    sw = tl.full((), 1.0, ACC)
    if has_sw != 0:
        sw = tl.load(sw_ptr + row).to(ACC)
    valid = sw != 0.0
    label = row * 0 - 1
    if has_labels != 0:
        label = tl.load(lab_ptr + row)
        valid = valid & (label != ignore_index)
        if uses_label != 0:
            sw = tl.where((label < 0) | (label >= V), float("nan"), sw)
    f = sw
    if has_den != 0:
        f = sw / tl.load(den_ptr).to(ACC)
    return sw, f, label, valid


@triton.jit
def log_softmax(z, m, log_l):
    """log softmax at z from its row's max m of z and log_l = log sum exp(z - m): (z - m) - log_l, never
    z - (m + log_l). Near the row's top class both parts are small and exact, so a probability near 1 keeps its last
    bits (as e / sum does in the CPU kernel), where z - lse would lose ulp(lse) to the rounding of lse. (Hence natural
    units throughout, not base 2 with log2(e) folded into 1 / T: x log2(e) / T rounds at the logits' magnitude, an
    error of the size of ulp(lse) again: tests/test_kd_loss.py::test_dominant_class_far_from_zero.)"""
    return (z - m) - log_l


@triton.jit
def reload(ptrs, mask, RELOAD: tl.constexpr):
    """Load a tile, -inf where masked. RELOAD: the tile was read moments ago (it is in L1/L2); the optional work
    behind a run-time flag (cross-entropy, teacher gradients) reads it again rather than keeping the first read's
    tiles alive through the common path, whose registers (and so occupancy) it would otherwise raise. volatile so
    the compiler cannot merge it with the first read."""
    return tl.load(ptrs, mask=mask, other=float("-inf"), volatile=RELOAD)


@triton.jit
def log_probs(row_ptr, cols, mask, inv_t, m, log_l, ACC: tl.constexpr, RELOAD: tl.constexpr = False):
    """One tile of a row (or of K rows: cols [1, BLOCK], m and log_l [KP, 1]): its logits x (ACC, -inf where
    masked), log softmax(x / T) and softmax(x / T), from the split normaliser (m, log_l) of x / T (group_stats,
    finish_stats; see log_softmax). RELOAD: a second read of a tile just read (see reload)."""
    x = reload(row_ptr + cols, mask, RELOAD).to(ACC)
    logq = log_softmax(x * inv_t, m, log_l)
    return x, logq, fexp(logq)


@triton.jit
def ce_grad(s, q, m_ce, log_l_ce, cols, label, ce_at_t):
    """d CE / d s: softmax(s) at T = 1 (q itself when T = 1, the runtime flag ce_at_t; else from s's split
    normaliser (m_ce, log_l_ce), see log_softmax) minus the one-hot label."""
    sm = q
    if ce_at_t == 0:
        sm = fexp(log_softmax(s, m_ce, log_l_ce))
    return sm - tl.where(cols == label, 1.0, 0.0)


@triton.jit
def label_nll(s_label, m_ce, log_l_ce):
    """-log softmax(s)[label] from the label's logit and s's split normaliser (see log_softmax)."""
    return (m_ce - s_label) + log_l_ce


@triton.jit
def target_terms(t, logpk, pk, q, logq, inv_t, w, logw, m_c, ll_c, ks, kuse, cmask, ENS: tl.constexpr,
                 DIV: tl.constexpr, LOG_TARGET: tl.constexpr, dw, log_dw, log_1m_dw, FAST: tl.constexpr):  # fmt: skip
    """Targets and divergence terms of one tile (ENS: kd_loss.ENS_CODES, 0 for one teacher), from the teachers'
    logits t, log P_k and P_k ([KP, BLOCK]; padded teachers -inf and 0). Returns phi, gq (ensemble-combined,
    [BLOCK]); hp ([K, BLOCK] for loss_mean, else [BLOCK]); the single target p, log p; log(w_k P_k) ([KP, BLOCK])."""
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
            mx = tl.max(lwp, 0)  # (drops a NaN: [NaN, -inf] gives -inf; the sum below keeps it)
            safe = tl.where(mx == float("-inf"), 0.0, mx)
            # the sum is >= 1, or 0 (log -inf) where every term is -inf, or NaN where one is
            logp = safe + flog(tl.sum(fexp(lwp - safe[None, :]), 0), FAST)
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


@triton.jit
def teacher_aggregates(hp, logp, lwp, cmask, ks, ENS: tl.constexpr):
    """One tile's share of the per-teacher row aggregates the teachers' gradients need ([KP]; target_terms' outputs):
    sum_v hp_kv (one target per teacher), sum_v hp_v in lane 0 (one teacher, log-linear pool), sum_v r_kv hp_v with
    the responsibilities r_k = w_k P_k / P in log space (mixture)."""
    if ENS == 3:
        agg = tl.sum(tl.where(cmask[None, :], hp, 0.0), 1)
    elif ENS == 2 or ENS == 0:
        agg = tl.where(ks == 0, tl.sum(tl.where(cmask, hp, 0.0), 0), 0.0)
    else:
        resp = tl.where(logp[None, :] == float("-inf"), 0.0, fexp(lwp - logp[None, :]))
        agg = tl.sum(tl.where(cmask[None, :], resp * hp[None, :], 0.0), 1)
    return agg


@triton.jit
def teacher_grad(hp, pk, p, logp, lwp, w, agg, ks, f, kd_over_t, ENS: tl.constexpr):
    """The teachers' logit gradients of one tile ([KP, BLOCK]) from the row's aggregates (teacher_aggregates summed
    over the row), the row factor f and the divergence's scale kd / T; a teacher of weight 0 gets exactly 0."""
    if ENS == 3:
        gt = w[:, None] * (hp - pk * agg[:, None])
    elif ENS == 2 or ENS == 0:
        agg0 = tl.sum(tl.where(ks == 0, agg, 0.0), 0)
        gt = w[:, None] * (hp - p * agg0)[None, :]
    else:
        resp = tl.where(logp[None, :] == float("-inf"), 0.0, fexp(lwp - logp[None, :]))
        gt = resp * hp[None, :] - pk * agg[:, None]
    gt = tl.where(kd_over_t != 0, f * kd_over_t * gt, 0.0)
    return tl.where(w[:, None] > 0, gt, 0.0)
