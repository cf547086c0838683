#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace intl_kernels {

// Forward of whiten on CPU. Returns {y, mean, rscale, tau, A, P, X}; see whiten_cpu.cpp.
std::vector<at::Tensor> whiten_fwd_cpu(const at::Tensor& z, int64_t T, double eps, double divisor);

// Backward of whiten on CPU: dz from dy and the statistics saved by whiten_fwd_cpu.
at::Tensor whiten_bwd_cpu(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                          const at::Tensor& rscale, const at::Tensor& tau, const at::Tensor& A,
                          const at::Tensor& P, const at::Tensor& X, double divisor);

// The same with a per-row affine y ← weight·y + bias folded in (weight, bias: (G, r)); the
// backward also returns dweight and dbias (the IterNorm layer's affine).
std::vector<at::Tensor> whiten_affine_fwd_cpu(const at::Tensor& z, const at::Tensor& weight,
                                              const at::Tensor& bias, int64_t T, double eps, double divisor);
std::vector<at::Tensor> whiten_affine_bwd_cpu(const at::Tensor& dy, const at::Tensor& z,
                                              const at::Tensor& weight, const at::Tensor& mean,
                                              const at::Tensor& rscale, const at::Tensor& tau,
                                              const at::Tensor& A, const at::Tensor& P, const at::Tensor& X,
                                              double divisor);

#ifdef INTL_KERNELS_WITH_CUDA
// The cuda backend: small groups (1 <= r <= 128 rows, G <= 65535), float32/bfloat16/float16
// inputs on a CUDA device, the same outputs and statistics as the CPU ops
// (whiten_fwd_cuda.cu, whiten_bwd_cuda.cu; kernel bodies in whiten_blocks.h).
std::vector<at::Tensor> whiten_fwd_cuda(const at::Tensor& z, int64_t T, double eps, double divisor);
at::Tensor whiten_bwd_cuda(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                           const at::Tensor& rscale, const at::Tensor& tau, const at::Tensor& A,
                           const at::Tensor& P, const at::Tensor& X, double divisor);
std::vector<at::Tensor> whiten_affine_fwd_cuda(const at::Tensor& z, const at::Tensor& weight,
                                               const at::Tensor& bias, int64_t T, double eps, double divisor);
std::vector<at::Tensor> whiten_affine_bwd_cuda(const at::Tensor& dy, const at::Tensor& z,
                                               const at::Tensor& weight, const at::Tensor& mean,
                                               const at::Tensor& rscale, const at::Tensor& tau,
                                               const at::Tensor& A, const at::Tensor& P, const at::Tensor& X,
                                               double divisor);
#endif

}  // namespace intl_kernels
