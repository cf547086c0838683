"""Triton backend of ``whiten``: launchers (checks, allocation, launch) and op registration.

``_whiten_fwd`` / ``_whiten_bwd`` have the backend contract of
``intl_kernels.whiten._whiten_fwd_torch`` (same statistics, same shapes), so the autograd
Function and the fake implementations are shared with the other backends. Kernels are in
``kernels.py``; see its header for the data flow.

Limits: float32, bfloat16 and float16 inputs (float64: use the torch or cpu backend);
statistics are float32. r <= 64 runs the Newton iteration and its adjoint in one
program per group; larger r uses tiled triangle-only products, one launch per product.
No host synchronisation: every launch decision depends on shapes only, τ and the
rescale stay on the device. r <= 128 launches one config per kernel (formulas below); for
larger r the first call of a size class autotunes a short list on the GPU (benchmarking
synchronises once; timings are cached on disk); warm up before capturing a CUDA graph.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from intl_kernels._backends import DTYPES as _BACKEND_DTYPES
from intl_kernels.triton import kernels as K
from intl_kernels.triton._config import INTERPRET, autotune
from intl_kernels.whiten import _safe_tau, fake_whiten_bwd, fake_whiten_fwd

SMALL_R_MAX = 128  # streaming kernels use the per-r formulas (no autotuning) up to here
NEWTON_PROGRAM_MAX = 64  # one program per group runs the Newton iteration up to here
PRECISION_MODES = {None: "ieee", "ieee": "ieee", "tf32": "tf32", "tf32x3": "tf32x3"}
DTYPES = _BACKEND_DTYPES["triton"]
_MIN_SPLIT_COLUMNS = 512  # fewest columns one split-K program handles
_ROWSTATS_ROWS = 4  # rows per row-statistics program
_ROWSTATS_COLS = 1024  # columns per row-statistics tile
_MIN_ROWSTATS_COLUMNS = 4096  # fewest columns one row-statistics program streams
MAX_GROUPS = 65535  # groups go on grid dimension y or z, whose CUDA limit this is


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (9, 0)  # interpreter: the kernels of the newest architecture the gate checks
    return torch.cuda.get_device_capability(device)


def _newton_bwd_one_program(r: int, device: torch.device) -> bool:
    """Whether the Newton adjoint runs as one program per group. Up to r = 32, and r = 48 or 64,
    everywhere; the other r of the 64-row bucket on sm_90 only: on sm_80 the one-program adjoint
    at BLOCK 64 needs 255 registers and spills 144-188 B unless r is a multiple of 16 (ptxas of
    Triton 3.6 and 3.8; 16 warps still spill 120 B), so these take the tiled products there."""
    if r > NEWTON_PROGRAM_MAX:
        return False
    return r <= 32 or r % 16 == 0 or _capability(device) >= (9, 0)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a small stand-in keeps split-K heuristics exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prec(precision: str | None) -> str:
    return PRECISION_MODES[precision]


def _as4d(t: torch.Tensor) -> torch.Tensor:
    """(G, r, n) → (G, r, 1, n) view; 4-D (G, r, n1, n2) views pass through."""
    return t.unsqueeze(2) if t.dim() == 3 else t


def _col_strides(t4: torch.Tensor) -> tuple[int, int, int, int, bool]:
    """(s_g, s_r, s_1, s_2, two_level) of a (G, r, n1, n2) view; n1 == 1 is one level."""
    sg, sr, s1, s2 = t4.stride()
    return sg, sr, s1, s2, t4.shape[2] > 1


def _gram_block(r: int) -> int:
    return 16 if r <= 16 else 32 if r <= 32 else 64


def _lower_tiles(r: int, block: int) -> int:
    nb = triton.cdiv(r, block)
    return nb * (nb + 1) // 2


def _split_k(n: int, tiles: int, device: torch.device, split: int | None) -> tuple[int, int]:
    """(number of splits, columns per split): enough programs to fill the GPU, >= 512 columns each."""
    if split is None:
        split = max(1, min(triton.cdiv(2 * _num_sms(device), tiles), triton.cdiv(n, _MIN_SPLIT_COLUMNS)))
    chunk = triton.cdiv(triton.cdiv(n, split), 128) * 128
    return triton.cdiv(n, chunk), chunk


# --- launch configurations ---------------------------------------------------------------
# A config is (meta, num_warps, num_stages). r <= SMALL_R_MAX (the IterNorm layer's channel
# groups: memory-bound streaming over long columns, and the one-program Newton iteration):
# one config per kernel from the formulas below, no autotuning. r > SMALL_R_MAX (channel
# whitening, the tiled Newton products): a short list autotuned once per size class (r and n
# rounded up to powers of two), pruned to the configs of the input's product kind before
# anything is compiled, timings cached on disk. Every config a launcher can pick is compiled
# for sm_80 and sm_90 at every specialization the launchers reach (r, layouts, alignment) by
# ``python -m intl_kernels.triton.compile_check`` (``--full``; ``make test`` runs a subset),
# which fails on shared memory above the limit or a spill. Under the interpreter every kernel
# has one small config.
#
# Four kinds of product (``product_kind``): float32 operands at full precision ("ieee")
# lower to FMA, whose operand fragments live in registers; "tf32x3" issues three tensor-core
# products per tile; "tf32" and "half" (bf16/fp16 operands) one. The tables hold, per kind and
# size, the largest tile that the gate found free of spills over its whole sweep with Triton 3.6
# and 3.8: the least aligned inputs (odd r, channels_last) need the most registers, and ptxas
# spills a few bytes to stay under an occupancy cliff (128 registers at 8 warps, 168 or 80 at
# 4) rather than use more, so a tile clean for one aligned shape can spill at another.

_INTERP_GRAM = ({"BLOCK_K": 64}, 4, 1)
_INTERP_APPLY = ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 1)
_INTERP_MM = ({"BLOCK": 64, "BLOCK_K": 64}, 4, 1)
_INTERP_NEWTON = ({"BLOCK_K": 64, "PREC": "ieee"}, 4, 1)
KINDS = ("fma", "tf32x3", "tf32", "half")


def size_class(r: int, n: int = 1) -> int:
    """What the autotuners key on: 64·log2(r') + log2(n') with r', n' = r, n rounded up to
    powers of two, so one autotuning covers every shape of a class."""
    return 64 * (triton.next_power_of_2(r).bit_length() - 1) + triton.next_power_of_2(n).bit_length() - 1


def product_kind(dtype: torch.dtype, prec: str) -> str:
    """The kind of matrix product (``KINDS``) for input dtype and precision mode."""
    if dtype == torch.float32:
        return {"ieee": "fma", "tf32x3": "tf32x3", "tf32": "tf32"}[prec]
    return "half"


# (BLOCK_K, num_warps, num_stages) of the covariance for r <= SMALL_R_MAX, by product kind and r
# rounded up to a power of two (>= 16; 16, 32, 64: one tile of BLOCK = that, 128: r > 64, three
# 64 × 64 tiles, whose backward forms two products per column tile). Chosen as the apply's.
_GRAM_TILES = {
    "fma": {16: (16, 8, 3), 32: (16, 8, 3), 64: (16, 8, 3), 128: (16, 8, 1)},
    "tf32x3": {16: (16, 8, 3), 32: (16, 8, 3), 64: (16, 8, 3), 128: (16, 8, 1)},
    "tf32": {16: (32, 8, 3), 32: (32, 8, 2), 64: (16, 8, 2), 128: (16, 8, 2)},
    "half": {16: (64, 8, 3), 32: (64, 8, 3), 64: (16, 8, 3), 128: (32, 8, 3)},
}


def gram_config(r: int, dtype: torch.dtype, prec: str) -> tuple[dict, int, int]:
    """Covariance / sym(Ȳ Zcᵀ) tiles for r <= SMALL_R_MAX (BLOCK from r: ``_gram_block``;
    BLOCK_K, warps and stages from ``_GRAM_TILES``)."""
    if INTERPRET:
        return _INTERP_GRAM
    bk, warps, stages = _GRAM_TILES[product_kind(dtype, prec)][min(max(16, triton.next_power_of_2(r)), 128)]
    return ({"BLOCK_K": bk}, warps, stages)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the apply for r <= SMALL_R_MAX, by product kind
# and BLOCK_M (r rounded up to a power of two, >= 16). The forward and the backward (two products,
# two accumulators) share a config, so the backward sets it: the largest tile whose every variant
# in the gate's sweep is free of spills for sm_80 and sm_90 under Triton 3.6 and 3.8, fewer
# pipeline stages before a smaller tile. FMA's operand fragments live in registers and take one
# stage. The former rule (4096 outputs a tile, BLOCK_K 32 for tf32 and half) and lists spilled
# 4-420 B at some specialization in 52 of the 100 apply configs, with Triton 3.8 (channels_last
# inputs the most), and 16 × 256 tf32 tiles took 205568 B of shared memory (sm_80 has 166912).
_APPLY_TILES = {
    "fma": {16: (64, 16, 4, 1), 32: (16, 16, 4, 1), 64: (16, 16, 8, 1), 128: (16, 16, 4, 1)},
    "tf32x3": {16: (64, 16, 4, 3), 32: (16, 16, 2, 2), 64: (32, 16, 4, 2), 128: (16, 16, 8, 3)},
    "tf32": {16: (128, 16, 8, 3), 32: (128, 16, 8, 3), 64: (32, 32, 8, 3), 128: (32, 16, 8, 2)},
    "half": {16: (64, 16, 4, 2), 32: (128, 16, 8, 3), 64: (64, 16, 8, 3), 128: (32, 16, 8, 2)},
}


def apply_config(r: int, dtype: torch.dtype, prec: str) -> tuple[dict, int, int]:
    """Y = W·Zc (and the backward's two products) for r <= SMALL_R_MAX: one row block covers
    all r rows, so every column tile of Z is read once; tiles from ``_APPLY_TILES``."""
    if INTERPRET:
        return _INTERP_APPLY
    bm = min(max(16, triton.next_power_of_2(r)), SMALL_R_MAX)
    bn, bk, warps, stages = _APPLY_TILES[product_kind(dtype, prec)][bm]
    return ({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, warps, stages)


def newton_config(r: int) -> tuple[dict, int, int]:
    """One program per group for r <= NEWTON_PROGRAM_MAX: BLOCK = r rounded up (>= 16), its
    r × r tiles in registers, full float32 precision in every mode (a latency-bound
    iteration that tensor cores would not speed up; tf32x3 spills on sm_80). 2 warps up to
    BLOCK 16 (4 spill 12-16 B in the backward on sm_90), 4 at 32, 8 at 64: sm_90 forward /
    backward at most 208 / 248 registers over every r, no spills; sm_80's backward at BLOCK 64
    spills 144-188 B where r is not a multiple of 16 (255 registers; about 200 at r = 48, 64)
    with 8 warps and 120 B with 16, so there those r take the tiled adjoint
    (``_newton_bwd_one_program``). BLOCK 128 spills in
    every config (8 warps: 255 registers and a stack; 16 warps: capped at 128 registers,
    96-348 B of spill stores), so r > 64 takes the tiled products."""
    if INTERPRET:
        return _INTERP_NEWTON
    return ({"BLOCK_K": 16, "PREC": "ieee"}, 2 if r <= 16 else 4 if r <= 32 else 8, 1)


def _tuned(kernel, key, lists, interp):
    """Autotuner over the per-kind lists, pruned to the launch's kind before compiling."""

    def prune(configs, nargs, **kwargs):
        z = nargs.get("Z", nargs.get("L1"))
        return lists[product_kind(z.dtype, kwargs.get("PREC", nargs.get("PREC")))]

    return autotune(kernel, key=key, gpu=[c for k in KINDS for c in lists[k]], interp=interp, prune=prune)


# r > SMALL_R_MAX (channel whitening): BLOCK = 64 gram tiles (as at r = 65..128) and apply tiles
# of 64 and 128 rows, from the per-r tables at those sizes (the same variants: r enters them
# through its divisibility only). A kind with one config is not benchmarked.
_gram = _tuned(
    K._whiten_gram_kernel,
    ["size_class", "HAS_DY", "PREC"],
    {
        "fma": [({"BLOCK_K": 16}, 8, 1)],
        "tf32x3": [({"BLOCK_K": 16}, 8, 1)],
        "tf32": [({"BLOCK_K": 16}, 8, 2)],
        "half": [({"BLOCK_K": 32}, 8, 3), ({"BLOCK_K": 16}, 4, 2)],
    },
    _INTERP_GRAM,
)
_apply = _tuned(
    K._whiten_apply_kernel,
    ["size_class", "HAS_DY", "PREC"],
    {
        "fma": [
            ({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, 8, 1),
            ({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16}, 4, 1),
        ],
        "tf32x3": [
            ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, 4, 2),
            ({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16}, 8, 3),
        ],
        "tf32": [
            ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, 8, 3),
            ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16}, 8, 2),
        ],
        "half": [
            ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, 8, 3),
            ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16}, 8, 2),
        ],
    },
    _INTERP_APPLY,
)
# The Newton products take float32 operands whatever the input dtype, so "half" is never picked
# (it repeats tf32's list). 128 × 128 tiles spill 60-784 B with their epilogue's E tile.
_MM_TF32 = [({"BLOCK": 64, "BLOCK_K": 32}, 8, 3), ({"BLOCK": 64, "BLOCK_K": 32}, 4, 2)]
_mm_kernel = _tuned(
    K._whiten_mm_kernel,
    ["size_class", "LOWER", "HAS_PAIR2", "HAS_E", "PREC"],
    {
        "fma": [({"BLOCK": 64, "BLOCK_K": 16}, 8, 3), ({"BLOCK": 32, "BLOCK_K": 16}, 4, 3)],
        "tf32x3": [({"BLOCK": 64, "BLOCK_K": 32}, 4, 3), ({"BLOCK": 64, "BLOCK_K": 32}, 8, 3)],
        "tf32": _MM_TF32,
        "half": _MM_TF32,
    },
    _INTERP_MM,
)


