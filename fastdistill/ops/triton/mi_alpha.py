"""Triton backend of MI-alpha (SPEC §2, §6): the algebra of ``csrc/common/mi_math.h``, mirrored function for
function (``_row_consts`` = mi::row_consts, ...), with the passes of ``csrc/cpu/mi_alpha_cpu.cpp``.

Row i is teacher example i, S_ij = <v_i, u_j> / T (v = teacher, u = student); the N x N matrix is never stored.
Every kernel computes [BM, BN] score tiles ``tl.dot(V_tile, U_tile^T)`` on the fly, summing over the feature dim in
BK-wide chunks (D = 1..1024, zero-padded to tl.dot's minimum of 16), with float32 accumulation (float64 for
float64 inputs; half-precision features go to tl.dot in their own dtype, i.e. to the tensor cores).

  forward   ``_mi_fwd_kernel``, one program per block of BM teacher rows, two sweeps over the column tiles:
            pass 1, online: the row's largest score and its column k*_i (first on ties), S_ii, and the exp-sum of
            the other columns, giving l_i (all j), w_i (j != i) and z_i (j != k*_i) without cancellation;
            pass 2 (S recomputed): sum log t_ij, sum 1 / t_ij and sum g_ij over j not in {i, k*_i}; the diagonal
            and the largest score are closed form in (l_i, w_i, z_i). Writes stats [8, N] = (l, Crest, Phi, m,
            dI/da, k*, dI/dS_ii, z) (the layout of fastdistill::mi_alpha, csrc/fastdistill.cpp) and one estimate term
            per row.
                                                                                         2 x 2 N^2 D flops
  backward  dI/dS_ik needs S_ik and per-row stats only, so both kernels recompute S tiles and form G = dI/dS tile
            by tile, as flash attention's backward does, but without atomics:
            ``_mi_bwd_rows_kernel`` owns a block of teacher rows and sweeps the columns: d(teacher) = G U / T;
            ``_mi_bwd_cols_kernel`` owns a block of student rows and sweeps the teacher rows: d(student) = G^T V / T.
            Each program also owns a BDO-wide chunk of the output features (its [B, BDO] accumulator stays in
            registers); when D > BDO the S tiles are recomputed once per chunk.  (2 + 2 ceil(D / BDO)) x 2 N^2 D flops
Every output element is written by exactly one program, and the per-row estimate terms ([N]) are summed by
``torch.sum`` in float64: no float atomics, two runs are bitwise equal. Extra memory: stats [8, N] and one [N]
buffer, O(N); no N x N tile ever leaves the chip and the [N, D] features are not copied. G goes to the second
matmul in the features' dtype, scaled by N first so that fp16 does not flush its O(1 / N^2) off-diagonal
entries; the factor is taken out after the sum.

Half-precision features (bfloat16 / float16) go by strips instead (``use_strips``; the section "strips" below):
cuBLAS computes S a strip of rows at a time, in float32, the forward's row kernel reads it (``_mi_fwd`` with
STRIP), ``_mi_strip_grad`` turns it into G, and cuBLAS does the gradient matmuls: 1 + 3 x 2 N^2 D flops at the
matmul library's rate, memory O(N D) plus one strip.

The float parameters (1 / T, log(N - 1), log alpha, ...) reach the kernels in a tensor of the accumulation dtype:
scalar kernel arguments would be rounded to float32.
"""

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import gemm
from ..inputs import MIBackwardArgs, MIInputs
from ..registration import MI_STATS_ROWS, mi_alpha_backward_fake, mi_alpha_fake, register_mi_triton
from .launch import Launch, acc_dtype, cdiv, fast_math, int_tensor, is_aligned, is_eager, jit_pair, param_tensor
from .row_math import fexp, flog, rmul

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- csrc/common/mi_math.h ------------------------------------------------------------------------------------------


@triton.jit
def _row_consts(lse, a, lam, log_alpha, log_1m_alpha):
    """mi::row_consts: K, alpha', beta', log alpha', log beta', log gamma of the interpolated baseline."""
    x = log_alpha + lse - lam
    y = log_1m_alpha + a
    k = tl.maximum(x, y)
    return k, tl.exp(x - k), tl.exp(y - k), x - k, y - k, lse - lam - k


@triton.jit
def _log_t_of(log_alpha_, log_beta_, log_q):
    """mi::log_t_of: log(alpha' q + beta') from log q."""
    return _logaddexp(log_alpha_ + log_q, log_beta_)


@triton.jit
def _t_of(alpha_, beta_, p):
    """mi::t_of: t_ij = alpha' (1 - p) + beta' (j neither i nor k*_i, so p <= 1/2)."""
    return alpha_ * (1.0 - p) + beta_


@triton.jit
def _g_of(alpha_, beta_, p, inv_t):
    """mi::g_of: g_ij = (beta' - alpha' p) / t_ij, the terms of 1/N - C_i."""
    return (beta_ - alpha_ * p) * inv_t


@triton.jit
def _grad_offdiag(alpha_, beta_, u, q, crest, phi, inv_d):
    """mi::grad_offdiag: dI/dS_ik (k not in {i, k*_i}) from u = exp(S_ik - z_i): p = u Q,
    -(p (Crest - alpha' / (t D)) + u Phi)."""
    p = u * q
    return 0.0 - (p * (crest - alpha_ * inv_d / _t_of(alpha_, beta_, p)) + u * phi)


@triton.jit
def _grad_star(p, crest, m):
    """mi::grad_star: dI/dS_ik at the row's largest score k = k*_i != i: -p (Crest_i + m_i)."""
    return -p * (crest + m)


