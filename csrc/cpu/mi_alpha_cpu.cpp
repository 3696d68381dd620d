// CPU kernels of fastdistill::mi_alpha and fastdistill::mi_alpha_backward (SPEC §2, §6; the algebra is
// csrc/common/mi_math.h). The N x N critic matrix is never materialised: work goes in blocks of B rows, each a
// [B, N] score strip computed by one BLAS matmul (at::mm on the strip) into a per-thread buffer, so extra memory is
// O(threads * B * N + N * D), not O(N^2).
//
//   forward   per teacher-row strip: pass 1 the row's largest score and log-sum-exps l_i (all columns), w_i (the
//             diagonal left out), z_i (the largest left out), pass 2 the joint-term sum and the backward aggregates
//             C_i, dI/da_i, dI/dS_ii (one exp, one log, one division per score); the diagonal and the largest
//             score's terms come from (l_i, w_i, z_i) in closed form.                          1 matmul  (2 N^2 D flops)
//   backward  phase A: per teacher-row strip, recompute S, overwrite it with grad * dI/dS, d(teacher) = G U / T;
//             phase B: per student-row strip, the same on S^T, d(student) = G^T V / T.  4 matmuls (8 N^2 D flops)
// Phase B recomputes what phase A had, instead of accumulating d(student) across row strips with atomics or
// per-thread copies: every output row is written by one thread, in a fixed order (bitwise reproducible).
// Per-row results are reduced in row order in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/mi_math.h"
#include "vec_common.h"

