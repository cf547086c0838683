"""Resource gate: every Triton launch configuration compiled for sm_80 and sm_90, no GPU needed.

    python -m intl_kernels.triton.compile_check [--full] [--arch 80,90] [--kernel NAME] [--jobs N]
        [--json PATH] [--report DIR]

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that they compile or
fit a GPU. This drives the launchers over a sweep of inputs on meta tensors inside
``launches.record``, which stops each launch where Triton would compile and keeps what it would
compile for sm_80 and sm_90 (Triton's own specialization of every argument: which integers are
1 or divisible by 16, which pointers are 16-byte aligned; the constexprs and options; every
config an autotuner may keep, at every shape of its size class), compiles each distinct variant
with ``triton.compile`` and fails when one does not compile, needs more shared memory than a
block may have (sm_80 166912 B, sm_90 232448 B) or spills registers beyond
``resources.SPILL_SLACK`` (16 B; ``ptxas -v`` with the ptxas Triton builds that architecture
with), naming kernel, config and numbers.

The sweep (``coverage``): float32 in each precision mode (ieee, tf32, tf32x3), bfloat16 and
float16; forward and backward; T = 2 and 5 Newton steps; every r from 1 to 144 (the per-r
formulas up to 128, the one-program Newton kernels up to 64, the tiled products and autotuned
lists beyond); for each r the ``inputs``: the IterNorm layer's group views of NCHW tensors
(two-level column addressing), of channels_last and (N, C) tensors (unit row stride), a
channels_last input with an NCHW gradient, and (G, r, n) blocks, sized for split-K and
single-program covariance, reduction in pieces and whole tiles, every row-statistics tile width,
and strides, n and G·r² divisible by 16 or not. Specializations matter: one config can be clean
for NCHW inputs and spill for channels_last ones, and ptxas trades a few bytes of spill for
occupancy at register cliffs (128 registers at 8 warps, 168 at 4).

``--full`` compiles every distinct variant (Triton's compile identity: signature, specialization,
parsed options, target), recording r by r, and checks that the r of one ``r_class`` make the
same variants, so that r > 144 adds none (``make compile-check-full``; results in
bench/results/compile-check-full-triton<version>.{json,md}). The default (``make test``) records
r = 15, 31, 63, 127 and 143 (one per tile bucket, odd: the least aligned) with T = 2 and compiles
per config, i.e. per (kernel, dtypes, constexprs, warps, stages, arch), its least specialized
variant with a unit row stride and without (``representatives``). ``--report DIR`` writes
compile-check[-full]-triton<version>.json and .md there. Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time

ARCHS = (80, 90)
FLOAT32_MODES = (("float32", "ieee"), ("float32", "tf32"), ("float32", "tf32x3"))
MODES = (*FLOAT32_MODES, ("bfloat16", "ieee"), ("float16", "ieee"))
R_MAX = 144  # every r of the per-r formulas (<= 128) and one period of residues mod 16 past them
R_DEFAULT = (15, 31, 63, 127, 143)  # one r per tile bucket of the formulas and one tiled, odd (least aligned)
T_VALUES = (2, 5)  # P_T and X_k start (T−1)·G·r² and (k−1)·G·r² floats into their buffers: alignment


def r_class(r: int) -> tuple:
    """What r changes in the variants it leads to: r == 1 (Triton specializes an integer equal to
    1); r's power-of-two bucket up to 128 (the per-r formulas change tiles and warps only there,
    the one-program Newton kernels stop at 64), or the tiled path beyond; gcd(r, 16) (Triton
    specializes integers divisible by 16 and pointers aligned to 16 bytes, and the launchers pass
    r, strides that are r times a layout factor and offsets of r² floats)."""
    import triton

    from intl_kernels.triton import whiten as W

    bucket = max(16, triton.next_power_of_2(r)) if r <= W.SMALL_R_MAX else "tiled"
    return (r == 1, bucket, math.gcd(r, 16))


def inputs(r: int, dtype) -> list[tuple[str, object, object]]:
    """(name, z, dy or None) of the sweep for r rows per group, on meta tensors: the IterNorm
    layer's (G, r, N, L) group views (``layers._columns``) of NCHW tensors (two-level column
    addressing), of channels_last and (N, C) tensors (one column stride C, row stride 1), a
    channels_last input with an NCHW gradient (two-level, mixed strides), and contiguous (G, r, n)
    blocks (``whiten``, ``iter_norm``). n runs from 8 to 8192 (every row-statistics tile width,
    split-K and single-program covariance, reduction in pieces and in whole tiles); L, n and C
    are divisible by 16 or not, G odd and even."""
    import torch

    from intl_kernels.layers import _columns

    def group_view(N, G, spatial, channels_last=False):
        x = torch.empty(N, G * r, *spatial, dtype=dtype, device="meta")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return _columns(x, G, r)

    def block(G, n):
        return torch.empty(G, r, n, dtype=dtype, device="meta")

    cl = group_view(4, 2, (7, 7), channels_last=True)
    return [
        ("nchw 8x28x28 G2", group_view(8, 2, (28, 28)), None),
        ("block G1 n8192", block(1, 8192), None),
        ("nchw 2x2x2 G2", group_view(2, 2, (2, 2)), None),
        ("nchw 3x7x7 G1", group_view(3, 1, (7, 7)), None),
        ("channels_last 4x7x7 G2", cl, None),
        ("channels_last 4x7x7 G2, nchw dy", cl, group_view(4, 2, (7, 7))),
        ("features 100 G1", group_view(100, 1, ()), None),
        ("block G2 n400", block(2, 400), None),
        ("block G1 n40", block(1, 40), None),
        ("block G3 n24", block(3, 24), None),
        ("block G1 n8", block(1, 8), None),
    ]


def run_case(z, dy, T: int, prec: str) -> None:
    """Forward and backward of z as the layer launches them: output and input gradient in z's
    layout, the output gradient in the output's unless ``dy`` is given."""
    import torch

    from intl_kernels.triton import whiten as W

    n = z.shape[2] * (z.shape[3] if z.dim() == 4 else 1)
    y, *stats = W._whiten_fwd(z, T, 1e-5, float(n), prec, out=torch.empty_like(z))
    W._whiten_bwd(
        torch.empty_like(y) if dy is None else dy, z, *stats, float(n), prec, out=torch.empty_like(z)
    )


