// CPU kernel of fastdistill::codistill_loss: two models distil into each other from one read of both logit rows.
//
// Two kd_loss calls (a learns from b, b learns from a) read both rows twice, normalise both twice and run the
// hard-label cross-entropy separately; here, per row, with a per-thread scratch of 6 rows of V floats:
//   pass 1  read a and b once, scaled by 1/T; row maxima, exp(x - max) kept in scratch, log-sum-exps;
//   pass 2  one sweep: both divergences D(P_a, Q_b) and D(P_b, Q_a) (csrc/common/kd_math.h, the other model's
//           distribution a constant) and, for KL, both gradients in closed form (Q - P), plus the cross-entropy;
//   pass 3  other divergences only: the gradients from the terms parked in pass 2 (no transcendentals).
// Per-row losses are reduced in row order: bitwise reproducible whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/kd_math.h"
#include "../common/kd_params.h"
#include "vec_common.h"

namespace fastdistill {
namespace {

using cpu::VecOps;

struct CoProblem {
  int64_t rows = 0, vocab = 0;
  Divergence divergence = Divergence::KL;
  double temperature = 1.0;
  double kd_ab = 0, kd_ba = 0;  // kd_scale * weight: a -> b (in loss_b), b -> a (in loss_a)
  double hard_a = 0, hard_b = 0;
  double div_params[kMaxDivParams] = {};  // the divergence's parameters (kd_math.h's table)
  int64_t ignore_index = -100;
  bool reduce = true;
  double denominator = 1.0;
};

struct CoTensors {
  const void* x[2];      // a, b: [N, V] rows of unit stride
  int64_t stride[2];
  const int64_t* labels;  // [N] or null
  const void* sample_weight;  // [N] of A, or null
  void* row_loss[2];     // [N] of A
  void* grad[2];         // [N, V] contiguous, or null when not requested
};

template <typename S, typename A>
class CoRowKernel {
  using Vec = at::vec::Vectorized<A>;
  using Ops = VecOps<A>;
  static constexpr int64_t W = Vec::size();
  static constexpr A kNegInf = -std::numeric_limits<A>::infinity();

 public:
  CoRowKernel(const CoProblem& p, const CoTensors& t)
      : p_(p), t_(t), V_(p.vocab), Vp_((p.vocab + W - 1) / W * W), inv_t_(A(1.0 / p.temperature)),
        prm_(make_div_params<A>(p.divergence, p.div_params, divergence_param_count(p.divergence))),
        closed_form_(student_aggregate_is_minus_one(p.divergence)) {
    // side m learns from the other side with kd_[m]: loss_a has kd_ba, loss_b has kd_ab
    kd_[0] = A(p.kd_ba);
    kd_[1] = A(p.kd_ab);
    hard_[0] = A(p.hard_a);
    hard_[1] = A(p.hard_b);
  }

  // x (scaled logits), e (exp(x - max)), a gradient row and the raw logits (cross-entropy at T = 1), per model.
  int64_t scratch_size() const { return 8 * Vp_; }