namespace fastdistill {
namespace {

using at::vec::Vectorized;
using cpu::RowSum;
using cpu::vexp;

// Rows per strip: tall enough for an efficient BLAS product (thin [B, D] x [D, N] products run far below the
// machine's matmul rate), short enough that a [B, N] strip stays in L2/L3 for the sweeps over it: ~4 MiB, B in
// [16, 256]; FASTDISTILL_MI_STRIP overrides it (benchmarks).
int64_t strip_rows(int64_t n, int64_t elem) {
  static const int64_t forced = [] {
    const char* e = std::getenv("FASTDISTILL_MI_STRIP");
    return e ? std::atoll(e) : int64_t(0);
  }();
  if (forced > 0) return forced;
  return std::clamp<int64_t>((int64_t(4) << 20) / std::max<int64_t>(n * elem, 1), 16, 256);
}

// Calls f(vector of x[j], lanes) over j in [b, e) in SIMD-width steps; the last step is partial (lanes < width),
// its missing lanes filled with `pad`. f must ignore (or be neutral on) the padded lanes.
template <typename A, typename F>
inline void sweep(const A* x, int64_t b, int64_t e, A pad, F&& f) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  int64_t j = b;
  for (; j + W <= e; j += W) f(V::loadu(x + j), W);
  if (j < e) f(V::set(V(pad), V::loadu(x + j, e - j), e - j), e - j);
}

template <typename A>
struct Launch {
  int64_t n;
  A inv_t;         // 1 / temperature
  A lam;           // log(N - 1)
  A log_alpha;     // -inf for alpha = 0
  A log_1m_alpha;  // -inf for alpha = 1
  A inv_n, inv_d;  // 1 / N, 1 / (N (N - 1))
  Launch(int64_t n_, double alpha, double temperature)
      : n(n_), inv_t(A(1.0 / temperature)), lam(A(std::log(double(n_ - 1)))),
        log_alpha(alpha > 0 ? A(std::log(alpha)) : -std::numeric_limits<A>::infinity()),
        log_1m_alpha(alpha < 1 ? A(std::log1p(-alpha)) : -std::numeric_limits<A>::infinity()),
        inv_n(A(1.0 / double(n_))), inv_d(A(1.0 / (double(n_) * double(n_ - 1)))) {}
};

// Rows of the [8, N] stats tensor (the schema in csrc/fastdistill.cpp lists them).
constexpr int64_t kL = 0, kCrest = 1, kPhi = 2, kM = 3, kDa = 4, kStar = 5, kGdiag = 6, kZ = 7, kStatsRows = 8;

// Per-row forward result: N (I_i - 1), this row's share of the estimate, I = 1 + (1/N) sum_i part_i with
// part_i = S_ii - K_i - (sum_{j != i} log t_ij) / (N - 1) - r_i. Combining a row's O(l_i)-sized terms before the sum
// over rows keeps their cancellation out of the total.

// Calls sweep(x, range, pad, f) over [0, n) without the (at most two) indices e1, e2.
template <typename A, typename F>
inline void sweep_excluding(const A* x, int64_t n, int64_t e1, int64_t e2, A pad, F&& f) {
  const int64_t lo = std::min(e1, e2), hi = std::max(e1, e2);
  sweep<A>(x, 0, lo, pad, f);
  if (hi != lo) sweep<A>(x, lo + 1, hi, pad, f);
  sweep<A>(x, hi + 1, n, pad, f);
}

// Forward on one score row s[0..n) (already scaled by 1/T) of teacher row i. Writes the row's stats column.
template <typename A>
void forward_row(const Launch<A>& P, A* s, int64_t i, A a, A* stats, A& part) {
  using V = Vectorized<A>;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const int64_t n = P.n;
  // pass 1: the row's largest score (first index on ties), then the log-sum-exp over the other columns, the
  // diagonal and the largest apart: l (all), w (without the diagonal), z (without the largest), each without
  // cancellation or underflow.
  // The first sweep also scales the raw products by 1/T in place (the strip holds <v_i, u_j> from BLAS).
  V vmax(neg_inf);
  const V vt(P.inv_t);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t lanes = std::min<int64_t>(V::size(), n - j);
    const V x = V::loadu(s + j, lanes) * vt;
    x.store(s + j, lanes);
    vmax = at::vec::maximum(vmax, lanes < V::size() ? V::set(V(neg_inf), x, lanes) : x);
  }
  A buf[V::size()];
  vmax.store(buf);
  A mx = neg_inf;
  for (int l = 0; l < V::size(); ++l) mx = std::max(mx, buf[l]);
  int64_t star = 0;
  while (star < n - 1 && !(s[star] == mx)) ++star;
  // The other columns' log-sum-exp with their own maximum: relative to mx their exps may all underflow.
  V vmax2(neg_inf);
  sweep_excluding<A>(s, n, i, star, neg_inf, [&](V x, int64_t) { vmax2 = at::vec::maximum(vmax2, x); });
  vmax2.store(buf);
  A mx2 = neg_inf;
  for (int l2 = 0; l2 < V::size(); ++l2) mx2 = std::max(mx2, buf[l2]);
  A lse_rest = neg_inf;  // N = 2 with the largest score off the diagonal: no other column
  if (mx2 != neg_inf) {
    RowSum<A> vsum;  // (in blocks: N / W terms per lane would drift at large N)
    const V vmx2(mx2);
    sweep_excluding<A>(s, n, i, star, neg_inf, [&](V x, int64_t) { vsum.add(vexp(x - vmx2)); });
    lse_rest = mx2 + std::log(vsum.sum());
  }
  using Ops = ScalarOps<A>;
  A l, w, z;
  if (star == i) {
    z = w = lse_rest;
    l = logaddexp<Ops>(mx, lse_rest);
  } else {
    z = logaddexp<Ops>(lse_rest, s[i]);
    w = logaddexp<Ops>(lse_rest, mx);
    l = logaddexp<Ops>(z, mx);
  }
  const auto c = mi::row_consts<A>(l, a, P.lam, P.log_alpha, P.log_1m_alpha);

  // pass 2 over j not in {i, k*}: sum log t_ij, sum 1 / t_ij (C_i and dI/da_i are multiples of it) and sum g_ij.
  RowSum<A> vlog, vinv, vg;
  const V vl(l), va(c.alpha_), vb(c.beta_), zero(A(0));
  sweep_excluding<A>(s, n, i, star, A(0), [&](V x, int64_t lanes) {
    const V p = vexp(x - vl);
    const V t = mi::t_of<V>(va, vb, p);
    V lt = t.log(), it = V(A(1)) / t, g = mi::g_of<V>(va, vb, p, it);
    if (lanes < V::size()) {  // padded lanes contribute nothing
      lt = V::set(zero, lt, lanes);
      it = V::set(zero, it, lanes);
      g = V::set(zero, g, lanes);
    }
    vlog.add(lt);
    vinv.add(it);
    vg.add(g);
  });
  const mi::Pass2<A> p2{vlog.sum(), vinv.sum(), vg.sum()};
  const auto res = mi::row_result<A>(c, l, w, z, s[i], star == i, p2, A(n), P.inv_n, P.inv_d);
  stats[kL * n + i] = l;
  stats[kCrest * n + i] = res.Crest;
  stats[kPhi * n + i] = res.Phi;
  stats[kM * n + i] = res.m;
  stats[kDa * n + i] = res.da;
  stats[kStar * n + i] = A(star);
  stats[kGdiag * n + i] = res.gdiag;
  stats[kZ * n + i] = z;
  part = res.part;
}

