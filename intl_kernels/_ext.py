"""Loads the optional C++ extension ``intl_kernels._C`` and wires its ops in.

The extension defines ``torch.ops.intl_kernels.whiten_fwd`` / ``whiten_bwd`` (and the
affine variants) through ``TORCH_LIBRARY`` (csrc/), with CPU kernels and, when it was
compiled with nvcc, CUDA kernels for groups of at most 128 rows. Here the ops get fake
(meta) implementations so that ``torch.compile`` can trace them, and become the ``cpu``
and ``cuda`` backends (one op each; the dispatcher picks the kernel by device). Without
the extension the package still imports; asking for ``backend="cpu"`` or ``"cuda"``
then raises an error that says how to build it.
"""

from __future__ import annotations

import torch

from intl_kernels import _backends
from intl_kernels.whiten import fake_whiten_bwd, fake_whiten_fwd


def cuda_unavailable_reason(ext, has_device: bool) -> str | None:
    """Why the cuda backend cannot run with the loaded extension ``ext``, or None if it can."""
    if not hasattr(ext, "cuda_built"):  # built from older sources
        return f"intl_kernels._C is older than the package; {_backends.BUILD_HINT}"
    if not ext.cuda_built():
        return (
            "intl_kernels._C was built without its CUDA kernels (torch without CUDA, nvcc not found, or "
            f"INTL_KERNELS_SKIP_CUDA_BUILD=1); {_backends.BUILD_HINT} on a machine with nvcc"
        )
    return None if has_device else "no CUDA device"


try:
    from intl_kernels import _C  # noqa: F401  (loading registers the ops)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _backends.set_unavailable("cpu", f"importing intl_kernels._C failed ({exc}); {_backends.BUILD_HINT}")


if _C is not None:
    torch.library.register_fake("intl_kernels::whiten_fwd")(fake_whiten_fwd)
    torch.library.register_fake("intl_kernels::whiten_bwd")(fake_whiten_bwd)

    def _op_fwd(z, T, eps, divisor, precision="ieee"):  # the op has full accuracy only
        return torch.ops.intl_kernels.whiten_fwd(z, T, eps, divisor)

    def _op_bwd(dy, z, mean, rscale, tau, A, P, X, divisor, precision="ieee"):
        return torch.ops.intl_kernels.whiten_bwd(dy, z, mean, rscale, tau, A, P, X, divisor)

    _backends.register("cpu", _op_fwd, _op_bwd)
    _reason = cuda_unavailable_reason(_C, torch.cuda.is_available())
    if _reason is None:
        _backends.register("cuda", _op_fwd, _op_bwd)
    else:
        _backends.set_unavailable("cuda", _reason)

    @torch.library.register_fake("intl_kernels::whiten_affine_fwd")
    def _fake_whiten_affine_fwd(z, weight, bias, T, eps, divisor):
        return fake_whiten_fwd(z, T, eps, divisor)

    @torch.library.register_fake("intl_kernels::whiten_affine_bwd")
    def _fake_whiten_affine_bwd(dy, z, weight, mean, rscale, tau, A, P, X, divisor):
        return (
            fake_whiten_bwd(dy, z, mean, rscale, tau, A, P, X, divisor),
            torch.empty_like(weight),
            torch.empty_like(weight),
        )
