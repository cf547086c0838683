"""Backend registry and dispatch (DESIGN §5).

A backend is a pair of functions ``fwd(z, T, eps, divisor) -> (y, *stats)`` and
``bwd(dy, z, *stats, divisor) -> dz`` with the contract of
``intl_kernels.whiten._whiten_fwd_torch``. ``backend="auto"`` picks per device;
the environment variable ``INTL_KERNELS_BACKEND`` replaces ``"auto"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

ENV_VAR = "INTL_KERNELS_BACKEND"
KNOWN = ("torch", "cpu")
PRECISIONS = (None, "ieee")
BUILD_HINT = "build the C++ extension with `pip install --no-build-isolation -e .` in the project root"

_KERNELS: dict[str, tuple[Callable, Callable]] = {}
_UNAVAILABLE_REASON: dict[str, str] = {"cpu": "the C++ extension intl_kernels._C is not built; " + BUILD_HINT}
_DEVICE: dict[str, str | None] = {"torch": None, "cpu": "cpu"}


def register(name: str, fwd: Callable, bwd: Callable) -> None:
    _KERNELS[name] = (fwd, bwd)
    _UNAVAILABLE_REASON.pop(name, None)


def set_unavailable(name: str, reason: str) -> None:
    _UNAVAILABLE_REASON[name] = reason


def kernels(name: str) -> tuple[Callable, Callable]:
    return _KERNELS[name]


def available_backends() -> list[str]:
    """Names of the backends that work in this process, e.g. ``['cpu', 'torch']``."""
    return [name for name in KNOWN if name in _KERNELS]


def _check_name(fn: str, name: object, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{fn}: {source} must be a str, got {type(name).__name__}")
    if name != "auto" and name not in KNOWN:
        raise ValueError(f"{fn}: {source} must be 'auto' or one of {list(KNOWN)}, got {name!r}")
    return name


def _auto(z: torch.Tensor) -> str:
    if z.device.type == "cpu" and "cpu" in _KERNELS:
        return "cpu"
    return "torch"


def resolve(fn: str, backend: object, z: torch.Tensor, precision: object) -> str:
    """Concrete backend for ``z``; raises if it is unknown, unavailable or wrong for z."""
    backend = _check_name(fn, backend, "backend")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        backend = _check_name(fn, env, f"environment variable {ENV_VAR}") if env else "auto"
    if backend == "auto":
        backend = _auto(z)
    if backend not in _KERNELS:
        raise RuntimeError(f"{fn}: backend {backend!r} is not available: {_UNAVAILABLE_REASON[backend]}")
    device = _DEVICE[backend]
    if device is not None and z.device.type != device:
        raise ValueError(f"{fn}: backend {backend!r} needs {device} tensors, got a tensor on {z.device}")
    if precision not in PRECISIONS:
        raise ValueError(f"{fn}: precision must be None or 'ieee' for backend {backend!r}, got {precision!r}")
    return backend
