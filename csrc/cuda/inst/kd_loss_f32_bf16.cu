// The kd_loss kernels for f32 students and bf16 teachers (one translation unit per pair: parallel builds).
#include "../kd_loss_kernel.cuh"

namespace fastdistill {
namespace cuda {
namespace detail {
FD_KD_INSTANTIATE(float, __nv_bfloat16, float)
}  // namespace detail
}  // namespace cuda
}  // namespace fastdistill
