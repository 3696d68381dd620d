// The kd_loss kernels for f64 students and f64 teachers (one translation unit per pair: parallel builds).
#include "../kd_loss_kernel.cuh"

namespace fastdistill {
namespace cuda {
namespace detail {
FD_KD_INSTANTIATE(double, double, double)
}  // namespace detail
}  // namespace cuda
}  // namespace fastdistill
