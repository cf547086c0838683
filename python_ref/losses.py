"""Reference INTL objective.

Source: INTL (ICLR 2024), Appendix C, Figure I(a): ``norm_mse``, ``INTL`` (the trace
loss) and the two-view training loop

    t1, t2 = IterNorm(z1), IterNorm(z2)
    trade_off = (log2(bs) - 3) * 0.01
    loss = norm_mse(t1, t2) + trade_off * (INTL(t1) + INTL(t2))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from python_ref.iter_norm import iter_norm_ref


def norm_mse_ref(a: torch.Tensor, b: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """MSE of L2-normalised rows: 2 − 2·mean_i ⟨a_i/‖a_i‖, b_i/‖b_i‖⟩.

    Args:
        a: (N, D).
        b: (N, D).
        upcast: compute in float64 and return a.dtype.

    Returns:
        scalar, dtype of a.
    """
    x0, x1 = (a.to(torch.float64), b.to(torch.float64)) if upcast else (a, b)
    x0 = F.normalize(x0, dim=-1)
    x1 = F.normalize(x1, dim=-1)
    return (2 - 2 * (x0 * x1).sum(dim=-1).mean()).to(a.dtype)


def trace_loss_ref(y: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """INTL trace loss Σ_i (‖y_i‖²/(D − 1) − 1)².

    Args:
        y: (N, D), whitened embeddings.
        upcast: compute in float64 and return y.dtype.

    Returns:
        scalar, dtype of y.
    """
    x = y.to(torch.float64) if upcast else y
    _, D = x.size()
    d = torch.pow(x, 2).sum(dim=1) / (D - 1)
    tl = d.add(-1).pow(2).sum()
    return tl.to(y.dtype)


def intl_loss_ref(
    z1: torch.Tensor,
    z2: torch.Tensor,
    T: int = 4,
    trade_off: float | None = None,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """INTL two-view loss: norm_mse(t1, t2) + β·(trace_loss(t1) + trace_loss(t2)), t_v = IterNorm(z_v).

    Args:
        z1: (N, D), embeddings of view 1.
        z2: (N, D), embeddings of view 2.
        T: Newton steps of IterNorm (INTL: 4).
        trade_off: β; default 0.01·(log2(N) − 3).
        upcast: compute in float64 and return z1.dtype.

    Returns:
        scalar, dtype of z1.
    """
    x1, x2 = (z1.to(torch.float64), z2.to(torch.float64)) if upcast else (z1, z2)
    t1, t2 = iter_norm_ref(x1, T), iter_norm_ref(x2, T)
    if trade_off is None:
        trade_off = (math.log2(x1.size(0)) - 3) * 0.01
    loss = norm_mse_ref(t1, t2) + trade_off * (trace_loss_ref(t1) + trace_loss_ref(t2))
    return loss.to(z1.dtype)


def intl_multicrop_loss_ref(
    target: torch.Tensor,
    views: list[torch.Tensor],
    T: int = 4,
    trade_off: float | None = None,
    *,
    ema: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """INTL multi-crop loss, as the authors' training code writes it.

    Without EMA (INTL code, ``INTL.forward``): the target is crop 0 of the online network
    and ``loss = Σ_i norm_mse(t_i, t_0) + β·(INTL(t_i) + INTL(t_0))``; with an EMA target
    (INTL Appendix C, Figure I(b)): ``loss = Σ_i norm_mse(t_k, t_i) + β·INTL(t_i)``; then
    ``loss /= len(views)``. Each crop is whitened on its own.

    Args:
        target: (N, D), crop 0 or the momentum encoder's embedding of it.
        views: list of (N, D) online embeddings of the other crops.
        T: Newton steps.
        trade_off: β; default 0.01·(log2(N) − 3).
        ema: the target comes from the momentum encoder (no trace loss for it).
        upcast: compute in float64 and return target.dtype.

    Returns:
        scalar, dtype of target.
    """
    cast = (lambda t: t.to(torch.float64)) if upcast else (lambda t: t)
    tk = iter_norm_ref(cast(target), T)
    tq = [iter_norm_ref(cast(v), T) for v in views]
    if trade_off is None:
        trade_off = (math.log2(target.size(0)) - 3) * 0.01
    loss = 0
    for t in tq:
        loss = loss + norm_mse_ref(tk, t) + trade_off * trace_loss_ref(t)
        if not ema:
            loss = loss + trade_off * trace_loss_ref(tk)
    loss = loss / len(tq)
    return loss.to(target.dtype)
