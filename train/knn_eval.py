"""k-NN evaluation of a frozen backbone: ``intl-knn-eval --data PATH|digits --pretrained FILE``.

Also ``python -m intl_kernels.train.knn_eval`` (installed) or ``python -m train.knn_eval`` (in
a checkout).

Features of the train split (the labelled bank) and the val split (the queries) are
computed once, without augmentation, with the backbone in eval mode. Two classifiers:

- weighted cosine k-NN (k = 20, temperature 0.07; Wu et al. 2018, as in DINO): the k most
  cosine-similar bank features vote for their label with weight exp(sim/T);
- plain Euclidean 5-NN (the INTL paper's CIFAR protocol): majority vote of the 5 nearest
  bank features, a tie going to the tied class whose member is nearest.

The last line printed is one JSON object: ``knn_top1`` (weighted cosine, %), ``k`` (the k
used: ``--k`` clipped to the bank size), ``temperature``, ``metric``, ``euclidean_5nn_top1``
(%), and the sizes used. The same object, with the time and the data folder, is appended
as one line to ``<exp-dir>/knn_eval.jsonl`` (``--exp-dir``: by default the folder of
``--pretrained``, i.e. the pretraining run's exp-dir).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import cli, monitor, runtime
from . import data as tdata
from .cli import UsageError, check_float, check_int
from .models import ARCHS, build_backbone, load_backbone

KNN_EVAL_LOG = "knn_eval.jsonl"


def _check_bank(bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    if bank.dim() != 2 or queries.dim() != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"knn: bank (M, F) and queries (Q, F) must be 2-D with the same F, got {tuple(bank.shape)} "
            f"and {tuple(queries.shape)}"
        )
    if labels.shape != (bank.shape[0],):
        raise ValueError(f"knn: labels must be (M,) = ({bank.shape[0]},), got {tuple(labels.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("knn: the bank is empty")
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")


@torch.no_grad()
def knn_cosine(
    bank: torch.Tensor,
    labels: torch.Tensor,
    queries: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted cosine k-NN predictions.

    Args:
        bank: (M, F) labelled features.
        labels: (M,) int64 labels in [0, C).
        queries: (Q, F) features to classify.
        k: neighbours (clipped to M).
        temperature: vote weight exp(cos/temperature).
        num_classes: C (default: max label + 1).
        chunk: queries per batched similarity product.

    Returns:
        (Q,) int64 predicted labels.
    """
    _check_bank(bank, labels, queries, k)
    if temperature <= 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}")
    c = int(labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, bank.shape[0])
    b = F.normalize(bank.float(), dim=1)
    out = []
    for q in queries.float().split(chunk):
        sim, idx = (F.normalize(q, dim=1) @ b.T).topk(k, dim=1)
        w = ((sim - 1) / temperature).exp()  # exp(sim/T) up to a common factor (no overflow)
        votes = torch.zeros(q.shape[0], c, device=q.device).scatter_add_(1, labels[idx], w)
        out.append(votes.argmax(dim=1))
    return torch.cat(out)


