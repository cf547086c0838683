"""One case of ``make gpu-check``'s sanitizer tier: forward and backward of a GPU backend's kernels,
run as its own short process so compute-sanitizer can watch it.

    compute-sanitizer --tool racecheck python -m verify.sanitize_case triton-r8
    python -m verify.sanitize_case --list
    python -m verify.sanitize_case --dry-run NAME [NAME ...]

Cases (``CASES``), small shapes first, then a goal shape:

- ``triton-r8``, ``triton-r32``, ``triton-r64``: ``whiten`` of (3, r, 256) on the triton backend,
  float32: the one-program Newton kernels (forward and adjoint) in their 4-warp (r <= 32) and
  8-warp (r = 64) variants, with the row statistics, covariance, reduction and apply kernels;
- ``cuda-small``: every kernel of the cuda backend (statistics, merge, Newton, apply; the
  backward's statistics, merge, adjoint, apply) for each row bucket (c = 17, 64, 128) and dtype
  (float32, bfloat16, float16), and the affine variants through the IterNorm layer (128
  channels, NCHW and channels_last);
- ``triton-goal``, ``cuda-goal``: the IterNorm layer (64 channels per group, T = 5) at the
  smallest ResNet-50 stage shape (256, 2048, 7, 7), float32 NCHW and bfloat16 channels_last.

Each call is checked for finite outputs and gradients; exit status 0 when all ran, 1 when one
raised or gave a non-finite value, 3 when the backend is not available here (the reason printed).

``--dry-run`` (CPU): the same calls at tiny shapes, triton under the interpreter and cuda in the
host emulator, run with each phase's threads in increasing and then decreasing order: the
results must be bitwise equal (a phase that reads what another thread of it writes, a missing
barrier, gives different bits), the CPU's stand-in for racecheck and synccheck.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench.goals import RESNET50_STAGES
from verify.gpu_smoke import Case, inputs, run

NOT_AVAILABLE = 3
GOAL_LAYER = RESNET50_STAGES[-1]  # (256, 2048, 7, 7): the goal shape with the fewest elements


def _cuda_small(dry_run: bool) -> list[Case]:
    n = 40 if dry_run else 300
    whiten = [
        Case("whiten", (2 if dry_run else 3, c, n), dtype)
        for c in (17, 64, 128)
        for dtype in ("float32", "bfloat16", "float16")
    ]
    shape = (2, 128, 2, 2) if dry_run else (4, 128, 5, 5)
    return whiten + [
        Case("layer", shape, "float32", "nchw"),
        Case("layer", shape, "bfloat16", "channels_last"),
    ]


def _goal(dry_run: bool) -> list[Case]:
    if dry_run:  # the layer's path at a tiny shape (cuda-small covers the dtypes and layouts there)
        return [Case("layer", (2, 128, 2, 3), "bfloat16", "channels_last")]
    return [
        Case("layer", GOAL_LAYER, "float32", "nchw"),
        Case("layer", GOAL_LAYER, "bfloat16", "channels_last"),
    ]


def _newton(r: int, dry_run: bool) -> list[Case]:
    return [Case("whiten", (2, r, 40) if dry_run else (3, r, 256), "float32")]


# name -> (backend, what it covers, the calls as smoke cases for the given dry_run)
CASES = {
    "triton-r8": ("triton", "one-program Newton, BLOCK 16, 4 warps", lambda d: _newton(8, d)),
    "triton-r32": ("triton", "one-program Newton, BLOCK 32, 4 warps", lambda d: _newton(32, d)),
    "triton-r64": ("triton", "one-program Newton, BLOCK 64, 8 warps", lambda d: _newton(64, d)),
    "cuda-small": ("cuda", "every kernel, row buckets 32/64/128, 3 dtypes, affine", _cuda_small),
    "triton-goal": ("triton", "the layer at (256, 2048, 7, 7)", _goal),
    "cuda-goal": ("cuda", "the layer at (256, 2048, 7, 7)", _goal),
}


def record_launches(dry_run: bool = False) -> None:
    """The triton launches of the triton cases, on meta tensors (inside ``launches.record``)."""
    for backend, _, calls in CASES.values():
        if backend == "triton":
            for case in calls(dry_run):
                x, dy = inputs(case, "meta")
                run(case, "triton", x, dy)


def _finite(out: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in out.items() if not bool(torch.isfinite(t).all())]


def run_case(name: str, dry_run: bool) -> tuple[int, str]:
    """(exit status, one line) of case ``name``."""
    import intl_kernels as ik

    backend, _, calls = CASES[name]
    device = "cpu" if dry_run else "cuda"
    emulated = dry_run and backend == "cuda"
    if emulated and not hasattr(torch.ops.intl_kernels, "emulate_small_whiten_fwd"):
        return NOT_AVAILABLE, f"{name}: the host emulator is not built (the C++ extension)"
    if not emulated and backend not in ik.available_backends():
        return NOT_AVAILABLE, f"{name}: backend {backend!r} is not available here"
    for case in calls(dry_run):
        x, dy = inputs(case, device)
        try:
            if emulated:
                out = run(case, "emulated", x, dy)
                other = run(case, "emulated", x, dy, reverse_threads=True)
                differ = [k for k in out if not torch.equal(out[k], other[k])]
                if differ:
                    return (
                        1,
                        f"{name}: {case.name}: {differ} differ between thread orders (a missing barrier)",
                    )
            else:
                out = run(case, backend, x, dy)
                if device == "cuda":
                    torch.cuda.synchronize()
        except Exception as exc:  # the process reports it; the sanitizer's log has the rest
            return 1, f"{name}: {case.name}: {type(exc).__name__}: {str(exc).strip()[:300]}"
        bad = _finite(out)
        if bad:
            return 1, f"{name}: {case.name}: non-finite {bad}"
    return 0, f"{name}: ok"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verify.sanitize_case", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"cases to run, of: {', '.join(CASES)}")
    ap.add_argument("--list", action="store_true", help="print the case names and what they cover")
    ap.add_argument("--dry-run", action="store_true", help="CPU: interpreter and host emulator, tiny shapes")
    args = ap.parse_args(argv)
    if args.list:
        for name, (backend, what, _) in CASES.items():
            print(f"{name:12s} {backend:7s} {what}")
        return 0
    unknown = [n for n in args.names if n not in CASES]
    if unknown or not args.names:
        ap.error(f"names must be among {', '.join(CASES)}; got {args.names or 'none'}")
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0").strip() != "1":
        ap.error("--dry-run runs triton under the interpreter: set TRITON_INTERPRET=1")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device here (--dry-run runs the cases on the CPU)")
    status = 0
    for name in args.names:
        start = time.perf_counter()
        rc, line = run_case(name, args.dry_run)
        print(f"{line} ({time.perf_counter() - start:.1f} s)", flush=True)
        if rc == 1:  # a failure outranks "not available here"
            status = 1
        elif rc and status == 0:
            status = rc
    return status


if __name__ == "__main__":
    sys.exit(main())
