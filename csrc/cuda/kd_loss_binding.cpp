// Torch binding of the CUDA kd_loss kernel (kd_loss_kernel.cu): checks, the current stream, outputs. The schema is
// in csrc/fastdistill.cpp; autograd and the fake kernel are registered from Python (fastdistill/ops/registration.py).
//
// Launch overrides, for the benchmark's sweeps (read at every call; unset: the launcher chooses):
//   FASTDISTILL_CUDA_RESIDENCY = global | smem | cluster
//   FASTDISTILL_CUDA_THREADS   = threads per block
//   FASTDISTILL_CUDA_CLUSTER   = blocks per row (cluster residency)
//   FASTDISTILL_CUDA_SMEM_KIB  = row data per block the launcher aims for
//   FASTDISTILL_CUDA_PIPELINE  = 0 (v1: a block or cluster per row) | 1 (pipelined wherever two row slices fit)
//   FASTDISTILL_CUDA_GROUPS    = pipelined: at most this many row groups (blocks or clusters) in the grid
//   FASTDISTILL_CUDA_STRICT=1  = a planned block or cluster the device cannot hold, or a forced residency or
//                                pipeline the plan does not keep for the shape, is an error, not a fallback (the
//                                tests and benchmarks: they then know which kernel ran)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../kd_teachers.h"
#include "kd_loss_cuda.h"