  void row(int64_t i, A* scratch) const {
    Side s[2];
    for (int m = 0; m < 2; ++m) {
      s[m].x = scratch + (4 * m) * Vp_;
      s[m].e = s[m].x + Vp_;
      s[m].g = s[m].e + Vp_;
      s[m].raw = s[m].g + Vp_;
    }
    const int64_t label = t_.labels ? t_.labels[i] : p_.ignore_index - 1;
    const bool ignored = t_.labels && label == p_.ignore_index;
    const A sw = t_.sample_weight ? static_cast<const A*>(t_.sample_weight)[i] : A(1);
    if (ignored || sw == A(0)) {  // skipped row: no loss, zero gradients (0 * inf would be nan)
      for (int m = 0; m < 2; ++m) {
        static_cast<A*>(t_.row_loss[m])[i] = A(0);
        if (t_.grad[m]) std::fill_n(static_cast<S*>(t_.grad[m]) + i * V_, V_, S(0));
      }
      return;
    }
    if (hard_[0] != A(0) || hard_[1] != A(0)) {
      TORCH_CHECK_VALUE(label >= 0 && label < V_, "labels[", i, "] = ", label, " is out of range [0, ", V_,
                        ") and is not ignore_index (", p_.ignore_index, ")");
    }
    const A f = static_cast<A>(sw / (p_.reduce ? p_.denominator : 1.0));

    // ---- pass 1: read both rows once; normalisers --------------------------------------------------------
    const bool ce_at_t = p_.temperature == 1.0;
    for (int m = 0; m < 2; ++m) {
      const S* src = static_cast<const S*>(t_.x[m]) + i * t_.stride[m];
      // cross-entropy is at T = 1: its normaliser differs unless T = 1; that of x * T, the raw logits exactly when T
      // is a power of two, else of the raw logits kept in `raw` (x * T would carry the rounding of x = s / T)
      const bool ce_raw = hard_[m] != A(0) && !ce_at_t && !cpu::is_power_of_two(p_.temperature);
      if (ce_raw) {
        cpu::load_scaled_and_raw(src, s[m].x, s[m].raw, V_, Vp_, inv_t_);
      } else {
        cpu::load_scaled(src, s[m].x, V_, Vp_, inv_t_);
      }
      normalise(s[m]);
      s[m].ce_x = ce_raw ? s[m].raw : s[m].x;
      s[m].ce_scale = ce_raw ? A(1) : A(p_.temperature);
      s[m].ce_norm = hard_[m] == A(0) || ce_at_t ? s[m].norm : cpu::row_log_norm(s[m].ce_x, Vp_, s[m].ce_scale);
      s[m].ce = hard_[m] == A(0) ? A(0) : (s[m].ce_norm.max - static_cast<A>(src[label])) + s[m].ce_norm.log_sum;
      s[m].out = t_.grad[m] ? static_cast<S*>(t_.grad[m]) + i * V_ : nullptr;
      // KL's gradient is final after pass 2: write it straight to the output when no conversion is needed
      s[m].gdst = s[m].out && closed_form_ && std::is_same_v<S, A> ? reinterpret_cast<A*>(s[m].out) : s[m].g;
    }

    // ---- pass 2: both divergences, their aggregates; KL gradients ---------------------------------------
    cpu::RowSum<A> v_phi[2], v_agg[2];
    const Vec v_f(f);
    for (int64_t j = 0; j < Vp_; j += W) {
      Vec pr[2], logpr[2];
      for (int m = 0; m < 2; ++m) {
        pr[m] = Vec::loadu(s[m].e + j) * Vec(s[m].inv_sum);
        logpr[m] = (Vec::loadu(s[m].x + j) - Vec(s[m].norm.max)) - Vec(s[m].norm.log_sum);
      }
      for (int m = 0; m < 2; ++m) {  // model m learns from model o
        const int o = 1 - m;
        Vec gq(A(0));
        if (kd_[m] != A(0)) {
          const auto tr = divergence_terms<Ops>(prm_, pr[o], pr[m], logpr[o], logpr[m]);
          v_phi[m].add(tr.phi);
          gq = tr.gq;
        }
        if (!s[m].out) continue;
        if (!closed_form_) {  // park Q * dphi/dQ for pass 3
          v_agg[m].add(gq);
          gq.store(s[m].g + j);
          continue;
        }
        // dD/d(logits / T) = Q - P = Q + gq for KL
        Vec g = kd_[m] != A(0) ? Vec(kd_[m] * inv_t_) * (pr[m] + gq) : Vec(A(0));
        if (hard_[m] != A(0)) g += Vec(hard_[m]) * ce_softmax(s[m], j, pr[m], ce_at_t);
        (v_f * g).store(s[m].gdst + j, static_cast<int>(std::min<int64_t>(W, V_ - j)));
      }
    }

    // ---- pass 3 (divergences without a closed form) and the outputs ------------------------------------
    for (int m = 0; m < 2; ++m) {
      const A D = sum_or_zero(v_phi[m], kd_[m]);
      static_cast<A*>(t_.row_loss[m])[i] = sw * (kd_[m] * D + hard_[m] * s[m].ce);
      if (!s[m].out) continue;
      if (!closed_form_) {
        const Vec agg(v_agg[m].sum()), scale(kd_[m] * inv_t_);
        for (int64_t j = 0; j < Vp_; j += W) {
          const Vec q = Vec::loadu(s[m].e + j) * Vec(s[m].inv_sum);
          Vec g = kd_[m] != A(0) ? scale * (Vec::loadu(s[m].g + j) - q * agg) : Vec(A(0));
          if (hard_[m] != A(0)) g += Vec(hard_[m]) * ce_softmax(s[m], j, q, ce_at_t);
          (v_f * g).store(s[m].g + j);
        }
      }
      if (hard_[m] != A(0)) s[m].gdst[label] -= f * hard_[m];
      if (s[m].gdst != reinterpret_cast<A*>(s[m].out)) at::vec::convert(s[m].gdst, s[m].out, V_);
    }
  }

