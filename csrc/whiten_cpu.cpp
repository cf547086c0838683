// IterNorm whitening by Newton's iteration: CPU forward and hand-written backward.
//
// Same algorithm and saved statistics as the `torch` backend (intl_kernels/whiten.py,
// docs/design.md §2–§3), in ATen plus two fused row loops:
//   Zc = (Z − Z[:, 0])·2^-e − mean        power-of-two rescale, shifted centring (one pass)
//   (the forward's pass writes Z − Z[:, 0] − mean unscaled and each row's max|Z|, which gives
//   e; 2^-e then scales S and W, exactly, unless max|Z| is far from 1: see kUnscaledExp)
//   S = Zc Zcᵀ/divisor + eps·2^-2e·I,  τ = tr S,  A = S/τ,  P_1 = (3I − A)/2
//   P_2 = (36I − 39A + A²(27I − 9A + A²))/16                  (2 GEMMs: P_1 is a polynomial)
//   X = P_k P_k,  Q = X A,  P_{k+1} = 1.5 P_k − 0.5 P_k Q      (k = 2..T−1)
//   Y = P_T/√τ · Zc
// z is (G, r, n) or an (G, r, n1, n2) view with n = n1·n2 columns (an NCHW tensor's channel
// groups), read through its strides; y and dz are at::empty_like(z): z's layout when z
// is dense (so the layer's output is already NCHW or channels_last), else contiguous.
// Backward, with D = sym(P̄_{k+1}), E = P_k D (and Z̄ = 2^-e([Wᵀ | M]·[Ȳ; Zc] − row means), one
// product with K = 2r + 1 written straight into z's layout, the row means entering as a bias
// column against a row of ones):
//   P̄_k = 1.5 D − 0.5 (XD + (XD)ᵀ + E P_k) A,   Ā += −0.5 X E          5 GEMMs a step
// Products whose result is symmetric (S, X, Q, P_k Q, P_k D P_k) compute only the lower
// block triangle with 128-row blocks and mirror it (62.5% of the FLOPs at r = 512).
// Batched over G; statistics in float64 for float64 inputs and float32 otherwise; Y and
// dZ in the input dtype; any input strides. Zero covariance (τ = 0 or subnormal) gives
// Y = 0, dZ = 0.
//
// Saved for the backward: mean (G, r, 1), rscale (G, 1, 1), tau (G, 1, 1), A (G, r, r),
// P (T, G, r, r) = P_1..P_T, X (T−1, G, r, r) = P_k² for k = 1..T−1.