// Per-row quantities the backward pass needs, as arrays (phase B reads them along a strip row), and for each
// column k the rows whose largest score sits at k (k*_i = k != i), as CSR lists.
template <typename A>
struct RowArrays {
  std::vector<A> l, z, Q, alpha_, beta_, Crest, Phi, m, gdiag;
  std::vector<int64_t> star, by_star_start, by_star;
};

template <typename A>
RowArrays<A> row_arrays(const Launch<A>& P, const A* stats, const A* a) {
  RowArrays<A> R;
  const int64_t n = P.n;
  for (auto* v : {&R.l, &R.z, &R.Q, &R.alpha_, &R.beta_, &R.Crest, &R.Phi, &R.m, &R.gdiag}) v->resize(n);
  R.star.resize(n);
  R.by_star_start.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const auto c = mi::row_consts<A>(stats[kL * n + i], a[i], P.lam, P.log_alpha, P.log_1m_alpha);
    R.l[i] = stats[kL * n + i];
    R.z[i] = stats[kZ * n + i];
    R.Q[i] = std::exp(R.z[i] - R.l[i]);
    R.alpha_[i] = c.alpha_;
    R.beta_[i] = c.beta_;
    R.Crest[i] = stats[kCrest * n + i];
    R.Phi[i] = stats[kPhi * n + i];
    R.m[i] = stats[kM * n + i];
    R.gdiag[i] = stats[kGdiag * n + i];
    const A star = stats[kStar * n + i];  // checked before the cast: a NaN (or huge) one cast to int64 is undefined
    TORCH_CHECK_VALUE(star >= 0 && star < A(n), "fastdistill::mi_alpha_backward: stats row ", kStar, " holds column ",
                      star, ", not in [0, ", n, "): pass the stats mi_alpha returned");
    const int64_t k = static_cast<int64_t>(star);
    R.star[i] = k;
    if (k != i) ++R.by_star_start[k + 1];
  }
  for (int64_t k = 0; k < n; ++k) R.by_star_start[k + 1] += R.by_star_start[k];
  R.by_star.resize(R.by_star_start[n]);
  std::vector<int64_t> fill(R.by_star_start.begin(), R.by_star_start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    if (R.star[i] != i) R.by_star[fill[R.star[i]]++] = i;
  }
  return R;
}

// strip[r, :] = x[r0 + r, :] . y^T for r < rows, into the caller's buffer.
template <typename A>
void score_strip(const at::Tensor& x, const at::Tensor& y, int64_t r0, int64_t rows, at::Tensor& buf) {
  at::Tensor out = buf.narrow(0, 0, rows);
  at::mm_out(out, x.narrow(0, r0, rows), y.t());
}

template <typename A>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& u, const at::Tensor& v, const at::Tensor& a,
                                                double alpha, double temperature) {
  const int64_t n = u.size(0);
  const Launch<A> P(n, alpha, temperature);
  at::Tensor stats = at::empty({kStatsRows, n}, u.options());
  std::vector<A> parts(n);
  A* st = stats.data_ptr<A>();
  const A* ap = a.data_ptr<A>();
  const int64_t kStrip = strip_rows(n, sizeof(A)), blocks = (n + kStrip - 1) / kStrip;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor buf = at::empty({kStrip, n}, u.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kStrip, nr = std::min(kStrip, n - r0);
      score_strip<A>(v, u, r0, nr, buf);
      A* sp = buf.data_ptr<A>();
      for (int64_t r = 0; r < nr; ++r) {
        A* s = sp + r * n;
        forward_row<A>(P, s, r0 + r, ap[r0 + r], st, parts[r0 + r]);
      }
    }
  });
  double total = 0;  // row order, in double: bitwise reproducible whatever the thread count
  for (int64_t i = 0; i < n; ++i) total += parts[i];
  const double estimate = 1.0 + total / double(n);
  return {at::scalar_tensor(estimate, u.options()), stats};
}

