"""Benchmark results (the long-format CSV of bench.harness) → markdown table and PNG plots.

    python -m bench.plot bench/results/cpu-2threads-20261123.csv [more.csv ...]

For ``<stem>.csv`` writes ``<stem>.md`` (one table per op and dtype: rows shape × mode,
a column per provider with ``median ms (speed-up)``, speed-up = the op's baseline median /
the provider's median from the same CSV; the device named in every table's caption; peak
memory (GPU) and minor page faults per call (CPU) where measured; the goals of
``bench.goals``) and ``<stem>-<op>.png`` (speed-up against the baseline per shape, one panel
per dtype and mode). Without matplotlib only the markdown is written, and the command says
so.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from bench.goals import ratio_text, summarize_goals, verdict
from bench.providers import BASELINE, PROVIDERS, T_CHANNEL

NO_MATPLOTLIB = (
    "bench.plot: matplotlib is not installed: wrote the markdown table only "
    "(pip install matplotlib for the plots)"
)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _providers(rows: list[dict], op: str) -> list[str]:
    """Providers in the rows of ``op``: the baseline first, then PROVIDERS order."""
    present = {r["provider"] for r in rows}
    order = [BASELINE[op]] + [p for p in PROVIDERS if p != BASELINE[op]]
    return [p for p in order if p in present]


def _caption(rows: list[dict]) -> str:
    r = rows[0]
    triton = f", triton {r['triton']}" if r["triton"] else ""
    return f"{r['device']} (torch {r['torch']}{triton})"


def _op_table(rows: list[dict], op: str) -> list[str]:
    names = _providers(rows, op)
    median = {(r["shape"], r["mode"], r["provider"]): float(r["median"]) for r in rows}
    keys = _ordered((r["shape"], r["mode"]) for r in rows)
    lines = [
        "| shape | mode | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for shape, mode in keys:
        base = median.get((shape, mode, BASELINE[op]))
        cells = []
        for p in names:
            t = median.get((shape, mode, p))
            if t is None:
                cells.append("")
            else:
                cells.append(f"{t:.4g} ({base / t:.2f}x)" if base else f"{t:.4g}")
        lines.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    for column, title in (
        ("peak_mem_mb", "Peak memory above the inputs, MB"),
        ("faults_per_call", "Minor page faults per call (fresh 4 KiB pages of temporaries)"),
    ):
        # .get: CSVs written before a column existed lack it
        values = {(r["shape"], r["mode"], r["provider"]): r.get(column) for r in rows if r.get(column)}
        if not values:
            continue
        lines += ["", f"{title} ({_caption(rows)}):", ""]
        lines += ["| shape | mode | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
        for shape, mode in keys:
            lines.append(
                f"| {shape} | {mode} | " + " | ".join(values.get((shape, mode, p), "") for p in names) + " |"
            )
    if op == "newton":
        for r in sorted({int(s) for s, _ in keys}):
            saved = (2 * T_CHANNEL - 1) * r * r * 4 / 2**20
            lines += [
                "",
                f"r = {r}: the forward saves P_1..P_T and P_1²..P_(T-1)², {saved:.3g} MB per group; "
                "recomputing them instead would add the Newton time above to the backward.",
            ]
    return lines


def markdown(rows: list[dict], goals: dict[str, dict], note: str = "") -> str:
    """Tables of one result CSV (rows as read by ``read_csv``) and its goals."""
    if not rows:
        return "No results."
    out = [f"Benchmark results: {_caption(rows)}, {rows[0]['timestamp'][:10]}."]
    if note:
        out.append(f"Note: {note}")
    out.append(
        "Cells: median ms (speed-up = the op's baseline median / the provider's median, same run). "
        "Modes: fwd = forward, bwd = backward of a recorded forward, full = forward + backward."
    )
    for op in _ordered(r["op"] for r in rows):
        for dtype in _ordered(r["dtype"] for r in rows if r["op"] == op):
            sub = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
            out += ["", f"**{op}**, {dtype}, baseline {BASELINE[op]}; {_caption(sub)}:", ""]
            out += _op_table(sub, op)
    measured = {k: g for k, g in goals.items() if g["met"] is not None}
    if measured:
        out += ["", f"Goals ({_caption(rows)}; ratio = baseline median / provider median, same run):", ""]
        out += [
            "| goal | what | op | shape | dtype | mode | ratio | goal | verdict |",
            "|---|---|---|---|---|---|---:|---:|---|",
        ]
        for k, g in measured.items():
            out.append(
                f"| {k} | {g['what']} | {g['op']} | {g['shape']} | {g['dtype']} | {g['mode']} | "
                f"{ratio_text(g)} | {g['goal']:.2f}x | {verdict(g)} |"
            )
    missing = [k for k, g in goals.items() if g["met"] is None]
    if measured and missing:
        out += ["", "Not measured in this run: " + ", ".join(missing) + "."]
    return "\n".join(out)


def plots(rows: list[dict], stem: Path) -> list[Path]:
    """One PNG per op, ``<stem>-<op>.png``; [] (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
    except ImportError:
        print(NO_MATPLOTLIB, file=sys.stderr)
        return []
    times = FuncFormatter(lambda v, _: f"{v:.3g}x")
    written = []
    for op in _ordered(r["op"] for r in rows):
        sub = [r for r in rows if r["op"] == op]
        dtypes = _ordered(r["dtype"] for r in sub)
        modes = _ordered(r["mode"] for r in sub)
        fig, axes = plt.subplots(
            len(dtypes), len(modes), figsize=(4.5 * len(modes), 3.6 * len(dtypes)), squeeze=False
        )
        for i, dtype in enumerate(dtypes):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                cell = [r for r in sub if r["dtype"] == dtype and r["mode"] == mode]
                shapes = _ordered(r["shape"] for r in cell)
                median = {(r["shape"], r["provider"]): float(r["median"]) for r in cell}
                for p in _providers(cell, op):
                    xs, ys = [], []
                    for k, s in enumerate(shapes):
                        base, t = median.get((s, BASELINE[op])), median.get((s, p))
                        if base and t:
                            xs.append(k)
                            ys.append(base / t)
                    ax.plot(xs, ys, marker="o", label=p, linestyle="--" if p == BASELINE[op] else "-")
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 7.0)))
                ax.yaxis.set_minor_locator(NullLocator())
                ax.yaxis.set_major_formatter(times)
                ax.tick_params(axis="y", labelsize=7)
                ax.set_xticks(range(len(shapes)), shapes, rotation=45, ha="right", fontsize=7)
                ax.set_title(f"{dtype}, {mode}", fontsize=9)
                ax.set_ylabel(f"speed-up vs {BASELINE[op]}", fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(f"{op}: {_caption(sub)}, {sub[0]['timestamp'][:10]}", fontsize=10)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report(csv_path: Path, note: str | None = None) -> list[Path]:
    """Writes ``<stem>.md`` and the PNGs for one result CSV; returns the paths written.

    The note, unless given, comes from the goals JSON beside the CSV (``<stem>-goals.json``)
    when present; the goals are recomputed from the CSV, with the per-round ratios the JSON
    keeps (the CSV has no rounds).
    """
    csv_path = Path(csv_path)
    rows = read_csv(csv_path)
    meta_path = csv_path.with_name(csv_path.stem + "-goals.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if note is None:
        note = meta.get("note", "")
    goals = summarize_goals(rows)
    for name, saved in meta.get("goals", {}).items():
        if name in goals and goals[name]["ratio"] is not None and saved.get("ratio_rounds"):
            goals[name]["ratio_rounds"] = saved["ratio_rounds"]
    md = csv_path.with_suffix(".md")
    md.write_text(markdown(rows, goals, note) + "\n")
    return [md, *plots(rows, csv_path.with_suffix(""))]


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    ap.add_argument(
        "csv", nargs="+", type=Path, help="result CSV(s) written by bench.run_cpu / bench.run_gpu"
    )
    args = ap.parse_args(argv)
    written = []
    for path in args.csv:
        if not path.is_file():
            ap.error(f"csv: no such file {str(path)!r}")
        written += report(path)
    print("wrote " + ", ".join(map(str, written)))
    return written


if __name__ == "__main__":
    main()