@triton.jit
def _row_result(k, alpha_, log_alpha_, beta_, log_beta_, log_gamma, lse, w, z, sdiag, diag_is_largest, sum_log,
                sum_inv, sum_g, nf, inv_n, inv_d):  # fmt: skip
    """mi::row_result: (part_i, Crest, Phi, m, dI/da, dI/dS_ii) from pass 1 and the pass-2 sums."""
    log_n = tl.log(nf)
    log_d = -tl.log(inv_d)
    log_qd = w - lse
    log_td = _log_t_of(log_alpha_, log_beta_, log_qd)
    r = tl.exp(log_gamma + log_qd - log_td)
    log_m = log_beta_ + log_gamma - 2.0 * log_td - log_n
    crest = alpha_ * sum_inv * inv_d
    # the row's largest score off the diagonal (evaluated for every row, used where k*_i != i)
    log_qs = z - lse
    log_ts = _log_t_of(log_alpha_, log_beta_, log_qs)
    log_qc = log_alpha_ - _logaddexp(log_alpha_, log_beta_ - log_qs) - log_d  # log(q* c*), no gap-sized cancellation
    log_t = sum_log + tl.where(diag_is_largest, 0.0, log_ts)
    beta_over_t = beta_ * sum_inv + tl.where(diag_is_largest, 0.0, tl.exp(log_beta_ - log_ts))
    phi = tl.where(diag_is_largest, tl.exp(log_qd + log_m), tl.exp(log_qc) + tl.exp(log_qs + log_m))
    m = tl.where(diag_is_largest, 0.0, tl.exp(log_m))
    gdiag = tl.where(diag_is_largest, tl.exp(log_qd) * crest + sum_g * inv_d,
                     inv_n - tl.exp(sdiag - lse) * crest - tl.exp(sdiag - z + log_qc))  # fmt: skip
    da = -beta_over_t * inv_d + r * tl.exp(log_beta_ - log_td) * inv_n
    part = sdiag - k - log_t / (nf - 1.0) - r
    return part, crest, phi, m, da, gdiag