#include "whiten.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace intl_kernels {
namespace {

constexpr int64_t kSymBlock = 128;

at::ScalarType stats_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
std::pair<int64_t, int64_t> exponent_range() {
  int emax = 0, emin = 0;
  std::frexp(std::numeric_limits<T>::max(), &emax);
  std::frexp(std::numeric_limits<T>::min(), &emin);
  return {emin, emax - 2};
}

// 2^-e per group with 2^e >= max(amax, sqrt(eps)); e clamped so 2^±e stay normal. amax: (G,)
// the group's max|z|.
at::Tensor pow2_rscale(const at::Tensor& amax_in, double eps, at::ScalarType cdt) {
  auto range = cdt == at::kDouble ? exponent_range<double>() : exponent_range<float>();
  auto amax = amax_in.to(cdt).view({amax_in.size(0), 1, 1});
  if (eps > 0.0) amax = amax.clamp_min(std::sqrt(eps));
  auto e = std::get<1>(at::frexp(amax)).clamp(range.first, range.second);
  return at::ldexp(at::ones_like(amax), e.neg());
}

// The rescaled (kScaled) centring only where a group's max|z| leaves [2^-kUnscaledExp,
// 2^kUnscaledExp]. Inside it the unscaled covariance cannot overflow (n <= 2^60 columns of
// entries below 2^25: below 2^110), and scaling the r×r statistics and W by the power-of-two
// rescale afterwards gives the bits of scaling Zc, except where a product of two entries is
// subnormal: at least 2^-78 below the group's largest square, under the rounding of any sum
// it enters.
constexpr int kUnscaledExp = 24;

// Sum of n values with 8 independent partial sums (vectorisable, and more accurate than
// one running sum); accumulates in double.
template <typename T>
double row_sum(const T* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) acc[u] += static_cast<double>(x[j + u]);
  for (; j < n; ++j) acc[0] += static_cast<double>(x[j]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

constexpr int64_t kRowGrain = 32768;  // elements per parallel chunk

// A (G, r, n) or (G, r, n1, n2) input as (G, r, n1, n2): column j = b·n2 + l of row (g, i)
// is z[g, i, b, l] (n1 = 1 for 3-D inputs). An (N, C, H, W) tensor's channel groups read
// in place are such a 4-D view.
at::Tensor as4d(const at::Tensor& z) { return z.dim() == 3 ? z.unsqueeze(2) : z; }

// Calls f(j, offset) for the columns j = 0..n−1 of a row of a 4-D view, offset in elements.
template <typename F>
inline void for_columns(int64_t n1, int64_t n2, int64_t s1, int64_t s2, F&& f) {
  for (int64_t b = 0, j = 0; b < n1; ++b)
    for (int64_t l = 0; l < n2; ++l, ++j) f(j, b * s1 + l * s2);
}

// |v| as its bit pattern: for non-negative IEEE values the integer order is the value order,
// and a NaN's pattern is above +inf, so an integer max of patterns is max|v| with NaN
// propagated (an integer max vectorises without -ffast-math; a float one does not).
inline int32_t abs_bits(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b & 0x7fffffff;
}
inline int64_t abs_bits(double v) {
  int64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b & 0x7fffffffffffffffLL;
}
template <typename B>
inline B max_bits(B a, B b) { return a > b ? a : b; }

// How centred_rows treats a row:
//   kScaled:     zc = (z − z0)·rscale − mean, mean computed and stored;
//   kStoredMean: zc = (z − z0)·rscale − mean with the stored mean (the backward's Zc, bit for
//                bit the forward's);
//   kUnscaled:   zc = (z − z0) − mean, mean computed and stored, and max|z| of the row stored
//                in `rowmax` (the forward's one pass over z, rscale applied afterwards).
enum class Centre { kScaled, kStoredMean, kUnscaled };

// zc[g, i, :] per `Centre` (z0 = z[g, i, 0]), written contiguous (G, r, n), read through z's
// strides. `zc` (optional) is a (G, r, n) buffer with unit column stride to write into.
template <Centre kMode>
at::Tensor centred_rows(const at::Tensor& z_in, const at::Tensor& rscale, at::Tensor& mean,
                        at::Tensor zc = at::Tensor(), at::Tensor* rowmax = nullptr) {
  constexpr bool kComputeMean = kMode != Centre::kStoredMean;
  constexpr bool kMax = kMode == Centre::kUnscaled;
  const auto z = as4d(z_in);
  const int64_t G = z.size(0), r = z.size(1), n1 = z.size(2), n2 = z.size(3), n = n1 * n2;
  const int64_t sg = z.stride(0), sr = z.stride(1), s1 = z.stride(2), s2 = z.stride(3);
  if (!zc.defined()) zc = at::empty({G, r, n}, z.options().dtype(mean.scalar_type()));
  TORCH_INTERNAL_ASSERT(zc.stride(2) == 1 && zc.stride(1) == n);
  TORCH_INTERNAL_ASSERT(!kMax || (rowmax != nullptr && rowmax->is_contiguous() && rowmax->numel() == G * r));
  const int64_t zc_sg = zc.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "centred_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using bits_t = decltype(abs_bits(acc_t(0)));
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const acc_t* sp = kMax ? nullptr : rscale.const_data_ptr<acc_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* maxp = kMax ? rowmax->data_ptr<acc_t>() : nullptr;
    acc_t* out = zc.data_ptr<acc_t>();
    at::parallel_for(0, G * r, std::max<int64_t>(1, kRowGrain / n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t g = row / r, i = row % r;
        const scalar_t* src = zp + g * sg + i * sr;
        acc_t* dst = out + g * zc_sg + i * n;
        const acc_t z0 = static_cast<acc_t>(src[0]);
        // kUnscaled: s = 1 and m0 = 0, so the element is exactly v − z0.
        const acc_t s = kMax ? acc_t(1) : sp[g];
        const acc_t m0 = kComputeMean ? acc_t(0) : mp[row];
        bits_t mx = 0;
        auto put = [&](acc_t v, acc_t& d) {
          d = (v - z0) * s - m0;
          if constexpr (kMax) mx = max_bits(mx, abs_bits(v));
        };
        if (s2 == 1 && (n1 == 1 || s1 == n2)) {  // one contiguous run: vectorisable
          for (int64_t j = 0; j < n; ++j) put(static_cast<acc_t>(src[j]), dst[j]);
        } else if (s2 == 1) {  // NCHW groups: n1 contiguous runs of n2
          for (int64_t b = 0; b < n1; ++b) {
            const scalar_t* run = src + b * s1;
            acc_t* d = dst + b * n2;
            for (int64_t l = 0; l < n2; ++l) put(static_cast<acc_t>(run[l]), d[l]);
          }
        } else {
          for_columns(n1, n2, s1, s2, [&](int64_t j, int64_t off) { put(static_cast<acc_t>(src[off]), dst[j]); });
        }
        if constexpr (kMax) std::memcpy(&maxp[row], &mx, sizeof mx);
        if (kComputeMean) {
          mp[row] = static_cast<acc_t>(row_sum(dst, n) / static_cast<double>(n));
          const acc_t m = mp[row];
          for (int64_t j = 0; j < n; ++j) dst[j] -= m;
        }
      }
    });
  });
  return zc;
}

