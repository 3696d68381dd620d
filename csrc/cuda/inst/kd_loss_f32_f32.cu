// The kd_loss kernels for f32 students and f32 teachers (one translation unit per pair: parallel builds).
#include "../kd_loss_kernel.cuh"

namespace fastdistill {
namespace cuda {
namespace detail {
FD_KD_INSTANTIATE(float, float, float)
}  // namespace detail
}  // namespace cuda
}  // namespace fastdistill
