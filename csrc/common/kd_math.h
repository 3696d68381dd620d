// Per-element math of every divergence, shared by the CPU and CUDA kernels.
//
// This header is torch-free and compiles as host code (g++) or host+device code (nvcc). It is written once
// against an "Ops" policy so the CPU kernel instantiates it with SIMD vectors (at::vec::Vectorized) and the
// CUDA kernel with plain scalars (ScalarOps below): the formulas the CPU tests exercise are the ones a GPU runs.
//
// Notation (SPEC §1): P target distribution, Q student distribution, both already temperature-scaled; the row
// divergence is D(P, Q) = sum_v phi(P_v, Q_v). For the gradients we return, per element,
//   gq = Q * dphi/dQ   and   hp = P * dphi/dP,
// products that stay finite where P or Q is 0 (dphi/dQ alone is -P/Q for KL). With a = student logits / T and
// c = target logits / T (P = softmax(c)), the chain rule through softmax gives
//   dD/da_j = gq_j - Q_j * sum_v gq_v      dD/dc_j = hp_j - P_j * sum_v hp_v.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FD_HOST_DEVICE inline
#endif

namespace fastdistill {

// The divergence table, the one C++ list of divergences: X(enumerator, name, number of parameters, closed form).
// The enum (codes in this order), the name parser, the parameter count and the closed-form flag are generated from
// it. "closed form": the student aggregate sum_v gq_v is -sum_v P_v = -1 (KL), so dD/da = Q - P is written in the
// pass that computes the loss, with no second sweep. A divergence's parameters arrive as one vector in this order;
// the one parameter every parameterised divergence has today is a mixture weight w (jsd: beta, M = w P + (1 - w) Q;
// skew_*: skew). The Python twin is fastdistill/ops/divergences.py; tests/test_divergence_table.py holds the two
// tables and the Triton terms to this file.
#define FD_DIVERGENCES(X)                  \
  X(KL, "kl", 0, true)                     \
  X(ReverseKL, "reverse_kl", 0, false)     \
  X(JSD, "jsd", 1, false)                  \
  X(TVD, "tvd", 0, false)                  \
  X(SkewKL, "skew_kl", 1, false)           \
  X(SkewReverseKL, "skew_reverse_kl", 1, false)

#define FD_DIV_ENUMERATOR(e, name, n_params, closed) e,
enum class Divergence : int32_t { FD_DIVERGENCES(FD_DIV_ENUMERATOR) };
#undef FD_DIV_ENUMERATOR
enum class Ensemble : int32_t { ProbMean = 0, LogitMean = 1, LossMean = 2 };

// The most parameters a divergence of the table has (DivParams holds one mixture weight).
constexpr int kMaxDivParams = 1;

FD_HOST_DEVICE int divergence_param_count(Divergence d) {
#define FD_DIV_COUNT(e, name, n_params, closed) \
  if (d == Divergence::e) return n_params;
  FD_DIVERGENCES(FD_DIV_COUNT)
#undef FD_DIV_COUNT
  return 0;
}

FD_HOST_DEVICE bool student_aggregate_is_minus_one(Divergence d) {
#define FD_DIV_CLOSED(e, name, n_params, closed) \
  if (d == Divergence::e) return closed;
  FD_DIVERGENCES(FD_DIV_CLOSED)
#undef FD_DIV_CLOSED
  return false;
}

// Hyper-parameters of a divergence, with the logs precomputed once per launch (log 0 = -inf is intended).
template <typename T>
struct DivParams {
  Divergence kind;
  T w, log_w, log_1m_w;  // the divergence's mixture weight (parameter 0; unused by those without one)
};

// params: the divergence's parameter vector (divergence_param_count(kind) values, checked by the caller).
template <typename T>
inline DivParams<T> make_div_params(Divergence kind, const double* params, int count) {
  DivParams<T> p;
  p.kind = kind;
  const double w = count > 0 ? params[0] : 0.0;
  p.w = T(w);
  p.log_w = w > 0 ? T(std::log(w)) : -std::numeric_limits<T>::infinity();
  p.log_1m_w = T(std::log1p(-w));
  return p;
}

template <typename V>
struct Terms {
  V phi;  // loss contribution of this element
  V gq;   // Q * dphi/dQ
  V hp;   // P * dphi/dP
};

// Scalar policy: used by the CUDA kernel and by scalar tails on the CPU.
template <typename T>
struct ScalarOps {
  using V = T;
  static FD_HOST_DEVICE V splat(T x) { return x; }
  static FD_HOST_DEVICE V exp(V x) { return ::exp(x); }
  static FD_HOST_DEVICE V log1p(V x) { return ::log1p(x); }
  static FD_HOST_DEVICE V abs(V x) { return ::fabs(x); }
  // max that keeps a NaN in either argument (a > b ? a : b alone drops a NaN a: logaddexp(NaN, -inf) was -inf)
  static FD_HOST_DEVICE V max(V a, V b) { return (a > b || a != a) ? a : b; }
  // where(x == 0, a, b): a NaN x selects b, so NaN inputs stay NaN (x > 0 would turn them into 0)
  static FD_HOST_DEVICE V where_zero(V x, V a, V b) { return x == T(0) ? a : b; }
  // where(x == -inf, a, b)
  static FD_HOST_DEVICE V where_neginf(V x, V a, V b) { return x == -INFINITY ? a : b; }
  // sign(x) in {-1, 0, 1}, with sign(0) = 0 like torch.sign (the subgradient torch.abs uses); NaN for NaN
  // (x - x is 0 for finite x), so a NaN row's gradient is NaN, not 0
  static FD_HOST_DEVICE V sign(V x) { return T((x > T(0)) - (x < T(0))) + (x - x); }
};

// log(exp(x) + exp(y)), exact when either argument is -inf.
template <class Ops>
FD_HOST_DEVICE typename Ops::V logaddexp(typename Ops::V x, typename Ops::V y) {
  using V = typename Ops::V;
  V m = Ops::max(x, y);
  V d = Ops::abs(x - y);  // inf (or nan when both are -inf, masked below)
  V r = m + Ops::log1p(Ops::exp(Ops::splat(0) - d));
  return Ops::where_neginf(m, m, r);
}

// x * (log_x - log_y), with 0 * log 0 = 0: the building block of every KL-type term. Only x == 0 is special: a
// NaN x (a NaN or +inf logit in the row) gives NaN, never a silent 0.
template <class Ops>
FD_HOST_DEVICE typename Ops::V xlogr(typename Ops::V x, typename Ops::V log_x, typename Ops::V log_y) {
  return Ops::where_zero(x, Ops::splat(0), x * (log_x - log_y));
}

// The divergence terms for one element. p = exp(logp), q = exp(logq) are passed in because the kernels have them.
template <class Ops, typename T>
FD_HOST_DEVICE Terms<typename Ops::V> divergence_terms(const DivParams<T>& prm, typename Ops::V p, typename Ops::V q,
                                                       typename Ops::V logp, typename Ops::V logq) {
  using V = typename Ops::V;
  const V zero = Ops::splat(T(0));
  Terms<V> t;
  switch (prm.kind) {
    case Divergence::KL: {  // sum P log(P/Q)
      t.phi = xlogr<Ops>(p, logp, logq);
      t.gq = zero - p;
      t.hp = t.phi + p;
      break;
    }
    case Divergence::ReverseKL: {  // sum Q log(Q/P)
      t.phi = xlogr<Ops>(q, logq, logp);
      t.gq = t.phi + q;
      t.hp = zero - q;
      break;
    }
    case Divergence::JSD: {  // beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q; beta = w
      V logm = logaddexp<Ops>(logp + Ops::splat(prm.log_w), logq + Ops::splat(prm.log_1m_w));
      t.hp = Ops::splat(prm.w) * xlogr<Ops>(p, logp, logm);
      t.gq = Ops::splat(T(1) - prm.w) * xlogr<Ops>(q, logq, logm);
      t.phi = t.hp + t.gq;  // dM/dQ terms cancel: d/dQ [(1-b) Q log Q - M log M] = (1-b) log(Q/M)
      break;
    }
    case Divergence::TVD: {  // 1/2 sum |P - Q|
      V diff = q - p;
      V half = Ops::splat(T(0.5));
      t.phi = half * Ops::abs(diff);
      V sg = Ops::sign(diff);
      t.gq = half * q * sg;
      t.hp = zero - half * p * sg;
      break;
    }
    case Divergence::SkewKL: {  // KL(P || a P + (1-a) Q), a = skew = w
      V logm = logaddexp<Ops>(logp + Ops::splat(prm.log_w), logq + Ops::splat(prm.log_1m_w));
      t.phi = xlogr<Ops>(p, logp, logm);
      // s = (1-a) Q / M, Q's share of M: in [0, 1] for every a, where P / M alone overflows at a = 0. At a = 0, M = Q
      // and s = 1, as in kl, also where Q = 0 < P (an infinite loss: s = 0/0, taken as 1, so the gradient is kl's)
      V s = Ops::where_zero(p, zero, Ops::where_neginf(logm, Ops::splat(T(1)),
                                                      Ops::exp(Ops::splat(prm.log_1m_w) + logq - logm)));
      t.gq = zero - p * s;      // Q dphi/dQ = -(1-a) P Q / M
      t.hp = t.phi + p * s;     // P dphi/dP = phi + P - a P^2 / M = phi + P s
      break;
    }
    case Divergence::SkewReverseKL: {  // KL(Q || (1-a) P + a Q), a = skew = w
      V logm = logaddexp<Ops>(logp + Ops::splat(prm.log_1m_w), logq + Ops::splat(prm.log_w));
      t.phi = xlogr<Ops>(q, logq, logm);
      // s = (1-a) P / M, P's share of M (as for skew_kl: bounded, and 1 at a = 0 as in reverse_kl)
      V s = Ops::where_zero(q, zero, Ops::where_neginf(logm, Ops::splat(T(1)),
                                                      Ops::exp(Ops::splat(prm.log_1m_w) + logp - logm)));
      t.gq = t.phi + q * s;     // Q dphi/dQ = phi + Q - a Q^2 / M = phi + Q s
      t.hp = zero - q * s;      // P dphi/dP = -(1-a) P Q / M
      break;
    }
  }
  return t;
}

}  // namespace fastdistill
