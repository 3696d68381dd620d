// CPU kernel of fastdistill::kd_loss: ATen parallel_for over rows, SIMD (at::vec) inner loops, float32
// accumulation (float64 for float64 inputs), per-element math from csrc/common/kd_math.h.
//
// Per row, with a per-thread scratch of 2K + 3 rows of V floats (the CPU's "on chip": L2/L3 at V = 32k, K = 4):
//   pass 1  read the student and each teacher once from memory, scaled by 1/T into scratch; row maxima and
//           log-sum-exps (ensemble "logit_mean" folds the teachers into one target row here);
//   pass 2  one sweep over scratch: loss terms, the row aggregates the gradients need, and the student gradient
//           itself when it has a closed form (KL) -- otherwise Q * dphi/dQ is parked in scratch;
//   pass 3  only when needed: student gradient from the parked terms (no transcendentals), and teacher gradients
//           (recomputed: co-distillation is the rare case).
// Nothing of size [K, N, V] is allocated; per-row losses are reduced in row order, so results are bitwise
// reproducible for a given thread count and identical across thread counts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>


#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/kd_math.h"
#include "../common/kd_params.h"
#include "../kd_teachers.h"
#include "vec_common.h"

namespace fastdistill {
namespace {

using cpu::empty_for_writing;
using cpu::hmax;
using cpu::hsum;
using cpu::load_scaled;
using cpu::LogNorm;
using cpu::row_log_norm;
using cpu::row_major;
using cpu::RowSum;
using cpu::VecOps;


struct Tensors {
  const void* student;
  int64_t student_stride;
  std::vector<const void*> teachers;
  std::vector<int64_t> teacher_strides;
  const void* teacher_weights;  // [K, N] of A, or null (uniform)
  const int64_t* labels;        // [N] or null
  const void* sample_weight;    // [N] of A, or null
  double denominator;
  void* row_loss;               // [N] of A
  void* grad_student;           // [N, V] contiguous, or null
  std::vector<void*> grad_teachers;  // empty (no teacher's gradient), or K entries, null where not asked for
};

template <typename S, typename T, typename A>
class KDRowKernel {
  using Vec = at::vec::Vectorized<A>;
  using Ops = VecOps<A>;
  static constexpr int64_t W = Vec::size();
  static constexpr int64_t kChunk = 1024;  // elements per chunk: a chunk of every row stays in L1
  static constexpr A kNegInf = -std::numeric_limits<A>::infinity();

 public:
  KDRowKernel(const KDProblem& p, const Tensors& t)
      : p_(p), t_(t), K_(p.teachers), V_(p.vocab), Vp_((p.vocab + W - 1) / W * W),
        chunks_((Vp_ + kChunk - 1) / kChunk), inv_t_(A(1.0 / p.temperature)),
        kd_over_t_(A(p.kd_scale / p.temperature)), ce_(A(p.ce_weight)),
        prm_(make_div_params<A>(p.divergence, p.div_params, divergence_param_count(p.divergence))),
        // One target built from the teachers (a mixture or a log-linear pool) vs. one target per teacher.
        per_teacher_(p.ensemble == Ensemble::LossMean && p.teachers > 1),
        log_linear_(p.ensemble == Ensemble::LogitMean && p.teachers > 1),
        mixture_(!per_teacher_ && !log_linear_ && p.teachers > 1),
        // For KL sum_v gq_v = -sum_v P_v = -1 (also for "loss_mean": sum_k w_k (-1)).
        closed_form_(student_aggregate_is_minus_one(p.divergence)), kd_on_(p.kd_scale != 0),
        R_(log_linear_ ? 2 : p.teachers + 1) {}

  // x (scaled logits) and e (exp(x - chunk max)) for R distributions, a gradient row, the raw student row (for
  // the cross-entropy at T = 1 when T != 1), the chunk maxima.
  int64_t scratch_size() const { return (2 * R_ + 2) * Vp_ + R_ * chunks_; }

