"""The tolerance rule every fast path is held to (docs/design.md §4), for tests and GPU checks.

Against an upcast (float64) reference, a fast path's largest error must be at most twice
the error of the same reference run at the input precision, plus a small atol:

    max|fast − ref64| <= 2·max|ref_lowp − ref64| + atol

applied to outputs and to every gradient (flash-attention's and mamba's rule).
"""

from __future__ import annotations

import torch


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, in float64 (NaN if either holds a NaN)."""
    return (actual.double() - expected.double()).abs().max().item()


def describe_error(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """Max and mean error and the first worst index, with both values there."""
    diff = (actual.double() - expected.double()).abs()
    flat = int(diff.nan_to_num(float("inf")).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return (
        f"max err {diff.max().item():.3e}, mean err {diff.mean().item():.3e}, "
        f"worst at {idx}: actual {actual[idx].item():.6e} expected {expected[idx].item():.6e}"
    )


def tolerance_rule(fast, ref_lowp, ref64, atol: float) -> dict:
    """{"error", "reference_error", "bound", "finite", "passed"} of the rule for one tensor."""
    finite = bool(torch.isfinite(fast).all())
    e_fast, e_ref = max_err(fast, ref64), max_err(ref_lowp, ref64)
    bound = 2 * e_ref + atol
    return {
        "error": e_fast,
        "reference_error": e_ref,
        "bound": bound,
        "finite": finite,
        "passed": finite and e_fast <= bound,
    }


def assert_tolerance_rule(fast, ref_lowp, ref64, atol: float, what: str) -> None:
    """Raise AssertionError naming ``what`` unless ``fast`` satisfies the rule."""
    assert fast.dtype == ref_lowp.dtype, f"{what}: dtype {fast.dtype} != {ref_lowp.dtype}"
    res = tolerance_rule(fast, ref_lowp, ref64, atol)
    assert res["finite"], f"{what}: non-finite values; " + describe_error(fast, ref64)
    assert res["passed"], (
        f"{what}: error {res['error']:.3e} > 2 × reference error {res['reference_error']:.3e} "
        f"+ atol {atol:.1e}; " + describe_error(fast, ref64)
    )
