"""Argument checks shared by the public entry points.

Every check raises ``ValueError`` or ``TypeError`` naming the function, the argument
and what was expected. Checks only look at shapes, dtypes and Python scalars, never at
tensor values, so they cost no host synchronisation.
"""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_float_tensor(fn: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float64, float32, bfloat16 or float16), got {x.dtype}"
        )
    return x


def check_ndim(fn: str, name: str, x: torch.Tensor, allowed: tuple[int, ...], layout: str) -> None:
    if x.dim() not in allowed:
        raise ValueError(f"{fn}: {name} must be {layout}, got shape {tuple(x.shape)}")


def check_int(fn: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(fn: str, name: str, value: object, *, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    bad = not value > minimum if strict else not value >= minimum
    if bad or value != value or value == float("inf"):
        relation = ">" if strict else ">="
        raise ValueError(f"{fn}: {name} must be finite and {relation} {minimum}, got {value}")
    return value


def check_pair_2d(fn: str, first: tuple[str, object], second: tuple[str, object]) -> None:
    """Two float (N, D) tensors of the same shape, e.g. the embeddings of two views."""
    for name, t in (first, second):
        check_float_tensor(fn, name, t)
        check_ndim(fn, name, t, (2,), "2-D (N, D)")
    (na, a), (nb, b) = first, second
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: {na} and {nb} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