  void row(int64_t i, A* scratch) const {
    Row r;
    r.x = scratch;
    r.e = r.x + R_ * Vp_;
    A* gbuf = r.e + R_ * Vp_;
    A* raw = gbuf + Vp_;
    r.cmax = raw + Vp_;
    A* row_loss = static_cast<A*>(t_.row_loss);
    S* gs_out = t_.grad_student ? static_cast<S*>(t_.grad_student) + i * V_ : nullptr;

    const int64_t label = t_.labels ? t_.labels[i] : p_.ignore_index - 1;
    const bool ignored = t_.labels && label == p_.ignore_index;
    const A sw = t_.sample_weight ? static_cast<const A*>(t_.sample_weight)[i] : A(1);
    if (ignored || sw == A(0)) {  // skipped row: no loss, zero gradient (0 * inf would be nan)
      row_loss[i] = A(0);
      zero_grads(i);
      return;
    }
    if (ce_ != A(0)) {
      TORCH_CHECK_VALUE(label >= 0 && label < V_, "labels[", i, "] = ", label, " is out of range [0, ", V_,
                        ") and is not ignore_index (", p_.ignore_index, ")");
    }
    // The gradient of this row's contribution to the returned loss is `f` times d(l_i)/d(logits).
    const A f = static_cast<A>(sw / (p_.reduce ? t_.denominator : 1.0));

    // ---- pass 1: read every input row once; normalisers ------------------------------------------------
    const S* s_row = static_cast<const S*>(t_.student) + i * t_.student_stride;
    // Cross-entropy is at T = 1: its normaliser differs from the student's unless T = 1. It is that of x * T, the
    // raw logits exactly when T is a power of two; for other T, of the raw logits kept in `raw` (x * T would carry
    // the rounding of x = s / T: 1e-3 of the loss for logits around 1e4).
    const bool ce_at_t = p_.temperature == 1.0;
    const bool ce_raw = ce_ != A(0) && !ce_at_t && !cpu::is_power_of_two(p_.temperature);
    if (ce_raw) {
      cpu::load_scaled_and_raw(s_row, r.x, raw, V_, Vp_, inv_t_);
    } else {
      load_scaled(s_row, r.x, V_, Vp_, inv_t_);
    }
    normalise(r, 0);
    const A* ce_x = ce_raw ? raw : r.x;
    const A ce_scale = ce_raw ? A(1) : A(p_.temperature);
    const LogNorm<A> ce_norm = ce_ == A(0) || ce_at_t ? LogNorm<A>{r.rowmax[0], r.logsum[0]}
                                                      : row_log_norm(ce_x, Vp_, ce_scale);

    std::vector<A> wbuf(2 * K_);
    r.w = wbuf.data();
    r.logw = r.w + K_;
    for (int k = 0; k < K_; ++k) {
      r.w[k] = t_.teacher_weights ? static_cast<const A*>(t_.teacher_weights)[k * p_.rows + i] : A(1) / A(K_);
      r.logw[k] = std::log(r.w[k]);
    }
    if (log_linear_) {
      // target = sum_k w_k t_k / T; teachers with weight 0 are skipped (0 * -inf would be nan)
      A* target = r.x + Vp_;
      std::fill(target, target + Vp_, A(0));
      for (int k = 0; k < K_; ++k) {
        if (r.w[k] == A(0)) continue;  // dropped, whatever its logits (NaN included)
        load_scaled(teacher_row(k, i), gbuf, V_, Vp_, inv_t_);
        const Vec vw(r.w[k]);
        for (int64_t j = 0; j < Vp_; j += W) (Vec::loadu(target + j) + vw * Vec::loadu(gbuf + j)).store(target + j);
      }
      for (int64_t j = V_; j < Vp_; ++j) target[j] = kNegInf;
      normalise(r, 1);
    } else {
      for (int k = 0; k < K_; ++k) {
        if (r.w[k] == A(0)) {  // the row's weights exclude this teacher: P_k = 0 everywhere, whatever its logits
          drop(r, k + 1);
          continue;
        }
        load_scaled(teacher_row(k, i), r.x + (k + 1) * Vp_, V_, Vp_, inv_t_);
        normalise(r, k + 1);
      }
    }

    // ---- pass 2: loss and aggregates --------------------------------------------------------------------
    const bool want_gs = gs_out != nullptr;
    const bool want_gt = !t_.grad_teachers.empty() && kd_on_;
    A* gdst = nullptr;  // where pass 2 writes the student gradient (closed form) or its terms
    if (want_gs) gdst = (closed_form_ && std::is_same_v<S, A>) ? reinterpret_cast<A*>(gs_out) : gbuf;
    std::vector<RowSum<A>> agg_t(want_gt ? K_ : 0);  // per-teacher aggregates for their gradients
    RowSum<A> v_phi, v_gq;
    const Vec v_ce_max(ce_norm.max), v_ce_log_sum(ce_norm.log_sum), v_ce_scale(ce_scale), v_ce(ce_), v_f(f),
        v_kd_over_t(kd_over_t_);
    for_each_vector(r, [&](int64_t j, const A* fac) {
      Elem el = element(r, j, fac);
      Vec phi, gq;
      evaluate(r, el, phi, gq, want_gt ? agg_t.data() : nullptr);
      v_phi.add(phi);
      if (!want_gs) return;
      if (closed_form_) {  // dD/da = Q - P, here -gq = P
        Vec g = kd_on_ ? v_kd_over_t * (el.q + gq) : Vec(A(0));
        if (ce_ != A(0)) g += v_ce * (ce_at_t ? el.q : ce_softmax(ce_x, j, v_ce_scale, v_ce_max, v_ce_log_sum));
        // the output row is not padded: store only its V - j remaining lanes
        (v_f * g).store(gdst + j, static_cast<int>(std::min<int64_t>(W, V_ - j)));
      } else {
        v_gq.add(gq);
        gq.store(gdst + j);
      }
    });
    const A D = v_phi.sum();
    A ce_loss = 0;
    if (ce_ != A(0)) ce_loss = (ce_norm.max - static_cast<A>(s_row[label])) + ce_norm.log_sum;
    // kd_scale = 0 (ce_weight = 1) is pure cross-entropy, even where D = inf
    row_loss[i] = sw * ((kd_on_ ? A(p_.kd_scale) * D : A(0)) + ce_ * ce_loss);

    // ---- pass 3: gradients not written yet (no transcendentals but for CE at T != 1) -------------------
    if (want_gs) {
      if (!closed_form_) {
        const Vec v_agg(v_gq.sum());
        for_each_vector(r, [&](int64_t j, const A* fac) {
          const Vec q = Vec::loadu(r.e + j) * Vec(fac[0]);
          Vec g = kd_on_ ? v_kd_over_t * (Vec::loadu(gbuf + j) - q * v_agg) : Vec(A(0));
          if (ce_ != A(0)) g += v_ce * (ce_at_t ? q : ce_softmax(ce_x, j, v_ce_scale, v_ce_max, v_ce_log_sum));
          (v_f * g).store(gbuf + j);
        });
      }
      if (ce_ != A(0)) gdst[label] -= f * ce_;
      if (gdst != reinterpret_cast<A*>(gs_out)) at::vec::convert(gdst, gs_out, V_);
    }
    if (want_gt) {
      teacher_grads(i, r, agg_t, f, gbuf);
    } else if (!t_.grad_teachers.empty()) {  // kd_scale = 0: the teachers do not enter the loss
      for (void* g : t_.grad_teachers)
        if (g) std::fill_n(static_cast<T*>(g) + i * V_, V_, T(0));
    }
  }

