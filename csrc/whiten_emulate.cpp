// Host emulator of the cuda backend's kernels (whiten_blocks.h), for machines without a GPU.
//
// Each block of a grid runs on one CPU thread; inside a block the threads of a phase run one
// after the other, in increasing or (reverse_threads) decreasing order, and a barrier ends a
// phase. Shared memory starts filled with NaN, as a stand-in for the GPU's garbage. Whatever
// a kernel body computes here it computes on the GPU, provided threads exchange data only
// through shared or global memory across barriers. Two checks hold the bodies to that: two
// phases with no barrier between them are an error here, and the tests run both thread
// orders and require bitwise equal results (a phase that reads what another thread of the
// same phase writes gives different bits).
//
// Ops (CPU tensors, for tests): intl_kernels::emulate_small_whiten_fwd / _bwd, with the
// schema of the affine ops plus `chunk` and `reverse_threads`. `chunk` (a multiple of 64) sets
// the blocks per group of every streaming pass to ceil(n / chunk), at most one per tile, the
// tiles split evenly (Part); 0 plans the grid as the launcher does (plan_blocks) for a small
// stand-in device of kStandInSlots resident blocks.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "whiten_blocks.h"
#include "whiten_small.h"

namespace intl_kernels {
namespace small {
namespace {

struct HostBlock {
  bool reverse;
  bool synced = true;  // a barrier since the last phase (phases must be separated by one)
  template <class T>
  struct Local {
    std::vector<T> v = std::vector<T>(kThreads);
    T& operator[](int t) { return v[t]; }
  };
  template <class F>
  void each(F&& f) {
    TORCH_CHECK(synced, "emulated kernel: two phases without a barrier between them");
    synced = false;
    if (reverse)
      for (int t = kThreads - 1; t >= 0; --t) f(t);
    else
      for (int t = 0; t < kThreads; ++t) f(t);
  }
  void sync() { synced = true; }
  void atomic_max(int* p, int v) { *p = std::max(*p, v); }
};

constexpr int64_t kStandInSlots = 8;  // resident blocks of the stand-in device (deterministic)

struct HostExec {
  static constexpr c10::DeviceType kDevice = c10::kCPU;
  int64_t forced_chunk;
  bool reverse;

  template <Pass P, typename scalar_t, int CB>
  int64_t nblocks(int64_t n, int64_t G) const {
    constexpr int tn = PassShape<P, CB>::kColumns;
    if (forced_chunk > 0) return forced_blocks(n, tn, forced_chunk);
    return plan_blocks((n + tn - 1) / tn, G, kStandInSlots);
  }

  // Shared memory as on the GPU: 16-byte aligned, NaN-filled, and followed by a guard zone of
  // kGuardFloats: NaN there makes a read past the end poison the results, and a write past the
  // end (the guard no longer NaN) is an error.
  static constexpr int kGuardFloats = 64;

  template <class Body>
  void grid(int gx, int gy, int smem_floats, Body&& body) {
    at::parallel_for(0, static_cast<int64_t>(gx) * gy, 1, [&](int64_t begin, int64_t end) {
      std::vector<blocks::F4> storage((smem_floats + kGuardFloats + 3) / 4);
      float* sm = storage.data()->e;
      const int total = static_cast<int>(storage.size()) * 4;
      for (int64_t b = begin; b < end; ++b) {
        std::fill(sm, sm + total, std::numeric_limits<float>::quiet_NaN());
        HostBlock blk{reverse};
        body(blk, static_cast<int>(b % gx), static_cast<int>(b / gx), sm);
        for (int i = smem_floats; i < total; ++i)
          TORCH_CHECK(std::isnan(sm[i]), "emulated kernel: a shared-memory write past its ", smem_floats,
                      " floats (at float ", i, ")");
      }
    });
  }

