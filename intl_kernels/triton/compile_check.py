"""Compile every Triton kernel variant to a cubin for NVIDIA targets, without a GPU.

    python -m intl_kernels.triton.compile_check [--arch 80,90] [--quick]

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that they
compile: dot shapes, dtype rules and constexpr branches are only checked by the real
compiler. This runs Triton's compiler ahead of time (``triton.compile`` on an
``ASTSource`` with a ``GPUTarget``) for every autotuning config and flag combination the
launchers can pick, for float32 (each precision mode), bfloat16 and float16, and prints
one line per kernel. Exit status 1 if anything failed. Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

FLOAT_SCALARS = {"inv_div", "sqrt_eps", "alpha", "beta"}
INT32_POINTERS = {"ROWEXP", "GEXP"}
INPUT_POINTERS = {"Z", "DY"}  # input dtype; the apply kernel's OUT too
TYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _signature(fn, constexprs: dict, dtype: str, out_is_input: bool):
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.isupper():
            if name in INT32_POINTERS:
                sig[name] = "*i32"
            elif name in INPUT_POINTERS or (name == "OUT" and out_is_input):
                sig[name] = "*" + TYPE_NAMES[dtype]
            else:
                sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    return sig


def variants(quick: bool = False):
    """(kernel, constexprs, dtype, num_warps, num_stages) for the configs the launchers use.

    Full: every autotuning config × flag combination × dtype × precision. Quick (CI): every
    kernel and flag combination once in float32 "ieee", plus each dtype and precision mode
    once per kernel that has it, with the first autotuning config.
    """
    from intl_kernels.triton import kernels as K
    from intl_kernels.triton import whiten as W

    def configs(tuned):
        cfgs = [(c.kwargs, c.num_warps, c.num_stages) for c in tuned.configs]
        return cfgs[:1] if quick else cfgs

    modes = [
        ("float32", "ieee"),
        ("float32", "tf32"),
        ("float32", "tf32x3"),
        ("bfloat16", "ieee"),
        ("float16", "ieee"),
    ]

    def all_flags(mode):  # in quick mode, flag combinations are enumerated for fp32 ieee only
        return not quick or mode == ("float32", "ieee")

    for dtype, two in itertools.product(("float32", "bfloat16", "float16"), (False, True)):
        yield K._whiten_rowstats_kernel, dict(BLOCK_R=4, BLOCK_N=1024, TWO_LEVEL=two), dtype, 4, 3
    for dtype, prec in modes:
        full = all_flags((dtype, prec))
        gram_flags = itertools.product(
            (16, 32, 64) if full else (64,),
            (False, True),
            (False, True) if full else (True,),
            (False, True) if full else (False,),
        )
        for (meta, w, s), (block, has_dy, final, two) in itertools.product(configs(W._gram), gram_flags):
            flags = dict(
                FROM_ROWSTATS=not has_dy, HAS_DY=has_dy, FINAL=final, HAS_TRACE=not has_dy, TWO_LEVEL=two
            )
            yield K._whiten_gram_kernel, dict(meta, BLOCK=block, PREC=prec, **flags), dtype, w, s
        apply_flags = itertools.product((False, True), (False, True) if full else (False,))
        for (meta, w, s), (has_dy, two) in itertools.product(configs(W._apply), apply_flags):
            yield K._whiten_apply_kernel, dict(meta, HAS_DY=has_dy, TWO_LEVEL=two, PREC=prec), dtype, w, s
        if dtype != "float32":
            continue  # the Newton iteration is float32 for every input dtype
        for block in (16, 32, 64, 128) if full else (32,):
            for meta, w, s in configs(W._newton_fwd):
                yield K._whiten_newton_fwd_kernel, dict(meta, BLOCK=block, PREC=prec), "float32", w, s
            for meta, w, s in configs(W._newton_bwd):
                yield K._whiten_newton_bwd_kernel, dict(meta, BLOCK=block, PREC=prec), "float32", w, s
        mm_flags = (
            itertools.product((True, False), (False, True), (False, True)) if full else [(True, True, True)]
        )
        for (meta, w, s), (lower, pair2, has_e) in itertools.product(configs(W._mm_kernel), mm_flags):
            yield (
                K._whiten_mm_kernel,
                dict(meta, LOWER=lower, HAS_PAIR2=pair2, HAS_E=has_e, PREC=prec),
                "float32",
                w,
                s,
            )
    for block, has_trace in itertools.product((16, 32, 64), (False, True)):
        yield K._whiten_gram_reduce_kernel, dict(BLOCK=block, HAS_TRACE=has_trace), "float32", 4, 3
    yield K._whiten_newton_prep_kernel, dict(BLOCK=1024), "float32", 4, 3


def _compile_one(job):
    """Compile one (variant index, arch); returns None or a failure line. Runs in a worker."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, arch, quick = job
    fn, constexprs, dtype, num_warps, num_stages = list(variants(quick))[index]
    name = fn.__name__
    try:
        sig = _signature(fn, constexprs, dtype, out_is_input=name == "_whiten_apply_kernel")
        compiled = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
    except Exception as exc:  # report every failure, not just the first
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = f"{name} sm_{arch} {dtype} {constexprs} warps={num_warps} stages={num_stages}"
        return name, f"{where}: {type(exc).__name__}: {first}"
    return name, None


def compile_all(archs: list[int], quick: bool = False, jobs: int | None = None, log=print) -> list[str]:
    """Compile every variant for every arch in ``jobs`` processes; returns the failures."""
    import multiprocessing as mp

    count = sum(1 for _ in variants(quick))
    work = [(i, arch, quick) for i in range(count) for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    start = time.time()
    counts: dict[str, int] = {}
    failures = []
    with mp.get_context("spawn").Pool(jobs) as pool:
        for done, (name, failure) in enumerate(pool.imap_unordered(_compile_one, work), 1):
            counts[name] = counts.get(name, 0) + 1
            if failure:
                failures.append(failure)
            if done % 25 == 0 or done == len(work):
                log(f"{done}/{len(work)} compiled, {len(failures)} failed, {time.time() - start:.0f} s")
    for name, c in sorted(counts.items()):
        log(f"{name}: {c} cubins")
    took = time.time() - start
    log(f"{len(work)} cubins for sm {archs} in {took:.0f} s with {jobs} processes, {len(failures)} failures")
    for f in failures:
        log("FAILED " + f)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)"
    )
    parser.add_argument("--quick", action="store_true", help="the CI subset (see variants())")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.replace(";", ",").split(",") if a.strip()]
    return (
        1 if compile_all(archs, quick=args.quick, jobs=args.jobs, log=lambda m: print(m, flush=True)) else 0
    )


if __name__ == "__main__":
    sys.exit(main())