 private:
  static constexpr int kMaxRows = 17;  // student + up to 16 teachers (checked in kd_loss_cpu)

  // Per-row state: R distributions (0: student; then the teachers, or the pooled target for logit_mean).
  struct Row {
    A* x;     // [R, Vp] logits / T, -inf padded
    A* e;     // [R, Vp] exp(x - max of its chunk)
    A* cmax;  // [R, chunks] chunk maxima
    // softmax = exp(x - rowmax) * inv_sum, log softmax = (x - rowmax) - logsum (split: see cpu::LogNorm)
    A rowmax[kMaxRows], logsum[kMaxRows], inv_sum[kMaxRows];
    A* w;     // [K] teacher weights of this row
    A* logw;
  };

  // One element vector: the student's Q, log Q.
  struct Elem {
    int64_t j;
    const A* fac;  // per distribution: exp(chunk max - row max) / sum, so P = e * fac
    Vec q, logq;
  };

  const T* teacher_row(int k, int64_t i) const {
    return static_cast<const T*>(t_.teachers[k]) + i * t_.teacher_strides[k];
  }

  // Chunk maxima, exponentials and log-sum-exp of distribution d (x already loaded). One exp per element. A NaN
  // anywhere in the row (a NaN or +inf logit) makes its normaliser NaN, and so every P, log P of the row; a row
  // with no finite logit has no distribution: NaN too (never an error: a GPU kernel could not raise one).
  void normalise(Row& r, int d) const {
    A* x = r.x + d * Vp_;
    A* e = r.e + d * Vp_;
    A m = kNegInf, s = 0;
    for (int64_t c = 0; c < chunks_; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(Vp_, lo + kChunk);
      Vec vm(kNegInf);
      for (int64_t j = lo; j < hi; j += W) vm = at::vec::maximum(vm, Vec::loadu(x + j));
      const A mc = hmax(vm);
      r.cmax[d * chunks_ + c] = mc;
      if (mc == kNegInf) {  // an all -inf chunk (padded vocabulary): no mass
        std::fill(e + lo, e + hi, A(0));
        continue;
      }
      Vec vs(A(0));
      const Vec vmc(mc);
      for (int64_t j = lo; j < hi; j += W) {
        const Vec ej = Ops::exp(Vec::loadu(x + j) - vmc);
        ej.store(e + j);
        vs += ej;
      }
      const A sc = hsum(vs);
      if (mc > m || mc != mc) {  // a NaN chunk maximum becomes the row's (then every later merge is NaN)
        s = s * std::exp(m - mc) + sc;
        m = mc;
      } else {
        s += sc * std::exp(mc - m);
      }
    }
    const A nan = std::numeric_limits<A>::quiet_NaN();
    r.rowmax[d] = m == kNegInf ? nan : m;
    r.logsum[d] = m == kNegInf ? nan : std::log(s);
    r.inv_sum[d] = m == kNegInf ? nan : A(1) / s;
  }

