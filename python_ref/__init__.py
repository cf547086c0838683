"""Literal PyTorch transcriptions of the INTL and IterNorm papers (no tricks).

These are the slow, readable oracles the fast ``intl_kernels`` ops are checked
against: autograd through the Newton loop, no rescaling, no symmetrisation, no
custom backward. Every entry point takes ``upcast=True`` to compute in float64 and
return the input dtype.
"""

from python_ref.iter_norm import iter_norm_ref, whiten_ref
from python_ref.iter_norm_layer import IterNormRef
from python_ref.losses import intl_loss_ref, intl_multicrop_loss_ref, norm_mse_ref, trace_loss_ref

__all__ = [
    "IterNormRef",
    "intl_loss_ref",
    "intl_multicrop_loss_ref",
    "iter_norm_ref",
    "norm_mse_ref",
    "trace_loss_ref",
    "whiten_ref",
]
