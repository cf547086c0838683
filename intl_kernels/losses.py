"""The INTL objective (INTL Appendix C, Figure I): two views, or multi-crop with an optional EMA target.

loss = norm_mse(t1, t2) + β·(trace_loss(t1) + trace_loss(t2)),   t_v = iter_norm(z_v)
β = trade_off(batch size) = 0.01·(log2 bs − 3)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from intl_kernels._checks import check_float_tensor, check_int, check_ndim, check_pair_2d, check_real
from intl_kernels.distributed import gather_rows
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
    return _norm_mse_sum(a, b)


def _norm_mse_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """norm_mse of (..., N, D) pairs (broadcast over leading axes), summed over those axes."""
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(dim=-1)
    return (2 - 2 * cos.mean(dim=-1)).sum()


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


def _check_views(fn: str, target: object, views: object) -> list[torch.Tensor]:
    if isinstance(views, torch.Tensor):
        check_pair_2d(fn, ("z1", target), ("z2", views))
        return [views]
    if not isinstance(views, (list, tuple)) or len(views) == 0:
        raise TypeError(
            f"{fn}: the second argument must be a tensor (two-view form) or a non-empty list of "
            f"tensors (multi-crop form), got {type(views).__name__}"
            + ("" if not isinstance(views, (list, tuple)) else " of length 0")
        )
    for i, v in enumerate(views):
        check_pair_2d(fn, ("target", target), (f"views[{i}]", v))
    return list(views)


def intl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor | Sequence[torch.Tensor],
    T: int = 4,
    trade_off: float | None = None,
    gather_distributed: bool = True,
    *,
    ema_target: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """INTL loss (INTL Appendix C, Figure I): whiten the embeddings, then norm_mse + β·trace loss.

    Two-view form ``intl_loss(z1, z2)``: norm_mse(t1, t2) + β·(trace_loss(t1) + trace_loss(t2)).
    Multi-crop form ``intl_loss(target, [v_1, ..., v_V])``, as the authors' code: each view
    is matched to the target, ``Σ_i [norm_mse(t_i, t_target) + β·(trace_loss(t_i) +
    trace_loss(t_target))] / V``; with an EMA target (no gradient) the target's trace loss
    is left out. Embeddings of one call are whitened together in one batched call.

    Args:
        z1: (N, D) embeddings of view 1, or the target (view 0 or the EMA encoder's output).
        z2: (N, D) embeddings of view 2, or a list of V (N, D) online views.
        T: Newton steps (INTL: 4).
        trade_off: β; default ``trade_off(global batch size)`` = 0.01·(log2 bs − 3).
        gather_distributed: under torch.distributed (more than one rank), all-gather the
            rows of every rank first and compute the loss of the global batch on every rank,
            as the INTL authors do; the gather's backward sums the gradient over ranks, so
            after DistributedDataParallel averages parameter gradients they equal
            single-process training on the global batch. Each rank must pass the same N.
        ema_target: the target is an EMA encoder's output (no trace loss for it). Default:
            True in the multi-crop form when, with grad mode on, a view needs a gradient and
            the target does not; False otherwise (always False in the two-view form).
        backend: whitening backend, as in ``iter_norm``.

    Returns:
        scalar tensor.

    Example:
        >>> import torch, intl_kernels as ik
        >>> loss = ik.intl_loss(torch.randn(64, 128), torch.randn(64, 128))
        >>> loss.shape
        torch.Size([])
        >>> target, views = torch.randn(64, 128), [torch.randn(64, 128, requires_grad=True) for _ in range(5)]
        >>> ik.intl_loss(target, views).shape  # EMA target: only the views get the trace loss
        torch.Size([])
    """
    fn = "intl_loss"
    views = _check_views(fn, z1, z2)
    target = z1
    if ema_target is None:
        multi = not isinstance(z2, torch.Tensor)
        wants_grad = torch.is_grad_enabled() and any(v.requires_grad for v in views)
        ema_target = multi and wants_grad and not target.requires_grad
    online = torch.stack(views) if ema_target else torch.stack([target, *views])
    if gather_distributed:
        online, _ = gather_rows(online)
    n_global = online.shape[-2]
    beta = _trade_off_default(n_global) if trade_off is None else float(trade_off)
    t = iter_norm(online, T, backend=backend)
    if ema_target:
        with torch.no_grad():
            tgt = target.detach()
            if gather_distributed:
                tgt, _ = gather_rows(tgt)
            t_target = iter_norm(tgt, T, backend=backend)
        t_views = t
    else:
        t_target, t_views = t[0], t[1:]
    loss = _norm_mse_sum(t_views, t_target) + beta * trace_loss(t_views)
    if not ema_target:
        loss = loss + beta * len(views) * trace_loss(t_target)
    return loss / len(views)


class INTLLoss(nn.Module):
    """Module form of :func:`intl_loss`: ``forward(z1, z2)`` or ``forward(target, views)``.

    Args:
        T: Newton steps (INTL: 4).
        trade_off: β; default from the global batch size.
        gather_distributed: whiten and score the global batch under torch.distributed.
        ema_target: the target comes from an EMA encoder (default: inferred, see intl_loss).
        backend: whitening backend.
    """

    def __init__(
        self,
        T: int = 4,
        trade_off: float | None = None,
        gather_distributed: bool = True,
        ema_target: bool | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.T = check_int("INTLLoss", "T", T, 1)
        self.trade_off = (
            None
            if trade_off is None
            else check_real("INTLLoss", "trade_off", trade_off, minimum=0.0, strict=False)
        )
        self.gather_distributed = bool(gather_distributed)
        self.ema_target = ema_target
        self.backend = backend

    def forward(self, z1: torch.Tensor, z2: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return intl_loss(
            z1,
            z2,
            self.T,
            self.trade_off,
            self.gather_distributed,
            ema_target=self.ema_target,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"T={self.T}, trade_off={self.trade_off}, gather_distributed={self.gather_distributed}, "
            f"ema_target={self.ema_target}, backend={self.backend!r}"
        )