  // Distribution d excluded from this row (a teacher of weight 0): P = 0 and log P = -inf everywhere, without
  // reading its logits. The scratch is overwritten: it may hold the previous row's values.
  void drop(Row& r, int d) const {
    std::fill_n(r.x + d * Vp_, Vp_, kNegInf);
    std::fill_n(r.e + d * Vp_, Vp_, A(0));
    std::fill_n(r.cmax + d * chunks_, chunks_, kNegInf);
    r.rowmax[d] = r.logsum[d] = r.inv_sum[d] = A(0);
  }

  // softmax at T = 1 of the logits x * scale (the student's cross-entropy term), from their split normaliser
  static Vec ce_softmax(const A* x, int64_t j, const Vec& scale, const Vec& max, const Vec& log_sum) {
    return Ops::exp((Vec::loadu(x + j) * scale - max) - log_sum);
  }

  // Visit every vector of the padded row, chunk by chunk, with the chunk's softmax factors.
  template <class F>
  void for_each_vector(const Row& r, F&& fn) const {
    A fac[kMaxRows];
    for (int64_t c = 0; c < chunks_; ++c) {
      for (int d = 0; d < R_; ++d) {
        const A mc = r.cmax[d * chunks_ + c];
        // dividing by the sum (not exp(-log sum)) keeps P and Q normalised to the last bit for tiny V; an all -inf
        // chunk has no mass (0 * inv_sum: still NaN when the row has no distribution)
        fac[d] = mc == kNegInf ? A(0) * r.inv_sum[d] : std::exp(mc - r.rowmax[d]) * r.inv_sum[d];
      }
      const int64_t lo = c * kChunk, hi = std::min(Vp_, lo + kChunk);
      for (int64_t j = lo; j < hi; j += W) fn(j, fac);
    }
  }

