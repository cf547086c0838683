// Host side of the small-group kernels (whiten_blocks.h): argument checks, allocation of the
// outputs, statistics and scratch, and the order of the launches. Generic over an `Exec` that
// runs a kernel body over a grid: the CUDA launcher (whiten_fwd_cuda.cu, whiten_bwd_cuda.cu)
// or the host emulator (whiten_emulate.cpp), so the tests on machines without a GPU check the
// same launch sequence the GPU runs.
//
// Exec provides: kDevice; nblocks<Pass, scalar_t, CB>(n, G) -> blocks per group of a streaming
// pass; and, for the forward, stats<scalar_t, CB>, reduce, newton<CB>, apply<scalar_t, CB, false>;
// for the backward, dstats<scalar_t, CB>, dreduce, adjoint<CB>, apply<scalar_t, CB, true>, each
// taking (grid x, grid y, args).

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "whiten_blocks.h"

namespace intl_kernels {
namespace small {

using blocks::kChunkQuantum;
using blocks::kMaxRows;
using blocks::kThreads;

// The streaming passes, their tile widths, shared memory (bytes per block, all dynamic) and the
// blocks per SM their register budget is compiled for (__launch_bounds__): up to c = 64, 2 for the
// statistics passes (8×8 Gram tiles: <= 128 registers) and 4 for the apply passes (<= 64), which
// tile the grid of 132 SMs in whole waves at the ResNet-50 shapes (plan_blocks); fewer at c > 64,
// where the tiles would spill at those budgets.
enum class Pass { kStats, kApplyFwd, kDStats, kApplyBwd };

template <Pass P, int CB>
struct PassShape;
template <int CB>
struct PassShape<Pass::kStats, CB> {
  static constexpr int kMinBlocks = CB <= 64 ? 2 : 1;
  static constexpr int kColumns = blocks::StatsShape<CB>::TN;
  static constexpr size_t kBytes = sizeof(float) * blocks::StatsShape<CB>::kSmem;
};
template <int CB>
struct PassShape<Pass::kDStats, CB> {
  static constexpr int kMinBlocks = CB <= 64 ? 2 : 1;
  static constexpr int kColumns = blocks::DStatsShape<CB>::TN;
  static constexpr size_t kBytes = sizeof(float) * blocks::DStatsShape<CB>::kSmem;
};
template <int CB>
struct PassShape<Pass::kApplyFwd, CB> {
  static constexpr int kMinBlocks = CB <= 64 ? 4 : 2;
  static constexpr int kColumns = blocks::ApplyShape<CB, false>::TN;
  static constexpr size_t kBytes = sizeof(float) * blocks::ApplyShape<CB, false>::kSmem;
};
template <int CB>
struct PassShape<Pass::kApplyBwd, CB> {
  static constexpr int kMinBlocks = CB <= 64 ? 4 : 1;  // c > 64: [W | M]ᵀ streamed, 8×4 tile
  static constexpr int kColumns = blocks::ApplyShape<CB, true>::TN;
  static constexpr size_t kBytes = sizeof(float) * blocks::ApplyShape<CB, true>::kSmem;
};

inline const char* pass_name(Pass p) {
  switch (p) {
    case Pass::kStats: return "statistics";
    case Pass::kApplyFwd: return "forward apply";
    case Pass::kDStats: return "backward statistics";
    default: return "backward apply";
  }
}

// Blocks per group for a streaming pass over G groups of `tiles` column tiles, on a device with
// `slots` resident blocks of the kernel (blocks per SM from its occupancy × SMs): the fewest whole
// waves, G·nb = w·slots for the smallest w in 1..kMaxWaves, as long as every block keeps at least
// kMinTiles tiles (Part gives them floor or ceil of tiles/nb). A grid of whole waves has no tail
// (the last wave full, as the first). Where no w qualifies (small n, a G that divides no small
// multiple of the slots) it minimises waves × tiles per block, the makespan in tile times, and
// takes the fewest blocks among equals.
constexpr int64_t kMaxWaves = 16;
constexpr int64_t kMinTiles = 2;

inline int64_t plan_blocks(int64_t tiles, int64_t G, int64_t slots) {
  TORCH_CHECK(tiles >= 1 && G >= 1 && slots >= 1, "plan_blocks: tiles, G and slots must be >= 1, got ", tiles, ", ",
              G, ", ", slots);
  for (int64_t w = 1; w <= kMaxWaves; ++w) {
    if (w * slots % G != 0) continue;
    const int64_t nb = w * slots / G;
    if (nb * kMinTiles > tiles) break;  // more waves only make the blocks smaller
    return nb;
  }
  int64_t best = 1, best_cost = -1;
  const int64_t top = std::min<int64_t>(tiles, (kMaxWaves * slots + G - 1) / G);
  for (int64_t nb = 1; nb <= top; ++nb) {
    const int64_t cost = (G * nb + slots - 1) / slots * ((tiles + nb - 1) / nb);
    if (best_cost < 0 || cost < best_cost) {
      best = nb;
      best_cost = cost;
    }
  }
  return best;
}

// Blocks per group when the caller forces the columns per block (the emulator's `chunk`): as
// many blocks as chunks of that width, at most one per tile; the tiles are then split evenly.
inline int64_t forced_blocks(int64_t n, int tn, int64_t chunk) {
  return std::min((n + chunk - 1) / chunk, (n + tn - 1) / tn);
}

inline at::Tensor as4d(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(2) : t; }

template <typename T>
blocks::Strided<T> strided(const at::Tensor& t4) {
  return {reinterpret_cast<T*>(t4.data_ptr()), t4.stride(0), t4.stride(1), t4.stride(2), t4.stride(3), t4.size(3)};
}

template <typename F>
void dispatch_rows(int c, F&& f) {
  const int cb = blocks::row_bucket(c);
  if (cb == 32) f(std::integral_constant<int, 32>{});
  else if (cb == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  if (st == at::kFloat) f(float{});
  else if (st == at::kHalf) f(at::Half{});
  else f(at::BFloat16{});
}

// f(scalar_t{}, std::integral_constant<int, CB>{}) for the input dtype and c's row bucket.
template <typename F>
void dispatch_kernels(at::ScalarType st, int c, F&& f) {
  dispatch_dtype(st, [&](auto tag) { dispatch_rows(c, [&](auto cb) { f(tag, cb); }); });
}

inline void check_input(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type(),
              " (use backend='torch' or 'cpu' for float64)");
  TORCH_CHECK(t.dim() == 3 || t.dim() == 4, op, ": ", name, " must be 3-D (G, r, n) or 4-D (G, r, n1, n2), got ",
              t.dim(), "-D");
  const int64_t c = t.size(1);
  TORCH_CHECK(c >= 1 && c <= kMaxRows, op, ": ", name, " has r = ", c,
              " rows per group; the cuda backend handles 1 <= r <= ", kMaxRows,
              " (use backend='triton' or 'torch' for larger groups)");
  TORCH_CHECK(t.size(0) >= 1 && t.size(0) <= 65535, op, ": ", name, " must have 1 <= G <= 65535 groups, got ",
              t.size(0));
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " must have n >= 1 columns, got shape ", t.sizes());
}

inline void check_stat(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                       const at::Tensor& z) {
  TORCH_CHECK(t.device() == z.device(), op, ": ", name, " must be on ", z.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

inline at::Tensor check_affine(const char* op, const char* name, const at::Tensor& t, int64_t G, int64_t c,
                               const at::Tensor& z) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.device() == z.device(), op, ": ", name, " must be on ", z.device(), ", got ", t.device());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == G * c, op, ": ", name, " must have G·r = ", G * c, " elements (shape (G, r)), got shape ",
              t.sizes());
  return t.reshape({G, c}).to(at::kFloat).contiguous();
}

