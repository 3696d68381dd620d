// The CUDA kernel of fastdistill::kd_loss, as the torch binding sees it: a params struct and a launcher that takes
// a stream. Torch-free (nvcc compiles the kernels alone, on a machine without torch's CUDA build) and host-only
// declarations: the binding (kd_loss_binding.cpp) fills the struct from the op's tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/kd_params.h"

namespace fastdistill {
namespace cuda {

constexpr int kMaxTeachers = 16;  // as the other backends (the op records' MAX_TEACHERS)

enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Float16 = 2, Float64 = 3 };

// Where a row's K + 1 inputs live between the sweeps.
//   Global:  read from global memory at every sweep (L2 catches part): any V, any GPU; the fallback.
//   Smem:    one block per row, the row copied into shared memory by the first sweep: each input read once.
//   Cluster: a thread-block cluster per row (sm_90), each block holding a slice of the row in its shared memory;
//            the row's normalisers and sums combined through distributed shared memory. Each input read once.
enum class Residency : int32_t { Auto = 0, Global = 1, Smem = 2, Cluster = 3 };

// Whether a resident launch is pipelined (v2): a persistent grid of row groups (a block, or a cluster), each looping
// over its rows and copying row r + groups into a second buffer while it computes row r, so that the copy of the next
// row overlaps the sweeps of this one inside the block. Without it (v1) a block (cluster) holds one row and the
// overlap comes only from the other blocks an SM holds.
//   Auto: pipelined where v1 spreads the row over a cluster and two slices of it fit a block (clusters of up to 8,
//   32 KiB a block at least; kd_loss_plan.h); On: wherever two slices fit, clusters of 16 included; Off: v1.
enum class Pipeline : int32_t { Auto = 0, Off = 1, On = 2 };

struct KDCudaArgs {
  KDProblem problem;
  DType student_dtype = DType::Float32;
  DType teacher_dtype = DType::Float32;  // all teachers share one dtype; accumulation is float64 iff student is

  const void* student = nullptr;  // [N, V], unit stride along V
  int64_t student_stride = 0;     // elements between rows
  const void* teachers[kMaxTeachers] = {};
  int64_t teacher_strides[kMaxTeachers] = {};
  const void* teacher_weights = nullptr;  // [K, N] of the accumulation dtype, or null (uniform 1/K)
  const int64_t* labels = nullptr;        // [N], or null
  const void* sample_weight = nullptr;    // [N] of the accumulation dtype, or null
  const void* denominator = nullptr;      // one value of the accumulation dtype (read on the device), or null (1)

  void* row_loss = nullptr;                   // [N] of the accumulation dtype: w_i l_i
  void* grad_student = nullptr;               // [N, V] contiguous, student dtype, or null
  void* grad_teachers[kMaxTeachers] = {};     // [N, V] contiguous each, teacher dtype; null where not asked for

  // Launch configuration (0 / Auto: chosen by the launcher from the device and the shape).
  Residency residency = Residency::Auto;
  int threads = 0;            // per block, a multiple of 32 in [64, 1024] (0: 512, fewer for resident rows where
                              // the registers would not fit the blocks the shared memory allows on an SM)
  int cluster = 0;            // blocks per row in Cluster residency (1..16)
  int64_t smem_target = 0;    // bytes of row data per block the launcher aims for (Auto: see kd_loss_plan.h)
  Pipeline pipeline = Pipeline::Auto;
  int64_t max_groups = 0;     // pipelined: at most this many row groups in the grid (0: as many as the device holds
                              // at once; the tests set a few so that every block loops over several rows)
  bool strict = false;        // a planned block or cluster the device cannot hold, or a forced residency or pipeline
                              // the plan does not keep, is an error (cudaErrorNotPermitted), not a fallback to v1 or
                              // global memory: tests and benchmarks know what they ran
};

// What the launcher chose for a call (also what the benchmark reports).
struct KDCudaConfig {
  Residency residency = Residency::Global;
  int threads = 0;
  int cluster = 1;
  bool pipelined = false;  // (resident only) two row buffers a block, a persistent grid
  int64_t smem_bytes = 0;  // dynamic shared memory per block
};

// The configuration `launch_kd_loss` would use for these arguments on `device`, without launching.
KDCudaConfig plan_kd_loss(const KDCudaArgs& args, int device);

// Which forced setting of `args` its plan `cfg` does not keep, or null: "residency" (a forced residency whose row does
// not fit, or that the device or the dtypes have no kernel for) or "pipeline" (Pipeline::On where two slices of the
// row do not fit a block, for float64, or in global memory). Under args.strict, launch_kd_loss refuses such a call
// (cudaErrorNotPermitted): a test or benchmark that names a kernel then runs that kernel or fails, never another one.
inline const char* forced_setting_dropped(const KDCudaArgs& args, const KDCudaConfig& cfg) {
  if (args.residency != Residency::Auto && cfg.residency != args.residency) return "residency";
  if (args.pipeline == Pipeline::On && !cfg.pipelined) return "pipeline";
  return nullptr;
}

// Launches the row kernel on `stream`. Returns cudaSuccess or the first CUDA error (launch errors included); the
// binding turns it into an exception. No synchronisation, no allocation. A planned block or cluster the device
// cannot hold at once falls back to v1 (if pipelined), then to global memory, unless args.strict; args.strict also
// refuses a forced setting the plan does not keep (forced_setting_dropped). Both: cudaErrorNotPermitted.
cudaError_t launch_kd_loss(const KDCudaArgs& args, int device, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdistill
