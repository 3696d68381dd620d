// The CUDA kernel of fastdistill::kd_loss, as templates: kd_loss_launch.cu plans and dispatches, and the files in
// inst/ instantiate the kernels one (student dtype, teacher dtype) pair each, so that a build compiles them in
// parallel.
//
// CUDA kernel of fastdistill::kd_loss (math: fastdistill/ops/reference.py kd_loss; per-element divergence terms:
// csrc/common/kd_math.h, the same header the CPU kernel instantiates). Torch-free: CUDA headers only, a params
// struct and a stream (kd_loss_cuda.h).
//
// One row (a block, or a cluster of blocks on sm_90) at a time; the row's K + 1 inputs are swept
//   sweep 1  per input: its normaliser (max, log-sum-exp) — and, resident, the copy of the input into shared memory;
//   sweep 2  the loss terms, and the student gradient itself where it has a closed form (KL: dD/da = Q - P);
//   sweep 3  the student gradient of the other divergences, from the row sum of Q dphi/dQ that sweep 2 made;
//   then, for co-distillation only, per teacher: its row aggregate, and its gradient.
// Residency (kd_loss_cuda.h) decides where sweeps 2+ read: shared memory (each input read once from HBM: one block
// when the row fits, a cluster whose blocks hold a slice each when it does not) or global memory (the fallback).
// All sums are reduced in a fixed order (warp butterflies, then warps, then cluster ranks in order): results are
// bitwise reproducible run to run.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common/kd_math.h"
#include "kd_loss_cuda.h"
#include "kd_loss_plan.h"

#ifdef FASTDISTILL_CUDA_DEBUG
#define FD_ASSERT(cond) assert(cond)
#else
#define FD_ASSERT(cond) ((void)0)
#endif

// FASTDISTILL_CUDA_EMULATE: defined only by tests/cuda_emu, which compiles this file with g++ and runs the launcher and
// kernels on the CPU against the CPU op (tests/test_cuda_emulated.py). It swaps the two PTX instructions (fexp, flog)
// and the extern shared array (kd_row_kernel) for the emulator's, nothing else; an nvcc build never defines it.
#if defined(FASTDISTILL_CUDA_EMULATE) && defined(__CUDACC__)
#error "FASTDISTILL_CUDA_EMULATE is for the CPU emulator (tests/cuda_emu), not for nvcc"
#endif

