"""One INTL training step of ResNet-50 and its whitening+loss part (goal P5: the training-step share).

    python -m bench.train_step [--device cuda|cpu] [--arch resnet50] [--batch-size 256] [--image-size 224]
                               [--proj 8192-8192-8192] [--amp bf16|none] [--providers official,triton]
                               [--smoke] [--note TEXT] [--out DIR]

The step: two views of synthetic images made on the device, torchvision ResNet-50 (fc
removed) and the INTL projector (Linear without bias + BatchNorm1d + ReLU per hidden
layer, last Linear with bias) under bf16 autocast, channels_last on GPU, the INTL loss,
backward and an SGD step (momentum 0.9). The loss part: the loss's forward + backward on
the step's embeddings, under the same autocast. Loss providers: ``official`` (each view
whitened by the INTL authors' formulation, ``bench.providers.official_iter_norm``, with
the paper's norm_mse and trace loss from ``python_ref``) and ours
(``intl_kernels.intl_loss`` with that backend, both views in one call).

Timing as bench.harness: ``triton.testing.do_bench`` on GPU (gradients set to None outside
the timed region), ``torch.utils.benchmark`` on CPU. Writes
``<out>/<device label>-<yyyymmdd>-train.csv`` (the harness's columns; op ``train_step`` or
``train_loss``, shape batch×3×H×W), ``-train.json`` with, per provider, the step, the loss
part, the share loss/step and the speed-ups over ``official`` from the same run, and the
table and plots of bench.plot.
``--smoke``: ResNet-18, batch 8 of 32×32 images and a 64-wide projector, a few calls: a
check that the code runs (CPU), not a measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import intl_kernels
from bench import plot
from bench.harness import (
    RESULTS,
    device_label,
    device_name,
    measure_cpu,
    measure_gpu,
    peak_mem_mb,
    quantiles,
    result_row,
    triton_version,
    warm_up_gpu,
    write_csv,
)
from bench.providers import OURS, Case, available, check_provider, official_iter_norm
from python_ref import norm_mse_ref, trace_loss_ref


def official_intl_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The INTL authors' two-view loss: each view whitened on its own (eager), norm_mse + β·trace loss."""
    t1, t2 = official_iter_norm(z1), official_iter_norm(z2)
    beta = (math.log2(z1.shape[0]) - 3) * 0.01
    return norm_mse_ref(t1, t2) + beta * (trace_loss_ref(t1) + trace_loss_ref(t2))


def loss_fn(provider: str):
    if provider == "official":
        return official_intl_loss
    if provider in OURS:
        return lambda z1, z2: intl_kernels.intl_loss(z1, z2, gather_distributed=False, backend=provider)
    raise ValueError(f"provider must be 'official' or one of {list(OURS)}, got {provider!r}")


def parse_proj(text: str) -> list[int]:
    """'8192-8192-8192' → [8192, 8192, 8192]; raises ValueError naming --proj otherwise."""
    try:
        sizes = [int(s) for s in text.split("-")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise ValueError(
            f"--proj: expected layer widths >= 2 joined by '-', e.g. 8192-8192-8192, got {text!r}"
        )
    return sizes


def build_model(arch: str, proj: list[int]) -> nn.Module:
    """torchvision ``arch`` backbone (fc removed) followed by the INTL projector."""
    try:
        from torchvision import models
    except ImportError as e:
        raise RuntimeError("bench.train_step needs torchvision (pip install torchvision)") from e
    backbone = getattr(models, arch)()
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    layers: list[nn.Module] = []
    for hidden in proj[:-1]:
        layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, proj[-1]))
    return nn.Sequential(backbone, *layers)


