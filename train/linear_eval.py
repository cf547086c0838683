"""Linear evaluation: ``python -m train.linear_eval --data PATH|digits --pretrained FILE``.

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
and top-5 on val/. torchrun DDP, bf16 autocast on GPUs, a progress bar, JSON lines in
``exp_dir/linear_stats.jsonl``, an atomic ``exp_dir/linear.pth`` after every epoch that
is resumed automatically. The last line printed is one JSON object with ``top1``, ``top5``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from train import checkpoint as ckpt
from train import data as tdata
from train import monitor, runtime
from train.knn_eval import check_class_match
from train.models import load_backbone

REQUIRED = ("classifier", "optimizer", "epoch", "args")


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
    p = argparse.ArgumentParser(
        prog="python -m train.linear_eval",
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
        default=0.006,
        help="finetune: backbone lr × batch/256 (0.004 after multi-crop)",
    )
    a("--wd", type=float, default=0.0, help="weight decay")
    a("--crop-size", type=int, default=None, help="train crop and val centre crop (default 224; digits 16)")
    a("--amp", choices=("bf16", "none"), default=None, help="autocast (default bf16 on GPU, none on CPU)")
    a("--exp-dir", default="linear_exp", help="linear.pth (resumed if present) and linear_stats.jsonl")
    a("--device", choices=("auto", "cuda", "cpu"), default="auto")
    a("--workers", type=int, default=None, help="data loading workers per rank (default 8; digits 0)")
    a("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    a("--seed", type=int, default=0, help="seed of the classifier initialisation and data order")
    return p


class LinearEval:
    """One evaluation run (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, rt: runtime.Runtime) -> None:
        self.args, self.rt = args, rt
        self.exp = Path(args.exp_dir)
        self.ckpt_path = self.exp / "linear.pth"
        self.digits = args.data == "digits"
        dev = rt.device
        train_src, val_src = tdata.open_source(args.data, "train"), tdata.open_source(args.data, "val")
        check_class_match(train_src, val_src)
        self.num_classes = len(train_src.classes)
        subset = semi_supervised_indices(train_src.targets, args.train_percent, args.split_seed)
        train_t = tdata.classifier_train_transform(args.crop_size, self.digits)
        self.train_set = tdata.ViewDataset(train_src, [train_t], indices=subset)
        self.val_set = tdata.ViewDataset(val_src, [tdata.eval_transform(args.crop_size, self.digits)])
        self.per_rank = args.batch_size // rt.world_size
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=args.seed
        )
        pin = dev.type == "cuda"
        self.loader = tdata.make_loader(
            self.train_set, self.per_rank, args.workers, pin, sampler=self.sampler
        )
        val_idx = list(range(rt.rank, len(self.val_set), rt.world_size))  # a shard per rank, no padding
        self.val_loader = tdata.make_loader(
            torch.utils.data.Subset(self.val_set, val_idx), self.per_rank, args.workers, pin
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
        self._resume()
        self.stats = self.exp / "linear_stats.jsonl"
        if rt.is_main:
            if self.epoch:
                monitor.truncate_jsonl(self.stats, self.epoch, key="epoch")
            elif self.stats.exists():
                self.stats.unlink()
        self.train_module = self._wrap()

    def _wrap(self) -> nn.Module:
        net = nn.Sequential(self.backbone, self.classifier) if self.finetune else self.classifier
        if not self.rt.distributed:
            return net
        dev = self.rt.device
        return DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)

    def _resume(self) -> None:
        state = ckpt.load_latest(self.ckpt_path, REQUIRED)
        if state is None:
            return
        saved = state["classifier"]["weight"].shape[0]
        if saved != self.num_classes:
            raise ValueError(
                f"--exp-dir: {self.ckpt_path} holds a classifier for {saved} classes but --data has "
                f"{self.num_classes} classes; use another --exp-dir"
            )
        keys = ("pretrained", "weights", "train_percent", "split_seed", "batch_size")
        diff = [k for k in keys if state["args"].get(k) != getattr(self.args, k)]
        if diff:
            raise ValueError(
                f"--exp-dir: {self.ckpt_path} is an evaluation with other flags ({', '.join(diff)}); "
                "use another --exp-dir or the same flags to resume"
            )
        self.classifier.load_state_dict(state["classifier"])
        if self.finetune:
            self.backbone.load_state_dict(state["backbone"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch, self.best = state["epoch"], state["best"]
        rng = state.get("rng", [])
        if len(rng) == self.rt.world_size:
            ckpt.set_rng_state(rng[self.rt.rank])
        if self.rt.is_main:
            print(f"resumed linear evaluation after epoch {self.epoch}", file=sys.stderr, flush=True)

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
        bar = tqdm(
            total=args.epochs * steps,
            initial=self.epoch * steps,
            disable=not rt.is_main,
            desc=f"linear_eval ({args.weights}, {args.train_percent}%)",
            dynamic_ncols=True,
            mininterval=1.0,
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
                bar.update(1)
                bar.set_postfix(epoch=self.epoch, loss=f"{total / n:.4f}")
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
                    f.write(json.dumps(row) + "\n")
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


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; the last line printed (rank 0) is one JSON object. Returns that dict."""
    args = build_parser().parse_args(argv)
    digits = args.data == "digits"
    args.crop_size = args.crop_size or (tdata.DIGITS_SIZE if digits else 224)
    args.workers = args.workers if args.workers is not None else (0 if digits else 8)
    args.epochs = args.epochs if args.epochs is not None else (20 if args.weights == "finetune" else 100)
    for k in ("epochs", "batch_size", "crop_size"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.lr_classifier <= 0 or args.lr_backbone <= 0:
        raise ValueError(
            f"--lr-classifier and --lr-backbone must be > 0, got {args.lr_classifier}, {args.lr_backbone}"
        )
    rt = runtime.setup(args.device, args.threads)
    try:
        if args.batch_size % rt.world_size:
            raise ValueError(
                f"--batch-size {args.batch_size} must be divisible by the number of ranks ({rt.world_size})"
            )
        if rt.is_main:
            Path(args.exp_dir).mkdir(parents=True, exist_ok=True)
        runtime.barrier(rt)
        res = LinearEval(args, rt).run()
        if rt.is_main:
            print(f"linear evaluation: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%", flush=True)
            print(json.dumps(res), flush=True)
        return res
    finally:
        runtime.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