// y = W zc for W: (G, r, k), zc: (G, k, n), written in z's layout (at::empty_like(z), z:
// (G, r, ...)). A per-row bias b enters as one more column of W against a row of ones in zc
// (no broadcast copy into the output). Contiguous outputs of the statistics dtype take one
// bmm; NCHW channel groups (runs of n2 >= 256 columns) one batched GEMM per group straight
// into place; anything else a product and one converting copy.
at::Tensor apply_into_layout(const at::Tensor& W, const at::Tensor& zc, const at::Tensor& z) {
  auto y = at::empty_like(z);
  const int64_t G = zc.size(0), r = W.size(1), k = zc.size(1), n = zc.size(2);
  auto y4 = as4d(y);
  const int64_t n1 = y4.size(2), n2 = y4.size(3);
  const bool same_dtype = y.scalar_type() == zc.scalar_type();
  if (same_dtype && y.is_contiguous()) {
    auto y3 = y.view({G, r, n});
    at::bmm_out(y3, W, zc);
  } else if (same_dtype && y4.stride(3) == 1 && n2 >= 256) {
    // NCHW groups: per group one batched GEMM over the n1 samples, W broadcast, writing each
    // sample's (r, n2) block in place (about 1.8x faster here than a GEMM call per sample).
    auto zc4 = zc.view({G, k, n1, n2});
    for (int64_t g = 0; g < G; ++g) {
      auto out = y4[g].permute({1, 0, 2});
      at::bmm_out(out, W[g].expand({n1, r, k}), zc4[g].permute({1, 0, 2}));
    }
  } else {
    y4.copy_(at::bmm(W, zc).view({G, r, n1, n2}));
  }
  return y;
}

// A (G, rows + 1, n) buffer whose last row is ones (for a bias column in apply_into_layout).
at::Tensor with_ones_row(int64_t G, int64_t rows, int64_t n, const at::TensorOptions& opts) {
  auto buf = at::empty({G, rows + 1, n}, opts);
  buf.select(1, rows).fill_(1);
  return buf;
}

// out = a @ b for a: (G, r, k), b: (G, k, r) whose product is symmetric: computes the
// lower block triangle straight into `out` (row-major with leading dimension r, which
// BLAS takes as is) and mirrors it. Plain bmm below two blocks.
at::Tensor& sym_bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t G = a.size(0), r = a.size(1);
  if (r < 2 * kSymBlock) return at::bmm_out(out, a, b);
  for (int64_t g = 0; g < G; ++g) {
    auto og = out[g], ag = a[g], bg = b[g];
    for (int64_t i0 = 0; i0 < r; i0 += kSymBlock) {
      const int64_t ni = std::min(kSymBlock, r - i0);
      auto a_i = ag.narrow(0, i0, ni);
      auto o_i = og.narrow(0, i0, ni);
      for (int64_t j0 = 0; j0 <= i0; j0 += kSymBlock) {
        auto o_ij = o_i.narrow(1, j0, std::min(kSymBlock, r - j0));
        at::mm_out(o_ij, a_i, bg.narrow(1, j0, o_ij.size(1)));
      }
    }
    for (int64_t i0 = kSymBlock; i0 < r; i0 += kSymBlock) {  // upper = lowerᵀ, block row by row
      auto lower = og.narrow(0, i0, std::min(kSymBlock, r - i0)).narrow(1, 0, i0);
      og.narrow(1, i0, lower.size(0)).narrow(0, 0, i0).copy_(lower.t());
    }
  }
  return out;
}

at::Tensor sym_bmm(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty({a.size(0), a.size(1), b.size(2)}, a.options());
  return sym_bmm_out(out, a, b);
}

// x ← alpha·(x + xᵀ) + b + bᵀ in place (b optional) for contiguous (G, r, r) tensors, in
// cache-sized tiles: the transposed reads of a plain `x + x.mT` miss the cache.
at::Tensor& sym_(at::Tensor& x, double alpha = 0.5, const at::Tensor* b = nullptr) {
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && (b == nullptr || b->is_contiguous()));
  const int64_t G = x.size(0), r = x.size(1);
  constexpr int64_t kTile = 64;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sym_", [&] {
    scalar_t* base = x.data_ptr<scalar_t>();
    const scalar_t* bbase = b ? b->const_data_ptr<scalar_t>() : nullptr;
    const auto al = static_cast<scalar_t>(alpha);
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        scalar_t* a = base + g * r * r;
        const scalar_t* c = bbase ? bbase + g * r * r : nullptr;
        for (int64_t i0 = 0; i0 < r; i0 += kTile)
          for (int64_t j0 = 0; j0 <= i0; j0 += kTile)
            for (int64_t i = i0; i < std::min(i0 + kTile, r); ++i)
              for (int64_t j = j0; j < std::min({j0 + kTile, r, i + 1}); ++j) {
                scalar_t v = (a[i * r + j] + a[j * r + i]) * al;
                if (c) v += c[i * r + j] + c[j * r + i];
                a[i * r + j] = v;
                a[j * r + i] = v;
              }
      }
    });
  });
  return x;
}

// (τ, 1/√τ), with (1, 0) where τ is zero or subnormal: a subnormal τ only comes from an
// eps ridge that underflowed on a zero covariance, and dividing by it would overflow.
std::pair<at::Tensor, at::Tensor> safe_tau(const at::Tensor& tau) {
  const double tiny = tau.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                        : std::numeric_limits<float>::min();
  auto pos = tau >= tiny;
  auto tau_safe = at::where(pos, tau, at::ones_like(tau));
  auto rsqrt_tau = at::where(pos, tau_safe.rsqrt(), at::zeros_like(tau));
  return {tau_safe, rsqrt_tau};
}

void check_z(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu(), "intl_kernels::whiten (cpu): ", name, " must be a CPU tensor, got ",
              z.device());
  TORCH_CHECK(z.dim() == 3 || z.dim() == 4, "intl_kernels::whiten (cpu): ", name,
              " must be 3-D (G, r, n) or 4-D (G, r, n1, n2), got ", z.dim(), "-D");
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "intl_kernels::whiten (cpu): ", name, " must be float64, float32, bfloat16 or float16, got ", t);
  const int64_t n = z.dim() == 3 ? z.size(2) : z.size(2) * z.size(3);
  TORCH_CHECK(z.size(0) >= 1 && z.size(1) >= 1 && n >= 2, "intl_kernels::whiten (cpu): ", name,
              " must have G >= 1, r >= 1 and n >= 2 columns, got ", z.sizes());
}

void check_stat(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType cdt) {
  TORCH_CHECK(t.sizes() == shape, "intl_kernels::whiten_bwd (cpu): ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == cdt && t.device().is_cpu(), "intl_kernels::whiten_bwd (cpu): ", name,
              " must be a CPU ", cdt, " tensor, got ", t.scalar_type(), " on ", t.device());
}

}  // namespace

namespace {

void check_affine(const at::Tensor& t, const char* name, const at::Tensor& z) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(0) == z.size(0) && t.size(1) == z.size(1),
              "intl_kernels::whiten_affine (cpu): ", name, " must be a CPU (G, r) = (", z.size(0), ", ",
              z.size(1), ") tensor, got ", t.sizes(), " on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "intl_kernels::whiten_affine (cpu): ", name,
              " must be floating point, got ", t.scalar_type());
}

// The forward, with an optional per-row affine y ← weight·y + bias folded into the last
// product (weight scales the rows of W, bias is one more column of it against a row of ones).
std::vector<at::Tensor> whiten_fwd_impl(const at::Tensor& z, int64_t T, double eps, double divisor,
                                        const at::Tensor& weight, const at::Tensor& bias) {
  c10::AutoGradMode no_grad(false);  // a kernel: differentiated by intl_kernels' autograd Functions, not by tracing
  check_z(z, "z");
  if (weight.defined()) {  // before any work: bad parameters fail fast
    check_affine(weight, "weight", z);
    check_affine(bias, "bias", z);
  }
  TORCH_CHECK(T >= 1, "intl_kernels::whiten (cpu): T must be >= 1, got ", T);
  TORCH_CHECK(eps >= 0.0, "intl_kernels::whiten (cpu): eps must be >= 0, got ", eps);
  TORCH_CHECK(divisor > 0.0, "intl_kernels::whiten (cpu): divisor must be > 0, got ", divisor);
  const auto cdt = stats_type(z.scalar_type());
  const int64_t G = z.size(0), r = z.size(1);
  auto opts = z.options().dtype(cdt);

  auto mean = at::empty({G, r, 1}, opts);
  const int64_t n = z.dim() == 3 ? z.size(2) : z.size(2) * z.size(3);
  auto zc_buf = weight.defined() ? with_ones_row(G, r, n, opts) : at::empty({G, r, n}, opts);
  auto zc = zc_buf.narrow(1, 0, r);
  // One pass over z: Zc unscaled and each row's max|z|, from which the group's rescale. A CPU
  // kernel reads its own CPU statistics here (no device to synchronise with).
  auto rowmax = at::empty({G, r}, opts);
  centred_rows<Centre::kUnscaled>(z, at::Tensor(), mean, zc, &rowmax);
  auto rscale = pow2_rscale(rowmax.amax(1), eps, cdt);
  const double lim = std::ldexp(1.0, kUnscaledExp);
  const bool unscaled = (rscale >= 1.0 / lim).logical_and_(rscale <= lim).all().item<bool>();
  if (unscaled) {
    mean.mul_(rscale);  // the saved mean is the rescaled one: (z − z0)·rscale − mean
  } else {
    centred_rows<Centre::kScaled>(z, rscale, mean, zc);
  }
  auto A = sym_bmm(zc, zc.transpose(1, 2));
  if (unscaled) A.mul_(rscale.square());
  A.div_(divisor);
  if (eps > 0.0) A.diagonal(0, 1, 2).add_((rscale * std::sqrt(eps)).square_().view({G, 1}));
  auto tau = A.diagonal(0, 1, 2).sum(-1).view({G, 1, 1});
  auto [tau_safe, rsqrt_tau] = safe_tau(tau);
  A.div_(tau_safe);

  auto P = at::empty({T, G, r, r}, opts);
  auto X = at::empty({T - 1, G, r, r}, opts);
  P[0].copy_(A).mul_(-0.5).diagonal(0, 1, 2).add_(1.5);
  if (T >= 2) {
    // P_1 = (3I − A)/2 is a polynomial in A, so X_1 = P_1² = (9I − 6A + A²)/4 and
    // P_2 = (36I − 39A + A²(27I − 9A + A²))/16: 2 GEMMs for the step instead of 3.
    auto A2 = sym_bmm(A, A);
    auto X1 = X[0], P2 = P[1];
    X1.copy_(A2).add_(A, -6.0).diagonal(0, 1, 2).add_(9.0);
    X1.mul_(0.25);
    auto B = A2.add(A, -9.0);
    B.diagonal(0, 1, 2).add_(27.0);
    sym_bmm_out(P2, A2, B).add_(A, -39.0).diagonal(0, 1, 2).add_(36.0);
    P2.mul_(1.0 / 16.0);
  }
  for (int64_t k = 2; k < T; ++k) {
    auto Pk = P[k - 1], Xk = X[k - 1], Pnext = P[k];
    sym_bmm_out(Xk, Pk, Pk);
    sym_bmm_out(Pnext, Pk, sym_bmm(Xk, A)).mul_(-0.5).add_(Pk, 1.5);
  }
  auto W = P[T - 1] * (unscaled ? rsqrt_tau * rscale : rsqrt_tau);
  at::Tensor y;
  if (weight.defined()) {
    auto Wb = at::cat({W.mul_(weight.to(cdt).unsqueeze(-1)), bias.to(cdt).unsqueeze(-1)}, 2);
    y = apply_into_layout(Wb, zc_buf, z);
  } else {
    y = apply_into_layout(W, zc, z);
  }
  return {y, mean, rscale, tau, A, P, X};
}

// The backward; with `weight` (the forward's affine), also the weight and bias gradients:
// with G1 = Ȳ Zcᵀ, dweight = rowsum(W ⊙ G1), dbias = rowsum(Ȳ), and the whitening sees
// diag(weight)·Ȳ, i.e. W̄ = diag(weight)·G1 and Z̄c = (diag(weight) W)ᵀ Ȳ + ….
std::vector<at::Tensor> whiten_bwd_impl(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& weight,
                                        const at::Tensor& mean, const at::Tensor& rscale, const at::Tensor& tau,
                                        const at::Tensor& A, const at::Tensor& P, const at::Tensor& X,
                                        double divisor) {
  c10::AutoGradMode no_grad(false);
  check_z(z, "z");
  TORCH_CHECK(dy.sizes() == z.sizes() && dy.device().is_cpu(),
              "intl_kernels::whiten_bwd (cpu): dy must be a CPU tensor of z's shape ", z.sizes(), ", got ",
              dy.sizes(), " on ", dy.device());
  TORCH_CHECK(divisor > 0.0, "intl_kernels::whiten_bwd (cpu): divisor must be > 0, got ", divisor);
  const int64_t G = z.size(0), r = z.size(1), T = P.dim() == 4 ? P.size(0) : 0;
  TORCH_CHECK(T >= 1, "intl_kernels::whiten_bwd (cpu): P must be (T, G, r, r) with T >= 1, got ", P.sizes());
  const auto cdt = stats_type(z.scalar_type());
  check_stat(mean, "mean", {G, r, 1}, cdt);
  check_stat(rscale, "rscale", {G, 1, 1}, cdt);
  check_stat(tau, "tau", {G, 1, 1}, cdt);
  check_stat(A, "A", {G, r, r}, cdt);
  check_stat(P, "P", {T, G, r, r}, cdt);
  check_stat(X, "X", {T - 1, G, r, r}, cdt);

  // buf = [dy; Zc; 1ᵀ] as (G, 2r + 1, n): Z̄ = [Wᵀ | (S̄ + S̄ᵀ)/divisor | −row means] · buf is
  // one product (K = 2r + 1).
  const int64_t n = z.dim() == 3 ? z.size(2) : z.size(2) * z.size(3);
  auto buf = with_ones_row(G, 2 * r, n, z.options().dtype(cdt));
  auto dyf = buf.narrow(1, 0, r);
  dyf.view({G, r, z.dim() == 3 ? 1 : z.size(2), z.dim() == 3 ? n : z.size(3)}).copy_(as4d(dy));
  auto mean_c = mean.contiguous();
  auto zc = centred_rows<Centre::kStoredMean>(z, rscale.contiguous(), mean_c, buf.narrow(1, r, r));
  auto [tau_safe, rsqrt_tau] = safe_tau(tau);
  auto W = P[T - 1] * rsqrt_tau;

  auto dW = at::bmm(dyf, zc.transpose(1, 2));
  at::Tensor dweight, dbias, dbias_acc, wrow;
  if (weight.defined()) {
    check_affine(weight, "weight", z);
    wrow = weight.to(cdt).unsqueeze(-1);
    dweight = (dW * W).sum(2).to(weight.scalar_type());
    dbias_acc = dyf.sum(2, /*keepdim=*/true);
    dbias = dbias_acc.squeeze(-1).to(weight.scalar_type());
    dW.mul_(wrow);
  }
  auto dtau = (dW * W).sum({1, 2}, /*keepdim=*/true).mul_(-0.5).div_(tau_safe);
  auto dP = dW.mul_(rsqrt_tau);
  auto dA = at::zeros_like(A);
  for (int64_t k = T - 1; k >= 1; --k) {
    auto D = sym_(dP);
    auto Pk = P[k - 1], Xk = X[k - 1];
    auto E = at::bmm(Pk, D);
    auto XD = at::bmm(Xk, D);
    auto H = sym_bmm(E, Pk);  // P D P, symmetric
    sym_(H, 0.5, &XD);        // H = P D P + XD + (XD)ᵀ
    dA.baddbmm_(Xk, E, /*beta=*/1.0, /*alpha=*/-0.5);
    dP = at::bmm(H, A).mul_(-0.5).add_(D, 1.5);
  }
  dA.sub_(sym_(dP).mul_(0.5));
  dtau.sub_((dA * A).sum({1, 2}, /*keepdim=*/true).div_(tau_safe));
  auto dS = dA.div_(tau_safe);
  dS.diagonal(0, 1, 2).add_(dtau.view({G, 1}));
  // Z̄ = 2^-e·(Z̄c − row means of Z̄c) with Z̄c = lhs·buf, lhs = [Wᵀ | (S̄ + S̄ᵀ)/divisor]. The
  // row means are Wᵀ·mean(Ȳ) (the Zc rows have mean zero), so they enter the product as a
  // bias and Z̄ is written straight into z's layout: no Z̄c temporary, no extra pass.
  // The rescale 2^-e is folded into lhs unless a group's max|z| lies far below 1 (2^-e above
  // 2^kUnscaledExp): there lhs·2^-e can overflow where Z̄ itself does not (max|z| subnormal:
  // entries of lhs near 2^5 times 2^125), so Z̄ is formed unscaled and scaled afterwards.
  auto Wt = (weight.defined() ? W * wrow : W).transpose(1, 2);
  auto lhs = at::cat({Wt, sym_(dS).mul_(2.0 / divisor)}, 2);
  const bool fold = (rscale <= std::ldexp(1.0, kUnscaledExp)).all().item<bool>();
  if (fold) lhs.mul_(rscale);
  auto ymean = (weight.defined() ? dbias_acc : dyf.sum(2, /*keepdim=*/true)).div(static_cast<double>(n));
  auto row_means = at::bmm(lhs.narrow(2, 0, r), ymean).squeeze(-1);
  auto dz = apply_into_layout(at::cat({lhs, row_means.neg_().unsqueeze(-1)}, 2), buf, z);
  if (!fold) as4d(dz).mul_(rscale.view({G, 1, 1, 1}));
  if (!weight.defined()) return {dz};
  return {dz, dweight, dbias};
}

}  // namespace

std::vector<at::Tensor> whiten_fwd_cpu(const at::Tensor& z, int64_t T, double eps, double divisor) {
  return whiten_fwd_impl(z, T, eps, divisor, at::Tensor(), at::Tensor());
}

at::Tensor whiten_bwd_cpu(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                          const at::Tensor& rscale, const at::Tensor& tau, const at::Tensor& A,
                          const at::Tensor& P, const at::Tensor& X, double divisor) {
  return whiten_bwd_impl(dy, z, at::Tensor(), mean, rscale, tau, A, P, X, divisor)[0];
}

std::vector<at::Tensor> whiten_affine_fwd_cpu(const at::Tensor& z, const at::Tensor& weight,
                                              const at::Tensor& bias, int64_t T, double eps, double divisor) {
  return whiten_fwd_impl(z, T, eps, divisor, weight, bias);
}

std::vector<at::Tensor> whiten_affine_bwd_cpu(const at::Tensor& dy, const at::Tensor& z,
                                              const at::Tensor& weight, const at::Tensor& mean,
                                              const at::Tensor& rscale, const at::Tensor& tau,
                                              const at::Tensor& A, const at::Tensor& P, const at::Tensor& X,
                                              double divisor) {
  return whiten_bwd_impl(dy, z, weight, mean, rscale, tau, A, P, X, divisor);
}

}  // namespace intl_kernels