namespace fastdistill {
namespace cuda {
namespace detail {

namespace cg = cooperative_groups;

// Elements per thread and step: 8 bytes of bf16/fp16, 16 of float32. 8 would make 16-byte loads of bf16 but needs
// ~205 registers against ~122 (sm_90a), which halves the threads a block can have; the resident kernels' global
// reads are 16-byte cp.async copies whatever kVec is.
constexpr int kVec = 4;

// ---- element types ---------------------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A to_acc(float x) { return A(x); }
template <typename A>
__device__ __forceinline__ A to_acc(double x) { return A(x); }
template <typename A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 x) { return A(__bfloat162float(x)); }
template <typename A>
__device__ __forceinline__ A to_acc(__half x) { return A(__half2float(x)); }

template <typename X>
__device__ __forceinline__ X from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <typename X>
__device__ __forceinline__ X from_acc(double x) { return X(x); }  // float64 rows: float64 gradients

// ---- fast transcendentals (float) ------------------------------------------------------------------------------
// exp as one ex2.approx of x log2(e): ~2 ulp near 0, relative error ~|x| 2^-24 for large |x| (where the values are
// below 1e-30); the float64 path uses exp. The row normalisers' logs are libm's (a few per row).

__device__ __forceinline__ float fexp(float x) {
  float y;
#ifdef FASTDISTILL_CUDA_EMULATE  // (tests/cuda_emu runs this file on the CPU with g++, which has no PTX)
  y = fdemu::ex2_approx_ftz(x * 1.4426950408889634f);
#else
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
#endif
  return y;
}
__device__ __forceinline__ double fexp(double x) { return ::exp(x); }

// log as one lg2.approx times ln 2 (absolute error ~2^-22; logf is ~20 instructions): the mixture's log P, per column
__device__ __forceinline__ float flog(float x) {
  float y;
#ifdef FASTDISTILL_CUDA_EMULATE  // (as in fexp)
  y = fdemu::lg2_approx_ftz(x);
#else
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
#endif
  return y * 0.6931471805599453f;
}
__device__ __forceinline__ double flog(double x) { return ::log(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() { return -INFINITY; }

// below this a mixture's sum is recomputed as a log-sum-exp (the CPU kernel's threshold: 1024 x the smallest normal)
template <typename A>
__device__ __forceinline__ A tiny() { return sizeof(A) == 8 ? A(DBL_MIN * 1024) : A(FLT_MIN * 1024); }

// ---- kVec-element loads and stores ------------------------------------------------------------------------------

template <typename X>
struct PackUnit {  // the widest load that moves kVec elements of X in one piece: 8 or 16 bytes (two for float64)
  static constexpr int kBytes = kVec * int(sizeof(X));
  using type = std::conditional_t<(kBytes >= 16), uint4, uint2>;
  static constexpr int kCount = kBytes / int(sizeof(type));
};

template <typename X>
struct alignas(sizeof(typename PackUnit<X>::type)) Pack {
  X v[kVec];
};

// kVec elements of row `p` from column j (a multiple of kVec), in their own type. `whole`: all are in [0, end) and the
// address is 16-byte aligned; otherwise only the columns before `end` are read (the others are left undefined).
template <typename X>
__device__ __forceinline__ void load_pack(const X* p, int64_t j, int64_t end, bool whole, Pack<X>& pk) {
  if (whole) {
    using U = typename PackUnit<X>::type;
    const U* src = reinterpret_cast<const U*>(p + j);
    U* dst = reinterpret_cast<U*>(&pk);
#pragma unroll
    for (int u = 0; u < PackUnit<X>::kCount; ++u) dst[u] = src[u];
  } else {
#pragma unroll
    for (int u = 0; u < kVec; ++u) pk.v[u] = j + u < end ? p[j + u] : p[j];  // (j < end: a defined value)
  }
}

// The pack in the accumulation type; columns at or past `end` read as -inf (no mass).
template <typename A, typename X>
__device__ __forceinline__ void unpack(const Pack<X>& pk, int64_t j, int64_t end, A (&out)[kVec]) {
#pragma unroll
  for (int u = 0; u < kVec; ++u) out[u] = j + u < end ? to_acc<A>(pk.v[u]) : neg_inf<A>();
}

template <typename A, typename X>
__device__ __forceinline__ void load_vec(const X* p, int64_t j, int64_t end, bool whole, A (&out)[kVec]) {
  Pack<X> pk;
  load_pack(p, j, end, whole, pk);
  unpack<A>(pk, j, end, out);
}

template <typename A, typename X>
__device__ __forceinline__ void store_vec(X* p, int64_t j, int64_t end, bool whole, const A (&g)[kVec]) {
  if (whole) {
    Pack<X> pk;
#pragma unroll
    for (int u = 0; u < kVec; ++u) pk.v[u] = from_acc<X>(g[u]);
    using U = typename PackUnit<X>::type;
    const U* src = reinterpret_cast<const U*>(&pk);
    U* dst = reinterpret_cast<U*>(p + j);
#pragma unroll
    for (int u = 0; u < PackUnit<X>::kCount; ++u) __stcs(dst + u, src[u]);  // written once, not re-read
  } else {
#pragma unroll
    for (int u = 0; u < kVec; ++u)
      if (j + u < end) p[j + u] = from_acc<X>(g[u]);
  }
}

// ---- online log-sum-exp --------------------------------------------------------------------------------------------
// (m, s): s = sum exp(x - m). Merging keeps NaN (a NaN logit makes s NaN); +inf and empty rows are mapped to NaN
// when the row's normaliser is finalised (finish_lse).

template <typename A>
__device__ __forceinline__ void lse_merge(A& m, A& s, A m2, A s2) {
  const A mn = m > m2 ? m : m2;
  if (mn == neg_inf<A>()) return;  // both empty (also keeps NaN out of exp(-inf + inf))
  s = (m == neg_inf<A>() ? A(0) : s * fexp(m - mn)) + (m2 == neg_inf<A>() ? A(0) : s2 * fexp(m2 - mn));
  m = mn;
}

template <typename A>
__device__ __forceinline__ void lse_add_vec(A& m, A& s, const A (&x)[kVec]) {
  A mx = x[0];
#pragma unroll
  for (int u = 1; u < kVec; ++u) mx = (x[u] > mx || x[u] != x[u]) ? x[u] : mx;  // NaN wins (fmax would drop it)
  const A mn = m > mx ? m : mx;
  if (mn == neg_inf<A>()) return;
  A acc = m == neg_inf<A>() ? A(0) : s * fexp(m - mn);
#pragma unroll
  for (int u = 0; u < kVec; ++u) acc += fexp(x[u] - mn);  // exp(-inf) = 0; NaN stays
  s = acc;
  m = mn;
}

// ---- block and cluster reductions ------------------------------------------------------------------------------

template <typename A>
struct SumOp {
  static __device__ __forceinline__ void combine(A* a, const A* b, int nv) {
    for (int u = 0; u < nv; ++u) a[u] += b[u];
  }
  static __device__ __forceinline__ A identity(int) { return A(0); }
};

// values are (m, s) pairs
template <typename A>
struct LseOp {
  static __device__ __forceinline__ void combine(A* a, const A* b, int nv) {
    for (int u = 0; u + 1 < nv; u += 2) lse_merge(a[u], a[u + 1], b[u], b[u + 1]);
  }
  static __device__ __forceinline__ A identity(int u) { return u % 2 == 0 ? neg_inf<A>() : A(0); }
};

template <typename A>
__device__ __forceinline__ A shfl_xor(A x, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, x, lane_mask);
}

// Reduces nv values of every thread of the block (then of the cluster) with Op; every thread gets the result.
template <typename A, class Op, bool kCluster>
__device__ void reduce(A* v, int nv, RowShared<A>& sh, int& parity) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  A other[kMaxReduce];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    for (int u = 0; u < nv; ++u) other[u] = shfl_xor(v[u], off);
    Op::combine(v, other, nv);
  }
  if (lane == 0)
    for (int u = 0; u < nv; ++u) sh.warp[u][warp] = v[u];
  __syncthreads();
  if (warp == 0) {
    for (int u = 0; u < nv; ++u) v[u] = lane < nwarps ? sh.warp[u][lane] : Op::identity(u);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      for (int u = 0; u < nv; ++u) other[u] = shfl_xor(v[u], off);
      Op::combine(v, other, nv);
    }
    if (lane == 0)
      for (int u = 0; u < nv; ++u) sh.bcast[u] = v[u];
  }
  __syncthreads();
  for (int u = 0; u < nv; ++u) v[u] = sh.bcast[u];
  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0)
      for (int u = 0; u < nv; ++u) sh.slot[parity][u] = v[u];
    cluster.sync();  // every block's partial is written
    const unsigned ranks = cluster.num_blocks();
    // every thread combines the ranks' partials in rank order: the same result, bit for bit, in every block
    for (int u = 0; u < nv; ++u) v[u] = Op::identity(u);
    for (unsigned r = 0; r < ranks; ++r) {
      const A* remote = cluster.map_shared_rank(&sh.slot[parity][0], r);
      A part[kMaxReduce];
      for (int u = 0; u < nv; ++u) part[u] = remote[u];
      Op::combine(v, part, nv);
    }
    // the other buffer next time: a block writes this one again only after the next cluster.sync, which every block
    // reaches after its reads here
    parity ^= 1;
#else
    __trap();  // cluster residency is launched on sm_90 only
#endif
  }
}

// ---- the row kernel --------------------------------------------------------------------------------------------

template <typename A>
struct Scalars {
  A inv_t, kd_scale, kd_over_t, ce;
  DivParams<A> prm;
  bool closed, kd_on, per_teacher, log_linear, mixture, ce_own;
};

template <typename A>
Scalars<A> make_scalars(const KDProblem& p) {
  Scalars<A> s;
  s.inv_t = A(1.0 / p.temperature);
  s.kd_scale = A(p.kd_scale);
  s.kd_over_t = A(p.kd_scale / p.temperature);
  s.ce = A(p.ce_weight);
  s.prm = make_div_params<A>(p.divergence, p.div_params, divergence_param_count(p.divergence));
  s.closed = student_aggregate_is_minus_one(p.divergence);
  s.kd_on = p.kd_scale != 0;
  s.per_teacher = p.ensemble == Ensemble::LossMean && p.teachers > 1;
  s.log_linear = p.ensemble == Ensemble::LogitMean && p.teachers > 1;
  s.mixture = !s.per_teacher && !s.log_linear && p.teachers > 1;
  s.ce_own = p.ce_weight != 0 && p.temperature != 1.0;  // the cross-entropy (T = 1) needs its own normaliser
  return s;
}

template <typename S, typename T, typename A, Residency kRes>
struct RowKernel {
  static constexpr bool kCluster = kRes == Residency::Cluster;
  static constexpr bool kResident = kRes != Residency::Global;
  using Ops = ScalarOps<A>;