def make_step(provider: str, model: nn.Module, views, amp: torch.dtype | None) -> tuple[Case, Case]:
    """(the whole step, the loss part on the step's embeddings) as timed cases."""
    device = views[0].device.type
    loss = loss_fn(provider)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    params = list(model.parameters())

    def autocast():
        return torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None)

    def step():
        with autocast():
            value = loss(model(views[0]), model(views[1]))
        value.backward()
        opt.step()

    with torch.no_grad(), autocast():
        z = [model(v).detach().requires_grad_(True) for v in views]

    def loss_part():
        with autocast():
            value = loss(z[0], z[1])
        value.backward()

    return Case(step, params), Case(loss_part, z)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--arch", choices=("resnet18", "resnet50"), default="resnet50")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--proj", default="8192-8192-8192", help="projector widths (default 8192-8192-8192)")
    ap.add_argument("--amp", choices=("bf16", "none"), default="bf16", help="autocast dtype (default bf16)")
    ap.add_argument(
        "--providers", default=None, help="official and ours (default: official + ours that run here)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="ResNet-18, batch 8 of 32x32, 64-wide projector: runs"
    )
    ap.add_argument("--note", default="", help="a remark stored with the results")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"result directory (default: {RESULTS})")
    ap.add_argument(
        "--deadline", type=float, default=None, help="skip providers not started by this time.time() value"
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.smoke:
        args.arch, args.batch_size, args.image_size, args.proj = "resnet18", 8, 32, "64-64-64"
    if args.batch_size < 8 or args.image_size < 32:
        ap.error(
            f"--batch-size must be >= 8 and --image-size >= 32, got {args.batch_size}, {args.image_size}"
        )
    try:
        proj = parse_proj(args.proj)
        if args.providers:
            names = [check_provider(p.strip(), args.device) for p in args.providers.split(",") if p.strip()]
        else:  # cuda whitens at most 128 rows: not a batch of 256
            names = [p for p in available(args.device) if p in ("official", "torch", "cpu", "triton")]
        bad = [p for p in names if p != "official" and p not in OURS]
        if bad:
            raise ValueError(f"--providers: expected 'official' or some of {list(OURS)}, got {bad}")
    except ValueError as e:
        ap.error(str(e))

    device, amp = args.device, torch.bfloat16 if args.amp == "bf16" else None
    name, versions = device_name(device), (torch.__version__, triton_version())
    start = dt.datetime.now(dt.timezone.utc)
    print(f"device: {name}; torch {versions[0]}; triton {versions[1] or '-'}; {start:%Y-%m-%d %H:%M} UTC")
    torch.manual_seed(0)
    layout = torch.channels_last if device == "cuda" else torch.contiguous_format
    model = build_model(args.arch, proj).to(device, memory_format=layout).train()
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    g = torch.Generator(device=device).manual_seed(0)
    views = [
        torch.randn(shape, generator=g, device=device).contiguous(memory_format=layout) for _ in range(2)
    ]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        warm_up_gpu(3.0)
    dtype = "bfloat16" if amp else "float32"
    rows, summary, skipped = [], {}, []
    for provider in names:
        if args.deadline is not None and time.time() >= args.deadline:
            skipped.append(provider)
            print(
                f"{provider:>10s}: SKIPPED (deadline: not started before the time budget ran out)", flush=True
            )
            continue
        step, loss_part = make_step(provider, model, views, amp)
        result = {}
        for op, case in (("train_step", step), ("train_loss", loss_part)):
            if device == "cuda":
                stats, peak, faults = measure_gpu(case, 500, 3000), peak_mem_mb(case), None
            else:
                times, faults = measure_cpu(case, 0.01 if args.smoke else 1.0, 0.0 if args.smoke else 1.0)
                stats, peak = quantiles(times), None
            result[op] = stats[0]
            rows.append(
                result_row(
                    op,
                    provider,
                    "full",
                    "x".join(map(str, shape)),
                    dtype,
                    stats,
                    peak,
                    name,
                    versions,
                    faults,
                )
            )
            print(f"{provider:>10s} {op:>10s}: median {stats[0]:10.3f} ms", flush=True)
        summary[provider] = {
            "step_ms": round(result["train_step"], 4),
            "loss_ms": round(result["train_loss"], 4),
            "share": round(result["train_loss"] / result["train_step"], 4),
        }
    if "official" in summary:
        ref = summary["official"]
        for res in summary.values():
            res["step_speedup_vs_official"] = round(ref["step_ms"] / res["step_ms"], 3)
            res["loss_speedup_vs_official"] = round(ref["loss_ms"] / res["loss_ms"], 3)
    path = write_csv(args.out / f"{device_label(device)}-{start:%Y%m%d}-train.csv", rows)
    meta = {
        "device": name,
        "torch": versions[0],
        "triton": versions[1],
        "date": start.isoformat(timespec="seconds"),
        "step": f"{args.arch} + projector {args.proj}, batch {args.batch_size} x 2 views of "
        f"{args.image_size}x{args.image_size}, autocast {dtype}, SGD",
        "smoke": args.smoke,
        "note": args.note,
        "skipped": {p: "deadline" for p in skipped},
        "P5": summary,
    }
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    for provider, res in summary.items():
        step_ms, loss_ms, share = res["step_ms"], res["loss_ms"], res["share"]
        print(f"P5 {provider}: step {step_ms} ms, whitening+loss {loss_ms} ms, share {share:.1%}")
    written = plot.report(path, note=args.note)
    print("wrote " + ", ".join(str(p) for p in [path, json_path, *written]))
    return path


if __name__ == "__main__":
    main()
