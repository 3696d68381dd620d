// The teachers argument of fastdistill::kd_loss as both torch bindings read it (csrc/cpu/kd_loss_cpu.cpp,
// csrc/cuda/kd_loss_binding.cpp): K tensors [N, V], or one stacked [K, N, V] tensor (a list holding it), as the
// Triton twin takes it. Stacked, the teachers are one autograd input with one gradient [K, N, V]: a stacked teacher
// that is trained (an ensemble run as one batched model) gets its gradient written in place, not K [N, V] buffers
// that autograd's UnbindBackward would copy into one more [K, N, V].
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fastdistill {

struct KDTeachers {
  std::vector<at::Tensor> rows;  // K views [N, V], teacher order
  bool stacked = false;          // the argument was one [K, N, V] tensor
};

// The K teachers of the argument, each checked against the student's [N, V] and the first one's dtype.
inline KDTeachers kd_teachers(at::TensorList teachers, const at::Tensor& student, int64_t max_teachers,
                              const char* backend) {
  KDTeachers t;
  t.stacked = teachers.size() == 1 && teachers[0].dim() == 3;
  if (t.stacked) {
    TORCH_CHECK_VALUE(teachers[0].size(0) >= 1 && teachers[0].size(0) <= max_teachers, "fastdistill::kd_loss: the ",
                      backend, " backend takes 1 to ", max_teachers, " teachers, got a stacked ", teachers[0].sizes());
    t.rows = teachers[0].unbind(0);
  } else {
    TORCH_CHECK_VALUE(!teachers.empty() && int64_t(teachers.size()) <= max_teachers, "fastdistill::kd_loss: the ",
                      backend, " backend takes 1 to ", max_teachers, " teachers, got ", teachers.size());
    t.rows.assign(teachers.begin(), teachers.end());
  }
  const auto dtype = t.rows[0].scalar_type();
  for (size_t k = 0; k < t.rows.size(); ++k) {
    TORCH_CHECK_VALUE(t.rows[k].sizes() == student.sizes(), "teacher ", k, " has shape ", t.rows[k].sizes(),
                      ", expected ", student.sizes(), t.stacked ? " (one row of the stacked teachers)" : "");
    TORCH_CHECK_TYPE(t.rows[k].scalar_type() == dtype, "all teachers must share one dtype");
  }
  return t;
}

// The op's grad_teachers output for the mask (bit k: teacher k's gradient), from alloc(sizes, options): K tensors,
// teacher k's [N, V] where its bit is set and an empty [0] for the others; stacked, one tensor, [K, N, V] for a
// mask of all K bits and [0] for none (one tensor has one gradient: other masks are refused). ptrs[k] is teacher
// k's [N, V] destination (unit stride, row stride V), nullptr for one not written.
template <typename Alloc>
std::vector<at::Tensor> kd_teacher_gradients(const KDTeachers& t, int64_t mask, Alloc alloc,
                                             std::vector<void*>& ptrs) {
  const int64_t k = int64_t(t.rows.size());
  TORCH_CHECK_VALUE(mask >= 0 && (mask >> k) == 0, "grad_teachers: a mask of K = ", k, " teachers' bits, got ", mask);
  const at::Tensor& first = t.rows[0];
  ptrs.assign(size_t(k), nullptr);
  std::vector<at::Tensor> out;
  if (t.stacked) {
    const int64_t all = (int64_t(1) << k) - 1;
    TORCH_CHECK_VALUE(mask == 0 || mask == all, "grad_teachers: one stacked [K, N, V] tensor has one gradient: all ",
                      k, " bits or none, got ", mask);
    if (mask == 0) return {at::empty({0}, first.options())};
    at::Tensor g = alloc(at::IntArrayRef({k, first.size(0), first.size(1)}), first.options());
    for (int64_t i = 0; i < k; ++i) ptrs[size_t(i)] = g[i].data_ptr();
    return {g};
  }
  for (int64_t i = 0; i < k; ++i) {
    const bool want = (mask >> i) & 1;  // only the teachers asked for get a buffer
    const at::Tensor& x = t.rows[size_t(i)];
    out.push_back(want ? alloc(x.sizes(), x.options()) : at::empty({0}, x.options()));
    if (want) ptrs[size_t(i)] = out.back().data_ptr();
  }
  return out;
}

}  // namespace fastdistill
