// Kernels of the `cuda` backend for small groups (r = c <= 128 rows, long strided columns),
// written once as block-level code that runs on a GPU and, in a host emulator, on the CPU.
//
// Algorithm and saved statistics are those of the `torch` backend (intl_kernels/whiten.py,
// docs/design.md §2–§3); what is specific here is how the work is cut:
//
// forward   1. stats:   grid (blocks per group, G). Each block streams its tiles of TN columns: a
//                       tile is loaded once (through the input's strides), scaled by the power of
//                       two of the largest magnitude seen so far in the block (exact; a larger
//                       tile rescales the running sums exactly), shifted by the group's first
//                       column, centred on the block's first-tile mean, and its c×c Gram matrix
//                       and row sums are accumulated in registers. One read of Z.
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
// backward  1. dstats:  one pass over (Ȳ, Z): partial Ȳ·Zcᵀ and row sums of Ȳ per block.
//           2. reduce:  the same fixed-order merge.
//           3. adjoint: a block per group runs the symmetrised adjoint recursion (5 products a
//                       step) and forms M = (S̄ + S̄ᵀ)/divisor and W·diag(weight).
//           4. apply:   Z̄ = 2^-e·([W·diag(w) | M]·[Ȳ − mean(Ȳ); Zc]): one K = 2c product.
//
// The streaming passes (stats, dstats, apply) are cut so that a tile costs little besides its
// FFMAs (the products' c/32 warp-FFMA per element are the floor without tensor cores):
// - indexing: the column offsets (j / n2)·s1 + (j % n2)·s2 of a tile are computed once per tile,
//   one column per thread, into shared memory (tile_cols); an element is its row's pointer,
//   fixed for the block, plus its column's offset: no division per element, for NCHW views
//   (two-level columns), channels_last (unit row stride), sliced and expanded (stride 0) inputs
//   alike;
// - loads: a thread owns quads of 4 consecutive rows (k-major tiles) or columns (row-major
//   tiles) at fixed places of the tile (QuadMap) and stores each quad as one float4;
//   consecutive threads walk the input's unit-stride axis, whichever it is, so loads coalesce in
//   both layouts with the same instructions;
// - products: R×C register tiles over operands stored k-major, read as float4 (Acc::mma: a k
//   step is R/4 + C/4 LDS.128 for R·C FFMA, against 8 LDS per 16 FFMA for scalar 4×4 tiles);
//   leading dimensions ≡ 4 (mod 32) floats keep the float4 stores of 8 consecutive lanes on
//   distinct banks. The c×c Gram matrices of the statistics passes (8×8 per thread at c = 64)
//   are split over column slices of the tile (split K) and merged in slice order at the end;
// - grids: the columns of a group are split in whole tiles, evenly (Part), over a number of
//   blocks that the launcher sizes from the kernel's occupancy (whiten_small.h, plan_blocks).
//
// A kernel body is a sequence of phases separated by block barriers. `Block::each(f)` runs
// f(thread) for every thread of the block (on the GPU: the calling thread), `Block::sync()`
// is the barrier, and `Block::Local<T>` is per-thread state kept across phases (a register
// variable on the GPU, an array indexed by thread in the emulator). Threads communicate only
// through shared memory across a barrier, so running the threads of a phase one after the
// other on the CPU, in either order, computes what the GPU computes. The emulator refuses two
// phases without a barrier between them, and the tests run both thread orders, which
// exposes a phase that depends on the order of its threads. Code outside `each` runs in every
// thread on the GPU and once in the emulator: it only reads block-uniform values.
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
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__CUDACC__)
#define INTL_HD __host__ __device__ __forceinline__
#define INTL_UNROLL _Pragma("unroll")
#else
#define INTL_HD inline
#define INTL_UNROLL
#endif

