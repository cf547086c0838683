// Registers the intl_kernels ops with the PyTorch dispatcher (namespace `intl_kernels`): CPU
// kernels always, CUDA kernels when the extension is built with nvcc (INTL_KERNELS_WITH_CUDA).
// Fake (meta) implementations live in intl_kernels/_ext.py; autograd is wired in Python
// (intl_kernels.whiten.WhitenFn) so the backward is the hand-written one.

#include <torch/extension.h>

#include <tuple>

#include "whiten.h"
#include "whiten_small.h"

namespace intl_kernels {
namespace {

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Fwd as_fwd(const std::vector<at::Tensor>& o) { return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]}; }

Fwd whiten_fwd_cpu_op(const at::Tensor& z, int64_t T, double eps, double divisor) {
  return as_fwd(whiten_fwd_cpu(z, T, eps, divisor));
}

Fwd whiten_affine_fwd_cpu_op(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, int64_t T,
                             double eps, double divisor) {
  return as_fwd(whiten_affine_fwd_cpu(z, weight, bias, T, eps, divisor));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> whiten_affine_bwd_cpu_op(
    const at::Tensor& dy, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rscale, const at::Tensor& tau, const at::Tensor& A, const at::Tensor& P,
    const at::Tensor& X, double divisor) {
  auto o = whiten_affine_bwd_cpu(dy, z, weight, mean, rscale, tau, A, P, X, divisor);
  return {o[0], o[1], o[2]};
}

#ifdef INTL_KERNELS_WITH_CUDA
Fwd whiten_fwd_cuda_op(const at::Tensor& z, int64_t T, double eps, double divisor) {
  return as_fwd(whiten_fwd_cuda(z, T, eps, divisor));
}

Fwd whiten_affine_fwd_cuda_op(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, int64_t T,
                              double eps, double divisor) {
  return as_fwd(whiten_affine_fwd_cuda(z, weight, bias, T, eps, divisor));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> whiten_affine_bwd_cuda_op(
    const at::Tensor& dy, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rscale, const at::Tensor& tau, const at::Tensor& A, const at::Tensor& P,
    const at::Tensor& X, double divisor) {
  auto o = whiten_affine_bwd_cuda(dy, z, weight, mean, rscale, tau, A, P, X, divisor);
  return {o[0], o[1], o[2]};
}
#endif

}  // namespace

TORCH_LIBRARY(intl_kernels, m) {
  m.def(
      "whiten_fwd(Tensor z, int T, float eps, float divisor) -> "
      "(Tensor y, Tensor mean, Tensor rscale, Tensor tau, Tensor A, Tensor P, Tensor X)");
  m.def(
      "whiten_bwd(Tensor dy, Tensor z, Tensor mean, Tensor rscale, Tensor tau, Tensor A, Tensor P, "
      "Tensor X, float divisor) -> Tensor");
  m.def(
      "whiten_affine_fwd(Tensor z, Tensor weight, Tensor bias, int T, float eps, float divisor) -> "
      "(Tensor y, Tensor mean, Tensor rscale, Tensor tau, Tensor A, Tensor P, Tensor X)");
  m.def(
      "whiten_affine_bwd(Tensor dy, Tensor z, Tensor weight, Tensor mean, Tensor rscale, Tensor tau, "
      "Tensor A, Tensor P, Tensor X, float divisor) -> (Tensor dz, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(intl_kernels, CPU, m) {
  m.impl("whiten_fwd", &whiten_fwd_cpu_op);
  m.impl("whiten_bwd", &whiten_bwd_cpu);
  m.impl("whiten_affine_fwd", &whiten_affine_fwd_cpu_op);
  m.impl("whiten_affine_bwd", &whiten_affine_bwd_cpu_op);
}

#ifdef INTL_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(intl_kernels, CUDA, m) {
  m.impl("whiten_fwd", &whiten_fwd_cuda_op);
  m.impl("whiten_bwd", &whiten_bwd_cuda);
  m.impl("whiten_affine_fwd", &whiten_affine_fwd_cuda_op);
  m.impl("whiten_affine_bwd", &whiten_affine_bwd_cuda_op);
}
#endif

}  // namespace intl_kernels

namespace {

// The cuda backend's streaming kernels as launched: tile columns, threads and dynamic shared
// memory per block (verify/sass_report.py; the same on every device).
template <intl_kernels::small::Pass P, int CB>
pybind11::dict kernel_shape(const char* kernel, bool bwd) {
  using Shape = intl_kernels::small::PassShape<P, CB>;
  pybind11::dict d;
  d["kernel"] = kernel;
  d["bwd"] = bwd;
  d["rows"] = CB;
  d["columns"] = Shape::kColumns;
  d["threads"] = intl_kernels::blocks::kThreads;
  d["dynamic_smem"] = Shape::kBytes;
  return d;
}

template <int CB>
void add_shapes(pybind11::list& out) {
  using intl_kernels::small::Pass;
  out.append(kernel_shape<Pass::kStats, CB>("stats", false));
  out.append(kernel_shape<Pass::kApplyFwd, CB>("apply", false));
  out.append(kernel_shape<Pass::kDStats, CB>("dstats", true));
  out.append(kernel_shape<Pass::kApplyBwd, CB>("apply", true));
}

}  // namespace

// An importable module: loading it runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "intl_kernels C++ ops (torch.ops.intl_kernels)";
  m.def(
      "cuda_built",
      [] {
#ifdef INTL_KERNELS_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled into this extension");
  m.def(
      "small_kernel_shapes",
      [] {
        pybind11::list out;
        add_shapes<32>(out);
        add_shapes<64>(out);
        add_shapes<128>(out);
        return out;
      },
      "The cuda backend's streaming kernels: kernel, bwd, rows (bucket), columns (per tile), threads, "
      "dynamic_smem (bytes per block)");
  m.def("plan_blocks", &intl_kernels::small::plan_blocks, pybind11::arg("tiles"), pybind11::arg("groups"),
        pybind11::arg("slots"),
        "Blocks per group the cuda launcher gives a streaming pass over `groups` groups of `tiles` column "
        "tiles with `slots` resident blocks (blocks per SM x SMs)");
}
