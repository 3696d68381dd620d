// The launch parameters of the fused KD loss, shared by the CPU kernel and the CUDA kernel (torch-free, so the
// .cu files compile with nvcc alone). The torch bindings fill it from the op's arguments.
#pragma once

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
  double beta = 0.5;
  double skew = 0.1;
  int64_t ignore_index = -100;
  bool reduce = true;  // true: one 0-dim loss, sum(w_i l_i) / denominator; false: per-row w_i l_i
};

inline Divergence parse_divergence(const std::string& s) {
  if (s == "kl") return Divergence::KL;
  if (s == "reverse_kl") return Divergence::ReverseKL;
  if (s == "jsd") return Divergence::JSD;
  if (s == "tvd") return Divergence::TVD;
  if (s == "skew_kl") return Divergence::SkewKL;
  if (s == "skew_reverse_kl") return Divergence::SkewReverseKL;
  throw std::invalid_argument("divergence must be one of kl, reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl; got '" +
                              s + "'");
}

inline Ensemble parse_ensemble(const std::string& s) {
  if (s == "prob_mean") return Ensemble::ProbMean;
  if (s == "logit_mean") return Ensemble::LogitMean;
  if (s == "loss_mean") return Ensemble::LossMean;
  throw std::invalid_argument("ensemble must be one of prob_mean, logit_mean, loss_mean; got '" + s + "'");
}

}  // namespace fastdistill
