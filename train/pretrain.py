"""INTL self-supervised pretraining: ``python -m train.pretrain --data PATH|digits [flags]``.

Defaults follow the INTL paper's ImageNet setup (Appendix E.2) and the authors' code:
ResNet-50, projector 8192-8192-8192, T = 4 Newton steps, SGD (momentum 0.9, weight decay
1e-5 on weights only), lr = base-lr × batch/256 with a 2-epoch linear warm-up and a cosine
decay to 0.001×, BYOL augmentations or multi-crop, optional EMA target (momentum 0.996 → 1
on a cosine). The loss is ``intl_kernels.INTLLoss``; under torchrun it whitens the global
batch (all ranks' embeddings gathered). See train/README.md for the ImageNet commands.

Files in ``--exp-dir``: ``checkpoint.pth`` (+ ``checkpoint.prev.pth``), ``<arch>.pth``
(the backbone alone, torchvision keys), ``stats.jsonl``, ``spectrum.jsonl``,
``spectrum.png``, ``tb/`` with ``--tensorboard``. An existing checkpoint is resumed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import intl_kernels as ik
from train import checkpoint as ckpt
from train import data as tdata
from train import monitor, runtime
from train.knn_eval import check_class_match, knn_accuracies
from train.models import ARCHS, INTLModel, backbone_state, ema_update, make_ema, parse_projector

DIGITS_DEFAULTS = {
    "arch": "resnet_tiny",
    "stem": "cifar",
    "proj": "512-512-512",
    "crop_size": tdata.DIGITS_SIZE,
}
IMAGENET_DEFAULTS = {"arch": "resnet50", "stem": "imagenet", "proj": "8192-8192-8192", "crop_size": 224}
REQUIRED = ("model", "optimizer", "epoch", "batch", "step", "args")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.pretrain",
        description="INTL self-supervised pretraining (single process, or under torchrun for DDP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--data", required=True, help="ImageFolder root holding train/ (and val/ for --knn-every), or 'digits'")
    a("--arch", choices=ARCHS, default=None, help="backbone (default resnet50; digits: resnet_tiny)")
    a(
        "--stem",
        choices=("imagenet", "cifar"),
        default=None,
        help="ResNet stem; cifar = 3x3 conv, no max-pool",
    )
    a("--proj", default=None, help="projector sizes (default 8192-8192-8192; digits: 512-512-512)")
    a("--iters", type=int, default=4, help="Newton steps T of the whitening")
    a("--epochs", type=int, default=100, help="training epochs (the schedules span them)")
    a("--batch-size", type=int, default=256, help="global batch size (split evenly over the ranks)")
    a(
        "--base-lr",
        type=float,
        default=0.5,
        help="lr = base-lr × batch/256 (paper: 0.5/100 ep, 0.4/200-400, 0.3/800)",
    )
    a("--wd", type=float, default=1e-5, help="weight decay (not on biases and BN parameters)")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--warmup-epochs", type=float, default=2.0, help="linear lr warm-up")
    a("--final-lr-ratio", type=float, default=0.001, help="cosine decay ends at this fraction of the lr")
    a("--ema", action="store_true", help="EMA target encoder (momentum --ema-momentum → 1 on a cosine)")
    a("--ema-momentum", type=float, default=0.996, help="base EMA momentum")
    a("--multi-crop", action="store_true", help="6 views: 2x224 + 192, 160, 128, 96 (INTL Table B)")
    a(
        "--crop-size",
        type=int,
        default=None,
        help="largest crop (default 224; digits 16); multi-crop scales with it",
    )
    a(
        "--amp",
        choices=("bf16", "fp16", "none"),
        default=None,
        help="autocast dtype (default bf16 on GPU, none on CPU)",
    )
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--exp-dir", default="exp", help="checkpoints, exported backbone, stats.jsonl, spectrum.png")
    a(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps in total (smoke runs)",
    )
    a("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: only at epoch ends)")
    a("--log-every", type=int, default=10, help="write stats.jsonl every N steps")
    a("--spectrum-every", type=int, default=100, help="spectrum monitor every N steps (0: off)")
    a("--collapse-fraction", type=float, default=0.02, help="warn when effective rank < this × its maximum")
    a("--knn-every", type=int, default=0, help="online k-NN accuracy every N epochs (0: off); needs val/")
    a("--knn-samples", type=int, default=10000, help="online k-NN: at most this many train and val images")
    a("--tensorboard", action="store_true", help="also log to exp-dir/tb (needs the tensorboard package)")
    a("--skip-corrupt", action="store_true", help="skip unreadable images (counted) instead of stopping")
    a("--device", choices=("auto", "cuda", "cpu"), default="auto")
    a("--workers", type=int, default=None, help="data loading workers per rank (default 8; digits 0)")
    a("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    a("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentations")
    return p


def resolve_args(args: argparse.Namespace, world: int) -> argparse.Namespace:
    """Fill the data-dependent defaults and check the values."""
    defaults = DIGITS_DEFAULTS if args.data == "digits" else IMAGENET_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.workers is None:
        args.workers = 0 if args.data == "digits" else 8
    parse_projector(args.proj)
    positive = ("iters", "epochs", "batch_size", "crop_size", "log_every", "knn_samples")
    for k in positive:
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    for k in ("ckpt_every", "spectrum_every", "knn_every", "workers"):
        if getattr(args, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.base_lr <= 0:
        raise ValueError(f"--base-lr must be > 0, got {args.base_lr}")
    if args.wd < 0:
        raise ValueError(f"--wd must be >= 0, got {args.wd}")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not 0 <= args.ema_momentum <= 1:
        raise ValueError(f"--ema-momentum must be in [0, 1], got {args.ema_momentum}")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({world})")
    if args.batch_size < 8:
        raise ValueError(
            f"--batch-size must be >= 8 (INTL's trade-off 0.01·(log2 bs − 3)), got {args.batch_size}"
        )
    return args


def lr_at(step: int, total: int, warmup: int, peak: float, final_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps to ``peak``, then cosine decay to ``final_ratio``·peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    end = peak * final_ratio
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def ema_momentum_at(step: int, total: int, base: float) -> float:
    """BYOL's schedule: base at step 0, rising on a cosine to 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * min(1.0, step / max(1, total))) + 1) / 2


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """Weight decay on weights (ndim > 1) only, not on biases and BN parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}]


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full precision)."""
    if amp is None:
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (use bf16 or none on CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


def _gather_rng(rt: runtime.Runtime) -> list[dict]:
    state = ckpt.rng_state()
    if not rt.distributed:
        return [state]
    out: list = [None] * rt.world_size
    dist.all_gather_object(out, state)
    return out


def _compatible(saved: dict, args: argparse.Namespace) -> None:
    keys = ("arch", "stem", "proj", "batch_size", "multi_crop", "ema", "data")
    diff = [
        f"--{k.replace('_', '-')} {saved.get(k)} → {getattr(args, k)}"
        for k in keys
        if saved.get(k) != getattr(args, k)
    ]
    if diff:
        raise ValueError(
            f"--exp-dir holds a checkpoint of a different run ({', '.join(diff)}); "
            "use another --exp-dir or the same flags to resume"
        )


class Trainer:
    """One pretraining run: model, optimizer, data and the loop (see ``main``)."""

    def __init__(self, args: argparse.Namespace, rt: runtime.Runtime) -> None:
        self.args, self.rt = args, rt
        self.exp = Path(args.exp_dir)
        self.ckpt_path = self.exp / "checkpoint.pth"
        self.digits = args.data == "digits"
        if rt.is_main:
            self.exp.mkdir(parents=True, exist_ok=True)
            if args.tensorboard:
                monitor.check_tensorboard()
        dev = rt.device
        self.amp = amp_dtype(args.amp, dev)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

        source = tdata.open_source(args.data, "train")
        views = tdata.pretrain_views(args.crop_size, args.multi_crop, self.digits)
        self.dataset = tdata.ViewDataset(source, views, skip_corrupt=args.skip_corrupt)
        self.per_rank = args.batch_size // rt.world_size
        self.sampler = tdata.ResumableSampler(
            self.dataset, rt.world_size, rt.rank, self.per_rank, seed=args.seed
        )
        self.loader = tdata.make_loader(
            self.dataset,
            self.per_rank,
            args.workers,
            dev.type == "cuda",
            sampler=self.sampler,
            drop_last=True,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = args.epochs * self.steps_per_epoch
        self.last_step = self.total_steps if args.max_steps is None else min(self.total_steps, args.max_steps)
        self.warmup = round(args.warmup_epochs * self.steps_per_epoch)
        self.knn_sets = self._knn_sets() if args.knn_every else None

        runtime.seed_everything(args.seed)
        model = INTLModel(args.arch, args.proj, args.stem == "cifar")
        if rt.distributed and dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(dev, memory_format=self.memory_format)
        self.ema = make_ema(self.model) if args.ema else None
        self.peak_lr = args.base_lr * args.batch_size / 256
        self.opt = torch.optim.SGD(param_groups(self.model, args.wd), lr=self.peak_lr, momentum=args.momentum)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp == torch.float16)
        self.criterion = ik.INTLLoss(T=args.iters)
        self.mse_only = ik.INTLLoss(T=args.iters, trade_off=0.0)
        self.step, self.epoch, self.batch = 0, 0, 0
        self._resume()
        self.ddp = (
            DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
            if rt.distributed
            else None
        )
        self.logger = monitor.StatsLogger(self.exp, self.step, args.tensorboard) if rt.is_main else None
        self.skipped = 0

    def _knn_sets(self) -> tuple[tdata.ViewDataset, tdata.ViewDataset]:
        """Labelled bank (train) and queries (val) for the online k-NN monitor, at most --knn-samples each."""
        tr, va = tdata.open_source(self.args.data, "train"), tdata.open_source(self.args.data, "val")
        check_class_match(tr, va)
        t = tdata.eval_transform(self.args.crop_size, self.digits)
        g = torch.Generator().manual_seed(self.args.seed)

        def subset(src: object) -> list[int]:
            n = len(src)
            m = min(n, self.args.knn_samples)
            return sorted(torch.randperm(n, generator=g)[:m].tolist())

        return tdata.ViewDataset(tr, [t], indices=subset(tr)), tdata.ViewDataset(va, [t], indices=subset(va))

    # ------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        state = ckpt.load_latest(self.ckpt_path, REQUIRED)
        if state is None:
            return
        _compatible(state["args"], self.args)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler", {}))
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        rng = state.get("rng", [])
        if len(rng) == self.rt.world_size:
            ckpt.set_rng_state(rng[self.rt.rank])
        if self.rt.is_main:
            print(
                f"resumed from step {self.step} (epoch {self.epoch}, batch {self.batch})",
                file=sys.stderr,
                flush=True,
            )

    def save(self) -> None:
        """Checkpoint (atomic, previous one kept as checkpoint.prev.pth); collective under DDP."""
        rng = _gather_rng(self.rt)
        if not self.rt.is_main:
            return
        state = {
            "format": ckpt.FORMAT,
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "rng": rng,
            "args": vars(self.args),
            "world_size": self.rt.world_size,
        }
        ckpt.atomic_save(state, self.ckpt_path, keep_prev=True)

    def export(self) -> Path:
        """Write ``<arch>.pth``: the online backbone's state dict (loads into torchvision.models.<arch>)."""
        path = self.exp / f"{self.args.arch}.pth"
        if self.rt.is_main:
            ckpt.atomic_save(backbone_state(self.model), path)
        return path

    # ------------------------------------------------------------------ steps

    def _forward(
        self, crops: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """(loss, target embeddings or None, online embeddings)."""
        net = self.ddp or self.model
        with torch.autocast(
            self.rt.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None
        ):
            if self.ema is not None:
                with torch.no_grad():
                    target = self.ema([crops[0]])[0]
                online = net(crops[1:])
            else:
                emb = net(crops)
                target, online = emb[0], emb[1:]
        target, online = target.float(), [o.float() for o in online]
        if self.ema is None and not self.args.multi_crop:
            return self.criterion(target, online[0]), target, online
        return self.criterion(target, online), target, online

    def train_step(self, views: list[torch.Tensor]) -> dict:
        """One optimizer step on one batch of views; returns the numbers to log."""
        dev = self.rt.device
        crops = [v.to(dev, non_blocking=True).contiguous(memory_format=self.memory_format) for v in views]
        lr = lr_at(self.step, self.total_steps, self.warmup, self.peak_lr, self.args.final_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss, target, online = self._forward(crops)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.step + 1} (epoch {self.epoch}); stopping. "
                f"The last good checkpoint ({self.ckpt_path}) is kept; try a lower --base-lr or --amp none"
            )
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            ema_update(
                self.ema, self.model, ema_momentum_at(self.step, self.total_steps, self.args.ema_momentum)
            )
        self.step += 1
        self.batch += 1
        out = {"loss": loss.detach(), "lr": lr, "embedding": online[0].detach()}
        if self.step % self.args.log_every == 0:
            with torch.no_grad():
                t = target.detach()
                mse = self.mse_only(
                    t, online[0].detach() if len(online) == 1 else [o.detach() for o in online]
                )
            out["loss_mse"] = mse
        return out

    # ------------------------------------------------------------------ monitors

    def spectrum(self, z: torch.Tensor) -> dict:
        stats = monitor.spectrum(z)
        self.logger.log_spectrum(self.step, stats)
        monitor.warn_collapse(self.step, stats, self.args.collapse_fraction)
        return {"ioc": stats["ioc"], "erank": stats["erank"]}

    def knn(self) -> dict:
        """Online k-NN (rank 0 computes, the others wait)."""
        res = {}
        if self.rt.is_main:
            bank, queries = self.knn_sets
            res = knn_accuracies(
                self.model.backbone,
                bank,
                queries,
                self.per_rank,
                self.args.workers,
                self.rt.device,
                progress=False,
            )
            self.logger.log({"step": self.step, "epoch": self.epoch, "knn_top1": res["knn_top1"]})
        runtime.barrier(self.rt)
        return res

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        """Train until --epochs or --max-steps; returns a summary."""
        args, rt = self.args, self.rt
        bar = tqdm(
            total=self.last_step,
            initial=self.step,
            disable=not rt.is_main,
            desc="pretrain",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        last_loss, tick, seen = float("nan"), time.perf_counter(), 0
        self.model.train()
        while self.step < self.last_step and self.epoch < args.epochs:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start_batch = self.batch
            for views, _, skipped in self.loader:
                out = self.train_step(views)
                self.skipped += int(skipped.sum())
                seen += args.batch_size
                bar.update(1)
                row = None
                if self.step % args.log_every == 0 or self.step == self.last_step:
                    last_loss = float(out["loss"])
                    now = time.perf_counter()
                    ips = seen / max(now - tick, 1e-9)
                    tick, seen = now, 0
                    row = {
                        "step": self.step,
                        "epoch": self.epoch,
                        "loss": last_loss,
                        "lr": out["lr"],
                        "images_per_s": ips,
                    }
                    if "loss_mse" in out:
                        row["loss_mse"] = float(out["loss_mse"])
                        row["loss_trace"] = last_loss - row["loss_mse"]
                    if self.skipped:
                        row["skipped_images"] = self.skipped
                    bar.set_postfix(
                        epoch=self.epoch, loss=f"{last_loss:.4f}", lr=f"{out['lr']:.3g}", img_s=f"{ips:.0f}"
                    )
                if rt.is_main and args.spectrum_every and self.step % args.spectrum_every == 0:
                    row = row or {"step": self.step, "epoch": self.epoch}
                    row.update(self.spectrum(out["embedding"]))
                if row is not None and rt.is_main:
                    self.logger.log(row)
                if args.ckpt_every and self.step % args.ckpt_every == 0 and self.batch < self.steps_per_epoch:
                    self.save()
                if self.step >= self.last_step:
                    break
            if self.batch >= self.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
                self.save()
                self.export()
                if args.knn_every and self.epoch % args.knn_every == 0:
                    self.knn()
        bar.close()
        if self.batch:  # stopped inside an epoch by --max-steps
            self.save()
        backbone = self.export()
        summary = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": last_loss,
            "checkpoint": str(self.ckpt_path),
        }
        summary["backbone"] = str(backbone)
        if rt.is_main:
            png = monitor.plot_spectra(self.exp / "spectrum.jsonl", self.exp / "spectrum.png")
            summary["spectrum_png"] = None if png is None else str(png)
            if self.skipped:
                summary["skipped_images"] = self.skipped
            self.logger.close()
        return summary

    def close(self) -> None:
        """Let go of the process group: drop the DDP wrapper (its reducer holds the group). The
        Trainer itself may outlive this (rank 0's is kept by frames of a traceback caught inside
        matplotlib), so the group would otherwise be freed only at exit."""
        self.ddp = None


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, train, print a JSON summary (rank 0) and return it."""
    args = build_parser().parse_args(argv)
    rt = runtime.setup(args.device, args.threads)
    finished = False
    try:
        resolve_args(args, rt.world_size)
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        trainer = Trainer(args, rt)
        try:
            summary = trainer.run()
        finally:
            trainer.close()
        if rt.is_main:
            print(json.dumps(summary), flush=True)
        finished = True
        return summary
    finally:
        runtime.cleanup(synchronize=finished)


if __name__ == "__main__":
    main(sys.argv[1:])
