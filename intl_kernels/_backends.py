"""Backend registry and dispatch (docs/design.md §5).

A backend is a pair of functions ``fwd(z, T, eps, divisor, precision) -> (y, *stats)`` and
``bwd(dy, z, *stats, divisor, precision) -> dz`` with the contract of
``intl_kernels.whiten._whiten_fwd_torch``. ``backend="auto"`` picks per device and dtype;
the environment variable ``INTL_KERNELS_BACKEND`` replaces ``"auto"``.

The triton backend is registered lazily: ``triton`` is imported the first time the
backend is used, so ``import intl_kernels`` stays cheap and works without it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

ENV_VAR = "INTL_KERNELS_BACKEND"
KNOWN = ("torch", "cpu", "triton", "cuda")
BUILD_HINT = "build the C++ extension with `pip install --no-build-isolation -e .` in the project root"

ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF_AND_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
# precision=None means "ieee" (full float32 accuracy of every matrix product).
PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("ieee",),
    "cpu": ("ieee",),
    "triton": ("ieee", "tf32", "tf32x3"),
    "cuda": ("ieee",),
}
DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "torch": ALL_DTYPES,
    "cpu": ALL_DTYPES,
    "triton": HALF_AND_FLOAT,
    "cuda": HALF_AND_FLOAT,
}
# Largest r (rows per matrix, channels per group) a backend takes; None: any.
MAX_ROWS: dict[str, int | None] = {"torch": None, "cpu": None, "triton": None, "cuda": 128}


# Read once, at import: Triton decides at decoration time whether kernels are interpreted, and
# torch.compile must not trace environment reads or importlib (torch.compile of older torch
# releases fails on both, and a traced read would add guards on the environment).
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _TRITON_INTERPRET


def constant_when_compiled(fn: Callable) -> Callable:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does: torch.compile calls it once
    while tracing and keeps its result as a constant instead of tracing its body. The marker is
    the attribute that function sets (torch 2.4 to 2.15; ``tests/test_compile.py`` checks it for
    the installed torch); setting it directly spares ``import intl_kernels`` the import of
    torch._dynamo (about a second)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_when_compiled
def backend_from_env() -> str:
    """The value of ``INTL_KERNELS_BACKEND`` ('' when unset). Read at each eager call; a compiled
    function reads it once, when torch.compile traces it, and keeps that value as a constant."""
    return os.environ.get(ENV_VAR, "").strip()


_KERNELS: dict[str, tuple[Callable, Callable]] = {}
_LAZY: dict[str, Callable[[], tuple[Callable, Callable]]] = {}
_UNAVAILABLE_REASON: dict[str, str] = {
    "cpu": "the C++ extension intl_kernels._C is not built; " + BUILD_HINT,
    "cuda": "the C++ extension intl_kernels._C is not built; " + BUILD_HINT,
}
_DEVICE: dict[str, str | None] = {
    "torch": None,
    "cpu": "cpu",
    "triton": "cpu" if triton_interpret() else "cuda",
    "cuda": "cuda",
}


def device_of(backend: str) -> str:
    """Device type a backend takes tensors on here ("cpu" for "auto" and "torch")."""
    return _DEVICE.get(backend) or "cpu"


def register(name: str, fwd: Callable, bwd: Callable) -> None:
    _KERNELS[name] = (fwd, bwd)
    _UNAVAILABLE_REASON.pop(name, None)


def register_lazy(name: str, loader: Callable[[], tuple[Callable, Callable]]) -> None:
    """Register a backend whose kernels ``loader()`` imports on first use."""
    _LAZY[name] = loader
    _UNAVAILABLE_REASON.pop(name, None)


def set_unavailable(name: str, reason: str) -> None:
    _UNAVAILABLE_REASON[name] = reason


def _triton_unavailable_reason() -> str | None:
    if not _TRITON_INSTALLED:
        return "the triton package is not installed"
    if not triton_interpret() and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    return None


def _is_available(name: str) -> bool:
    if name in _KERNELS:
        return True
    if name in _LAZY:
        reason = _triton_unavailable_reason() if name == "triton" else None
        if reason is not None:
            _UNAVAILABLE_REASON[name] = reason
            return False
        return True
    return False


def kernels(name: str) -> tuple[Callable, Callable]:
    if name not in _KERNELS:
        register(name, *_LAZY[name]())
    return _KERNELS[name]


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` does not work in this process (None when it does)."""
    return None if _is_available(name) else _UNAVAILABLE_REASON.get(name, "unknown backend")


def available_backends() -> list[str]:
    """Names of the backends that work in this process, e.g. ``['torch', 'cpu', 'triton']``."""
    return [name for name in KNOWN if _is_available(name)]


def _check_name(fn: str, name: object, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{fn}: {source} must be a str, got {type(name).__name__}")
    if name != "auto" and name not in KNOWN:
        raise ValueError(f"{fn}: {source} must be 'auto' or one of {list(KNOWN)}, got {name!r}")
    return name


def _auto(z: torch.Tensor) -> str:
    if z.device.type == "cpu":
        return "cpu" if _is_available("cpu") else "torch"
    if z.device.type == "cuda" and z.dtype in DTYPES["triton"] and _is_available("triton"):
        return "triton"
    return "torch"


def resolve(fn: str, backend: object, z: torch.Tensor, precision: object) -> tuple[str, str]:
    """(backend, precision) for ``z`` (G, r, ...); raises if either is unknown, unavailable or
    wrong for z (device, dtype, r above the backend's limit)."""
    backend = _check_name(fn, backend, "backend")
    if backend == "auto":
        env = backend_from_env()
        backend = _check_name(fn, env, f"environment variable {ENV_VAR}") if env else "auto"
    if backend == "auto":
        backend = _auto(z)
    if not _is_available(backend):
        raise RuntimeError(f"{fn}: backend {backend!r} is not available: {_UNAVAILABLE_REASON[backend]}")
    device = _DEVICE[backend]
    if device is not None and z.device.type != device:
        raise ValueError(f"{fn}: backend {backend!r} needs {device} tensors, got a tensor on {z.device}")
    max_rows = MAX_ROWS[backend]
    if max_rows is not None and z.shape[1] > max_rows:
        raise ValueError(
            f"{fn}: backend {backend!r} whitens at most {max_rows} rows per matrix (channels per group), "
            f"got r = {z.shape[1]}; use backend='triton' or 'torch' (or 'auto')"
        )
    if z.dtype not in DTYPES[backend]:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPES[backend])
        raise TypeError(
            f"{fn}: backend {backend!r} takes {names} inputs, got {z.dtype}; "
            "use backend='torch' (or 'cpu' for CPU tensors) for float64"
        )
    modes = PRECISIONS[backend]
    if precision is None:
        precision = "ieee"
    if precision not in modes:
        allowed = " or ".join(repr(m) for m in (None, *modes))
        raise ValueError(f"{fn}: precision must be {allowed} for backend {backend!r}, got {precision!r}")
    return backend, precision