// The arguments both apply passes share.
template <typename scalar_t>
blocks::ApplyArgs<scalar_t> apply_args(const at::Tensor& z4, at::Tensor& out4, int64_t T, int64_t n, int nblk,
                                       const at::Tensor& mean, const at::Tensor& rscale) {
  blocks::ApplyArgs<scalar_t> a{};
  a.z = strided<const scalar_t>(z4);
  a.dy = a.z;
  a.out = strided<scalar_t>(out4);
  a.c = static_cast<int>(z4.size(1));
  a.T = static_cast<int>(T);
  a.G = static_cast<int>(z4.size(0));
  a.n = n;
  a.nblk = nblk;
  a.mean = mean.data_ptr<float>();
  a.rscale = rscale.data_ptr<float>();
  return a;
}

// Forward. Returns {y, mean, rscale, tau, A, P, X} (the contract of the torch backend).
template <class Exec>
std::vector<at::Tensor> whiten_fwd(Exec& ex, const char* op, const at::Tensor& z_in, const at::Tensor& weight_in,
                                   const at::Tensor& bias_in, int64_t T, double eps, double divisor) {
  check_input(op, "z", z_in, Exec::kDevice);
  TORCH_CHECK(T >= 1, op, ": T must be >= 1, got ", T);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be a finite number >= 0, got ", eps);
  TORCH_CHECK(divisor > 0.0 && std::isfinite(divisor), op, ": divisor must be a finite number > 0, got ", divisor);
  const auto z = as4d(z_in);
  const int64_t G = z.size(0), c = z.size(1), n = z.size(2) * z.size(3);
  TORCH_CHECK(weight_in.defined() == bias_in.defined(), op, ": weight and bias must be given together");
  const auto weight = check_affine(op, "weight", weight_in, G, c, z);
  const auto bias = check_affine(op, "bias", bias_in, G, c, z);

  const auto f32 = z.options().dtype(at::kFloat);
  auto y_in = at::empty_like(z_in);
  auto y = as4d(y_in);
  auto mean = at::empty({G, c, 1}, f32);
  auto rscale = at::empty({G, 1, 1}, f32);
  auto tau = at::empty({G, 1, 1}, f32);
  auto A = at::empty({G, c, c}, f32);
  auto P = at::empty({T, G, c, c}, f32);
  auto X = at::empty({T - 1, G, c, c}, f32);
  auto tmp = at::empty({G, 2, c, c}, f32);

  int e_eps = blocks::kNoExp;
  float eps_root = 0.0f;
  if (eps > 0.0) {
    eps_root = static_cast<float>(std::sqrt(eps));
    int e = 0;
    std::frexp(eps_root, &e);
    e_eps = blocks::clamp_exp(e);
  }
  const int ci = static_cast<int>(c), Ti = static_cast<int>(T), Gi = static_cast<int>(G);
  const int reduce_x = static_cast<int>((c * c + kThreads - 1) / kThreads);
  dispatch_kernels(z.scalar_type(), ci, [&](auto tag, auto cb) {
    using scalar_t = decltype(tag);
    constexpr int CB = decltype(cb)::value;
    const int nblk = static_cast<int>(ex.template nblocks<Pass::kStats, scalar_t, CB>(n, G));
    auto part_q = at::empty({G, nblk, c, c}, f32);
    auto part_v = at::empty({G, nblk, 2, c}, f32);
    auto part_e = at::empty({G, nblk}, z.options().dtype(at::kInt));
    blocks::StatsArgs<scalar_t> sa{strided<const scalar_t>(z), ci, n, nblk,
                                   part_q.data_ptr<float>(), part_v.data_ptr<float>(), part_e.data_ptr<int>()};
    ex.template stats<scalar_t, CB>(nblk, Gi, sa);
    blocks::ReduceArgs ra{ci, n, PassShape<Pass::kStats, CB>::kColumns, nblk, e_eps, static_cast<float>(divisor),
                          part_q.data_ptr<float>(), part_v.data_ptr<float>(), part_e.data_ptr<int>(),
                          A.data_ptr<float>(), mean.data_ptr<float>(), rscale.data_ptr<float>()};
    ex.reduce(reduce_x, Gi, ra);
    blocks::NewtonArgs na{ci, Ti, Gi, eps_root, rscale.data_ptr<float>(), A.data_ptr<float>(),
                          tau.data_ptr<float>(), P.data_ptr<float>(), T > 1 ? X.data_ptr<float>() : nullptr,
                          tmp.data_ptr<float>()};
    ex.template newton<CB>(1, Gi, na);
    const int nblk_apply = static_cast<int>(ex.template nblocks<Pass::kApplyFwd, scalar_t, CB>(n, G));
    auto aa = apply_args<scalar_t>(z, y, T, n, nblk_apply, mean, rscale);
    aa.tau = tau.data_ptr<float>();
    aa.P = P.data_ptr<float>();
    aa.weight = weight.defined() ? weight.data_ptr<float>() : nullptr;
    aa.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    ex.template apply<scalar_t, CB, false>(nblk_apply, Gi, aa);
  });
  return {y_in, mean, rscale, tau, A, P, X};
}

