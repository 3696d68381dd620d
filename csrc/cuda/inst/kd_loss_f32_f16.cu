// The kd_loss kernels for f32 students and f16 teachers (one translation unit per pair: parallel builds).
#include "../kd_loss_kernel.cuh"

namespace fastdistill {
namespace cuda {
namespace detail {
FD_KD_INSTANTIATE(float, __half, float)
}  // namespace detail
}  // namespace cuda
}  // namespace fastdistill