namespace intl_kernels {
namespace blocks {

constexpr int kThreads = 256;  // threads per block
constexpr int kMaxRows = 128;  // largest group size c
constexpr int kChunkQuantum = 64;  // a forced number of columns per block (emulator) is a multiple of this
constexpr int kNoExp = INT_MIN / 2;  // "no nonzero value seen": frexp(0) has no exponent
// Power-of-two rescale exponents are clamped so 2^±e stay normal float32 numbers (as the
// torch backend does): e in [frexp(FLT_MIN), frexp(FLT_MAX) − 2].
constexpr int kEmin = -125;
constexpr int kEmax = 126;

// Rows per group padded to the block's tile: 32, 64 or 128.
inline int row_bucket(int c) { return c <= 32 ? 32 : (c <= 64 ? 64 : 128); }

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

// Four floats, 16-byte aligned: one LDS.128 / STS.128 on the GPU.
struct alignas(16) F4 {
  float e[4];
};

#if !defined(__CUDA_ARCH__)
// The emulator holds vector accesses to the GPU's rule: a float4 at an address that is not a
// multiple of 16 bytes faults on the GPU ("misaligned address"), so it is an error here too.
inline void check_aligned16(const float* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw std::runtime_error(std::string("emulated kernel: misaligned ") + what +
                             " (a float4 access needs a 16-byte aligned address; the GPU would fault)");
}
#endif

INTL_HD F4 ld4(const float* p) {
#if defined(__CUDA_ARCH__)
  const float4 v = *reinterpret_cast<const float4*>(p);
  return F4{{v.x, v.y, v.z, v.w}};
#else
  check_aligned16(p, "ld4");
  F4 v;
  memcpy(v.e, p, sizeof(v.e));
  return v;
#endif
}

INTL_HD void st4(float* p, const F4& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(p) = make_float4(v.e[0], v.e[1], v.e[2], v.e[3]);
#else
  check_aligned16(p, "st4");
  memcpy(p, v.e, sizeof(v.e));
#endif
}

// A group of rows read through strides: element (i, j) of group g, column j = b·n2 + l.
template <typename T>
struct Strided {
  T* ptr;
  int64_t sg, sr, s1, s2;
  int64_t n2;
  // Offset of column j (the row and group parts apart): one 64-bit division, once per tile column.
  INTL_HD int64_t col(int64_t j) const {
    const int64_t b = j / n2;
    return b * s1 + (j - b * n2) * s2;
  }
  // Rows are the unit-stride axis (channels_last group views, transposed inputs).
  INTL_HD bool rows_fast() const { return sr == 1 && s2 != 1; }
};

// Byte offsets from a group's first element: a column's (per tile) plus a row's (per block) is
// one 64-bit add per element; the base stays a typed pointer (global loads and stores).
template <typename T>
INTL_HD T& at_bytes(T* base, int64_t bytes) {
  using C = typename std::conditional<std::is_const<T>::value, const char, char>::type;
  return *reinterpret_cast<T*>(reinterpret_cast<C*>(base) + bytes);
}

// Byte offsets of the tile columns j0 .. j0 + tn − 1 of `s`, one per thread t < tn. Columns from
// j_end on get column j_end − 1's: loads need no guard (the kernels zero or drop what those
// columns give) and stores to them repeat the last column's value.
template <typename T>
INTL_HD void tile_cols(const Strided<T>& s, int64_t* out, int t, int tn, int64_t j0, int64_t j_end) {
  if (t < tn) out[t] = s.col(j0 + t < j_end ? j0 + t : j_end - 1) * static_cast<int64_t>(sizeof(T));
}

// Byte offset of row r of `s`, rows from c on at row c − 1's (loads need no guard; the kernels
// discard or zero what padding rows give).
template <typename T>
INTL_HD int64_t row_bytes(const Strided<T>& s, int r, int c) {
  return static_cast<int64_t>(r < c ? r : c - 1) * s.sr * static_cast<int64_t>(sizeof(T));
}

// The bits from which a largest magnitude raises the frexp exponent above e (those of 2^e,
// which has exponent e + 1); any nonzero value raises kNoExp.
INTL_HD int growth_bits(int e) { return e == kNoExp ? 1 : (e >= kEmax ? INT_MAX : float_bits(pow2(e))); }

// The columns of a group split over nblk blocks in whole tiles of tn columns, as evenly as the
// tiles allow (the first tiles % nblk blocks get one tile more). nblk <= tiles: no block is empty.
struct Part {
  int64_t n;
  int tn, nblk;
  INTL_HD int64_t begin(int b) const {
    const int64_t tiles = (n + tn - 1) / tn, q = tiles / nblk, r = tiles % nblk;
    const int64_t j = (b * q + (b < r ? b : r)) * tn;
    return j < n ? j : n;
  }
  INTL_HD int64_t cols(int b) const { return begin(b + 1) - begin(b); }
};

// How the threads of a block cover a tile of NB × NA elements stored B-major (A contiguous, with
// a padded leading dimension) in shared memory: a thread owns PA = NA/32 quads of 4 consecutive
// A places, A = 4·(a0 + 8i) + q, at PB = NB/32 B places, B = b0 + 32j, and stores a quad as one
// float4. Consecutive threads walk the axis the input's memory walks with unit stride: along A
// (a0 = t % 8) when A is that axis, else along B (b0 = t % 32); either way the tile's elements are
// the thread's in the same order, so the instructions are the same in both layouts.
template <int NA, int NB>
struct QuadMap {
  static_assert(NA % 32 == 0 && NB % 32 == 0, "tiles are whole 32 × 32 blocks of the 8 × 32 lane grid");
  static constexpr int PA = NA / 32, PB = NB / 32;
  int a0, b0;
  INTL_HD QuadMap(int t, bool a_fast) : a0(a_fast ? t % 8 : t / 32), b0(a_fast ? t / 8 : t % 32) {}
  INTL_HD int a(int i, int q = 0) const { return 4 * (a0 + 8 * i) + q; }
  INTL_HD int b(int j) const { return b0 + 32 * j; }
};

// R×C accumulators of one thread of a tiled product: row u of the tile is 4·ty + 4·TY·(u/4) + u%4
// and column w is 4·tx + 4·TX·(w/4) + w%4 for the thread at (ty, tx) of a TY × TX grid, so four
// consecutive rows or columns are one float4 of a k-major operand (a row of A, or of B, per k).
template <int R, int C>
struct Acc {
  static_assert(R % 4 == 0 && C % 4 == 0, "register tiles are whole float4 quads");
  float v[R][C];

  template <int TY>
  static INTL_HD int row(int ty, int u) {
    return 4 * ty + 4 * TY * (u / 4) + u % 4;
  }
  INTL_HD void zero() {
    INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C; ++w) v[u][w] = 0.0f;
  }
  INTL_HD void scale(float f) {
    INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C; ++w) v[u][w] *= f;
  }
  // v += Σ_k A[k·LDA + row]·B[k·LDB + col] over K steps, both operands k-major (16-byte aligned,
  // LDA and LDB multiples of 4): R/4 + C/4 float4 loads and R·C FFMA per step.
  template <int TY, int TX, int K, int LDA, int LDB>
  INTL_HD void mma(int ty, int tx, const float* A, const float* B) {
    static_assert(LDA % 4 == 0 && LDB % 4 == 0, "float4 rows");
    A += 4 * ty;
    B += 4 * tx;
    INTL_UNROLL for (int k = 0; k < K; ++k) {
      float x[R], y[C];
      INTL_UNROLL for (int u = 0; u < R / 4; ++u) {
        const F4 q = ld4(A + k * LDA + 4 * TY * u);
        INTL_UNROLL for (int e = 0; e < 4; ++e) x[4 * u + e] = q.e[e];
      }
      INTL_UNROLL for (int w = 0; w < C / 4; ++w) {
        const F4 q = ld4(B + k * LDB + 4 * TX * w);
        INTL_UNROLL for (int e = 0; e < 4; ++e) y[4 * w + e] = q.e[e];
      }
      INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C; ++w) v[u][w] += x[u] * y[w];
    }
  }
  // The tile into / added from a row-major matrix M (leading dimension LDM, a multiple of 4).
  template <int TY, int TX, int LDM>
  INTL_HD void store(int ty, int tx, float* M) const {
    INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C / 4; ++w) {
      st4(M + row<TY>(ty, u) * LDM + row<TX>(tx, 4 * w), F4{{v[u][4 * w], v[u][4 * w + 1], v[u][4 * w + 2], v[u][4 * w + 3]}});
    }
  }
  template <int TY, int TX, int LDM>
  INTL_HD void add(int ty, int tx, const float* M) {
    INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C / 4; ++w) {
      const F4 q = ld4(M + row<TY>(ty, u) * LDM + row<TX>(tx, 4 * w));
      INTL_UNROLL for (int e = 0; e < 4; ++e) v[u][4 * w + e] += q.e[e];
    }
  }
  // f(i, j, value) for every entry (tile row i, tile column j).
  template <int TY, int TX, class F>
  INTL_HD void each_entry(int ty, int tx, F&& f) const {
    INTL_UNROLL for (int u = 0; u < R; ++u) INTL_UNROLL for (int w = 0; w < C; ++w) {
      f(row<TY>(ty, u), row<TX>(tx, w), v[u][w]);
    }
  }
};

