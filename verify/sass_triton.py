"""The triton backend's streaming kernels in verify.sass_report: SASS counts and the layer model.

    python -m verify.sass_triton [--tag after] [--out-dir bench/results]

The IterNorm layer's launches (64 channels per group, T = 5, forward and backward, float32 and
bfloat16, a ResNet-50 stage-1 input of 256×64×56×56) are recorded on meta tensors
(``intl_kernels.triton.launches``: the real sm_90 specializations and the configs the launchers
pick) and each streaming kernel is compiled here for sm_90: row statistics, covariance (forward
and backward), apply (forward and backward). From each cubin: registers, spills, shared memory,
blocks per SM, and the main loop (the loop over column tiles or, in apply, over the K blocks of a
column tile: the loop that holds the kernel's global loads) counted along its hot path with
``verify.sass_report.hot_path``; divided by the elements of z one iteration covers per warp, that
is the issued warp-instructions per element. The prediction uses ``verify.sass_report``'s model
with the triton backend's passes: forward = row statistics (reads z) + covariance (reads z) +
apply (reads z, writes y), backward = covariance of (Ȳ, Zc) (reads both) + apply (reads both,
writes Z̄), plus the small launches (forward: reduce and Newton; backward: reduce and adjoint) at
5 µs each. Writes ``bench/results/sass-report-triton-<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from verify import sass_report as sr

STAGE1 = (256, 64, 56, 56)
ROWS = 64
# (kernel, flag that tells the backward variant) -> the name used in the report
STREAMING = {
    "_whiten_rowstats_kernel": "rowstats",
    "_whiten_gram_kernel": "gram",
    "_whiten_apply_kernel": "apply",
}
# Passes over the N·C·H·W elements: reads + writes.
PASSES = {
    ("rowstats", "fwd"): 1,
    ("gram", "fwd"): 1,
    ("apply", "fwd"): 2,
    ("gram", "bwd"): 2,
    ("apply", "bwd"): 3,
}
LAYER = {"fwd": ("rowstats", "gram", "apply"), "bwd": ("gram", "apply")}
SMALL_LAUNCHES = {"fwd": 2, "bwd": 2}


def _named(v) -> dict:
    names = list(v.signature)
    return {names[p[0]]: x for p, x in v.constexprs.items() if len(p) == 1}


def layer_variants(dtype: str):
    """The streaming variants the layer launches at stage 1 (first occurrence of each)."""
    from bench.providers import make_case
    from intl_kernels.triton import launches

    with launches.record(90) as rec:
        make_case("layer", "triton", STAGE1, dtype, "full", "meta").fn()
    return [v for v in rec.variants if v.kernel in STREAMING]


def elements_per_iteration(kernel: str, meta: dict) -> int:
    """Elements of z the main loop's one iteration covers (a program's whole loop covers
    rows × columns; apply's loop walks the K blocks of one column tile)."""
    if kernel == "rowstats":
        return meta["BLOCK_R"] * meta["BLOCK_N"]
    if kernel == "gram":
        return min(meta["BLOCK"], ROWS) * meta["BLOCK_K"]
    return meta["BLOCK_K"] * meta["BLOCK_N"]


def _main_loop(instrs):
    """The loop with the kernel's global loads (LDG, or LDGSTS / UTMALDG where Triton pipelines
    them through shared memory) and the most instructions, innermost."""

    def loads(s, e):
        ops = sr.op_counts(sr._within(instrs, s, e))
        return ops["LDG"] + ops.get("LDGSTS", 0) + ops.get("UTMALDG", 0)

    cands = [(s, e) for s, e in sr.loops(instrs) if loads(s, e)]
    if not cands:
        raise ValueError("no loop with global loads")
    inner = [
        (s, e) for s, e in cands if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in cands)
    ]
    s, e = max(inner, key=lambda se: len(sr._within(instrs, *se)))
    return s, e, sr._within(instrs, s, e)