def coverage(r_list, *, modes=MODES, t_values=T_VALUES) -> None:
    """The sweep's launches for the given r (inside ``launches.record``): mode × r × input × T."""
    import torch

    for dtype_name, prec in modes:
        dtype = getattr(torch, dtype_name)
        for r in r_list:
            for _, z, dy in inputs(r, dtype):
                for T in t_values:
                    run_case(z, dy, T, prec)


def config_key(v) -> tuple:
    """(kernel, pointer dtypes, declared constexprs, warps, stages, arch) of a variant: its
    config without the specialization of its integer and pointer arguments."""
    import importlib

    fn = getattr(importlib.import_module(v.module), v.kernel)
    declared = {(i,) for i, p in enumerate(fn.params) if p.is_constexpr}
    ptrs = tuple(t for t in v.signature.values() if t.startswith("*"))
    meta = tuple(sorted((p, repr(x)) for p, x in v.constexprs.items() if p in declared))
    return (v.kernel, ptrs, meta, v.options["num_warps"], v.options["num_stages"], v.target)


def _row_contiguous(v) -> bool:
    """Whether a row stride of the variant is specialized to 1 (channels_last and (N, C) inputs,
    transposed product operands): their tiles load along the other axis than column-contiguous
    ones, with other layouts and register needs."""
    names = list(v.signature)
    return any(
        len(p) == 1 and x == 1 and re.fullmatch(r"s_\w*r", names[p[0]]) for p, x in v.constexprs.items()
    )


def _specialized(v) -> int:
    """How many arguments Triton specialized as divisible by 16 (integers) or 16-byte aligned
    (pointers): the fewer, the more masked, scalar loads and address registers."""
    return sum(1 for a in v.attrs.values() if a)


