"""Interpreter detection and the autotuning helper shared by the Triton kernels."""

from __future__ import annotations

import os

import triton

# Triton decides at decoration time whether @triton.jit functions are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


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
