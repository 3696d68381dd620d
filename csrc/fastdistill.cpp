// Schemas of every fastdistill op, defined once. Backends register implementations with TORCH_LIBRARY_IMPL in
// their own files (csrc/cpu; csrc/cuda); fake (meta) kernels and autograd are registered from
// Python (fastdistill/ops/registration.py). The _C module is empty: importing it only runs these registrations.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastdistill, m) {
  // Fused distillation loss over rows of [N, V] logits (SPEC §1). Returns
  //   loss:           0-dim (reduce) = sum_i w_i l_i / denominator, or [N] (not reduce) = w_i l_i;
  //                   float32, or float64 for float64 inputs;
  //   grad_student:   d(loss)/d(student) [N, V] in the student's dtype, or an empty tensor when not requested
  //                   (for reduce=false, row i holds d(w_i l_i)/d(student row i));
  //   grad_teachers:  K tensors like grad_student, for co-distillation: teacher k's where bit k of the argument
  //                   grad_teachers is set, an empty tensor for the others (one of K teachers trained: one buffer).
  // teachers: K tensors [N, V], or one stacked [K, N, V] tensor (a list holding it), one input whose one gradient
  //   is [K, N, V] (grad_teachers all K bits) or empty (none); other masks are refused (csrc/kd_teachers.h).
  // teacher_weights: [K, N] float, rows already normalised to sum 1 (None = uniform). sample_weight: [N] float.
  // denominator: 0-dim (None = 1). The backward pass only scales these gradients by grad_output.
  m.def(
      "kd_loss(Tensor student, Tensor[] teachers, Tensor? teacher_weights, Tensor? labels, Tensor? sample_weight, "
      "Tensor? denominator, str divergence, str ensemble, float temperature, float kd_scale, float ce_weight, "
      "float[] div_params, int ignore_index, bool reduce, bool grad_student, int grad_teachers) "
      "-> (Tensor, Tensor, Tensor[])");

  // Co-distillation of two models (a, b) from their [N, V] logits, read once (math: fastdistill/ops/reference.py,
  // codistill_loss). Per row, with D the divergence at temperature T and the other model's distribution a constant:
  //   loss_a_i = w_i (hard_a CE(a_i) + kd_scale weight_ba D(P_b, Q_a))     (b teaches a)
  //   loss_b_i = w_i (hard_b CE(b_i) + kd_scale weight_ab D(P_a, Q_b))     (a teaches b)
  // reduced like kd_loss (sum / denominator, or per row). Returns loss_a, loss_b (float32, or float64), and
  // d(loss_a)/d(a), d(loss_b)/d(b) [N, V] in the inputs' dtype (empty when not requested); a and b share a dtype.
  m.def(
      "codistill_loss(Tensor a, Tensor b, Tensor? labels, Tensor? sample_weight, Tensor? denominator, "
      "str divergence, float temperature, float kd_scale, float weight_ab, float weight_ba, float hard_a, "
      "float hard_b, float[] div_params, int ignore_index, bool reduce, bool grad_a, bool grad_b) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // The per-element terms of csrc/common/kd_math.h (phi, gq = Q dphi/dQ, hp = P dphi/dP) for one divergence, in
  // float64 with the scalar policy: what tests hold the reference and the Triton terms to, element for element.
  // p, q, logp, logq: float64 tensors of one shape; div_params: the divergence's parameters (the table's order).
  m.def(
      "_divergence_terms(Tensor p, Tensor q, Tensor logp, Tensor logq, str divergence, float[] div_params) "
      "-> (Tensor, Tensor, Tensor)");

  // MI-alpha estimate (SPEC §2, §6) over the N x N critic matrix S_ij = <teacher_i, student_j> / temperature, never
  // materialised (math: csrc/common/mi_math.h). student, teacher: [N, D], one floating dtype, N >= 2 (features
  // already L2-normalised for the cosine critic); log_baseline: [N] float32 (float64 for float64 inputs).
  // Returns the 0-dim estimate (float32, or float64) and stats [8, N] in that dtype for the backward pass (names as
  // in csrc/common/mi_math.h): [0] l_i (row log-sum-exp), [1] Crest_i, [2] Phi_i, [3] m_i (at k*), [4] dI/da_i,
  // [5] k*_i (the column of row i's largest score, as a float), [6] dI/dS_ii, [7] z_i.
  m.def("mi_alpha(Tensor student, Tensor teacher, Tensor log_baseline, float alpha, float temperature) -> (Tensor, Tensor)");
  // Gradients of grad * I w.r.t. student and teacher ([N, D], in their dtype), recomputing score tiles; grad is 0-dim.
  m.def(
      "mi_alpha_backward(Tensor grad, Tensor student, Tensor teacher, Tensor log_baseline, Tensor stats, float alpha, "
      "float temperature) -> (Tensor, Tensor)");
}