def representatives(variants: list) -> list:
    """Per ``config_key``, the least specialized variant (``_specialized``) among those with a
    unit row stride and among the others (``_row_contiguous``): one or two per config, the first
    recorded on ties. Of the configs with a spilling variant in the first full sweep (Triton 3.8),
    this choice had one in 75 of 99, the first variant recorded of an aligned input in 21."""
    groups: dict = {}
    for v in variants:
        groups.setdefault((config_key(v), _row_contiguous(v)), []).append(v)
    return [min(vs, key=_specialized) for vs in groups.values()]


def record_r(arch: int, r: int, *, modes=MODES, t_values=T_VALUES) -> dict:
    """{compile_id: variant} of the sweep at one r for sm_<arch>."""
    from intl_kernels.triton import launches

    with launches.record(arch, every_config=True) as rec:
        coverage([r], modes=modes, t_values=t_values)
    return {v.compile_id: v for v in rec.variants}


def sweep(archs=ARCHS, *, full: bool = False, log=print) -> tuple[list, dict]:
    """(variants to compile, facts about the sweep). ``full``: every distinct variant of every r
    in 1..R_MAX, and the r classes checked (r of one ``r_class`` make the same variants);
    default: ``representatives`` of r in R_DEFAULT with T = 2."""
    from intl_kernels.triton import launches

    variants, facts = [], {"recorded": {}, "r_class_mismatches": []}
    start = time.time()
    for arch in archs:
        if full:
            per_r, first_of_class = {}, {}
            for r in range(1, R_MAX + 1):
                per_r[r] = record_r(arch, r)
                rep = first_of_class.setdefault(r_class(r), r)
                if per_r[r].keys() != per_r[rep].keys():
                    facts["r_class_mismatches"].append(f"sm_{arch}: r = {r} and r = {rep}")
            merged = {}
            for found in per_r.values():
                for cid, v in found.items():
                    merged.setdefault(cid, v)
            chosen = list(merged.values())
            facts["r_classes"] = len(first_of_class)
        else:
            with launches.record(arch, every_config=True) as rec:
                coverage(R_DEFAULT, t_values=(2,))
            chosen = representatives(list({v.compile_id: v for v in rec.variants}.values()))
        facts["recorded"][f"sm_{arch}"] = len(chosen)
        variants += chosen
        log(f"sm_{arch}: {len(chosen)} variants recorded ({time.time() - start:.0f} s)")
    facts["configs"] = len({config_key(v) for v in variants})
    facts["record_seconds"] = round(time.time() - start, 1)
    return variants, facts


def check(archs=ARCHS, *, full: bool = False, kernel: str | None = None, jobs: int | None = None, log=print):
    """Record, compile and check; returns (rows, failures, facts). A row: kernel, arch, config,
    seconds, resources and problems."""
    from intl_kernels.triton import launches
    from intl_kernels.triton.resources import problems

    variants, facts = sweep(archs, full=full, log=log)
    if kernel:
        variants = [v for v in variants if v.kernel == kernel]
    log(f"compiling {len(variants)} launch variants for sm {list(archs)}")
    start = time.time()
    rows, failures = [], [f"r classes differ: {m}" for m in facts["r_class_mismatches"]]
    for v, took, res, error in launches.compile_all(variants, jobs=jobs, log=log):
        arch = v.target[1]
        found = [error] if error else problems(res, arch)
        row = {"kernel": v.kernel, "arch": arch, "config": v.config(), "seconds": round(took, 2)}
        rows.append({**row, "config_key": repr(config_key(v)[1:5]), "resources": res, "problems": found})
        if found:
            failures.append(f"{v.kernel} sm_{arch} {v.config()}: " + "; ".join(found))
    facts["compile_seconds"] = round(time.time() - start, 1)
    facts["jobs"] = jobs or os.cpu_count()
    log(summary(rows))
    log(f"{len(rows)} variants in {facts['compile_seconds']:.0f} s, {len(failures)} failures")
    for f in failures:
        log("FAILED " + f)
    return rows, failures, facts


