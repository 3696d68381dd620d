// The per-element math of the MI-alpha estimate (SPEC §2, §6) in the form the tiled kernels evaluate, shared by the
// CPU and CUDA kernels (and mirrored line for line by fastdistill/ops/triton/mi_alpha.py). The readable definition
// over the materialised N x N matrix is fastdistill/ops/reference.py::mi_alpha; this file is its algebra rewritten
// so that only per-row statistics and one score at a time are needed.
//
// Row i (teacher example i) has scores S_ij = <v_i, u_j> / T, j = 0..N-1, and p_ij = exp(S_ij - l_i). With
// lam = log(N - 1), a_i the log-baseline, D = N (N - 1), the interpolated baseline is
//   B_ij = log(alpha exp(L_ij) + (1 - alpha) exp(a_i)),   exp(L_ij) = exp(l_i) q_ij / (N - 1),   q_ij = 1 - p_ij.
// q_ij is where precision is lost: 1 - p_ij cancels when S_ij dominates its row. Only one element per row can have
// p > 1/2 -- the row's largest, at column k*_i -- so pass 1 keeps, besides l_i = log sum_j exp(S_ij),
//   w_i = log sum_{j != i} exp(S_ij)   and   z_i = log sum_{j != k*_i} exp(S_ij),
// and the kernels take q_ii = exp(w_i - l_i), q_ik* = exp(z_i - l_i) and q_ij = 1 - p_ij (>= 1/2) elsewhere: every
// q to full relative precision, so no gradient below suffers a cancellation either.
// Factor out the row constant K_i = max(log alpha + l_i - lam, log(1 - alpha) + a_i):
//   B_ij = K_i + log t_ij,   t_ij = alpha' q_ij + beta',
//   alpha' = alpha exp(l_i - lam - K_i) = alpha gamma,  beta' = (1 - alpha) exp(a_i - K_i)   (both <= 1, one == 1).
// Then
//   joint term      J = (1/N) sum_i S_ii - (1/D) sum_i [(N - 1) K_i + sum_{j != i} log t_ij]
//   marginal term   M = (1/N) sum_i r_i,   r_i = exp(L_ii - B_ii) = gamma q_ii / t_ii
//   estimate        I = 1 + J - M
//   dI/da_i         = -(1/D) sum_{j != i} beta'/t_ij + r_i beta' / (N t_ii)
//   dI/dS_ik        = -p_ik (C_i + m_i - c_ik)  (k != i),    dI/dS_ii = 1/N - p_ii C_i,
//     c_ij = alpha' / (t_ij D) (j != i),  C_i = sum_{j != i} c_ij,  m_i = beta' gamma / (N t_ii^2).
// C_i is kept as C_i = Crest_i + c*_i, c*_i = c_ik* (0 when k*_i = i), so that at k = k*_i the gradient is
// -p (Crest_i + m_i) with no cancellation against the (possibly huge) c*_i.
#pragma once

#include "kd_math.h"  // FD_HOST_DEVICE, ScalarOps (the Ops policy: SIMD vectors on the CPU, scalars on the GPU)

namespace fastdistill {
namespace mi {

// Per-row constants of the interpolated baseline (scalars, computed once per row).
// log_alpha = -inf for alpha = 0, log_1m_alpha = -inf for alpha = 1.
template <typename T>
struct RowConsts {
  T K;       // B_ij = K + log t_ij
  T alpha_;  // alpha'
  T beta_;   // beta'
  T gamma;   // exp(l_i - lam - K)
};

template <typename T>
FD_HOST_DEVICE RowConsts<T> row_consts(T l, T a, T lam, T log_alpha, T log_1m_alpha) {
  const T x = log_alpha + l - lam;
  const T y = log_1m_alpha + a;
  RowConsts<T> c;
  c.K = x > y ? x : y;
  c.alpha_ = ::exp(x - c.K);
  c.beta_ = ::exp(y - c.K);
  c.gamma = ::exp(l - lam - c.K);
  return c;
}

// t_ij = alpha' (1 - p) + beta' for a score other than the row's largest and the diagonal (p = exp(S_ij - l_i) <= 1/2,
// so 1 - p is exact enough). V: a scalar or a SIMD vector.
template <typename V>
FD_HOST_DEVICE V t_of(V alpha_, V beta_, V p) {
  return alpha_ * (V(1) - p) + beta_;
}

// dI/dS_ik for an off-diagonal score with k != k*_i: -p (C_i + m_i - alpha' / (t D)); inv_d = 1 / (N (N - 1)).
// C_plus_m = Crest_i + c*_i + m_i.
template <typename V>
FD_HOST_DEVICE V grad_offdiag(V alpha_, V beta_, V p, V C_plus_m, V inv_d) {
  return V(0) - p * (C_plus_m - alpha_ * inv_d / t_of(alpha_, beta_, p));
}

// dI/dS_ik at the row's largest score k = k*_i != i: -p (Crest_i + m_i).
template <typename T>
FD_HOST_DEVICE T grad_star(T p, T Crest, T m) {
  return -p * (Crest + m);
}

// dI/dS_ii for the diagonal score: 1/N - p C_i, C_i = Crest_i + c*_i.
template <typename T>
FD_HOST_DEVICE T grad_diag(T p, T C, T inv_n) {
  return inv_n - p * C;
}

// Row-level terms from pass-1 statistics (l, w): r_i (this row's marginal term, times N), m_i (backward), and the
// marginal term's part of dI/da_i.
template <typename T>
struct DiagTerms {
  T r;
  T m;
  T da_marg;
};

template <typename T>
FD_HOST_DEVICE DiagTerms<T> diag_terms(const RowConsts<T>& c, T l, T w, T n) {
  const T q = ::exp(w - l);  // q_ii
  const T t = c.alpha_ * q + c.beta_;
  DiagTerms<T> d;
  d.r = c.gamma * q / t;
  d.m = c.beta_ * c.gamma / (n * t * t);
  d.da_marg = d.r * c.beta_ / (n * t);
  return d;
}

// The row's largest off-diagonal score k*_i != i, from z_i: log t and c* = alpha' / (t D), beta' / t.
template <typename T>
struct StarTerms {
  T log_t, c, beta_over_t;
};

template <typename T>
FD_HOST_DEVICE StarTerms<T> star_terms(const RowConsts<T>& c, T l, T z, T inv_d) {
  const T t = c.alpha_ * ::exp(z - l) + c.beta_;
  return {::log(t), c.alpha_ * inv_d / t, c.beta_ / t};
}

}  // namespace mi
}  // namespace fastdistill
