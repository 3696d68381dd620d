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
//   estimate        I = 1 + J - M = 1 + (1/N) sum_i part_i,  part_i = S_ii - K_i - sum_{j != i} log t_ij / (N-1) - r_i
//   dI/da_i         = -(1/D) sum_{j != i} beta'/t_ij + r_i beta' / (N t_ii)
//   dI/dS_ik        = -p_ik (C_i + m_i - c_ik)  (k != i),    dI/dS_ii = 1/N - p_ii C_i,
//     c_ij = alpha' / (t_ij D) (j != i),  C_i = sum_{j != i} c_ij,  m_i = beta' gamma / (N t_ii^2).
// Written so, the gradient cancels or overflows in three places, and the kernels use equivalent forms instead:
// * At k = k*_i != i, C_i - c_ik* cancels (c*_i = c_ik* may be huge): with C_i = Crest_i + c*_i it is
//   -p (Crest_i + m_i).
// * c*_i (up to 1/(q_ik* D)) and m_i (up to 1/(N q_ii^2)) may overflow, though they only ever multiply p_ik <= Q_i,
//   Q_i = exp(z_i - l_i) (= q_ii when k*_i = i, else q_ik*). So with u_ik = exp(S_ik - z_i) <= 1, p_ik = u_ik Q_i:
//     dI/dS_ik = -(p_ik (Crest_i - c_ik) + u_ik Phi_i),   Phi_i = Q_i (c*_i + m_i)   (bounded, taken from logs).
// * dI/dS_ii = 1/N - p_ii C_i cancels when the positive pair dominates its row (k*_i = i, p_ii -> 1: the trained
//   case). Then c*_i = 0 and 1/N - C_i = (1/D) sum_{j != i} (beta' - alpha' p_ij) / t_ij, so the forward pass takes
//     dI/dS_ii = q_ii Crest_i + (1/D) sum_{j != i} g_ij,   g_ij = (beta' - alpha' p_ij) / t_ij   (all p_ij <= 1/2),
//   from one more running sum; otherwise (p_ii <= 1/2) 1/N - p_ii Crest_i - p_ii c*_i, the last from logs.
// The row-level terms are evaluated in log space: q_ii, q_ik* may lie below the floating-point range while the
// quantities above do not. The forward pass hands Crest, Phi, m (at k*), dI/dS_ii and z to the backward pass.
#pragma once

#include "kd_math.h"  // FD_HOST_DEVICE, logaddexp, ScalarOps

