"""intl_kernels: fast IterNorm whitening (Newton's iteration) and the INTL loss.

Public API (docs/design.md §6): ``whiten``, ``iter_norm``, ``IterNorm``, ``SyncIterNorm``,
``convert_batchnorm``,
``ChannelWhitening``, ``norm_mse``, ``trace_loss``, ``trade_off``, ``intl_loss``,
``INTLLoss``, ``available_backends``. Backends: torch, cpu (C++ extension),
triton (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
"""

from intl_kernels import _backends
from intl_kernels._backends import available_backends
from intl_kernels.fold import fold_iternorm
from intl_kernels.layers import ChannelWhitening, IterNorm, SyncIterNorm, convert_batchnorm
from intl_kernels.losses import INTLLoss, intl_loss, norm_mse, trace_loss, trade_off
from intl_kernels.whiten import WhitenFn, _whiten_bwd_torch, _whiten_fwd_torch, iter_norm, whiten

_backends.register("torch", _whiten_fwd_torch, _whiten_bwd_torch)


def _load_triton():
    from intl_kernels.triton.whiten import whiten_bwd_dispatch, whiten_fwd_dispatch

    return whiten_fwd_dispatch, whiten_bwd_dispatch


_backends.register_lazy("triton", _load_triton)

from intl_kernels import _ext  # noqa: E402  (registers the cpu backend when built)

__version__ = "0.1.0"

__all__ = [
    "ChannelWhitening",
    "INTLLoss",
    "IterNorm",
    "SyncIterNorm",
    "WhitenFn",
    "available_backends",
    "convert_batchnorm",
    "fold_iternorm",
    "intl_loss",
    "iter_norm",
    "norm_mse",
    "trace_loss",
    "trade_off",
    "whiten",
]

del _ext
