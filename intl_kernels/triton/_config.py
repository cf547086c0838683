"""Interpreter detection and the autotuning helper shared by the Triton kernels."""

from __future__ import annotations

import os

import triton

# Triton decides at decoration time whether @triton.jit functions are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def autotune(kernel, *, key: list[str], gpu: list[tuple[dict, int, int]], interp: tuple[dict, int, int]):
    """``triton.autotune`` over (meta, num_warps, num_stages) configs, keyed on ``key`` and the
    dtypes of the tensor arguments; one config under the interpreter (no benchmarking there)."""
    configs = [interp] if INTERPRET else gpu
    return triton.autotune(
        configs=[triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in configs], key=key
    )(kernel)
