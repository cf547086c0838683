"""The benchmark harness behind ``python -m bench.run_cpu`` and ``python -m bench.run_gpu``.

For every point of a grid (op × dtype × shape × mode × provider; providers and cases in
``bench.providers``) it builds the inputs, times the closure and records one row:

- GPU: ``triton.testing.do_bench`` (median, p20, p80 from quantiles 0.5/0.2/0.8; L2
  flushed and gradients set to None before every timed call, outside the timed region)
  after a clock warm-up of the whole device; then one more call for the peak memory
  above what was allocated before it (``peak_mem_mb``);
- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` after a warm-up, in rounds that
  interleave the providers so that drift of a shared machine hits all alike; median and
  percentiles over the per-call times of all rounds (resetting the ``.grad`` of the
  leaves, a few attribute writes, happens inside the timed call here). No peak memory;
  instead the minor page faults per timed call (``faults_per_call``, mean over the rounds):
  fresh pages of large temporaries that the C library's allocator returned to the system,
  each touched again at a cost of about a microsecond per 4 KiB here, a part of a time that
  depends on the process's heap state rather than on the kernel.

Writes ``<out>/<device label>-<yyyymmdd>.csv`` (long format, ``CSV_COLUMNS``), the goals
JSON beside it (``-goals.json``: device, versions, note, skipped points and
``bench.goals.summarize_goals``) and, through ``bench.plot``, the markdown table and the
PNG plots. A point that fails (a backend that does not take that shape, out of memory) is
reported as skipped, not timed.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import platform
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.benchmark as benchmark

from bench import plot
from bench.goals import C2_SHAPES, RESNET50_STAGES, ratio_text, shape_label, summarize_goals, verdict
from bench.providers import DTYPES, MODES, OPS, Case, check_provider, default_providers, make_case, runs

RESULTS = Path(__file__).resolve().parent / "results"
CSV_COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "median", "p20", "p80", "unit", "peak_mem_mb",
    "faults_per_call", "device", "torch", "triton", "timestamp",
]  # fmt: skip


@dataclass(frozen=True)
class Grid:
    """Shapes per op, dtypes, and providers that run at a few shapes only (``only``)."""

    shapes: dict[str, tuple[tuple[int, ...], ...]]
    dtypes: tuple[str, ...]
    only: dict[str, tuple[str, ...]] = field(default_factory=dict)


GRIDS = {
    # smoke tests: tiny shapes, seconds
    "quick": Grid(
        {
            "channel": ((32, 64),),
            "crops": ((6, 16, 64),),
            "layer": ((4, 128, 3, 3),),
            "newton": ((16,), (160,)),
        },
        ("float32",),
    ),
    # `make bench` on a small CPU: goals C1 and C2, a few minutes on 2 cores
    "small": Grid(
        {"channel": ((256, 2048), (512, 2048)), "crops": ((6, 256, 2048),), "layer": C2_SHAPES, "newton": ()},
        ("float32",),
    ),
    # the goal points P1-P4 alone (`make gpu-check`, tier goals; `verify.compile_budget`)
    "goals": Grid(
        {
            "channel": ((256, 8192),),
            "crops": ((6, 256, 8192),),
            "layer": RESNET50_STAGES,
            "newton": ((4096,),),
        },
        ("float32", "bfloat16"),
        only={"compiled": ("256x8192",)},
    ),
    # `make bench-gpu`: goals P1-P4; compiling with autotuning costs about a minute per
    # shape, so `compiled` runs at the P1 point only
    "full": Grid(
        {
            "channel": tuple((n, d) for d in (2048, 8192) for n in (64, 128, 256, 512, 1024, 2048, 4096)),
            "crops": ((6, 256, 8192),),
            "layer": RESNET50_STAGES,
            "newton": ((256,), (4096,)),
        },
        ("float32", "bfloat16"),
        only={"compiled": ("256x8192",)},
    ),
}


# ---------------------------------------------------------------------------- environment


def triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """What ran, for every row: the GPU's name, or the CPU model and thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def device_label(device: str) -> str:
    """File-name label: ``cpu-2threads`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu-{torch.get_num_threads()}threads"


# ---------------------------------------------------------------------------- timing


def clear_grads(case: Case) -> None:
    """Set the .grad of the case's leaves to None."""
    for t in case.grads:
        t.grad = None


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_cpu(case: Case, min_run_time: float, warmup_s: float) -> tuple[list[float], float]:
    """Per-call times in ms, one per block of ``blocked_autorange`` (after ``warmup_s`` of calls),
    and the minor page faults per timed call (all threads of the process)."""

    calls = [0]

    def call():
        clear_grads(case)
        case.fn()
        calls[0] += 1

    call()
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        call()
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    calls[0], faults = 0, _minor_faults()
    m = timer.blocked_autorange(min_run_time=min_run_time)  # with the calls that size its blocks
    faults = _minor_faults() - faults
    return [1e3 * t for t in m.times], faults / max(calls[0], 1)


