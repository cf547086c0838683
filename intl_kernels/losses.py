"""The INTL objective (INTL Appendix C, Figure I(a)).

loss = norm_mse(t1, t2) + β·(trace_loss(t1) + trace_loss(t2)),   t_v = iter_norm(z_v)
β = trade_off(batch size) = 0.01·(log2 bs − 3)
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from intl_kernels._checks import check_float_tensor, check_ndim, check_pair_2d
from intl_kernels.whiten import iter_norm


def norm_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE of L2-normalised rows: 2 − 2·mean_i cos(a_i, b_i).

    Args:
        a: (N, D) float tensor.
        b: (N, D) float tensor, same shape as a.

    Returns:
        scalar tensor.
    """
    check_pair_2d("norm_mse", ("a", a), ("b", b))
    return 2 - 2 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1).mean()


def trace_loss(y: torch.Tensor) -> torch.Tensor:
    """INTL trace loss Σ_i (1 − ‖y_i‖²/(D − 1))²: pushes each whitened row to unit variance.

    Args:
        y: (N, D) or (B, N, D) float tensor (a leading B sums the loss over B views).

    Returns:
        scalar tensor.
    """
    check_float_tensor("trace_loss", "y", y)
    check_ndim("trace_loss", "y", y, (2, 3), "2-D (N, D) or 3-D (B, N, D)")
    D = y.shape[-1]
    if D < 2:
        raise ValueError(f"trace_loss: y needs D >= 2 features, got shape {tuple(y.shape)}")
    d = y.square().sum(dim=-1) / (D - 1)
    return (d - 1).square().sum()


def trade_off(batch_size: int) -> float:
    """INTL's β = 0.01·(log2(batch_size) − 3); batch_size is the global batch (>= 8)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"trade_off: batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 8:
        raise ValueError(
            f"trade_off: batch_size must be >= 8 (β = 0.01·(log2 bs − 3) is negative below 8), "
            f"got {batch_size}; pass trade_off explicitly for smaller batches"
        )
    return 0.01 * (math.log2(batch_size) - 3)


# intl_loss has an argument named trade_off that shadows the function.
_trade_off_default = trade_off


def intl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    T: int = 4,
    trade_off: float | None = None,
    gather_distributed: bool = True,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """INTL loss of two views: whiten both, then norm_mse + β·(trace losses).

    Args:
        z1: (N, D) embeddings of view 1.
        z2: (N, D) embeddings of view 2 (same shape); both are whitened in one call.
        T: Newton steps (INTL: 4).
        trade_off: β; default ``trade_off(N)``.
        gather_distributed: whiten the global batch under torch.distributed. Only
            single-process training is supported in this version: with an initialised
            process group of more than one rank, True raises NotImplementedError.
        backend: whitening backend, as in ``iter_norm``.

    Returns:
        scalar tensor.

    Example:
        >>> import torch, intl_kernels as ik
        >>> loss = ik.intl_loss(torch.randn(64, 128), torch.randn(64, 128))
        >>> loss.shape
        torch.Size([])
    """
    check_pair_2d("intl_loss", ("z1", z1), ("z2", z2))
    if gather_distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            raise NotImplementedError(
                "intl_loss: gathering embeddings across ranks is not supported in this version; "
                "pass gather_distributed=False to whiten each rank's batch on its own"
            )
    beta = _trade_off_default(z1.shape[0]) if trade_off is None else float(trade_off)
    t = iter_norm(torch.stack((z1, z2)), T, backend=backend)
    return norm_mse(t[0], t[1]) + beta * trace_loss(t)
