// The launch parameters of the fused KD loss, shared by the CPU kernel and the CUDA kernel (torch-free, so the
// .cu files compile with nvcc alone). The torch bindings fill it from the op's arguments.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kd_math.h"

namespace fastdistill {

struct KDProblem {
  int64_t rows = 0;   // N: rows of the flattened [N, V] logits
  int64_t vocab = 0;  // V
  int32_t teachers = 0;  // K
  Divergence divergence = Divergence::KL;
  Ensemble ensemble = Ensemble::ProbMean;
  double temperature = 1.0;
  double kd_scale = 1.0;   // (1 - ce_weight) * (T^2 or 1): multiplies D in the row loss
  double ce_weight = 0.0;  // weight of the hard-label cross-entropy at T = 1
  double div_params[kMaxDivParams] = {};  // the divergence's parameters, in the table's order (kd_math.h)
  int64_t ignore_index = -100;
  bool reduce = true;  // true: one 0-dim loss, sum(w_i l_i) / denominator; false: per-row w_i l_i
};

// The divergence named s (a name of FD_DIVERGENCES), or std::invalid_argument listing the names.
inline Divergence parse_divergence(const std::string& s) {
#define FD_DIV_PARSE(e, name, n_params, closed) \
  if (s == name) return Divergence::e;
  FD_DIVERGENCES(FD_DIV_PARSE)
#undef FD_DIV_PARSE
  std::string names;
#define FD_DIV_NAME(e, name, n_params, closed) names += std::string(names.empty() ? "" : ", ") + name;
  FD_DIVERGENCES(FD_DIV_NAME)
#undef FD_DIV_NAME
  throw std::invalid_argument("divergence must be one of " + names + "; got '" + s + "'");
}

// Copies the parameter vector of divergence d into out[kMaxDivParams] after checking its length against the table.
template <class Vec>
inline void parse_div_params(Divergence d, const Vec& params, double* out) {
  const int expected = divergence_param_count(d);
  if (static_cast<int>(params.size()) != expected) {
    throw std::invalid_argument("div_params: this divergence takes " + std::to_string(expected) +
                                " parameter(s), got " + std::to_string(params.size()));
  }
  for (int j = 0; j < expected; ++j) out[j] = params[j];
}

inline Ensemble parse_ensemble(const std::string& s) {
  if (s == "prob_mean") return Ensemble::ProbMean;
  if (s == "logit_mean") return Ensemble::LogitMean;
  if (s == "loss_mean") return Ensemble::LossMean;
  throw std::invalid_argument("ensemble must be one of prob_mean, logit_mean, loss_mean; got '" + s + "'");
}

// The problem of one kd_loss call from the op's arguments (the cpu and cuda bindings alike): names parsed, the
// parameter vector checked against the divergence, the temperature checked. Throws std::invalid_argument with the
// message the binding raises.
template <class Vec>
inline KDProblem make_kd_problem(int64_t rows, int64_t vocab, int32_t teachers, const std::string& divergence,
                                 const std::string& ensemble, const Vec& div_params, double temperature,
                                 double kd_scale, double ce_weight, int64_t ignore_index, bool reduce) {
  KDProblem p;
  p.divergence = parse_divergence(divergence);
  p.ensemble = parse_ensemble(ensemble);
  parse_div_params(p.divergence, div_params, p.div_params);
  if (!(std::isfinite(temperature) && temperature > 0)) throw std::invalid_argument("temperature must be finite and > 0");
  p.rows = rows;
  p.vocab = vocab;
  p.teachers = teachers;
  p.temperature = temperature;
  p.kd_scale = kd_scale;
  p.ce_weight = ce_weight;
  p.ignore_index = ignore_index;
  p.reduce = reduce;
  return p;
}

}  // namespace fastdistill
