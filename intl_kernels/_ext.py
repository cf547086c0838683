"""Loads the optional C++ extension ``intl_kernels._C`` and wires its ops in.

The extension defines ``torch.ops.intl_kernels.whiten_fwd`` / ``whiten_bwd`` through
``TORCH_LIBRARY`` (csrc/). Here they get fake (meta) implementations so that
``torch.compile`` can trace them, and become the ``cpu`` backend. Without the
extension the package still imports; asking for ``backend="cpu"`` then raises an
error that says how to build it.
"""

from __future__ import annotations

import torch

from intl_kernels import _backends
from intl_kernels.whiten import stats_dtype

try:
    from intl_kernels import _C  # noqa: F401  (loading registers the ops)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _backends.set_unavailable("cpu", f"importing intl_kernels._C failed ({exc}); {_backends.BUILD_HINT}")


def _fake_whiten_fwd(z, T, eps, divisor):
    G, r, n = z.shape
    cdt = stats_dtype(z.dtype)

    def stat(*shape):
        return z.new_empty(shape, dtype=cdt)

    return (
        torch.empty_like(z, memory_format=torch.contiguous_format),
        stat(G, r, 1),
        stat(G, 1, 1),
        stat(G, 1, 1),
        stat(G, r, r),
        stat(T, G, r, r),
        stat(T - 1, G, r, r),
    )


def _fake_whiten_bwd(dy, z, mean, rscale, tau, A, P, X, divisor):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


if _C is not None:
    torch.library.register_fake("intl_kernels::whiten_fwd")(_fake_whiten_fwd)
    torch.library.register_fake("intl_kernels::whiten_bwd")(_fake_whiten_bwd)
    _backends.register("cpu", torch.ops.intl_kernels.whiten_fwd, torch.ops.intl_kernels.whiten_bwd)
