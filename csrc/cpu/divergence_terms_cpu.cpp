// fastdistill::_divergence_terms: kd_math.h's divergence_terms, element by element in float64 (ScalarOps), so tests
// can hold the Python reference and the Triton terms to the one C++ statement of the math.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "../common/kd_params.h"

namespace fastdistill {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_terms_cpu(const at::Tensor& p, const at::Tensor& q,
                                                                    const at::Tensor& logp, const at::Tensor& logq,
                                                                    c10::string_view divergence,
                                                                    at::ArrayRef<double> div_params) {
  for (const at::Tensor* x : {&p, &q, &logp, &logq}) {
    TORCH_CHECK_TYPE(x->scalar_type() == at::kDouble, "fastdistill::_divergence_terms: inputs must be float64");
    TORCH_CHECK_VALUE(x->sizes() == p.sizes(), "fastdistill::_divergence_terms: inputs must share one shape");
  }
  Divergence kind;
  double params[kMaxDivParams] = {};
  try {
    kind = parse_divergence(std::string(divergence));
    parse_div_params(kind, div_params, params);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  const auto prm = make_div_params<double>(kind, params, divergence_param_count(kind));
  const at::Tensor xs[4] = {p.contiguous(), q.contiguous(), logp.contiguous(), logq.contiguous()};
  at::Tensor phi = at::empty_like(xs[0]), gq = at::empty_like(xs[0]), hp = at::empty_like(xs[0]);
  const double *pp = xs[0].data_ptr<double>(), *qq = xs[1].data_ptr<double>();
  const double *lp = xs[2].data_ptr<double>(), *lq = xs[3].data_ptr<double>();
  double *o_phi = phi.data_ptr<double>(), *o_gq = gq.data_ptr<double>(), *o_hp = hp.data_ptr<double>();
  for (int64_t i = 0; i < phi.numel(); ++i) {
    const auto t = divergence_terms<ScalarOps<double>, double>(prm, pp[i], qq[i], lp[i], lq[i]);
    o_phi[i] = t.phi;
    o_gq[i] = t.gq;
    o_hp[i] = t.hp;
  }
  return {phi, gq, hp};
}

}  // namespace
}  // namespace fastdistill

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) { m.impl("_divergence_terms", &fastdistill::divergence_terms_cpu); }
