"""Reference whitening by Newton's iteration: the INTL IterNorm and the docs/design.md §2 core.

Sources:
- ``iter_norm_ref``: INTL (Weng et al., "Modulate Your Spectrum in Self-Supervised
  Learning", ICLR 2024), Appendix C, Figure I(a), function ``IterNorm``, line by line.
- ``whiten_ref``: docs/design.md §2 (the core op), the same iteration for a batch of
  G matrices with a chosen divisor and ridge eps.

Limits: no rescaling, so huge or tiny inputs can overflow; a zero-trace input divides
by zero. That is the point: this is what the papers wrote.
"""

from __future__ import annotations

import torch


def _iter_norm_2d(x: torch.Tensor, T: int) -> torch.Tensor:
    # INTL Appendix C, Figure I(a), "def IterNorm(x, iters=4)".
    M, D = x.size()
    x = x - x.mean(dim=1).reshape(M, 1)
    sigma = (x @ x.T) / (D - 1)
    trace = sigma.diagonal().sum()
    sigma_norm = sigma / trace
    P = torch.eye(M, dtype=x.dtype, device=x.device)
    for _ in range(T):
        P = 1 / 2 * (3 * P - torch.matrix_power(P, 3) @ sigma_norm)
    return P / trace.sqrt() @ x


def iter_norm_ref(x: torch.Tensor, T: int = 4, *, upcast: bool = False) -> torch.Tensor:
    """INTL IterNorm (channel mode): whiten the N rows of x against each other.

    Each row is centred over its D features; the N×N covariance is divided by D − 1.

    Args:
        x: (N, D) or (B, N, D); a leading B whitens each x[b] on its own.
        T: number of Newton steps (INTL: 4).
        upcast: compute in float64 and return x.dtype.

    Returns:
        (N, D) or (B, N, D), dtype of x.
    """
    xc = x.to(torch.float64) if upcast else x
    if xc.dim() == 3:
        y = torch.stack([_iter_norm_2d(xb, T) for xb in xc])
    else:
        y = _iter_norm_2d(xc, T)
    return y.to(x.dtype)


def whiten_ref(
    z: torch.Tensor,
    T: int,
    *,
    eps: float = 0.0,
    divisor: float | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """docs/design.md §2 core: whiten the r rows of each Z_g against each other, over n columns.

        Zc = Z − mean_n(Z),  S = Zc Zcᵀ/divisor + eps·I,  τ = tr S,  A = S/τ,
        P_0 = I,  P_{k+1} = ½(3P_k − P_k³A),  Y = (P_T/√τ) Zc

    Args:
        z: (G, r, n); G independent matrices.
        T: number of Newton steps.
        eps: ridge added to the diagonal of S.
        divisor: covariance divisor; default n − 1.
        upcast: compute in float64 and return z.dtype.

    Returns:
        (G, r, n), dtype of z.
    """
    zz = z.to(torch.float64) if upcast else z
    G, r, n = zz.shape
    if divisor is None:
        divisor = n - 1
    eye = torch.eye(r, dtype=zz.dtype, device=zz.device).expand(G, r, r)
    mu = zz.mean(dim=2, keepdim=True)
    zc = zz - mu
    S = zc @ zc.transpose(1, 2) / divisor + eps * eye
    tau = S.diagonal(dim1=1, dim2=2).sum(dim=1).reshape(G, 1, 1)
    A = S / tau
    P = eye
    for _ in range(T):
        P = 0.5 * (3 * P - torch.matrix_power(P, 3) @ A)
    W = P / tau.sqrt()
    return (W @ zc).to(z.dtype)
