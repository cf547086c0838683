"""Resource gate: every Triton launch configuration compiled for sm_80 and sm_90, no GPU needed.

    python -m intl_kernels.triton.compile_check [--arch 80,90] [--full] [--kernel NAME] [--json PATH]

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that they compile or
fit a GPU. This records the launches that real calls make (``launches.record``: Triton's own
sm_80/sm_90 launch specializations, which integers are 1 or divisible by 16, every config the
autotuners can benchmark and every config the r <= 128 formulas can pick) over a coverage
workload, compiles each distinct (kernel, dtypes, constexprs, warps, stages) once per
architecture with ``triton.compile``, and fails when a kernel does not compile, needs more
shared memory than a block may have (sm_80 166912 B, sm_90 232448 B) or spills registers
(``ptxas -v``), naming kernel, config and numbers.

Coverage (default, part of ``make test``): float32 with each precision mode and bfloat16; the
r <= 128 formulas at the largest tiles they pick (BLOCK 64 and 128); the r > 128 autotuned
lists; both directions, split-K and single-program covariance, NCHW group views. ``--full``
adds float16 and every r bucket (16, 32, 64, 128, 256). Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ARCHS = (80, 90)
MODES_DEFAULT = (("float32", "ieee"), ("float32", "tf32"), ("float32", "tf32x3"), ("bfloat16", "ieee"))
MODES_FULL = (*MODES_DEFAULT, ("float16", "ieee"))
R_DEFAULT = (64, 128, 256)  # largest heuristic tiles (BLOCK 64, 128) and the autotuned path
R_FULL = (2, 17, 33, 64, 100, 128, 256)


def coverage(full: bool = False) -> None:
    """Forward and backward launches over the coverage shapes, on meta tensors (inside
    ``launches.record``)."""
    import torch

    from intl_kernels.triton import whiten as W

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    for dtype_name, prec in MODES_FULL if full else MODES_DEFAULT:
        dtype = dtypes[dtype_name]
        for r in R_FULL if full else R_DEFAULT:
            # (G, r, N, L) group views of an NCHW tensor: two-level column addressing (more
            # index registers than a (G, r, n) block, which --full adds), with split-K
            # covariance partials (28×28 columns) and a single program per tile (2×2).
            shapes = [(8, 28), (2, 2)]
            blocks = [torch.empty(1, r, 96, dtype=dtype, device="meta")] if full else []
            views = []
            for N, H in shapes:
                x = torch.empty(N, 2 * r, H, H, dtype=dtype, device="meta")
                views.append(x.flatten(2).unflatten(1, (2, r)).permute(1, 2, 0, 3))
            for z in views + blocks:
                T = 5 if r <= W.SMALL_R_MAX else 4
                n = z.shape[2] * (z.shape[3] if z.dim() == 4 else 1)
                y, *stats = W._whiten_fwd(z, T, 1e-5, float(n), prec)
                W._whiten_bwd(torch.empty_like(y), z, *stats, float(n), prec)
    for prec in ("ieee", "tf32", "tf32x3"):  # the Newton part at INTL's largest r
        S = torch.empty(1, 4096, 4096, device="meta")
        W._whiten_newton_fwd(S, torch.empty(1, 64, device="meta"), 4, prec)


def gate_variants(variants: list) -> list:
    """One variant per (kernel, pointer dtypes, declared constexprs, warps, stages, arch): the
    first real specialization of each config (integer divisibility changes vector widths, not
    the tiles that set shared memory and registers)."""
    import importlib

    out, seen = [], set()
    for v in variants:
        fn = getattr(importlib.import_module(v.module), v.kernel)
        declared = {(i,) for i, p in enumerate(fn.params) if p.is_constexpr}
        ptrs = tuple(t for t in v.signature.values() if t.startswith("*"))
        meta = tuple(sorted((p, repr(x)) for p, x in v.constexprs.items() if p in declared))
        key = (v.kernel, ptrs, meta, v.options["num_warps"], v.options["num_stages"], v.target)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def check(archs=ARCHS, *, full: bool = False, kernel: str | None = None, jobs: int | None = None, log=print):
    """Record, compile and check; returns (rows, failures). A row: kernel, arch, config, seconds,
    resources and problems."""
    from intl_kernels.triton import launches
    from intl_kernels.triton.resources import problems

    variants = []
    for arch in archs:
        with launches.record(arch) as rec:
            coverage(full)
        variants += gate_variants(rec.variants)
    if kernel:
        variants = [v for v in variants if v.kernel == kernel]
    log(f"compiling {len(variants)} launch configurations for sm {list(archs)}")
    start = time.time()
    rows, failures = [], []
    for v, took, res, error in launches.compile_all(variants, jobs=jobs, log=log):
        arch = v.target[1]
        found = [error] if error else problems(res, arch)
        row = {"kernel": v.kernel, "arch": arch, "config": v.config(), "seconds": round(took, 2)}
        rows.append({**row, "resources": res, "problems": found})
        if found:
            failures.append(f"{v.kernel} sm_{arch} {v.config()}: " + "; ".join(found))
    took = time.time() - start
    log(summary(rows))
    log(f"{len(rows)} configurations in {took:.0f} s, {len(failures)} failures")
    for f in failures:
        log("FAILED " + f)
    return rows, failures


def summary(rows: list[dict]) -> str:
    """Per kernel and arch: configurations, largest shared memory and register count, spills."""
    lines = [
        f"{'kernel':34s} {'arch':>5s} {'configs':>7s} {'max shared B':>12s} {'max regs':>8s} {'spills':>6s}"
    ]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rs in sorted(groups.items()):
        ok = [r["resources"] for r in rs if r["resources"]]
        shared = max((x["shared"] for x in ok), default=0)
        regs = max((x["registers"] for x in ok), default=0)
        spills = sum(1 for x in ok if x["spill_stores"] or x["spill_loads"])
        lines.append(f"{kernel:34s} {'sm_' + str(arch):>5s} {len(rs):7d} {shared:12d} {regs:8d} {spills:6d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)"
    )
    parser.add_argument("--full", action="store_true", help="float16 and every r bucket too (see coverage())")
    parser.add_argument("--kernel", default=None, help="only this kernel (e.g. _whiten_apply_kernel)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--json", type=str, default=None, help="write every row (resources included) here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    try:
        archs = [int(a) for a in args.arch.replace(";", ",").split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch: expected compute capabilities such as 80,90, got {args.arch!r}")
    rows, failures = check(
        archs, full=args.full, kernel=args.kernel, jobs=args.jobs, log=lambda m: print(m, flush=True)
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": archs, "full": args.full, "rows": rows, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