  Elem element(const Row& r, int64_t j, const A* fac) const {
    Elem el;
    el.j = j;
    el.fac = fac;
    el.logq = (Vec::loadu(r.x + j) - Vec(r.rowmax[0])) - Vec(r.logsum[0]);
    el.q = Vec::loadu(r.e + j) * Vec(fac[0]);
    return el;
  }

  // Distribution d (1-based among targets) at the element: P and log P.
  void dist(const Row& r, const Elem& el, int d, Vec& p, Vec& logp) const {
    p = Vec::loadu(r.e + d * Vp_ + el.j) * Vec(el.fac[d]);
    logp = (Vec::loadu(r.x + d * Vp_ + el.j) - Vec(r.rowmax[d])) - Vec(r.logsum[d]);
  }

  // The single target of this row at the element: log P and P.
  void single_target(const Row& r, const Elem& el, Vec& logp, Vec& p) const {
    if (!mixture_) {
      dist(r, el, 1, p, logp);
      return;
    }
    // Mixture: P = sum_k w_k P_k. log P = log(P) is exact unless P underflows; those lanes are recomputed
    // as a log-sum-exp over the teachers (SPEC: never the log of an underflowed sum).
    p = Vec(A(0));
    for (int k = 0; k < K_; ++k) {
      p += Vec::loadu(r.e + (k + 1) * Vp_ + el.j) * Vec(el.fac[k + 1] * r.w[k]);
    }
    logp = p.log();
    const Vec small = p < Vec(std::numeric_limits<A>::min() * A(1024));  // all-ones lanes where true
    if (small.zero_mask() != (1 << W) - 1) {
      Vec m(kNegInf);
      for (int k = 0; k < K_; ++k) m = at::vec::maximum(m, lpk(r, el, k));
      Vec s(A(0));
      for (int k = 0; k < K_; ++k) s += Ops::exp(lpk(r, el, k) - m);
      const Vec exact = Ops::where_neginf(m, m, m + s.log());
      logp = Vec::blendv(logp, exact, small);
    }
  }

  Vec lpk(const Row& r, const Elem& el, int k) const {  // log(w_k P_k)
    return (Vec::loadu(r.x + (k + 1) * Vp_ + el.j) - Vec(r.rowmax[k + 1])) - Vec(r.logsum[k + 1] - r.logw[k]);
  }

  // Loss terms at the element. phi and gq are the ensemble-combined values. When `agg` is given, adds the
  // per-teacher aggregates the teacher gradients need (see teacher_grads).
  void evaluate(const Row& r, const Elem& el, Vec& phi, Vec& gq, RowSum<A>* agg) const {
    if (per_teacher_) {  // D = sum_k w_k D(P_k, Q)
      phi = Vec(A(0));
      gq = Vec(A(0));
      for (int k = 0; k < K_; ++k) {
        if (r.w[k] == A(0)) continue;  // a dropped teacher (0 * inf would be nan)
        Vec p, logp;
        dist(r, el, k + 1, p, logp);
        const auto tr = divergence_terms<Ops>(prm_, p, el.q, logp, el.logq);
        const Vec wk(r.w[k]);
        phi += wk * tr.phi;
        gq += wk * tr.gq;
        if (agg) agg[k].add(tr.hp);
      }
      return;
    }
    Vec logp, p;
    single_target(r, el, logp, p);
    const auto tr = divergence_terms<Ops>(prm_, p, el.q, logp, el.logq);
    phi = tr.phi;
    gq = tr.gq;
    if (!agg) return;
    if (!mixture_) {
      agg[0].add(tr.hp);
    } else {
      for (int k = 0; k < K_; ++k) agg[k].add(responsibility(r, el, k, logp) * tr.hp);
    }
  }

  // r_k = w_k P_k / P, in log space: both may underflow where the ratio is O(1) (logits of magnitude 1e4).
  Vec responsibility(const Row& r, const Elem& el, int k, const Vec& logp) const {
    return Ops::where_neginf(logp, Vec(A(0)), Ops::exp(lpk(r, el, k) - logp));
  }

