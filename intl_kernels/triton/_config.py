"""Interpreter detection and the autotuning helper shared by the Triton kernels."""

from __future__ import annotations

import os

import triton

# Triton decides at decoration time whether @triton.jit functions are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def _triton_version() -> tuple[int, int]:
    major, minor = (
        int("".join(ch for ch in part if ch.isdigit()) or 0) for part in triton.__version__.split(".")[:2]
    )
    return major, minor


def fix_interpreter_scalar_index() -> bool:
    """Make the interpreter of Triton < 3.7 work with numpy >= 2.4; True when it applied.

    That interpreter turns a scalar into a Python int (a loop bound: ``range(lo, hi, BLOCK)``
    with ``hi`` a kernel argument) by ``int()`` of its one-element 1-D array, which numpy 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel
    with a run-time loop bound fails there. Triton 3.7 takes the element out first; this gives
    the older interpreter that conversion (its per-launch patch of ``tl.tensor`` is wrapped, and
    restored with it after each launch). Interpreter only: compiled kernels are not affected.
    """
    if _triton_version() >= (3, 7):
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "fixes_scalar_index", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.fixes_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if INTERPRET:
    fix_interpreter_scalar_index()


def autotune(
    kernel,
    *,
    key: list[str],
    gpu: list[tuple[dict, int, int]],
    interp: tuple[dict, int, int],
    prune=None,
):
    """``triton.autotune`` over (meta, num_warps, num_stages) configs, keyed on ``key`` and the
    dtypes of the tensor arguments, timings cached on disk (Triton's cache directory).

    ``prune(configs, named_args, **kwargs)`` returns the sub-list of ``gpu`` (the same tuples)
    worth benchmarking for a launch, before anything is compiled. Under the interpreter: one
    config, no benchmarking.
    """
    if INTERPRET:
        return triton.autotune(configs=[_config(interp)], key=key)(kernel)
    unique = list({_freeze(c): c for c in gpu}.values())  # the same config in two lists: once
    configs = [_config(c) for c in unique]
    by_tuple = dict(zip(map(_freeze, unique), configs, strict=True))
    prune_by = None
    if prune is not None:

        def early(configs_, named_args, **kwargs):
            return [by_tuple[_freeze(c)] for c in prune(configs_, named_args, **kwargs)]

        prune_by = {"early_config_prune": early}
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune_by, cache_results=True)(kernel)


def _config(c: tuple[dict, int, int]) -> triton.Config:
    meta, num_warps, num_stages = c
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _freeze(c: tuple[dict, int, int]) -> tuple:
    meta, num_warps, num_stages = c
    return tuple(sorted(meta.items())), num_warps, num_stages