@torch.no_grad()
def knn_euclidean(
    bank: torch.Tensor,
    labels: torch.Tensor,
    queries: torch.Tensor,
    k: int = 5,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Majority vote of the k nearest bank features (Euclidean); a tie goes to the tied class
    whose member is nearest. Shapes as in :func:`knn_cosine`; returns (Q,) int64 labels."""
    _check_bank(bank, labels, queries, k)
    c = int(labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, bank.shape[0])
    b = bank.float()
    out = []
    for q in queries.float().split(chunk):
        d = torch.cdist(q, b, compute_mode="donot_use_mm_for_euclid_dist")
        idx = d.topk(k, dim=1, largest=False).indices  # sorted nearest first
        nb = labels[idx]
        counts = torch.zeros(q.shape[0], c, dtype=torch.int64, device=q.device)
        counts.scatter_add_(1, nb, torch.ones_like(nb))
        best = counts.gather(1, nb) == counts.max(dim=1, keepdim=True).values
        first = best.int().argmax(dim=1)  # the nearest neighbour that belongs to a top class
        out.append(nb.gather(1, first[:, None]).squeeze(1))
    return torch.cat(out)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: tdata.ViewDataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    desc: str = "features",
    progress: bool = True,
    loader: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (eval mode, float32) and labels of a dataset, in dataset order
    (``loader``: ``torch`` or ``dali``, see ``data.make_view_loader``).

    Returns:
        (features (M, F) on ``device``, labels (M,) int64 on ``device``).
    """
    was_training = backbone.training
    backbone.eval()
    batches = tdata.make_view_loader(loader, dataset, batch_size, workers, device)
    bar = monitor.Progress(len(batches), 0, desc, progress, leave=False)
    feats, labels = [], []
    try:
        for views, y, _ in batches:
            x = views[0].to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=False):
                feats.append(backbone(x).float())
            labels.append(y.to(device))
            bar.update(1)
    finally:
        bar.close()
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracies(
    backbone: nn.Module,
    bank: tdata.ViewDataset,
    queries: tdata.ViewDataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    k: int = 20,
    temperature: float = 0.07,
    progress: bool = True,
    loader: str = "torch",
) -> dict:
    """Top-1 (%) of the weighted cosine k-NN and the Euclidean 5-NN of ``queries`` against ``bank``.

    ``k`` larger than the bank is clipped to it; the result's ``k`` is the k used.
    """
    if k < 1:
        raise UsageError(f"--k must be an integer >= 1, got {k}")
    k = min(k, len(bank))
    fb, yb = extract_features(backbone, bank, batch_size, workers, device, "bank features", progress, loader)
    fq, yq = extract_features(
        backbone, queries, batch_size, workers, device, "query features", progress, loader
    )
    c = len(bank.source.classes)
    cos = knn_cosine(fb, yb, fq, k, temperature, num_classes=c)
    euc = knn_euclidean(fb, yb, fq, 5, num_classes=c)
    return {
        "knn_top1": round(100.0 * float((cos == yq).float().mean()), 2),
        "k": k,
        "temperature": temperature,
        "metric": "cosine",
        "euclidean_5nn_top1": round(100.0 * float((euc == yq).float().mean()), 2),
        "n_bank": int(fb.shape[0]),
        "n_queries": int(fq.shape[0]),
    }


