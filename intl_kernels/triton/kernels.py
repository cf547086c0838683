"""Triton kernels of the whiten op (docs/design.md §2–§4). Launchers live in ``whiten.py``.

Data flow of one forward, for G groups Z_g (r × n, read through strides):

    _whiten_rowstats_kernel   per row and column chunk, one pass: exponent of max|z|, Σ(z − z₀)
                              in the chunk's scale; group exponent by integer atomic max
    _whiten_gram_kernel       merges the chunks into the row means (fixed order); Zc Zcᵀ/divisor,
                              centred on load, lower-triangle tiles only, split-K partials
    _whiten_gram_reduce_kernel  sums the partials in a fixed order (tiles cut into pieces when
                              they are few), mirrors, adds eps·I, trace partials
    r ≤ 64:  _whiten_newton_fwd_kernel   one program per group: τ, A, all T steps
    r > 64:  _whiten_newton_prep_kernel + _whiten_mm_kernel (triangle-only products)
    _whiten_apply_kernel      Y = P_T/√τ · Zc, centring and scaling fused, strided output

and of the backward: _whiten_gram_kernel (HAS_DY: sym(Ȳ Zcᵀ) and Ȳ row sums),
_whiten_newton_bwd_kernel (r ≤ 64) or _whiten_mm_kernel steps (r > 64), and
_whiten_apply_kernel (HAS_DY: Z̄ = 2^-e (P_T/√τ · (Ȳ − mean Ȳ) + M · Zc)).

Conventions: statistics are float32; tensor-core operands are the input dtype for
bf16/fp16 inputs and float32 with ``input_precision=PREC`` for float32 inputs; columns are
addressed as (j // n2)·s1 + (j % n2)·s2 when TWO_LEVEL (an NCHW tensor's N and H·W axes),
else j·s2. No float atomics: every reduction across programs goes through partial buffers
summed in a fixed order, so results are bitwise reproducible run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from intl_kernels.triton._config import INTERPRET

# frexp exponents of the power-of-two rescale are clamped to [EMIN, EMAX] so that both
# 2^e and 2^-e are normal float32 numbers (same rule as the torch backend).
EMIN_INT = -125
EMAX_INT = 126
EMIN = tl.constexpr(EMIN_INT)
EMAX = tl.constexpr(EMAX_INT)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32: τ below it counts as zero
# Triton's interpreter (3.8) multiplies bfloat16 dot operands as raw 16-bit integers; there
# the operands are widened to float32 first, which is exact (a bf16 × bf16 product fits in
# float32) and so computes what the GPU's bf16 MMA with float32 accumulation computes.
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


# --- helpers ----------------------------------------------------------------------------


@triton.jit
def _exp2i(k):
    """2^k as float32 for int32 k in [-126, 127], exactly (built from exponent bits)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _ldexp(x, k):
    """x·2^k for int32 k in [-252, 254]: two exact power-of-two factors."""
    h = k >> 1
    return x * _exp2i(h) * _exp2i(k - h)


@triton.jit
def _frexp_exponent(a):
    """Clamped frexp exponent of a >= 0 (a = m·2^e, m in [0.5, 1)); NaN/inf give EMAX."""
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    return tl.minimum(tl.maximum(e, EMIN), EMAX)


@triton.jit
def _safe_rsqrt_tau(tau):
    """(τ if τ is a normal positive number else 1, 1/√τ or 0): zero covariance → Y = 0."""
    pos = tau >= FLT_MIN
    tau_safe = tl.where(pos, tau, 1.0)
    return tau_safe, tl.where(pos, 1.0 / tl.sqrt(tau_safe), 0.0)


