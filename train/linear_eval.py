"""Linear evaluation: ``intl-linear-eval --data PATH|digits --pretrained FILE``.

Also ``python -m intl_kernels.train.linear_eval`` (installed) or ``python -m train.linear_eval``
(in a checkout).

Protocol of the INTL paper (Appendix E.2) and the authors' code:

- ``--weights freeze`` (linear evaluation): the backbone is frozen in eval mode; a linear
  classifier (weights N(0, 0.01), bias 0) is trained for 100 epochs with SGD (momentum
  0.9, weight decay 0), lr = ``--lr-classifier`` (0.2; 0.4 after multi-crop pretraining)
  × batch/256, MultiStepLR ×0.1 at 60% and 80% of the epochs (60 and 80 of 100);
- ``--weights finetune`` with ``--train-percent 1`` or ``10`` (semi-supervised): backbone
  and classifier are trained for 20 epochs, backbone lr ``--lr-backbone`` (0.006; 0.004
  after multi-crop) × batch/256, cosine decay. The labelled subset is class-balanced and
  deterministic (``semi_supervised_indices``: a seeded shuffle per class).

Train transform RandomResizedCrop(224) + flip, val Resize(256) + CenterCrop(224); top-1
and top-5 on val/. torchrun DDP, bf16 autocast on GPUs, progress on stderr (a bar on a
terminal, plain lines otherwise), the resolved settings in ``exp_dir/args.json``, JSON lines
in ``exp_dir/linear_stats.jsonl``, an atomic ``exp_dir/linear.pth`` after every epoch that
is resumed automatically; the exp-dir is locked while the evaluation runs, as in pretraining.
The last line printed is one JSON object with ``top1``, ``top5``. Epochs count from 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

from . import checkpoint as ckpt
from . import cli, monitor, runtime
from . import data as tdata
from .cli import UsageError, check_float, check_int
from .knn_eval import check_class_match
from .lock import ExpDirLock
from .models import load_backbone, state_digest

REQUIRED = ("classifier", "optimizer", "epoch", "args")
# The flags a resumed evaluation must share with its checkpoint (besides the pretrained weights and
# the data, compared by content).
MUST_MATCH = ("weights", "train_percent", "split_seed", "batch_size")
OUTPUTS = ["linear_stats.jsonl", "args.json"]


def semi_supervised_indices(targets: list[int], percent: float, seed: int = 0) -> list[int]:
    """A class-balanced labelled subset: ceil(percent% of each class), chosen by a seeded shuffle.

    Args:
        targets: label of every training image, in dataset order.
        percent: 1, 10 or 100 (100: every image).
        seed: the shuffle's seed; the same (targets, percent, seed) always give the same subset.

    Returns:
        sorted dataset indices.
    """
    if percent not in (1, 10, 100):
        raise ValueError(f"--train-percent must be 1, 10 or 100, got {percent}")
    if percent == 100:
        return list(range(len(targets)))
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(targets)
    chosen: list[int] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        take = math.ceil(len(members) * percent / 100)
        chosen += members[torch.randperm(len(members), generator=g)[:take]].tolist()
    return sorted(chosen)


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog=cli.prog_name(__spec__.name if __spec__ else "train.linear_eval", "intl-linear-eval"),
        description="Linear (frozen backbone) or semi-supervised (fine-tuned) evaluation of a backbone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--data", required=True, help="ImageFolder root with train/ and val/, or 'digits'")
    a(
        "--pretrained",
        required=True,
        help="checkpoint.pth of train.pretrain or an exported backbone (<arch>.pth)",
    )
    a("--weights", choices=("freeze", "finetune"), default="freeze", help="frozen backbone or fine-tuned")
    a("--train-percent", type=int, choices=(1, 10, 100), default=100, help="labelled share of train/")
    a("--split-seed", type=int, default=0, help="seed of the --train-percent subset")
    a("--epochs", type=int, default=None, help="default 100 (freeze) or 20 (finetune)")
    a("--batch-size", type=int, default=256, help="global batch size")
    a("--lr-classifier", type=float, default=0.2, help="classifier lr × batch/256 (0.4 after multi-crop)")
    a(
        "--lr-backbone",
        type=float,
        default=None,
        help="finetune only: backbone lr × batch/256 (default 0.006; 0.004 after multi-crop)",
    )
    a("--wd", type=float, default=0.0, help="weight decay")
    a("--crop-size", type=int, default=None, help="train crop and val centre crop (default 224; digits 16)")
    a("--amp", choices=("bf16", "none"), default=None, help="autocast (default bf16 on GPU, none on CPU)")
    a(
        "--exp-dir",
        default="runs/linear_eval",
        help="linear.pth (resumed if present), linear_stats.jsonl, args.json",
    )
    a("--break-lock", action="store_true", help="take the exp-dir lock even if another host holds it")
    a("--progress-interval", type=float, default=30.0, help="seconds between progress lines (no terminal)")
    a("--device", choices=("auto", "cuda", "cpu"), default="auto")
    a("--workers", type=int, default=None, help="data loading workers per rank (default 8; digits 0)")
    a("--loader", choices=tdata.LOADERS, default="torch", help="data loading: torch or dali (NVIDIA DALI)")
    a("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    a("--seed", type=int, default=0, help="seed of the classifier initialisation and data order")
    return p


class LinearEval:
    """One evaluation run (see the module docstring)."""

    def __init__(
        self,
        args: argparse.Namespace,
        rt: runtime.Runtime,
        prog: str = "intl-linear-eval",
        argv: list[str] | None = None,
    ) -> None:
        self.args, self.rt, self.prog = args, rt, prog
        self.command = [*prog.split(), *(sys.argv[1:] if argv is None else argv)]
        self.exp = Path(args.exp_dir)
        self.ckpt_path = self.exp / "linear.pth"
        self.digits = args.data == "digits"
        dev = rt.device
        train_src, val_src = tdata.open_source(args.data, "train"), tdata.open_source(args.data, "val")
        check_class_match(train_src, val_src)
        self.train_src = train_src
        self.num_classes = len(train_src.classes)
        subset = semi_supervised_indices(train_src.targets, args.train_percent, args.split_seed)
        train_t = tdata.classifier_spec(args.crop_size, self.digits)
        self.train_set = tdata.ViewDataset(train_src, [train_t], indices=subset)
        self.val_set = tdata.ViewDataset(val_src, [tdata.eval_spec(args.crop_size, self.digits)])
        self.per_rank = args.batch_size // rt.world_size
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=args.seed
        )
        # The DALI loader draws each sample's crop from its own seed (run seed, epoch, index).
        keys = self.sampler if args.loader == "torch" else tdata.SeededSampler(self.sampler, args.seed)
        self.loader = tdata.make_view_loader(
            args.loader, self.train_set, self.per_rank, args.workers, dev, keys
        )
        val_idx = list(range(rt.rank, len(self.val_set), rt.world_size))  # a shard per rank, no padding
        self.val_loader = tdata.make_view_loader(
            args.loader, self.val_set, self.per_rank, args.workers, dev, sampler=val_idx
        )

        runtime.seed_everything(args.seed)
        self.backbone, info = load_backbone(args.pretrained)
        self.finetune = args.weights == "finetune"
        self.classifier = nn.Linear(info["feat_dim"], self.num_classes)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)
        if self.finetune and rt.distributed and dev.type == "cuda":
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
        self.backbone.to(dev).requires_grad_(self.finetune)
        self.classifier.to(dev)
        scale = args.batch_size / 256
        groups = [{"params": self.classifier.parameters(), "lr": args.lr_classifier * scale}]
        if self.finetune:
            groups.append({"params": self.backbone.parameters(), "lr": args.lr_backbone * scale})
        self.opt = torch.optim.SGD(groups, lr=args.lr_classifier * scale, momentum=0.9, weight_decay=args.wd)
        if self.finetune:
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, args.epochs)
        else:
            miles = [round(0.6 * args.epochs), round(0.8 * args.epochs)]
            self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, miles, gamma=0.1)
        self.amp = (args.amp or ("bf16" if dev.type == "cuda" else "none")) == "bf16"
        self.epoch, self.best = 0, {"top1": 0.0, "top5": 0.0}
        self._state: dict | None = None
        path = runtime.from_main(rt, self._choose_checkpoint)
        if path is not None:
            self._load(path)
        self.stats = self.exp / "linear_stats.jsonl"
        if rt.is_main:
            if self.epoch:
                monitor.truncate_jsonl(self.stats, self.epoch, key="epoch")
            self._write_settings(path)
        self.train_module = self._wrap()

    def _wrap(self) -> nn.Module:
        net = nn.Sequential(self.backbone, self.classifier) if self.finetune else self.classifier
        if not self.rt.distributed:
            return net
        dev = self.rt.device
        return DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)

    def _choose_checkpoint(self) -> str | None:
        """Rank 0: the checkpoint to resume (None: a fresh start, earlier outputs set aside)."""
        self.pretrained_digest = state_digest(self.backbone.state_dict())
        self.data_fingerprint = tdata.fingerprint(self.train_src)
        found = ckpt.load_latest(self.ckpt_path, REQUIRED, set_aside=True)
        if found is None:
            aside = monitor.set_aside(self.exp, OUTPUTS)
            if aside is not None:
                cli.note(
                    self.prog, f"no checkpoint to resume: set the earlier evaluation's logs aside in {aside}"
                )
            return None
        state, path = found
        saved = state["classifier"]["weight"].shape[0]
        if saved != self.num_classes:
            raise UsageError(
                f"--exp-dir: {path} holds a classifier for {saved} classes but --data has "
                f"{self.num_classes} classes; use another --exp-dir"
            )
        diff = [
            f"{cli.flag(k)} {state['args'].get(k)} → {getattr(self.args, k)}"
            for k in MUST_MATCH
            if state["args"].get(k) != getattr(self.args, k)
        ]
        if diff:
            raise UsageError(
                f"--exp-dir: {path} is an evaluation with other flags ({', '.join(diff)}); "
                "use another --exp-dir or the same flags to resume"
            )
        self._check_inputs(state, path)
        self._state = state
        return str(path)

    def _check_inputs(self, state: dict, path: Path) -> None:
        """The checkpoint's pretrained weights and data must be these, wherever they are stored now."""
        saved, args = state["args"], self.args
        digest = state.get("pretrained_digest")
        moved = []
        if digest is None:  # a checkpoint written before digests: compare the path
            if os.path.abspath(saved.get("pretrained", "")) != os.path.abspath(args.pretrained):
                raise UsageError(
                    f"--exp-dir: {path} evaluates --pretrained {saved.get('pretrained')}, not "
                    f"{args.pretrained}; use another --exp-dir or the same --pretrained to resume"
                )
        elif digest != self.pretrained_digest:
            raise UsageError(
                f"--pretrained {args.pretrained} holds other weights than the ones {path} started from "
                f"({saved.get('pretrained')}); use another --exp-dir or those weights to resume"
            )
        elif os.path.abspath(saved.get("pretrained", "")) != os.path.abspath(args.pretrained):
            moved.append(f"--pretrained {saved.get('pretrained')} → {args.pretrained}")
        fp = state.get("data_fingerprint")
        if fp is not None:
            what = tdata.fingerprint_differences(fp, self.data_fingerprint)
            if what:
                raise UsageError(
                    f"--data {args.data} is not the dataset of {path} ({'; '.join(what)}); "
                    "use the data it was trained on, or another --exp-dir"
                )
            if os.path.abspath(saved.get("data", "")) != os.path.abspath(args.data):
                moved.append(f"--data {saved.get('data')} → {args.data}")
        if moved:
            cli.note(self.prog, f"warning: {', '.join(moved)} (same content); resuming")

    def _load(self, path: str) -> None:
        state = (
            self._state
            if self._state is not None
            else torch.load(path, map_location="cpu", weights_only=True)
        )
        self._state = None
        self.classifier.load_state_dict(state["classifier"])
        if self.finetune:
            self.backbone.load_state_dict(state["backbone"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.best = state["epoch"], state["best"]
        rng = state.get("rng", [])
        if len(rng) == self.rt.world_size:
            ckpt.set_rng_state(rng[self.rt.rank])
        cli.note(self.prog, f"resumed linear evaluation after epoch {self.epoch} from {path}")

    def _write_settings(self, resumed_from: str | None) -> None:
        args, rt = self.args, self.rt
        scale = args.batch_size / 256
        settings = {
            "command": self.command,
            "started": cli.utc_iso(),
            "args": vars(args),
            "resolved": {
                "lr_classifier": args.lr_classifier * scale,
                "lr_backbone": args.lr_backbone * scale if self.finetune else None,
                "world_size": rt.world_size,
                "per_rank_batch": self.per_rank,
                "train_images": len(self.train_set),
                "val_images": len(self.val_set),
                "classes": self.num_classes,
                "steps_per_epoch": len(self.loader),
                "device": str(rt.device),
                "amp": "bf16" if self.amp else "none",
            },
            "resumed_from": resumed_from,
            "versions": runtime.versions(),
        }
        path = self.exp / "args.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(monitor.json_safe(settings), indent=2) + "\n")
        os.replace(tmp, path)
        r = settings["resolved"]
        cli.note(
            self.prog,
            f"{r['train_images']} train / {r['val_images']} val images, {r['classes']} classes; "
            f"{r['world_size']} process(es) × {r['per_rank_batch']} images; lr {r['lr_classifier']:g}"
            + (f" (backbone {r['lr_backbone']:g})" if self.finetune else "")
            + f"; {r['steps_per_epoch']} steps per epoch; settings in {path}",
        )

    def _save(self) -> None:
        rng = [ckpt.rng_state()]
        if self.rt.distributed:
            rng = [None] * self.rt.world_size
            dist.all_gather_object(rng, ckpt.rng_state())
        if not self.rt.is_main:
            return
        state = {
            "format": ckpt.FORMAT,
            "classifier": self.classifier.state_dict(),
            "backbone": self.backbone.state_dict() if self.finetune else None,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": self.epoch,
            "best": self.best,
            "rng": rng,
            "args": vars(self.args),
            "pretrained_digest": self.pretrained_digest,
            "data_fingerprint": self.data_fingerprint,
        }
        ckpt.atomic_save(state, self.ckpt_path, keep_prev=True)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        dev = self.rt.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.finetune:
                return self.train_module(x).float()
            with torch.no_grad():
                feats = self.backbone(x)
            return self.train_module(feats.float()).float()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 and top-5 (%) on val/ (each rank a shard, counts summed)."""
        self.backbone.eval()
        self.classifier.eval()
        dev = self.rt.device
        counts = torch.zeros(3, dtype=torch.float64, device=dev)  # top1, top5, total
        k = min(5, self.num_classes)
        for views, y, _ in self.val_loader:
            x, y = views[0].to(dev, non_blocking=True), y.to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.classifier(self.backbone(x).float()).float()
            top = logits.topk(k, dim=1).indices
            counts[0] += (top[:, 0] == y).sum()
            counts[1] += (top == y[:, None]).any(dim=1).sum()
            counts[2] += y.numel()
        if self.rt.distributed:
            dist.all_reduce(counts)
        return {
            "top1": round(float(100 * counts[0] / counts[2]), 2),
            "top5": round(float(100 * counts[1] / counts[2]), 2),
        }

    def run(self) -> dict:
        args, rt = self.args, self.rt
        steps = len(self.loader)
        bar = monitor.Progress(
            args.epochs * steps,
            self.epoch * steps,
            f"{self.prog} ({args.weights}, {args.train_percent}%) step",
            rt.is_main,
            args.progress_interval,
        )
        result = None
        while self.epoch < args.epochs:
            self.sampler.set_epoch(self.epoch)
            self.backbone.train(self.finetune)
            self.classifier.train()
            total, n = 0.0, 0
            for views, y, _ in self.loader:
                x, y = views[0].to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                loss = F.cross_entropy(self._logits(x), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                total, n = total + loss.item(), n + 1
                bar.update(1, epoch=f"{self.epoch + 1}/{args.epochs}", loss=f"{total / n:.4f}")
            self.sched.step()
            self.epoch += 1
            result = self.evaluate()
            if result["top1"] >= self.best["top1"]:
                self.best = dict(result)
            if rt.is_main:
                row = {
                    "epoch": self.epoch,
                    "loss": total / max(n, 1),
                    "lr": self.opt.param_groups[0]["lr"],
                    **result,
                }
                with open(self.stats, "a") as f:
                    f.write(monitor.dumps(row) + "\n")
            self._save()
        bar.close()
        if result is None:  # resumed a finished evaluation
            result = self.evaluate()
        return {
            **result,
            "best_top1": self.best["top1"],
            "epochs": self.epoch,
            "weights": args.weights,
            "train_percent": args.train_percent,
            "n_train": len(self.train_set),
            "n_val": len(self.val_set),
        }


def resolve_args(args: argparse.Namespace, world: int) -> argparse.Namespace:
    """Fill the defaults and check every flag (cheap checks only: no data scan)."""
    digits = args.data == "digits"
    args.crop_size = args.crop_size if args.crop_size is not None else (tdata.DIGITS_SIZE if digits else 224)
    args.workers = args.workers if args.workers is not None else (0 if digits else 8)
    args.epochs = args.epochs if args.epochs is not None else (20 if args.weights == "finetune" else 100)
    if args.lr_backbone is not None and args.weights != "finetune":
        raise UsageError("--lr-backbone applies to --weights finetune only (the frozen backbone has no lr)")
    args.lr_backbone = 0.006 if args.lr_backbone is None else args.lr_backbone
    for k in ("epochs", "batch_size", "crop_size"):
        check_int(args, k, 1)
    for k in ("workers", "threads", "split_seed"):
        check_int(args, k, 0)
    check_int(args, "seed", 0, 2**63 - 1)
    check_float(args, "lr_classifier", 0, low_open=True)
    check_float(args, "lr_backbone", 0, low_open=True)
    check_float(args, "wd", 0)
    check_float(args, "progress_interval", 0)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({world})")
    if not os.path.isfile(args.pretrained):
        raise UsageError(f"--pretrained: {args.pretrained} does not exist (or is not a file)")
    cli.check_device(args.device)
    cli.check_exp_dir(args.exp_dir)
    tdata.check_data(args.data, ("train", "val"))
    tdata.check_loader(args.loader)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; the last line printed (rank 0) is one JSON object. Returns that dict."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = resolve_args(parser.parse_args(argv), cli.env_world_size())
    rt = runtime.setup(args.device, args.threads)
    lock: list[ExpDirLock] = []
    finished = False

    def take_lock() -> None:
        cli.make_exp_dir(args.exp_dir)
        held = ExpDirLock(args.exp_dir, parser.prog)
        held.acquire(args.break_lock)
        lock.append(held)

    try:
        runtime.from_main(rt, take_lock)
        res = LinearEval(args, rt, parser.prog, argv).run()
        if rt.is_main:
            print(f"linear evaluation: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%", flush=True)
            print(monitor.dumps(res), flush=True)
        finished = True
        return res
    finally:
        for held in lock:
            held.release()
        runtime.cleanup(synchronize=finished)


def cli_main(argv: list[str] | None = None) -> None:
    """The ``intl-linear-eval`` command: ``main`` with one-line errors and exit statuses."""
    cli.entry(main, build_parser().prog, argv)


if __name__ == "__main__":
    cli_main()