// Backward. Returns {dz, dweight, dbias}; the last two are undefined without an affine weight.
template <class Exec>
std::vector<at::Tensor> whiten_bwd(Exec& ex, const char* op, const at::Tensor& dy_in, const at::Tensor& z_in,
                                   const at::Tensor& weight_in, const at::Tensor& mean_in,
                                   const at::Tensor& rscale_in, const at::Tensor& tau_in, const at::Tensor& A_in,
                                   const at::Tensor& P_in, const at::Tensor& X_in, double divisor) {
  check_input(op, "z", z_in, Exec::kDevice);
  // The kernels run on z's device (its stream, its guard): dy's data must be there too.
  TORCH_CHECK(dy_in.device() == z_in.device(), op, ": dy must be on z's device ", z_in.device(), ", got ",
              dy_in.device());
  check_input(op, "dy", dy_in, Exec::kDevice);
  TORCH_CHECK(dy_in.sizes() == z_in.sizes(), op, ": dy must have z's shape ", z_in.sizes(), ", got ", dy_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == z_in.scalar_type(), op, ": dy must have z's dtype ", z_in.scalar_type(),
              ", got ", dy_in.scalar_type());
  TORCH_CHECK(divisor > 0.0 && std::isfinite(divisor), op, ": divisor must be a finite number > 0, got ", divisor);
  const auto z = as4d(z_in);
  const auto dy = as4d(dy_in);
  const int64_t G = z.size(0), c = z.size(1), n = z.size(2) * z.size(3);
  TORCH_CHECK(P_in.dim() == 4 && P_in.size(0) >= 1, op, ": P must be (T, G, r, r) with T >= 1, got shape ",
              P_in.sizes());
  const int64_t T = P_in.size(0);
  check_stat(op, "mean", mean_in, {G, c, 1}, z);
  check_stat(op, "rscale", rscale_in, {G, 1, 1}, z);
  check_stat(op, "tau", tau_in, {G, 1, 1}, z);
  check_stat(op, "A", A_in, {G, c, c}, z);
  check_stat(op, "P", P_in, {T, G, c, c}, z);
  check_stat(op, "X", X_in, {T - 1, G, c, c}, z);
  const auto weight = check_affine(op, "weight", weight_in, G, c, z);
  const auto mean = mean_in.contiguous(), rscale = rscale_in.contiguous(), tau = tau_in.contiguous();
  const auto A = A_in.contiguous(), P = P_in.contiguous(), X = X_in.contiguous();

  const auto f32 = z.options().dtype(at::kFloat);
  auto dz_in = at::empty_like(z_in);
  auto dz = as4d(dz_in);
  auto dw = at::empty({G, c, c}, f32);
  auto ysum = at::empty({G, c}, f32);
  auto ws = at::empty({G, 7, c, c}, f32);
  at::Tensor dweight, dbias;
  if (weight.defined()) {
    dweight = at::empty({G, c}, f32);
    dbias = at::empty({G, c}, f32);
  }
  const int ci = static_cast<int>(c), Ti = static_cast<int>(T), Gi = static_cast<int>(G);
  const int reduce_x = static_cast<int>((c * c + kThreads - 1) / kThreads);
  dispatch_kernels(z.scalar_type(), ci, [&](auto tag, auto cb) {
    using scalar_t = decltype(tag);
    constexpr int CB = decltype(cb)::value;
    const int nblk = static_cast<int>(ex.template nblocks<Pass::kDStats, scalar_t, CB>(n, G));
    auto part_q = at::empty({G, nblk, c, c}, f32);
    auto part_v = at::empty({G, nblk, c}, f32);
    blocks::DStatsArgs<scalar_t> sa{strided<const scalar_t>(z), strided<const scalar_t>(dy), ci, n, nblk,
                                    mean.data_ptr<float>(), rscale.data_ptr<float>(), part_q.data_ptr<float>(),
                                    part_v.data_ptr<float>()};
    ex.template dstats<scalar_t, CB>(nblk, Gi, sa);
    blocks::DReduceArgs ra{ci, nblk, part_q.data_ptr<float>(), part_v.data_ptr<float>(), dw.data_ptr<float>(),
                           ysum.data_ptr<float>()};
    ex.dreduce(reduce_x, Gi, ra);
    auto WT = at::empty({G, 2 * CB, CB}, f32);
    blocks::AdjointArgs ja{ci, Ti, Gi, static_cast<float>(divisor), dw.data_ptr<float>(), ysum.data_ptr<float>(),
                           weight.defined() ? weight.data_ptr<float>() : nullptr, tau.data_ptr<float>(),
                           A.data_ptr<float>(), P.data_ptr<float>(), T > 1 ? X.data_ptr<float>() : nullptr,
                           ws.data_ptr<float>(), WT.data_ptr<float>(),
                           dweight.defined() ? dweight.data_ptr<float>() : nullptr,
                           dbias.defined() ? dbias.data_ptr<float>() : nullptr};
    ex.template adjoint<CB>(1, Gi, ja);
    const int nblk_apply = static_cast<int>(ex.template nblocks<Pass::kApplyBwd, scalar_t, CB>(n, G));
    auto aa = apply_args<scalar_t>(z, dz, T, n, nblk_apply, mean, rscale);
    aa.dy = strided<const scalar_t>(dy);
    aa.WT = WT.data_ptr<float>();
    aa.ysum = ysum.data_ptr<float>();
    ex.template apply<scalar_t, CB, true>(nblk_apply, Gi, aa);
  });
  if (weight.defined()) {
    const auto wdt = weight_in.scalar_type();
    dweight = dweight.view(weight_in.sizes()).to(wdt);
    dbias = dbias.view(weight_in.sizes()).to(wdt);
  }
  return {dz_in, dweight, dbias};
}

}  // namespace small
}  // namespace intl_kernels
