"""IterNorm whitening by Newton's iteration: the core op, its backends and its autograd.

Algorithm (docs/design.md §2), for each of the G matrices Z in z: (G, r, n):

    Zs  = Z · 2^-e              power-of-two rescale (exact): |Zs| <= 1 (<= 4 at float max)
    Zh  = Zs − Zs[:, 0]         shift by the first column (exact when |mean| >> spread)
    Zc  = Zh − mean_n(Zh)       centred before the product: no E[ZZᵀ] − μμᵀ cancellation
    S   = Zc Zcᵀ / divisor + eps·2^-2e·I,   τ = tr S,   A = S / τ
    P_1 = (3I − A)/2            (P_0 = I makes the first step free)
    P_2 = (36I − 39A + A²(27I − 9A + A²))/16            2 GEMMs (P_1 is a polynomial in A)
    P_{k+1} = 1.5 P_k − 0.5 P_k³A        3 GEMMs a step: X = P·P, Q = X·A, P·Q   (k >= 2)
    Y   = (P_T / √τ) Zc

8 r×r GEMMs for T = 4 (the authors' loop: 12).

Y is exactly invariant to the rescale (S, τ scale by 2^-2e and √τ undoes it), so
every finite input gives finite statistics. A group whose covariance is exactly zero
(all rows constant; τ = 0 when eps = 0) returns Y = 0 and a zero gradient. NaN or ±inf in
a group gives NaN in that group's output only.

Backward (docs/design.md §3) is hand-written with symmetrised adjoints. With D = sym(P̄_{k+1}),
X = P_k² and E = P_k·D, the three terms of docs/design.md §3 group into one product:

    P̄_k = 1.5 D − 0.5 (DX + XD + E·P_k)·A,      Ā += −0.5 X·E

(DX = (XD)ᵀ and E·P_k = P_k D P_k are symmetric), so a step costs 5 GEMMs (k >= 1; the
step from P_0 = I is free) plus three (r×r)·(r×n) products in all. The forward saves
P_k (k = 1..T) and X_k = P_k² (k = 1..T−1); the backward recomputes only Zc.

Statistics are float64 for float64 inputs and float32 otherwise; Y and the gradient
take the input dtype.

Limit (shared with the papers' code): the uncoupled iteration amplifies rounding errors
on an ill-conditioned S as T grows. In float32 with cond(S) ~ 1e7, T <= 6 follows INTL
Theorem 1 to ~1e-6, T = 8 overshoots (eigenvalues of Y's covariance up to ~1.1) and
T = 10 diverges; float64 is accurate for any T. The defaults (T = 4 for INTL, T = 5 for
the IterNorm layer) are well inside the accurate range.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from intl_kernels import _backends
from intl_kernels._checks import check_float_tensor, check_int, check_ndim, check_real
from intl_kernels.distributed import gather_rows


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the statistics (mean, S, τ, P_k, W) for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow2_rscale(z: torch.Tensor, eps: float, cdt: torch.dtype) -> torch.Tensor:
    """Per-group 2^-e with 2^e >= max(|z|, √eps), e clamped so 2^±e stay normal: (G, 1, 1)."""
    return pow2_rscale_of_max(z.abs().amax(dim=(1, 2), keepdim=True).to(cdt), eps)


def pow2_rscale_of_max(amax: torch.Tensor, eps: float) -> torch.Tensor:
    """2^-e with 2^e >= max(amax, √eps), e clamped so that 2^±e are normal numbers of amax's dtype."""
    finfo = torch.finfo(amax.dtype)
    emax = math.frexp(finfo.max)[1] - 2
    emin = math.frexp(finfo.tiny)[1]
    if eps > 0.0:
        amax = amax.clamp_min(math.sqrt(eps))
    e = torch.frexp(amax).exponent.clamp(emin, emax)
    return torch.ldexp(torch.ones_like(amax), -e)


def _shifted(z: torch.Tensor, rscale: torch.Tensor) -> torch.Tensor:
    """Rescaled rows minus their first column: exact where |mean| >> spread (Sterbenz)."""
    zs = z.to(rscale.dtype) * rscale
    return zs - zs[..., :1]