  const KDCudaArgs& a;
  const Scalars<A>& c;
  RowShared<A>& sh;
  int64_t i;           // row
  int64_t c0, c1;      // this block's columns [c0, c1)
  const S* s_src;      // where sweeps read the student: global row, or shared memory (indexed by column - c0)
  const T* t_base;     // resident: teacher k's slice at t_base + k * t_pitch (shared memory); null: global rows
  int64_t t_pitch;     // elements between the teachers' slices in shared memory
  int64_t off;         // column offset of the read pointers (0 global, c0 resident)
  bool whole_ok;       // 16-byte loads allowed on the sources (always for shared memory)
  bool whole_global;   // 16-byte loads allowed on the global rows
  int parity = 0;

  __device__ int64_t V() const { return a.problem.vocab; }
  // teacher k's row in global memory, and where the sweeps read it (indexed by column - off)
  __device__ const T* t_global(int k) const {
    return static_cast<const T*>(a.teachers[k]) + i * a.teacher_strides[k];
  }
  __device__ const T* t_src(int k) const { return kResident ? t_base + k * t_pitch : t_global(k); }
  __device__ int K() const { return a.problem.teachers; }

  // ---- element loaders (kVec columns from j) ----
  __device__ bool whole(int64_t j) const { return whole_ok && j + kVec <= c1; }
  __device__ void student_vec(int64_t j, A (&raw)[kVec]) const { load_vec<A>(s_src - off, j, c1, whole(j), raw); }
  __device__ void teacher_vec(int k, int64_t j, A (&x)[kVec]) const {
    load_vec<A>(t_src(k) - off, j, c1, whole(j), x);
#pragma unroll
    for (int u = 0; u < kVec; ++u) x[u] *= c.inv_t;
  }

  // log P and P of the single target (one teacher, the pooled target of logit_mean, or the mixture of prob_mean)
  __device__ void target_vec(int64_t j, A (&logp)[kVec], A (&p)[kVec]) const {
    if (c.log_linear) {
      A x[kVec];
      pooled_vec(j, x);
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        logp[u] = (x[u] - sh.rowmax[1]) - sh.logsum[1];
        p[u] = fexp(x[u] - sh.rowmax[1]) * sh.inv_sum[1];
      }
      return;
    }
    if (!c.mixture) {
      if (sh.w[0] == A(0)) {  // a lone teacher of weight 0 (only a direct op call can pass one): no target mass
#pragma unroll
        for (int u = 0; u < kVec; ++u) p[u] = A(0), logp[u] = neg_inf<A>();
        return;
      }
      A x[kVec];
      teacher_vec(0, j, x);
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        logp[u] = (x[u] - sh.rowmax[1]) - sh.logsum[1];
        p[u] = fexp(x[u] - sh.rowmax[1]) * sh.inv_sum[1];
      }
      return;
    }
    // mixture P = sum_k w_k P_k; log P as the log of the sum unless it underflows: those lanes as a log-sum-exp
    // over the teachers (never the log of an underflowed sum)
#pragma unroll
    for (int u = 0; u < kVec; ++u) p[u] = A(0);
    for (int k = 0; k < K(); ++k) {
      if (sh.w[k] == A(0)) continue;  // a dropped teacher: not read
      A x[kVec];
      teacher_vec(k, j, x);
      const A scale = sh.inv_sum[k + 1] * sh.w[k];
#pragma unroll
      for (int u = 0; u < kVec; ++u) p[u] += fexp(x[u] - sh.rowmax[k + 1]) * scale;
    }
    bool small = false;
