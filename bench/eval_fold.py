"""Eval throughput of ResNet-50 on the CPU: IterNorm folded by ``fold_iternorm`` against BatchNorm.

    python -m bench.eval_fold [--batch 32] [--image-size 224] [--rounds 5] [--min-run-time 1.0]
                              [--threads N] [--note TEXT] [--out DIR]

Providers, all built from one ``torchvision.models.resnet50()`` (the same conv weights):

- ``batchnorm``: the torchvision model in eval mode;
- ``batchnorm_folded``: BatchNorm folded into the convolutions (``torch.fx.experimental.optimization.fuse``,
  what BatchNorm users deploy);
- ``iternorm``: ``convert_batchnorm`` of it (53 IterNorm layers, groups of 64 channels, T = 5), eval mode;
- ``iternorm_folded``: that model after ``fold_iternorm`` (every IterNorm folded).

The BatchNorm and IterNorm models get running statistics from two train-mode passes on random
(4, 3, 64, 64) batches first. Each provider runs one float32 forward of a random
(batch, 3, size, size) input under ``torch.inference_mode``, timed by
``torch.utils.benchmark.Timer.blocked_autorange`` after one warm-up call, in rounds that
interleave the providers (drift of a shared machine hits all alike), as ``bench.harness`` does.
Medians and percentiles are over the per-call times of all rounds; ratios (a provider's median
over ``batchnorm``'s, and per round) come from this one run. Writes
``<out>/<device label>-<yyyymmdd>-eval-fold.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import torch
import torch.utils.benchmark as benchmark
from torch import nn

import intl_kernels as ik
from bench.harness import RESULTS, device_label, device_name

PROVIDERS = ("batchnorm", "batchnorm_folded", "iternorm", "iternorm_folded")
BASELINE = "batchnorm"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _update_running_stats(model: nn.Module, passes: int = 2) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(4, 3, 64, 64))
    model.eval()


def build_models(seed: int = 0) -> tuple[dict[str, nn.Module], dict]:
    """The four providers' models (eval mode) and facts about them (layer counts, fold check)."""
    import torchvision
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(seed)
    base = torchvision.models.resnet50()
    iternorm = ik.convert_batchnorm(copy.deepcopy(base), num_channels=64, T=5)
    _update_running_stats(base)
    _update_running_stats(iternorm)
    bn_folded = fuse(copy.deepcopy(base))
    in_folded = ik.fold_iternorm(copy.deepcopy(iternorm))
    models = {
        "batchnorm": base,
        "batchnorm_folded": bn_folded,
        "iternorm": iternorm,
        "iternorm_folded": in_folded,
    }

    def count(m, kind):
        return sum(isinstance(x, kind) for x in m.modules())

    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        y_in, y_fold = iternorm(x), in_folded(x)
        y_bn, y_bnf = base(x), bn_folded(x)

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    facts = {
        "iternorm_layers": count(iternorm, ik.IterNorm),
        "iternorm_layers_after_fold": count(in_folded, ik.IterNorm),
        "batchnorm_layers": count(base, nn.BatchNorm2d),
        "batchnorm_layers_after_fuse": count(bn_folded, nn.BatchNorm2d),
        "check_input": [2, 3, 64, 64],
        "iternorm_folded_vs_iternorm_rel_max_err": rel(y_fold, y_in),
        "batchnorm_folded_vs_batchnorm_rel_max_err": rel(y_bnf, y_bn),
    }
    return models, facts


def measure(fn, min_run_time: float) -> list[float]:
    """Per-call times (ms), one per block of ``blocked_autorange``, after one warm-up call."""
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return [1e3 * t for t in timer.blocked_autorange(min_run_time=min_run_time).times]


def run(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, min_run_time: float):
    """{provider: per-call ms of all rounds}, {provider: [median ms of each round]}."""
    times = {p: [] for p in models}
    per_round = {p: [] for p in models}
    for rnd in range(rounds):
        for p, model in models.items():

            def fn(model=model):
                with torch.inference_mode():
                    model(x)

            t = measure(fn, min_run_time)
            times[p].extend(t)
            per_round[p].append(float(np.median(t)))
            print(
                f"round {rnd + 1}/{rounds} {p:>16s}: {per_round[p][-1]:9.2f} ms ({len(t)} blocks)", flush=True
            )
    return times, per_round