def triton_kernels() -> list[dict]:
    """One report dict per streaming kernel variant of the layer (KERNEL_KEYS and more)."""
    from intl_kernels.triton.resources import resources

    out = []
    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        for v in layer_variants(dtype):
            meta = _named(v)
            kernel = STREAMING[v.kernel]
            direction = "bwd" if meta.get("HAS_DY") else "fwd"
            compiled = v.compile()
            res = resources(compiled, 90)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(compiled.asm["cubin"])
                (text,) = sr.sass_of(path).values()
            instrs = sr.parse(text)
            start, end, body = _main_loop(instrs)
            path_ops, notes = sr.hot_path(instrs, start, end)
            count = sum(path_ops.values())
            warps = int(v.options["num_warps"])
            per_warp = elements_per_iteration(kernel, meta) / warps
            whole = sr.op_counts(instrs)
            threads = 32 * warps
            out.append(
                {
                    "backend": "triton",
                    "kernel": kernel,
                    "dtype": short,
                    "direction": direction,
                    "rows": ROWS,
                    "registers": res["registers"],
                    "spill_bytes": res["spill_stores"],
                    "shared_bytes": res["shared"],
                    "threads": threads,
                    "blocks_per_sm": sr.blocks_per_sm(res["registers"], res["shared"], threads),
                    "loop": [hex(start), hex(end)],
                    "loop_instructions": round(count, 1),
                    "loop_static_instructions": len(body),
                    "loop_per_element": {
                        op: round(n / per_warp, 3)
                        for op, n in sorted(path_ops.items(), key=lambda kv: -kv[1])[:14]
                    },
                    "elements_per_iteration": per_warp,
                    "warp_instructions_per_element": round(count / per_warp, 3),
                    "ffma": whole["FFMA"],
                    "hmma": whole["HMMA"],
                    "hgmma": whole["HGMMA"],
                    "config": v.config(),
                    "notes": notes,
                }
            )
    order = {
        ("rowstats", "fwd"): 0,
        ("gram", "fwd"): 1,
        ("apply", "fwd"): 2,
        ("gram", "bwd"): 3,
        ("apply", "bwd"): 4,
    }
    out.sort(key=lambda d: (order[(d["kernel"], d["direction"])], d["dtype"]))
    return out


def stage_programs(dtype: str) -> dict:
    """{stage: {(kernel, direction): (programs, split-K partial bytes)}} of the layer's streaming
    launches and its split-K reduction (first launch of a kernel: forward, second: backward)."""
    from bench.providers import make_case
    from intl_kernels.triton import launches

    names = {**STREAMING, "_whiten_gram_reduce_kernel": "reduce"}
    out = {}
    for shape in sr.RESNET50_STAGES:
        with launches.record(90) as rec:
            make_case("layer", "triton", shape, dtype, "full", "meta").fn()
        seen: dict = {}
        for kernel, (x, y, z) in rec.grids:
            if kernel in names:
                name = names[kernel]
                direction = "bwd" if (name, "fwd") in seen else "fwd"
                seen.setdefault((name, direction), x * y * z)
        out[tuple(shape)] = seen
        gram = seen[("gram", "fwd")]
        out[tuple(shape)]["partials"] = gram * 64 * 64 * 4  # one 64×64 float32 tile per covariance program
    return out


def _spread(p: dict, programs: int, model) -> dict:
    """A launch of fewer programs than SMs runs on that many SMs only: time × SMs / programs."""
    if programs >= model["sms"]:
        return p
    f = model["sms"] / programs
    return {**p, "time_s": p["time_s"] * f, "bound": p["bound"] + f" on {programs} SMs"}