def check_class_match(train_src: object, val_src: object) -> None:
    """Train and val splits must have the same classes (the same class folders)."""
    if list(train_src.classes) != list(val_src.classes):
        raise UsageError(
            f"--data: train/ has {len(train_src.classes)} classes and val/ has {len(val_src.classes)}; "
            "expected the same class folders in both"
        )


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog=cli.prog_name(__spec__.name if __spec__ else "train.knn_eval", "intl-knn-eval"),
        description="k-NN accuracy of a frozen pretrained backbone (weighted cosine k-NN, Euclidean 5-NN).",
    )
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/, or 'digits'")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--pretrained", help="checkpoint.pth of train.pretrain or an exported backbone (<arch>.pth)"
    )
    src.add_argument(
        "--random-init", action="store_true", help="a randomly initialised backbone (a baseline)"
    )
    p.add_argument(
        "--arch", choices=ARCHS, default=None, help="with --random-init (default: digits resnet_tiny)"
    )
    p.add_argument("--stem", choices=("imagenet", "cifar"), default=None, help="with --random-init")
    p.add_argument("--k", type=int, default=20, help="neighbours of the weighted cosine k-NN (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default 0.07)")
    p.add_argument("--crop-size", type=int, default=None, help="eval crop (default 224; digits 16)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--exp-dir",
        default=None,
        help=f"where {KNN_EVAL_LOG} gets the result (default: the folder of --pretrained; "
        "runs/knn_eval with --random-init)",
    )
    p.add_argument("--workers", type=int, default=None, help="data loading workers (default 8; digits 0)")
    p.add_argument(
        "--loader", choices=tdata.LOADERS, default="torch", help="data loading: torch or dali (NVIDIA DALI)"
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults and check every flag (cheap checks only: no data scan, no feature)."""
    digits = args.data == "digits"
    args.crop_size = args.crop_size if args.crop_size is not None else (tdata.DIGITS_SIZE if digits else 224)
    args.workers = args.workers if args.workers is not None else (0 if digits else 8)
    for k in ("k", "batch_size", "crop_size"):
        check_int(args, k, 1)
    check_int(args, "workers", 0)
    check_int(args, "threads", 0)
    check_int(args, "seed", 0, 2**63 - 1)
    check_float(args, "temperature", 0, low_open=True)
    if not args.random_init:
        for k in ("arch", "stem"):
            if getattr(args, k) is not None:
                raise UsageError(
                    f"--{k} applies to --random-init only; with --pretrained it is read from the weights"
                )
        if not os.path.isfile(args.pretrained):
            raise UsageError(f"--pretrained: {args.pretrained} does not exist (or is not a file)")
    if args.exp_dir is None:
        args.exp_dir = (
            "runs/knn_eval" if args.random_init else os.path.dirname(os.path.abspath(args.pretrained))
        )
    cli.check_exp_dir(args.exp_dir)
    if os.path.isdir(args.exp_dir) and not os.access(args.exp_dir, os.W_OK):
        raise UsageError(f"--exp-dir {args.exp_dir}: not writable ({KNN_EVAL_LOG} goes there); pass another")
    cli.check_device(args.device)
    tdata.check_data(args.data, ("train", "val"))
    tdata.check_loader(args.loader)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; prints progress and, last, one JSON line. Returns that dict."""
    parser = build_parser()
    args = resolve_args(parser.parse_args(argv))
    digits = args.data == "digits"
    rt = runtime.setup(args.device, args.threads)
    try:
        if args.random_init:
            runtime.seed_everything(args.seed)
            arch = args.arch or ("resnet_tiny" if digits else "resnet50")
            stem = args.stem or ("cifar" if digits else "imagenet")
            backbone, _ = build_backbone(arch, stem == "cifar")
            source = f"random init ({arch}, {stem} stem, seed {args.seed})"
        else:
            try:
                backbone, info = load_backbone(args.pretrained)
            except (FileNotFoundError, ValueError) as err:
                raise UsageError(str(err)) from None
            source = (
                f"{args.pretrained} ({info['arch']}, {'cifar' if info['cifar_stem'] else 'imagenet'} stem)"
            )
        backbone.to(rt.device)
        tr, va = tdata.open_source(args.data, "train"), tdata.open_source(args.data, "val")
        check_class_match(tr, va)
        if args.k > len(tr):
            cli.note(parser.prog, f"--k {args.k} is more than the {len(tr)} bank images: using k = {len(tr)}")
        t = tdata.eval_spec(args.crop_size, digits)
        print(f"knn_eval: {source}; bank {len(tr)} images, queries {len(va)}", flush=True)
        res = knn_accuracies(
            backbone,
            tdata.ViewDataset(tr, [t]),
            tdata.ViewDataset(va, [t]),
            args.batch_size,
            args.workers,
            rt.device,
            args.k,
            args.temperature,
            progress=rt.is_main,
            loader=args.loader,
        )
        res["pretrained"] = "random" if args.random_init else args.pretrained
        print(
            f"weighted cosine {res['k']}-NN (T={res['temperature']}): {res['knn_top1']:.2f}%   "
            f"Euclidean 5-NN: {res['euclidean_5nn_top1']:.2f}%",
            flush=True,
        )
        if rt.is_main:
            cli.make_exp_dir(args.exp_dir)
            log = Path(args.exp_dir) / KNN_EVAL_LOG
            row = {
                "time": cli.utc_iso(),
                "data": os.path.abspath(args.data) if not digits else "digits",
                **res,
            }
            with open(log, "a") as f:
                f.write(monitor.dumps(row) + "\n")
            print(f"appended the result to {log}", file=sys.stderr, flush=True)
            print(monitor.dumps(res), flush=True)
        return res
    finally:
        runtime.cleanup()


def cli_main(argv: list[str] | None = None) -> None:
    """The ``intl-knn-eval`` command: ``main`` with one-line errors and exit statuses."""
    cli.entry(main, build_parser().prog, argv)


if __name__ == "__main__":
    cli_main()