@triton.jit
def _log1p(x):
    """log(1 + x), x >= 0, to a few ulp (Goldberg's trick; core Triton has no log1p, libdevice is GPU-only)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _logaddexp(x, y):
    """log(exp(x) + exp(y)), exact when either is -inf (kd_math.h's logaddexp)."""
    m = tl.maximum(x, y)
    r = m + _log1p(tl.exp(-tl.abs(x - y)))
    return tl.where(m == float("-inf"), m, r)


# ---- tiles ----------------------------------------------------------------------------------------------------------


@triton.jit
def _operand(x, WIDEN: tl.constexpr):
    # Triton's interpreter keeps bf16 as uint16 and its tl.dot multiplies the bit patterns: there (only) bf16
    # operands are widened to float32 first, which is exact, as the tensor cores' bf16 products are.
    if WIDEN:
        return x.to(tl.float32)
    return x


@triton.jit
def _scores(v_ptr, u_ptr, rows, cols, N, D, inv_t, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            ACC: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """S tile [BM, BN] = V[rows] U[cols]^T / T (rows, cols int64), summed over the features in BK chunks. Rows and
    columns past N, and features past D, load as 0. The 1/T product is rounded on its own (rmul): every kernel and
    every use in one (the row max, exp(S - l)) sees the same S, bitwise, as the statistics were formed from."""
    rmask = rows < N
    cmask = cols < N
    s = tl.zeros((BM, BN), ACC)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        v = tl.load(v_ptr + rows[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        u = tl.load(u_ptr + cols[:, None] * D + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        s = tl.dot(_operand(v, WIDEN), tl.trans(_operand(u, WIDEN)), s, input_precision=PREC, out_dtype=ACC)
    return rmul(s, inv_t, FAST)


@triton.jit
def _strip_scores(s_ptr, lrows, cols, N, SN, RS, inv_t, FAST: tl.constexpr):
    """The S tile [BM, BN] read from a strip of V U^T (float32 [RS, N], row stride SN; lrows: rows of the strip,
    int64), scaled by 1/T as ``_scores`` scales its sum. Rows past the strip and columns past N load as 0."""
    m = (lrows < RS)[:, None] & (cols < N)[None, :]
    return rmul(tl.load(s_ptr + lrows[:, None] * SN + cols[None, :], mask=m, other=0.0).to(inv_t.dtype), inv_t, FAST)


@triton.jit
def _score_tile(u_ptr, v_ptr, s_ptr, rows, lrows, cols, N, D, SN, RS, inv_t, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr, FAST: tl.constexpr,
                STRIP: tl.constexpr):  # fmt: skip
    """The forward's S tile: read from the strip (STRIP) or computed from the features."""
    if STRIP:
        s = _strip_scores(s_ptr, lrows, cols, N, SN, RS, inv_t, FAST)
    else:
        s = _scores(v_ptr, u_ptr, rows, cols, N, D, inv_t, BM, BN, BK, ACC, PREC, WIDEN, FAST)
    return s


@triton.jit
def _strip_rows(int_ptr, BM: tl.constexpr, ALIGNED: tl.constexpr):
    """A strip kernel's rows: (rows of the strip, int64; their rows of S, int32; rows in the strip; N; the strip's
    row stride SN). int_ptr: (N, D, first row, rows in the strip); SN = N restated as a multiple of 16 when
    ALIGNED (the launcher checked N % 16 == 0), so the strip's loads become 16-byte vectors."""
    N = tl.load(int_ptr + 0)
    r0 = tl.load(int_ptr + 2).to(tl.int32)
    RS = tl.load(int_ptr + 3)
    SN = N
    if ALIGNED:
        SN = N // 16 * 16
    lrows32 = tl.program_id(0) * BM + tl.arange(0, BM)
    return lrows32.to(tl.int64), r0 + lrows32, RS, N, SN


@triton.jit
def _load_params(prm_ptr):
    # 1/T, log(N-1), log alpha, log(1-alpha), 1/N, 1/(N(N-1)), 1/(N-1), N
    return (tl.load(prm_ptr + 0), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2), tl.load(prm_ptr + 3),
            tl.load(prm_ptr + 4), tl.load(prm_ptr + 5), tl.load(prm_ptr + 6), tl.load(prm_ptr + 7))  # fmt: skip


@triton.jit
def _row_stats(stats_ptr, a_ptr, rows, N, lam, log_alpha, log_1m_alpha, ACC: tl.constexpr):
    """What the backward needs of these rows (mi_alpha_cpu.cpp: row_arrays): z, Q = exp(z - l), Crest, Phi, m, k*,
    dI/dS_ii from the forward's stats; alpha', beta' recomputed from l and a."""
    rmask = rows < N
    lse = tl.load(stats_ptr + 0 * N + rows, mask=rmask, other=0.0)
    crest = tl.load(stats_ptr + 1 * N + rows, mask=rmask, other=0.0)
    phi = tl.load(stats_ptr + 2 * N + rows, mask=rmask, other=0.0)
    m = tl.load(stats_ptr + 3 * N + rows, mask=rmask, other=0.0)
    star = tl.load(stats_ptr + 5 * N + rows, mask=rmask, other=0.0).to(tl.int32)
    gdiag = tl.load(stats_ptr + 6 * N + rows, mask=rmask, other=0.0)
    z = tl.load(stats_ptr + 7 * N + rows, mask=rmask, other=0.0)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0).to(ACC)
    _, alpha_, beta_, _, _, _ = _row_consts(lse, a, lam, log_alpha, log_1m_alpha)
    return lse, z, fexp(z - lse), crest, phi, m, star, gdiag, alpha_, beta_


@triton.jit
def _grad_tile(s, rows, cols, N, lse, z, q, crest, phi, m, star, gdiag, alpha_, beta_, inv_d, nf):
    """N * dI/dS on a tile (per-row quantities [BM] along axis 0); 0 outside the N x N matrix. The generic formula,
    then the row's largest score, then the diagonal (from the forward pass; it wins when k*_i = i), as
    backward_impl does. rows, cols, star, N: int32 (indices within the N x N matrix; compares in one instruction)."""
    u = fexp(s - z[:, None])
    g = _grad_offdiag(alpha_[:, None], beta_[:, None], u, q[:, None], crest[:, None], phi[:, None], inv_d)
    p = fexp(s - lse[:, None])  # (not u q: u = exp(S - z) overflows at the largest score, where p is used)
    g = tl.where(cols[None, :] == star[:, None], _grad_star(p, crest[:, None], m[:, None]), g)
    g = tl.where(cols[None, :] == rows[:, None], gdiag[:, None], g)
    return tl.where((rows < N)[:, None] & (cols < N)[None, :], g * nf, 0.0)


# ---- kernels --------------------------------------------------------------------------------------------------------


@triton.jit
def _sizes(int_ptr, ALIGNED: tl.constexpr):
    """N and D, int64 (launch.py: no scalar integer arguments); D restated as a multiple of 16 when ALIGNED."""
    N = tl.load(int_ptr + 0)
    D = tl.load(int_ptr + 1)
    if ALIGNED:  # the launcher checked D % 16 == 0: said so, the feature loads become 16-byte vectors
        D = D // 16 * 16
    return N, D


def _mi_fwd(u_ptr, v_ptr, s_ptr, a_ptr, prm_ptr, stats_ptr, part_ptr, int_ptr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr,
            FAST: tl.constexpr, STRIP: tl.constexpr):  # fmt: skip
    """STRIP: the rows of one strip, S read from s_ptr (float32 [rows, N], the strip of V U^T that cuBLAS wrote);
    else S tiles computed here from u_ptr, v_ptr."""
    if STRIP:
        lrows, rows32, RS, N, SN = _strip_rows(int_ptr, BM, ALIGNED)
        D = N  # (no feature loads)
        rmask = lrows < RS
    else:
        N, D = _sizes(int_ptr, ALIGNED)
        rows32 = tl.program_id(0) * BM + tl.arange(0, BM)
        lrows, RS, SN = rows32.to(tl.int64), N, N  # (no strip)
        rmask = rows32 < N.to(tl.int32)
    N32 = N.to(tl.int32)  # indices within the N x N matrix compare as int32 (one instruction); offsets stay int64
    rows = rows32.to(tl.int64)
    inv_t, lam, log_alpha, log_1m_alpha, inv_n, inv_d, inv_nm1, nf = _load_params(prm_ptr)

    # pass 1 (mi_alpha_cpu.cpp: forward_row), online over the column tiles: the running max mx and its column k*
    # (the first on ties: a later tile takes over only with a strictly larger score), S_ii, and the log-sum-exp of
    # the columns not in {i, k*} with its own running max m2 (relative to mx their exps may all underflow). When k*
    # moves, the old largest joins that rest, unless it was the diagonal.
    mx = tl.full((BM,), float("-inf"), ACC)
    star = tl.full((BM,), -1, tl.int32)
    m2 = tl.full((BM,), float("-inf"), ACC)
    r2 = tl.zeros((BM,), ACC)
    sdiag = tl.zeros((BM,), ACC)
    for j0 in range(0, N, BN):
        cols32 = (j0 + tl.arange(0, BN)).to(tl.int32)
        cols = cols32.to(tl.int64)
        s = _score_tile(u_ptr, v_ptr, s_ptr, rows, lrows, cols, N, D, SN, RS, inv_t, BM, BN, BK, ACC, PREC, WIDEN,
                        FAST, STRIP)  # fmt: skip
        s = tl.where((cols32 < N32)[None, :], s, float("-inf"))
        diag = rows32[:, None] == cols32[None, :]
        tmax = tl.max(s, 1)
        tstar = tl.min(tl.where(s == tmax[:, None], cols32[None, :], N32), 1)
        moved = tmax > mx
        displaced = tl.where(moved & (star >= 0) & (star != rows32), mx, float("-inf"))
        star = tl.where(moved, tstar, star)
        x = tl.where(diag | (cols32[None, :] == star[:, None]), float("-inf"), s)
        new2 = tl.maximum(tl.maximum(m2, tl.max(x, 1)), displaced)
        safe = tl.where(new2 == float("-inf"), 0.0, new2)
        r2 = r2 * fexp(m2 - safe) + tl.sum(fexp(x - safe[:, None]), 1) + fexp(displaced - safe)
        m2 = new2
        mx = tl.maximum(mx, tmax)
        sdiag += tl.sum(tl.where(diag, s, 0.0), 1)
    # l = lse (all columns), w (without the diagonal), z (without the largest), each without cancellation
    star_is_diag = star == rows32
    lse_rest = tl.where(m2 == float("-inf"), float("-inf"), m2 + tl.log(r2))
    z = tl.where(star_is_diag, lse_rest, _logaddexp(lse_rest, sdiag))
    w = tl.where(star_is_diag, lse_rest, _logaddexp(lse_rest, mx))
    lse = _logaddexp(z, mx)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0).to(ACC)
    k, alpha_, beta_, log_alpha_, log_beta_, log_gamma = _row_consts(lse, a, lam, log_alpha, log_1m_alpha)

    # pass 2 over j not in {i, k*} (S recomputed): sum log t_ij, sum 1 / t_ij (C_i and dI/da_i are multiples of it)
    # and sum g_ij (dI/dS_ii)
    sum_log = tl.zeros((BM,), ACC)
    sum_inv = tl.zeros((BM,), ACC)
    sum_g = tl.zeros((BM,), ACC)
    for j0 in range(0, N, BN):
        cols32 = (j0 + tl.arange(0, BN)).to(tl.int32)
        cols = cols32.to(tl.int64)
        s = _score_tile(u_ptr, v_ptr, s_ptr, rows, lrows, cols, N, D, SN, RS, inv_t, BM, BN, BK, ACC, PREC, WIDEN,
                        FAST, STRIP)  # fmt: skip
        keep = (cols32 < N32)[None, :] & (cols32[None, :] != rows32[:, None]) & (cols32[None, :] != star[:, None])
        p = fexp(s - lse[:, None])
        t = _t_of(alpha_[:, None], beta_[:, None], p)  # >= 1/2 (p <= 1/2 off {i, k*}): flog's absolute error is fine
        inv = 1.0 / t
        sum_log += tl.sum(tl.where(keep, flog(t, FAST), 0.0), 1)
        sum_inv += tl.sum(tl.where(keep, inv, 0.0), 1)
        sum_g += tl.sum(tl.where(keep, _g_of(alpha_[:, None], beta_[:, None], p, inv), 0.0), 1)
    part, crest, phi, m, da, gdiag = _row_result(k, alpha_, log_alpha_, beta_, log_beta_, log_gamma, lse, w, z, sdiag,
                                                 star_is_diag, sum_log, sum_inv, sum_g, nf, inv_n, inv_d)  # fmt: skip
    # stats: the layout of fastdistill::mi_alpha (csrc/fastdistill.cpp)
    tl.store(stats_ptr + 0 * N + rows, lse, mask=rmask)
    tl.store(stats_ptr + 1 * N + rows, crest, mask=rmask)
    tl.store(stats_ptr + 2 * N + rows, phi, mask=rmask)
    tl.store(stats_ptr + 3 * N + rows, m, mask=rmask)
    tl.store(stats_ptr + 4 * N + rows, da, mask=rmask)
    tl.store(stats_ptr + 5 * N + rows, star.to(ACC), mask=rmask)
    tl.store(stats_ptr + 6 * N + rows, gdiag, mask=rmask)
    tl.store(stats_ptr + 7 * N + rows, z, mask=rmask)
    # N * (this row's part of I - 1), one [N] entry per row: combining the row's O(l_i)-sized terms before the sum
    # over rows keeps their cancellation out of the total.
    tl.store(part_ptr + rows, part, mask=rmask)


def _mi_bwd_rows(u_ptr, v_ptr, a_ptr, prm_ptr, stats_ptr, grad_ptr, out_ptr, int_ptr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, BDO: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr,
                 PREC: tl.constexpr, WIDEN: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """d(teacher)[rows, chunk] = grad / T * sum over column tiles of G[rows, cols] U[cols, chunk]."""
    N, D = _sizes(int_ptr, ALIGNED)
    N32 = N.to(tl.int32)
    rows32 = tl.program_id(0) * BM + tl.arange(0, BM)
    rows = rows32.to(tl.int64)
    dcols = tl.program_id(1) * BDO + tl.arange(0, BDO)
    dmask = dcols < D
    inv_t, lam, log_alpha, log_1m_alpha, inv_n, inv_d, inv_nm1, nf = _load_params(prm_ptr)
    lse, z, q, crest, phi, m, star, gdiag, alpha_, beta_ = _row_stats(stats_ptr, a_ptr, rows, N, lam, log_alpha,
                                                                    log_1m_alpha, ACC)  # fmt: skip
    acc = tl.zeros((BM, BDO), ACC)
    for j0 in range(0, N, BN):
        cols32 = (j0 + tl.arange(0, BN)).to(tl.int32)
        cols = cols32.to(tl.int64)
        s = _scores(v_ptr, u_ptr, rows, cols, N, D, inv_t, BM, BN, BK, ACC, PREC, WIDEN, FAST)
        g = _grad_tile(s, rows32, cols32, N32, lse, z, q, crest, phi, m, star, gdiag, alpha_, beta_, inv_d, nf)
        u = tl.load(u_ptr + cols[:, None] * D + dcols[None, :], mask=(cols < N)[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(_operand(g.to(u.dtype), WIDEN), _operand(u, WIDEN), acc, input_precision=PREC, out_dtype=ACC)
    f = tl.load(grad_ptr).to(ACC) * inv_t * inv_n  # inv_n: _grad_tile's factor N
    tl.store(out_ptr + rows[:, None] * D + dcols[None, :], (acc * f).to(out_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & dmask[None, :])  # fmt: skip


def _mi_bwd_cols(u_ptr, v_ptr, a_ptr, prm_ptr, stats_ptr, grad_ptr, out_ptr, int_ptr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, BDO: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr,
                 PREC: tl.constexpr, WIDEN: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """d(student)[cols, chunk] = grad / T * sum over row tiles of G[rows, cols]^T V[rows, chunk]. The per-row
    quantities vary along the row tiles, so they are loaded (and alpha', beta' recomputed) per tile; k*_i is
    compared with the tile's columns, so no list of the rows whose largest score is in this column is needed."""
    N, D = _sizes(int_ptr, ALIGNED)
    N32 = N.to(tl.int32)
    cols32 = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = cols32.to(tl.int64)
    dcols = tl.program_id(1) * BDO + tl.arange(0, BDO)
    dmask = dcols < D
    inv_t, lam, log_alpha, log_1m_alpha, inv_n, inv_d, inv_nm1, nf = _load_params(prm_ptr)
    acc = tl.zeros((BN, BDO), ACC)
    for i0 in range(0, N, BM):
        rows32 = (i0 + tl.arange(0, BM)).to(tl.int32)
        rows = rows32.to(tl.int64)
        lse, z, q, crest, phi, m, star, gdiag, alpha_, beta_ = _row_stats(stats_ptr, a_ptr, rows, N, lam,
                                                                        log_alpha, log_1m_alpha, ACC)  # fmt: skip
        s = _scores(v_ptr, u_ptr, rows, cols, N, D, inv_t, BM, BN, BK, ACC, PREC, WIDEN, FAST)
        g = _grad_tile(s, rows32, cols32, N32, lse, z, q, crest, phi, m, star, gdiag, alpha_, beta_, inv_d, nf)
        v = tl.load(v_ptr + rows[:, None] * D + dcols[None, :], mask=(rows < N)[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(_operand(g.to(v.dtype), WIDEN)), _operand(v, WIDEN), acc, input_precision=PREC,
                     out_dtype=ACC)  # fmt: skip
    f = tl.load(grad_ptr).to(ACC) * inv_t * inv_n
    tl.store(out_ptr + cols[:, None] * D + dcols[None, :], (acc * f).to(out_ptr.dtype.element_ty),
             mask=(cols < N)[:, None] & dmask[None, :])  # fmt: skip


def _mi_strip_grad(s_ptr, a_ptr, prm_ptr, stats_ptr, g_ptr, int_ptr, BM: tl.constexpr, BN: tl.constexpr,
                   ALIGNED: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """N * dI/dS on one [BM, BN] tile of a strip, from the strip's S (float32 [rows, N]) and the forward's stats,
    written to g_ptr ([rows, N], row stride SN) in the features' dtype: the operand the row kernels give tl.dot, here
    given to cuBLAS for d(teacher) = G U and d(student) += G^T V."""
    lrows, rows32, RS, N, SN = _strip_rows(int_ptr, BM, ALIGNED)
    N32 = N.to(tl.int32)
    rows = rows32.to(tl.int64)
    cols32 = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = cols32.to(tl.int64)
    inv_t, lam, log_alpha, log_1m_alpha, inv_n, inv_d, inv_nm1, nf = _load_params(prm_ptr)
    lse, z, q, crest, phi, m, star, gdiag, alpha_, beta_ = _row_stats(stats_ptr, a_ptr, rows, N, lam, log_alpha,
                                                                    log_1m_alpha, ACC)  # fmt: skip
    s = _strip_scores(s_ptr, lrows, cols, N, SN, RS, inv_t, FAST)
    g = _grad_tile(s, rows32, cols32, N32, lse, z, q, crest, phi, m, star, gdiag, alpha_, beta_, inv_d, nf)
    tl.store(g_ptr + lrows[:, None] * SN + cols[None, :], g.to(g_ptr.dtype.element_ty),
             mask=(lrows < RS)[:, None] & (cols < N)[None, :])  # fmt: skip


# ---- host side ------------------------------------------------------------------------------------------------------


def _tiles(d: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options: {"fwd": {...}, "bwd": {...}}. The GPU rows are UNTUNED first guesses (no GPU
    was available to measure them): flash-attention-like 64 x 64 score tiles, feature chunks sized so that two
    pipeline stages should stay within ~100 KB of shared memory (estimated, not measured), narrower for 4- and 8-byte
    types. The interpreter gets the smallest tiles tl.dot accepts (16), which also makes the tests cross several
    row, column and feature tiles."""
    pow2_d = max(16, triton.next_power_of_2(d))
    # the strips' kernels (half-precision features; no tl.dot): a few rows per program across 16-byte column
    # vectors, so that a strip of a few hundred rows still fills the GPU (UNTUNED, as the rest)
    strip = {"strip_fwd": {"BM": 2, "BN": 1024, "num_warps": 4}, "strip_grad": {"BM": 16, "BN": 256, "num_warps": 8}}
    if _INTERPRET:
        t = {"BM": 16, "BN": 16, "BK": 16}
        return {"fwd": t, "bwd": {**t, "BDO": 16}, "strip_fwd": {"BM": 4, "BN": 16}, "strip_grad": {"BM": 4, "BN": 16}}
    if dtype == torch.float64:
        fwd = {"BM": 32, "BN": 32, "BK": min(pow2_d, 32), "num_warps": 4, "num_stages": 2}
        bwd = {"BM": 32, "BN": 32, "BK": min(pow2_d, 32), "BDO": min(pow2_d, 64), "num_warps": 4, "num_stages": 1}
    elif dtype == torch.float32:  # ieee fp32 dot (FMA): no tensor cores, so smaller feature chunks
        fwd = {"BM": 64, "BN": 64, "BK": min(pow2_d, 32), "num_warps": 4, "num_stages": 2}
        bdo = min(pow2_d, 128)
        bwd = {"BM": 64, "BN": 64, "BK": min(pow2_d, 32), "BDO": bdo, "num_warps": 4 if bdo <= 64 else 8,
               "num_stages": 2}  # fmt: skip
    else:  # bf16 / fp16: tensor cores. 8 warps forward: at 4, ptxas spilled 72 bytes at 255 registers (the
        # benchmark's bf16 configurations, make kernels-report); at 8, 213 registers and no spills
        fwd = {"BM": 64, "BN": 64, "BK": min(pow2_d, 128), "num_warps": 8, "num_stages": 3}
        bdo = min(pow2_d, 256)
        bwd = {"BM": 64, "BN": 64, "BK": min(pow2_d, 64), "BDO": bdo, "num_warps": 8, "num_stages": 2}
        # (8 warps at every D: at 4, v2's int32 index copies took bwd_cols at D = 128 to 255 registers and 8 bytes
        # of spill; at 8, 195, and every D <= 128 at 127-195)
    return {"fwd": fwd, "bwd": bwd, **strip}


def _launch_args(dtype: torch.dtype) -> dict:
    # fp32 features: "ieee", since tf32 (10-bit mantissa) would put ~1e-3 relative errors into S; half types: the
    # tensor-core default (the precision argument only concerns fp32 operands).
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return {"ACC": acc, "PREC": prec, "WIDEN": _INTERPRET and dtype == torch.bfloat16, "FAST": fast_math(dtype)}


def _params(n: int, alpha: float, temperature: float, acc: torch.dtype, like: Tensor) -> Tensor:
    values = [1.0 / temperature, math.log(n - 1), math.log(alpha) if alpha > 0 else -math.inf,
              math.log1p(-alpha) if alpha < 1 else -math.inf, 1.0 / n, 1.0 / (n * (n - 1)), 1.0 / (n - 1),
              float(n)]  # fmt: skip
    return param_tensor(values, acc, like)


_SMALL = ("a_ptr", "prm_ptr", "stats_ptr", "part_ptr", "grad_ptr", "int_ptr")
_mi_fwd_kernel = jit_pair(_mi_fwd, small=_SMALL)
_mi_bwd_rows_kernel = jit_pair(_mi_bwd_rows, small=_SMALL)
_mi_bwd_cols_kernel = jit_pair(_mi_bwd_cols, small=_SMALL)
_mi_strip_grad_kernel = jit_pair(_mi_strip_grad, small=_SMALL)
# the compiled variants: every value each constexpr can take (aot.py checks the launchers reach exactly these)
KERNELS = [_mi_fwd_kernel, _mi_bwd_rows_kernel, _mi_bwd_cols_kernel, _mi_strip_grad_kernel]
MI_DOMAINS = {"BM": (2, 16, 32, 64), "BN": (32, 64, 256, 1024), "BK": (16, 32, 64, 128), "BDO": (16, 32, 64, 128, 256),
              "ALIGNED": (False, True), "ACC": ("fp32", "fp64"), "PREC": ("ieee", "tf32"),
              "WIDEN": (False,), "FAST": (False, True), "STRIP": (False, True)}  # fmt: skip


def _common(student: Tensor, teacher: Tensor, log_baseline: Tensor, alpha: float, temperature: float):
    n, d = student.shape
    acc = acc_dtype(student.dtype)
    u, v = student.contiguous(), teacher.contiguous()
    a = log_baseline.to(acc).contiguous()
    prm = _params(n, alpha, temperature, acc, student)
    ints = int_tensor([n, d], student)
    return n, d, acc, u, v, a, prm, ints


def mi_fwd_launch(student, teacher, log_baseline, alpha, temperature) -> tuple[Launch, Tensor, Tensor]:
    """The forward's launch and its outputs (stats [8, N], the per-row estimate terms [N]). Meta tensors work."""
    n, d, acc, u, v, a, prm, ints = _common(student, teacher, log_baseline, alpha, temperature)
    stats = torch.empty((MI_STATS_ROWS, n), dtype=acc, device=student.device)
    part = torch.empty((n,), dtype=acc, device=student.device)
    cfg = dict(_tiles(d, student.dtype)["fwd"])
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    aligned = is_aligned([u, v], [d])
    launch = Launch(_mi_fwd_kernel.pick(aligned), (cdiv(n, cfg["BM"]),),
                    (u, v, u, a, prm, stats, part, ints), {**cfg, "ALIGNED": aligned, **_launch_args(student.dtype),
                    "STRIP": False}, options or {"num_warps": 4})  # fmt: skip
    return launch, stats, part


def mi_bwd_launches(grad, student, teacher, log_baseline, stats, alpha, temperature):
    """The backward's two launches (d teacher by row blocks, d student by column blocks) and their outputs."""
    n, d, acc, u, v, a, prm, ints = _common(student, teacher, log_baseline, alpha, temperature)
    st = stats.to(acc).contiguous()
    g = grad.to(acc).reshape(1)
    d_student = torch.empty((n, d), dtype=student.dtype, device=student.device)
    d_teacher = torch.empty((n, d), dtype=teacher.dtype, device=teacher.device)
    cfg = dict(_tiles(d, student.dtype)["bwd"])
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    aligned = is_aligned([u, v, d_student, d_teacher], [d])
    cx = {**cfg, "ALIGNED": aligned, **_launch_args(student.dtype)}
    chunks = cdiv(d, cfg["BDO"])
    rows = Launch(_mi_bwd_rows_kernel.pick(aligned), (cdiv(n, cfg["BM"]), chunks),
                  (u, v, a, prm, st, g, d_teacher, ints), cx, options or {"num_warps": 4})  # fmt: skip
    cols = Launch(_mi_bwd_cols_kernel.pick(aligned), (cdiv(n, cfg["BN"]), chunks),
                  (u, v, a, prm, st, g, d_student, ints), cx, options or {"num_warps": 4})  # fmt: skip
    return rows, cols, d_student, d_teacher


# ---- strips: half-precision features --------------------------------------------------------------------------------
# The tile kernels above run the matmuls of S at ~17 % of the tensor cores' rate (NOTES.md, issue 18). For bfloat16 /
# float16 features the matmuls go to cuBLAS instead, a strip of rows at a time: S = V[strip] U^T in float32 (the
# products exact, the sums in float32, as tl.dot's), read by the forward's row kernel (_mi_fwd, STRIP) and by
# _mi_strip_grad, which writes G = N dI/dS in the features' dtype (the tile kernels' tl.dot operand); then
# d(teacher)[strip] = G U and d(student) += G^T V[strip] by cuBLAS, accumulated in float32. Extra memory: one strip's
# S and G, (4 + 2) R N bytes, R chosen so that they fit max(64 MiB, 2 N D bytes of features), and the float32
# d(student) accumulator: O(N D), never N x N. Matmuls of 2 N^2 D flops: 1 forward + 3 backward.

_STRIP_FLOOR_BYTES = 64 << 20
_STRIP_MIN_ROWS = 512


def use_strips(dtype: torch.dtype) -> bool:
    """Whether the op runs by strips for features of ``dtype``: half precision, unless FASTDISTILL_MI_STRIPS=0 (the
    tile kernels then, as for float32 / float64) or this torch lacks cuBLAS's float32-output GEMM."""
    return dtype in gemm.HALF and gemm.HAS_MM_DTYPE and os.environ.get("FASTDISTILL_MI_STRIPS") != "0"


def _env_count(name: str) -> int | None:
    """A positive integer override from the environment (the tests' small strips and groups), or None."""
    env = os.environ.get(name)
    if not env:
        return None
    if int(env) < 1:
        raise ValueError(f"{name} must be a positive integer, got {env!r}")
    return int(env)


def _strip_budget(n: int, d: int, dtype: torch.dtype) -> int:
    """Bytes a strip's S and G may take: max(64 MiB, 2 N D bytes of features, i.e. the two feature tensors)."""
    return max(_STRIP_FLOOR_BYTES, 2 * n * d * dtype.itemsize)


def strip_rows(n: int, d: int, dtype: torch.dtype) -> int:
    """Rows per strip: S (float32) and G (``dtype``) of that many rows fit the strip budget (_strip_budget); a
    multiple of 64, at least 512 (at most N): below that a strip's row kernel leaves SMs idle and its host work
    (~7 launches) outlasts its GPU work, as the 64 MiB alone would give at N = 65536, D = 128 (128 rows, 512
    strips). FASTDISTILL_MI_STRIP_ROWS overrides (the tests' many small strips)."""
    rows = _env_count("FASTDISTILL_MI_STRIP_ROWS")
    if rows is None:
        rows = max(_STRIP_MIN_ROWS, _strip_budget(n, d, dtype) // (n * (4 + dtype.itemsize)) // 64 * 64)
    return min(rows, n)


def group_strips(n: int, d: int, dtype: torch.dtype, rows: int) -> int:
    """Strips per group of the backward: a group's G (its strips' rows, ``dtype``) fits the strip budget on its own,
    at least one strip. The group's two gradient GEMMs then read and write the float32 d(student) once per group, not
    per strip (that C traffic, 8 N D bytes, is the GEMM's whole cost below ~800 rows) and d(teacher)'s GEMM gets as
    many more output rows. FASTDISTILL_MI_GROUP_STRIPS overrides (the tests)."""
    k = _env_count("FASTDISTILL_MI_GROUP_STRIPS")
    if k is None:
        k = max(1, _strip_budget(n, d, dtype) // (rows * n * dtype.itemsize))
    return min(k, cdiv(n, rows))


def _strip_ints(n: int, d: int, rows: int, like: Tensor) -> Tensor:
    """[strips, 4] int64: (N, D, first row, rows) of each strip on ``like``'s device: the cached int tensor of an
    eager call (launch.int_tensor), else made on the device in one go (no per-strip fills while tracing)."""
    k = cdiv(n, rows)
    if is_eager(like) and not isinstance(n, torch.SymInt):
        return int_tensor([x for r0 in range(0, n, rows) for x in (n, d, r0, min(rows, n - r0))], like).view(k, 4)
    device = like.device
    first = torch.arange(k, dtype=torch.int64, device=device) * rows
    full = functools.partial(torch.full, (k,), dtype=torch.int64, device=device)
    return torch.stack([full(n), full(d), first, (n - first).clamp(max=rows)], 1)


@dataclass
class _Strips:
    """What the strips of one call share: rows per strip, the per-strip ints, the two kernels' configurations."""

    n: int
    rows: int
    ints: Tensor
    fwd: dict
    grad: dict

    def launch_fwd(self, k: int, rs: int, u, v, s, a, prm, stats, part) -> Launch:
        kernel, cx, options = self.fwd["kernel"], self.fwd["constexprs"], self.fwd["options"]
        return Launch(kernel, (cdiv(rs, cx["BM"]),), (u, v, s, a, prm, stats, part, self.ints[k]), cx, options)

    def launch_grad(self, k: int, rs: int, s, a, prm, stats, g) -> Launch:
        kernel, cx, options = self.grad["kernel"], self.grad["constexprs"], self.grad["options"]
        grid = (cdiv(rs, cx["BM"]), cdiv(self.n, cx["BN"]))
        return Launch(kernel, grid, (s, a, prm, stats, g, self.ints[k]), cx, options)


def _strips(u: Tensor, v: Tensor, n: int, d: int, ints: bool = True) -> _Strips:
    """The strips of a call on features u, v [N, D]. The strips' S and G are fresh allocations (aligned) with row
    stride N, so ALIGNED needs N % 16 == 0 (and aligned u, v, which the forward kernel's signature also takes)."""
    tiles = _tiles(d, u.dtype)
    aligned = is_aligned([u, v], [n])
    cx = _launch_args(u.dtype)
    config = {}
    grad_cx = {"ACC": cx["ACC"], "FAST": cx["FAST"]}
    for name, kernel, extra in (("strip_fwd", _mi_fwd_kernel, {"BK": 16, **cx, "STRIP": True}),
                                ("strip_grad", _mi_strip_grad_kernel, grad_cx)):  # fmt: skip
        c = dict(tiles[name])
        options = {k: c.pop(k) for k in ("num_warps", "num_stages") if k in c} or {"num_warps": 4}
        config[name] = {"kernel": kernel.pick(aligned), "constexprs": {**c, **extra, "ALIGNED": aligned},
                        "options": options}  # fmt: skip
    rows = strip_rows(n, d, u.dtype)
    table = _strip_ints(n, d, rows, u) if ints else torch.empty((1, 4), dtype=torch.int64, device=u.device)
    return _Strips(n, rows, table, config["strip_fwd"], config["strip_grad"])


def _fwd_strip(p: _Strips, k: int, r0: int, u, v, a, prm, stats, part) -> None:
    """One strip of the forward (its own function, so that the strip's S is freed before the next one's)."""
    rs = min(p.rows, p.n - r0)
    s = gemm.mm32(v[r0 : r0 + rs], u.t())
    p.launch_fwd(k, rs, u, v, s, a, prm, stats, part).run()


def _grad_strip(p: _Strips, k: int, r0: int, u, v, a, prm, stats, g: Tensor) -> None:
    """Strip k's G into ``g`` (its rows of the group's buffer); its own function, so that its S is freed before the
    next strip's."""
    rs = min(p.rows, p.n - r0)
    s = gemm.mm32(v[r0 : r0 + rs], u.t())
    p.launch_grad(k, rs, s, a, prm, stats, g).run()


def _bwd_group(p: _Strips, k0: int, strips: int, u, v, a, prm, stats, f, d_student, d_teacher) -> None:
    """A group of strips of the backward (strip k0 first): each strip's G, then over the whole group d(teacher) = f G
    U and d(student) += G^T V (scaled by f at the end)."""
    g0 = k0 * p.rows
    rows = min(p.rows * strips, p.n - g0)
    g = torch.empty((rows, p.n), dtype=u.dtype, device=u.device)
    for j, r0 in enumerate(range(g0, g0 + rows, p.rows)):
        _grad_strip(p, k0 + j, r0, u, v, a, prm, stats, g[r0 - g0 : r0 - g0 + p.rows])
    torch.mul(gemm.mm32(g, u), f, out=d_teacher[g0 : g0 + rows])
    gemm.add_mm(d_student, g.t(), v[g0 : g0 + rows])


def mi_fwd_strips(student, teacher, log_baseline, alpha, temperature) -> tuple[Tensor, Tensor]:
    """The forward by strips: (stats [8, N], the per-row estimate terms [N])."""
    n, d, acc, u, v, a, prm, _ = _common(student, teacher, log_baseline, alpha, temperature)
    stats = torch.empty((MI_STATS_ROWS, n), dtype=acc, device=student.device)
    part = torch.empty((n,), dtype=acc, device=student.device)
    p = _strips(u, v, n, d)
    for k, r0 in enumerate(range(0, n, p.rows)):
        _fwd_strip(p, k, r0, u, v, a, prm, stats, part)
    return stats, part


def mi_bwd_strips(grad, student, teacher, log_baseline, stats, alpha, temperature) -> tuple[Tensor, Tensor]:
    """The backward by strips: (d student, d teacher), each in its input's dtype."""
    n, d, acc, u, v, a, prm, _ = _common(student, teacher, log_baseline, alpha, temperature)
    st = stats.to(acc).contiguous()
    f = grad.to(acc) * (1.0 / (temperature * n))  # 1/T, and 1/N: G carries the factor N
    d_teacher = torch.empty((n, d), dtype=teacher.dtype, device=teacher.device)
    d_student = torch.zeros((n, d), dtype=torch.float32, device=student.device)
    p = _strips(u, v, n, d)
    strips = group_strips(n, d, u.dtype, p.rows)
    for k0 in range(0, cdiv(n, p.rows), strips):
        _bwd_group(p, k0, strips, u, v, a, prm, st, f, d_student, d_teacher)
    return torch.mul(d_student, f, out=torch.empty_like(student)), d_teacher  # scaled and cast in one pass


def mi_launches(student: Tensor, teacher: Tensor, log_baseline: Tensor) -> list[tuple[str, Launch]]:
    """The launches of one forward + backward (for aot.py's reports): a strip's two for half-precision features
    (``use_strips``), else the tile kernels' three."""
    if use_strips(student.dtype):
        return mi_strip_launches(student, teacher, log_baseline)
    return mi_tile_launches(student, teacher, log_baseline)


def mi_tile_launches(student: Tensor, teacher: Tensor, log_baseline: Tensor) -> list[tuple[str, Launch]]:
    """The tile kernels' three launches of one forward + backward."""
    fwd, stats, _ = mi_fwd_launch(student, teacher, log_baseline, 0.01, 1.0)
    grad = torch.empty((), device=student.device, dtype=acc_dtype(student.dtype))
    rows, cols, _, _ = mi_bwd_launches(grad, student, teacher, log_baseline, stats, 0.01, 1.0)
    return [("fwd", fwd), ("bwd_rows", rows), ("bwd_cols", cols)]


def mi_strip_launches(student: Tensor, teacher: Tensor, log_baseline: Tensor) -> list[tuple[str, Launch]]:
    """A strip's two launches (for aot.py's reports), on meta tensors."""
    n, d, acc, u, v, a, prm, _ = _common(student, teacher, log_baseline, 0.01, 1.0)
    p = _strips(u, v, n, d, ints=False)
    s = torch.empty((p.rows, n), dtype=torch.float32, device=student.device)
    g = torch.empty((p.rows, n), dtype=student.dtype, device=student.device)
    stats = torch.empty((MI_STATS_ROWS, n), dtype=acc, device=student.device)
    return [("strip_fwd", p.launch_fwd(0, p.rows, u, v, s, a, prm, stats, stats[0])),
            ("strip_grad", p.launch_grad(0, p.rows, s, a, prm, stats, g))]  # fmt: skip


def mi_space():
    """Every launch over the problem space on meta tensors (aot.py compiles each distinct one): each dtype, D in
    every tile bucket, aligned (D % 16 == 0) and not; the strips' for half types, N a multiple of 16 and not (the
    tile kernels stay the fallback for half types too: FASTDISTILL_MI_STRIPS=0, or a torch without mm.dtype)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for d in (1, 16, 17, 32, 64, 128, 256, 768, 2048):
            x = torch.empty(64, d, device="meta", dtype=dtype)
            for _, launch in mi_tile_launches(x, x, torch.empty(64, device="meta")):
                yield launch
    for dtype in (torch.bfloat16, torch.float16):
        for n in (64, 65):
            x = torch.empty(n, 128, device="meta", dtype=dtype)
            for _, launch in mi_strip_launches(x, x, torch.empty(n, device="meta")):
                yield launch


def _mi_alpha_triton(*args) -> tuple[Tensor, Tensor]:
    """The Triton twin of ``fastdistill::mi_alpha`` (arguments: ``MIInputs.ARGS``): student, teacher [N, D] (one
    dtype, N >= 2), log_baseline [N]. Returns (estimate 0-dim, stats [8, N] = (l, Crest, Phi, m, dI/da, k*,
    dI/dS_ii, z)), float32 (float64 for float64 inputs)."""
    x = MIInputs.named(args)
    if use_strips(x.student.dtype):
        stats, part = mi_fwd_strips(**vars(x))
    else:
        launch, stats, part = mi_fwd_launch(**vars(x))
        launch.run()
    n = x.student.shape[0]
    estimate = (1.0 + part.to(torch.float64).sum() / n).to(part.dtype)  # fixed-order reduction: deterministic
    return estimate, stats


def _mi_alpha_backward_triton(*args) -> tuple[Tensor, Tensor]:
    """The Triton twin of ``fastdistill::mi_alpha_backward`` (arguments: ``MIBackwardArgs.ARGS``): (grad * dI/d
    student, grad * dI/d teacher), each in its input's dtype, from the forward's stats (S recomputed tile by
    tile)."""
    x = MIBackwardArgs.named(args)
    if use_strips(x.student.dtype):
        return mi_bwd_strips(**vars(x))
    rows, cols, d_student, d_teacher = mi_bwd_launches(**vars(x))
    rows.run()
    cols.run()
    return d_student, d_teacher


MIInputs.typed(_mi_alpha_triton)
MIBackwardArgs.typed(_mi_alpha_backward_triton)
if _INTERPRET:
    # Triton's interpreter cannot be traced (wrap_triton needs a compiled JITFunction), so here the ops are opaque to
    # torch.compile, with fake kernels; on a GPU they are triton_ops and torch.compile traces into the kernels.
    mi_alpha_triton = torch.library.custom_op("fastdistill::mi_alpha_triton", mutates_args=())(_mi_alpha_triton)
    mi_alpha_triton.register_fake(mi_alpha_fake)
    mi_alpha_backward_triton = torch.library.custom_op("fastdistill::mi_alpha_backward_triton", mutates_args=())(
        _mi_alpha_backward_triton
    )
    mi_alpha_backward_triton.register_fake(mi_alpha_backward_fake)
else:
    mi_alpha_triton = torch.library.triton_op("fastdistill::mi_alpha_triton", mutates_args=())(_mi_alpha_triton)
    mi_alpha_backward_triton = torch.library.triton_op("fastdistill::mi_alpha_backward_triton", mutates_args=())(
        _mi_alpha_backward_triton
    )
register_mi_triton(mi_alpha_triton, mi_alpha_backward_triton)