def _safe_tau(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ, 1/√τ), with (1, 0) where τ is zero or subnormal.

    After the rescale a nonzero covariance has τ far above the smallest normal number;
    a subnormal τ only comes from an eps ridge that underflowed on a zero covariance,
    and dividing by it would overflow. Such groups are treated as τ = 0: Y = 0, dZ = 0.
    """
    pos = tau >= torch.finfo(tau.dtype).tiny
    tau_safe = torch.where(pos, tau, torch.ones_like(tau))
    rsqrt_tau = torch.where(pos, tau_safe.rsqrt(), torch.zeros_like(tau))
    return tau_safe, rsqrt_tau


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``, as the tensor itself when it already is (not a no-op ``.to``).

    An autograd.Function must not return the result of a no-op op (``.to`` of the same dtype,
    ``.contiguous()`` of a contiguous tensor, an in-place copy): under torch.compile, torch 2.11
    hands such an output a zero gradient. Every Function of the package returns the output of a
    real computation.
    """
    return t if t.dtype == dtype else t.to(dtype)


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


def _whiten_fwd_torch(z: torch.Tensor, T: int, eps: float, divisor: float, precision: str = "ieee"):
    """Plain-torch forward. Returns (y, mean, rscale, tau, A, P, X).

    y: (G, r, n) input dtype; mean: (G, r, 1) row means of the rescaled input minus its
    first column; rscale: (G, 1, 1) the power-of-two rescale 2^-e; tau: (G, 1, 1) trace of
    the rescaled S; A: (G, r, r); P: (T, G, r, r) holding P_1..P_T; X: (T−1, G, r, r)
    holding P_k² for k = 1..T−1. The same contract as ``torch.ops.intl_kernels.whiten_fwd``.
    """
    cdt = stats_dtype(z.dtype)
    G, r, _ = z.shape
    rscale = _pow2_rscale(z, eps, cdt)
    zs = _shifted(z, rscale)
    mean = zs.mean(dim=-1, keepdim=True)
    zc = zs - mean
    S = torch.bmm(zc, zc.mT).div_(divisor)
    if eps > 0.0:  # eps·2^-2e <= 1 because 2^e >= √eps
        S = S + (math.sqrt(eps) * rscale).square() * torch.eye(r, dtype=cdt, device=z.device)
    tau, A, P, X = _newton_torch(S, T)
    W = P[-1] * _safe_tau(tau)[1]
    y = _cast(torch.bmm(W, zc), z.dtype)
    return y, mean, rscale, tau, A, P, X


def _newton_torch(S: torch.Tensor, T: int):
    """(τ (G, 1, 1), A = S/τ, P (T, G, r, r) holding P_1..P_T, X (T−1, G, r, r) holding P_k²)
    of T Newton steps from the covariances S (G, r, r) (docs/design.md §2)."""
    G, r, _ = S.shape
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    tau = S.diagonal(dim1=-2, dim2=-1).sum(-1).view(G, 1, 1)
    A = S / _safe_tau(tau)[0]
    Ps = [1.5 * eye - 0.5 * A]
    Xs = []
    if T >= 2:  # P_1 is a polynomial in A: X_1 and P_2 cost 2 GEMMs instead of 3
        A2 = torch.bmm(A, A)
        Xs.append((9.0 * eye - 6.0 * A + A2) * 0.25)
        Ps.append((36.0 * eye - 39.0 * A + torch.bmm(A2, A2 - 9.0 * A + 27.0 * eye)) / 16.0)
    for _ in range(2, T):
        P = Ps[-1]
        Xs.append(torch.bmm(P, P))
        Q = torch.bmm(Xs[-1], A)
        Ps.append(torch.baddbmm(P, P, Q, beta=1.5, alpha=-0.5))
    X = torch.stack(Xs) if Xs else A.new_empty((0, G, r, r))
    return tau, A, torch.stack(Ps), X


