// The kd_loss kernels for bf16 students and f16 teachers (one translation unit per pair: parallel builds).
#include "../kd_loss_kernel.cuh"

namespace fastdistill {
namespace cuda {
namespace detail {
FD_KD_INSTANTIATE(__nv_bfloat16, __half, float)
}  // namespace detail
}  // namespace cuda
}  // namespace fastdistill