 private:
  struct Side {
    A* x;  // [Vp] logits / T, -inf padded
    A* e;  // [Vp] exp(x - max)
    A* g;  // [Vp] gradient (or parked terms)
    A* raw;  // [Vp] raw logits, -inf padded (only for the cross-entropy when T != 1)
    cpu::LogNorm<A> norm;  // of x: log softmax = (x - max) - log_sum
    A inv_sum;
    const A* ce_x;  // the cross-entropy's logits are ce_x * ce_scale (x * T, or raw), with their normaliser
    A ce_scale;
    cpu::LogNorm<A> ce_norm;
    A ce;
    S* out;   // this row of the gradient output, or null
    A* gdst;  // where the gradient is assembled: out itself, or g
  };

  // exp(x - max) and the split log-sum-exp of a loaded row. One exp per element. NaN for a row with a NaN (or
  // +inf) logit, or with no finite logit (no distribution; never an error: a GPU kernel could not raise one).
  void normalise(Side& s) const {
    const A mx = cpu::row_max(s.x, Vp_);
    if (mx == kNegInf) {
      const A nan = std::numeric_limits<A>::quiet_NaN();
      s.norm = {nan, nan};
      s.inv_sum = nan;
      return;
    }
    const Vec vmx(mx);
    cpu::RowSum<A> vs;
    for (int64_t j = 0; j < Vp_; j += W) {
      const Vec ej = Ops::exp(Vec::loadu(s.x + j) - vmx);
      ej.store(s.e + j);
      vs.add(ej);
    }
    const A sum = vs.sum();
    s.norm = {mx, std::log(sum)};
    s.inv_sum = A(1) / sum;  // dividing by the sum keeps the distribution normalised to the last bit
  }

  // softmax of the logits at T = 1: the temperature-T distribution itself when T = 1.
  Vec ce_softmax(const Side& s, int64_t j, const Vec& q_t, bool ce_at_t) const {
    return ce_at_t ? q_t
                   : Ops::exp((Vec::loadu(s.ce_x + j) * Vec(s.ce_scale) - Vec(s.ce_norm.max)) - Vec(s.ce_norm.log_sum));
  }

  // A direction with weight 0 does not enter the loss, even where its divergence is inf.
  static A sum_or_zero(cpu::RowSum<A>& v, A weight) { return weight == A(0) ? A(0) : v.sum(); }