def _whiten_bwd_torch(dy, z, mean, rscale, tau, A, P, X, divisor: float, precision: str = "ieee"):
    """Plain-torch backward of :func:`_whiten_fwd_torch` (docs/design.md §3). Returns dz."""
    zc = _shifted(z, rscale) - mean
    dyf = dy.to(A.dtype)
    W = P[-1] * _safe_tau(tau)[1]
    dS = _newton_bwd_torch(torch.bmm(dyf, zc.mT), tau, A, P, X)
    dzc = torch.baddbmm(torch.bmm(W.mT, dyf), dS + dS.mT, zc, alpha=1.0 / divisor)
    dzs = dzc - dzc.mean(dim=-1, keepdim=True)
    return _cast(dzs * rscale, z.dtype)


def _newton_bwd_torch(dW: torch.Tensor, tau, A, P, X) -> torch.Tensor:
    """S̄ (G, r, r) from W̄ = Ȳ Zcᵀ (G, r, r) through W = P_T/√τ, the Newton steps and A = S/τ
    (docs/design.md §3, symmetrised adjoints)."""
    T = P.shape[0]
    r = A.shape[-1]
    tau_safe, rsqrt_tau = _safe_tau(tau)
    W = P[T - 1] * rsqrt_tau
    dP = dW * rsqrt_tau
    dtau = (dW * W).sum(dim=(1, 2), keepdim=True) * (-0.5 / tau_safe)
    dA = torch.zeros_like(A)
    for k in range(T - 1, 0, -1):
        D = _sym(dP)
        Pk, Xk = P[k - 1], X[k - 1]
        E = torch.bmm(Pk, D)
        XD = torch.bmm(Xk, D)
        H = XD + XD.mT + torch.bmm(E, Pk)
        dA = torch.baddbmm(dA, Xk, E, alpha=-0.5)
        dP = 1.5 * D - 0.5 * torch.bmm(H, A)
    dA = dA - 0.5 * _sym(dP)
    dtau = dtau - (dA * A).sum(dim=(1, 2), keepdim=True) / tau_safe
    return dA / tau_safe + dtau * torch.eye(r, dtype=A.dtype, device=A.device)


def fake_whiten_fwd(z, T, eps, divisor, precision="ieee"):
    """Shapes and dtypes of a backend forward's outputs (fake/meta implementation)."""
    G, r = z.shape[:2]
    cdt = stats_dtype(z.dtype)

    def stat(*shape):
        return z.new_empty(shape, dtype=cdt)

    y = torch.empty_like(z)  # z's layout when z is dense, else contiguous (as every backend does)
    return (
        y,
        stat(G, r, 1),
        stat(G, 1, 1),
        stat(G, 1, 1),
        stat(G, r, r),
        stat(T, G, r, r),
        stat(T - 1, G, r, r),
    )


def fake_whiten_bwd(dy, z, mean, rscale, tau, A, P, X, divisor, precision="ieee"):
    """Shape, dtype and layout of a backend backward's output (fake/meta implementation)."""
    return torch.empty_like(z)


class WhitenFn(torch.autograd.Function):
    """Autograd for :func:`whiten`: forward and hand-written backward of one backend."""

    @staticmethod
    def forward(ctx, z, T, eps, divisor, backend, precision="ieee"):
        fwd, _ = _backends.kernels(backend)
        with torch.autocast(z.device.type, enabled=False):  # statistics stay fp32/fp64
            y, *stats = fwd(z, T, eps, divisor, precision)
        ctx.save_for_backward(z, *stats)
        ctx.divisor = divisor
        ctx.backend = backend
        ctx.precision = precision
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        z, *stats = ctx.saved_tensors
        _, bwd = _backends.kernels(ctx.backend)
        with torch.autocast(z.device.type, enabled=False):
            dz = bwd(dy, z, *stats, ctx.divisor, ctx.precision)
        return dz, None, None, None, None, None


