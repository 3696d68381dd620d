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

enum class Divergence : int32_t { KL = 0, ReverseKL = 1, JSD = 2, TVD = 3, SkewKL = 4, SkewReverseKL = 5 };
enum class Ensemble : int32_t { ProbMean = 0, LogitMean = 1, LossMean = 2 };

// Hyper-parameters of a divergence, with the logs precomputed once per launch (log 0 = -inf is intended).
template <typename T>
struct DivParams {
  Divergence kind;
  T beta, log_beta, log_1m_beta;  // "jsd": M = beta P + (1 - beta) Q
  T skew, log_skew, log_1m_skew;  // "skew_*": alpha
};

template <typename T>
inline DivParams<T> make_div_params(Divergence kind, double beta, double skew) {
  DivParams<T> p;
  p.kind = kind;
  p.beta = T(beta);
  p.log_beta = T(std::log(beta));
  p.log_1m_beta = T(std::log1p(-beta));
  p.skew = T(skew);
  p.log_skew = skew > 0 ? T(std::log(skew)) : -std::numeric_limits<T>::infinity();
  p.log_1m_skew = T(std::log1p(-skew));
  return p;
}

// For KL the student aggregate is known in closed form: sum_v gq_v = -sum_v P_v = -1, so dD/da = Q - P can be
// written in the same pass that computes the loss. The same holds for the target of reverse KL.
FD_HOST_DEVICE bool student_aggregate_is_minus_one(Divergence d) { return d == Divergence::KL; }

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
  static FD_HOST_DEVICE V max(V a, V b) { return a > b ? a : b; }
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
    case Divergence::JSD: {  // beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q
      V logm = logaddexp<Ops>(logp + Ops::splat(prm.log_beta), logq + Ops::splat(prm.log_1m_beta));
      t.hp = Ops::splat(prm.beta) * xlogr<Ops>(p, logp, logm);
      t.gq = Ops::splat(T(1) - prm.beta) * xlogr<Ops>(q, logq, logm);
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
    case Divergence::SkewKL: {  // KL(P || a P + (1-a) Q)
      V logm = logaddexp<Ops>(logp + Ops::splat(prm.log_skew), logq + Ops::splat(prm.log_1m_skew));
      t.phi = xlogr<Ops>(p, logp, logm);
      V r = Ops::where_zero(p, zero, Ops::exp(logp - logm));  // P / M <= 1 / a
      t.gq = zero - Ops::splat(T(1) - prm.skew) * q * r;
      t.hp = t.phi + p - Ops::splat(prm.skew) * p * r;
      break;
    }
    case Divergence::SkewReverseKL: {  // KL(Q || (1-a) P + a Q)
      V logm = logaddexp<Ops>(logp + Ops::splat(prm.log_1m_skew), logq + Ops::splat(prm.log_skew));
      t.phi = xlogr<Ops>(q, logq, logm);
      V r = Ops::where_zero(q, zero, Ops::exp(logq - logm));  // Q / M <= 1 / a
      t.gq = t.phi + q - Ops::splat(prm.skew) * q * r;
      t.hp = zero - Ops::splat(T(1) - prm.skew) * p * r;
      break;
    }
  }
  return t;
}

}  // namespace fastdistill