@triton.jit
def _col_offsets(cols, n2, s1, s2, TWO_LEVEL: tl.constexpr):
    c = cols.to(tl.int64)
    if TWO_LEVEL:
        return (c // n2) * s1 + (c % n2) * s2
    else:
        return c * s2


@triton.jit
def _lower_tile(t):
    """Lower-triangle tile number t → (bi, bj) with bi >= bj, row-major over the triangle."""
    bi = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    bi = tl.where((bi + 1) * (bi + 2) // 2 <= t, bi + 1, bi)
    bi = tl.where(bi * (bi + 1) // 2 > t, bi - 1, bi)
    return bi, t - bi * (bi + 1) // 2


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation; PREC applies to float32 operands."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_centred(Z, base, rmask, cols, cmask, n2, s1, s2, rscale, shift, mean, TWO_LEVEL: tl.constexpr):
    """(z·2^-e − z₀·2^-e) − mean for a (rows × cols) tile, float32, 0 outside the masks.

    The shift by the first column is exact when |mean| ≫ spread (Sterbenz), so centring
    loses nothing; ``shift`` is z₀·2^-e and ``mean`` the row mean of the shifted values.
    """
    offs = _col_offsets(cols, n2, s1, s2, TWO_LEVEL)
    m = rmask[:, None] & cmask[None, :]
    x = tl.load(Z + base + offs[None, :], mask=m, other=0.0)
    x = (x.to(tl.float32) * rscale - shift[:, None]) - mean[:, None]
    return tl.where(m, x, 0.0)


# --- statistics -------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_groups"])
def _whiten_rowstats_kernel(
    Z, PSUM, PEXP, GEXP,
    r, n, n2, chunk, n_groups,
    s_zg, s_zr, s_z1, s_z2,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, TWO_LEVEL: tl.constexpr,
):  # fmt: skip
    """Row statistics of one column chunk, one pass: e_c, the clamped exponent of max|z| over the
    chunk and the row's first column, and s_c = Σ_j (z_ij − z_i0)·2^-e_c over the chunk.

    Grid (cdiv(r, BLOCK_R), n_chunks, G); chunk c covers columns [c·chunk, (c+1)·chunk) and
    writes PSUM / PEXP (n_chunks, G, r). The sum is kept in the scale of the largest exponent
    seen so far; when a tile raises it, the running sum is rescaled by a power of two (exact,
    and rounding commutes with it, so the result is the sum taken in the final scale). The
    first column is part of every chunk's maximum, so the shifted values never exceed 2 in
    magnitude: finite for any finite input. GEXP[g] = max of the exponents by an integer
    atomic max (exact, order-free); the launcher initialises it with the exponent of √eps.
    Consumers merge the chunks in chunk order (``_merged_mean``).
    """
    pid = tl.program_id(0)
    ch = tl.program_id(1)
    g = tl.program_id(2)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < r
    rbase = g.to(tl.int64) * s_zg + rows.to(tl.int64) * s_zr
    x0 = tl.load(Z + rbase, mask=rmask, other=0.0).to(tl.float32)
    e_run = _frexp_exponent(tl.abs(x0))
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    lo = ch * chunk
    hi = tl.minimum(lo + chunk, n)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        offs = _col_offsets(cols, n2, s_z1, s_z2, TWO_LEVEL)
        m = rmask[:, None] & (cols < hi)[None, :]
        x = tl.load(Z + rbase[:, None] + offs[None, :], mask=m, other=0.0).to(tl.float32)
        e_new = tl.maximum(e_run, _frexp_exponent(tl.max(tl.abs(x), axis=1)))
        acc = _ldexp(acc, e_run - e_new)
        scale = _exp2i(-e_new)
        acc += tl.sum(tl.where(m, x * scale[:, None] - (x0 * scale)[:, None], 0.0), axis=1)
        e_run = e_new
    out = (ch * n_groups + g) * r + rows
    tl.store(PSUM + out, acc, mask=rmask)
    tl.store(PEXP + out, e_run, mask=rmask)
    tl.atomic_max(GEXP + g, tl.max(tl.where(rmask, e_run, EMIN), axis=0))


@triton.jit
def _merged_mean(PSUM, PEXP, g, rows, rmask, e, r, n, n_groups, n_chunks, CH_BLOCK: tl.constexpr):
    """Row means in the group scale 2^-e: Σ_c s_c·2^(e_c − e) / n over the row-statistics
    chunks, CH_BLOCK chunks at a time in chunk order (a fixed order: bitwise reproducible)."""
    acc = tl.zeros(rows.shape, dtype=tl.float32)
    for c0 in range(0, n_chunks, CH_BLOCK):
        cs = c0 + tl.arange(0, CH_BLOCK)
        m = (cs < n_chunks)[:, None] & rmask[None, :]
        offs = (cs[:, None] * n_groups + g) * r + rows[None, :]
        part = tl.load(PSUM + offs, mask=m, other=0.0)
        ex = tl.load(PEXP + offs, mask=m, other=0)
        acc += tl.sum(_ldexp(part, ex - e), axis=0)
    return acc / n


@triton.jit(do_not_specialize=["n_groups", "n_chunks", "size_class"])
def _whiten_gram_kernel(
    Z, DY, PSUM, PEXP, GEXP, MEAN, RSCALE,
    OUT, DYSUM,
    r, n, n2, k_chunk, n_groups, n_chunks, size_class, inv_div,
    s_zg, s_zr, s_z1, s_z2,
    s_dg, s_dr, s_d1, s_d2,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, FROM_ROWSTATS: tl.constexpr, HAS_DY: tl.constexpr,
    ONE_TILE: tl.constexpr, TWO_LEVEL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Lower-triangle tiles of Zc Zcᵀ·inv_div, or of Ȳ Zcᵀ + Zc Ȳᵀ (HAS_DY), split over columns.

    Grid (nb(nb+1)/2, SPLIT, G), nb = cdiv(r, BLOCK); split s covers columns
    [s·k_chunk, (s+1)·k_chunk) and writes its raw partial tile to OUT (SPLIT, G, r, r);
    ``_whiten_gram_reduce_kernel`` sums the partials in split order and finishes the tiles
    (one epilogue for every split count keeps this kernel's registers for the product).
    FROM_ROWSTATS (forward): the centring constants come from the row-statistics chunks
    (PSUM, PEXP: (n_chunks, G, r), merged here), and split 0 stores them as MEAN (G, r) and
    RSCALE (G,) for the backward; otherwise they are read from MEAN/RSCALE. HAS_DY: diagonal
    tiles also store the row sums of Ȳ over their columns in DYSUM (SPLIT, G, r). ONE_TILE
    (r <= BLOCK: the only tile is diagonal): each column tile is loaded and centred once, and
    the backward forms X = Ȳ Zcᵀ alone and stores X + Xᵀ (one product instead of two).
    ``size_class`` is what the autotuner keys on (r and n rounded up to powers of two); the
    kernel does not read it.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    bi, bj = _lower_tile(tile)
    rows_i = bi * BLOCK + tl.arange(0, BLOCK)
    rows_j = bj * BLOCK + tl.arange(0, BLOCK)
    mi = rows_i < r
    mj = rows_j < r
    if FROM_ROWSTATS:
        e = tl.load(GEXP + g)
        rscale = _exp2i(-e)
        mean_i = _merged_mean(PSUM, PEXP, g, rows_i, mi, e, r, n, n_groups, n_chunks, 16)
        if ONE_TILE:
            mean_j = mean_i
        else:
            mean_j = _merged_mean(PSUM, PEXP, g, rows_j, mj, e, r, n, n_groups, n_chunks, 16)
        if split == 0:
            if bi == bj:
                tl.store(MEAN + g * r + rows_i, mean_i, mask=mi)
                if bi == 0:
                    tl.store(RSCALE + g, rscale)
    else:
        rscale = tl.load(RSCALE + g)
        mean_i = tl.load(MEAN + g * r + rows_i, mask=mi, other=0.0)
        mean_j = tl.load(MEAN + g * r + rows_j, mask=mj, other=0.0)
    zg = g.to(tl.int64) * s_zg
    base_i = zg + rows_i.to(tl.int64)[:, None] * s_zr
    base_j = zg + rows_j.to(tl.int64)[:, None] * s_zr
    shift_i = tl.load(Z + zg + rows_i.to(tl.int64) * s_zr, mask=mi, other=0.0).to(tl.float32) * rscale
    shift_j = tl.load(Z + zg + rows_j.to(tl.int64) * s_zr, mask=mj, other=0.0).to(tl.float32) * rscale
    op_dtype = Z.dtype.element_ty
    k_lo = split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, n)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    dysum = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cm = cols < k_hi
        a_i = _load_centred(Z, base_i, mi, cols, cm, n2, s_z1, s_z2, rscale, shift_i, mean_i, TWO_LEVEL)
        if ONE_TILE:
            a_j = a_i
        else:
            a_j = _load_centred(Z, base_j, mj, cols, cm, n2, s_z1, s_z2, rscale, shift_j, mean_j, TWO_LEVEL)
        if HAS_DY:
            offs = _col_offsets(cols, n2, s_d1, s_d2, TWO_LEVEL)
            dg = g.to(tl.int64) * s_dg
            d_i = tl.load(
                DY + dg + rows_i.to(tl.int64)[:, None] * s_dr + offs[None, :],
                mask=mi[:, None] & cm[None, :],
                other=0.0,
            )
            acc = _mma(d_i.to(op_dtype), tl.trans(a_j.to(op_dtype)), acc, PREC)
            if not ONE_TILE:
                d_j = tl.load(
                    DY + dg + rows_j.to(tl.int64)[:, None] * s_dr + offs[None, :],
                    mask=mj[:, None] & cm[None, :],
                    other=0.0,
                )
                acc = _mma(a_i.to(op_dtype), tl.trans(d_j.to(op_dtype)), acc, PREC)
            dysum += tl.sum(d_i.to(tl.float32), axis=1)
        else:
            acc = _mma(a_i.to(op_dtype), tl.trans(a_j.to(op_dtype)), acc, PREC)
    if HAS_DY:
        if ONE_TILE:
            acc = acc + tl.trans(acc)  # Ȳ Zcᵀ + Zc Ȳᵀ from its first term
    acc = acc * inv_div
    base = OUT + (g.to(tl.int64) + split * n_groups) * r * r
    tl.store(base + rows_i[:, None] * r + rows_j[None, :], acc, mask=mi[:, None] & mj[None, :])
    if HAS_DY:
        if bi == bj:
            tl.store(DYSUM + (split * n_groups + g) * r + rows_i, dysum, mask=mi)


@triton.jit(do_not_specialize=["n_groups", "n_split", "pieces"])
def _whiten_gram_reduce_kernel(
    PART, OUT, TRP, RSCALE, r, n_groups, n_split, pieces, sqrt_eps,
    BLOCK: tl.constexpr, PIECE: tl.constexpr, SPLIT_BLOCK: tl.constexpr, HAS_TRACE: tl.constexpr,
):  # fmt: skip
    """Sum the split-K partial tiles and finish them: symmetrise the diagonal tiles, add the
    ridge, store each tile and its mirror and (HAS_TRACE) the trace partials.

    Grid (tiles·pieces, G): program (tile, p) handles the PIECE entries p·PIECE … of its
    BLOCK × BLOCK tile (row-major), summing SPLIT_BLOCK splits per load; splits are summed in
    a fixed order (a tree inside each SPLIT_BLOCK, then block after block; SPLIT_BLOCK is fixed
    for a shape and device), so the bits do not depend on the piece count or on scheduling.
    In a diagonal tile, entry (i, j) with i >= j
    also sums the partials of (j, i) and its program writes ½(S_ij + S_ji) to both places, so
    S is exactly symmetric. PART: (SPLIT, G, r, r), lower-triangle tiles valid. TRP (G, nb·pieces).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    tile = pid // pieces
    piece = pid % pieces
    bi, bj = _lower_tile(tile)
    e = piece * PIECE + tl.arange(0, PIECE)
    rows = bi * BLOCK + e // BLOCK
    cols = bj * BLOCK + e % BLOCK
    m = (rows < r) & (cols < r)
    diag_tile = bi == bj
    offs = rows * r + cols
    offs_t = cols * r + rows
    ss = tl.arange(0, SPLIT_BLOCK)
    acc = tl.zeros([PIECE], dtype=tl.float32)
    acc_t = tl.zeros([PIECE], dtype=tl.float32)
    for s0 in range(0, n_split, SPLIT_BLOCK):
        sm = (s0 + ss) < n_split
        base = PART + ((s0 + ss).to(tl.int64)[:, None] * n_groups + g) * r * r
        acc += tl.sum(tl.load(base + offs[None, :], mask=sm[:, None] & m[None, :], other=0.0), axis=0)
        if diag_tile:
            acc_t += tl.sum(tl.load(base + offs_t[None, :], mask=sm[:, None] & m[None, :], other=0.0), axis=0)
    on_diag = rows == cols
    keep = m
    if diag_tile:  # entries on and below the diagonal, each written with its mirror once
        acc = 0.5 * (acc + acc_t)
        eps_s = sqrt_eps * tl.load(RSCALE + g)
        acc += tl.where(on_diag, eps_s * eps_s, 0.0)
        keep = m & (rows >= cols)
    gofs = g.to(tl.int64) * r * r
    tl.store(OUT + gofs + offs, acc, mask=keep)
    tl.store(OUT + gofs + offs_t, acc, mask=keep & (rows != cols))
    if HAS_TRACE:
        if diag_tile:
            nb = tl.cdiv(r, BLOCK)
            tl.store(TRP + (g * nb + bi) * pieces + piece, tl.sum(tl.where(on_diag & m, acc, 0.0), axis=0))


# --- Newton iteration: one program per group (r <= 64) ------------------------------------
# The group's r × r matrices live in global memory (L1/L2 resident at this size); each
# product loops over K in BLOCK_K chunks, so code size and registers stay bounded for any
# BLOCK, and a CTA barrier orders every store before the loads that consume it.


@triton.jit
def _gmm(L, R, idx, r, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """L @ R for row-major r × r float32 matrices at L and R, padded to BLOCK × BLOCK."""
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    mi = idx < r
    for k0 in range(0, r, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < r
        lt = tl.load(L + idx[:, None] * r + ks[None, :], mask=mi[:, None] & km[None, :], other=0.0)
        rt = tl.load(R + ks[:, None] * r + idx[None, :], mask=km[:, None] & mi[None, :], other=0.0)
        acc = _mma(lt, rt, acc, PREC)
    return acc


@triton.jit
def _group_square(g, r, BLOCK: tl.constexpr):
    """Index vector, validity mask, identity, row-major offsets, r² and group offset of
    group g's r × r matrix padded to BLOCK × BLOCK."""
    idx = tl.arange(0, BLOCK)
    valid = (idx[:, None] < r) & (idx[None, :] < r)
    eye = tl.where(valid & (idx[:, None] == idx[None, :]), 1.0, 0.0)
    rr = r * r
    return idx, valid, eye, idx[:, None] * r + idx[None, :], rr, g.to(tl.int64) * rr


@triton.jit(do_not_specialize=["n_groups", "n_steps"])
def _whiten_newton_fwd_kernel(
    S, TAU, A, P, X, WS, r, n_groups, n_steps, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr
):
    """τ = tr S, A = S/τ, P_1 = (3I − A)/2, then P_{k+1} = 1.5 P_k − 0.5 P_k·(P_k²·A).

    Grid (G,): one program per group runs all T steps. Stores τ (G,), A (G, r, r),
    P_1..P_T (T, G, r, r) and X_k = P_k² for k = 1..T−1 (T−1, G, r, r), what the backward
    needs; WS (G, r, r) holds Q = X_k A. Padding rows/columns stay 0.
    """
    g = tl.program_id(0)
    idx, valid, eye, offs, rr, gofs = _group_square(g, r, BLOCK)
    s = tl.load(S + gofs + offs, mask=valid, other=0.0)
    tau = tl.sum(tl.sum(s * eye, axis=1), axis=0)
    tl.store(TAU + g, tau)
    tau_safe, _ = _safe_rsqrt_tau(tau)
    a = s / tau_safe
    tl.store(A + gofs + offs, a, mask=valid)
    p = 1.5 * eye - 0.5 * a
    tl.store(P + gofs + offs, p, mask=valid)
    for k in range(1, n_steps):
        pk = P + (g.to(tl.int64) + (k - 1) * n_groups) * rr
        xk = X + (g.to(tl.int64) + (k - 1) * n_groups) * rr
        tl.debug_barrier()
        tl.store(xk + offs, _gmm(pk, pk, idx, r, BLOCK, BLOCK_K, PREC), mask=valid)
        tl.debug_barrier()
        tl.store(WS + gofs + offs, _gmm(xk, A + gofs, idx, r, BLOCK, BLOCK_K, PREC), mask=valid)
        tl.debug_barrier()
        p = 1.5 * p - 0.5 * _gmm(pk, WS + gofs, idx, r, BLOCK, BLOCK_K, PREC)
        tl.store(P + (g.to(tl.int64) + k * n_groups) * rr + offs, p, mask=valid)


@triton.jit(do_not_specialize=["n_groups", "n_steps", "n", "n_split"])
def _whiten_newton_bwd_kernel(
    GM, TAU, A, P, X, DYSUM, M, DYMEAN, WS,
    r, n_groups, n_steps, n, n_split, inv_div,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The whole adjoint recursion of docs/design.md §3 for one group per program (r <= 64).

    GM = Ȳ Zcᵀ + Zc Ȳᵀ = 2·sym(W̄). With W = P_T/√τ: P̄_T = W̄/√τ, τ̄ = −⟨W̄, W⟩/(2τ); for
    k = T−1..1, D = sym(P̄_{k+1}), E = P_k D, H = X_k D + (X_k D)ᵀ + E P_k,
    Ā −= ½ X_k E, P̄_k = 1.5 D − ½ H A; then Ā −= ½ sym(P̄_1), τ̄ −= ⟨Ā, A⟩/τ,
    S̄ = sym(Ā)/τ + τ̄ I. Stores M = 2 S̄/divisor (so Z̄c = W Ȳc + M Zc) and the row means
    of Ȳ from the split partials DYSUM (SPLIT, G, r). WS (3, G, r, r) holds D, E and H.
    Grid (G,).
    """
    g = tl.program_id(0)
    idx, valid, eye, offs, rr, gofs = _group_square(g, r, BLOCK)
    ws_d = WS + gofs
    ws_e = WS + (g.to(tl.int64) + n_groups) * rr
    ws_h = WS + (g.to(tl.int64) + 2 * n_groups) * rr
    tau_safe, rsq = _safe_rsqrt_tau(tl.load(TAU + g))
    gm = tl.load(GM + gofs + offs, mask=valid, other=0.0)
    w = tl.load(P + (g.to(tl.int64) + (n_steps - 1) * n_groups) * rr + offs, mask=valid, other=0.0) * rsq
    dtau = -tl.sum(tl.sum(gm * w, axis=1), axis=0) / (4.0 * tau_safe)
    dp = gm * (0.5 * rsq)
    da = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for kk in range(1, n_steps):
        k = n_steps - kk
        pk = P + (g.to(tl.int64) + (k - 1) * n_groups) * rr
        xk = X + (g.to(tl.int64) + (k - 1) * n_groups) * rr
        d = 0.5 * (dp + tl.trans(dp))
        tl.debug_barrier()
        tl.store(ws_d + offs, d, mask=valid)
        tl.debug_barrier()
        tl.store(ws_e + offs, _gmm(pk, ws_d, idx, r, BLOCK, BLOCK_K, PREC), mask=valid)
        tl.debug_barrier()
        xd = _gmm(xk, ws_d, idx, r, BLOCK, BLOCK_K, PREC)
        h = xd + tl.trans(xd) + _gmm(ws_e, pk, idx, r, BLOCK, BLOCK_K, PREC)
        tl.store(ws_h + offs, h, mask=valid)
        da -= 0.5 * _gmm(xk, ws_e, idx, r, BLOCK, BLOCK_K, PREC)
        tl.debug_barrier()
        dp = 1.5 * d - 0.5 * _gmm(ws_h, A + gofs, idx, r, BLOCK, BLOCK_K, PREC)
    da = da - 0.25 * (dp + tl.trans(dp))
    da = 0.5 * (da + tl.trans(da))
    a = tl.load(A + gofs + offs, mask=valid, other=0.0)
    dtau -= tl.sum(tl.sum(da * a, axis=1), axis=0) / tau_safe
    m = (da / tau_safe + dtau * eye) * (2.0 * inv_div)
    tl.store(M + gofs + offs, m, mask=valid)
    rmask = idx < r
    dys = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n_split):
        dys += tl.load(DYSUM + (s * n_groups + g) * r + idx, mask=rmask, other=0.0)
    tl.store(DYMEAN + g * r + idx, dys / n, mask=rmask)


# --- Newton iteration: tiled (r > 64) -----------------------------------------------------


@triton.jit(do_not_specialize=["nb"])
def _whiten_newton_prep_kernel(S, TRP, TAU, A, P1, r, nb, BLOCK: tl.constexpr):
    """τ = Σ trace partials; A = S/τ and P_1 = (3I − A)/2, elementwise. Grid (cdiv(r², BLOCK), G)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    tau = tl.sum(tl.load(TRP + g * nb + tl.arange(0, 128), mask=tl.arange(0, 128) < nb, other=0.0), axis=0)
    for start in range(128, nb, 128):
        j = start + tl.arange(0, 128)
        tau += tl.sum(tl.load(TRP + g * nb + j, mask=j < nb, other=0.0), axis=0)
    if pid == 0:
        tl.store(TAU + g, tau)
    tau_safe, _ = _safe_rsqrt_tau(tau)
    rr = r * r
    e = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < rr
    gofs = g.to(tl.int64) * rr
    a = tl.load(S + gofs + e, mask=m, other=0.0) / tau_safe
    tl.store(A + gofs + e, a, mask=m)
    diag = (e % (r + 1)) == 0
    tl.store(P1 + gofs + e, tl.where(diag, 1.5, 0.0) - 0.5 * a, mask=m)


@triton.jit
def _mm_tile_acc(acc, L, R, rows, cols, r, s_lr, s_lc, s_rr, s_rc, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    for k0 in range(0, r, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < r
        lt = tl.load(
            L + rows[:, None] * s_lr + ks[None, :] * s_lc, mask=(rows < r)[:, None] & km[None, :], other=0.0
        )
        rt = tl.load(
            R + ks[:, None] * s_rr + cols[None, :] * s_rc, mask=km[:, None] & (cols < r)[None, :], other=0.0
        )
        acc = _mma(lt, rt, acc, PREC)
    return acc


@triton.jit(do_not_specialize=["size_class"])
def _whiten_mm_kernel(
    L1, R1, L2, R2, E, OUT,
    r, size_class, alpha, beta,
    s_l1r, s_l1c, s_r1r, s_r1c, s_l2r, s_l2c, s_r2r, s_r2c,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, LOWER: tl.constexpr, HAS_PAIR2: tl.constexpr,
    HAS_E: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """OUT = alpha·(L1 R1 [+ L2 R2]) [+ beta·E] for each of G float32 r × r matrices.

    Operands are (G, r, r) with a per-group stride of r²; any of them may be read transposed
    through its (row, column) strides. LOWER: the result is known to be symmetric, so
    only lower-triangle tiles are computed (grid (nb(nb+1)/2, G)) and mirrored; diagonal
    tiles are symmetrised exactly. Otherwise full tiles (grid (nb·nb, G)). E is read at
    row-major (i, j); it must not alias OUT (the autotuner reruns the kernel). ``size_class``:
    what the autotuner keys on; not read.
    """
    t = tl.program_id(0)
    g = tl.program_id(1)
    if LOWER:
        bi, bj = _lower_tile(t)
    else:
        nb = tl.cdiv(r, BLOCK)
        bi = t // nb
        bj = t % nb
    rows = bi * BLOCK + tl.arange(0, BLOCK)
    cols = bj * BLOCK + tl.arange(0, BLOCK)
    gofs = g.to(tl.int64) * r * r
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    acc = _mm_tile_acc(acc, L1 + gofs, R1 + gofs, rows, cols, r, s_l1r, s_l1c, s_r1r, s_r1c, BLOCK_K, PREC)
    if HAS_PAIR2:
        acc = _mm_tile_acc(
            acc, L2 + gofs, R2 + gofs, rows, cols, r, s_l2r, s_l2c, s_r2r, s_r2c, BLOCK_K, PREC
        )
    mr = rows < r
    mc = cols < r
    m = mr[:, None] & mc[None, :]
    offs = rows[:, None] * r + cols[None, :]
    out = alpha * acc
    if HAS_E:
        out += beta * tl.load(E + gofs + offs, mask=m, other=0.0)
    if LOWER:
        if bi == bj:
            out = 0.5 * (out + tl.trans(out))
    tl.store(OUT + gofs + offs, out, mask=m)
    if LOWER:
        if bi != bj:
            tl.store(
                OUT + gofs + cols[:, None] * r + rows[None, :], tl.trans(out), mask=mc[:, None] & mr[None, :]
            )


# --- apply -------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["size_class"])
def _whiten_apply_kernel(
    L1, L2, Z, DY, MEAN, RSCALE, TAU, DYMEAN, OUT,
    r, n, n2, size_class,
    s_zg, s_zr, s_z1, s_z2,
    s_dg, s_dr, s_d1, s_d2,
    s_og, s_or, s_o1, s_o2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DY: tl.constexpr, TWO_LEVEL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Forward: OUT = L1/√τ · Zc.  Backward (HAS_DY): OUT = 2^-e·(L1/√τ · (Ȳ − mean Ȳ) + L2 · Zc).

    L1 = P_T and L2 = M are (G, r, r) float32; Zc is centred on load from Z (shift by the
    first column, MEAN, RSCALE = 2^-e); the output is written through its strides in
    OUT's dtype. Grid (cdiv(n, BLOCK_N), cdiv(r, BLOCK_M), G). ``size_class``: what the
    autotuner keys on; not read.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    g = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mr = rows < r
    cm = cols < n
    rscale = tl.load(RSCALE + g)
    _, rsq = _safe_rsqrt_tau(tl.load(TAU + g))
    op_dtype = Z.dtype.element_ty
    gofs = g.to(tl.int64) * r * r
    zg = g.to(tl.int64) * s_zg
    zoffs = _col_offsets(cols, n2, s_z1, s_z2, TWO_LEVEL)
    if HAS_DY:
        doffs = _col_offsets(cols, n2, s_d1, s_d2, TWO_LEVEL)
        dg = g.to(tl.int64) * s_dg
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, r, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < r
        lm = mr[:, None] & km[None, :]
        vm = km[:, None] & cm[None, :]
        l1 = tl.load(L1 + gofs + rows[:, None] * r + ks[None, :], mask=lm, other=0.0)
        shift = tl.load(Z + zg + ks.to(tl.int64) * s_zr, mask=km, other=0.0).to(tl.float32) * rscale
        mean = tl.load(MEAN + g * r + ks, mask=km, other=0.0)
        x = tl.load(Z + zg + ks.to(tl.int64)[:, None] * s_zr + zoffs[None, :], mask=vm, other=0.0)
        zc = tl.where(vm, (x.to(tl.float32) * rscale - shift[:, None]) - mean[:, None], 0.0)
        if HAS_DY:
            dymean = tl.load(DYMEAN + g * r + ks, mask=km, other=0.0)
            d = tl.load(DY + dg + ks.to(tl.int64)[:, None] * s_dr + doffs[None, :], mask=vm, other=0.0)
            dc = tl.where(vm, d.to(tl.float32) - dymean[:, None], 0.0)
            acc1 = _mma(l1.to(op_dtype), dc.to(op_dtype), acc1, PREC)
            l2 = tl.load(L2 + gofs + rows[:, None] * r + ks[None, :], mask=lm, other=0.0)
            acc2 = _mma(l2.to(op_dtype), zc.to(op_dtype), acc2, PREC)
        else:
            acc1 = _mma(l1.to(op_dtype), zc.to(op_dtype), acc1, PREC)
    out = acc1 * rsq
    if HAS_DY:
        out = (out + acc2) * rscale
    ooffs = _col_offsets(cols, n2, s_o1, s_o2, TWO_LEVEL)
    optr = OUT + g.to(tl.int64) * s_og + rows.to(tl.int64)[:, None] * s_or + ooffs[None, :]
    tl.store(optr, out.to(OUT.dtype.element_ty), mask=mr[:, None] & cm[None, :])