  const CoProblem& p_;
  const CoTensors& t_;
  const int64_t V_, Vp_;
  const A inv_t_;
  const DivParams<A> prm_;
  const bool closed_form_;
  A kd_[2], hard_[2];
};

template <typename S, typename A>
void run_rows(const CoProblem& p, const CoTensors& t) {
  const CoRowKernel<S, A> kernel(p, t);
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(kernel.scratch_size());
    for (int64_t i = begin; i < end; ++i) kernel.row(i, scratch.data());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> codistill_loss_cpu(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& sample_weight, const std::optional<at::Tensor>& denominator,
    c10::string_view divergence, double temperature, double kd_scale, double weight_ab, double weight_ba,
    double hard_a, double hard_b, at::ArrayRef<double> div_params, int64_t ignore_index, bool reduce, bool grad_a,
    bool grad_b) {
  TORCH_CHECK_VALUE(a.dim() == 2, "fastdistill::codistill_loss: a must be [N, V], got ", a.sizes());
  TORCH_CHECK_VALUE(b.sizes() == a.sizes(), "fastdistill::codistill_loss: b has shape ", b.sizes(),
                    ", expected ", a.sizes(), " like a");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "fastdistill::codistill_loss: a and b must share a dtype");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0");
  CoProblem p;
  try {
    p.divergence = parse_divergence(std::string(divergence));
    parse_div_params(p.divergence, div_params, p.div_params);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  p.rows = a.size(0);
  p.vocab = a.size(1);
  p.temperature = temperature;
  p.kd_ab = kd_scale * weight_ab;
  p.kd_ba = kd_scale * weight_ba;
  p.hard_a = hard_a;
  p.hard_b = hard_b;
  p.ignore_index = ignore_index;
  p.reduce = reduce;
  p.denominator = denominator ? denominator->item<double>() : 1.0;

  const at::Tensor x[2] = {cpu::row_major(a), cpu::row_major(b)};
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = a.options().dtype(acc);
  CoTensors t;
  for (int m = 0; m < 2; ++m) {
    t.x[m] = x[m].data_ptr();
    t.stride[m] = x[m].stride(0);
  }
  at::Tensor lab, sw;
  if (labels) {
    lab = labels->contiguous();
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, "labels must be int64");
    TORCH_CHECK_VALUE(lab.numel() == p.rows, "labels must have N = ", p.rows, " elements");
  }
  TORCH_CHECK_VALUE((hard_a == 0 && hard_b == 0) || labels, "a hard-label weight > 0 needs labels");
  if (sample_weight) {
    sw = sample_weight->to(acc).contiguous();
    TORCH_CHECK_VALUE(sw.numel() == p.rows, "sample_weight must have N = ", p.rows, " elements");
  }
  t.labels = labels ? lab.data_ptr<int64_t>() : nullptr;
  t.sample_weight = sample_weight ? sw.data_ptr() : nullptr;

  at::Tensor loss[2] = {at::empty({p.rows}, opts), at::empty({p.rows}, opts)};
  const bool want[2] = {grad_a, grad_b};
  at::Tensor grad[2];
  for (int m = 0; m < 2; ++m) {
    grad[m] = want[m] ? cpu::empty_for_writing({p.rows, p.vocab}, a.options()) : at::empty({0}, a.options());
    t.row_loss[m] = loss[m].data_ptr();
    t.grad[m] = want[m] ? grad[m].data_ptr() : nullptr;
  }

  if (p.rows > 0 && p.vocab > 0) {
    switch (a.scalar_type()) {
      case at::kFloat: run_rows<float, float>(p, t); break;
      case at::kBFloat16: run_rows<c10::BFloat16, float>(p, t); break;
      case at::kHalf: run_rows<c10::Half, float>(p, t); break;
      case at::kDouble: run_rows<double, double>(p, t); break;
      default: TORCH_CHECK_TYPE(false, "fastdistill cpu: unsupported logits dtype ", a.scalar_type());
    }
  }
  if (reduce) {
    for (int m = 0; m < 2; ++m) loss[m] = at::scalar_tensor(cpu::ordered_sum(loss[m]) / p.denominator, opts);
  }
  return {loss[0], loss[1], grad[0], grad[1]};
}

}  // namespace
}  // namespace fastdistill

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("codistill_loss", &fastdistill::codistill_loss_cpu); }
