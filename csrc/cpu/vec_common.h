// SIMD building blocks shared by the CPU kernels (csrc/cpu/*.cpp): the at::vec policy of kd_math.h, fixed-order
// horizontal reductions (deterministic), row loads and output allocation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace fastdistill {
namespace cpu {

template <typename A>
at::vec::Vectorized<A> vexp(at::vec::Vectorized<A> x) {
  // float: ATen's polynomial exp (<= 20 ulp, what its softmax uses), about twice Sleef's throughput; float64: exact.
  // exp_u20 clamps its argument with min/max, which turn a NaN into a finite bound (exp(NaN) ~ 1e38): the NaN is
  // put back, so a NaN or +inf logit (inf - inf) poisons its row's normaliser and softmax as the contract says.
  if constexpr (std::is_same_v<A, float>) return at::vec::Vectorized<A>::blendv(x.exp_u20(), x, x.isnan());
  else return x.exp();
}

// The "Ops" policy of csrc/common/kd_math.h over SIMD vectors.
template <typename A>
struct VecOps {
  using V = at::vec::Vectorized<A>;
  static V splat(A x) { return V(x); }
  static V exp(V x) { return vexp<A>(x); }
  static V log1p(V x) { return x.log1p(); }
  static V abs(V x) { return x.abs(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
  static V where_zero(V x, V a, V b) { return V::blendv(b, a, x == V(A(0))); }
  static V where_neginf(V x, V a, V b) { return V::blendv(b, a, x == V(-std::numeric_limits<A>::infinity())); }
  static V sign(V x) { return x.gt(V(A(0))) - x.lt(V(A(0))) + (x - x); }  // NaN stays NaN (see kd_math.h)
};

template <typename A>
A hsum(const at::vec::Vectorized<A>& v) {  // fixed lane order: deterministic
  A buf[at::vec::Vectorized<A>::size()];
  v.store(buf);
  A s = 0;
  for (int l = 0; l < at::vec::Vectorized<A>::size(); ++l) s += buf[l];
  return s;
}

template <typename A>
A hmax(const at::vec::Vectorized<A>& v) {  // NaN if any lane is NaN, like at::vec::maximum (std::max is not)
  A buf[at::vec::Vectorized<A>::size()];
  v.store(buf);
  A m = buf[0];
  for (int l = 1; l < at::vec::Vectorized<A>::size(); ++l) m = (buf[l] > m || buf[l] != buf[l]) ? buf[l] : m;
  return m;
}

// A sum over the vectors of a row: lane-wise within a block of kBlock elements, the blocks' sums added in order as
// scalars (deterministic). Lanes running over a whole row would each add V / W terms to one running sum, dropping
// every term below half an ulp of it: 1e-4 of a KL at V = 256000 in float32, and the same error in a gradient's
// aggregate; in blocks no lane adds more than kBlock / W terms (as normalise's chunks). Padding adds zeros.
template <typename A>
struct RowSum {
  static constexpr int64_t kBlock = 1024;
  using Vec = at::vec::Vectorized<A>;
  Vec lanes = Vec(A(0));
  A total = A(0);
  int64_t n = 0;  // elements added to lanes since the last flush

  void add(const Vec& v) {
    lanes += v;
    n += Vec::size();
    if (n >= kBlock) flush();
  }
  void flush() {
    total += hsum(lanes);
    lanes = Vec(A(0));
    n = 0;
  }
  A sum() {
    flush();
    return total;
  }
};

// Largest element of a padded row (padding is -inf).
template <typename A>
A row_max(const A* x, int64_t padded) {
  using Vec = at::vec::Vectorized<A>;
  Vec vm(-std::numeric_limits<A>::infinity());
  for (int64_t j = 0; j < padded; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + j));
  return hmax(vm);
}

// A row's log-sum-exp kept split, lse = max + log_sum: log softmax is then (x - max) - log_sum, whose parts are
// small and exact near the top classes, where x - lse would lose ulp(lse) to the rounding of lse (5e-4 of the loss
// for logits around 1e4 in float32).
template <typename A>
struct LogNorm {
  A max, log_sum;
};

// The split log-sum-exp of a padded row times scale > 0 (padding is -inf). NaN parts for a row with no finite logit: no
// distribution, so every log probability of it is NaN (a NaN in the row gives NaN by itself).
template <typename A>
LogNorm<A> row_log_norm(const A* x, int64_t padded, A scale) {
  using Vec = at::vec::Vectorized<A>;
  constexpr A kNaN = std::numeric_limits<A>::quiet_NaN();
  const A m = row_max(x, padded) * scale;
  if (m == -std::numeric_limits<A>::infinity()) return {kNaN, kNaN};
  const Vec vscale(scale), vmax(m);
  RowSum<A> s;
  for (int64_t j = 0; j < padded; j += Vec::size()) s.add(vexp<A>(Vec::loadu(x + j) * vscale - vmax));
  return {m, std::log(s.sum())};
}

// Convert one input row to the accumulation type, times 1/T, padded with -inf to a whole number of vectors.
template <typename In, typename A>
void load_scaled(const In* src, A* dst, int64_t n, int64_t padded, A inv_t) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<A>(src[j]) * inv_t;
  for (int64_t j = n; j < padded; ++j) dst[j] = -std::numeric_limits<A>::infinity();
}

// load_scaled, and the row unscaled into raw too, from one read of the input: the cross-entropy at T = 1 needs the
// raw logits when x * T is not them exactly (T not a power of two: x = s / T is rounded).
template <typename In, typename A>
void load_scaled_and_raw(const In* src, A* dst, A* raw, int64_t n, int64_t padded, A inv_t) {
  for (int64_t j = 0; j < n; ++j) {
    const A v = static_cast<A>(src[j]);
    raw[j] = v;
    dst[j] = v * inv_t;
  }
  for (int64_t j = n; j < padded; ++j) dst[j] = raw[j] = -std::numeric_limits<A>::infinity();
}

// x * t == x exactly for every float x (barring overflow to inf or underflow below the normal range) when t is a
// power of two: an exponent shift.
inline bool is_power_of_two(double t) { return t > 0 && std::ldexp(1.0, std::ilogb(t)) == t; }

// A fresh [N, V] gradient is written exactly once, and faulting it in 4 KiB pages costs as much as the kernel
// at LLM vocabularies (~0.4 ms per MiB here). Ask for transparent huge pages on its interior, as PyTorch's own
// allocator does under THP_MEM_ALLOC_ENABLE=1; a no-op where THP is off.
inline at::Tensor empty_for_writing(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advisory: errors are harmless
#endif
  return t;
}

inline at::Tensor row_major(const at::Tensor& x) {  // [N, V] with unit stride along V (a view when possible)
  return x.stride(1) == 1 ? x : x.contiguous();
}

// Sum of per-row losses in row order, in double: bitwise reproducible whatever the thread count.
inline double ordered_sum(const at::Tensor& rows) {
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "ordered_sum", [&] {
    const scalar_t* r = rows.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows.numel(); ++i) total += static_cast<double>(r[i]);
  });
  return total;
}

}  // namespace cpu
}  // namespace fastdistill
