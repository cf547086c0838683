// CUDA side of the small-group kernels: the block abstraction of whiten_blocks.h on the GPU
// (a phase is the calling thread's part, a barrier is __syncthreads), the launcher shared by
// whiten_fwd_cuda.cu and whiten_bwd_cuda.cu, and the apply kernel both use.

#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

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
  __device__ __forceinline__ void atomic_max(int* p, int v) { atomicMax(p, v); }
};

template <typename scalar_t, int CB, bool BWD>
__global__ void __launch_bounds__(blocks::kThreads) apply_kernel(blocks::ApplyArgs<scalar_t> a) {
  extern __shared__ float sm[];
  DeviceBlock blk;
  blocks::apply_body<scalar_t, CB, BWD>(blk, blockIdx.x, blockIdx.y, sm, a);
}

// Launch state: the current stream of the input's device and its number of SMs.
struct CudaExecBase {
  static constexpr c10::DeviceType kDevice = c10::kCUDA;
  cudaStream_t stream;
  int64_t sms;

  explicit CudaExecBase(const at::Tensor& z)
      : stream(c10::cuda::getCurrentCUDAStream(z.get_device()).stream()), sms(multiprocessors(z.get_device())) {}

  static int64_t multiprocessors(int device) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }

  // About four blocks per SM in all: enough bytes in flight for the memory-bound passes.
  int64_t chunk(int64_t n, int64_t G) const { return plan_chunk(n, G, 4 * sms); }

  template <typename scalar_t, int CB, bool BWD>
  void apply(int gx, int gy, const blocks::ApplyArgs<scalar_t>& a) {
    constexpr size_t bytes = sizeof(float) * blocks::ApplyShape<CB, BWD>::kSmem;
    auto kernel = apply_kernel<scalar_t, CB, BWD>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    kernel<<<dim3(gx, gy), blocks::kThreads, bytes, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace small
}  // namespace intl_kernels