namespace fastdistill {
namespace mi {

// Per-row constants of the interpolated baseline, computed once per row.
// log_alpha = -inf for alpha = 0, log_1m_alpha = -inf for alpha = 1.
template <typename T>
struct RowConsts {
  T K;           // B_ij = K + log t_ij
  T alpha_;      // alpha'
  T beta_;       // beta'
  T log_alpha_;  // log alpha' (-inf for alpha = 0)
  T log_beta_;   // log beta' (-inf for alpha = 1)
  T log_gamma;   // log gamma = l_i - lam - K
};

template <typename T>
FD_HOST_DEVICE RowConsts<T> row_consts(T l, T a, T lam, T log_alpha, T log_1m_alpha) {
  const T x = log_alpha + l - lam;
  const T y = log_1m_alpha + a;
  RowConsts<T> c;
  c.K = x > y ? x : y;
  c.log_alpha_ = x - c.K;
  c.log_beta_ = y - c.K;
  c.log_gamma = l - lam - c.K;
  c.alpha_ = ::exp(c.log_alpha_);
  c.beta_ = ::exp(c.log_beta_);
  return c;
}

// log t = log(alpha' q + beta') for a row-level term, from log q.
template <typename T>
FD_HOST_DEVICE T log_t_of(const RowConsts<T>& c, T log_q) {
  return logaddexp<ScalarOps<T>>(c.log_alpha_ + log_q, c.log_beta_);
}

// t_ij = alpha' (1 - p) + beta' for a score other than the row's largest and the diagonal (p <= 1/2, so 1 - p is
// exact enough). V: a scalar or a SIMD vector (these element functions use arithmetic only).
template <typename V>
FD_HOST_DEVICE V t_of(V alpha_, V beta_, V p) {
  return alpha_ * (V(1) - p) + beta_;
}

// g_ij = (beta' - alpha' p) / t_ij, given 1 / t_ij: the terms of 1/N - C_i.
template <typename V>
FD_HOST_DEVICE V g_of(V alpha_, V beta_, V p, V inv_t) {
  return (beta_ - alpha_ * p) * inv_t;
}

// dI/dS_ik for k not in {i, k*_i}, from u = exp(S_ik - z_i): p = u Q, -(p (Crest - alpha' / (t D)) + u Phi).
template <typename V>
FD_HOST_DEVICE V grad_offdiag(V alpha_, V beta_, V u, V Q, V Crest, V Phi, V inv_d) {
  const V p = u * Q;
  return V(0) - (p * (Crest - alpha_ * inv_d / t_of(alpha_, beta_, p)) + u * Phi);
}

// dI/dS_ik at the row's largest score k = k*_i != i (p = exp(S_ik* - l_i)): -p (Crest_i + m_i).
template <typename T>
FD_HOST_DEVICE T grad_star(T p, T Crest, T m) {
  return -p * (Crest + m);
}

// Sums of pass 2 over j not in {i, k*_i}.
template <typename T>
struct Pass2 {
  T log_t;  // sum log t_ij
  T inv_t;  // sum 1 / t_ij
  T g;      // sum g_ij
};

// Everything a row contributes, from pass 1 (l, w, z, S_ii, whether k*_i = i) and pass 2.
template <typename T>
struct RowResult {
  T part;   // part_i: I = 1 + (1/N) sum_i part_i
  T Crest;  // sum over j not in {i, k*} of c_ij
  T Phi;    // Q_i (c*_i + m_i)
  T m;      // m_i where k*_i != i (used at k*), else 0
  T da;     // dI/da_i
  T gdiag;  // dI/dS_ii
};

template <typename T>
FD_HOST_DEVICE RowResult<T> row_result(const RowConsts<T>& c, T l, T w, T z, T s_ii, bool diag_is_largest,
                                       const Pass2<T>& p2, T n, T inv_n, T inv_d) {
  const T log_n = ::log(n), log_d = -::log(inv_d);
  const T log_qd = w - l;  // log q_ii
  const T log_td = log_t_of(c, log_qd);
  const T r = ::exp(c.log_gamma + log_qd - log_td);
  const T log_m = c.log_beta_ + c.log_gamma - T(2) * log_td - log_n;
  RowResult<T> out;
  out.Crest = c.alpha_ * p2.inv_t * inv_d;
  T log_t = p2.log_t, beta_over_t = c.beta_ * p2.inv_t;
  if (diag_is_largest) {  // Q = q_ii, c* = 0
    out.Phi = ::exp(log_qd + log_m);
    out.m = T(0);
    out.gdiag = ::exp(log_qd) * out.Crest + p2.g * inv_d;
  } else {  // Q = q_ik*
    const T log_qs = z - l;
    const T log_ts = log_t_of(c, log_qs);
    // log(q* c*) = log alpha' + log(q*/t*) - log D, with log(q*/t*) = -log(alpha' + beta'/q*) taken whole: as
    // log q* - log t* it cancels two terms of the size of the row's gap (z - l), and a float32 gap of 1e4 left
    // Phi, so every gradient of the row, with a relative error of ~gap * 2^-24
    const T log_qc = c.log_alpha_ - logaddexp<ScalarOps<T>>(c.log_alpha_, c.log_beta_ - log_qs) - log_d;
    log_t += log_ts;
    beta_over_t += ::exp(c.log_beta_ - log_ts);
    out.Phi = ::exp(log_qc) + ::exp(log_qs + log_m);
    out.m = ::exp(log_m);
    const T p_ii = ::exp(s_ii - l);
    out.gdiag = inv_n - p_ii * out.Crest - ::exp(s_ii - z + log_qc);  // p_ii c* = exp(S_ii - z) q* c*
  }
  out.da = -beta_over_t * inv_d + r * ::exp(c.log_beta_ - log_td) * inv_n;
  out.part = s_ii - c.K - log_t / (n - T(1)) - r;
  return out;
}

}  // namespace mi
}  // namespace fastdistill