def summarize(times, per_round, batch: int) -> tuple[dict, dict]:
    providers, ratios = {}, {}
    for p, t in times.items():
        median, p20, p80 = (float(v) for v in np.quantile(np.asarray(t), [0.5, 0.2, 0.8]))
        providers[p] = {
            "median_ms": median,
            "p20_ms": p20,
            "p80_ms": p80,
            "images_per_s": 1e3 * batch / median,
            "round_medians_ms": per_round[p],
            "blocks": len(t),
        }
    base = providers[BASELINE]["median_ms"]
    pairs = [(p, BASELINE) for p in times if p != BASELINE] + [("iternorm_folded", "batchnorm_folded")]
    pairs.append(("iternorm_folded", "iternorm"))
    for num, den in pairs:
        if num in providers and den in providers:
            r = [a / b for a, b in zip(per_round[num], per_round[den], strict=True)]
            ratios[f"{num}/{den}"] = {
                "median_ratio": providers[num]["median_ms"] / providers[den]["median_ms"],
                "per_round": r,
            }
    for p in providers.values():
        p["time_vs_batchnorm"] = p["median_ms"] / base
    return providers, ratios


def write_markdown(path: Path, meta: dict) -> None:
    lines = [
        f"Eval throughput, {meta['model']} {tuple(meta['input_shape'])} float32, "
        f"{meta['device']} (torch {meta['torch']}, torchvision {meta['torchvision']}), {meta['date']}.",
        "",
        f"{meta['rounds']} interleaved rounds, blocked_autorange(min_run_time={meta['min_run_time']} s) "
        "each; median and p20/p80 over the per-call times of all rounds; ratios from this one run.",
        "",
        "| provider | median ms | p20 ms | p80 ms | images/s | time / batchnorm |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p, s in meta["providers"].items():
        lines.append(
            f"| {p} | {s['median_ms']:.1f} | {s['p20_ms']:.1f} | {s['p80_ms']:.1f} | "
            f"{s['images_per_s']:.1f} | {s['time_vs_batchnorm']:.3f}x |"
        )
    lines += ["", "| ratio (time) | of medians | per round (min - max) |", "|---|---:|---:|"]
    for name, r in meta["ratios"].items():
        lines.append(
            f"| {name} | {r['median_ratio']:.3f} | {min(r['per_round']):.3f} - {max(r['per_round']):.3f} |"
        )
    names = list(meta["providers"])
    lines += ["", "Median ms of each round (the drift of the shared machine):", ""]
    lines += ["| round | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i in range(meta["rounds"]):
        cells = " | ".join(f"{meta['providers'][p]['round_medians_ms'][i]:.1f}" for p in names)
        lines.append(f"| {i + 1} | {cells} |")
    f = meta["facts"]
    lines += [
        "",
        f"IterNorm layers: {f['iternorm_layers']} before folding, {f['iternorm_layers_after_fold']} after; "
        f"BatchNorm layers: {f['batchnorm_layers']} before fusing, {f['batchnorm_layers_after_fuse']} after.",
        f"Folded vs unfolded IterNorm model, input {tuple(f['check_input'])}: relative max error "
        f"{f['iternorm_folded_vs_iternorm_rel_max_err']:.2e} (BatchNorm fused vs not: "
        f"{f['batchnorm_folded_vs_batchnorm_rel_max_err']:.2e}).",
    ]
    if meta["note"]:
        lines += ["", f"Note: {meta['note']}"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m bench.eval_fold", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--image-size", type=int, default=224, help="input height and width (default 224)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument(
        "--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange (default 1)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--note", default="", help="a remark stored with the results (e.g. 'shared machine')")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"result directory (default: {RESULTS})")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.image_size < 32 or args.rounds < 1 or args.min_run_time <= 0:
        ap.error("--batch and --rounds must be >= 1, --image-size >= 32, --min-run-time > 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    start = dt.datetime.now(dt.timezone.utc)
    name, label = device_name("cpu"), device_label("cpu")
    shape = (args.batch, 3, args.image_size, args.image_size)
    print(f"device: {name}; torch {torch.__version__}; input {shape}; {start:%Y-%m-%d %H:%M} UTC", flush=True)
    models, facts = build_models()
    torch.manual_seed(1)
    x = torch.randn(shape)
    times, per_round = run(models, x, args.rounds, args.min_run_time)
    providers, ratios = summarize(times, per_round, args.batch)
    meta = {
        "device": name,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "date": f"{start:%Y-%m-%d}",
        "timestamp": start.isoformat(timespec="seconds"),
        "model": "resnet50",
        "input_shape": list(shape),
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "min_run_time": args.min_run_time,
        "baseline": BASELINE,
        "note": args.note,
        "facts": facts,
        "providers": providers,
        "ratios": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{label}-{start:%Y%m%d}-eval-fold"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    write_markdown(stem.with_suffix(".md"), meta)
    for k, r in ratios.items():
        print(f"{k}: {r['median_ratio']:.3f}")
    print(f"wrote {json_path} and {stem.with_suffix('.md')}")
    return json_path


if __name__ == "__main__":
    main()
