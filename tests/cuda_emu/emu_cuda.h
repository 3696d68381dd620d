// A CPU emulation of the CUDA the kd_loss kernel uses, so that g++ compiles and runs the real launcher, plan and
// kernel (csrc/cuda/kd_loss_launch.cu, kd_loss_plan.h, kd_loss_kernel.cuh, inst/*.cu) on a machine without a GPU,
// under AddressSanitizer (memcheck) or ThreadSanitizer (racecheck). tests/test_cuda_emulated.py builds it and compares
// every output with the CPU op. The stub headers next to this one (cuda_runtime.h, cuda_bf16.h, ...) stand in for
// CUDA's: they all include this file. The kernel source is compiled as it is, with FASTDISTILL_CUDA_EMULATE defined:
// that swaps its two PTX instructions (ex2/lg2.approx.ftz) and its `extern __shared__` array for the functions in
// namespace fdemu below, nothing else.
//
// What is emulated, and how:
//   threads      each CUDA thread is a std::thread; a launch runs one cluster (a block without clusters) at a time,
//                all of its threads at once.
//   barriers     __syncthreads and cluster.sync() are std::barriers: a thread that skips one, or a block whose
//                threads do not all reach it, deadlocks or races (TSan reports it).
//   shuffles     the lanes exchange values through relaxed atomics and meet at a relaxed barrier: like a GPU
//                shuffle, it orders no other memory, so data passed between lanes through memory without a barrier
//                is a race TSan reports (a std::barrier here would hide it).
//   shared mem   each block gets exactly the dynamic bytes it was launched with (ASan sees any access past them),
//                filled with 0xFF, so a read of bytes nobody wrote gives NaN and fails the comparison; refilled with
//                0xFF when the block's last thread exits (a peer's distributed read after that is undefined on a
//                GPU: it sees NaN here, and TSan the race).
//   DSMEM        map_shared_rank maps to the peer block's buffer at the same offset.
//   cp.async     a copy fills its destination with 0xFF when issued and lands at __pipeline_wait_prior, done by the
//                issuing thread (so a read of the old bytes after the issue, a read before the wait, or by a thread
//                the barrier did not order after it, sees NaN or races); a copy that is not 16-byte aligned, lands
//                outside the block's shared memory, or is never waited for fails.
//   vector I/O   the 8/16-byte loads and stores are plain typed accesses: UBSan's alignment check fails a misaligned
//                one (the launcher must fall back to scalar code for rows that are not 16-byte aligned).
//   launch       cudaLaunchKernelEx fails on a grid that is not whole clusters, blocks that are not whole warps or
//                exceed the kernel's maxThreadsPerBlock, a cluster over 16, or dynamic shared memory above the
//                kernel's attribute (which cannot be set above an H100/H200's opt-in minus 1 KiB of static).
//   device       an H100/H200 (sm_90, 132 SMs, 227 KiB opt-in) unless the case says sm_80 (108 SMs, 163 KiB); the
//                occupancy answers and maxThreadsPerBlock are whatever the case sets (the kernel's launch bounds
//                are not visible to g++).
//   math         ex2/lg2.approx.ftz as exp2/log2 with denormals flushed; bf16/fp16 conversions round to nearest even.
//
// What it cannot show: the GPU memory model beyond barrier happens-before (a missing __threadfence or volatile is
// invisible); ex2/lg2.approx's accuracy beyond ftz; register counts, spills, occupancy and whether a cluster is
// schedulable (tests/test_cuda_build.py checks the compiled resources; the GPU tests the rest); nvcc-only compile
// errors; warp-synchronous behaviour without a barrier (threads of a warp do not run in lockstep here, so code that
// relied on it would be reported as a race, never silently pass).
#pragma once
#include <atomic>
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define __shared__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// ---- runtime types ---------------------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNotPermitted = 800,
  cudaErrorNotSupported = 801,
};
typedef void* cudaStream_t;

