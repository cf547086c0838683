// Backward of the cuda backend (small groups, r <= 128): one pass over (Ȳ, Z), merge, one
// block per group for the adjoint recursion, apply pass for Z̄. Kernel bodies: whiten_blocks.h.

#include "whiten.h"
#include "whiten_cuda.cuh"

namespace intl_kernels {
namespace small {
namespace {

template <typename scalar_t, int CB>
__global__ void __launch_bounds__(blocks::kThreads, (PassShape<Pass::kDStats, CB>::kMinBlocks)) dstats_kernel(blocks::DStatsArgs<scalar_t> a) {
  INTL_DYNAMIC_SMEM(sm);
  DeviceBlock blk;
  blocks::dstats_body<scalar_t, CB>(blk, blockIdx.x, blockIdx.y, sm, a);
}

__global__ void __launch_bounds__(blocks::kThreads) dreduce_kernel(blocks::DReduceArgs a) {
  DeviceBlock blk;
  blocks::dreduce_body(blk, blockIdx.x, blockIdx.y, nullptr, a);
}

template <int CB>
__global__ void __launch_bounds__(blocks::kThreads) adjoint_kernel(blocks::AdjointArgs a) {
  __shared__ float sm[blocks::MatShape<CB>::kSmem];
  DeviceBlock blk;
  blocks::adjoint_body<CB>(blk, blockIdx.x, blockIdx.y, sm, a);
}

struct BwdExec : CudaExecBase {
  using CudaExecBase::CudaExecBase;

  template <Pass P, typename scalar_t, int CB>
  int64_t nblocks(int64_t n, int64_t G) {
    if constexpr (P == Pass::kDStats) return plan<P, CB>(dstats_kernel<scalar_t, CB>, n, G);
    else return plan<P, CB>(apply_kernel<scalar_t, CB, P == Pass::kApplyBwd>, n, G);
  }
  template <typename scalar_t, int CB>
  void dstats(int gx, int gy, const blocks::DStatsArgs<scalar_t>& a) {
    launch<Pass::kDStats, CB>(dstats_kernel<scalar_t, CB>, gx, gy, a);
  }
  void dreduce(int gx, int gy, const blocks::DReduceArgs& a) {
    dreduce_kernel<<<dim3(gx, gy), blocks::kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <int CB>
  void adjoint(int gx, int gy, const blocks::AdjointArgs& a) {
    adjoint_kernel<CB><<<dim3(gx, gy), blocks::kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::vector<at::Tensor> run(const char* op, const at::Tensor& dy, const at::Tensor& z, const at::Tensor& weight,
                            const at::Tensor& mean, const at::Tensor& rscale, const at::Tensor& tau,
                            const at::Tensor& A, const at::Tensor& P, const at::Tensor& X, double divisor) {
  TORCH_CHECK(z.is_cuda(), op, ": z must be a CUDA tensor, got one on ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  BwdExec ex(op, z);
  return whiten_bwd(ex, op, dy, z, weight, mean, rscale, tau, A, P, X, divisor);
}

}  // namespace
}  // namespace small

at::Tensor whiten_bwd_cuda(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& rscale,
                           const at::Tensor& tau, const at::Tensor& A, const at::Tensor& P, const at::Tensor& X,
                           double divisor) {
  return small::run("intl_kernels.whiten_bwd (cuda)", dy, z, at::Tensor(), mean, rscale, tau, A, P, X, divisor)[0];
}

std::vector<at::Tensor> whiten_affine_bwd_cuda(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& weight,
                                               const at::Tensor& mean, const at::Tensor& rscale,
                                               const at::Tensor& tau, const at::Tensor& A, const at::Tensor& P,
                                               const at::Tensor& X, double divisor) {
  return small::run("intl_kernels.whiten_affine_bwd (cuda)", dy, z, weight, mean, rscale, tau, A, P, X, divisor);
}

}  // namespace intl_kernels