  // dD/d(teacher k logits / T):
  //   single teacher or logit_mean:  w_k (hp_j - P_j sum_v hp_v)
  //   prob_mean:                     r_kj hp_j - P_kj sum_v r_kv hp_v     (r_k = w_k P_k / P)
  //   loss_mean:                     w_k (hp_kj - P_kj sum_v hp_kv)
  void teacher_grads(int64_t i, const Row& r, std::vector<RowSum<A>>& agg_v, A f, A* buf) const {
    std::vector<A> agg(K_);
    for (int k = 0; k < K_; ++k) agg[k] = agg_v[k].sum();
    const Vec scale(f * kd_over_t_);
    for (int k = 0; k < K_; ++k) {
      if (!t_.grad_teachers[k]) continue;  // not asked for
      T* out = static_cast<T*>(t_.grad_teachers[k]) + i * V_;
      if (r.w[k] == A(0)) {  // a teacher with weight 0 does not enter this row's loss
        std::fill_n(out, V_, T(0));
        continue;
      }
      const Vec vagg(agg[mixture_ || per_teacher_ ? k : 0]);
      const Vec wk(r.w[k]);
      for_each_vector(r, [&](int64_t j, const A* fac) {
        const Elem el = element(r, j, fac);
        Vec g;
        if (per_teacher_) {
          Vec p, logp;
          dist(r, el, k + 1, p, logp);
          const auto tr = divergence_terms<Ops>(prm_, p, el.q, logp, el.logq);
          g = wk * (tr.hp - p * vagg);
        } else {
          Vec logp, p;
          single_target(r, el, logp, p);
          const auto tr = divergence_terms<Ops>(prm_, p, el.q, logp, el.logq);
          if (!mixture_) {
            g = wk * (tr.hp - p * vagg);
          } else {
            Vec pk, logpk;  // unweighted P_k
            dist(r, el, k + 1, pk, logpk);
            g = responsibility(r, el, k, logp) * tr.hp - pk * vagg;
          }
        }
        (scale * g).store(buf + j);
      });
      at::vec::convert(buf, out, V_);
    }
  }

  void zero_grads(int64_t i) const {
    if (t_.grad_student) std::fill_n(static_cast<S*>(t_.grad_student) + i * V_, V_, S(0));
    for (void* g : t_.grad_teachers)
      if (g) std::fill_n(static_cast<T*>(g) + i * V_, V_, T(0));
  }

  const KDProblem& p_;
  const Tensors& t_;
  const int K_;
  const int64_t V_, Vp_, chunks_;
  const A inv_t_, kd_over_t_, ce_;
  const DivParams<A> prm_;
  const bool per_teacher_, log_linear_, mixture_, closed_form_, kd_on_;
  const int R_;
};

template <typename S, typename T, typename A>
void run_rows(const KDProblem& p, const Tensors& t) {
  const KDRowKernel<S, T, A> kernel(p, t);
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(kernel.scratch_size());
    for (int64_t i = begin; i < end; ++i) kernel.row(i, scratch.data());
  });
}