namespace fdemu {

struct Warp {
  // the shuffle's exchange through relaxed atomics: no happens-before between lanes (a GPU shuffle orders no other
  // memory), so TSan reports data passed between lanes through memory without __syncwarp/__syncthreads. (The C++
  // model would let a relaxed load miss a store another lane made before the barrier; x86 and g++ do not reorder
  // these, and a stale value would fail the comparison, never pass it silently.)
  std::shared_ptr<std::atomic<uint64_t>[]> vals{new std::atomic<uint64_t>[32]};
  std::shared_ptr<std::atomic<unsigned>[]> ctl{new std::atomic<unsigned>[2]{}};  // arrived, generation
};
inline void relaxed_warp_barrier(Warp& w) {
  const unsigned g = w.ctl[1].load(std::memory_order_relaxed);
  if (w.ctl[0].fetch_add(1, std::memory_order_relaxed) == 31) {
    w.ctl[0].store(0, std::memory_order_relaxed);
    w.ctl[1].store(g + 1, std::memory_order_relaxed);
  } else {
    while (w.ctl[1].load(std::memory_order_relaxed) == g) std::this_thread::yield();
  }
}
struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::atomic<unsigned> live{0};
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Warp> warps;
};
struct Cluster {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<unsigned char*> smems;
  unsigned size = 1;
};
struct Copy {
  void* dst;
  const void* src;
  size_t n;
};

// this thread's place in the launch
inline thread_local Block* block = nullptr;
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned rank = 0;
inline thread_local std::vector<std::vector<Copy>> committed;  // cp.async groups, oldest first
inline thread_local std::vector<Copy> issued;                  // not committed yet
inline thread_local long syncs = 0;                            // __syncthreads calls of this thread so far
inline thread_local long cluster_syncs = 0;                    // cluster.sync() calls of this thread so far

// what a case sets (emu_main.cpp) before its launch
inline int major = 9;                  // compute capability: 9 (H100/H200) or 8 (A100)
inline int max_threads = 1024;         // cudaFuncAttributes::maxThreadsPerBlock
inline int occupancy_clusters = 33;    // cudaOccupancyMaxActiveClusters
inline long skip_sync = 0;             // > 0: every thread skips its skip_sync-th __syncthreads (the racecheck's control)
inline float ex2_bias = 0;             // ex2's argument scaled by (1 + ex2_bias) (the comparison's control)
inline int static_smem = 1024;         // the kernels' static shared memory (ptxas: 1 KiB, the plan's margin)
inline long skip_cluster_sync = 0;     // > 0: every thread skips its skip_cluster_sync-th cluster.sync() (a control)
inline std::atomic<long> most_cluster_syncs{0};  // reported: the most cluster.sync() calls one thread made
inline cudaError_t last_error = cudaSuccess;  // what cudaGetLastError returns (and clears)

// what the last launch was (reported with the results)
inline int launches = 0, last_threads = 0, last_grid = 0, last_cluster = 0;
inline size_t last_smem = 0;
inline std::map<const void*, int> smem_attr;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "EMULATOR FAILURE: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// The kernel's hooks (FASTDISTILL_CUDA_EMULATE in kd_loss_kernel.cuh).
inline float ex2_approx_ftz(float x) {
  if (ex2_bias != 0) x *= 1 + ex2_bias;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;  // .ftz: a denormal result is flushed
}
inline float lg2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;  // .ftz: a denormal argument is flushed (log2(0) = -inf)
  return std::log2(x);
}
inline unsigned char* dynamic_smem() { return block->smem; }

}  // namespace fdemu

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;  // (one launch at a time)

// ---- device functions -------------------------------------------------------------------------------------------
inline void __syncthreads() {
  if (++fdemu::syncs == fdemu::skip_sync) return;
  fdemu::block->bar->arrive_and_wait();
}
[[noreturn]] inline void __trap() { fdemu::fail("__trap"); }

template <class T>
T __shfl_xor_sync(unsigned, T x, int lane_mask) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  fdemu::Warp& w = fdemu::block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  uint64_t u = 0;
  std::memcpy(&u, &x, sizeof(T));
  w.vals[lane].store(u, std::memory_order_relaxed);
  fdemu::relaxed_warp_barrier(w);  // every lane has published its value
  const uint64_t r = w.vals[lane ^ unsigned(lane_mask)].load(std::memory_order_relaxed);
  fdemu::relaxed_warp_barrier(w);  // every lane has read before any writes the next shuffle's
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

