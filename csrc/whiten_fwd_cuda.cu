// Forward of the cuda backend (small groups, r <= 128): statistics pass, merge, one block per
// group for the Newton iteration, apply pass. Kernel bodies: whiten_blocks.h.

#include "whiten.h"
#include "whiten_cuda.cuh"

namespace intl_kernels {
namespace small {
namespace {

template <typename scalar_t, int CB>
__global__ void __launch_bounds__(blocks::kThreads, (PassShape<Pass::kStats, CB>::kMinBlocks)) stats_kernel(blocks::StatsArgs<scalar_t> a) {
  INTL_DYNAMIC_SMEM(sm);
  DeviceBlock blk;
  blocks::stats_body<scalar_t, CB>(blk, blockIdx.x, blockIdx.y, sm, a);
}

__global__ void __launch_bounds__(blocks::kThreads) reduce_kernel(blocks::ReduceArgs a) {
  DeviceBlock blk;
  blocks::reduce_body(blk, blockIdx.x, blockIdx.y, nullptr, a);
}

template <int CB>
__global__ void __launch_bounds__(blocks::kThreads) newton_kernel(blocks::NewtonArgs a) {
  __shared__ float sm[blocks::MatShape<CB>::kSmem];
  DeviceBlock blk;
  blocks::newton_body<CB>(blk, blockIdx.x, blockIdx.y, sm, a);
}

struct FwdExec : CudaExecBase {
  using CudaExecBase::CudaExecBase;

  template <Pass P, typename scalar_t, int CB>
  int64_t nblocks(int64_t n, int64_t G) {
    if constexpr (P == Pass::kStats) return plan<P, CB>(stats_kernel<scalar_t, CB>, n, G);
    else return plan<P, CB>(apply_kernel<scalar_t, CB, P == Pass::kApplyBwd>, n, G);
  }
  template <typename scalar_t, int CB>
  void stats(int gx, int gy, const blocks::StatsArgs<scalar_t>& a) {
    launch<Pass::kStats, CB>(stats_kernel<scalar_t, CB>, gx, gy, a);
  }
  void reduce(int gx, int gy, const blocks::ReduceArgs& a) {
    reduce_kernel<<<dim3(gx, gy), blocks::kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <int CB>
  void newton(int gx, int gy, const blocks::NewtonArgs& a) {
    newton_kernel<CB><<<dim3(gx, gy), blocks::kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::vector<at::Tensor> run(const char* op, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias,
                            int64_t T, double eps, double divisor) {
  TORCH_CHECK(z.is_cuda(), op, ": z must be a CUDA tensor, got one on ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  FwdExec ex(op, z);
  return whiten_fwd(ex, op, z, weight, bias, T, eps, divisor);
}

}  // namespace
}  // namespace small

std::vector<at::Tensor> whiten_fwd_cuda(const at::Tensor& z, int64_t T, double eps, double divisor) {
  return small::run("intl_kernels.whiten_fwd (cuda)", z, at::Tensor(), at::Tensor(), T, eps, divisor);
}

std::vector<at::Tensor> whiten_affine_fwd_cuda(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias,
                                               int64_t T, double eps, double divisor) {
  return small::run("intl_kernels.whiten_affine_fwd (cuda)", z, weight, bias, T, eps, divisor);
}

}  // namespace intl_kernels
