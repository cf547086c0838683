"""CPU benchmark of channel-mode IterNorm (INTL, T = 4): every provider × shape × mode.

    python -m bench.run_cpu [--quick] [--out DIR] [--min-run-time S] [--shapes 256x2048,512x2048]

Times each closure of ``bench.providers`` with
``torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=...)`` using all of
``torch.get_num_threads()`` threads, after a warm-up outside the measurement, in several
rounds that interleave the providers. Reports the median and the 20th/80th percentiles
of the per-call times of all rounds, prints a markdown table
with each provider's speed-up against ``python_ref`` measured in the same run
(ref_time / provider_time) and writes the long-format CSV
``<out>/cpu-<threads>threads-<yyyymmdd>.csv`` (default out: bench/results/) and the
table beside it (same name, ``.md``).

CSV columns: op, provider, mode, shape (N x D), dtype, median, p20, p80, unit (ms),
peak_mem_mb (empty on CPU), device (CPU model), torch, triton (version or empty),
timestamp (UTC, ISO 8601). The full default grid takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils.benchmark as benchmark

from bench.providers import MODES, make_iter_norm, providers

OP = "iter_norm"
BASELINE = "python_ref"
CSV_COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "median", "p20", "p80", "unit", "peak_mem_mb",
    "device", "torch", "triton", "timestamp",
]  # fmt: skip
SHAPES = ((256, 2048), (512, 2048))
QUICK_SHAPES = ((32, 64),)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return ""


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Long-format CSV with CSV_COLUMNS; creates the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_report(path: Path, rows: list[dict], markdown: str, goals: dict | None = None, meta=None) -> Path:
    """The CSV at ``path``, the markdown beside it (.md) and, with goals, ``<stem>-goals.json``."""
    write_csv(path, rows)
    path.with_suffix(".md").write_text(markdown + "\n")
    if goals is not None:
        text = json.dumps({**(meta or {}), "goals": goals}, indent=2) + "\n"
        path.with_name(path.stem + "-goals.json").write_text(text)
    return path


def device_label() -> str:
    """Hostname-free label of what ran: CPU and thread count, e.g. ``cpu-2threads``."""
    return f"cpu-{torch.get_num_threads()}threads"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        n, sep, d = item.strip().lower().partition("x")
        if not sep or not n.isdigit() or not d.isdigit() or int(n) < 2 or int(d) < 2:
            raise argparse.ArgumentTypeError(f"--shapes: expected NxD with N, D >= 2, got {item!r}")
        shapes.append((int(n), int(d)))
    return shapes


def measure(fn, min_run_time: float, warmup_s: float = 0.2) -> list[float]:
    """Per-call times in ms of ``fn()``, one per block of blocked_autorange.

    Each of ``Measurement.times`` is the mean time of one call within a block of
    ``number_per_run`` calls (1 for calls over a few ms).
    """
    fn()
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return [1e3 * t for t in timer.blocked_autorange(min_run_time=min_run_time).times]


def summarize(times_ms: list[float]) -> dict[str, float]:
    p20, p50, p80 = np.quantile(np.asarray(times_ms), [0.2, 0.5, 0.8])
    return {"median": float(p50), "p20": float(p20), "p80": float(p80), "blocks": len(times_ms)}


def markdown_table(rows: list[dict], names: list[str]) -> str:
    """One line per (shape, mode): each provider's median ms and its speed-up vs python_ref."""
    by_key = {(r["shape"], r["mode"], r["provider"]): float(r["median"]) for r in rows}
    keys = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows))
    header = ["shape (N x D)", "mode"]
    for p in names:
        header.append(f"{p} median ms")
        if p != BASELINE:
            header.append(f"{p} speed-up")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for shape, mode in keys:
        ref = by_key.get((shape, mode, BASELINE))
        cells = [shape, mode]
        for p in names:
            t = by_key.get((shape, mode, p))
            cells.append("" if t is None else f"{t:.3f}")
            if p != BASELINE:
                cells.append("" if t is None or ref is None else f"{ref / t:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the grid, print progress and the table; returns the path of the CSV written."""
    ap = argparse.ArgumentParser(prog="python -m bench.run_cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"CSV directory (default: {RESULTS})")
    ap.add_argument("--shapes", type=parse_shapes, default=None, help="NxD list (default: 256x2048,512x2048)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,full")
    ap.add_argument("--providers", default=None, help="comma-separated subset (default: all available)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument(
        "--min-run-time", type=float, default=None, help="seconds per point and round (default 1)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny grid (32x64) and 0.05 s per point: smoke test")
    args = ap.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or list(QUICK_SHAPES if args.quick else SHAPES)
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 1.0)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1 or min_run_time <= 0:
        ap.error(f"--rounds must be >= 1 and --min-run-time > 0, got {rounds} and {min_run_time}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        ap.error(f"--modes must be a subset of {list(MODES)}, got {args.modes!r}")
    available = providers()
    chosen = available if args.providers is None else [p.strip() for p in args.providers.split(",")]
    missing = [p for p in chosen if p not in available]
    if missing:
        ap.error(f"--providers {missing} not available here (available: {available})")
    dtype = DTYPES[args.dtype]

    device, torch_v, triton_v = cpu_model(), torch.__version__, triton_version()
    label = device_label()
    start = dt.datetime.now(dt.timezone.utc)
    print(
        f"device: {device} ({label}); torch {torch_v}; triton {triton_v or '-'}; {start:%Y-%m-%d %H:%M} UTC"
    )
    print(
        f"op {OP} (channel mode, T = 4), dtype {args.dtype}, {rounds} interleaved rounds of "
        f"{min_run_time} s per point"
    )

    # Providers are interleaved over rounds so that drift of a shared machine hits all alike.
    grid = [(shape, mode, p) for shape in shapes for mode in modes for p in chosen]
    times: dict[tuple, list[float]] = {key: [] for key in grid}
    for rnd in range(rounds):
        for i, key in enumerate(grid, 1):
            (N, D), mode, provider = key
            fn = make_iter_norm(provider, N, D, dtype, mode)
            ts = measure(fn, min_run_time)
            del fn
            times[key].extend(ts)
            print(
                f"[round {rnd + 1}/{rounds}, {i:2d}/{len(grid)}] {provider:>10s} {mode:>4s} {N}x{D}: "
                f"median {np.median(ts):9.3f} ms over {len(ts)} blocks",
                flush=True,
            )
    rows = []
    for key in grid:
        (N, D), mode, provider = key
        r = summarize(times[key])
        shape = f"{N}x{D}"
        rows.append(
            {
                "op": OP,
                "provider": provider,
                "mode": mode,
                "shape": shape,
                "dtype": args.dtype,
                "median": f"{r['median']:.4f}",
                "p20": f"{r['p20']:.4f}",
                "p80": f"{r['p80']:.4f}",
                "unit": "ms",
                "peak_mem_mb": "",
                "device": device,
                "torch": torch_v,
                "triton": triton_v,
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )

    caption = f"{OP}, {args.dtype}, {device} ({label}); speed-up = {BASELINE} median / provider median"
    table = markdown_table(rows, chosen)
    print()
    print(caption)
    print(table)

    path = write_report(args.out / f"{label}-{start:%Y%m%d}.csv", rows, f"{caption}\n\n{table}")
    md = path.with_suffix(".md")
    print(f"\nwrote {path} and {md.name}")
    return str(path)


if __name__ == "__main__":
    main()