template <typename S, typename A>
void dispatch_teacher(at::ScalarType teacher_dtype, const KDProblem& p, const Tensors& t) {
  if constexpr (std::is_same_v<A, double>) {
    TORCH_CHECK_TYPE(teacher_dtype == at::kDouble, "fastdistill cpu: float64 student needs float64 teachers");
    run_rows<S, double, double>(p, t);
  } else {
    switch (teacher_dtype) {
      case at::kFloat: return run_rows<S, float, float>(p, t);
      case at::kBFloat16: return run_rows<S, c10::BFloat16, float>(p, t);
      case at::kHalf: return run_rows<S, c10::Half, float>(p, t);
      default: TORCH_CHECK_TYPE(false, "fastdistill cpu: unsupported teacher dtype ", teacher_dtype);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> kd_loss_cpu(
    const at::Tensor& student, at::TensorList teachers, const std::optional<at::Tensor>& teacher_weights,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& denominator, c10::string_view divergence, c10::string_view ensemble,
    double temperature, double kd_scale, double ce_weight, at::ArrayRef<double> div_params, int64_t ignore_index,
    bool reduce, bool grad_student, int64_t grad_teachers) {
  TORCH_CHECK_VALUE(student.dim() == 2, "fastdistill::kd_loss: student must be [N, V], got ", student.sizes());
  const KDTeachers teacher_rows = kd_teachers(teachers, student, 16, "cpu");
  KDProblem p;
  try {
    p = make_kd_problem(student.size(0), student.size(1), static_cast<int32_t>(teacher_rows.rows.size()),
                        std::string(divergence), std::string(ensemble), div_params, temperature, kd_scale, ce_weight,
                        ignore_index, reduce);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }

  const at::Tensor s = row_major(student);
  const auto teacher_dtype = teacher_rows.rows[0].scalar_type();
  std::vector<at::Tensor> ts;
  for (const auto& x : teacher_rows.rows) ts.push_back(row_major(x));
  const bool f64 = s.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const auto opts = student.options().dtype(acc);

  Tensors t;
  t.student = s.data_ptr();
  t.student_stride = s.stride(0);
  for (const auto& x : ts) {
    t.teachers.push_back(x.data_ptr());
    t.teacher_strides.push_back(x.stride(0));
  }
  at::Tensor tw, lab, sw;
  if (teacher_weights) {
    tw = teacher_weights->to(acc).contiguous();
    TORCH_CHECK_VALUE(tw.dim() == 2 && tw.size(0) == p.teachers && tw.size(1) == p.rows,
                      "teacher_weights must be [K, N] = [", p.teachers, ", ", p.rows, "], got ", tw.sizes());
  }
  if (labels) {
    lab = labels->contiguous();
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, "labels must be int64");
    TORCH_CHECK_VALUE(lab.numel() == p.rows, "labels must have N = ", p.rows, " elements");
  }
  TORCH_CHECK_VALUE(ce_weight == 0 || labels, "ce_weight > 0 needs labels");
  if (sample_weight) {
    sw = sample_weight->to(acc).contiguous();
    TORCH_CHECK_VALUE(sw.numel() == p.rows, "sample_weight must have N = ", p.rows, " elements");
  }
  t.teacher_weights = teacher_weights ? tw.data_ptr() : nullptr;
  t.labels = labels ? lab.data_ptr<int64_t>() : nullptr;
  t.sample_weight = sample_weight ? sw.data_ptr() : nullptr;
  t.denominator = denominator ? denominator->item<double>() : 1.0;

  at::Tensor row_loss = at::empty({p.rows}, opts);
  at::Tensor gs =
      grad_student ? empty_for_writing({p.rows, p.vocab}, student.options()) : at::empty({0}, student.options());
  std::vector<void*> gt_ptrs;
  const std::vector<at::Tensor> gt = kd_teacher_gradients(
      teacher_rows, grad_teachers,
      [](at::IntArrayRef sizes, const at::TensorOptions& o) { return empty_for_writing(sizes, o); }, gt_ptrs);
  t.row_loss = row_loss.data_ptr();
  t.grad_student = grad_student ? gs.data_ptr() : nullptr;
  if (grad_teachers != 0) t.grad_teachers = gt_ptrs;  // K entries, null for a teacher whose gradient is not asked for

  if (p.rows > 0 && p.vocab > 0) {
    switch (s.scalar_type()) {
      case at::kFloat: dispatch_teacher<float, float>(teacher_dtype, p, t); break;
      case at::kBFloat16: dispatch_teacher<c10::BFloat16, float>(teacher_dtype, p, t); break;
      case at::kHalf: dispatch_teacher<c10::Half, float>(teacher_dtype, p, t); break;
      case at::kDouble: dispatch_teacher<double, double>(teacher_dtype, p, t); break;
      default: TORCH_CHECK_TYPE(false, "fastdistill cpu: unsupported student dtype ", s.scalar_type());
    }
  }
  if (!reduce) return {row_loss, gs, gt};
  const double total = cpu::ordered_sum(row_loss);  // fixed order: bitwise reproducible
  return {at::scalar_tensor(total / t.denominator, opts), gs, gt};
}

}  // namespace
}  // namespace fastdistill

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("kd_loss", &fastdistill::kd_loss_cpu); }
