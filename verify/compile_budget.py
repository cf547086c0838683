"""The Triton compile budget of a first GPU run of the goal points, counted without a GPU.

    python -m verify.compile_budget [--arch 90] [--compile] [--jobs N] [--out PATH]

Records (``intl_kernels.triton.launches``: Triton's real sm_90 launch specialization, meta
tensors, nothing executes) the launches of the goal points exactly as ``make gpu-check`` runs
them: the ``goals`` grid of ``bench.harness`` (P1-P4: channel (256, 8192), six crops, the
IterNorm layer on the ResNet-50 stages, the Newton part at r = 4096; float32 and bfloat16;
forward, backward and both) with the ``triton`` provider, and the loss part of the P5
training step. It counts the distinct compiles and the autotune benchmarks per kernel
against the budget (BUDGET), and with ``--compile`` compiles every variant for sm_90 here
(``--jobs`` processes) and reports the compile seconds. Writes a JSON report (default
``bench/results/compile-budget-sm90.json``). Needs TRITON_INTERPRET unset.

The other providers' compiles (torch.compile's inductor kernels for ``compiled``) are not ours
and not counted. The smoke and sanitizer tiers' launches are recorded beside (``smoke``,
``sanitizer``: what they compile beyond the goals), for the warm-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

BUDGET = {"compiles": 120, "benchmarks": 200}
# Results beside the benchmarks' (committed under bench/results/).
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
GOAL_MODES = ("fwd", "bwd", "full")


def goal_points() -> list[tuple]:
    """(op, dtype, shape, mode, "triton") of the goals grid."""
    from bench.harness import GRIDS, points
    from bench.providers import OPS

    return points(GRIDS["goals"], OPS, GRIDS["goals"].dtypes, GOAL_MODES, ["triton"])


def record_goals() -> None:
    """The goal points' triton launches and the P5 loss part, on meta tensors."""
    import torch

    from bench.providers import make_case
    from bench.train_step import loss_fn

    for op, dtype, shape, mode, provider in goal_points():
        make_case(op, provider, shape, dtype, mode, "meta").fn()
    # P5: the INTL loss of the training step's bf16 embeddings (batch 256, 8192 wide)
    z = [torch.empty(256, 8192, dtype=torch.bfloat16, device="meta", requires_grad=True) for _ in range(2)]
    loss_fn("triton")(*z).backward()


def count(arch: int = 90):
    """(goals, smoke, sanitizer recordings) for sm_<arch>."""
    from intl_kernels.triton import launches
    from verify import gpu_smoke, sanitize_case

    with launches.record(arch) as goals:
        record_goals()
    with launches.record(arch) as smoke:
        gpu_smoke.record_launches(dry_run=False)
    with launches.record(arch) as sanitizer:
        sanitize_case.record_launches(dry_run=False)
    return goals, smoke, sanitizer


def report(goals, smoke, sanitizer, compiled=None, arch: int = 90) -> dict:
    """The JSON report: totals and per-kernel counts, the budget, and compile seconds if given."""
    import torch
    import triton

    out = {
        "what": "distinct Triton compiles and autotune benchmarks of a first run of the goal points",
        "target": f"sm_{arch}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "budget": BUDGET,
        "goals": {
            "points": len(goal_points()) + 1,
            "launches": goals.launches,
            "compiles": len(goals.variants),
            "autotune_events": sum(1 for _, n in goals.autotune_events if n > 1),
            "benchmarks": goals.benchmarks,
            "within_budget": len(goals.variants) <= BUDGET["compiles"]
            and goals.benchmarks <= BUDGET["benchmarks"],
            "per_kernel": goals.per_kernel(),
        },
        "smoke": {
            "compiles": len(smoke.variants),
            "new_beyond_goals": len({v.ident for v in smoke.variants} - {v.ident for v in goals.variants}),
            "benchmarks": smoke.benchmarks,
        },
        "sanitizer": {
            "compiles": len(sanitizer.variants),
            "new_beyond_goals_and_smoke": len(
                {v.ident for v in sanitizer.variants} - {v.ident for v in goals.variants + smoke.variants}
            ),
        },
    }
    if compiled is not None:
        seconds = [t for _, t, _, err in compiled if err is None]
        per_kernel: dict[str, float] = {}
        for v, t, _, err in compiled:
            if err is None:
                per_kernel[v.kernel] = per_kernel.get(v.kernel, 0.0) + t
        out["compile_seconds"] = {
            "variants": len(seconds),
            "failures": [f"{v.kernel} {v.config()}: {err}" for v, _, _, err in compiled if err],
            "total_one_core": round(sum(seconds), 1),
            "mean": round(sum(seconds) / max(len(seconds), 1), 2),
            "max": round(max(seconds, default=0.0), 2),
            "per_kernel_one_core": {k: round(v, 1) for k, v in sorted(per_kernel.items())},
            "machine": f"{os.cpu_count()} CPUs; seconds are per variant, one process each",
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verify.compile_budget", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    ap.add_argument("--compile", action="store_true", help="compile every goal variant and time it")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON report (default bench/results/compile-budget-smXX.json)"
    )
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
        ap.error("unset TRITON_INTERPRET (interpreted kernels do not compile)")
    start = time.time()
    goals, smoke, sanitizer = count(args.arch)
    compiled = None
    if args.compile:
        from intl_kernels.triton import launches

        compiled = launches.compile_all(goals.variants, jobs=args.jobs, log=lambda m: print(m, flush=True))
    rep = report(goals, smoke, sanitizer, compiled, args.arch)
    path = args.out or RESULTS / f"compile-budget-sm{args.arch}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=2) + "\n")
    g = rep["goals"]
    print(
        f"goal points: {g['compiles']} distinct compiles (budget {BUDGET['compiles']}), "
        f"{g['benchmarks']} autotune benchmarks (budget {BUDGET['benchmarks']}), {g['launches']} launches"
    )
    for kernel, c in g["per_kernel"].items():
        print(f"  {kernel:34s} {c['compiles']:4d} compiles {c['benchmarks']:4d} benchmarks")
    if compiled is not None:
        cs = rep["compile_seconds"]
        print(
            f"compile: {cs['variants']} variants, {cs['total_one_core']} s on one core in all, "
            f"mean {cs['mean']} s, max {cs['max']} s, {len(cs['failures'])} failures"
        )
    sm, sa = rep["smoke"], rep["sanitizer"]
    print(f"smoke tier: {sm['compiles']} compiles, {sm['new_beyond_goals']} beyond the goals'")
    print(f"sanitizer tier: {sa['compiles']} compiles, {sa['new_beyond_goals_and_smoke']} beyond those")
    print(f"wrote {path} ({time.time() - start:.0f} s)")
    return 0 if g["within_budget"] and not (compiled and rep["compile_seconds"]["failures"]) else 1


if __name__ == "__main__":
    sys.exit(main())