def summary(rows: list[dict]) -> str:
    """Per kernel and arch: variants, configs, largest shared memory and register count, and
    the variants that spill."""
    lines = [
        f"{'kernel':34s} {'arch':>5s} {'variants':>8s} {'configs':>7s} {'max shared B':>12s} "
        f"{'max regs':>8s} {'spills':>6s}"
    ]
    for (kernel, arch), rs in sorted(_by_kernel(rows).items()):
        ok = [r["resources"] for r in rs if r["resources"]]
        shared = max((x["shared"] for x in ok), default=0)
        regs = max((x["registers"] for x in ok), default=0)
        spills = sum(1 for x in ok if x["spill_stores"] or x["spill_loads"])
        configs = len({r["config_key"] for r in rs})
        arch_ = f"sm_{arch}"
        lines.append(f"{kernel:34s} {arch_:>5s} {len(rs):8d} {configs:7d} {shared:12d} {regs:8d} {spills:6d}")
    return "\n".join(lines)


def _by_kernel(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    return groups


def report(rows: list[dict], failures: list[str], facts: dict, *, full: bool, archs) -> dict:
    """What the committed result holds: versions, date, sweep, counts, times, failures, and per
    kernel × arch and per config (over its specializations) the resources."""
    import torch
    import triton

    from intl_kernels.triton.resources import SPILL_SLACK, _ptxas_version, ptxas_path

    configs: dict = {}
    for r in rows:
        configs.setdefault((r["kernel"], r["arch"], r["config_key"]), []).append(r)
    per_config = []
    for (kernel, arch, key), rs in sorted(configs.items()):
        ok = [r["resources"] for r in rs if r["resources"]]
        regs = [x["registers"] for x in ok]
        per_config.append({
            "kernel": kernel, "arch": arch, "config": key, "variants": len(rs),
            "registers": [min(regs, default=0), max(regs, default=0)],
            "max_shared": max((x["shared"] for x in ok), default=0),
            "spilling": sum(1 for x in ok if x["spill_stores"] or x["spill_loads"]),
            "max_spill_stores": max((x["spill_stores"] for x in ok), default=0),
        })  # fmt: skip
    per_kernel = []
    for (kernel, arch), rs in sorted(_by_kernel(rows).items()):
        ok = [r["resources"] for r in rs if r["resources"]]
        per_kernel.append({
            "kernel": kernel, "arch": arch, "variants": len(rs),
            "configs": len({r["config_key"] for r in rs}),
            "max_shared": max((x["shared"] for x in ok), default=0),
            "max_registers": max((x["registers"] for x in ok), default=0),
            "spilling": sum(1 for x in ok if x["spill_stores"] or x["spill_loads"]),
        })  # fmt: skip
    return {
        "command": "python -m intl_kernels.triton.compile_check" + (" --full" if full else ""),
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": {f"sm_{a}": _ptxas_version(ptxas_path(a)).splitlines()[-1] for a in archs},
        "archs": list(archs),
        "sweep": {
            "r": f"1..{R_MAX}, every r" if full else list(R_DEFAULT),
            "T": list(T_VALUES) if full else [2],
            "modes": [f"{d} {p}" for d, p in MODES],
            "inputs": [name for name, _, _ in inputs(16, torch.float32)],
            "compiled": "every distinct variant" if full else "one per config (representatives())",
        },
        "r_classes": facts.get("r_classes"),
        "r_class_mismatches": facts["r_class_mismatches"],
        "variants": facts["recorded"],
        "configs": facts["configs"],
        "seconds": {k: facts[k] for k in ("record_seconds", "compile_seconds", "jobs")},
        "failures": failures,
        "spill_slack_bytes": SPILL_SLACK,
        "within_slack": [
            f"{r['kernel']} sm_{r['arch']} {r['config']}: {r['resources']['spill_stores']} B stores, "
            f"{r['resources']['spill_loads']} B loads, {r['resources']['registers']} registers"
            for r in rows
            if r["resources"]
            and not r["problems"]
            and (r["resources"]["spill_stores"] or r["resources"]["spill_loads"])
        ],
        "per_kernel": per_kernel,
        "per_config": per_config,
    }


def _json_lines(rep: dict) -> str:
    """``report``'s JSON with one line per kernel and per config (diffs stay readable)."""
    body = {k: v for k, v in rep.items() if k not in ("per_kernel", "per_config")}
    text = json.dumps(body, indent=1)[:-2]
    for key in ("per_kernel", "per_config"):
        rows = ",\n".join("  " + json.dumps(row) for row in rep[key])
        text += f',\n "{key}": [\n{rows}\n ]'
    return text + "\n}\n"


def markdown(rep: dict) -> str:
    """A short summary of ``report``'s result."""
    sweep_, secs = rep["sweep"], rep["seconds"]
    lines = [
        f"# Resource gate{' (full sweep)' if 'every' in str(sweep_['r']) else ''}: Triton {rep['triton']}",
        "",
        f"`{rep['command']}`, {rep['date']}; torch {rep['torch']}; "
        + "; ".join(f"{a}: {v}" for a, v in rep["ptxas"].items())
        + ".",
        "",
        f"Sweep: r {sweep_['r']}; T {sweep_['T']}; {', '.join(sweep_['modes'])}; forward and backward; "
        f"inputs: {'; '.join(sweep_['inputs'])}. Compiled: {sweep_['compiled']}.",
        "",
        f"Variants: {', '.join(f'{a} {n}' for a, n in rep['variants'].items())} ({rep['configs']} configs). "
        f"Recording {secs['record_seconds']:.0f} s, compiling {secs['compile_seconds']:.0f} s "
        f"with {secs['jobs']} processes.",
    ]
    if rep["r_classes"] is not None:
        lines.append(
            f"r classes: {rep['r_classes']}; every r made the variants of its class's first r"
            if not rep["r_class_mismatches"]
            else f"r classes: MISMATCHES {rep['r_class_mismatches']}"
        )
    lines += [
        "",
        f"**{len(rep['failures'])} failures.**",
        "",
        "| kernel | arch | variants | configs | max shared B | max registers | spilling |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for k in rep["per_kernel"]:
        lines.append(
            f"| `{k['kernel']}` | sm_{k['arch']} | {k['variants']} | {k['configs']} | {k['max_shared']} "
            f"| {k['max_registers']} | {k['spilling']} |"
        )
    if rep["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in rep["failures"]]
    if rep["within_slack"]:
        lines += ["", f"Spills within the {rep['spill_slack_bytes']} B slack (pass):", ""]
        lines += [f"- {f}" for f in rep["within_slack"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)"
    )
    parser.add_argument(
        "--full", action="store_true", help="every distinct variant of the sweep (module doc)"
    )
    parser.add_argument("--kernel", default=None, help="only this kernel (e.g. _whiten_apply_kernel)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--json", type=str, default=None, help="write every row (resources included) here")
    parser.add_argument(
        "--report", type=str, default=None,
        help="write compile-check[-full]-triton<major.minor>.json and .md into this directory",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    try:
        archs = [int(a) for a in args.arch.replace(";", ",").split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch: expected compute capabilities such as 80,90, got {args.arch!r}")
    rows, failures, facts = check(
        archs, full=args.full, kernel=args.kernel, jobs=args.jobs, log=lambda m: print(m, flush=True)
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": archs, "full": args.full, "rows": rows, "failures": failures}, f, indent=1)
    if args.report:
        import triton

        rep = report(rows, failures, facts, full=args.full, archs=archs)
        version = ".".join(triton.__version__.split(".")[:2])
        os.makedirs(args.report, exist_ok=True)
        stem = os.path.join(args.report, f"compile-check{'-full' if args.full else ''}-triton{version}")
        with open(stem + ".json", "w") as f:
            f.write(_json_lines(rep))
        with open(stem + ".md", "w") as f:
            f.write(markdown(rep))
        print(f"wrote {stem}.json and {stem}.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