def _launch(kernel, grid, config, *args, **kwargs):
    """kernel[grid](*args, **kwargs) with one (meta, num_warps, num_stages) config."""
    meta, num_warps, num_stages = config
    kernel[grid](*args, **kwargs, **meta, num_warps=num_warps, num_stages=num_stages)


# --- launchers --------------------------------------------------------------------------


def _on_tensor_device(launcher):
    """Runs ``launcher`` with its first argument's GPU as the current CUDA device.

    Triton launches on the current device, not on the tensors' device: tensors on cuda:1 with
    cuda:0 current would run on the wrong GPU (an illegal memory access at best). Every entry
    point of the backend (forward, backward, the Newton iteration and its adjoint) is wrapped;
    the guard restores the previous device afterwards and costs no synchronisation.
    """

    @functools.wraps(launcher)
    def guarded(t, *args, **kwargs):
        if t.device.type != "cuda":
            return launcher(t, *args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(t, *args, **kwargs)

    return guarded


def _rowstats_chunks(n: int, programs: int, device: torch.device, chunks: int | None) -> tuple[int, int, int]:
    """(column chunks, columns per chunk, tile width) of the row statistics: chunks enough that
    the grid holds two programs per SM, each streaming at least _MIN_ROWSTATS_COLUMNS columns;
    chunks start at multiples of 128 columns (aligned loads)."""
    if chunks is None:
        chunks = max(
            1, min(triton.cdiv(2 * _num_sms(device), programs), triton.cdiv(n, _MIN_ROWSTATS_COLUMNS))
        )
    chunk = triton.cdiv(triton.cdiv(n, chunks), 128) * 128
    return triton.cdiv(n, chunk), chunk, min(_ROWSTATS_COLS, max(16, triton.next_power_of_2(min(chunk, n))))


def _whiten_rowstats(z4: torch.Tensor, sqrt_eps: float, chunks: int | None = None):
    """Row statistics in column chunks: (PSUM, PEXP (n_chunks, G, r), GEXP (G,)) for the
    covariance kernel, which merges the chunks. ``chunks`` forces their number (tests)."""
    G, r, n1, n2 = z4.shape
    n = n1 * n2
    rows = _ROWSTATS_ROWS
    n_chunks, chunk, width = _rowstats_chunks(n, triton.cdiv(r, rows) * G, z4.device, chunks)
    psum = torch.empty((n_chunks, G, r), dtype=torch.float32, device=z4.device)
    pexp = torch.empty((n_chunks, G, r), dtype=torch.int32, device=z4.device)
    e_eps = min(max(math.frexp(sqrt_eps)[1], K.EMIN_INT), K.EMAX_INT) if sqrt_eps > 0 else K.EMIN_INT
    gexp = torch.full((G,), e_eps, dtype=torch.int32, device=z4.device)
    sg, sr, s1, s2, two = _col_strides(z4)
    K._whiten_rowstats_kernel[(triton.cdiv(r, rows), n_chunks, G)](
        z4, psum, pexp, gexp, r, n, n2, chunk, G, sg, sr, s1, s2,
        BLOCK_R=rows, BLOCK_N=width, TWO_LEVEL=two, num_warps=4,
    )  # fmt: skip
    return psum, pexp, gexp


def _reduce_pieces(
    tiles: int, G: int, n_split: int, block: int, device: torch.device
) -> tuple[int, int, int]:
    """(pieces per tile, entries per piece, splits per load) of the split-K reduction: whole
    tiles when there are programs enough for the GPU or a single split (the reduction is then a
    copy), else pieces of 16 entries (many splits of few tiles, the IterNorm layer: 256 programs
    for one 64 × 64 tile). Two piece sizes per block size keep the compiles few. Each load holds
    4096 partial entries."""
    entries = block * block
    whole = n_split == 1 or tiles * G >= _num_sms(device)
    piece = entries if whole else min(16, entries)
    return entries // piece, piece, max(1, 4096 // piece)


def _whiten_gram(
    z4: torch.Tensor,
    *,
    divisor: float,
    sqrt_eps: float,
    prec: str,
    rowstats=None,
    mean=None,
    rscale=None,
    dy4: torch.Tensor | None = None,
    split: int | None = None,
):
    """S (G, r, r) symmetric, trace partials (G, nb·pieces) and, with dy4, Ȳ row-sum partials.

    Forward: ``rowstats`` given; returns (S, trp, mean, rscale). Backward: ``mean``,
    ``rscale`` and ``dy4`` given; returns (Ȳ Zcᵀ + Zc Ȳᵀ, dysum (SPLIT, G, r)).
    ``split`` forces the number of split-K programs (tests); default a heuristic.
    """
    G, r, n1, n2 = z4.shape
    n = n1 * n2
    dev = z4.device
    block = _gram_block(r)
    tiles = _lower_tiles(r, block)
    nb = triton.cdiv(r, block)
    n_split, chunk = _split_k(n, tiles * G, dev, split)
    pieces, piece, split_block = _reduce_pieces(tiles, G, n_split, block, dev)
    forward = dy4 is None
    f32 = dict(dtype=torch.float32, device=dev)
    S = torch.empty((G, r, r), **f32)
    trp = torch.empty((G, nb * pieces), **f32)
    if forward:
        psum, pexp, gexp = rowstats
        mean = torch.empty((G, r, 1), **f32)
        rscale = torch.empty((G, 1, 1), **f32)
        dysum = S  # unused
        dy4 = z4
    else:
        psum = pexp = gexp = S  # unused
        dysum = torch.empty((n_split, G, r), **f32)
    out = torch.empty((n_split, G, r, r), **f32)
    sg, sr, s1, s2, two = _col_strides(z4)
    dg, dr, d1, d2, _ = _col_strides(dy4)
    args = (
        z4, dy4, psum, pexp, gexp, mean, rscale, out, dysum,
        r, n, n2, chunk, G, psum.shape[0] if forward else 0, size_class(r, n), 1.0 / divisor,
        sg, sr, s1, s2, dg, dr, d1, d2,
    )  # fmt: skip
    flags = dict(
        BLOCK=block, FROM_ROWSTATS=forward, HAS_DY=not forward, ONE_TILE=nb == 1, TWO_LEVEL=two, PREC=prec
    )
    grid = (tiles, n_split, G)
    if r <= SMALL_R_MAX:
        _launch(K._whiten_gram_kernel, grid, gram_config(r, z4.dtype, prec), *args, **flags)
    else:
        _gram[grid](*args, **flags)
    K._whiten_gram_reduce_kernel[(tiles * pieces, G)](
        out, S, trp, rscale, r, G, n_split, pieces, sqrt_eps,
        BLOCK=block, PIECE=piece, SPLIT_BLOCK=split_block, HAS_TRACE=forward, num_warps=8,
    )  # fmt: skip
    if forward:
        return S, trp, mean, rscale
    return S, dysum


def _mm(l1, r1, *, pair2=None, e=None, alpha=1.0, beta=0.0, lower=True, prec="ieee", out=None):
    """alpha·(l1 r1 [+ l2 r2]) [+ beta·e] for (G, r, r) float32 operands (views, any of them
    transposed); written into ``out`` (a contiguous (G, r, r) block) when given."""
    G, r, _ = l1.shape
    if out is None:
        out = torch.empty((G, r, r), dtype=torch.float32, device=l1.device)
    l2, r2 = pair2 if pair2 is not None else (l1, r1)

    def rc(t):  # (row, column) strides of a contiguous matrix or its .mT view
        assert t.stride(0) == r * r and sorted(t.stride()[1:]) == [1, r], (
            "internal: _mm needs (G, r, r) blocks"
        )
        return t.stride(1), t.stride(2)

    def grid(meta):
        nb = triton.cdiv(r, meta["BLOCK"])
        return (nb * (nb + 1) // 2 if lower else nb * nb, G)

    _mm_kernel[grid](
        l1, r1, l2, r2, e if e is not None else out, out, r, size_class(r), alpha, beta,
        *rc(l1), *rc(r1), *rc(l2), *rc(r2),
        LOWER=lower, HAS_PAIR2=pair2 is not None, HAS_E=e is not None, PREC=prec,
    )  # fmt: skip
    return out


@_on_tensor_device
def _whiten_newton_fwd(S, trp, T: int, prec: str):
    """(τ (G, 1, 1), A, P (T, G, r, r), X (T−1, G, r, r)) from the covariance."""
    G, r, _ = S.shape
    f32 = dict(dtype=torch.float32, device=S.device)
    tau = torch.empty((G, 1, 1), **f32)
    A = torch.empty((G, r, r), **f32)
    P = torch.empty((T, G, r, r), **f32)
    X = torch.empty((T - 1, G, r, r), **f32)
    if r <= NEWTON_PROGRAM_MAX:
        block = max(16, triton.next_power_of_2(r))
        ws = torch.empty((G, r, r), **f32)
        _launch(
            K._whiten_newton_fwd_kernel, (G,), newton_config(r),
            S, tau, A, P, X if T > 1 else P, ws, r, G, T, BLOCK=block,
        )  # fmt: skip
        return tau, A, P, X
    block = 1024
    K._whiten_newton_prep_kernel[(triton.cdiv(r * r, block), G)](
        S, trp, tau, A, P[0], r, trp.shape[1], BLOCK=block, num_warps=4
    )
    for k in range(1, T):  # P_{k+1} = 1.5 P_k − 0.5 P_k (P_k² A): three symmetric products
        p = P[k - 1]
        _mm(p, p, prec=prec, out=X[k - 1])
        q = _mm(X[k - 1], A, prec=prec)
        _mm(p, q, e=p, alpha=-0.5, beta=1.5, prec=prec, out=P[k])
    return tau, A, P, X


@_on_tensor_device
def _whiten_newton_bwd(GM, dysum, tau, A, P, X, n: int, divisor: float, prec: str):
    """(M = (S̄ + S̄ᵀ)/divisor (G, r, r), row means of Ȳ (G, r)) from GM = 2·sym(W̄)."""
    T, G, r, _ = P.shape
    if _newton_bwd_one_program(r, GM.device):
        M = torch.empty((G, r, r), dtype=torch.float32, device=GM.device)
        dymean = torch.empty((G, r), dtype=torch.float32, device=GM.device)
        block = max(16, triton.next_power_of_2(r))
        ws = torch.empty((3, G, r, r), dtype=torch.float32, device=GM.device)
        _launch(
            K._whiten_newton_bwd_kernel, (G,), newton_config(r),
            GM, tau, A, P, X if T > 1 else P, dysum, M, dymean, ws,
            r, G, T, n, dysum.shape[0], 1.0 / divisor, BLOCK=block,
        )  # fmt: skip
        return M, dymean
    # Tiled: every product below has a symmetric result except E = P_k D; the scalar glue
    # (two inner products per group and the k = 0 step) is a few tiny torch ops.
    tau_safe, rsq = _safe_tau(tau)
    dtau = (GM * P[T - 1]).sum((1, 2), keepdim=True) * rsq / (-4.0 * tau_safe)
    dP = GM * (0.5 * rsq)
    dA = None
    for k in range(T - 1, 0, -1):
        D, p, x = dP, P[k - 1], X[k - 1]
        E = _mm(p, D, lower=False, prec=prec)
        H = _mm(x, D, pair2=(D, x), prec=prec)  # X D + D X
        H = _mm(E, p, e=H, beta=1.0, prec=prec)  # + P D P
        dA = _mm(x, E, pair2=(E.mT, x), e=dA, alpha=-0.25, beta=1.0, prec=prec)  # −½ sym(X E)
        dP = _mm(H, A, pair2=(A, H), e=D, alpha=-0.25, beta=1.5, prec=prec)  # sym(1.5 D − ½ H A)
    dA = -0.5 * dP if dA is None else dA - 0.5 * dP
    dtau = dtau - (dA * A).sum((1, 2), keepdim=True) / tau_safe
    M = (dA / tau_safe + dtau * torch.eye(r, dtype=torch.float32, device=A.device)) * (2.0 / divisor)
    return M, dysum.sum(0) / n


def _whiten_apply(L1, z4, mean, rscale, tau, out4, *, prec: str, L2=None, dy4=None, dymean=None):
    G, r, n1, n2 = z4.shape
    n = n1 * n2
    sg, sr, s1, s2, two = _col_strides(z4)
    og, orr, o1, o2, _ = _col_strides(out4)
    has_dy = dy4 is not None
    if has_dy:
        dg, dr, d1, d2, _ = _col_strides(dy4)
    else:
        dy4, dymean, L2 = z4, mean, L1
        dg, dr, d1, d2 = sg, sr, s1, s2

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(r, meta["BLOCK_M"]), G)

    args = (
        L1, L2, z4, dy4, mean, rscale, tau, dymean, out4, r, n, n2, size_class(r, n),
        sg, sr, s1, s2, dg, dr, d1, d2, og, orr, o1, o2,
    )  # fmt: skip
    flags = dict(HAS_DY=has_dy, TWO_LEVEL=two, PREC=prec)
    if r <= SMALL_R_MAX:
        config = apply_config(r, z4.dtype, prec)
        _launch(K._whiten_apply_kernel, grid(config[0]), config, *args, **flags)
    else:
        _apply[grid](*args, **flags)
    return out4


def _check(fn: str, z: torch.Tensor) -> None:
    if z.shape[0] > MAX_GROUPS:
        raise ValueError(
            f"{fn}: the triton backend whitens at most {MAX_GROUPS} groups per call (the CUDA grid's "
            f"y/z dimension limit), got G = {z.shape[0]}; split the call into parts of at most "
            f"{MAX_GROUPS} groups"
        )
    if z.dtype not in DTYPES:
        raise TypeError(
            f"{fn}: the triton backend takes float32, bfloat16 or float16 inputs, got {z.dtype}; "
            "use backend='torch' (or 'cpu' for CPU tensors) for float64"
        )
    if not INTERPRET and z.device.type != "cuda":
        raise ValueError(
            f"{fn}: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {z.device}"
        )


def _merge_columns(*views: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(G, r, n1, n2) views → (G, r, 1, n1·n2) when every one of them allows a single
    column stride (so the kernels skip the two-level column addressing)."""

    def single(t):
        return t.shape[3] == 1 or t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)

    if not all(single(t) for t in views):
        return views
    out = []
    for t in views:
        G, r, n1, n2 = t.shape
        s = t.stride(2) if n2 == 1 else t.stride(3)
        out.append(t.as_strided((G, r, 1, n1 * n2), (t.stride(0), t.stride(1), n1 * n2 * s, s)))
    return tuple(out)


@_on_tensor_device
def _whiten_fwd(
    z: torch.Tensor,
    T: int,
    eps: float,
    divisor: float,
    precision: str | None = None,
    out: torch.Tensor | None = None,
):
    """Forward of whiten on the triton backend. Returns (y, mean, rscale, tau, A, P, X).

    z: (G, r, n), or (G, r, n1, n2) read as n = n1·n2 columns (an NCHW tensor's batch and
    spatial axes); any strides. y has z's shape: ``out`` when given (any strides, e.g. a
    view of the layer's output in its input's layout), else ``torch.empty_like(z)`` (z's
    layout when z is dense, else contiguous).
    """
    _check("whiten", z)
    y = torch.empty_like(z) if out is None else out
    z4, y4 = _merge_columns(_as4d(z), _as4d(y))
    prec = _prec(precision)
    sqrt_eps = math.sqrt(eps)
    rowstats = _whiten_rowstats(z4, sqrt_eps)
    S, trp, mean, rscale = _whiten_gram(z4, divisor=divisor, sqrt_eps=sqrt_eps, prec=prec, rowstats=rowstats)
    tau, A, P, X = _whiten_newton_fwd(S, trp, T, prec)
    _whiten_apply(P[T - 1], z4, mean, rscale, tau, y4, prec=prec)
    return y, mean, rscale, tau, A, P, X


def _whiten_bwd(dy, z, mean, rscale, tau, A, P, X, divisor: float, precision: str | None = None, out=None):
    """Backward of :func:`_whiten_fwd`: dz with z's shape and dtype (``out`` when given)."""
    if dy.device != z.device:
        raise ValueError(f"whiten backward: dy must be on z's device {z.device}, got {dy.device}")
    return _whiten_bwd_launch(dy, z, mean, rscale, tau, A, P, X, divisor, precision, out)


@_on_tensor_device
def _whiten_bwd_launch(dy, z, mean, rscale, tau, A, P, X, divisor, precision, out):
    dz = torch.empty_like(z) if out is None else out
    z4, dy4, dz4 = _merge_columns(_as4d(z), _as4d(dy), _as4d(dz))
    prec = _prec(precision)
    n = z4.shape[2] * z4.shape[3]
    GM, dysum = _whiten_gram(z4, divisor=1.0, sqrt_eps=0.0, prec=prec, mean=mean, rscale=rscale, dy4=dy4)
    M, dymean = _whiten_newton_bwd(GM, dysum, tau, A, P, X, n, divisor, prec)
    _whiten_apply(P[-1], z4, mean, rscale, tau, dz4, prec=prec, L2=M, dy4=dy4, dymean=dymean)
    return dz


# --- torch.library ops (what torch.compile sees) ----------------------------------------

_Stats = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


@torch.library.custom_op("intl_kernels::whiten_fwd_triton", mutates_args=())
def whiten_fwd_triton(z: torch.Tensor, T: int, eps: float, divisor: float, precision: str) -> _Stats:
    return _whiten_fwd(z, T, eps, divisor, precision)


@torch.library.custom_op("intl_kernels::whiten_bwd_triton", mutates_args=())
def whiten_bwd_triton(
    dy: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rscale: torch.Tensor,
    tau: torch.Tensor,
    A: torch.Tensor,
    P: torch.Tensor,
    X: torch.Tensor,
    divisor: float,
    precision: str,
) -> torch.Tensor:
    return _whiten_bwd(dy, z, mean, rscale, tau, A, P, X, divisor, precision)


whiten_fwd_triton.register_fake(fake_whiten_fwd)
whiten_bwd_triton.register_fake(fake_whiten_bwd)


def whiten_fwd_dispatch(z, T, eps, divisor, precision="ieee"):
    """Backend entry: the registered op while torch.compile traces, the launcher otherwise
    (the op's dispatcher round trip costs microseconds that a launch-bound step notices)."""
    if torch.compiler.is_compiling():
        return torch.ops.intl_kernels.whiten_fwd_triton(z, T, eps, divisor, precision)
    return _whiten_fwd(z, T, eps, divisor, precision)


def whiten_bwd_dispatch(dy, z, mean, rscale, tau, A, P, X, divisor, precision="ieee"):
    if torch.compiler.is_compiling():
        return torch.ops.intl_kernels.whiten_bwd_triton(dy, z, mean, rscale, tau, A, P, X, divisor, precision)
    return _whiten_bwd(dy, z, mean, rscale, tau, A, P, X, divisor, precision)