def layer_summary(kernels: list[dict], programs: dict | None = None, model=sr.MODEL) -> list[dict]:
    """Predicted forward and backward of the layer at the ResNet-50 stages against BatchNorm's
    floor; with ``programs`` (``stage_programs``), launches of fewer programs than SMs run on as
    many SMs, and the split-K reduction's partials count as its bytes."""
    by = {(k["kernel"], k["direction"], k["dtype"]): k for k in kernels}
    out = []
    for dtype in ("fp32", "bf16"):
        b = sr.BYTES[dtype]
        grids = (programs or {}).get(dtype, {})
        for n, c, h, w in sr.RESNET50_STAGES:
            elements = n * c * h * w
            row = {"shape": [n, c, h, w], "dtype": dtype, "groups": c // ROWS, "elements": elements}
            stage = grids.get((n, c, h, w), {})
            for direction, names in LAYER.items():
                total = (SMALL_LAUNCHES[direction] - (1 if stage else 0)) * model["small_launch_s"]
                if stage:  # the reduction: its partials read at HBM speed, on its programs' SMs
                    red = _spread(
                        sr.predict(0.0, 1, stage["partials"], model), stage[("reduce", direction)], model
                    )
                    row[f"{direction}_reduce_ms"] = round(red["time_s"] * 1e3, 4)
                    total += max(red["time_s"], model["small_launch_s"])
                for name in names:
                    k = by[(name, direction, dtype)]
                    p = sr.predict(
                        k["warp_instructions_per_element"],
                        elements,
                        PASSES[(name, direction)] * elements * b,
                        model,
                    )
                    if stage:
                        p = _spread(p, stage[(name, direction)], model)
                        row[f"{direction}_{name}_programs"] = stage[(name, direction)]
                    row[f"{direction}_{name}_ms"] = round(p["time_s"] * 1e3, 4)
                    row[f"{direction}_{name}_bound"] = p["bound"]
                    total += p["time_s"]
                sr.against_floor(row, direction, total, elements * b, model)
            out.append(sr.with_total(row))
    return out


def per_element_totals(kernels: list[dict]) -> dict:
    out = {}
    for dtype in ("fp32", "bf16"):
        row = {}
        for direction, names in LAYER.items():
            ks = [
                k
                for k in kernels
                if k["dtype"] == dtype and k["direction"] == direction and k["kernel"] in names
            ]
            row[direction] = round(sum(k["warp_instructions_per_element"] for k in ks), 2)
            row[f"{direction}_ffma"] = round(sum(k["loop_per_element"].get("FFMA", 0.0) for k in ks), 2)
        out[dtype] = row
    return out


KERNEL_COLUMNS = [
    ("kernel", "kernel"), ("direction", "dir"), ("dtype", "dtype"), ("registers", "regs"),
    ("spill_bytes", "spill B"), ("shared_bytes", "smem B"), ("threads", "threads"),
    ("blocks_per_sm", "blocks/SM"), ("loop_instructions", "loop instr"),
    ("elements_per_iteration", "elem/warp"),
    ("warp_instructions_per_element", "instr/elem"), ("ffma", "FFMA"), ("hmma", "HMMA"), ("hgmma", "HGMMA"),
]  # fmt: skip
LAYER_COLUMNS = [
    ("shape", "N,C,H,W"), ("dtype", "dtype"), ("fwd_ms", "fwd ms"),
    ("fwd_batchnorm_floor_ms", "BN fwd floor"), ("fwd_vs_floor", "fwd/floor"), ("bwd_ms", "bwd ms"),
    ("bwd_batchnorm_floor_ms", "BN bwd floor"), ("bwd_vs_floor", "bwd/floor"),
    ("total_vs_floor", "total/floor"),
    ("fwd_rowstats_programs", "rowstats programs"), ("fwd_rowstats_bound", "rowstats"),
    ("fwd_reduce_ms", "reduce ms"), ("fwd_apply_bound", "apply"), ("bwd_apply_bound", "apply bwd"),
]  # fmt: skip


def render_markdown(report: dict) -> str:
    m = report["model"]
    cell = sr._cell
    parts = [
        f"# SASS report of the triton backend ({report['tag']})",
        "",
        "Generated by `python -m verify.sass_triton`: the IterNorm layer's launches recorded on meta tensors "
        f"at {'x'.join(map(str, STAGE1))} (64 channels per group) and compiled for sm_90 with Triton "
        f"{report['triton']}. Main loop: the innermost loop holding the global loads, counted along its hot "
        "path; instr/elem = loop instructions / (elements of z one iteration covers / warps).",
        "",
        sr._md_table(
            [h for _, h in KERNEL_COLUMNS],
            [[cell(k[c]) for c, _ in KERNEL_COLUMNS] for k in report["kernels"]],
        ),
        "",
        "## Per element at c = 64",
        "",
        sr._md_table(
            [
                "dtype",
                "forward (rowstats + gram + apply)",
                "of which FFMA",
                "backward (gram + apply)",
                "of which FFMA",
            ],
            [[d, v["fwd"], v["fwd_ffma"], v["bwd"], v["bwd_ffma"]] for d, v in report["per_element"].items()],
        ),
        "",
        "## Predicted IterNorm layer at the ResNet-50 stages, N = 256 (a prediction, not a measurement)",
        "",
        f"Model: {m['device']}, {m['sms']} SMs × {m['schedulers_per_sm']} schedulers at "
        f"{m['clock_hz'] / 1e9:.3f} GHz, HBM {m['hbm_bytes_per_s'] / 1e12:.2f} TB/s; kernel time = "
        "max(issue, compulsory bytes / HBM); forward = row statistics (1 pass) + covariance (1) + apply (2), "
        "backward = covariance (2) + apply (3); a launch of fewer programs than SMs runs on that many SMs "
        "(its time × SMs / programs); the split-K reduction reads its partials (64×64 float32 per covariance "
        f"program) that way, at least {m['small_launch_s'] * 1e6:.0f} µs, and the Newton / adjoint launch "
        f"counts {m['small_launch_s'] * 1e6:.0f} µs. BatchNorm floor: forward 3 passes, backward 5.",
        "",
        sr._md_table(
            [h for _, h in LAYER_COLUMNS], [[cell(r[c]) for c, _ in LAYER_COLUMNS] for r in report["layer"]]
        ),
    ]
    return "\n".join(parts) + "\n"


def build_report(tag: str) -> dict:
    import triton

    kernels = triton_kernels()
    programs = {short: stage_programs(dtype) for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16"))}
    return {
        "tag": tag,
        "backend": "triton",
        "triton": triton.__version__,
        "arch": "sm_90",
        "model": sr.MODEL,
        "kernels": kernels,
        "per_element": per_element_totals(kernels),
        "programs": {
            d: {
                "x".join(map(str, s)): {
                    f"{k[0]} {k[1]}" if isinstance(k, tuple) else k: v for k, v in g.items()
                }
                for s, g in p.items()
            }
            for d, p in programs.items()
        },
        "layer": layer_summary(kernels, programs),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m verify.sass_triton", description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="after")
    ap.add_argument("--out-dir", default=str(sr.RESULTS))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
        ap.error("unset TRITON_INTERPRET (interpreted kernels do not compile)")
    report = build_report(args.tag)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"sass-report-triton-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    print(render_markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