  template <typename scalar_t, int CB>
  void stats(int gx, int gy, const blocks::StatsArgs<scalar_t>& a) {
    grid(gx, gy, blocks::StatsShape<CB>::kSmem,
         [&](HostBlock& b, int x, int y, float* sm) { blocks::stats_body<scalar_t, CB>(b, x, y, sm, a); });
  }
  void reduce(int gx, int gy, const blocks::ReduceArgs& a) {
    grid(gx, gy, 0, [&](HostBlock& b, int x, int y, float* sm) { blocks::reduce_body(b, x, y, sm, a); });
  }
  template <int CB>
  void newton(int gx, int gy, const blocks::NewtonArgs& a) {
    grid(gx, gy, blocks::MatShape<CB>::kSmem,
         [&](HostBlock& b, int x, int y, float* sm) { blocks::newton_body<CB>(b, x, y, sm, a); });
  }
  template <typename scalar_t, int CB, bool BWD>
  void apply(int gx, int gy, const blocks::ApplyArgs<scalar_t>& a) {
    grid(gx, gy, blocks::ApplyShape<CB, BWD>::kSmem,
         [&](HostBlock& b, int x, int y, float* sm) { blocks::apply_body<scalar_t, CB, BWD>(b, x, y, sm, a); });
  }
  template <typename scalar_t, int CB>
  void dstats(int gx, int gy, const blocks::DStatsArgs<scalar_t>& a) {
    grid(gx, gy, blocks::DStatsShape<CB>::kSmem,
         [&](HostBlock& b, int x, int y, float* sm) { blocks::dstats_body<scalar_t, CB>(b, x, y, sm, a); });
  }
  void dreduce(int gx, int gy, const blocks::DReduceArgs& a) {
    grid(gx, gy, 0, [&](HostBlock& b, int x, int y, float* sm) { blocks::dreduce_body(b, x, y, sm, a); });
  }
  template <int CB>
  void adjoint(int gx, int gy, const blocks::AdjointArgs& a) {
    grid(gx, gy, blocks::MatShape<CB>::kSmem,
         [&](HostBlock& b, int x, int y, float* sm) { blocks::adjoint_body<CB>(b, x, y, sm, a); });
  }
};

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

HostExec make_exec(const char* op, int64_t chunk, bool reverse) {
  TORCH_CHECK(chunk >= 0 && chunk % kChunkQuantum == 0, op, ": chunk must be 0 or a positive multiple of ",
              kChunkQuantum, ", got ", chunk);
  return HostExec{chunk, reverse};
}

Fwd emulate_fwd(const at::Tensor& z, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                int64_t T, double eps, double divisor, int64_t chunk, bool reverse_threads) {
  const char* op = "intl_kernels.emulate_small_whiten_fwd";
  auto ex = make_exec(op, chunk, reverse_threads);
  auto o = whiten_fwd(ex, op, z, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), T, eps, divisor);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_bwd(
    const at::Tensor& dy, const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rscale, const at::Tensor& tau, const at::Tensor& A, const at::Tensor& P, const at::Tensor& X,
    double divisor, int64_t chunk, bool reverse_threads) {
  const char* op = "intl_kernels.emulate_small_whiten_bwd";
  auto ex = make_exec(op, chunk, reverse_threads);
  auto o = whiten_bwd(ex, op, dy, z, weight.value_or(at::Tensor()), mean, rscale, tau, A, P, X, divisor);
  auto none = z.new_empty({0}, z.options().dtype(at::kFloat));
  return {o[0], o[1].defined() ? o[1] : none, o[2].defined() ? o[2] : none};
}

}  // namespace
}  // namespace small

TORCH_LIBRARY_FRAGMENT(intl_kernels, m) {
  m.def(
      "emulate_small_whiten_fwd(Tensor z, Tensor? weight, Tensor? bias, int T, float eps, float divisor, "
      "int chunk=0, bool reverse_threads=False) -> "
      "(Tensor y, Tensor mean, Tensor rscale, Tensor tau, Tensor A, Tensor P, Tensor X)");
  m.def(
      "emulate_small_whiten_bwd(Tensor dy, Tensor z, Tensor? weight, Tensor mean, Tensor rscale, Tensor tau, "
      "Tensor A, Tensor P, Tensor X, float divisor, int chunk=0, bool reverse_threads=False) -> "
      "(Tensor dz, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(intl_kernels, CPU, m) {
  m.impl("emulate_small_whiten_fwd", &small::emulate_fwd);
  m.impl("emulate_small_whiten_bwd", &small::emulate_bwd);
}

// A call with a meta tensor among CPU ones dispatches to Meta: the same functions, so that it
// reaches the launcher's device checks (which refuse anything but CPU tensors here) and fails
// with their message instead of the dispatcher's.
TORCH_LIBRARY_IMPL(intl_kernels, Meta, m) {
  m.impl("emulate_small_whiten_fwd", &small::emulate_fwd);
  m.impl("emulate_small_whiten_bwd", &small::emulate_bwd);
}

}  // namespace intl_kernels
