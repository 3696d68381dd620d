// The launcher of the CUDA kd_loss kernel: the configuration for a call (plan_kd_loss) and the dispatch to the
// kernel instantiated for its dtypes (kd_loss_kernel.cuh; the instantiations are in inst/).
#include "kd_loss_kernel.cuh"

namespace fastdistill {
namespace cuda {
namespace detail {
extern template cudaError_t launch_res<float, float, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<float, __nv_bfloat16, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<float, __half, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<__nv_bfloat16, __nv_bfloat16, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<__nv_bfloat16, float, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<__nv_bfloat16, __half, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<__half, __half, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<__half, float, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<__half, __nv_bfloat16, float>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);
extern template cudaError_t launch_res<double, double, double>(const KDCudaArgs&, const KDCudaConfig&, cudaStream_t);

template <typename S>
cudaError_t launch_teacher(const KDCudaArgs& a, const KDCudaConfig& cfg, cudaStream_t stream) {
  switch (a.teacher_dtype) {
    case DType::Float32: return launch_res<S, float, float>(a, cfg, stream);
    case DType::BFloat16: return launch_res<S, __nv_bfloat16, float>(a, cfg, stream);
    case DType::Float16: return launch_res<S, __half, float>(a, cfg, stream);
    default: return cudaErrorInvalidValue;  // float64 teachers go with a float64 student (checked by the binding)
  }
}

}  // namespace detail

namespace {

detail::DeviceInfo device_info(int device) {
  detail::DeviceFacts f;
  detail::DeviceInfo d;
  // nothing known (the error cleared): the plan falls back to global memory, whose launch reports the device
  if (detail::clear(detail::device_facts(device, &f)) != cudaSuccess) return d;
  d.major = f.major;
  d.sms = f.sms;
  d.max_smem = f.smem_block_optin;
  return d;
}

}  // namespace

KDCudaConfig plan_kd_loss(const KDCudaArgs& a, int device) { return detail::plan_for(a, device_info(device)); }

namespace {

cudaError_t launch_planned(const KDCudaArgs& a, const KDCudaConfig& cfg, cudaStream_t stream) {
  if (cfg.threads % 32 != 0 || cfg.threads < 64 || cfg.threads > 1024) return cudaErrorInvalidValue;
  switch (a.student_dtype) {
    case DType::Float32: return detail::launch_teacher<float>(a, cfg, stream);
    case DType::BFloat16: return detail::launch_teacher<__nv_bfloat16>(a, cfg, stream);
    case DType::Float16: return detail::launch_teacher<__half>(a, cfg, stream);
    case DType::Float64:
      if (a.teacher_dtype != DType::Float64) return cudaErrorInvalidValue;
      return detail::launch_res<double, double, double>(a, cfg, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_kd_loss(const KDCudaArgs& a, int device, cudaStream_t stream) {
  if (a.problem.rows == 0 || a.problem.vocab == 0) return cudaSuccess;
  if (a.problem.teachers < 1 || a.problem.teachers > kMaxTeachers) return cudaErrorInvalidValue;
  const KDCudaConfig cfg = plan_kd_loss(a, device);
  // strict: a forced residency or pipeline the row does not fit would run, and be measured as, another kernel
  if (a.strict && forced_setting_dropped(a, cfg) != nullptr) return cudaErrorNotPermitted;
  cudaError_t err = launch_planned(a, cfg, stream);
  if (err != cudaErrorNotPermitted || a.strict) return err;
  // The device cannot hold the planned block or cluster at once: v1 for a pipelined plan, then global memory.
  if (cfg.pipelined) {
    KDCudaArgs v1 = a;
    v1.pipeline = Pipeline::Off;
    err = launch_planned(v1, plan_kd_loss(v1, device), stream);
    if (err != cudaErrorNotPermitted) return err;
  }
  KDCudaConfig global = cfg;
  global.residency = Residency::Global;
  global.cluster = 1;
  global.pipelined = false;
  global.smem_bytes = detail::header_bytes(a);
  return launch_planned(a, global, stream);
}

}  // namespace cuda
}  // namespace fastdistill
