"""Benchmark providers: build inputs outside the timed region, return the closure to time.

``make_iter_norm(provider, N, D, dtype, mode)`` returns a zero-argument closure that
runs one channel-mode IterNorm (INTL, T = 4) on a fixed (N, D) input x with
``requires_grad=True``:

- mode ``fwd``: the forward only, as a training step runs it (autograd records the graph;
  nothing runs under ``no_grad``);
- mode ``full``: forward + backward, ``torch.autograd.grad(y, x, dy)`` against a fixed
  random upstream gradient dy built here, so no ``.grad`` accumulates between runs.

Providers: ``python_ref`` (the paper's code, ``python_ref.iter_norm_ref(upcast=False)``,
autograd backward), ``torch`` and ``cpu`` (``intl_kernels.iter_norm`` with that backend
and its hand-written backward). ``providers()`` lists those that work here: ``cpu``
only when the C++ extension is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import intl_kernels

T = 4
MODES = ("fwd", "full")
ALL_PROVIDERS = ("python_ref", "torch", "cpu")


def providers() -> list[str]:
    """Providers that run in this process, e.g. ``['python_ref', 'torch', 'cpu']``."""
    backends = intl_kernels.available_backends()
    return [p for p in ALL_PROVIDERS if p == "python_ref" or p in backends]


def _op(provider: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if provider not in ALL_PROVIDERS:
        raise ValueError(f"provider must be one of {list(ALL_PROVIDERS)}, got {provider!r}")
    if provider not in providers():
        raise RuntimeError(
            f"provider {provider!r} is not available here: intl_kernels.available_backends() = "
            f"{intl_kernels.available_backends()}"
        )
    if provider == "python_ref":
        from python_ref import iter_norm_ref

        return lambda x: iter_norm_ref(x, T, upcast=False)
    return lambda x: intl_kernels.iter_norm(x, T, backend=provider)


def make_iter_norm(
    provider: str, N: int, D: int, dtype: torch.dtype, mode: str, *, seed: int = 0
) -> Callable[[], object]:
    """Closure that times ``provider`` in ``mode`` on fixed inputs built here.

    Args:
        provider: "python_ref", "torch" or "cpu".
        N: batch size (rows whitened against each other).
        D: features.
        dtype: input dtype.
        mode: "fwd" or "full".
        seed: seed of x: (N, D) and dy: (N, D), both standard normal.

    Returns:
        fn() -> y: (N, D) for "fwd", (dx,) with dx: (N, D) for "full".
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    op = _op(provider)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(N, D, generator=g).to(dtype)
    if mode == "fwd":
        return lambda: op(x)
    return lambda: torch.autograd.grad(op(x), x, dy)