// Scales one strip row of raw products by 1/T in place, rounding each score as the forward's first sweep does: the
// backward's exp(S - l), exp(S - z) must see the forward's S bitwise. Folded into them, x * (1/T) - l is contracted
// to one fma (-mfma) whose unrounded product differs from the forward's S by up to ulp(S) / 2, ~5e-4 at |S| ~ 1e4
// (T = 1e-3): a relative error of 5e-4 in p = exp(S - l) ~ 1 at the row's largest score.
template <typename A>
void scale_row(A* x, int64_t n, A inv_t) {
  using V = Vectorized<A>;
  const V vt(inv_t);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t lanes = std::min<int64_t>(V::size(), n - j);
    (V::loadu(x + j, lanes) * vt).store(x + j, lanes);
  }
}

// Overwrites one strip row of scores x (scaled by scale_row) with scale * dI/dS, the generic formula for every element
// (the diagonal and the row's largest score are the caller's to correct). Phase A: the strip row is teacher row i
// (per-row quantities broadcast, columns k vary); phase B: the strip row is student row k (S_ik for all teacher
// rows i, per-row quantities loaded along the row).
template <typename A, bool kAlongRows>
void grad_row(const Launch<A>& P, const RowArrays<A>& R, A* x, int64_t self, A scale) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t n = P.n;
  const V vs(scale), vinv_d(P.inv_d);
  V z(R.z[self]), Q(R.Q[self]), al(R.alpha_[self]), be(R.beta_[self]), cr(R.Crest[self]), phi(R.Phi[self]);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t lanes = std::min<int64_t>(W, n - j);
    if constexpr (kAlongRows) {
      z = V::loadu(R.z.data() + j, lanes);
      Q = V::loadu(R.Q.data() + j, lanes);
      al = V::loadu(R.alpha_.data() + j, lanes);
      be = V::loadu(R.beta_.data() + j, lanes);
      cr = V::loadu(R.Crest.data() + j, lanes);
      phi = V::loadu(R.Phi.data() + j, lanes);
    }
    const V u = vexp(V::loadu(x + j, lanes) - z);
    (mi::grad_offdiag<V>(al, be, u, Q, cr, phi, vinv_d) * vs).store(x + j, lanes);
  }
}

template <typename A>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& v,
                                                 const at::Tensor& a, const at::Tensor& stats, double alpha,
                                                 double temperature) {
  const int64_t n = u.size(0), d = u.size(1);
  const Launch<A> P(n, alpha, temperature);
  const RowArrays<A> R = row_arrays<A>(P, stats.data_ptr<A>(), a.data_ptr<A>());
  const A scale = A(grad.item<double>()) * P.inv_t;
  at::Tensor du = at::empty({n, d}, u.options()), dv = at::empty({n, d}, u.options());
  const int64_t kStrip = strip_rows(n, sizeof(A)), blocks = (n + kStrip - 1) / kStrip;
  auto star = [&](A s, int64_t i) { return mi::grad_star<A>(std::exp(s - R.l[i]), R.Crest[i], R.m[i]) * scale; };
  // Phase A (teacher rows -> d(teacher)) and phase B (student rows -> d(student)) differ in which feature matrix
  // gives the strip's rows, whether per-row quantities vary along the strip, and where the special elements are.
  auto phase = [&](const at::Tensor& rows_of, const at::Tensor& cols_of, at::Tensor& out, bool along_rows) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor buf = at::empty({kStrip, n}, u.options());
      std::vector<A> saved;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kStrip, nr = std::min(kStrip, n - r0);
        score_strip<A>(rows_of, cols_of, r0, nr, buf);
        A* sp = buf.data_ptr<A>();
        for (int64_t r = 0; r < nr; ++r) {
          A* x = sp + r * n;
          const int64_t self = r0 + r;
          scale_row<A>(x, n, P.inv_t);
          if (!along_rows) {  // teacher row i = self: its largest score is at column k*_i
            const int64_t k = R.star[self];
            const A s_star = x[k];
            grad_row<A, false>(P, R, x, self, scale);
            if (k != self) x[k] = star(s_star, self);
          } else {  // student row k = self: the teacher rows whose largest score is at column k
            const int64_t lo = R.by_star_start[self], hi = R.by_star_start[self + 1];
            saved.resize(hi - lo);
            for (int64_t q = lo; q < hi; ++q) saved[q - lo] = x[R.by_star[q]];
            grad_row<A, true>(P, R, x, self, scale);
            for (int64_t q = lo; q < hi; ++q) x[R.by_star[q]] = star(saved[q - lo], R.by_star[q]);
          }
          x[self] = R.gdiag[self] * scale;  // computed in the forward pass, without cancellation
        }
        at::Tensor o = out.narrow(0, r0, nr);
        at::mm_out(o, buf.narrow(0, 0, nr), cols_of);
      }
    });
  };
  phase(v, u, dv, false);
  phase(u, v, du, true);
  return {du, dv};
}