// The Gram accumulators of KS column slices (thread t holds slice t / (TG·TG)'s tile t % (TG·TG))
// merged into slice 0's in slice order, through `buf` (CB × CB floats of shared memory).
template <int KS, int TG, int CB, class Block, class Accs>
INTL_HD void merge_slices(Block& blk, Accs& acc, float* buf) {
  for (int r = 1; r < KS; ++r) {
    blk.each([&](int t) {
      const int u = t % (TG * TG);
      if (t / (TG * TG) == r) acc[t].template store<TG, TG, CB>(u / TG, u % TG, buf);
    });
    blk.sync();
    blk.each([&](int t) {
      if (t < TG * TG) acc[t].template add<TG, TG, CB>(t / TG, t % TG, buf);
    });
    blk.sync();
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

template <int CB>
struct MatShape {  // block_mm and the per-group Newton / adjoint kernels
  static constexpr int BK = 16;  // inner dimension per stage
  static constexpr int LD = CB + 4;  // operand tiles [BK][LD], k-major
  static constexpr int R = CB == 128 ? 8 : 4;  // R×R per thread of a TG × TG grid (64 threads at c <= 32)
  static constexpr int TG = CB / R;
  static constexpr int kMm = 2 * BK * LD;
  static constexpr int kSmem = kMm + kThreads + 4;  // + reduction scratch, scalars
};

// C = L·R for c×c row-major float32 matrices in global memory, then epi(i, j, value) for
// every i, j < c (by the thread that computed it). Operand tiles go through shared memory,
// L transposed (both k-major, read as float4); ends with a barrier, so the results are visible
// to the next product.
template <int CB, class Block, class Epi>
INTL_HD void block_mm(Block& blk, float* sm, const float* L, const float* R, int c, Epi&& epi) {
  using S = MatShape<CB>;
  constexpr int BK = S::BK, LD = S::LD, TG = S::TG;
  float* Ls = sm;            // [BK][LD]: Lᵀ
  float* Rs = sm + BK * LD;  // [BK][LD]
  typename Block::template Local<Acc<S::R, S::R>> acc;
  blk.each([&](int t) { acc[t].zero(); });
  blk.sync();
  for (int k0 = 0; k0 < c; k0 += BK) {
    blk.each([&](int t) {
      for (int e = t; e < CB * BK; e += kThreads) {
        const int i = e / BK, kk = e - i * BK, k = k0 + kk;
        Ls[kk * LD + i] = (i < c && k < c) ? L[i * c + k] : 0.0f;
        const int kr = e / CB, j = e - kr * CB;
        Rs[kr * LD + j] = (k0 + kr < c && j < c) ? R[(k0 + kr) * c + j] : 0.0f;
      }
    });
    blk.sync();
    blk.each([&](int t) {
      if (t < TG * TG) acc[t].template mma<TG, TG, BK, LD, LD>(t / TG, t % TG, Ls, Rs);
    });
    blk.sync();
  }
  blk.each([&](int t) {
    if (t < TG * TG)
      acc[t].template each_entry<TG, TG>(t / TG, t % TG, [&](int i, int j, float v) {
        if (i < c && j < c) epi(i, j, v);
      });
  });
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

template <int CB>
struct StatsShape {
  static constexpr int TN = CB == 128 ? 32 : 64;  // columns per tile
  static constexpr int LD = CB + 4;  // the tile [TN][LD]: a column's rows contiguous (k-major)
  static constexpr int R = CB == 32 ? 4 : 8;  // R×R register tile of the Gram matrix
  static constexpr int TG = CB / R;  // TG × TG threads per column slice
  static constexpr int KS = kThreads / (TG * TG);  // column slices (split K): 4, 4, 1
  static constexpr int KPS = TN / KS;  // columns of a tile per slice
  static constexpr int kSums = TN * LD;  // row sums per column lane: [32][CB]
  static constexpr int kCofs = kSums + 32 * CB;  // 2 × TN column offsets (int64), by tile parity
  static constexpr int kRofs = kCofs + 4 * TN;  // CB row offsets (int64)
  static constexpr int kRows = kRofs + 2 * CB;  // z0 (raw first column), z0s (scaled), pivot
  static constexpr int kSlots = kRows + 3 * CB;  // largest-magnitude bits, by tile parity
  static constexpr int kSmem = kSlots + 4;
  static_assert(KS == 1 || TN * LD >= CB * CB, "the tile holds a slice's Gram matrix for the merge");
};

template <typename scalar_t>
struct StatsArgs {
  Strided<const scalar_t> z;
  int c;
  int64_t n;
  int nblk;        // blocks per group; columns split by Part{n, StatsShape::TN, nblk}
  float* part_q;   // (G, nblk, c, c): Σ x xᵀ with x centred on the block pivot
  float* part_v;   // (G, nblk, 2, c): pivot, Σ x
  int* part_e;     // (G, nblk): block exponent (kNoExp: all zero)
};

// The pipeline of a block: while the Gram matrix of tile t is formed from shared memory, the
// loads of tile t + 1 are in flight (registers `raw`); its largest magnitude is known one
// barrier later, and it is scaled, centred and stored at the start of the next iteration.
// Two barriers per tile. The rare growth of the exponent leaves the tile loop, rescales, and
// comes back to the same tile, so the loop itself has no branch but its exits. Padding rows
// (c <= i < CB) repeat row c − 1: their Gram entries and sums are never written out.
template <typename scalar_t, int CB, class Block>
INTL_HD void stats_body(Block& blk, int bx, int g, float* sm, const StatsArgs<scalar_t>& a) {
  using S = StatsShape<CB>;
  using Map = QuadMap<CB, S::TN>;  // A: rows, B: columns
  constexpr int TN = S::TN, LD = S::LD, TG = S::TG, KPS = S::KPS, PA = Map::PA, PB = Map::PB;
  float* tile = sm;
  float* sums = sm + S::kSums;  // [32][CB]: row sums of column lane b0, each slot one thread's
  int64_t* cofs = reinterpret_cast<int64_t*>(sm + S::kCofs);  // [2][TN] column byte offsets, by tile parity
  int64_t* rofs = reinterpret_cast<int64_t*>(sm + S::kRofs);  // [CB] row byte offsets
  float* z0 = sm + S::kRows;
  float* z0s = z0 + CB;
  float* pivot = z0s + CB;
  int* slot = reinterpret_cast<int*>(sm + S::kSlots);
  const int c = a.c;
  const Part part{a.n, TN, a.nblk};
  const int64_t j_begin = part.begin(bx), j_end = part.begin(bx + 1);
  const int ntiles = static_cast<int>((j_end - j_begin + TN - 1) / TN);
  const bool rows_fast = a.z.rows_fast();
  const scalar_t* zg = a.z.ptr + g * a.z.sg;

  struct Raw {
    float v[PA][4][PB];
  };
  typename Block::template Local<Acc<S::R, S::R>> acc;
  typename Block::template Local<Raw> raw;
  typename Block::template Local<float> z0max;

  // Raw values of tile `it` (columns past the block's: those of its last column).
  auto load = [&](int t, int it) {
    const Map m(t, rows_fast);
    const int64_t* co = cofs + (it & 1) * TN;
    int64_t ro[PA][4];
    INTL_UNROLL for (int i = 0; i < PA; ++i) INTL_UNROLL for (int q = 0; q < 4; ++q) ro[i][q] = rofs[m.a(i, q)];
    INTL_UNROLL for (int j = 0; j < PB; ++j) {
      const scalar_t* col = &at_bytes(zg, co[m.b(j)]);
      INTL_UNROLL for (int i = 0; i < PA; ++i) INTL_UNROLL for (int q = 0; q < 4; ++q) {
        raw[t].v[i][q][j] = static_cast<float>(at_bytes(col, ro[i][q]));
      }
    }
  };
  // Largest magnitude of the loaded values and of the first column, into slot s (an integer
  // max of the bits: order-free).
  auto amax = [&](int t, int s) {
    float mx = z0max[t];
    INTL_UNROLL for (int i = 0; i < PA; ++i) INTL_UNROLL for (int q = 0; q < 4; ++q) INTL_UNROLL for (int j = 0; j < PB; ++j) {
      mx = fmaxf(mx, fabsf(raw[t].v[i][q][j]));
    }
    blk.atomic_max(slot + s, float_bits(mx));
  };

  blk.each([&](int t) {
    const Map m(t, rows_fast);
    acc[t].zero();
    INTL_UNROLL for (int i = 0; i < PA; ++i) st4(sums + m.b0 * CB + m.a(i), F4{{0.0f, 0.0f, 0.0f, 0.0f}});
    tile_cols(a.z, cofs, t, TN, j_begin, j_end);
    tile_cols(a.z, cofs + TN, t, TN, j_begin + TN, j_end);
    if (t < CB) rofs[t] = row_bytes(a.z, t, c);
    if (t < CB) z0[t] = t < c ? static_cast<float>(zg[t * a.z.sr]) : 0.0f;
    if (t < 2) slot[t] = 0;
  });
  blk.sync();
  blk.each([&](int t) {
    const Map m(t, rows_fast);
    float mx = 0.0f;
    INTL_UNROLL for (int i = 0; i < PA; ++i) INTL_UNROLL for (int q = 0; q < 4; ++q) mx = fmaxf(mx, fabsf(z0[m.a(i, q)]));
    z0max[t] = mx;
    load(t, 0);
    amax(t, 0);
  });
  blk.sync();
  int eb = exp_of_bits(slot[0]);  // the block's exponent so far, and what follows from it
  int limit = growth_bits(eb);
  float s = eb == kNoExp ? 1.0f : pow2(-eb);
  {
    // Pivot: the mean of the first tile, shifted by the first column, in the block's scale.
    const int valid = static_cast<int>(imin64(TN, j_end - j_begin));
    blk.each([&](int t) {
      const Map m(t, rows_fast);
      INTL_UNROLL for (int i = 0; i < PA; ++i) {
        const F4 z = ld4(z0 + m.a(i));
        INTL_UNROLL for (int j = 0; j < PB; ++j) {
          F4 x;
          INTL_UNROLL for (int q = 0; q < 4; ++q) x.e[q] = m.b(j) < valid ? raw[t].v[i][q][j] * s - z.e[q] * s : 0.0f;
          st4(tile + m.b(j) * LD + m.a(i), x);
        }
      }
      if (t < CB) z0s[t] = z0[t] * s;
    });
    blk.sync();
    blk.each([&](int t) {
      if (t < CB) {
        float sum = 0.0f;
        for (int k = 0; k < valid; ++k) sum += tile[k * LD + t];
        pivot[t] = t < c ? sum / static_cast<float>(valid) : 0.0f;
      }
    });
    blk.sync();
  }

  int it = 0;
  for (;;) {
    for (; it < ntiles; ++it) {
      if (slot[it & 1] >= limit) break;  // the exponent grows
      const int64_t j0 = j_begin + static_cast<int64_t>(it) * TN;
      const int valid = static_cast<int>(imin64(TN, j_end - j0));
      // Scale, shift, centre into shared memory and sum the rows; then load the next tile.
      blk.each([&](int t) {
        const Map m(t, rows_fast);
        INTL_UNROLL for (int i = 0; i < PA; ++i) {
          const F4 zs = ld4(z0s + m.a(i)), p = ld4(pivot + m.a(i));
          F4 sum = ld4(sums + m.b0 * CB + m.a(i));
          INTL_UNROLL for (int j = 0; j < PB; ++j) {
            F4 x;
            INTL_UNROLL for (int q = 0; q < 4; ++q) {
              const float v = (raw[t].v[i][q][j] * s - zs.e[q]) - p.e[q];
              x.e[q] = m.b(j) < valid ? v : 0.0f;
              sum.e[q] += x.e[q];
            }
            st4(tile + m.b(j) * LD + m.a(i), x);
          }
          st4(sums + m.b0 * CB + m.a(i), sum);
        }
        load(t, it + 1);
      });
      blk.sync();
      // The Gram matrix of this tile's column slice; the next tile's largest magnitude; the
      // column offsets of the tile after it (into the buffer this tile's loads used).
      blk.each([&](int t) {
        const int sl = t / (TG * TG), u = t % (TG * TG);
        const float* part_tile = tile + sl * KPS * LD;
        acc[t].template mma<TG, TG, KPS, LD, LD>(u / TG, u % TG, part_tile, part_tile);
        amax(t, (it + 1) & 1);
        if (t == 0) slot[it & 1] = 0;
        tile_cols(a.z, cofs + (it & 1) * TN, t, TN, j0 + 2 * TN, j_end);
      });
      blk.sync();
    }
    if (it >= ntiles) break;
    // The exponent grew: rescale the sums (exact powers of two) and redo the tile.
    const int et = exp_of_bits(slot[it & 1]);
    const float f = pow2(eb - et);  // 0 from kNoExp: nothing but zeros was summed
    s = pow2(-et);
    blk.each([&](int t) {
      const Map m(t, rows_fast);
      acc[t].scale(f * f);
      INTL_UNROLL for (int i = 0; i < PA; ++i) {
        F4 sum = ld4(sums + m.b0 * CB + m.a(i));
        INTL_UNROLL for (int q = 0; q < 4; ++q) sum.e[q] *= f;
        st4(sums + m.b0 * CB + m.a(i), sum);
      }
      if (t < CB) {
        z0s[t] = z0[t] * s;
        pivot[t] *= f;
      }
    });
    blk.sync();
    eb = et;
    limit = growth_bits(eb);
  }

  // Merge the column slices in slice order (the tile is free after the loop's last barrier).
  merge_slices<S::KS, TG, CB>(blk, acc, tile);
  // Row sums: the 32 column lanes' partial sums, added in lane order.
  const int64_t pb = static_cast<int64_t>(g) * a.nblk + bx;
  float* q = a.part_q + pb * c * c;
  blk.each([&](int t) {
    if (t < TG * TG)
      acc[t].template each_entry<TG, TG>(t / TG, t % TG, [&](int i, int j, float v) {
        if (i < c && j < c) q[i * c + j] = v;
      });
    if (t < c) {
      float sum = 0.0f;
      for (int b = 0; b < 32; ++b) sum += sums[b * CB + t];
      a.part_v[pb * 2 * c + t] = pivot[t];
      a.part_v[pb * 2 * c + c + t] = sum;
    }
    if (t == 0) a.part_e[pb] = eb;
  });
}

// ---------------------------------------------------------------------------------------------
// Forward 2: merge of the block partials (one thread per entry of S).

struct ReduceArgs {
  int c;
  int64_t n;
  int tn, nblk;  // the statistics pass's tile width and blocks per group (Part)
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
    const Part part{a.n, a.tn, a.nblk};
    int e = a.e_eps;
    for (int b = 0; b < a.nblk; ++b) e = imax(e, a.part_e[p0 + b]);
    if (e == kNoExp) e = 0;  // all zero and eps = 0: frexp(0) = 0
    // Group mean of the shifted values (entries i and j).
    float mi = 0.0f, mj = 0.0f;
    for (int b = 0; b < a.nblk; ++b) {
      const int eb = a.part_e[p0 + b];
      const float f = eb == kNoExp ? 0.0f : pow2(eb - e);
      const float nb = static_cast<float>(part.cols(b));
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
      const float nb = static_cast<float>(part.cols(b));
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
//   backward: out = 2^-e·(Wm·(Ȳ − mean Ȳ) + M·Zc), [Wm | M]ᵀ from the adjoint kernel

template <int CB, bool BWD>
struct ApplyShape {
  static constexpr int KW = BWD ? 2 * CB : CB;  // inner dimension: [W] or [W | M]
  // The backward's product goes in K chunks of 64 rows (Ȳ's, then Z's), so that its X tile is
  // small enough for 4 blocks per SM; [W | M]ᵀ stays in shared memory, except at c > 64 (128
  // KiB, more than the 99 KiB a block gets on sm_86/sm_89), where each chunk of it is staged per
  // tile from L2 beside the same rows of the X tile.
  static constexpr bool kStream = BWD && CB == 128;
  static constexpr int KC = BWD ? 64 : KW;
  static constexpr int R = ((CB == 64 && !BWD) || kStream) ? 8 : 4;  // R×4 register tile of the product
  static constexpr int TY = CB / R, TX = kThreads / TY;  // thread grid over the CB × TN output tile
  static constexpr int TN = 4 * TX;  // columns per tile: 128 (c <= 32; c <= 64 forward), 64, 32
  static constexpr int LDX = TN + 4;
  static constexpr int kW = 0;  // [W | M]ᵀ (or the chunk): [k][CB], k-major (its reads are broadcasts)
  static constexpr int kX = kW + (kStream ? KC : KW) * CB;  // X chunk: [KC][LDX]
  static constexpr int kY = kStream ? 0 : kX;  // output tile [CB][LDX] over X (and the W chunk)
  static constexpr int kCofs = kX + KC * LDX;  // column offsets of z, dy and out (TN int64 each)
  static constexpr int kRows = kCofs + 6 * TN;  // zs0, mean, and the bias (forward) or mean Ȳ (backward)
  static constexpr int kSmem = kRows + 3 * CB;
  static_assert(kY + CB * LDX <= kCofs, "the output tile fits over the staged operands");
  static_assert(KC == KW || CB % KC == 0, "chunks do not straddle Ȳ and Z");
  static_assert(KC * CB % (4 * kThreads) == 0, "[W | M]ᵀ chunks are copied as whole float4 rounds");
};

template <typename scalar_t>
struct ApplyArgs {
  Strided<const scalar_t> z;
  Strided<const scalar_t> dy;  // backward only
  Strided<scalar_t> out;
  int c, T, G;
  int64_t n;
  int nblk;             // blocks per group; columns split by Part{n, ApplyShape::TN, nblk}
  const float* mean;    // (G, c)
  const float* rscale;  // (G)
  const float* tau;     // (G)           forward
  const float* P;       // (T, G, c, c)  forward: P_T
  const float* weight;  // (G, c) or null, forward
  const float* bias;    // (G, c) or null, forward
  const float* WT;      // (G, 2·CB, CB) backward: [Wm | M]ᵀ from the adjoint kernel
  const float* ysum;    // (G, c)        backward: row sums of Ȳ
};

// Per tile: load (X ← centred z, or Ȳ − mean Ȳ), product (per K chunk), output tile into shared
// memory, stores through the output's strides. Two barriers per K chunk and two per tile.
// The offsets of z's and dy's columns for the next tile are computed while the output is
// stored, those of the output's while the tile loads: one buffer each.
template <typename scalar_t, int CB, bool BWD, class Block>
INTL_HD void apply_body(Block& blk, int bx, int g, float* sm, const ApplyArgs<scalar_t>& a) {
  using S = ApplyShape<CB, BWD>;
  constexpr int KW = S::KW, KC = S::KC, TN = S::TN, LDX = S::LDX, TY = S::TY, TX = S::TX;
  using Map = QuadMap<TN, (KC < CB ? KC : CB)>;  // A: columns, B: rows (a chunk, or all of Ȳ or Z)
  constexpr int PA = Map::PA, PB = Map::PB;
  float* Ws = sm + S::kW;
  float* Xs = sm + S::kX;
  float* Ys = sm + S::kY;
  int64_t* co_z = reinterpret_cast<int64_t*>(sm + S::kCofs);
  int64_t* co_y = co_z + TN;
  int64_t* co_o = co_y + TN;
  float* zs0 = sm + S::kRows;  // scaled first column
  float* mu = zs0 + CB;        // mean of the shifted rows
  float* rb = mu + CB;         // forward: bias (0 without affine); backward: row means of Ȳ
  const int c = a.c;
  const int64_t cc = static_cast<int64_t>(c) * c;
  const float rs = a.rscale[g];
  const Part part{a.n, TN, a.nblk};
  const int64_t j_begin = part.begin(bx), j_end = part.begin(bx + 1);
  const int ntiles = static_cast<int>((j_end - j_begin + TN - 1) / TN);
  const bool cols_fast = !a.z.rows_fast();  // the tile's A axis (columns) is the unit-stride one
  const scalar_t* zg = a.z.ptr + g * a.z.sg;

  // Rows [k0, k0 + rows) of [W | M]ᵀ into Ws, the forward's from P_T (once per block), the
  // backward's copied from the adjoint kernel's (zero-padded, k-major: float4 copies).
  auto stage_w = [&](int t, int k0, int rows) {
    if (!BWD) {
      const float* PT = a.P + (static_cast<int64_t>(a.T - 1) * a.G + g) * cc;
      const float rt = safe_rsqrt_tau(a.tau[g]);
      for (int e = t; e < rows * CB; e += kThreads) {
        const int i = e % CB, k = k0 + e / CB;
        float w = 0.0f;
        if (i < c && k < c) {
          w = PT[i * c + k] * rt;
          if (a.weight != nullptr) w *= a.weight[g * c + i];
        }
        Ws[e] = w;
      }
    } else {
      const float* src = a.WT + (static_cast<int64_t>(g) * KW + k0) * CB;
      for (int u = 0; u < rows * CB / (4 * kThreads); ++u) {  // rows × CB: a multiple of 1024
        const int e = 4 * (t + u * kThreads);
        st4(Ws + e, ld4(src + e));
      }
    }
  };
  // Rows x0 .. x0 + NB − 1 of the X tile from rows r0 + b of a tensor (f: centring), columns of
  // tile `j0` (0 outside the group's rows; past the block's columns: any finite value, as each
  // output column depends on its own input column only).
  // Rows x0 .. x0 + NB − 1 of the X tile from rows r0 + b of a tensor, centred by f; padding rows
  // (r >= c) are 0 (W's columns for them are 0, and 0·inf would not be), columns past the block's
  // repeat its last column (each output column depends on its own input column only).
  auto load_rows = [&](int t, const Strided<const scalar_t>& src, const int64_t* co, int r0, int x0, auto&& f) {
    const Map m(t, cols_fast);
    const scalar_t* row[PB];
    float c0[PB], c1[PB];
    INTL_UNROLL for (int j = 0; j < PB; ++j) {
      row[j] = &at_bytes(src.ptr + g * src.sg, row_bytes(src, r0 + m.b(j), c));
      f.constants(r0 + m.b(j), c0[j], c1[j]);
    }
    INTL_UNROLL for (int i = 0; i < PA; ++i) {
      int64_t col[4];
      INTL_UNROLL for (int q = 0; q < 4; ++q) col[q] = co[m.a(i, q)];
      INTL_UNROLL for (int j = 0; j < PB; ++j) {
        const bool in = r0 + m.b(j) < c;
        F4 x;
        INTL_UNROLL for (int q = 0; q < 4; ++q) {
          const float v = f(static_cast<float>(at_bytes(row[j], col[q])), c0[j], c1[j]);
          x.e[q] = in ? v : 0.0f;
        }
        st4(Xs + (x0 + m.b(j)) * LDX + m.a(i), x);
      }
    }
  };
  // Centring on load: z·2^-e − zs0 − mean (by row), Ȳ − mean Ȳ.
  struct CentredZ {
    const float *zs0, *mu;
    float rs;
    INTL_HD void constants(int r, float& c0, float& c1) const {
      c0 = zs0[r];
      c1 = mu[r];
    }
    INTL_HD float operator()(float v, float c0, float c1) const { return (v * rs - c0) - c1; }
  } centred_z{zs0, mu, rs};
  struct CentredDy {
    const float* ym;
    INTL_HD void constants(int r, float& c0, float& c1) const {
      c0 = ym[r];
      c1 = 0.0f;
    }
    INTL_HD float operator()(float v, float c0, float) const { return v - c0; }
  } centred_dy{rb};

  blk.each([&](int t) {
    if (!S::kStream) stage_w(t, 0, KW);
    if (t < CB) {
      const bool row = t < c;
      zs0[t] = row ? static_cast<float>(zg[t * a.z.sr]) * rs : 0.0f;
      mu[t] = row ? a.mean[g * c + t] : 0.0f;
      if (BWD) rb[t] = row ? a.ysum[g * c + t] / static_cast<float>(a.n) : 0.0f;
      else rb[t] = row && a.bias != nullptr ? a.bias[g * c + t] : 0.0f;
    }
    tile_cols(a.z, co_z, t, TN, j_begin, j_end);
    if (BWD) tile_cols(a.dy, co_y, t, TN, j_begin, j_end);
  });
  blk.sync();

  typename Block::template Local<Acc<S::R, 4>> acc;
  for (int it = 0; it < ntiles; ++it) {
    const int64_t j0 = j_begin + static_cast<int64_t>(it) * TN;
    INTL_UNROLL for (int k0 = 0; k0 < KW; k0 += KC) {
      blk.each([&](int t) {
        if (k0 == 0) acc[t].zero();
        if (S::kStream) stage_w(t, k0, KC);
        if (!BWD) {
          load_rows(t, a.z, co_z, 0, 0, centred_z);
        } else if (KC == KW) {
          load_rows(t, a.dy, co_y, 0, 0, centred_dy);
          load_rows(t, a.z, co_z, 0, CB, centred_z);
        } else if (k0 < CB) {
          load_rows(t, a.dy, co_y, k0, 0, centred_dy);
        } else {
          load_rows(t, a.z, co_z, k0 - CB, 0, centred_z);
        }
        if (k0 == 0) tile_cols(a.out, co_o, t, TN, j0, j_end);
      });
      blk.sync();
      blk.each([&](int t) {
        acc[t].template mma<TY, TX, KC, CB, LDX>(t / TX, t % TX, Ws + (S::kStream ? 0 : k0 * CB), Xs);
      });
      blk.sync();
    }
    // The output tile: forward + bias, backward × 2^-e.
    blk.each([&](int t) {
      const int ty = t / TX, tx = t % TX;
      Acc<S::R, 4> y = acc[t];
      INTL_UNROLL for (int u = 0; u < S::R; ++u) {
        const float b = rb[Acc<S::R, 4>::template row<TY>(ty, u)];
        INTL_UNROLL for (int w = 0; w < 4; ++w) y.v[u][w] = BWD ? y.v[u][w] * rs : y.v[u][w] + b;
      }
      y.template store<TY, TX, LDX>(ty, tx, Ys);
    });
    blk.sync();
    // Stores through the output's strides (rows < c); the next tile's column offsets of z, dy.
    blk.each([&](int t) {
      const Map m(t, cols_fast);
      scalar_t* row[CB / 32];
      INTL_UNROLL for (int j = 0; j < CB / 32; ++j) row[j] = &at_bytes(a.out.ptr + g * a.out.sg, row_bytes(a.out, m.b0 + 32 * j, c));
      INTL_UNROLL for (int i = 0; i < PA; ++i) {
        int64_t col[4];
        INTL_UNROLL for (int q = 0; q < 4; ++q) col[q] = co_o[m.a(i, q)];
        INTL_UNROLL for (int j = 0; j < CB / 32; ++j) {
          const int r = m.b0 + 32 * j;
          const F4 y = ld4(Ys + r * LDX + m.a(i));
          INTL_UNROLL for (int q = 0; q < 4; ++q) {
            if (r < c) at_bytes(row[j], col[q]) = static_cast<scalar_t>(y.e[q]);
          }
        }
      }
      tile_cols(a.z, co_z, t, TN, j0 + TN, j_end);
      if (BWD) tile_cols(a.dy, co_y, t, TN, j0 + TN, j_end);
    });
    blk.sync();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward 1: one pass over (Ȳ, Z) for partial Ȳ·Zcᵀ and row sums of Ȳ.

template <int CB>
struct DStatsShape {
  static constexpr int TN = CB == 128 ? 32 : 64;  // columns per tile
  static constexpr int LD = CB + 4;  // Ȳ and Zc tiles [TN][LD], k-major
  static constexpr int R = CB == 32 ? 4 : 8;  // R×R register tile of Ȳ·Zcᵀ
  static constexpr int TG = CB / R;
  static constexpr int KS = kThreads / (TG * TG);  // column slices (split K)
  static constexpr int KPS = TN / KS;
  static constexpr int kZ = TN * LD;  // Ȳ tile at 0, Zc tile at kZ
  static constexpr int kSums = 2 * TN * LD;  // row sums of Ȳ per column lane: [32][CB]
  static constexpr int kCofs = kSums + 32 * CB;  // column offsets of z, dy (TN int64 each)
  static constexpr int kRofs = kCofs + 4 * TN;  // row offsets of z, dy (CB int64 each)
  static constexpr int kRows = kRofs + 4 * CB;  // zs0, mean
  static constexpr int kSmem = kRows + 2 * CB;
  static_assert(KS == 1 || 2 * TN * LD >= CB * CB, "the tiles hold a slice's partial for the merge");
};

template <typename scalar_t>
struct DStatsArgs {
  Strided<const scalar_t> z;
  Strided<const scalar_t> dy;
  int c;
  int64_t n;
  int nblk;             // blocks per group; columns split by Part{n, DStatsShape::TN, nblk}
  const float* mean;    // (G, c)
  const float* rscale;  // (G)
  float* part_q;        // (G, nblk, c, c)
  float* part_v;        // (G, nblk, c)
};

// Per tile: load and centre (and the next tile's column offsets), then the product of the
// column slices. Two barriers per tile. Padding rows repeat row c − 1 (never written out).
template <typename scalar_t, int CB, class Block>
INTL_HD void dstats_body(Block& blk, int bx, int g, float* sm, const DStatsArgs<scalar_t>& a) {
  using S = DStatsShape<CB>;
  using Map = QuadMap<CB, S::TN>;  // A: rows, B: columns
  constexpr int TN = S::TN, LD = S::LD, TG = S::TG, KPS = S::KPS, PA = Map::PA, PB = Map::PB;
  float* Yt = sm;
  float* Zt = sm + S::kZ;
  float* sums = sm + S::kSums;  // [32][CB]: row sums of column lane b0, each slot one thread's
  int64_t* co_z = reinterpret_cast<int64_t*>(sm + S::kCofs);
  int64_t* co_y = co_z + TN;
  int64_t* ro_z = reinterpret_cast<int64_t*>(sm + S::kRofs);
  int64_t* ro_y = ro_z + CB;
  float* zs0 = sm + S::kRows;
  float* mu = zs0 + CB;
  const int c = a.c;
  const float rs = a.rscale[g];
  const Part part{a.n, TN, a.nblk};
  const int64_t j_begin = part.begin(bx), j_end = part.begin(bx + 1);
  const int ntiles = static_cast<int>((j_end - j_begin + TN - 1) / TN);
  const bool rows_fast = a.z.rows_fast();
  const scalar_t* zg = a.z.ptr + g * a.z.sg;
  const scalar_t* yg = a.dy.ptr + g * a.dy.sg;

  typename Block::template Local<Acc<S::R, S::R>> acc;
  blk.each([&](int t) {
    const Map m(t, rows_fast);
    acc[t].zero();
    INTL_UNROLL for (int i = 0; i < PA; ++i) st4(sums + m.b0 * CB + m.a(i), F4{{0.0f, 0.0f, 0.0f, 0.0f}});
    if (t < CB) {
      zs0[t] = t < c ? static_cast<float>(zg[t * a.z.sr]) * rs : 0.0f;
      mu[t] = t < c ? a.mean[g * c + t] : 0.0f;
    }
    tile_cols(a.z, co_z, t, TN, j_begin, j_end);
    tile_cols(a.dy, co_y, t, TN, j_begin, j_end);
    if (t < CB) {
      ro_z[t] = row_bytes(a.z, t, c);
      ro_y[t] = row_bytes(a.dy, t, c);
    }
  });
  blk.sync();
  for (int it = 0; it < ntiles; ++it) {
    const int64_t j0 = j_begin + static_cast<int64_t>(it) * TN;
    const int valid = static_cast<int>(imin64(TN, j_end - j0));
    blk.each([&](int t) {
      const Map m(t, rows_fast);
      INTL_UNROLL for (int i = 0; i < PA; ++i) {
        const F4 zs = ld4(zs0 + m.a(i)), mq = ld4(mu + m.a(i));
        F4 sum = ld4(sums + m.b0 * CB + m.a(i));
        int64_t rz[4], ry[4];
        INTL_UNROLL for (int q = 0; q < 4; ++q) {
          rz[q] = ro_z[m.a(i, q)];
          ry[q] = ro_y[m.a(i, q)];
        }
        INTL_UNROLL for (int j = 0; j < PB; ++j) {
          const int k = m.b(j);
          const scalar_t* zc = &at_bytes(zg, co_z[k]);
          const scalar_t* yc = &at_bytes(yg, co_y[k]);
          F4 x, d;
          INTL_UNROLL for (int q = 0; q < 4; ++q) {
            const float zv = static_cast<float>(at_bytes(zc, rz[q]));
            const float dv = static_cast<float>(at_bytes(yc, ry[q]));
            x.e[q] = k < valid ? (zv * rs - zs.e[q]) - mq.e[q] : 0.0f;
            d.e[q] = k < valid ? dv : 0.0f;
            sum.e[q] += d.e[q];
          }
          st4(Zt + k * LD + m.a(i), x);
          st4(Yt + k * LD + m.a(i), d);
        }
        st4(sums + m.b0 * CB + m.a(i), sum);
      }
    });
    blk.sync();
    blk.each([&](int t) {
      const int sl = t / (TG * TG), u = t % (TG * TG);
      acc[t].template mma<TG, TG, KPS, LD, LD>(u / TG, u % TG, Yt + sl * KPS * LD, Zt + sl * KPS * LD);
      tile_cols(a.z, co_z, t, TN, j0 + TN, j_end);
      tile_cols(a.dy, co_y, t, TN, j0 + TN, j_end);
    });
    blk.sync();
  }
  merge_slices<S::KS, TG, CB>(blk, acc, sm);
  const int64_t pb = static_cast<int64_t>(g) * a.nblk + bx;
  float* q = a.part_q + pb * c * c;
  blk.each([&](int t) {
    if (t < TG * TG)
      acc[t].template each_entry<TG, TG>(t / TG, t % TG, [&](int i, int j, float v) {
        if (i < c && j < c) q[i * c + j] = v;
      });
    if (t < c) {
      float sum = 0.0f;
      for (int b = 0; b < 32; ++b) sum += sums[b * CB + t];
      a.part_v[pb * c + t] = sum;
    }
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
// Backward 3: the adjoint recursion of docs/design.md §3, symmetrised, one block per group.

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
  float* WT;            // (G, 2·CB, CB) out: [Wm | M]ᵀ, zero-padded, for the apply pass: Wm =
                        // (P_T/√τ)·diag(w), M = (S̄ + S̄ᵀ)/divisor
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
  float* WT = a.WT + static_cast<int64_t>(g) * 2 * CB * CB;  // [k][i]: Wm[i][k], then M[i][k − CB]
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
      WT[j * CB + i] = w != nullptr ? Wv * w[j] : Wv;
      s += gw * Wv;
    }
    part[t] = s;
    for (int e = t; e < 2 * CB * CB; e += kThreads) {  // the padding of [Wm | M]ᵀ
      const int k = e / CB, i = e % CB;
      if (i >= c || k % CB >= c) WT[e] = 0.0f;
    }
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
    WT[(CB + j) * CB + i] = ((dA[e] / ts + dA[j * c + i] / ts) + d) / a.divisor;
  });
}

}  // namespace blocks
}  // namespace intl_kernels
