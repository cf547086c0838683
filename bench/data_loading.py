"""Data loading throughput: the torch loader against the DALI loader (``--loader dali``).

    python -m bench.data_loading [--images 256] [--batch 32] [--rounds 5] [--cores 1]
                                 [--recipes byol,multicrop] [--device cpu|cuda]
                                 [--hw-decoder-load 0.65] [--data DIR] [--note TEXT] [--out DIR]

A generated ImageFolder of JPEGs (``--images`` of 500×375, the median ImageNet size, written
by PIL at quality 90 with fixed seeds: a colour gradient, shapes, blur and a noise texture,
about 90 KB each; kept in ``--data`` when given) is loaded once per round by each loader and
recipe, in rounds that interleave them (the order of the loaders alternates from round to
round), so that drift of a shared machine hits all alike:

- ``torch``: ``ViewDataset`` + DataLoader with no worker process (PIL and torchvision in this
  process), as ``--workers 0``;
- ``dali``: ``DaliLoader`` with DALI's CPU operators, its parameters drawn in this process
  (``--workers 0``), ``--cores`` DALI threads, hue as PIL shifts it (the default);
- ``dali-yiq``: the same with ``--dali-hue yiq`` (DALI's own hue operator, faster on a CPU);
- with ``--device cuda`` also ``dali-gpu``: ``mixed`` decode (``--hw-decoder-load``) and every
  operator on the GPU, the batches delivered on the GPU.

Recipes: ``byol`` (the two views of INTL Table A at 224 px) and ``multicrop`` (the six crops
of Table B). The process is pinned to ``--cores`` CPUs (``os.sched_setaffinity``; torch runs
one thread per core), so images/s per core is images/s / cores. Each epoch is timed by the
wall clock and by the process's CPU time (every thread, DALI's included); a warm-up epoch per
loader and recipe comes first (pipeline build, caches). Reported: images/s, CPU seconds per
image, CPU cores used (CPU time / wall time), and per round the ratio of the DALI loader's
images/s to the torch loader's, from this one run, with the machine's load average at the start
and the end (a shared machine's other work shows there). Writes
``<out>/data-loading-<device label>-<yyyymmdd>.csv`` (long format: one row per loader, recipe
and round, with the device name, versions and timestamp) and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.metadata
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from bench.harness import RESULTS, cpu_model, device_label

RECIPES = {"byol": False, "multicrop": True}
CSV_COLUMNS = [
    "bench", "recipe", "loader", "round", "images", "batch", "cores", "wall_s", "cpu_s", "images_per_s",
    "images_per_s_per_core", "cpu_ms_per_image", "cores_used", "device", "torch", "torchvision", "dali",
    "pillow", "timestamp",
]  # fmt: skip


# ---------------------------------------------------------------------------- data


def synthetic_image(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """An RGB image with some of the statistics of a photograph: a colour gradient, 8-19 filled
    shapes, a slight blur, a smooth noise texture and pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = ((xx * np.cos(angle) + yy * np.sin(angle)) / (width + height) + 0.5).clip(0, 1)[..., None]
    image = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 20))):
        x0, y0 = rng.uniform(-0.1 * width, width), rng.uniform(-0.1 * height, height)
        x1, y1 = x0 + rng.uniform(0.04, 0.5) * width, y0 + rng.uniform(0.05, 0.55) * height
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            dx, dy = rng.uniform(-0.15, 0.15, 2) * (width, height)
            draw.polygon([(x0, y0), (x1, y0 + dy), (x0 + dx, y1)], fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5))).astype(np.float32)
    coarse = (
        rng.normal(128, 40, (max(2, height * 2 // 3), max(2, width * 2 // 3))).clip(0, 255).astype(np.uint8)
    )
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.float32)
    pixels += 0.45 * (texture - 128)[..., None] + rng.normal(0, 8, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_jpeg_folder(
    root: Path,
    images: int,
    classes: int = 4,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
    split="train",
) -> Path:
    """``root/split/class<k>/<i>.jpg``: ``images`` synthetic JPEGs (quality 90) in ``classes``
    folders, the same files for the same arguments. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / split / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        synthetic_image(rng, *size).save(folder / f"{i:05d}.jpg", quality=90)
    return root


# ---------------------------------------------------------------------------- timing


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def dali_version() -> str:
    for dist in ("nvidia-dali-cuda130", "nvidia-dali-cuda120"):
        if _version(dist):
            return _version(dist)
    return ""


def make_loaders(root: Path, recipe: str, batch: int, cores: int, device: str, hw_load: float) -> dict:
    """The loaders compared for one recipe: name → an iterable of batches (one epoch each)."""
    from train import data as tdata

    source = tdata.open_source(str(root), "train")
    specs = tdata.pretrain_specs(224, RECIPES[recipe], False)
    dataset = tdata.ViewDataset(source, specs)
    sampler = tdata.ResumableSampler(dataset, 1, 0, batch, seed=0)
    from train.dali import DaliLoader

    loaders = {
        "torch": tdata.make_view_loader(
            "torch", dataset, batch, 0, torch.device("cpu"), sampler, drop_last=True
        ),
        "dali": DaliLoader(source, specs, batch, sampler, drop_last=True, threads=cores),
        "dali-yiq": DaliLoader(source, specs, batch, sampler, drop_last=True, threads=cores, hue="yiq"),
    }
    if device == "cuda":
        loaders["dali-gpu"] = DaliLoader(
            source,
            specs,
            batch,
            sampler,
            drop_last=True,
            threads=cores,
            device="cuda",
            hw_decoder_load=hw_load,
        )
    return {"sampler": sampler, **loaders}


def time_epoch(loader, sampler, epoch: int, cuda: bool) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of the process) of one epoch."""
    sampler.set_epoch(epoch)
    n = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for views, _, _ in loader:
        n += views[0].shape[0]
    if cuda:
        torch.cuda.synchronize()
    return n, time.perf_counter() - wall, time.process_time() - cpu


def run(
    root: Path, recipes: list[str], batch: int, rounds: int, cores: int, device: str, hw_load: float
) -> list[dict]:
    """Rows of ``CSV_COLUMNS`` (without the environment columns), rounds interleaved."""
    built = {r: make_loaders(root, r, batch, cores, device, hw_load) for r in recipes}
    for r, loaders in built.items():  # warm-up epoch: pipeline builds, file cache, first allocations
        for name, loader in loaders.items():
            if name != "sampler":
                time_epoch(loader, loaders["sampler"], 0, name == "dali-gpu")
                print(f"warm-up {r} {name} done", flush=True)
    rows = []
    for k in range(1, rounds + 1):
        for r, loaders in built.items():
            names = [n for n in loaders if n != "sampler"]
            for name in names[k % len(names) :] + names[: k % len(names)]:  # rotating order
                n, wall, cpu = time_epoch(loaders[name], loaders["sampler"], k, name == "dali-gpu")
                rows.append(
                    {
                        "bench": "data_loading",
                        "recipe": r,
                        "loader": name,
                        "round": k,
                        "images": n,
                        "batch": batch,
                        "cores": cores,
                        "wall_s": round(wall, 4),
                        "cpu_s": round(cpu, 4),
                        "images_per_s": round(n / wall, 2),
                        "images_per_s_per_core": round(n / wall / cores, 2),
                        "cpu_ms_per_image": round(1e3 * cpu / n, 3),
                        "cores_used": round(cpu / wall, 3),
                    }
                )
                print(
                    f"round {k} {r:9s} {name:8s} {n / wall:7.1f} images/s, {1e3 * cpu / n:6.2f} CPU ms/image",
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------------------- report


def summarize(rows: list[dict]) -> tuple[dict, dict]:
    """Per (recipe, loader): medians; per recipe and DALI loader: the ratio to torch per round."""
    med: dict = {}
    for key in sorted({(r["recipe"], r["loader"]) for r in rows}):
        sel = [r for r in rows if (r["recipe"], r["loader"]) == key]
        med[key] = {
            k: statistics.median(r[k] for r in sel)
            for k in ("images_per_s", "images_per_s_per_core", "cpu_ms_per_image", "cores_used")
        }
    ratios: dict = {}
    for recipe, loader in med:
        if loader == "torch":
            continue
        per_round = []
        for k in sorted({r["round"] for r in rows}):
            a = [r for r in rows if (r["recipe"], r["loader"], r["round"]) == (recipe, loader, k)]
            b = [r for r in rows if (r["recipe"], r["loader"], r["round"]) == (recipe, "torch", k)]
            if a and b:
                per_round.append(a[0]["images_per_s"] / b[0]["images_per_s"])
        cpu_ratio = med[(recipe, "torch")]["cpu_ms_per_image"] / med[(recipe, loader)]["cpu_ms_per_image"]
        ratios[(recipe, loader)] = {
            "median": statistics.median(per_round),
            "min": min(per_round),
            "max": max(per_round),
            "per_round": per_round,
            "cpu_ratio": cpu_ratio,
        }
    return med, ratios


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    med, ratios = summarize(rows)
    out = [
        f"Data loading, {meta['images']} generated 500x375 JPEGs, batch {meta['batch']}, {meta['cores']} "
        f"core(s) of {meta['device']} (torch {meta['torch']}, torchvision {meta['torchvision']}, "
        f"DALI {meta['dali']}, Pillow {meta['pillow']}), {meta['date']}.",
        "",
        f"{meta['rounds']} interleaved rounds of one epoch per loader and recipe after a warm-up epoch "
        "(the loaders' order rotates from round to round); medians over the rounds; ratios from this one "
        "run (per round: the DALI loader's images/s over the torch loader's in the same round). "
        "`dali`: hue as PIL shifts it (the default, as the torch loader); `dali-yiq`: `--dali-hue yiq`.",
        "",
        f"Load average (1 min) at the start {meta['load_start']:.2f}, at the end {meta['load_end']:.2f}, "
        f"on a machine with {meta['cpus']} CPUs.",
        "",
        "| recipe | loader | images/s | images/s per core | CPU ms / image | CPU cores used |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (recipe, loader), m in med.items():
        out.append(
            f"| {recipe} | {loader} | {m['images_per_s']:.1f} | {m['images_per_s_per_core']:.1f} | "
            f"{m['cpu_ms_per_image']:.2f} | {m['cores_used']:.2f} |"
        )
    out += [
        "",
        "| recipe | ratio | images/s, median of rounds | per round (min - max) | images per CPU second |",
        "|---|---|---:|---:|---:|",
    ]
    for (recipe, loader), r in ratios.items():
        out.append(
            f"| {recipe} | {loader}/torch | {r['median']:.2f}x | {r['min']:.2f} - {r['max']:.2f} | "
            f"{r['cpu_ratio']:.2f}x |"
        )
    out += [
        "",
        "Images per CPU second (the inverse of CPU ms / image) is the per-core throughput whatever share "
        "of its core the process got; images/s also counts the time it waited for the CPU on a busy machine.",
    ]
    out += ["", "Images/s of each round:", "", "| round | " + " | ".join(f"{a} {b}" for a, b in med) + " |"]
    out.append("|---|" + "---:|" * len(med))
    for k in sorted({r["round"] for r in rows}):
        cells = []
        for key in med:
            sel = [r for r in rows if (r["recipe"], r["loader"], r["round"]) == (*key, k)]
            cells.append(f"{sel[0]['images_per_s']:.1f}" if sel else "")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    if meta.get("note"):
        out += ["", f"Note: {meta['note']}"]
    path.write_text("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m bench.data_loading", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="generated JPEGs (default 256)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--cores", type=int, default=1, help="CPUs the process is pinned to (default 1)")
    ap.add_argument("--recipes", default="byol,multicrop", help="comma-separated: byol, multicrop")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: also the GPU pipeline")
    ap.add_argument(
        "--hw-decoder-load",
        type=float,
        default=0.65,
        help="--device cuda: share of the JPEGs for the GPU's hardware decoder (default 0.65)",
    )
    ap.add_argument(
        "--data", type=Path, default=None, help="keep the generated JPEGs here (default: a temp dir)"
    )
    ap.add_argument("--note", default="", help="a remark stored with the results (e.g. 'shared machine')")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"result directory (default: {RESULTS})")
    args = ap.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    if not recipes or any(r not in RECIPES for r in recipes):
        ap.error(f"--recipes: a comma-separated subset of {', '.join(RECIPES)}, got {args.recipes!r}")
    if args.images < args.batch or args.batch < 1 or args.rounds < 1:
        ap.error("--batch and --rounds must be >= 1 and --images >= --batch")
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= args.cores <= len(available):
        ap.error(
            f"--cores must be in [1, {len(available)}] (the CPUs this process may use), got {args.cores}"
        )
    if not 0.0 <= args.hw_decoder_load <= 1.0:
        ap.error(f"--hw-decoder-load must be in [0, 1], got {args.hw_decoder_load}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    from train.dali import require_dali

    require_dali()
    os.sched_setaffinity(0, available[: args.cores])
    torch.set_num_threads(args.cores)

    start = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()[0]
    device = f"{cpu_model()}, {args.cores} core(s)"
    if args.device == "cuda":
        device += f", {torch.cuda.get_device_name()}"
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp) / "jpegs"
        if not (root / "train").is_dir():
            print(f"writing {args.images} JPEGs to {root} ...", flush=True)
            write_jpeg_folder(root, args.images)
        rows = run(root, recipes, args.batch, args.rounds, args.cores, args.device, args.hw_decoder_load)
    meta = {
        "device": device,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dali": dali_version(),
        "pillow": _version("pillow"),
        "timestamp": start.isoformat(timespec="seconds"),
        "date": f"{start:%Y-%m-%d}",
        "images": args.images,
        "batch": args.batch,
        "cores": args.cores,
        "rounds": args.rounds,
        "note": args.note,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    for row in rows:
        row.update({k: meta[k] for k in ("device", "torch", "torchvision", "dali", "pillow", "timestamp")})
    args.out.mkdir(parents=True, exist_ok=True)
    label = f"cpu-{args.cores}core" if args.device == "cpu" else device_label("cuda")
    stem = args.out / f"data-loading-{label}-{start:%Y%m%d}"
    csv_path = stem.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(stem.with_suffix(".md"), meta, rows)
    for (recipe, loader), r in summarize(rows)[1].items():
        print(f"{recipe} {loader}/torch: {r['median']:.2f}x (rounds {r['min']:.2f} - {r['max']:.2f})")
    print(f"wrote {csv_path} and {stem.with_suffix('.md')}")
    return csv_path


if __name__ == "__main__":
    main()