void check_features(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& log_baseline,
                    double alpha, double temperature) {
  TORCH_CHECK_VALUE(student.dim() == 2, "fastdistill::mi_alpha: student must be [N, D], got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "fastdistill::mi_alpha: teacher must match the student's ",
                    student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(0) >= 2, "fastdistill::mi_alpha: needs N >= 2 rows, got ", student.size(0));
  TORCH_CHECK_VALUE(student.size(1) >= 1, "fastdistill::mi_alpha: needs D >= 1 features");
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "fastdistill::mi_alpha: student and teacher "
                   "must share one dtype, got ", student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()), "fastdistill::mi_alpha: student and teacher must be "
                   "floating point, got ", student.scalar_type());
  TORCH_CHECK_VALUE(log_baseline.dim() == 1 && log_baseline.size(0) == student.size(0), "fastdistill::mi_alpha: "
                    "log_baseline must be [N] = [", student.size(0), "], got ", log_baseline.sizes());
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "fastdistill::mi_alpha: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "fastdistill::mi_alpha: temperature must be finite and > 0, got ", temperature);
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> mi_alpha_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                const at::Tensor& log_baseline, double alpha, double temperature) {
  check_features(student, teacher, log_baseline, alpha, temperature);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below (casts, matmuls) are not recorded
  const auto acc = acc_type(student);
  // bf16/fp16 features are widened once (O(N D)); float32/float64 are used in place.
  // detached: parallel_for workers do not inherit the guard above, and out= matmuls refuse grad-requiring inputs
  const at::Tensor u = student.detach().to(acc).contiguous(), v = teacher.detach().to(acc).contiguous();
  const at::Tensor a = log_baseline.to(acc).contiguous();
  if (acc == at::kDouble) return forward_impl<double>(u, v, a, alpha, temperature);
  return forward_impl<float>(u, v, a, alpha, temperature);
}

std::tuple<at::Tensor, at::Tensor> mi_alpha_backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& log_baseline,
                                                         const at::Tensor& stats, double alpha, double temperature) {
  check_features(student, teacher, log_baseline, alpha, temperature);
  TORCH_CHECK_VALUE(grad.numel() == 1, "fastdistill::mi_alpha_backward: grad must be 0-dim");
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kStatsRows && stats.size(1) == student.size(0),
                    "fastdistill::mi_alpha_backward: stats must be [", kStatsRows, ", N], got ", stats.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = acc_type(student);
  // detached: parallel_for workers do not inherit the guard above, and out= matmuls refuse grad-requiring inputs
  const at::Tensor u = student.detach().to(acc).contiguous(), v = teacher.detach().to(acc).contiguous();
  const at::Tensor a = log_baseline.to(acc).contiguous(), st = stats.to(acc).contiguous();
  at::Tensor du, dv;
  if (acc == at::kDouble) std::tie(du, dv) = backward_impl<double>(grad, u, v, a, st, alpha, temperature);
  else std::tie(du, dv) = backward_impl<float>(grad, u, v, a, st, alpha, temperature);
  return {du.to(student.scalar_type()), dv.to(teacher.scalar_type())};
}

}  // namespace
}  // namespace fastdistill

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("mi_alpha", &fastdistill::mi_alpha_cpu);
  m.impl("mi_alpha_backward", &fastdistill::mi_alpha_backward_cpu);
}