namespace fastdistill {
namespace {

cuda::DType dtype_of(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kBFloat16: return cuda::DType::BFloat16;
    case at::kHalf: return cuda::DType::Float16;
    case at::kDouble: return cuda::DType::Float64;
    default: TORCH_CHECK_TYPE(false, "fastdistill::kd_loss (cuda): ", what, " must be float32/bfloat16/float16/float64, got ", t);
  }
}

// unit stride along V (what the kernel reads); other layouts are copied once
at::Tensor unit_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

void apply_overrides(cuda::KDCudaArgs& a) {
  if (const char* r = std::getenv("FASTDISTILL_CUDA_RESIDENCY")) {
    const std::string s(r);
    TORCH_CHECK_VALUE(s == "global" || s == "smem" || s == "cluster" || s.empty(),
                      "FASTDISTILL_CUDA_RESIDENCY must be global, smem or cluster; got '", s, "'");
    a.residency = s == "global" ? cuda::Residency::Global
                  : s == "smem" ? cuda::Residency::Smem
                  : s == "cluster" ? cuda::Residency::Cluster
                                   : cuda::Residency::Auto;
  }
  a.threads = env_int("FASTDISTILL_CUDA_THREADS");
  a.cluster = env_int("FASTDISTILL_CUDA_CLUSTER");
  a.smem_target = int64_t(env_int("FASTDISTILL_CUDA_SMEM_KIB")) * 1024;
  if (const char* v = std::getenv("FASTDISTILL_CUDA_PIPELINE")) {
    const std::string s(v);
    TORCH_CHECK_VALUE(s == "0" || s == "1" || s.empty(), "FASTDISTILL_CUDA_PIPELINE must be 0 or 1; got '", s, "'");
    a.pipeline = s == "0" ? cuda::Pipeline::Off : s == "1" ? cuda::Pipeline::On : cuda::Pipeline::Auto;
  }
  a.max_groups = env_int("FASTDISTILL_CUDA_GROUPS");
  a.strict = env_int("FASTDISTILL_CUDA_STRICT") != 0;
}

const char* residency_name(cuda::Residency r) {
  switch (r) {
    case cuda::Residency::Global: return "global";
    case cuda::Residency::Smem: return "smem";
    case cuda::Residency::Cluster: return "cluster";
    default: return "auto";
  }
}

const char* dtype_name(cuda::DType d) {
  switch (d) {
    case cuda::DType::Float32: return "float32";
    case cuda::DType::BFloat16: return "bfloat16";
    case cuda::DType::Float16: return "float16";
    default: return "float64";
  }
}

// FASTDISTILL_CUDA_STRICT=1 and the launcher refused (cudaErrorNotPermitted): which forced setting the plan does not
// keep for this shape (and what it plans instead), or that the device cannot hold the planned block or cluster.
[[noreturn]] void strict_refusal(const cuda::KDCudaArgs& a, int device) {
  const KDProblem& p = a.problem;
  const cuda::KDCudaConfig cfg = cuda::plan_kd_loss(a, device);
  std::string plan = residency_name(cfg.residency);
  if (cfg.residency == cuda::Residency::Cluster) plan += " of " + std::to_string(cfg.cluster);
  if (cfg.residency != cuda::Residency::Global) plan += cfg.pipelined ? ", pipelined" : ", v1";
  const std::string shape = "N=" + std::to_string(p.rows) + ", V=" + std::to_string(p.vocab) + ", K=" +
                            std::to_string(p.teachers) + ", " + dtype_name(a.student_dtype) + " student, " +
                            dtype_name(a.teacher_dtype) + " teachers, device " + std::to_string(device);
  if (const char* dropped = cuda::forced_setting_dropped(a, cfg)) {
    std::string setting = "FASTDISTILL_CUDA_PIPELINE=1";
    if (std::strcmp(dropped, "residency") == 0) {
      setting = std::string("FASTDISTILL_CUDA_RESIDENCY=") + residency_name(a.residency);
      if (a.cluster > 0) setting += " (FASTDISTILL_CUDA_CLUSTER=" + std::to_string(a.cluster) + ")";
    }
    TORCH_CHECK(false, "fastdistill::kd_loss (cuda): FASTDISTILL_CUDA_STRICT=1, and ", setting,
                " cannot be honoured for ", shape, " (the row does not fit it, or there is no such kernel for this "
                "device or these dtypes); the plan for this shape is ", plan, ". Unset the override, or "
                "FASTDISTILL_CUDA_STRICT to run the plan");
  }
  TORCH_CHECK(false, "fastdistill::kd_loss (cuda): FASTDISTILL_CUDA_STRICT=1, and the device cannot hold the planned ",
              plan, " launch's block or cluster at once, for ", shape);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> kd_loss_cuda(
    const at::Tensor& student, at::TensorList teachers, const std::optional<at::Tensor>& teacher_weights,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& denominator, c10::string_view divergence, c10::string_view ensemble,
    double temperature, double kd_scale, double ce_weight, at::ArrayRef<double> div_params, int64_t ignore_index,
    bool reduce, bool grad_student, int64_t grad_teachers) {
  TORCH_CHECK_VALUE(student.dim() == 2, "fastdistill::kd_loss: student must be [N, V], got ", student.sizes());
  const KDTeachers teacher_rows = kd_teachers(teachers, student, cuda::kMaxTeachers, "cuda");
  cuda::KDCudaArgs a;
  try {
    a.problem = make_kd_problem(student.size(0), student.size(1), static_cast<int32_t>(teacher_rows.rows.size()),
                                std::string(divergence), std::string(ensemble), div_params, temperature, kd_scale,
                                ce_weight, ignore_index, reduce);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  const KDProblem& p = a.problem;
  TORCH_CHECK_VALUE(ce_weight == 0 || labels, "ce_weight > 0 needs labels");

  const auto device = student.device();
  TORCH_CHECK_VALUE(device.is_cuda(), "fastdistill::kd_loss (cuda): student must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(device);
  const auto on_device = [&](const at::Tensor& x, const char* what) {
    TORCH_CHECK_VALUE(x.device() == device, "fastdistill::kd_loss (cuda): ", what, " is on ", x.device(),
                      ", the student on ", device);
  };
  a.student_dtype = dtype_of(student.scalar_type(), "student");
  const bool f64 = a.student_dtype == cuda::DType::Float64;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const at::Tensor s = unit_stride(student);
  a.student = s.data_ptr();
  a.student_stride = s.stride(0);

  const auto teacher_dtype = teacher_rows.rows[0].scalar_type();
  a.teacher_dtype = dtype_of(teacher_dtype, "teachers");
  TORCH_CHECK_TYPE(f64 == (a.teacher_dtype == cuda::DType::Float64),
                   "fastdistill::kd_loss (cuda): float64 logits need float64 on both sides, got student ",
                   student.scalar_type(), " and teachers ", teacher_dtype);
  std::vector<at::Tensor> ts;
  for (size_t k = 0; k < teacher_rows.rows.size(); ++k) {
    on_device(teacher_rows.rows[k], "a teacher");
    ts.push_back(unit_stride(teacher_rows.rows[k]));
    a.teachers[k] = ts.back().data_ptr();
    a.teacher_strides[k] = ts.back().stride(0);
  }

  at::Tensor tw, lab, sw, den;
  if (teacher_weights) {
    on_device(*teacher_weights, "teacher_weights");
    tw = teacher_weights->to(acc).contiguous();
    TORCH_CHECK_VALUE(tw.dim() == 2 && tw.size(0) == p.teachers && tw.size(1) == p.rows,
                      "teacher_weights must be [K, N] = [", p.teachers, ", ", p.rows, "], got ", tw.sizes());
    a.teacher_weights = tw.data_ptr();
  }
  if (labels) {
    on_device(*labels, "labels");
    lab = labels->contiguous();
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong, "labels must be int64");
    TORCH_CHECK_VALUE(lab.numel() == p.rows, "labels must have N = ", p.rows, " elements");
    a.labels = lab.data_ptr<int64_t>();
  }
  if (sample_weight) {
    on_device(*sample_weight, "sample_weight");
    sw = sample_weight->to(acc).contiguous();
    TORCH_CHECK_VALUE(sw.numel() == p.rows, "sample_weight must have N = ", p.rows, " elements");
    a.sample_weight = sw.data_ptr();
  }
  if (denominator && reduce) {  // read on the device: no host synchronisation
    on_device(*denominator, "denominator");
    TORCH_CHECK_VALUE(denominator->numel() == 1, "denominator must hold one value");
    den = denominator->to(acc).reshape({1}).contiguous();
    a.denominator = den.data_ptr();
  }

  const auto opts = student.options().dtype(acc);
  at::Tensor row_loss = at::empty({p.rows}, opts);
  at::Tensor gs = grad_student ? at::empty({p.rows, p.vocab}, student.options()) : at::empty({0}, student.options());
  std::vector<void*> gt_ptrs;  // (no buffer for a teacher whose bit is clear: nullptr)
  const auto alloc = [](at::IntArrayRef sizes, const at::TensorOptions& o) { return at::empty(sizes, o); };
  const std::vector<at::Tensor> gt = kd_teacher_gradients(teacher_rows, grad_teachers, alloc, gt_ptrs);
  for (size_t k = 0; k < gt_ptrs.size(); ++k) a.grad_teachers[k] = gt_ptrs[k];
  a.row_loss = row_loss.data_ptr();
  a.grad_student = grad_student ? gs.data_ptr() : nullptr;
  apply_overrides(a);

  const cudaError_t err = cuda::launch_kd_loss(a, device.index(), c10::cuda::getCurrentCUDAStream().stream());
  if (err == cudaErrorNotPermitted && a.strict) strict_refusal(a, device.index());
  TORCH_CHECK(err == cudaSuccess, "fastdistill::kd_loss (cuda): launch failed: ", cudaGetErrorString(err));
  if (p.vocab == 0) row_loss.zero_();  // no column: no loss (the launcher launches nothing)
  if (!reduce) return {row_loss, gs, gt};
  // the rows summed and divided in float64, rounded once, as the cpu kernel
  at::Tensor total = row_loss.sum(at::kDouble);
  if (den.defined()) total = total / denominator->to(at::kDouble).reshape({});
  return {total.to(acc), gs, gt};
}

}  // namespace
}  // namespace fastdistill

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) { m.impl("kd_loss", &fastdistill::kd_loss_cuda); }
