// The launch plan of the CUDA kd_loss kernel as plain host code: the shared-memory layout (the per-row header and
// the row slices), and which residency, cluster size and shared memory a call gets on a device (plan_for). No CUDA
// call and no device code here, so a host compiler tests it on a machine without a GPU (tests/test_cuda_build.py).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kd_loss_cuda.h"

namespace fastdistill {
namespace cuda {
namespace detail {

// Row slices (cluster ranks) and shared-memory segments start at multiples of 8 elements: 16-byte aligned for every
// dtype, as cp.async needs.
constexpr int kAlign = 8;
constexpr int kMaxRows = kMaxTeachers + 1;
constexpr int kMaxWarps = 32;

constexpr int kMaxReduce = 4;

template <typename A>
struct RowShared {
  A rowmax[kMaxRows], logsum[kMaxRows], inv_sum[kMaxRows];
  A w[kMaxTeachers], logw[kMaxTeachers];
  A ce_max, ce_logsum;
  A agg[kMaxTeachers];
  A warp[kMaxReduce][kMaxWarps];
  A bcast[kMaxReduce];
  A slot[2][kMaxReduce];  // this block's partials, read by the other blocks of its cluster (double-buffered)
};

// Shared-memory layout: RowShared, then (resident) the row slices, each padded to 8 elements.
template <typename A>
FD_HOST_DEVICE constexpr int64_t shared_header() {
  return (int64_t(sizeof(RowShared<A>)) + 15) / 16 * 16;
}

inline int64_t dtype_size(DType d) { return d == DType::Float64 ? 8 : d == DType::Float32 ? 4 : 2; }

// The per-row header's bytes for a call (float64 rows accumulate in double).
inline int64_t header_bytes(const KDCudaArgs& a) {
  return a.student_dtype == DType::Float64 ? shared_header<double>() : shared_header<float>();
}

// What the plan needs to know of a device.
struct DeviceInfo {
  int major = 0, sms = 0;
  int64_t max_smem = 0;  // opt-in shared memory per block
};

// Row columns a block holds when resident with `cluster` blocks per row.
inline int64_t slice_of(int64_t vocab, int cluster) {
  return ((vocab + cluster - 1) / cluster + kAlign - 1) / kAlign * kAlign;
}

// Bytes of row data a block holds for a slice of that many columns.
inline int64_t resident_bytes(const KDCudaArgs& a, int64_t slice) {
  const int64_t padded = (slice + kAlign - 1) / kAlign * kAlign;
  return padded * (dtype_size(a.student_dtype) + a.problem.teachers * dtype_size(a.teacher_dtype));
}

inline KDCudaConfig plan_for(const KDCudaArgs& a, const DeviceInfo& dev) {
  const bool f64 = a.student_dtype == DType::Float64;
  const int64_t header = header_bytes(a);
  KDCudaConfig cfg;
  cfg.threads = a.threads > 0 ? a.threads : 512;
  // Aim for ~100 KiB of row data per block (two blocks per SM on an H100/H200's 228 KiB): one block's sweeps
  // overlap the other's loads. Rows that need more are split over a cluster (sm_90), up to 16 blocks.
  const int64_t target = a.smem_target > 0 ? a.smem_target : 100 * 1024;
  const int64_t limit = dev.max_smem - header - 1024;  // (a margin for static shared memory)
  Residency want = a.residency;
  if (a.student_dtype != a.teacher_dtype) want = Residency::Global;  // the only kernel built for mixed dtypes
  if (want == Residency::Auto) {
    if (resident_bytes(a, slice_of(a.problem.vocab, 1)) <= std::min(target, limit)) {
      want = Residency::Smem;
    } else if (dev.major >= 9 && !f64) {  // (clusters, below)
      want = Residency::Cluster;
    } else if (resident_bytes(a, slice_of(a.problem.vocab, 1)) <= limit) {
      want = Residency::Smem;  // no clusters (sm_80, float64): one block per SM holding the whole row
    } else {
      want = Residency::Global;
    }
  }
  const bool clusters = dev.major >= 9 && !f64;  // the cluster kernel exists for sm_90 and float accumulation
  if (want == Residency::Smem && resident_bytes(a, slice_of(a.problem.vocab, 1)) > limit)
    want = clusters ? Residency::Cluster : Residency::Global;  // a forced residency the row does not fit
  if (want == Residency::Cluster && !clusters) want = Residency::Global;
  cfg.residency = want;
  cfg.cluster = 1;
  if (want == Residency::Cluster) {
    // the smallest portable cluster (2, 4, 8) whose slices meet the target; else 8 with larger slices (one block per
    // SM) while they fit; else 16 (non-portable: allowed on H100/H200)
    int cs = a.cluster;
    if (cs <= 0) {
      cs = 2;
      while (cs < 8 && resident_bytes(a, slice_of(a.problem.vocab, cs)) > std::min(target, limit)) cs *= 2;
      if (resident_bytes(a, slice_of(a.problem.vocab, cs)) > limit) cs = 16;
    }
    cfg.cluster = cs;
    if (resident_bytes(a, slice_of(a.problem.vocab, cs)) > limit) {  // not even in 16 slices, or a forced cluster
      cfg.residency = want = Residency::Global;
      cfg.cluster = 1;  // (what a global launch is: a block per row; the config reports what runs)
    }
  }
  const int64_t slice = want == Residency::Global ? a.problem.vocab : slice_of(a.problem.vocab, cfg.cluster);
  cfg.smem_bytes = header + (want == Residency::Global ? 0 : resident_bytes(a, slice));
  if (want != Residency::Global && a.pipeline != Pipeline::Off && !f64) {
    // Pipelined (v2; not float64, a correctness path): two slices a block. Where v1 holds the row in one block, in
    // one block if two copies fit; where v1 uses a cluster, the smallest cluster from v1's size upwards (up to 8
    // blocks, 16 when asked for) whose two slices fit. None: v1 as planned above.
    const auto fits = [&](int cs) { return 2 * resident_bytes(a, slice_of(a.problem.vocab, cs)) <= limit; };
    // Auto pipelines only the rows v1 spreads over a cluster (the shapes the GPU benchmark measures both ways), with
    // at least 32 KiB a block (~1 us of an SM's share of HBM bandwidth, about what a row's barriers cost). Rows that
    // fit one block stay on v1's several blocks an SM unless asked for: no run has compared the two there.
    const bool worth = a.pipeline == Pipeline::On ||
                       (want == Residency::Cluster && cfg.smem_bytes - header >= 32 * 1024);
    int cs = 0;
    if (want == Residency::Smem) {
      cs = fits(1) ? 1 : 0;
    } else if (a.cluster > 0) {
      cs = fits(a.cluster) ? a.cluster : 0;
    } else {
      const int most = a.pipeline == Pipeline::On ? 16 : 8;
      for (int c = cfg.cluster; c <= most && !cs; c *= 2) cs = fits(c) ? c : 0;
    }
    if (cs > 0 && worth) {
      cfg.pipelined = true;
      cfg.cluster = cs;
      cfg.smem_bytes = header + 2 * resident_bytes(a, slice_of(a.problem.vocab, cs));
    }
  }
  return cfg;
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastdistill
