// Kernels of the `cuda` backend for small groups (r = c <= 128 rows, long strided columns),
// written once as block-level code that runs on a GPU and, in a host emulator, on the CPU.
//
// Algorithm and saved statistics are those of the `torch` backend (intl_kernels/whiten.py,
// DESIGN §2–§3); what is specific here is how the work is cut:
//
// forward   1. stats:   grid (blocks per group, G). Each block streams its chunk of columns in
//                       tiles of TN: a tile is loaded once (through the input's strides), scaled
//                       by the power of two of the largest magnitude seen so far in the block
//                       (exact; a larger tile rescales the running sums exactly), shifted by the
//                       group's first column, centred on the block's first-tile mean, and its
//                       c×c Gram matrix and row sums are accumulated in registers. One read of Z.
//           2. reduce:  grid (c²/256, G). Partial results are merged in block order (the
//                       parallel-variance formula, no cancellation; no float atomics), giving
//                       mean, rscale = 2^-e and S in the group's scale.
//           3. newton:  grid G, a block per group runs the trace normalisation and all T Newton
//                       steps. The c×c matrices (A, P_k, X_k: outputs the backward needs anyway)
//                       live in global memory, where they stay in L1/L2 (16–64 KB each); each
//                       product stages its operand tiles through shared memory.
//           4. apply:   grid (blocks per group, G). W = P_T/√τ (rows scaled by the affine weight)
//                       stays in shared memory; each tile of Z is centred on load and Y = W·Zc
//                       (+ bias) is written through the output's strides. One read, one write.
// backward  1. stats:   one pass over (Ȳ, Z): partial Ȳ·Zcᵀ and row sums of Ȳ per block.
//           2. reduce:  the same fixed-order merge.
//           3. adjoint: a block per group runs the symmetrised adjoint recursion (5 products a
//                       step) and forms M = (S̄ + S̄ᵀ)/divisor and W·diag(weight).
//           4. apply:   Z̄ = 2^-e·([W·diag(w) | M]·[Ȳ − mean(Ȳ); Zc]): one K = 2c product.
//
// A kernel body is a sequence of phases separated by block barriers. `Block::each(f)` runs
// f(thread) for every thread of the block (on the GPU: the calling thread), `Block::sync()`
// is the barrier, and `Block::Local<T>` is per-thread state kept across phases (a register
// variable on the GPU, an array indexed by thread in the emulator). Threads communicate only
// through shared memory across a barrier, so running the threads of a phase one after the
// other on the CPU, in either order, computes what the GPU computes. The emulator refuses two
// phases without a barrier between them, and the tests run both thread orders, which
// exposes a phase that depends on the order of its threads.
//
// Statistics and accumulation are float32; inputs float32, bfloat16 or float16; outputs in
// the input dtype. Results depend on the block partition (fixed per device and shape), never
// on scheduling: every reduction has a fixed order.

#pragma once

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define INTL_HD __host__ __device__ __forceinline__
#define INTL_UNROLL _Pragma("unroll")
#else
#define INTL_HD inline
#define INTL_UNROLL
#endif

namespace intl_kernels {
namespace blocks {

constexpr int kThreads = 256;  // threads per block, as a 16 × 16 grid for tiled products
constexpr int kMaxRows = 128;  // largest group size c
constexpr int kChunkQuantum = 64;  // columns per block are a multiple of every tile width
constexpr int kNoExp = INT_MIN / 2;  // "no nonzero value seen": frexp(0) has no exponent
// Power-of-two rescale exponents are clamped so 2^±e stay normal float32 numbers (as the
// torch backend does): e in [frexp(FLT_MIN), frexp(FLT_MAX) − 2].
constexpr int kEmin = -125;
constexpr int kEmax = 126;

// Rows per group padded to the block's tile: 32, 64 or 128.
inline int row_bucket(int c) { return c <= 32 ? 32 : (c <= 64 ? 64 : 128); }

template <int CB>
struct StatsShape {
  static constexpr int TN = 64;  // columns per tile
  static constexpr int LD = TN + 1;
  static constexpr int kSmem = CB * LD + 2 * CB + 4;  // tile, z0, pivot, flags (floats)
};

template <int CB>
struct DStatsShape {
  static constexpr int TN = CB == 128 ? 32 : 64;
  static constexpr int LD = TN + 1;
  static constexpr int kSmem = 2 * CB * LD + 2 * CB;  // Ȳ tile, Zc tile, shift, mean
};

template <int CB>
struct MatShape {  // block_mm and the per-group Newton / adjoint kernels
  static constexpr int BK = 16;
  static constexpr int kMm = CB * (BK + 1) + BK * CB;
  static constexpr int kSmem = kMm + kThreads + 4;  // + reduction scratch, scalars
};

template <int CB, bool BWD>
struct ApplyShape {
  static constexpr int KW = BWD ? 2 * CB : CB;  // inner dimension: [W] or [W | M]
  static constexpr int TN = CB == 128 ? (BWD ? 16 : 32) : 64;
  static constexpr int LDW = KW + 1;
  static constexpr int LDX = TN + 1;
  static constexpr int kSmem = CB * LDW + KW * LDX + 4 * CB;
};

// A thread's register tile of a 16 × 16 thread grid: entry (u, v) is row ty + 16u, column
// tx + 16v of the block's tile (t = 16·ty + tx; strided so a warp reads distinct banks).
template <int R, int C>
struct Regs {
  float v[R][C];

  INTL_HD void zero() {
    INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C; ++w) v[u][w] = 0.0f;
  }
  INTL_HD void scale(float f) {
    INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C; ++w) v[u][w] *= f;
  }
  // f(i, j, value) for the entries with i < rows and j < cols.
  template <class F>
  INTL_HD void each_entry(int t, int rows, int cols, F&& f) const {
    const int ty = t / 16, tx = t % 16;
    INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C; ++w) {
      const int i = ty + 16 * u, j = tx + 16 * w;
      if (i < rows && j < cols) f(i, j, v[u][w]);
    }
  }
  // v += L·R over k < K, L row-major [row][k] (leading dimension ldl), and R either
  // [k][col] (ldr; kTransR = false) or [col][k] (ldr; kTransR = true).
  template <bool kTransR>
  INTL_HD void mma(int t, const float* L, int ldl, const float* Rm, int ldr, int K) {
    const int ty = t / 16, tx = t % 16;
    for (int k = 0; k < K; ++k) {
      float a[R], b[C];
      INTL_UNROLL for (int u = 0; u < R; ++u) a[u] = L[(ty + 16 * u) * ldl + k];
      INTL_UNROLL for (int w = 0; w < C; ++w) b[w] = kTransR ? Rm[(tx + 16 * w) * ldr + k] : Rm[k * ldr + tx + 16 * w];
      INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C; ++w) v[u][w] += a[u] * b[w];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Small helpers usable on both sides.

INTL_HD int clamp_exp(int e) { return e < kEmin ? kEmin : (e > kEmax ? kEmax : e); }

// frexp exponent of a non-negative float given by its bits, clamped; kNoExp for zero.
INTL_HD int exp_of_bits(int bits) {
  if (bits <= 0) return kNoExp;
  if (bits >= 0x7f800000) return kEmax;  // inf (NaN never raises the max: fmaxf drops it)
  float v;
  memcpy(&v, &bits, sizeof(float));
  int e = 0;
  frexpf(v, &e);
  return clamp_exp(e);
}

INTL_HD int float_bits(float v) {
  int b;
  memcpy(&b, &v, sizeof(float));
  return b;
}

INTL_HD float pow2(int e) { return ldexpf(1.0f, e); }

INTL_HD int imax(int a, int b) { return a > b ? a : b; }
INTL_HD int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

// A group of rows read through strides: element (i, j) of group g, column j = b·n2 + l.
template <typename T>
struct Strided {
  T* ptr;
  int64_t sg, sr, s1, s2;
  int64_t n2;
  INTL_HD int64_t offset(int g, int i, int64_t j) const {
    const int64_t b = j / n2, l = j - b * n2;
    return g * sg + i * sr + b * s1 + l * s2;
  }
  // Consecutive threads should walk the unit-stride axis: columns unless rows are unit-stride.
  INTL_HD bool cols_fast() const { return !(sr == 1 && s2 != 1); }
};

// Element e of a rows × tn tile, in the order that makes consecutive e adjacent in memory.
INTL_HD void tile_index(bool cols_fast, int e, int rows, int tn, int& i, int& k) {
  if (cols_fast) {
    i = e / tn;
    k = e - i * tn;
  } else {
    k = e / rows;
    i = e - k * rows;
  }
}

// Deterministic tree sum of one float per thread; every thread gets the result.
template <class Block>
INTL_HD float block_sum(Block& blk, float* red, typename Block::template Local<float>& v) {
  blk.each([&](int t) { red[t] = v[t]; });
  blk.sync();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    blk.each([&](int t) {
      if (t < s) red[t] += red[t + s];
    });
    blk.sync();
  }
  float total = 0.0f;
  blk.each([&](int) { total = red[0]; });  // callers sync before red is reused
  return total;
}

// C = L·R for c×c row-major float32 matrices in global memory, then epi(i, j, value) for
// every i, j < c (by the thread that computed it). Operand tiles go through shared memory;
// ends with a barrier, so the results are visible to the next product.
template <int CB, class Block, class Epi>
INTL_HD void block_mm(Block& blk, float* sm, const float* L, const float* R, int c, Epi&& epi) {
  using Shape = MatShape<CB>;
  constexpr int BK = Shape::BK, RT = CB / 16;
  float* Ls = sm;                    // [CB][BK + 1]
  float* Rs = sm + CB * (BK + 1);    // [BK][CB]
  typename Block::template Local<Regs<RT, RT>> acc;
  blk.each([&](int t) { acc[t].zero(); });
  blk.sync();
  for (int k0 = 0; k0 < c; k0 += BK) {
    blk.each([&](int t) {
      for (int e = t; e < CB * BK; e += kThreads) {
        const int i = e / BK, kk = e - i * BK, k = k0 + kk;
        Ls[i * (BK + 1) + kk] = (i < c && k < c) ? L[i * c + k] : 0.0f;
        const int kr = e / CB, j = e - kr * CB;
        Rs[kr * CB + j] = (k0 + kr < c && j < c) ? R[(k0 + kr) * c + j] : 0.0f;
      }
    });
    blk.sync();
    blk.each([&](int t) { acc[t].template mma<false>(t, Ls, BK + 1, Rs, CB, BK); });
    blk.sync();
  }
  blk.each([&](int t) { acc[t].each_entry(t, c, c, epi); });
  blk.sync();
}

// Calls f(i, j, e) for the c×c entries e = i·c + j, spread over the threads; then a barrier.
template <class Block, class F>
INTL_HD void block_entries(Block& blk, int c, F&& f) {
  blk.each([&](int t) {
    for (int e = t; e < c * c; e += kThreads) f(e / c, e % c, e);
  });
  blk.sync();
}

// ---------------------------------------------------------------------------------------------
// Forward 1: statistics pass.

template <typename scalar_t>
struct StatsArgs {
  Strided<const scalar_t> z;
  int c;
  int64_t n, chunk;
  int nblk;
  float* part_q;   // (G, nblk, c, c): Σ x xᵀ with x centred on the block pivot
  float* part_v;   // (G, nblk, 2, c): pivot, Σ x
  int* part_e;     // (G, nblk): block exponent (kNoExp: all zero)
};

template <typename scalar_t, int CB, class Block>
INTL_HD void stats_body(Block& blk, int bx, int g, float* sm, const StatsArgs<scalar_t>& a) {
  using Shape = StatsShape<CB>;
  constexpr int TN = Shape::TN, LD = Shape::LD, RT = CB / 16;
  float* tile = sm;                 // [CB][LD]
  float* z0s = sm + CB * LD;        // raw first column of the group
  float* pivot = z0s + CB;          // block pivot (mean of the first tile), block units
  int* tile_bits = reinterpret_cast<int*>(pivot + CB);
  const int c = a.c;
  const int64_t j_begin = static_cast<int64_t>(bx) * a.chunk;
  const int64_t j_end = imin64(a.n, j_begin + a.chunk);
  const bool cols_fast = a.z.cols_fast();

  typename Block::template Local<Regs<RT, RT>> acc;
  typename Block::template Local<float> rsum;
  typename Block::template Local<int> eb;
  blk.each([&](int t) {
    acc[t].zero();
    rsum[t] = 0.0f;
    eb[t] = kNoExp;
    if (t < c) z0s[t] = static_cast<float>(a.z.ptr[a.z.offset(g, t, 0)]);
    if (t == 0) *tile_bits = 0;
  });
  blk.sync();

  for (int64_t j0 = j_begin; j0 < j_end; j0 += TN) {
    const int valid = static_cast<int>(imin64(TN, j_end - j0));
    // Load: raw values (zero padding), largest magnitude (the first column included, so the
    // shift below cannot overflow) into tile_bits by an order-free integer max.
    blk.each([&](int t) {
      float amax = t < c ? fabsf(z0s[t]) : 0.0f;
      for (int e = t; e < CB * TN; e += kThreads) {
        int i, k;
        tile_index(cols_fast, e, CB, TN, i, k);
        float v = 0.0f;
        if (i < c && k < valid) {
          v = static_cast<float>(a.z.ptr[a.z.offset(g, i, j0 + k)]);
          amax = fmaxf(amax, fabsf(v));
        }
        tile[i * LD + k] = v;
      }
      blk.atomic_max(tile_bits, float_bits(amax));
    });
    blk.sync();
    // Scale, shift, centre (row threads); rescale running sums when the exponent grew.
    const bool first = j0 == j_begin;
    blk.each([&](int t) {
      const int et = exp_of_bits(*tile_bits);
      const int eo = eb[t], en = imax(eo, et);
      if (eo != kNoExp && en != eo) {
        const float f = pow2(eo - en);
        acc[t].scale(f * f);
        if (t < c) {
          rsum[t] *= f;
          pivot[t] *= f;
        }
      }
      eb[t] = en;
      if (t < c) {
        const float s = en == kNoExp ? 1.0f : pow2(-en);
        const float z0 = z0s[t] * s;
        float* row = tile + t * LD;
        if (first) {
          float m = 0.0f;
          for (int k = 0; k < valid; ++k) m += row[k] * s - z0;
          pivot[t] = m / static_cast<float>(valid);
        }
        const float p = pivot[t];
        float sum = 0.0f;
        for (int k = 0; k < valid; ++k) {
          const float x = (row[k] * s - z0) - p;
          row[k] = x;
          sum += x;
        }
        rsum[t] += sum;
      }
    });
    blk.sync();
    // Gram matrix of the centred tile.
    blk.each([&](int t) {
      if (t == 0) *tile_bits = 0;
      acc[t].template mma<true>(t, tile, LD, tile, LD, TN);
    });
    blk.sync();
  }

  const int64_t pb = static_cast<int64_t>(g) * a.nblk + bx;
  float* q = a.part_q + pb * c * c;
  blk.each([&](int t) {
    acc[t].each_entry(t, c, c, [&](int i, int j, float v) { q[i * c + j] = v; });
    if (t < c) {
      a.part_v[pb * 2 * c + t] = pivot[t];
      a.part_v[pb * 2 * c + c + t] = rsum[t];
    }
    if (t == 0) a.part_e[pb] = eb[t];
  });
}

// ---------------------------------------------------------------------------------------------
// Forward 2: merge of the block partials (one thread per entry of S).

struct ReduceArgs {
  int c;
  int64_t n, chunk;
  int nblk;
  int e_eps;  // clamped frexp exponent of sqrt(eps); kNoExp when eps = 0
  float divisor;
  const float* part_q;
  const float* part_v;
  const int* part_e;
  float* S;       // (G, c, c)
  float* mean;    // (G, c)
  float* rscale;  // (G)
};

template <class Block>
INTL_HD void reduce_body(Block& blk, int bx, int g, float*, const ReduceArgs& a) {
  blk.each([&](int t) {
    const int c = a.c;
    const int64_t idx = static_cast<int64_t>(bx) * kThreads + t;
    if (idx >= static_cast<int64_t>(c) * c) return;
    const int i = static_cast<int>(idx / c), j = static_cast<int>(idx % c);
    const int64_t p0 = static_cast<int64_t>(g) * a.nblk;
    int e = a.e_eps;
    for (int b = 0; b < a.nblk; ++b) e = imax(e, a.part_e[p0 + b]);
    if (e == kNoExp) e = 0;  // all zero and eps = 0: frexp(0) = 0
    // Group mean of the shifted values (entries i and j).
    float mi = 0.0f, mj = 0.0f;
    for (int b = 0; b < a.nblk; ++b) {
      const int eb = a.part_e[p0 + b];
      const float f = eb == kNoExp ? 0.0f : pow2(eb - e);
      const float nb = static_cast<float>(imin64(a.chunk, a.n - b * a.chunk));
      const float* v = a.part_v + (p0 + b) * 2 * c;
      mi += nb * ((v[i] + v[c + i] / nb) * f);
      mj += nb * ((v[j] + v[c + j] / nb) * f);
    }
    const float nf = static_cast<float>(a.n);
    mi /= nf;
    mj /= nf;
    float m2 = 0.0f;
    for (int b = 0; b < a.nblk; ++b) {
      const int eb = a.part_e[p0 + b];
      const float f = eb == kNoExp ? 0.0f : pow2(eb - e);
      const float nb = static_cast<float>(imin64(a.chunk, a.n - b * a.chunk));
      const float* v = a.part_v + (p0 + b) * 2 * c;
      const float q = a.part_q[(p0 + b) * c * c + idx];
      const float di = (v[i] + v[c + i] / nb) * f - mi;
      const float dj = (v[j] + v[c + j] / nb) * f - mj;
      m2 += (q - v[c + i] * v[c + j] / nb) * (f * f) + nb * di * dj;
    }
    a.S[static_cast<int64_t>(g) * c * c + idx] = m2 / a.divisor;
    if (j == 0) a.mean[static_cast<int64_t>(g) * c + i] = mi;
    if (idx == 0) a.rscale[g] = pow2(-e);
  });
}

// ---------------------------------------------------------------------------------------------
// Forward 3: trace normalisation and the T Newton steps, one block per group.

struct NewtonArgs {
  int c, T, G;
  float eps_root;  // sqrt(eps) as float32; 0 when eps = 0
  const float* rscale;
  float* A;    // (G, c, c): S on entry, A = S/τ on exit
  float* tau;  // (G)
  float* P;    // (T, G, c, c)
  float* X;    // (T−1, G, c, c)
  float* tmp;  // (G, 2, c, c)
};

// τ = 0 or subnormal: the group is treated as zero (Y = 0), as in the torch backend.
INTL_HD float safe_tau(float tau) { return tau >= FLT_MIN ? tau : 1.0f; }
INTL_HD float safe_rsqrt_tau(float tau) { return tau >= FLT_MIN ? 1.0f / sqrtf(tau) : 0.0f; }

template <int CB, class Block>
INTL_HD void newton_body(Block& blk, int, int g, float* sm, const NewtonArgs& a) {
  const int c = a.c;
  const int64_t cc = static_cast<int64_t>(c) * c;
  float* scal = sm + MatShape<CB>::kMm + kThreads;
  float* A = a.A + g * cc;
  float* T1 = a.tmp + (2 * g) * cc;
  float* T2 = T1 + cc;
  auto Pk = [&](int k) { return a.P + (static_cast<int64_t>(k - 1) * a.G + g) * cc; };  // P_k, k >= 1
  auto Xk = [&](int k) { return a.X + (static_cast<int64_t>(k - 1) * a.G + g) * cc; };  // X_k = P_k²
  float ridge = 0.0f;
  if (a.eps_root > 0.0f) {
    const float rr = a.eps_root * a.rscale[g];
    ridge = rr * rr;
  }
  blk.each([&](int t) {
    if (t == 0) {
      float tr = 0.0f;
      for (int i = 0; i < c; ++i) tr += A[i * c + i] + ridge;
      scal[0] = tr;
      a.tau[g] = tr;
    }
  });
  blk.sync();
  const float ts = safe_tau(scal[0]);
  float* P1 = Pk(1);
  block_entries(blk, c, [&](int i, int j, int e) {
    const float s = A[e] + (i == j ? ridge : 0.0f);
    const float v = s / ts;
    A[e] = v;
    P1[e] = (i == j ? 1.5f : 0.0f) - 0.5f * v;
  });
  if (a.T >= 2) {  // P_1 is a polynomial in A: X_1 and P_2 cost 2 products
    block_mm<CB>(blk, sm, A, A, c, [&](int i, int j, float v) { T1[i * c + j] = v; });
    float* X1 = Xk(1);
    block_entries(blk, c, [&](int i, int j, int e) {
      const float d = i == j ? 1.0f : 0.0f;
      X1[e] = (9.0f * d - 6.0f * A[e] + T1[e]) * 0.25f;
      T2[e] = T1[e] - 9.0f * A[e] + 27.0f * d;
    });
    float* P2 = Pk(2);
    block_mm<CB>(blk, sm, T1, T2, c, [&](int i, int j, float v) {
      const int e = i * c + j;
      P2[e] = ((i == j ? 36.0f : 0.0f) - 39.0f * A[e] + v) / 16.0f;
    });
  }
  for (int k = 2; k < a.T; ++k) {
    const float* P = Pk(k);
    float* X = Xk(k);
    float* Pn = Pk(k + 1);
    block_mm<CB>(blk, sm, P, P, c, [&](int i, int j, float v) { X[i * c + j] = v; });
    block_mm<CB>(blk, sm, X, A, c, [&](int i, int j, float v) { T1[i * c + j] = v; });
    block_mm<CB>(blk, sm, P, T1, c, [&](int i, int j, float v) {
      const int e = i * c + j;
      Pn[e] = 1.5f * P[e] - 0.5f * v;
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Forward 4 and backward 4: the apply pass.
//   forward:  out = diag(w)·(P_T/√τ)·Zc + bias
//   backward: out = 2^-e·(Wm·(Ȳ − mean Ȳ) + M·Zc), Wm = (P_T/√τ)·diag(w) from the adjoint kernel

template <typename scalar_t>
struct ApplyArgs {
  Strided<const scalar_t> z;
  Strided<const scalar_t> dy;  // backward only
  Strided<scalar_t> out;
  int c, T, G;
  int64_t n, chunk;
  const float* mean;    // (G, c)
  const float* rscale;  // (G)
  const float* tau;     // (G)           forward
  const float* P;       // (T, G, c, c)  forward: P_T
  const float* weight;  // (G, c) or null, forward
  const float* bias;    // (G, c) or null, forward
  const float* Wm;      // (G, c, c)     backward
  const float* M;       // (G, c, c)     backward
  const float* ysum;    // (G, c)        backward: row sums of Ȳ
};

template <typename scalar_t, int CB, bool BWD, class Block>
INTL_HD void apply_body(Block& blk, int bx, int g, float* sm, const ApplyArgs<scalar_t>& a) {
  using Shape = ApplyShape<CB, BWD>;
  constexpr int KW = Shape::KW, TN = Shape::TN, LDW = Shape::LDW, LDX = Shape::LDX;
  constexpr int RT = CB / 16, CT = TN / 16;
  static_assert(TN % 16 == 0, "apply tiles are a multiple of the 16-wide thread grid");
  float* Wsm = sm;                       // [CB][LDW]
  float* Xt = Wsm + CB * LDW;            // [KW][LDX]; reused for the output tile
  float* zs0 = Xt + KW * LDX;            // scaled first column
  float* mu = zs0 + CB;                  // mean of the shifted rows
  float* ym = mu + CB;                   // backward: row means of Ȳ
  float* bias = ym + CB;                 // forward: bias (0 without affine)
  const int c = a.c;
  const int64_t cc = static_cast<int64_t>(c) * c;
  const float rs = a.rscale[g];
  const int64_t j_begin = static_cast<int64_t>(bx) * a.chunk;
  const int64_t j_end = imin64(a.n, j_begin + a.chunk);

  blk.each([&](int t) {
    for (int e = t; e < CB * KW; e += kThreads) {
      const int i = e / KW, q = e - i * KW;
      float w = 0.0f;
      if (!BWD) {
        if (i < c && q < c) {
          const float rt = safe_rsqrt_tau(a.tau[g]);
          const float* PT = a.P + (static_cast<int64_t>(a.T - 1) * a.G + g) * cc;
          w = PT[i * c + q] * rt;
          if (a.weight != nullptr) w *= a.weight[g * c + i];
        }
      } else if (i < c) {
        if (q < c) w = a.Wm[g * cc + i * c + q];
        else if (q >= CB && q - CB < c) w = a.M[g * cc + i * c + (q - CB)];
      }
      Wsm[i * LDW + q] = w;
    }
    if (t < CB) {
      const bool row = t < c;
      zs0[t] = row ? static_cast<float>(a.z.ptr[a.z.offset(g, t, 0)]) * rs : 0.0f;
      mu[t] = row ? a.mean[g * c + t] : 0.0f;
      ym[t] = (BWD && row) ? a.ysum[g * c + t] / static_cast<float>(a.n) : 0.0f;
      bias[t] = (!BWD && row && a.bias != nullptr) ? a.bias[g * c + t] : 0.0f;
    }
  });
  blk.sync();

  const bool in_fast = a.z.cols_fast();
  const bool dy_fast = BWD ? a.dy.cols_fast() : true;
  const bool out_fast = a.out.cols_fast();
  for (int64_t j0 = j_begin; j0 < j_end; j0 += TN) {
    const int valid = static_cast<int>(imin64(TN, j_end - j0));
    blk.each([&](int t) {
      for (int e = t; e < CB * TN; e += kThreads) {
        int i, k;
        tile_index(in_fast, e, CB, TN, i, k);
        float x = 0.0f;
        if (i < c && k < valid) x = (static_cast<float>(a.z.ptr[a.z.offset(g, i, j0 + k)]) * rs - zs0[i]) - mu[i];
        Xt[((BWD ? CB : 0) + i) * LDX + k] = x;
        if (BWD) {
          tile_index(dy_fast, e, CB, TN, i, k);
          float d = 0.0f;
          if (i < c && k < valid) d = static_cast<float>(a.dy.ptr[a.dy.offset(g, i, j0 + k)]) - ym[i];
          Xt[i * LDX + k] = d;
        }
      }
    });
    blk.sync();
    typename Block::template Local<Regs<RT, CT>> acc;
    blk.each([&](int t) {
      acc[t].zero();
      acc[t].template mma<false>(t, Wsm, LDW, Xt, LDX, KW);
    });
    blk.sync();
    blk.each([&](int t) {
      acc[t].each_entry(t, CB, TN, [&](int i, int k, float y) { Xt[i * LDX + k] = BWD ? y * rs : y + bias[i]; });
    });
    blk.sync();
    blk.each([&](int t) {
      for (int e = t; e < CB * TN; e += kThreads) {
        int i, k;
        tile_index(out_fast, e, CB, TN, i, k);
        if (i < c && k < valid) a.out.ptr[a.out.offset(g, i, j0 + k)] = static_cast<scalar_t>(Xt[i * LDX + k]);
      }
    });
    blk.sync();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward 1: one pass over (Ȳ, Z) for partial Ȳ·Zcᵀ and row sums of Ȳ.

template <typename scalar_t>
struct DStatsArgs {
  Strided<const scalar_t> z;
  Strided<const scalar_t> dy;
  int c;
  int64_t n, chunk;
  int nblk;
  const float* mean;    // (G, c)
  const float* rscale;  // (G)
  float* part_q;        // (G, nblk, c, c)
  float* part_v;        // (G, nblk, c)
};

template <typename scalar_t, int CB, class Block>
INTL_HD void dstats_body(Block& blk, int bx, int g, float* sm, const DStatsArgs<scalar_t>& a) {
  using Shape = DStatsShape<CB>;
  constexpr int TN = Shape::TN, LD = Shape::LD, RT = CB / 16;
  float* Yt = sm;                // [CB][LD]
  float* Zt = Yt + CB * LD;      // [CB][LD]
  float* zs0 = Zt + CB * LD;
  float* mu = zs0 + CB;
  const int c = a.c;
  const float rs = a.rscale[g];
  const int64_t j_begin = static_cast<int64_t>(bx) * a.chunk;
  const int64_t j_end = imin64(a.n, j_begin + a.chunk);
  const bool z_fast = a.z.cols_fast(), dy_fast = a.dy.cols_fast();

  typename Block::template Local<Regs<RT, RT>> acc;
  typename Block::template Local<float> rsum;
  blk.each([&](int t) {
    acc[t].zero();
    rsum[t] = 0.0f;
    if (t < CB) {
      zs0[t] = t < c ? static_cast<float>(a.z.ptr[a.z.offset(g, t, 0)]) * rs : 0.0f;
      mu[t] = t < c ? a.mean[g * c + t] : 0.0f;
    }
  });
  blk.sync();
  for (int64_t j0 = j_begin; j0 < j_end; j0 += TN) {
    const int valid = static_cast<int>(imin64(TN, j_end - j0));
    blk.each([&](int t) {
      for (int e = t; e < CB * TN; e += kThreads) {
        int i, k;
        tile_index(z_fast, e, CB, TN, i, k);
        float x = 0.0f;
        if (i < c && k < valid) x = (static_cast<float>(a.z.ptr[a.z.offset(g, i, j0 + k)]) * rs - zs0[i]) - mu[i];
        Zt[i * LD + k] = x;
        tile_index(dy_fast, e, CB, TN, i, k);
        float d = 0.0f;
        if (i < c && k < valid) d = static_cast<float>(a.dy.ptr[a.dy.offset(g, i, j0 + k)]);
        Yt[i * LD + k] = d;
      }
    });
    blk.sync();
    blk.each([&](int t) {
      acc[t].template mma<true>(t, Yt, LD, Zt, LD, TN);
      if (t < c) {
        float s = 0.0f;
        for (int k = 0; k < valid; ++k) s += Yt[t * LD + k];
        rsum[t] += s;
      }
    });
    blk.sync();
  }
  const int64_t pb = static_cast<int64_t>(g) * a.nblk + bx;
  float* q = a.part_q + pb * c * c;
  blk.each([&](int t) {
    acc[t].each_entry(t, c, c, [&](int i, int j, float v) { q[i * c + j] = v; });
    if (t < c) a.part_v[pb * c + t] = rsum[t];
  });
}

// Backward 2: fixed-order sums of the partials.
struct DReduceArgs {
  int c, nblk;
  const float* part_q;
  const float* part_v;
  float* dw;    // (G, c, c): Ȳ·Zcᵀ
  float* ysum;  // (G, c)
};

template <class Block>
INTL_HD void dreduce_body(Block& blk, int bx, int g, float*, const DReduceArgs& a) {
  blk.each([&](int t) {
    const int c = a.c;
    const int64_t idx = static_cast<int64_t>(bx) * kThreads + t;
    if (idx >= static_cast<int64_t>(c) * c) return;
    const int64_t p0 = static_cast<int64_t>(g) * a.nblk;
    float s = 0.0f;
    for (int b = 0; b < a.nblk; ++b) s += a.part_q[(p0 + b) * c * c + idx];
    a.dw[static_cast<int64_t>(g) * c * c + idx] = s;
    if (idx < c) {
      float y = 0.0f;
      for (int b = 0; b < a.nblk; ++b) y += a.part_v[(p0 + b) * c + idx];
      a.ysum[static_cast<int64_t>(g) * c + idx] = y;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward 3: the adjoint recursion of DESIGN §3, symmetrised, one block per group.

struct AdjointArgs {
  int c, T, G;
  float divisor;
  const float* dw;      // (G, c, c) Ȳ·Zcᵀ (before the affine weight)
  const float* ysum;    // (G, c)
  const float* weight;  // (G, c) or null
  const float* tau;     // (G)
  const float* A;       // (G, c, c)
  const float* P;       // (T, G, c, c)
  const float* X;       // (T−1, G, c, c)
  float* ws;            // (G, 7, c, c) scratch
  float* M;             // (G, c, c) out: (S̄ + S̄ᵀ)/divisor
  float* Wm;            // (G, c, c) out: (P_T/√τ)·diag(w)
  float* dweight;       // (G, c) or null
  float* dbias;         // (G, c) or null
};

template <int CB, class Block>
INTL_HD void adjoint_body(Block& blk, int, int g, float* sm, const AdjointArgs& a) {
  const int c = a.c;
  const int64_t cc = static_cast<int64_t>(c) * c;
  float* red = sm + MatShape<CB>::kMm;
  float* dP = a.ws + 7 * g * cc;
  float* D = dP + cc;
  float* E = D + cc;
  float* XD = E + cc;
  float* EP = XD + cc;
  float* H = EP + cc;
  float* dA = H + cc;
  float* M = a.M + g * cc;
  float* Wm = a.Wm + g * cc;
  const float* A = a.A + g * cc;
  const float* dw = a.dw + g * cc;
  const float* w = a.weight != nullptr ? a.weight + g * c : nullptr;
  auto Pk = [&](int k) { return a.P + (static_cast<int64_t>(k - 1) * a.G + g) * cc; };
  auto Xk = [&](int k) { return a.X + (static_cast<int64_t>(k - 1) * a.G + g) * cc; };
  const float tau = a.tau[g];
  const float ts = safe_tau(tau), rt = safe_rsqrt_tau(tau);
  const float* PT = Pk(a.T);

  // W̄ = diag(w)·Ȳ Zcᵀ;  P̄_T = W̄/√τ;  τ̄ = −⟨W̄, W⟩/(2τ).
  typename Block::template Local<float> part;
  blk.each([&](int t) {
    float s = 0.0f;
    for (int e = t; e < c * c; e += kThreads) {
      const int i = e / c, j = e % c;
      const float Wv = PT[e] * rt;
      const float gw = w != nullptr ? w[i] * dw[e] : dw[e];
      dP[e] = gw * rt;
      dA[e] = 0.0f;
      Wm[e] = w != nullptr ? Wv * w[j] : Wv;
      s += gw * Wv;
    }
    part[t] = s;
    if (t < c && a.dweight != nullptr) {  // dweight_i = Σ_j W_ij (Ȳ Zcᵀ)_ij; dbias = Σ Ȳ
      float d = 0.0f;
      for (int j = 0; j < c; ++j) d += PT[t * c + j] * rt * dw[t * c + j];
      a.dweight[g * c + t] = d;
      a.dbias[g * c + t] = a.ysum[g * c + t];
    }
  });
  blk.sync();
  float dtau = block_sum(blk, red, part) * (-0.5f / ts);
  blk.sync();

  for (int k = a.T - 1; k >= 1; --k) {
    const float* P = Pk(k);
    const float* X = Xk(k);
    block_entries(blk, c, [&](int i, int j, int e) { D[e] = 0.5f * (dP[e] + dP[j * c + i]); });
    block_mm<CB>(blk, sm, P, D, c, [&](int i, int j, float v) { E[i * c + j] = v; });
    block_mm<CB>(blk, sm, X, D, c, [&](int i, int j, float v) { XD[i * c + j] = v; });
    block_mm<CB>(blk, sm, E, P, c, [&](int i, int j, float v) { EP[i * c + j] = v; });
    block_entries(blk, c, [&](int i, int j, int e) { H[e] = XD[e] + XD[j * c + i] + EP[e]; });
    block_mm<CB>(blk, sm, X, E, c, [&](int i, int j, float v) { dA[i * c + j] -= 0.5f * v; });
    block_mm<CB>(blk, sm, H, A, c, [&](int i, int j, float v) {
      const int e = i * c + j;
      dP[e] = 1.5f * D[e] - 0.5f * v;
    });
  }
  // Ā −= ½ sym(P̄_1) (the step from P_0 = I);  τ̄ −= ⟨Ā, A⟩/τ.
  blk.each([&](int t) {
    float s = 0.0f;
    for (int e = t; e < c * c; e += kThreads) {
      const int i = e / c, j = e % c;
      const float v = dA[e] - 0.5f * (0.5f * (dP[e] + dP[j * c + i]));
      dA[e] = v;
      s += v * A[e];
    }
    part[t] = s;
  });
  blk.sync();
  dtau -= block_sum(blk, red, part) / ts;
  blk.sync();
  // S̄ = Ā/τ + τ̄ I;  M = (S̄ + S̄ᵀ)/divisor.
  block_entries(blk, c, [&](int i, int j, int e) {
    const float d = i == j ? 2.0f * dtau : 0.0f;
    M[e] = ((dA[e] / ts + dA[j * c + i] / ts) + d) / a.divisor;
  });
}

}  // namespace blocks
}  // namespace intl_kernels