def whiten(
    z: torch.Tensor,
    T: int,
    *,
    eps: float = 0.0,
    divisor: float | None = None,
    backend: str = "auto",
    precision: str | None = None,
) -> torch.Tensor:
    """Whiten the rows of each of G matrices by T Newton steps (docs/design.md §2).

    Args:
        z: (G, r, n) float tensor; rows are whitened against each other, columns are
            the samples the covariance is taken over. Any strides.
        T: number of Newton steps, >= 1.
        eps: ridge added to the covariance, >= 0.
        divisor: covariance divisor, > 0; default n − 1.
        backend: "auto", "torch", "cpu" or "triton" (see ``available_backends()``);
            "auto" picks "cpu" (else "torch") for CPU tensors and "triton" for float32,
            bfloat16 and float16 CUDA tensors.
        precision: float32 matrix-product precision. None or "ieee": full accuracy (every
            backend); "tf32x3" (about fp32 accuracy) or "tf32" (10-bit mantissa operands,
            fastest): triton only. bf16/fp16 inputs use their own dtype for the products
            with Z and float32 for the Newton iteration.

    Returns:
        y: (G, r, n) in z's dtype, y[g] = P_T(A_g)/√τ_g · (z[g] − row means).

    Example:
        >>> import torch, intl_kernels as ik
        >>> y = ik.whiten(torch.randn(3, 8, 100, dtype=torch.float64), T=20)
        >>> cov = y @ y.mT / 99
        >>> bool(torch.allclose(cov, torch.eye(8, dtype=torch.float64).expand(3, 8, 8), atol=1e-6))
        True
    """
    fn = "whiten"
    check_float_tensor(fn, "z", z)
    check_ndim(fn, "z", z, (3,), "3-D (G, r, n)")
    G, r, n = z.shape
    if G < 1 or r < 1:
        raise ValueError(f"{fn}: z must have G >= 1 and r >= 1, got shape {tuple(z.shape)}")
    if n < 2:
        raise ValueError(f"{fn}: z must have n >= 2 columns, got shape {tuple(z.shape)}")
    T = check_int(fn, "T", T, 1)
    eps = check_real(fn, "eps", eps, minimum=0.0, strict=False)
    divisor = (
        float(n - 1) if divisor is None else check_real(fn, "divisor", divisor, minimum=0.0, strict=True)
    )
    backend, precision = _backends.resolve(fn, backend, z, precision)
    return WhitenFn.apply(z, T, eps, divisor, backend, precision)


def iter_norm(
    x: torch.Tensor,
    T: int = 4,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
    precision: str | None = None,
) -> torch.Tensor:
    """INTL channel whitening: whiten the N embeddings of a batch against each other.

    Each row of x is centred over its D features, S = Xc Xcᵀ/(D − 1) is the N×N Gram
    matrix, and Y = P_T(S/tr S)/√tr S · Xc (INTL, Appendix C, "IterNorm").

    Args:
        x: (N, D) or (B, N, D) float tensor, N >= 2 samples, D >= 2 features; a leading
            B whitens B independent batches (e.g. crops) in one call.
        T: Newton steps, >= 1 (INTL uses 4).
        gather_distributed: under torch.distributed, all-gather the rows of every rank
            (same N on each), whiten the global batch and return this rank's rows; the
            backward sums gradients over ranks (see ``intl_kernels.distributed``).
        backend: "auto", "torch", "cpu" or "triton" (as in ``whiten``).
        precision: None, "ieee", "tf32x3" or "tf32" (as in ``whiten``).

    Returns:
        y: same shape and dtype as x (this rank's rows of the whitened global batch).

    Example:
        >>> import torch, intl_kernels as ik
        >>> y = ik.iter_norm(torch.randn(64, 512))
        >>> y.shape
        torch.Size([64, 512])
    """
    fn = "iter_norm"
    check_float_tensor(fn, "x", x)
    check_ndim(fn, "x", x, (2, 3), "2-D (N, D) or 3-D (B, N, D)")
    N, D = x.shape[-2:]
    if N < 2 or D < 2:
        raise ValueError(f"iter_norm: x needs N >= 2 samples and D >= 2 features, got shape {tuple(x.shape)}")
    if x.dim() == 3 and x.shape[0] < 1:
        raise ValueError(f"iter_norm: x must have B >= 1, got shape {tuple(x.shape)}")
    T = check_int(fn, "T", T, 1)
    z = x if x.dim() == 3 else x.unsqueeze(0)
    backend, precision = _backends.resolve(fn, backend, z, precision)
    rows = slice(None)
    if gather_distributed:
        z, rows = gather_rows(z)
    y = WhitenFn.apply(z, T, 0.0, float(D - 1), backend, precision)[:, rows]
    return y if x.dim() == 3 else y.squeeze(0)