#pragma unroll
    for (int u = 0; u < kVec; ++u) {
      logp[u] = flog(p[u]);  // the lanes where p is subnormal or 0 are recomputed below (ftz would give -inf)
      small |= p[u] < tiny<A>();
    }
    if (small) {
      A m[kVec], s[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) m[u] = neg_inf<A>(), s[u] = A(0);
      for (int k = 0; k < K(); ++k) {
        if (sh.w[k] == A(0)) continue;
        A x[kVec];
        lpk_vec(k, j, x);
#pragma unroll
        for (int u = 0; u < kVec; ++u) lse_merge(m[u], s[u], x[u], A(1));
      }
#pragma unroll
      for (int u = 0; u < kVec; ++u)
        if (p[u] < tiny<A>()) logp[u] = m[u] == neg_inf<A>() ? m[u] : m[u] + ::log(s[u]);
    }
  }

  // log(w_k P_k) at kVec columns
  __device__ void lpk_vec(int k, int64_t j, A (&x)[kVec]) const {
    teacher_vec(k, j, x);
#pragma unroll
    for (int u = 0; u < kVec; ++u) x[u] = (x[u] - sh.rowmax[k + 1]) - (sh.logsum[k + 1] - sh.logw[k]);
  }

  // logit_mean's target logits / T: sum_k w_k t_k / T over the teachers the row keeps
  __device__ void pooled_vec(int64_t j, A (&x)[kVec]) const {
#pragma unroll
    for (int u = 0; u < kVec; ++u) x[u] = A(0);
    for (int k = 0; k < K(); ++k) {
      if (sh.w[k] == A(0)) continue;  // dropped, whatever its logits (NaN included)
      A t[kVec];
      teacher_vec(k, j, t);
#pragma unroll
      for (int u = 0; u < kVec; ++u) x[u] += sh.w[k] * t[u];
    }
#pragma unroll
    for (int u = 0; u < kVec; ++u)
      if (j + u >= c1) x[u] = neg_inf<A>();
  }

  // The student's Q and log Q, and the raw logits (for the cross-entropy), at kVec columns.
  __device__ void student_q_vec(int64_t j, A (&raw)[kVec], A (&q)[kVec], A (&logq)[kVec]) const {
    student_vec(j, raw);
#pragma unroll
    for (int u = 0; u < kVec; ++u) {
      const A x = raw[u] * c.inv_t;
      logq[u] = (x - sh.rowmax[0]) - sh.logsum[0];
      q[u] = fexp(x - sh.rowmax[0]) * sh.inv_sum[0];
    }
  }

  // softmax of the raw logits (T = 1): the cross-entropy's gradient without its label term
  __device__ A ce_softmax(A raw, A q) const {
    return c.ce_own ? fexp((raw - sh.ce_max) - sh.ce_logsum) : q;
  }

  // Divergence terms of kVec columns, ensemble-combined: phi and gq (Q dphi/dQ).
  __device__ void terms_vec(int64_t j, const A (&q)[kVec], const A (&logq)[kVec], A (&phi)[kVec],
                         A (&gq)[kVec]) const {
    if (c.per_teacher) {  // D = sum_k w_k D(P_k, Q)
#pragma unroll
      for (int u = 0; u < kVec; ++u) phi[u] = gq[u] = A(0);
      for (int k = 0; k < K(); ++k) {
        if (sh.w[k] == A(0)) continue;  // 0 * inf would be nan
        A x[kVec];
        teacher_vec(k, j, x);
#pragma unroll
        for (int u = 0; u < kVec; ++u) {
          const A logp = (x[u] - sh.rowmax[k + 1]) - sh.logsum[k + 1];
          const A p = fexp(x[u] - sh.rowmax[k + 1]) * sh.inv_sum[k + 1];
          const auto tr = divergence_terms<Ops>(c.prm, p, q[u], logp, logq[u]);
          phi[u] += sh.w[k] * tr.phi;
          gq[u] += sh.w[k] * tr.gq;
        }
      }
      return;
    }
    A logp[kVec], p[kVec];
    target_vec(j, logp, p);
#pragma unroll
    for (int u = 0; u < kVec; ++u) {
      const auto tr = divergence_terms<Ops>(c.prm, p[u], q[u], logp[u], logq[u]);
      phi[u] = tr.phi;
      gq[u] = tr.gq;
    }
  }

  __device__ void mask_tail(int64_t j, A (&v)[kVec]) const {
#pragma unroll
    for (int u = 0; u < kVec; ++u)
      if (j + u >= c1) v[u] = A(0);
  }

  template <class Op>
  __device__ void reduce_n(A* v, int nv) { reduce<A, Op, kCluster>(v, nv, sh, parity); }

  // ---- sweep 1: resident, the copy of the row slice into shared memory; the normalisers ----
  // The copy is asynchronous (cp.async, 16 bytes a thread at a time, all issued before any is waited for): the bytes
  // in flight per SM do not depend on registers or occupancy. The statistics are then read from the copy.
  template <typename X>
  __device__ void copy_slice(const X* src, X* dst) const {
    const int64_t n = c1 - c0;
    if (whole_global) {
      constexpr int64_t per = 16 / sizeof(X);
      const int64_t chunks = n / per;
      const char* s8 = reinterpret_cast<const char*>(src + c0);
      char* d8 = reinterpret_cast<char*>(dst);
      for (int64_t b = threadIdx.x; b < chunks; b += blockDim.x) __pipeline_memcpy_async(d8 + 16 * b, s8 + 16 * b, 16);
      for (int64_t e = chunks * per + threadIdx.x; e < n; e += blockDim.x) dst[e] = src[c0 + e];
    } else {
      for (int64_t e = threadIdx.x; e < n; e += blockDim.x) dst[e] = src[c0 + e];
    }
  }

  // Teacher k's weight in this row and whether the row is skipped, read from global memory: the same predicates for
  // the copy (which, pipelined, runs a row ahead, before the row's header exists) and for the sweeps.
  __device__ A weight(int k) const {
    return a.teacher_weights ? static_cast<const A*>(a.teacher_weights)[k * a.problem.rows + i] : A(1) / A(K());
  }
  __device__ bool skipped() const {
    const bool ignored = a.labels && a.labels[i] == a.problem.ignore_index;
    return ignored || (a.sample_weight && static_cast<const A*>(a.sample_weight)[i] == A(0));
  }

  // Issues the asynchronous copy of the row's slices that its sweeps read (nothing for a skipped row or a dropped
  // teacher: never read). The caller commits and waits.
  __device__ void copy_row(const S* s_global) const {
    if (skipped()) return;
    copy_slice(s_global, const_cast<S*>(s_src));
    for (int k = 0; k < K(); ++k)
      if (weight(k) != A(0)) copy_slice(t_global(k), const_cast<T*>(t_src(k)));
  }

  // copied: the row is already in shared memory (pipelined: copied a row ahead, waited for by the caller)
  __device__ void sweep1(const S* s_global, bool copied) {
    const int64_t step = int64_t(blockDim.x) * kVec;
    const int64_t start = c0 + int64_t(threadIdx.x) * kVec;
    if constexpr (kResident) {
      if (!copied) {
        copy_row(s_global);
        __pipeline_commit();
        __pipeline_wait_prior(0);
      }
      __syncthreads();
    }
    // student: its own normaliser at T, and the cross-entropy's at T = 1 when T != 1
    {
      A v[4] = {neg_inf<A>(), A(0), neg_inf<A>(), A(0)};
      for (int64_t j = start; j < c1; j += step) {
        A raw[kVec], x[kVec];
        student_vec(j, raw);
#pragma unroll
        for (int u = 0; u < kVec; ++u) x[u] = raw[u] * c.inv_t;
        lse_add_vec(v[0], v[1], x);
        if (c.ce_own) lse_add_vec(v[2], v[3], raw);
      }
      reduce_n<LseOp<A>>(v, c.ce_own ? 4 : 2);
      if (threadIdx.x == 0) {
        finish_lse(0, v[0], v[1]);
        if (c.ce_own) {
          const bool bad = !(v[2] > neg_inf<A>() && v[2] < A(INFINITY));
          sh.ce_max = bad ? A(NAN) : v[2];
          sh.ce_logsum = bad ? A(NAN) : ::log(v[3]);
        }
      }
    }
    for (int k = 0; k < K(); ++k) {
      if (sh.w[k] == A(0)) {  // dropped: P = 0, log P = -inf, its logits never read
        if (threadIdx.x == 0) sh.rowmax[k + 1] = sh.logsum[k + 1] = sh.inv_sum[k + 1] = A(0);
        continue;
      }
      if (c.log_linear) continue;  // the teachers are pooled first (below)
      A v[2] = {neg_inf<A>(), A(0)};
      for (int64_t j = start; j < c1; j += step) {
        A x[kVec];
        teacher_vec(k, j, x);
        lse_add_vec(v[0], v[1], x);
      }
      reduce_n<LseOp<A>>(v, 2);
      if (threadIdx.x == 0) finish_lse(k + 1, v[0], v[1]);
    }
    __syncthreads();  // the normalisers are visible to the block
    if (c.log_linear) {  // the pooled target's normaliser
      A v[2] = {neg_inf<A>(), A(0)};
      for (int64_t j = start; j < c1; j += step) {
        A x[kVec];
        pooled_vec(j, x);
        lse_add_vec(v[0], v[1], x);
      }
      reduce_n<LseOp<A>>(v, 2);
      if (threadIdx.x == 0) finish_lse(1, v[0], v[1]);
      __syncthreads();
    }
  }

  // A row normaliser: NaN when the row has no finite logit or holds +inf/NaN (never an error: a kernel cannot raise).
  __device__ void finish_lse(int d, A m, A s) {
    const bool bad = !(m > neg_inf<A>() && m < A(INFINITY)) || !(s > A(0));
    sh.rowmax[d] = bad ? A(NAN) : m;
    sh.logsum[d] = bad ? A(NAN) : ::log(s);
    sh.inv_sum[d] = bad ? A(NAN) : A(1) / s;
  }

  __device__ void run(const S* s_global, bool copied) {
    const KDProblem& p = a.problem;
    const int64_t label = a.labels ? a.labels[i] : p.ignore_index - 1;
    const A sw = a.sample_weight ? static_cast<const A*>(a.sample_weight)[i] : A(1);
    S* gs = a.grad_student ? static_cast<S*>(a.grad_student) + i * V() : nullptr;
    const int64_t step = int64_t(blockDim.x) * kVec;
    const int64_t start = c0 + int64_t(threadIdx.x) * kVec;
    const bool out_whole = (V() % kVec) == 0;  // gradients are contiguous [N, V] from 16-byte aligned allocations

    if (skipped()) {  // an ignored or weight-0 row: no loss, zero gradients (0 * inf would be nan)
      if (threadIdx.x == 0 && (!kCluster || rank() == 0)) static_cast<A*>(a.row_loss)[i] = A(0);
      const A zero[kVec] = {};
      for (int64_t j = start; j < c1; j += step) {
        const bool w = out_whole && j + kVec <= c1;
        if (gs) store_vec(gs, j, c1, w, zero);
        for (int k = 0; k < K(); ++k)
          if (a.grad_teachers[k]) store_vec(static_cast<T*>(a.grad_teachers[k]) + i * V(), j, c1, w, zero);
      }
      return;
    }
    const bool label_ok = label >= 0 && label < V();
    // the gradient of this row's contribution to the returned loss is f * d(l_i)/d(logits)
    const A den = p.reduce && a.denominator ? *static_cast<const A*>(a.denominator) : A(1);
    // an out-of-range label with the CE on (only a direct op call passes one): NaN gradients, as the loss below
    const A f = c.ce != A(0) && !label_ok ? A(NAN) : sw / den;
    if (threadIdx.x == 0) {
      for (int k = 0; k < K(); ++k) {
        sh.w[k] = weight(k);
        sh.logw[k] = ::log(sh.w[k]);
      }
    }
    __syncthreads();

    sweep1(s_global, copied);

    // ---- sweep 2: loss; the closed-form student gradient; the row sum of gq otherwise ----
    const bool want_gs = gs != nullptr;
    const bool write_now = want_gs && c.closed;
    A v[2] = {A(0), A(0)};  // D, sum gq
    for (int64_t j = start; j < c1; j += step) {
      A raw[kVec], q[kVec], logq[kVec], phi[kVec], gq[kVec];
      student_q_vec(j, raw, q, logq);
      terms_vec(j, q, logq, phi, gq);
      mask_tail(j, phi);
      mask_tail(j, gq);
#pragma unroll
      for (int u = 0; u < kVec; ++u) v[0] += phi[u], v[1] += gq[u];
      if (write_now) {  // dD/da = Q - P, here -gq = P
        A g[kVec];
#pragma unroll
        for (int u = 0; u < kVec; ++u) {
          A gu = c.kd_on ? c.kd_over_t * (q[u] + gq[u]) : A(0);
          if (c.ce != A(0)) gu += c.ce * (ce_softmax(raw[u], q[u]) - (j + u == label ? A(1) : A(0)));
          g[u] = f * gu;
        }
        store_vec(gs, j, c1, out_whole && j + kVec <= c1, g);
      }
    }
    reduce_n<SumOp<A>>(v, 2);
    const A D = v[0], agg_q = v[1];
    if (threadIdx.x == 0 && (!kCluster || rank() == 0)) {
      A ce_loss = A(0);
      if (c.ce != A(0)) {
        if (label_ok) {
          const A s_lab = to_acc<A>(static_cast<const S*>(a.student)[i * a.student_stride + label]);
          const A mx = c.ce_own ? sh.ce_max : sh.rowmax[0];  // not own: T = 1
          const A ls = c.ce_own ? sh.ce_logsum : sh.logsum[0];
          ce_loss = (mx - s_lab) + ls;
        } else {
          ce_loss = A(NAN);  // an out-of-range label (the functional API rejects it first): never a silent number
        }
      }
      // kd_scale = 0 (ce_weight = 1) is pure cross-entropy, even where D = inf
      static_cast<A*>(a.row_loss)[i] = sw * ((c.kd_on ? c.kd_scale * D : A(0)) + c.ce * ce_loss);
    }

    // ---- sweep 3: the student gradient of divergences without a closed form ----
    if (want_gs && !c.closed) {
      for (int64_t j = start; j < c1; j += step) {
        A raw[kVec], q[kVec], logq[kVec], phi[kVec] = {}, gq[kVec] = {}, g[kVec];
        student_q_vec(j, raw, q, logq);
        if (c.kd_on) terms_vec(j, q, logq, phi, gq);
#pragma unroll
        for (int u = 0; u < kVec; ++u) {
          A gu = c.kd_on ? c.kd_over_t * (gq[u] - q[u] * agg_q) : A(0);
          if (c.ce != A(0)) gu += c.ce * (ce_softmax(raw[u], q[u]) - (j + u == label ? A(1) : A(0)));
          g[u] = f * gu;
        }
        store_vec(gs, j, c1, out_whole && j + kVec <= c1, g);
      }
    }

    // ---- teacher gradients (co-distillation): per teacher, its row aggregate, then its gradient ----
    if (any_teacher_grad()) teacher_grads(f, start, step, out_whole);
  }

  __device__ bool any_teacher_grad() const {
    for (int k = 0; k < K(); ++k)
      if (a.grad_teachers[k]) return true;
    return false;
  }

  // dD/d(teacher k logits / T), as the CPU kernel:
  //   single teacher or logit_mean:  w_k (hp_j - P_j sum_v hp_v)
  //   prob_mean:                     r_kj hp_j - P_kj sum_v r_kv hp_v     (r_k = w_k P_k / P)
  //   loss_mean:                     w_k (hp_kj - P_kj sum_v hp_kv)
  __device__ void teacher_grads(A f, int64_t start, int64_t step, bool out_whole) {
    const A scale = f * c.kd_over_t;
    // the single-target aggregate is shared by every teacher: computed once
    const bool shared_agg = !c.mixture && !c.per_teacher;
    A agg_shared = A(0);
    if (shared_agg && c.kd_on) agg_shared = teacher_aggregate(0, start, step);
    for (int k = 0; k < K(); ++k) {
      if (!a.grad_teachers[k]) continue;  // not asked for
      T* out = static_cast<T*>(a.grad_teachers[k]) + i * V();
      if (sh.w[k] == A(0) || !c.kd_on) {  // not in this row's loss (kd_scale = 0: the teachers not at all)
        const A zero[kVec] = {};
        for (int64_t j = start; j < c1; j += step) store_vec(out, j, c1, out_whole && j + kVec <= c1, zero);
        continue;
      }
      const A agg = shared_agg ? agg_shared : teacher_aggregate(k, start, step);
      for (int64_t j = start; j < c1; j += step) {
        A g[kVec];
        teacher_grad_vec(k, j, agg, g);
#pragma unroll
        for (int u = 0; u < kVec; ++u) g[u] *= scale;
        store_vec(out, j, c1, out_whole && j + kVec <= c1, g);
      }
    }
  }

  // hp of teacher k at kVec columns (weighted as its gradient formula needs), and P_k (or the target's P)
  __device__ void teacher_hp_vec(int k, int64_t j, A (&hp)[kVec], A (&pk)[kVec]) const {
    A raw[kVec], q[kVec], logq[kVec];
    student_q_vec(j, raw, q, logq);
    if (c.per_teacher) {
      A x[kVec];
      teacher_vec(k, j, x);
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        const A logp = (x[u] - sh.rowmax[k + 1]) - sh.logsum[k + 1];
        pk[u] = fexp(x[u] - sh.rowmax[k + 1]) * sh.inv_sum[k + 1];
        hp[u] = divergence_terms<Ops>(c.prm, pk[u], q[u], logp, logq[u]).hp;
      }
      return;
    }
    A logp[kVec], p[kVec];
    target_vec(j, logp, p);
    if (!c.mixture) {
#pragma unroll
      for (int u = 0; u < kVec; ++u) {
        hp[u] = divergence_terms<Ops>(c.prm, p[u], q[u], logp[u], logq[u]).hp;
        pk[u] = p[u];
      }
      return;
    }
    A lp[kVec];
    lpk_vec(k, j, lp);
