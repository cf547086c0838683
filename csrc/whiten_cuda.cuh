// CUDA side of the small-group kernels: the block abstraction of whiten_blocks.h on the GPU
// (a phase is the calling thread's part, a barrier is __syncthreads), the launcher shared by
// whiten_fwd_cuda.cu and whiten_bwd_cuda.cu, and the apply kernel both use.

#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <utility>

#include "whiten_blocks.h"
#include "whiten_small.h"

namespace intl_kernels {
namespace small {

struct DeviceBlock {
  template <class T>
  struct Local {
    T v;
    __device__ __forceinline__ T& operator[](int) { return v; }
  };
  template <class F>
  __device__ __forceinline__ void each(F&& f) {
    f(static_cast<int>(threadIdx.x));
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
  // Called by every thread of the block: the warp's max (one REDUX on sm_80+), then one shared
  // atomic per warp.
  __device__ __forceinline__ void atomic_max(int* p, int v) {
    const int m = __reduce_max_sync(0xffffffffu, v);
    if ((threadIdx.x & 31) == 0) atomicMax(p, m);
  }
};

// Dynamic shared memory, 16-byte aligned (float4 loads and stores).
#define INTL_DYNAMIC_SMEM(name)          \
  extern __shared__ float4 name##_v4[]; \
  float* name = reinterpret_cast<float*>(name##_v4)

template <typename scalar_t, int CB, bool BWD>
__global__ void __launch_bounds__(blocks::kThreads,
                                  (PassShape<BWD ? Pass::kApplyBwd : Pass::kApplyFwd, CB>::kMinBlocks))
    apply_kernel(blocks::ApplyArgs<scalar_t> a) {
  INTL_DYNAMIC_SMEM(sm);
  DeviceBlock blk;
  blocks::apply_body<scalar_t, CB, BWD>(blk, blockIdx.x, blockIdx.y, sm, a);
}

// Launch state: the current stream of the input's device, its SMs and its per-block shared
// memory limit (opt-in).
struct CudaExecBase {
  static constexpr c10::DeviceType kDevice = c10::kCUDA;
  const char* op;
  int device;
  cudaStream_t stream;
  int64_t sms;
  int64_t smem_optin;

  CudaExecBase(const char* op_name, const at::Tensor& z)
      : op(op_name),
        device(z.get_device()),
        stream(c10::cuda::getCurrentCUDAStream(z.get_device()).stream()),
        sms(attribute(cudaDevAttrMultiProcessorCount, z.get_device())),
        smem_optin(attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, z.get_device())) {}

  static int64_t attribute(cudaDeviceAttr attr, int device) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
    return v;
  }

  // Makes a streaming kernel launchable with `bytes` of dynamic shared memory on this device
  // (checked against the opt-in limit; the attributes set once per kernel and device) and
  // returns its resident blocks per SM (cudaOccupancyMaxActiveBlocksPerMultiprocessor).
  template <class Kernel>
  int64_t prepare(Kernel kernel, size_t bytes, Pass pass, int rows) {
    TORCH_CHECK(static_cast<int64_t>(bytes) <= smem_optin, op, ": the ", pass_name(pass), " kernel (rows <= ", rows,
                ") needs ", bytes, " bytes of shared memory per block; device ", device, " allows ", smem_optin,
                " (cudaDevAttrMaxSharedMemoryPerBlockOptin)");
    static std::mutex mutex;
    static std::map<std::pair<const void*, int>, int64_t> cache;
    const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) return found->second;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, blocks::kThreads, bytes));
    TORCH_CHECK(per_sm >= 1, op, ": the ", pass_name(pass), " kernel (rows <= ", rows, ") cannot run on device ",
                device, " (no resident block with ", bytes, " bytes of shared memory)");
    cache.emplace(key, per_sm);
    return per_sm;
  }

  // Blocks per group of a streaming pass: resident blocks × SMs slots, in whole waves (plan_blocks).
  template <Pass P, int CB, class Kernel>
  int64_t plan(Kernel kernel, int64_t n, int64_t G) {
    using Shape = PassShape<P, CB>;
    const int64_t slots = prepare(kernel, Shape::kBytes, P, CB) * sms;
    return plan_blocks((n + Shape::kColumns - 1) / Shape::kColumns, G, slots);
  }

  template <Pass P, int CB, class Kernel, class Args>
  void launch(Kernel kernel, int gx, int gy, const Args& a) {
    constexpr size_t bytes = PassShape<P, CB>::kBytes;
    prepare(kernel, bytes, P, CB);
    kernel<<<dim3(gx, gy), blocks::kThreads, bytes, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t, int CB, bool BWD>
  void apply(int gx, int gy, const blocks::ApplyArgs<scalar_t>& a) {
    launch<BWD ? Pass::kApplyBwd : Pass::kApplyFwd, CB>(apply_kernel<scalar_t, CB, BWD>, gx, gy, a);
  }
};

}  // namespace small
}  // namespace intl_kernels