inline void __stcs(uint2* p, uint2 v) { *p = v; }
inline void __stcs(uint4* p, uint4 v) { *p = v; }

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n, size_t = 0) {
  if (n != 16 || reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    fdemu::fail("cp.async of other than 16 aligned bytes");
  const fdemu::Block* b = fdemu::block;
  const auto* d = static_cast<unsigned char*>(dst);
  if (d < b->smem || d + n > b->smem + b->smem_bytes) fdemu::fail("cp.async outside the block's shared memory");
  fdemu::issued.push_back({dst, src, n});
  std::memset(dst, 0xFF, n);  // undefined from the issue on (a read of the old bytes after the issue, or of the new
                              // ones before the wait, sees NaN; an unordered reader races with this write)
}
inline void __pipeline_commit() {
  fdemu::committed.push_back(std::move(fdemu::issued));
  fdemu::issued.clear();
}
inline void __pipeline_wait_prior(size_t n) {
  while (fdemu::committed.size() > n) {
    for (const fdemu::Copy& c : fdemu::committed.front()) std::memcpy(c.dst, c.src, c.n);
    fdemu::committed.erase(fdemu::committed.begin());
  }
}

// ---- bf16 / fp16 ------------------------------------------------------------------------------------------------
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // NaN stays a (quiet) NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                            // round to nearest even
  return {uint16_t(u >> 16)};
}
struct __half {
  _Float16 x;
};
inline float __half2float(__half h) { return float(h.x); }
inline __half __float2half_rn(float f) { return {_Float16(f)}; }

// ---- cooperative groups (clusters) -------------------------------------------------------------------------------
namespace cooperative_groups {
struct cluster_group {
  void sync() const {
    if (++fdemu::cluster_syncs == fdemu::skip_cluster_sync) return;
    fdemu::cluster->bar->arrive_and_wait();
  }
  unsigned num_blocks() const { return fdemu::cluster->size; }
  unsigned block_rank() const { return fdemu::rank; }
  template <class T>
  T* map_shared_rank(T* p, unsigned r) const {
    const auto* c = reinterpret_cast<const unsigned char*>(p);
    const fdemu::Block* b = fdemu::block;
    if (c < b->smem || c >= b->smem + b->smem_bytes || r >= fdemu::cluster->size)
      fdemu::fail("map_shared_rank of an address outside shared memory, or a rank outside the cluster");
    return reinterpret_cast<T*>(fdemu::cluster->smems[r] + (c - b->smem));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// ---- runtime ----------------------------------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fdemu::last_error;
  fdemu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNotPermitted: return "operation not permitted";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}

enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrMaxRegistersPerMultiprocessor,
  cudaDevAttrReservedSharedMemoryPerBlock,
};
namespace fdemu {
inline int optin() { return major >= 9 ? 232448 : 166912; }
inline int smem_sm() { return major >= 9 ? 233472 : 167936; }
}  // namespace fdemu
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = fdemu::major; break;
    case cudaDevAttrMultiProcessorCount: *v = fdemu::major >= 9 ? 132 : 108; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = fdemu::optin(); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = fdemu::smem_sm(); break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *v = 65536; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *v = 1024; break;
  }
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}

struct cudaFuncAttributes {
  int maxThreadsPerBlock = 0;
  size_t sharedSizeBytes = 0;
  int numRegs = 0;
};
template <class K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, K) {
  a->maxThreadsPerBlock = fdemu::max_threads;
  a->sharedSizeBytes = size_t(fdemu::static_smem);
  a->numRegs = 120;
  return cudaSuccess;
}
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize,
  cudaFuncAttributePreferredSharedMemoryCarveout,
  cudaFuncAttributeNonPortableClusterSizeAllowed,
};
enum { cudaSharedmemCarveoutMaxShared = 100 };
template <class K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute a, int v) {
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (v > fdemu::optin() - fdemu::static_smem) return cudaErrorInvalidValue;  // opt-in minus the static bytes
    fdemu::smem_attr[reinterpret_cast<const void*>(kernel)] = v;
  }
  return cudaSuccess;
}
template <class K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* v, K, int, size_t smem) {
  *v = int(size_t(fdemu::smem_sm()) / (smem + 2048));
  return cudaSuccess;
}

enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};
template <class K>
cudaError_t cudaOccupancyMaxActiveClusters(int* v, K, const cudaLaunchConfig_t*) {
  *v = fdemu::occupancy_clusters;
  return cudaSuccess;
}