#pragma unroll
    for (int u = 0; u < kVec; ++u) {
      const A r = logp[u] == neg_inf<A>() ? A(0) : fexp(lp[u] - logp[u]);  // responsibility of teacher k
      hp[u] = r * divergence_terms<Ops>(c.prm, p[u], q[u], logp[u], logq[u]).hp;
      // unweighted P_k
      pk[u] = sh.w[k] == A(0) ? A(0) : fexp(lp[u] - sh.logw[k]);
    }
  }

  __device__ A teacher_aggregate(int k, int64_t start, int64_t step) {
    A v[1] = {A(0)};
    for (int64_t j = start; j < c1; j += step) {
      A hp[kVec], pk[kVec];
      teacher_hp_vec(k, j, hp, pk);
      mask_tail(j, hp);
#pragma unroll
      for (int u = 0; u < kVec; ++u) v[0] += hp[u];
    }
    reduce_n<SumOp<A>>(v, 1);
    return v[0];
  }

  __device__ void teacher_grad_vec(int k, int64_t j, A agg, A (&g)[kVec]) const {
    A hp[kVec], pk[kVec];
    teacher_hp_vec(k, j, hp, pk);
    const A wk = c.mixture ? A(1) : sh.w[k];  // the mixture's hp already carries r_k
#pragma unroll
    for (int u = 0; u < kVec; ++u) g[u] = wk * (hp[u] - pk[u] * agg);
  }

  __device__ unsigned rank() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kCluster) return cg::this_cluster().block_rank();
#endif
    return 0;
  }
};

// v1 (kPipe false): a block (cluster) per row. Pipelined (kPipe, resident only): a persistent grid of row groups,
// each looping over rows group, group + groups, ..., copying the next row into its second buffer before it computes
// the current one; the cp.async groups then hold one row each, committed in row order and waited for with one left
// in flight. A kernel of its own: around the row's code the loop costs ~40 registers (ptxas keeps values live across
// its back edge), which v1 does not pay; its launch bounds (384 threads, ptxas's cap 168 registers) are where it
// does not spill. v1's bounds are the launcher's 512 threads (float64: 256), which its ~115-127 registers meet.
template <typename S, typename T, typename A, Residency kRes, bool kPipe>
__global__ void __launch_bounds__(kPipe ? 384 : (sizeof(A) == 8 ? 256 : 512))
    kd_row_kernel(const __grid_constant__ KDCudaArgs args, const __grid_constant__ Scalars<A> c, int64_t slice,
                  int whole_global) {
  constexpr bool kResident = kRes != Residency::Global;
  static_assert(kResident || !kPipe, "only a resident row is pipelined");
#ifdef FASTDISTILL_CUDA_EMULATE  // (tests/cuda_emu: the emulated block's dynamic shared memory, its exact size)
  unsigned char* smem = fdemu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  RowShared<A>& sh = *reinterpret_cast<RowShared<A>*>(smem);
  const KDProblem& p = args.problem;
  int64_t cs = 1, c0 = 0;  // blocks per group, this block's first column (zero where the cluster path traps: sm_80)
  if constexpr (kRes == Residency::Cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    cs = cluster.num_blocks();
    c0 = int64_t(cluster.block_rank()) * slice;
#else
    __trap();
#endif
  }
  const int64_t c1 = c0 + slice < p.vocab ? c0 + slice : p.vocab;
  if (c0 > c1) c0 = c1;  // a rank past the end of a short row: no columns, still in every cluster barrier
  const int64_t groups = gridDim.x / cs, group = blockIdx.x / cs;
  FD_ASSERT(blockDim.x % 32 == 0 && blockDim.x <= 32 * kMaxWarps && gridDim.x % cs == 0);
  FD_ASSERT(kPipe || groups == p.rows);
  // a row buffer: the student's slice, then each teacher's, each padded to kAlign elements (kd_loss_plan.h)
  const int64_t padded = (slice + kAlign - 1) / kAlign * kAlign;
  const int64_t buf_bytes = padded * int64_t(sizeof(S) + p.teachers * sizeof(T));

  const auto student_row = [&](int64_t row) { return static_cast<const S*>(args.student) + row * args.student_stride; };
  const auto kernel_for = [&](int64_t row, int buf) {
    RowKernel<S, T, A, kRes> kern{args, c, sh, row, c0, c1, student_row(row), nullptr, 0, 0,
                                   kResident || whole_global != 0, whole_global != 0};
    if constexpr (kResident) {
      unsigned char* base = smem + shared_header<A>() + buf * buf_bytes;
      kern.s_src = reinterpret_cast<const S*>(base);
      kern.t_base = reinterpret_cast<const T*>(base + padded * sizeof(S));
      kern.t_pitch = padded;
      kern.off = c0;
    }
    return kern;
  };

  if constexpr (kPipe) {
    if (group < p.rows) kernel_for(group, 0).copy_row(student_row(group));
    __pipeline_commit();
    int buf = 0, parity = 0;  // parity: the cluster reductions' slot, alternating across rows as within one
    for (int64_t row = group; row < p.rows; row += groups) {
      const int64_t next = row + groups;
      // the other buffer was last read by the previous row, which every thread has left (the barrier below)
      if (next < p.rows) kernel_for(next, buf ^ 1).copy_row(student_row(next));
      __pipeline_commit();
      __pipeline_wait_prior(1);  // this row's copy (all but the one just issued) has landed, for this thread's part
      RowKernel<S, T, A, kRes> kern = kernel_for(row, buf);
      kern.parity = parity;
      kern.run(student_row(row), true);  // (its first barrier makes every thread's copy visible to the block)
      parity = kern.parity;
      buf ^= 1;
      __syncthreads();  // the row header and this buffer are free for the next row
    }
  } else {
    kernel_for(group, 0).run(student_row(group), false);
  }
  if constexpr (kRes == Residency::Cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::this_cluster().sync();  // no block leaves while another may still read its shared memory
#endif
  }
}

// ---- launcher --------------------------------------------------------------------------------------------------

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

constexpr int kMaxDevices = 64;

// Returns err after clearing the runtime's sticky last error, so that no later, unrelated launch check reports it.
inline cudaError_t clear(cudaError_t err) {
  cudaGetLastError();
  return err;
}

// What a launch asks the runtime, asked once per device (and kernel, and launch shape): attributes, shared-memory
// carveout, occupancy. Each query costs microseconds of host time, and the host's time before the launch adds to
// every synchronised step (benchmarks/NOTES.md, "Host time"). Results that depend only on the kernel, the device and
// the launch shape are kept; errors are not. Devices 0 to kMaxDevices - 1: a higher ordinal is refused
// (cudaErrorInvalidDevice), where no process has ever seen one.
struct DeviceFacts {
  int major = 0, sms = 0, smem_sm = 0, smem_block_optin = 0, regs_sm = 0, reserved = 0;
};

inline cudaError_t device_facts(int device, DeviceFacts* out) {
  static std::mutex mutex;
  static DeviceFacts facts[kMaxDevices];
  static bool ready[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  const std::lock_guard<std::mutex> lock(mutex);
  DeviceFacts& d = facts[device];
  if (!ready[device]) {
    cudaError_t err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&d.smem_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.regs_sm, cudaDevAttrMaxRegistersPerMultiprocessor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
    if (err != cudaSuccess) return err;
    ready[device] = true;
  }
  *out = d;
  return cudaSuccess;
}

// One per kernel (a function-local static of its launch_typed): its attributes per device, read once with the
// one-time settings (carveout, non-portable cluster sizes), and the occupancy answers per launch shape.
struct KernelFacts {
  struct Occupancy {
    int device, threads, cluster;
    int64_t smem;
    int value;
  };
  std::mutex mutex;
  bool ready[kMaxDevices] = {};
  bool big_clusters[kMaxDevices] = {};
  int smem_allowed[kMaxDevices] = {};
  cudaFuncAttributes attributes[kMaxDevices];
  std::vector<Occupancy> occupancy;

  // the kernel's attributes on `device`; the first call also asks for the largest shared-memory carveout (resident
  // kernels: the blocks per SM that the plan counts on)
  template <typename Kernel>
  cudaError_t get(Kernel kernel, int device, bool carveout, cudaFuncAttributes* out) {
    if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
    const std::lock_guard<std::mutex> lock(mutex);
    if (!ready[device]) {
      cudaError_t err = cudaFuncGetAttributes(&attributes[device], kernel);
      if (err == cudaSuccess && carveout)
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                   int(cudaSharedmemCarveoutMaxShared));
      if (err != cudaSuccess) return err;
      ready[device] = true;
    }
    *out = attributes[device];
    return cudaSuccess;
  }

  // the dynamic shared memory the kernel may use on `device`: raised to `bytes` when below, never lowered, under the
  // lock (two threads launching it cannot leave a smaller setting behind a larger launch)
  template <typename Kernel>
  cudaError_t raise_smem(Kernel kernel, int device, int bytes) {
    if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
    const std::lock_guard<std::mutex> lock(mutex);
    if (smem_allowed[device] >= bytes) return cudaSuccess;
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess) smem_allowed[device] = bytes;
    return err;
  }

  // clusters of more than 8 blocks (sm_90: up to 16), allowed once per device
  template <typename Kernel>
  cudaError_t allow_big_clusters(Kernel kernel, int device) {
    if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
    const std::lock_guard<std::mutex> lock(mutex);
    if (big_clusters[device]) return cudaSuccess;
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err == cudaSuccess) big_clusters[device] = true;
    return err;
  }

  // query(&value) once per (device, threads, dynamic shared memory, cluster)
  template <typename Query>
  cudaError_t occupancy_of(int device, int threads, int64_t smem, int cluster, Query query, int* value) {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const Occupancy& o : occupancy)
      if (o.device == device && o.threads == threads && o.smem == smem && o.cluster == cluster) {
        *value = o.value;
        return cudaSuccess;
      }
    const cudaError_t err = query(value);
    if (occupancy.size() >= 256) occupancy.clear();  // bounded: shapes without end (a V per call) start it over
    if (err == cudaSuccess) occupancy.push_back({device, threads, cluster, smem, *value});
    return err;
  }
};

