"""CPU benchmark of the IterNorm layer (goal C2): forward and forward+backward of one layer.

    python -m bench.run_layer_cpu [--quick] [--out DIR] [--min-run-time S] [--rounds R]

Shapes (N, C, H, W) = (32, 256, 14, 14) and (32, 64, 56, 56), 64 channels per group,
T = 5, float32, training mode. Providers: ``iternorm_ref`` (the IterNorm authors' layer in
eager PyTorch: ``python_ref.IterNormRef``, permute copies, ``matrix_power``, autograd
backward), ``torch`` and ``cpu`` (``intl_kernels.IterNorm`` on that backend) and
``batchnorm`` (``nn.BatchNorm2d``, the memory-pass anchor). Inputs are built outside the
timed closure; ``full`` is forward + ``autograd.grad`` against a fixed upstream gradient.
Providers are interleaved over rounds (as bench.run_cpu) and the speed-up is
iternorm_ref median / provider median from the same run. Writes
``<out>/<device>-<yyyymmdd>-layer.csv`` (bench.run_cpu's columns), a markdown table and
``-layer-goals.json`` (C2: ratio >= 2 for both shapes).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import torch
from torch import nn

import intl_kernels
from bench.run_cpu import RESULTS, cpu_model, device_label, measure, summarize, triton_version, write_report
from python_ref import IterNormRef

OP = "iternorm_layer"
BASELINE = "iternorm_ref"
SHAPES = ((32, 256, 14, 14), (32, 64, 56, 56))
QUICK_SHAPES = ((4, 16, 6, 6),)
MODES = ("fwd", "full")
GOAL = 2.0


def providers() -> list[str]:
    names = ["iternorm_ref", "torch", "batchnorm"]
    if "cpu" in intl_kernels.available_backends():
        names.insert(1, "cpu")
    return names


def make_layer(provider: str, C: int) -> nn.Module:
    c = min(64, C)
    if provider == "iternorm_ref":
        return IterNormRef(C, num_channels=c)
    if provider == "batchnorm":
        return nn.BatchNorm2d(C)
    return intl_kernels.IterNorm(C, num_channels=c, backend=provider)


def make_closure(provider: str, shape: tuple[int, ...], mode: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    dy = torch.randn(shape, generator=g)
    layer = make_layer(provider, shape[1]).train()
    if mode == "fwd":
        return lambda: layer(x)
    return lambda: torch.autograd.grad(layer(x), x, dy)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.run_layer_cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--min-run-time", type=float, default=None, help="seconds per point and round (default 1)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 0.05 s per point: smoke test")
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    rounds = args.rounds or (1 if args.quick else 3)
    names = providers()
    device, torch_v, triton_v = cpu_model(), torch.__version__, triton_version()
    label = device_label()
    start = dt.datetime.now(dt.timezone.utc)
    print(f"device: {device} ({label}); torch {torch_v}; {start:%Y-%m-%d %H:%M} UTC")
    grid = [(s, m, p) for s in shapes for m in MODES for p in names]
    times: dict[tuple, list[float]] = {k: [] for k in grid}
    for rnd in range(rounds):
        for i, key in enumerate(grid, 1):
            shape, mode, provider = key
            ts = measure(make_closure(provider, shape, mode), min_run_time)
            times[key].extend(ts)
            print(
                f"[round {rnd + 1}/{rounds}, {i:2d}/{len(grid)}] {provider:>12s} {mode:>4s} "
                f"{'x'.join(map(str, shape))}: median {np.median(ts):8.3f} ms",
                flush=True,
            )
    rows, med = [], {}
    for shape, mode, provider in grid:
        r = summarize(times[(shape, mode, provider)])
        label_shape = "x".join(map(str, shape))
        med[(label_shape, mode, provider)] = r["median"]
        rows.append(
            {
                "op": OP, "provider": provider, "mode": mode, "shape": label_shape, "dtype": "float32",
                "median": f"{r['median']:.4f}", "p20": f"{r['p20']:.4f}", "p80": f"{r['p80']:.4f}",
                "unit": "ms", "peak_mem_mb": "", "device": device, "torch": torch_v, "triton": triton_v,
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )  # fmt: skip
    lines = [
        "| shape (N x C x H x W) | mode | provider | median ms | speed-up vs iternorm_ref |",
        "|---|---|---|---:|---:|",
    ]
    goals = {}
    for (shape, mode, provider), t in med.items():
        ratio = med[(shape, mode, BASELINE)] / t
        lines.append(f"| {shape} | {mode} | {provider} | {t:.3f} | {ratio:.2f}x |")
        if mode == "full" and provider == names[1]:  # the backend "auto" picks here (cpu, else torch)
            goals[f"C2-{provider}-{shape}"] = {"ratio": round(ratio, 3), "goal": GOAL, "met": ratio >= GOAL}
    caption = f"IterNorm layer (c = 64, T = 5), float32, training, {device} ({label}), {start:%Y-%m-%d}"
    table = "\n".join(lines)
    print(f"\n{caption}\n{table}\n")
    for name, g in goals.items():
        print(f"{name}: ratio {g['ratio']} (goal >= {g['goal']}): {'met' if g['met'] else 'NOT met'}")
    meta = {"device": device, "torch": torch_v, "date": start.isoformat(timespec="seconds")}
    path = write_report(
        args.out / f"{label}-{start:%Y%m%d}-layer.csv", rows, f"{caption}\n\n{table}", goals, meta
    )
    print(f"wrote {path}")
    return str(path)


if __name__ == "__main__":
    main()