// Runs the kernel to completion (a synchronous launch): cluster after cluster, each with all of its threads.
template <class... P, class... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* c, void (*kernel)(P...), A&&... args) {
  unsigned cs = 1;
  for (unsigned i = 0; i < c->numAttrs; ++i)
    if (c->attrs[i].id == cudaLaunchAttributeClusterDimension) cs = c->attrs[i].val.clusterDim.x;
  const unsigned threads = c->blockDim.x;
  if (cs < 1 || cs > 16) fdemu::fail("cluster size outside 1..16");
  if (fdemu::major < 9 && cs > 1) fdemu::fail("a cluster on sm_80");
  if (c->gridDim.x == 0 || c->gridDim.x % cs) fdemu::fail("grid not whole clusters");
  if (threads == 0 || threads % 32 || int(threads) > fdemu::max_threads) fdemu::fail("block not whole warps, or too big");
  const auto attr = fdemu::smem_attr.find(reinterpret_cast<const void*>(kernel));
  if (c->dynamicSmemBytes > 48 * 1024 &&
      (attr == fdemu::smem_attr.end() || size_t(attr->second) < c->dynamicSmemBytes))
    fdemu::fail("dynamic shared memory above the kernel's attribute");
  fdemu::launches++;
  fdemu::last_threads = int(threads);
  fdemu::last_grid = int(c->gridDim.x);
  fdemu::last_cluster = int(cs);
  fdemu::last_smem = c->dynamicSmemBytes;
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // (by value, as a launch copies them)
  gridDim = c->gridDim;
  blockDim = c->blockDim;
  const size_t bytes = c->dynamicSmemBytes;
  for (unsigned g = 0; g < c->gridDim.x / cs; ++g) {
    fdemu::Cluster cl;
    cl.size = cs;
    cl.bar = std::make_unique<std::barrier<>>(std::ptrdiff_t(cs * threads));
    std::vector<fdemu::Block> blocks(cs);
    for (fdemu::Block& b : blocks) b.live.store(threads);
    std::vector<std::unique_ptr<unsigned char[]>> mem;
    for (fdemu::Block& b : blocks) {
      // exactly the launch's bytes (ASan: nothing past them), 16-byte aligned as the kernel declares them
      b.smem = static_cast<unsigned char*>(::operator new[](bytes ? bytes : 1, std::align_val_t(16)));
      std::memset(b.smem, 0xFF, bytes);
      b.smem_bytes = bytes;
      b.bar = std::make_unique<std::barrier<>>(std::ptrdiff_t(threads));
      b.warps.resize(threads / 32);
      cl.smems.push_back(b.smem);
    }
    std::vector<std::thread> running;
    for (unsigned r = 0; r < cs; ++r)
      for (unsigned t = 0; t < threads; ++t)
        running.emplace_back([&, r, t] {
          threadIdx.x = t;
          blockIdx.x = g * cs + r;
          fdemu::block = &blocks[r];
          fdemu::cluster = &cl;
          fdemu::rank = r;
          fdemu::committed.clear();
          fdemu::issued.clear();
          fdemu::syncs = fdemu::cluster_syncs = 0;
          std::apply(kernel, params);
          long seen = fdemu::most_cluster_syncs.load();
          while (seen < fdemu::cluster_syncs && !fdemu::most_cluster_syncs.compare_exchange_weak(seen, fdemu::cluster_syncs)) {
          }
          // the block's shared memory is released when its last thread exits (DSMEM reads after that are undefined
          // on a GPU): poisoned here, so a later remote read sees NaN and TSan sees the race
          if (fdemu::block->live.fetch_sub(1, std::memory_order_acq_rel) == 1)
            std::memset(fdemu::block->smem, 0xFF, fdemu::block->smem_bytes);
          if (!fdemu::issued.empty()) fdemu::fail("cp.async copies never committed at kernel exit");
          for (const auto& group : fdemu::committed)
            if (!group.empty()) fdemu::fail("cp.async copies never waited for at kernel exit");
        });
    for (std::thread& t : running) t.join();
    for (fdemu::Block& b : blocks) ::operator delete[](b.smem, std::align_val_t(16));
  }
  return cudaSuccess;
}