template <typename S, typename T, typename A, Residency kRes, bool kPipe = false>
cudaError_t launch_typed(const KDCudaArgs& a, const KDCudaConfig& cfg, cudaStream_t stream) {
  auto kernel = kd_row_kernel<S, T, A, kRes, kPipe>;
  const Scalars<A> c = make_scalars<A>(a.problem);
  const int64_t slice = kRes == Residency::Global ? a.problem.vocab : slice_of(a.problem.vocab, cfg.cluster);
  // 16-byte loads: every row start aligned (base pointer and row stride)
  bool whole = aligned16(a.student) && (a.student_stride * dtype_size(a.student_dtype)) % 16 == 0;
  for (int k = 0; k < a.problem.teachers; ++k)
    whole = whole && aligned16(a.teachers[k]) && (a.teacher_strides[k] * dtype_size(a.teacher_dtype)) % 16 == 0;
  static KernelFacts facts;
  int device = 0;
  cudaFuncAttributes fa;
  DeviceFacts dev;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = facts.get(kernel, device, kRes != Residency::Global, &fa);
  if (err == cudaSuccess) err = device_facts(device, &dev);
  if (err != cudaSuccess) return clear(err);
  // The plan leaves 1 KiB beside the dynamic bytes for the kernel's static shared memory; should the compiled
  // kernel's own be larger, the block does not fit: the fallback's error (launch_kd_loss tries the next kernel), not
  // the "invalid argument" cudaFuncSetAttribute would give below.
  if (cfg.smem_bytes + int64_t(fa.sharedSizeBytes) > dev.smem_block_optin) return clear(cudaErrorNotPermitted);
  err = facts.raise_smem(kernel, device, int(cfg.smem_bytes));
  if (err != cudaSuccess) return clear(err);
  // no more threads than the kernel's registers allow on one SM
  int threads = std::min(cfg.threads, fa.maxThreadsPerBlock / 32 * 32);
  if constexpr (kPipe) {
    // one block per SM at these slices (two buffers), 384 threads; short slices do not need them all: halve while the
    // half still covers the slice in one step and is whole warps (384 -> 192 -> 96)
    if (a.threads <= 0)
      while (threads % 64 == 0 && threads > 64 && int64_t(threads / 2) * kVec >= slice) threads /= 2;
  } else if constexpr (kRes != Residency::Global) {
    // Resident rows: as many blocks per SM as the shared memory holds (the plan sizes them for two or three), so
    // that one block's sweeps overlap another's copies. At ~120 registers 512 threads fill an SM's registers alone:
    // unless the caller chose the threads, halve them until the blocks the shared memory allows also fit the
    // registers (down to 128, and only while the half is whole warps: a bound of 320 stops at 160, not 80);
    // KernelFacts::get has asked for the largest shared-memory carveout.
    if (a.threads <= 0) {
      const int64_t per_block = cfg.smem_bytes + int64_t(fa.sharedSizeBytes) + dev.reserved;
      const int64_t blocks = std::max<int64_t>(1, dev.smem_sm / std::max<int64_t>(per_block, 1));
      const int64_t regs_warp = (int64_t(fa.numRegs) * 32 + 255) / 256 * 256;  // allocated per warp, 256 at a time
      while (threads % 64 == 0 && threads > 128 && blocks * (threads / 32) * regs_warp > dev.regs_sm) threads /= 2;
    }
  }
  if (threads % 32 != 0 || threads < 32) return clear(cudaErrorInvalidConfiguration);  // the reductions need warps
  cudaLaunchConfig_t lc = {};
  lc.blockDim = dim3(threads);
  lc.dynamicSmemBytes = size_t(cfg.smem_bytes);
  lc.stream = stream;
  cudaLaunchAttribute attr[1];
  int64_t groups = a.problem.rows;  // v1: a block (cluster) per row
  if constexpr (kPipe && kRes == Residency::Smem) {  // a persistent grid: the blocks the SMs hold at once
    int per_sm = 0;
    err = facts.occupancy_of(device, threads, cfg.smem_bytes, 1, [&](int* v) {
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(v, kernel, threads, size_t(cfg.smem_bytes));
    }, &per_sm);
    if (err != cudaSuccess) return clear(err);
    if (per_sm < 1) return clear(cudaErrorNotPermitted);
    groups = std::min<int64_t>(groups, int64_t(per_sm) * dev.sms);
  }
  int64_t blocks = groups;
  if constexpr (kRes == Residency::Cluster) {
    if (cfg.cluster > 8) {
      err = facts.allow_big_clusters(kernel, device);
      if (err != cudaSuccess) return clear(err);
    }
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cfg.cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    lc.attrs = attr;
    lc.numAttrs = 1;
    // a cluster this large may not fit the device (16 blocks of one per SM need 16 free SMs in one GPC):
    // cudaErrorNotPermitted, and launch_kd_loss falls back. Pipelined, the grid is the clusters the device holds at
    // once.
    lc.gridDim = dim3(unsigned(cfg.cluster));
    int clusters = 0;
    err = facts.occupancy_of(device, threads, cfg.smem_bytes, cfg.cluster,
                             [&](int* v) { return cudaOccupancyMaxActiveClusters(v, kernel, &lc); }, &clusters);
    if (err != cudaSuccess || clusters < 1) return clear(cudaErrorNotPermitted);
    if constexpr (kPipe) groups = std::min<int64_t>(groups, clusters);
    blocks = groups * cfg.cluster;
  }
  if (kPipe && a.max_groups > 0) {
    groups = std::min(groups, a.max_groups);
    blocks = groups * cfg.cluster;
  }
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  lc.gridDim = dim3(unsigned(blocks));
  err = cudaLaunchKernelEx(&lc, kernel, a, c, slice, int(whole));
  // (it reports this launch's errors itself; cudaGetLastError here would return an earlier call's uncleared one)
  return err != cudaSuccess ? clear(err) : cudaSuccess;
}

// The launch of one planned configuration. cudaErrorNotPermitted: the device cannot hold the planned block or cluster
// at once (its shared memory, or free SMs in one GPC); launch_kd_loss then falls back (kd_loss_launch.cu).
template <typename S, typename T, typename A>
cudaError_t launch_res(const KDCudaArgs& a, const KDCudaConfig& cfg, cudaStream_t stream) {
  // teachers in another dtype than the student (rare): the global-memory kernel only, which keeps the number of
  // kernels, and the build time, down
  if constexpr (!std::is_same_v<S, T>) {
    return launch_typed<S, T, A, Residency::Global>(a, cfg, stream);
  } else {
    switch (cfg.residency) {
      case Residency::Smem:
        if constexpr (std::is_same_v<A, double>) {  // float64: v1 only (the planner never pipelines it)
          return cfg.pipelined ? cudaErrorNotSupported : launch_typed<S, T, A, Residency::Smem>(a, cfg, stream);
        } else {
          return cfg.pipelined ? launch_typed<S, T, A, Residency::Smem, true>(a, cfg, stream)
                               : launch_typed<S, T, A, Residency::Smem>(a, cfg, stream);
        }
      case Residency::Cluster:
        if constexpr (std::is_same_v<A, double>) {
          return cudaErrorNotSupported;  // float64: Global or Smem only (the planner never picks it)
        } else {
          return cfg.pipelined ? launch_typed<S, T, A, Residency::Cluster, true>(a, cfg, stream)
                               : launch_typed<S, T, A, Residency::Cluster>(a, cfg, stream);
        }
      default: return launch_typed<S, T, A, Residency::Global>(a, cfg, stream);
    }
  }
}

// Instantiated in inst/ for every (S, T) pair the launcher dispatches to.
#define FD_KD_INSTANTIATE(S, T, A) \
  template cudaError_t launch_res<S, T, A>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace fastdistill