def measure_gpu(case: Case, warmup_ms: int, rep_ms: int) -> tuple[float, float, float]:
    """(median, p20, p80) in ms by ``triton.testing.do_bench``; grads set to None outside the timing."""
    from triton.testing import do_bench

    q = do_bench(case.fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=case.grads, quantiles=[0.5, 0.2, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def peak_mem_mb(case: Case) -> float:
    """Peak GPU memory of one call above what was allocated before it (inputs, a saved graph)."""
    clear_grads(case)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    case.fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def warm_up_gpu(seconds: float) -> None:
    """Large matrix products for ``seconds``, so that clocks have settled before the first point."""
    a = torch.randn(4096, 4096, device="cuda")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    p50, p20, p80 = np.quantile(np.asarray(times_ms), [0.5, 0.2, 0.8])
    return float(p50), float(p20), float(p80)


# ---------------------------------------------------------------------------- grid


def parse_subset(text: str, allowed: list[str] | tuple[str, ...], arg: str) -> list[str]:
    """Comma-separated names, each one of ``allowed``; raises ValueError naming ``arg`` otherwise."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in allowed]
    if not names or bad:
        raise ValueError(f"{arg}: expected a comma-separated subset of {list(allowed)}, got {text!r}")
    return names


# Providers whose first call compiles for minutes (torch.compile with autotuning): run after
# every other point, so that a deadline cuts them and not the rest.
RUN_LAST = ("compiled",)


def points(grid: Grid, ops, dtypes, modes, providers) -> list[tuple]:
    """(op, dtype, shape, mode, provider) in run order; providers of one (shape, mode) adjacent,
    except ``RUN_LAST`` providers, which come after all others."""
    out = []
    for op in ops:
        for dtype in dtypes:
            for shape in grid.shapes[op]:
                label = shape_label(shape)
                for mode in modes if op != "newton" else [m for m in modes if m == "fwd"]:
                    for p in providers:
                        if runs(p, op, dtype, shape) and label in grid.only.get(p, (label,)):
                            out.append((op, dtype, shape, mode, p))
    return [p for p in out if p[4] not in RUN_LAST] + [p for p in out if p[4] in RUN_LAST]


def result_row(
    op,
    provider,
    mode,
    shape: str,
    dtype: str,
    stats,
    peak: float | None,
    device: str,
    versions,
    faults: float | None = None,
) -> dict:
    """One CSV row (``CSV_COLUMNS``): stats = (median, p20, p80) ms, versions = (torch, triton),
    peak MB (GPU), minor page faults per call (CPU)."""
    median, p20, p80 = stats
    return {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "dtype": dtype,
        "median": f"{median:.6g}",
        "p20": f"{p20:.6g}",
        "p80": f"{p80:.6g}",
        "unit": "ms",
        "peak_mem_mb": "" if peak is None else f"{peak:.1f}",
        "faults_per_call": "" if faults is None else f"{faults:.0f}",
        "device": device,
        "torch": versions[0],
        "triton": versions[1],
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _describe(point) -> str:
    op, dtype, shape, mode, provider = point
    return f"{op:>7s} {dtype:>8s} {shape_label(shape):>14s} {mode:>4s} {provider:>16s}"


def _time_point(point, device: str, min_run_time: float, warmup_s: float, quick: bool):
    """((median, p20, p80), peak MB) on GPU; ((per-block ms list, faults per call), None) on CPU."""
    op, dtype, shape, mode, provider = point
    case = make_case(op, provider, shape, dtype, mode, device)
    if device == "cuda":
        return measure_gpu(case, 10 if quick else 25, 20 if quick else 100), peak_mem_mb(case)
    return measure_cpu(case, min_run_time, warmup_s), None


def run_grid(
    pts, device: str, *, rounds: int, min_run_time: float, warmup_s: float, quick: bool, deadline=None
):
    """Times every point; returns ({point: (median, p20, p80)}, {point: peak MB or None}, skipped,
    {point: [median ms of each round]} (CPU; empty on GPU), {point: minor page faults per call,
    mean over the rounds} (CPU; empty on GPU)). Points not started by ``deadline`` (a
    ``time.time()`` value) are skipped with that reason."""
    stats, peaks, skipped = {}, {}, {}
    faults: dict[tuple, list[float]] = {}
    times: dict[tuple, list[float]] = {p: [] for p in pts}
    per_round: dict[tuple, list[float]] = {}
    rounds = rounds if device == "cpu" else 1
    for rnd in range(rounds):
        for i, point in enumerate(pts, 1):
            if point in skipped:
                continue
            if deadline is not None and time.time() >= deadline:
                skipped[point] = "deadline: not started before the time budget ran out"
                stats.pop(point, None)
                print(f"[{i:3d}/{len(pts)}] {_describe(point)}: SKIPPED (deadline)", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                result, peaks[point] = _time_point(point, device, min_run_time, warmup_s, quick)
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
                skipped[point] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                stats.pop(point, None)
                print(f"[{i:3d}/{len(pts)}] {_describe(point)}: SKIPPED ({skipped[point]})", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if device == "cuda":
                stats[point] = result
            else:
                block_times, point_faults = result
                times[point].extend(block_times)
                stats[point] = quantiles(times[point])
                per_round.setdefault(point, []).append(float(np.median(block_times)))
                faults.setdefault(point, []).append(point_faults)
            tag = f"round {rnd + 1}/{rounds}, " if rounds > 1 else ""
            print(
                f"[{tag}{i:3d}/{len(pts)}] {_describe(point)}: median {stats[point][0]:10.4f} ms "
                f"({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    return (
        stats,
        peaks,
        skipped,
        {p: m for p, m in per_round.items() if p in stats},
        {p: float(np.mean(f)) for p, f in faults.items() if p in stats},
    )


# ---------------------------------------------------------------------------- results


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Long-format CSV with ``CSV_COLUMNS``; creates the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def goals_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + "-goals.json")


def main(argv: list[str] | None, *, prog: str, description: str, device: str, grid: str) -> Path:
    """Parse the command line (defaults: ``device``, ``grid``), run, write; returns the CSV path."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=device)
    ap.add_argument("--grid", choices=sorted(GRIDS), default=grid, help=f"shape grid (default: {grid})")
    ap.add_argument("--ops", default=None, help=f"subset of {','.join(OPS)} (default: every op)")
    ap.add_argument("--providers", default=None, help="subset (default: every provider that runs here)")
    ap.add_argument("--dtypes", default=None, help="subset of float32,bfloat16 (default: the grid's)")
    ap.add_argument("--modes", default=",".join(MODES), help="subset of fwd,bwd,full (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"result directory (default: {RESULTS})")
    ap.add_argument("--rounds", type=int, default=None, help="CPU: interleaved rounds (default 3; quick 1)")
    ap.add_argument(
        "--min-run-time", type=float, default=None, help="CPU: s per point and round (default 0.3)"
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    ap.add_argument("--note", default="", help="a remark stored with the results (e.g. 'shared machine')")
    ap.add_argument(
        "--deadline", type=float, default=None, help="skip points not started by this time.time() value"
    )
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (--device cpu runs the same code on the CPU)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    g = GRIDS[args.grid]
    quick = args.grid == "quick"
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.01 if quick else 0.3)
    if rounds < 1 or min_run_time <= 0:
        ap.error(f"--rounds must be >= 1 and --min-run-time > 0, got {rounds} and {min_run_time}")
    try:
        ops = parse_subset(args.ops, OPS, "--ops") if args.ops else list(OPS)
        dtypes = parse_subset(args.dtypes, tuple(DTYPES), "--dtypes") if args.dtypes else list(g.dtypes)
        modes = parse_subset(args.modes, MODES, "--modes")
        if args.providers:
            providers = [
                check_provider(p.strip(), args.device) for p in args.providers.split(",") if p.strip()
            ]
        else:
            providers = default_providers(args.device)
    except ValueError as e:
        ap.error(str(e))

    name, label = device_name(args.device), device_label(args.device)
    versions = (torch.__version__, triton_version())
    start = dt.datetime.now(dt.timezone.utc)
    pts = points(g, ops, dtypes, modes, providers)
    print(f"device: {name}; torch {versions[0]}; triton {versions[1] or '-'}; {start:%Y-%m-%d %H:%M} UTC")
    print(f"grid {args.grid}: {len(pts)} points; providers {providers}", flush=True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # every float32 provider at full precision
        warm_up_gpu(0.5 if quick else 3.0)
    stats, peaks, skipped, per_round, faults = run_grid(
        pts,
        args.device,
        rounds=rounds,
        min_run_time=min_run_time,
        warmup_s=0.0 if quick else 0.1,
        quick=quick,
        deadline=args.deadline,
    )
    rows = []
    for p in (p for p in pts if p in stats):
        op, dtype, shape, mode, prov = p
        rows.append(
            result_row(
                op, prov, mode, shape_label(shape), dtype, stats[p], peaks[p], name, versions, faults.get(p)
            )
        )
    path = write_csv(args.out / f"{label}-{start:%Y%m%d}.csv", rows)
    round_medians = {
        (op, shape_label(shape), dtype, mode, prov): medians
        for (op, dtype, shape, mode, prov), medians in per_round.items()
    }
    goals = summarize_goals(rows, round_medians)
    meta = {
        "device": name,
        "torch": versions[0],
        "triton": versions[1],
        "date": start.isoformat(timespec="seconds"),
        "grid": args.grid,
        "timing": "triton.testing.do_bench"
        if args.device == "cuda"
        else f"torch.utils.benchmark, {rounds} rounds",
        "note": args.note,
        "skipped": {" ".join([p[0], p[1], shape_label(p[2]), p[3], p[4]]): why for p, why in skipped.items()},
    }
    goals_path(path).write_text(json.dumps({**meta, "goals": goals}, indent=2) + "\n")
    written = plot.report(path)
    print("\n" + plot.markdown(rows, goals, note=args.note))
    for gname, res in goals.items():
        if res["met"] is not None:
            print(f"{gname}: {res['what']}: ratio {ratio_text(res)} (goal {res['goal']}): {verdict(res)}")
    if skipped:
        print(f"{len(skipped)} points skipped (listed in {goals_path(path).name})")
    print("wrote " + ", ".join(str(p) for p in [path, goals_path(path), *written]))
    return path
