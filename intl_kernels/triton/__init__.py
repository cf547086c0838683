"""Triton backend of intl_kernels (docs/design.md §5): fused kernels for whiten forward and backward.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run
without a GPU). Importing this package imports triton; ``intl_kernels`` itself loads it
only when the triton backend is first used.
"""

from intl_kernels.triton.whiten import whiten_bwd_dispatch, whiten_fwd_dispatch

__all__ = ["whiten_bwd_dispatch", "whiten_fwd_dispatch"]
