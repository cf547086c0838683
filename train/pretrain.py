"""INTL self-supervised pretraining: ``intl-pretrain --data PATH|digits [flags]``.

Also ``python -m intl_kernels.train.pretrain`` (installed) or ``python -m train.pretrain`` (in
a checkout). Defaults follow the INTL paper's ImageNet setup (Appendix E.2) and the authors'
code: ResNet-50, projector 8192-8192-8192, T = 4 Newton steps, SGD (momentum 0.9, weight
decay 1e-5 on weights only), lr = base-lr × batch/256 with a 2-epoch linear warm-up and a
cosine decay to 0.001×, BYOL augmentations or multi-crop, optional EMA target (momentum
0.996 → 1 on a cosine). The loss is ``intl_kernels.INTLLoss``; under torchrun it whitens the
global batch (all ranks' embeddings gathered). See train/README.md for the ImageNet commands.

Files in ``--exp-dir``: ``run.lock`` while the run is alive, ``args.json`` (resolved
settings), ``checkpoint.pth`` (+ ``checkpoint.prev.pth``, ``checkpoint-epochNNNN.pth`` with
``--keep-every``), ``<arch>.pth`` (the backbone alone, torchvision keys), ``stats.jsonl``,
``spectrum.jsonl``, ``spectrum.png``, ``knn.jsonl`` with ``--knn-every``, ``tb/`` with
``--tensorboard``. An existing checkpoint is resumed (``--resume`` names one elsewhere).

Epochs in everything printed and logged count from 1: step s belongs to epoch
ceil(s / steps per epoch). (Checkpoints store the 0-based index of the epoch in progress.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import intl_kernels as ik

from . import checkpoint as ckpt
from . import cli, monitor, runtime
from . import data as tdata
from .cli import RunError, UsageError, check_float, check_int
from .knn_eval import KNN_EVAL_LOG, check_class_match, knn_accuracies
from .lock import ExpDirLock
from .models import ARCHS, INTLModel, backbone_state, ema_update, make_ema, parse_projector

DIGITS_DEFAULTS = {
    "arch": "resnet_tiny",
    "stem": "cifar",
    "proj": "512-512-512",
    "crop_size": tdata.DIGITS_SIZE,
}
IMAGENET_DEFAULTS = {"arch": "resnet50", "stem": "imagenet", "proj": "8192-8192-8192", "crop_size": 224}
REQUIRED = ("model", "optimizer", "epoch", "batch", "step", "args")
# Flags a checkpoint must share with the run that resumes it (they shape the model or the batches).
MUST_MATCH = ("arch", "stem", "proj", "batch_size", "multi_crop", "ema")
# Flags that only say where or how this process runs: changing them is not worth a note.
WHERE = ("data", "exp_dir", "resume", "break_lock", "device", "workers", "threads", "progress_interval")
WHERE += ("dali_hw_decoder_load",)
# What a fresh start sets aside when it finds it in the exp-dir (an earlier run's outputs).
OUTPUTS = [*monitor.STEP_LOGS, "spectrum.png", "args.json", "tb", KNN_EVAL_LOG, *(f"{a}.pth" for a in ARCHS)]
SNAPSHOT = "checkpoint-epoch{:04d}.pth"


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog=cli.prog_name(__spec__.name if __spec__ else "train.pretrain", "intl-pretrain"),
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
    a(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model (backend inductor, or the one named)",
    )
    a("--exp-dir", default="runs/pretrain", help="checkpoints, exported backbone, logs (see train/README.md)")
    a(
        "--resume",
        default=None,
        metavar="PATH",
        help="start from this checkpoint (or exp-dir) when --exp-dir has none; the run goes on in --exp-dir",
    )
    a("--break-lock", action="store_true", help="take the exp-dir lock even if another host holds it")
    a(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps in total (smoke runs)",
    )
    a("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: only at epoch ends)")
    a(
        "--save-every-minutes",
        type=float,
        default=0.0,
        help="also checkpoint when this many minutes passed since the last checkpoint (0: off)",
    )
    a("--keep-every", type=int, default=0, help="keep checkpoint-epochNNNN.pth every N epochs (0: none)")
    a("--log-every", type=int, default=10, help="write stats.jsonl every N steps")
    a("--progress-interval", type=float, default=30.0, help="seconds between progress lines (no terminal)")
    a(
        "--spectrum-every",
        type=int,
        default=100,
        help="spectrum monitor every N steps and at the last step (0: off)",
    )
    a(
        "--collapse-fraction",
        type=float,
        default=0.02,
        help="warn when the effective rank < this × min(global batch - 1, embedding dim)",
    )
    a("--knn-every", type=int, default=0, help="online k-NN accuracy every N epochs (0: off); needs val/")
    a("--knn-samples", type=int, default=10000, help="online k-NN: at most this many train and val images")
    a("--tensorboard", action="store_true", help="also log to exp-dir/tb (needs the tensorboard package)")
    a("--skip-corrupt", action="store_true", help="skip unreadable images (counted) instead of stopping")
    a(
        "--loader",
        choices=tdata.LOADERS,
        default="torch",
        help="data loading: torch (PIL + torchvision in --workers processes) or dali (NVIDIA DALI: "
        "on the GPU with --device cuda, else its CPU operators; pip install -e '.[dali]')",
    )
    a(
        "--dali-hw-decoder-load",
        type=float,
        default=0.65,
        help="--loader dali on a GPU: share of the JPEGs for the hardware decoder (A100/H100)",
    )
    a(
        "--dali-hue",
        choices=("pil", "yiq"),
        default="pil",
        help="--loader dali: hue as PIL shifts it (as --loader torch) or DALI's faster YIQ rotation",
    )
    a("--device", choices=("auto", "cuda", "cpu"), default="auto")
    a(
        "--workers",
        type=int,
        default=None,
        help="data loading workers per rank (default 8; digits 0); --loader dali: also its CPU threads",
    )
    a("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    a("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentations")
    return p


def resolve_args(args: argparse.Namespace, world: int) -> argparse.Namespace:
    """Fill the data-dependent defaults and check every flag (cheap checks only: no data scan)."""
    defaults = DIGITS_DEFAULTS if args.data == "digits" else IMAGENET_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.workers is None:
        args.workers = 0 if args.data == "digits" else 8
    try:
        dims = parse_projector(args.proj)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if dims[-1] < 2:
        raise UsageError(
            f"--proj: the embedding (last size) must have >= 2 features for the whitening, got {args.proj!r}"
        )
    for k in ("iters", "epochs", "batch_size", "crop_size", "log_every", "knn_samples", "max_steps"):
        check_int(args, k, 1)
    for k in ("ckpt_every", "spectrum_every", "knn_every", "keep_every", "workers", "threads"):
        check_int(args, k, 0)
    check_int(args, "seed", 0, 2**63 - 1)
    check_float(args, "base_lr", 0, low_open=True)
    check_float(args, "wd", 0)
    check_float(args, "momentum", 0, 1, high_open=True)
    check_float(args, "ema_momentum", 0, 1)
    check_float(args, "warmup_epochs", 0)
    check_float(args, "final_lr_ratio", 0, 1)
    check_float(args, "collapse_fraction", 0, 1)
    check_float(args, "save_every_minutes", 0)
    check_float(args, "progress_interval", 0)
    check_float(args, "dali_hw_decoder_load", 0, 1)
    if args.batch_size < 8:
        raise UsageError(
            f"--batch-size must be >= 8 (INTL's trade-off 0.01·(log2 bs − 3)), got {args.batch_size}"
        )
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({world})")
    device = cli.check_device(args.device)
    amp_dtype(args.amp, device)
    if args.compile is not None:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if args.compile not in known:
            raise UsageError(
                f"--compile: unknown backend {args.compile!r}; expected one of {', '.join(known)}"
            )
    if args.tensorboard:
        monitor.check_tensorboard()
    tdata.check_data(args.data, ("train", "val") if args.knn_every else ("train",))
    tdata.check_loader(args.loader)
    cli.check_exp_dir(args.exp_dir)
    if args.resume is not None:
        r = Path(args.resume)
        if not (r.is_file() or (r / "checkpoint.pth").exists() or (r / "checkpoint.prev.pth").exists()):
            raise UsageError(
                f"--resume {args.resume}: no such checkpoint (expected a checkpoint.pth file or an exp-dir "
                "holding one)"
            )
    # Legal but probably not meant: said once every flag has passed.
    prog = build_parser().prog
    if args.warmup_epochs > args.epochs:
        cli.note(prog, f"--warmup-epochs {args.warmup_epochs:g} > --epochs {args.epochs}: the lr never peaks")
    if args.knn_every > args.epochs:
        cli.note(prog, f"--knn-every {args.knn_every} > --epochs {args.epochs}: no online k-NN")
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
        raise UsageError("--amp fp16 needs a CUDA device (use bf16 or none on CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite."""


def _gather_rng(rt: runtime.Runtime) -> list[dict]:
    state = ckpt.rng_state()
    if not rt.distributed:
        return [state]
    out: list = [None] * rt.world_size
    dist.all_gather_object(out, state)
    return out


def _data_root(data: str) -> str:
    return data if data == "digits" else os.path.abspath(data)


class Trainer:
    """One pretraining run: model, optimizer, data and the loop (see ``main``)."""

    def __init__(
        self,
        args: argparse.Namespace,
        rt: runtime.Runtime,
        prog: str = "intl-pretrain",
        argv: list[str] | None = None,
    ) -> None:
        self.args, self.rt, self.prog = args, rt, prog
        self.command = [*prog.split(), *(sys.argv[1:] if argv is None else argv)]
        self.exp = Path(args.exp_dir)
        self.ckpt_path = self.exp / "checkpoint.pth"
        self.digits = args.data == "digits"
        dev = rt.device
        self.amp = amp_dtype(args.amp, dev)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

        self.source = tdata.open_source(args.data, "train")
        views = tdata.pretrain_specs(args.crop_size, args.multi_crop, self.digits)
        self.dataset = tdata.ViewDataset(self.source, views, skip_corrupt=args.skip_corrupt)
        self.per_rank = args.batch_size // rt.world_size
        self.sampler = tdata.ResumableSampler(
            self.dataset, rt.world_size, rt.rank, self.per_rank, seed=args.seed
        )
        self.loader = tdata.make_view_loader(
            args.loader,
            self.dataset,
            self.per_rank,
            args.workers,
            dev,
            sampler=self.sampler,
            drop_last=True,
            hw_decoder_load=args.dali_hw_decoder_load,
            hue=args.dali_hue,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = args.epochs * self.steps_per_epoch
        self.last_step = self.total_steps if args.max_steps is None else min(self.total_steps, args.max_steps)
        self.warmup = round(args.warmup_epochs * self.steps_per_epoch)
        self.knn_sets = self._knn_sets() if args.knn_every else None

        # Rank 0 reads the checkpoint, checks it against these flags and this data, and sets
        # aside what must not be rotated or overwritten; every rank then loads the same file.
        self.fingerprint: dict | None = None
        self._state: dict | None = None
        self.resumed_from: str | None = runtime.from_main(rt, self._choose_checkpoint)

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
        self.last_ckpt: tuple[int, Path] | None = None
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        self.ddp = (
            DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
            if rt.distributed
            else None
        )
        self.net = self.ddp or self.model
        if args.compile is not None:
            self.net = torch.compile(self.net, backend=args.compile)
        self.logger = None
        if rt.is_main:
            self.logger = monitor.StatsLogger(self.exp, self.step, args.tensorboard)
            self._write_settings()
        self.skipped = 0
        self.last_save = time.monotonic()

    def _knn_sets(self) -> tuple[tdata.ViewDataset, tdata.ViewDataset]:
        """Labelled bank (train) and queries (val) for the online k-NN monitor, at most --knn-samples each."""
        tr, va = self.source, tdata.open_source(self.args.data, "val")
        check_class_match(tr, va)
        t = tdata.eval_spec(self.args.crop_size, self.digits)
        g = torch.Generator().manual_seed(self.args.seed)

        def subset(src: object) -> list[int]:
            n = len(src)
            m = min(n, self.args.knn_samples)
            return sorted(torch.randperm(n, generator=g)[:m].tolist())

        return tdata.ViewDataset(tr, [t], indices=subset(tr)), tdata.ViewDataset(va, [t], indices=subset(va))

    # ------------------------------------------------------------------ checkpoints

    def _choose_checkpoint(self) -> str | None:
        """Rank 0: the checkpoint to resume from (None: a fresh start), checked against this run."""
        args = self.args
        self.fingerprint = tdata.fingerprint(self.source)
        own = ckpt.load_latest(self.ckpt_path, REQUIRED, set_aside=True)
        found = own
        if own is not None and args.resume is not None:
            cli.note(
                self.prog,
                f"--exp-dir {self.exp} has its own checkpoint (step {own[0]['step']}), which continues the "
                f"run; --resume {args.resume} is not used",
            )
        elif own is None and args.resume is not None:
            r = Path(args.resume)
            found = ckpt.load_latest(r / "checkpoint.pth" if r.is_dir() else r, REQUIRED)
            if found is None:
                raise UsageError(f"--resume {args.resume}: no checkpoint there")
        if found is not None:
            self._check_compatible(*found)
        if own is None:  # a new run here (fresh, or continued from --resume): keep what an earlier one left
            earlier = OUTPUTS + sorted(p.name for p in self.exp.glob("checkpoint-epoch*"))
            aside = monitor.set_aside(self.exp, earlier)
            if aside is not None:
                cli.note(
                    self.prog, f"no checkpoint to resume here: set the earlier run's outputs aside in {aside}"
                )
        if found is None:
            return None
        state, path = found
        if own is None:  # resumed from another exp-dir: bring its history along
            copied = monitor.copy_history(path.parent, self.exp, monitor.STEP_LOGS, state["step"])
            if copied:
                cli.note(
                    self.prog, f"copied {', '.join(copied)} up to step {state['step']} from {path.parent}"
                )
        self._state = state
        return str(path)

    def _check_compatible(self, state: dict, path: Path) -> None:
        """Refuse a checkpoint of another model, batch or dataset; say what else changed."""
        saved, args = state["args"], self.args
        where = f"--exp-dir {self.exp} holds" if path.parent == self.exp else f"--resume {args.resume} is"
        diff = [
            f"{cli.flag(k)} {saved.get(k)} → {getattr(args, k)}"
            for k in MUST_MATCH
            if saved.get(k) != getattr(args, k)
        ]
        if diff:
            raise UsageError(
                f"{where} a checkpoint of a different run ({', '.join(diff)}); "
                "use another --exp-dir or the same flags to resume"
            )
        old_root = state.get("data_root") or _data_root(str(saved.get("data")))
        fp = state.get("data_fingerprint")
        if fp is None:  # a checkpoint written before fingerprints: compare the folder
            if old_root != _data_root(args.data):
                raise UsageError(
                    f"{where} a checkpoint trained on {old_root} (it has no dataset fingerprint to compare), "
                    f"not --data {args.data}; use that --data or another --exp-dir"
                )
        else:
            what = tdata.fingerprint_differences(fp, self.fingerprint)
            if what:
                raise UsageError(
                    f"--data {args.data} is not the dataset of the checkpoint {path} ({'; '.join(what)}); "
                    "use the data it was trained on, or another --exp-dir for a new run"
                )
            if old_root != _data_root(args.data):
                cli.note(
                    self.prog,
                    f"warning: --data moved from {old_root} to {_data_root(args.data)} "
                    "(same classes and files); resuming",
                )
        changed = [
            f"{cli.flag(k)} {saved.get(k)} → {v}"
            for k, v in vars(args).items()
            if k not in MUST_MATCH and k not in WHERE and k in saved and saved[k] != v
        ]
        if changed:
            cli.note(self.prog, f"flags changed since the checkpoint: {', '.join(changed)}")
        if state.get("world_size", self.rt.world_size) != self.rt.world_size:
            cli.note(
                self.prog,
                f"the checkpoint was written by {state['world_size']} processes, this run has "
                f"{self.rt.world_size}: the position in the epoch is kept, the batch order and random "
                "states are new",
            )

    def _load(self, path: str) -> None:
        state = (
            self._state
            if self._state is not None
            else torch.load(path, map_location="cpu", weights_only=True)
        )
        self._state = None
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler", {}))
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.last_ckpt = (self.step, Path(path))
        rng = state.get("rng", [])
        if len(rng) == self.rt.world_size:
            ckpt.set_rng_state(rng[self.rt.rank])
        cli.note(
            self.prog,
            f"resumed from step {self.step} of {path}: {self.epoch} epochs and {self.batch} of "
            f"{self.steps_per_epoch} batches done",
        )

    def settings(self) -> dict:
        """The resolved settings of this run (args.json)."""
        rt = self.rt
        return {
            "command": self.command,
            "started": cli.utc_iso(),
            "host": socket.gethostname(),
            "args": vars(self.args),
            "resolved": {
                "peak_lr": self.peak_lr,
                "world_size": rt.world_size,
                "per_rank_batch": self.per_rank,
                "global_batch": self.args.batch_size,
                "dataset_size": len(self.dataset),
                "classes": len(self.source.classes),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "last_step": self.last_step,
                "warmup_steps": self.warmup,
                "device": str(rt.device),
                "amp": str(self.amp).replace("torch.", "") if self.amp else "none",
                "data_root": _data_root(self.args.data),
                "data_fingerprint": self.fingerprint["digest"],
            },
            "resumed_from": self.resumed_from,
            "resume_step": self.step,
            "versions": runtime.versions(),
        }

    def _write_settings(self) -> None:
        s = self.settings()
        r, v = s["resolved"], s["versions"]
        path = self.exp / "args.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(monitor.json_safe(s), indent=2) + "\n")
        os.replace(tmp, path)
        git = (
            v["git_commit"][:12] + (" with local changes" if v["git_dirty"] else "")
            if v["git_commit"]
            else "none"
        )
        for line in (
            f"data {r['data_root']}: {r['dataset_size']} images in {r['classes']} classes "
            f"(fingerprint {r['data_fingerprint'][:12]})",
            f"{r['world_size']} process(es) × {r['per_rank_batch']} images = batch {r['global_batch']}; "
            f"lr {r['peak_lr']:g} (base {self.args.base_lr:g} × {r['global_batch']}/256), warm-up "
            f"{r['warmup_steps']} steps",
            f"{r['steps_per_epoch']} steps per epoch, {r['total_steps']} steps in {self.args.epochs} epochs"
            + (f", stopping at step {r['last_step']}" if r["last_step"] < r["total_steps"] else ""),
            f"device {r['device']}, amp {r['amp']}; torch {v['torch']}, intl_kernels {v['intl_kernels']}, "
            f"git commit {git}; settings in {path}",
        ):
            cli.note(self.prog, line)
        self.logger.log(
            {
                "step": self.step,
                "epoch": self._epoch_of(self.step),
                "event": "resume" if self.resumed_from else "start",
                "resumed_from": self.resumed_from,
                "world_size": r["world_size"],
            }
        )

    def save(self) -> None:
        """Checkpoint (atomic, previous one kept as checkpoint.prev.pth); collective under DDP."""
        rng = _gather_rng(self.rt)
        self.last_save = time.monotonic()
        self.last_ckpt = (self.step, self.ckpt_path)
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
            "data_root": _data_root(self.args.data),
            "data_fingerprint": self.fingerprint,
        }
        ckpt.atomic_save(state, self.ckpt_path, keep_prev=True)

    def _save_due(self) -> bool:
        """--save-every-minutes: rank 0's clock decides, every rank follows (one broadcast a step)."""
        if not self.args.save_every_minutes:
            return False
        due = time.monotonic() - self.last_save >= 60 * self.args.save_every_minutes
        if self.rt.distributed:
            flag = torch.tensor([int(due)], device=self.rt.device)
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def export(self) -> Path:
        """Write ``<arch>.pth``: the online backbone's state dict (loads into torchvision.models.<arch>)."""
        path = self.exp / f"{self.args.arch}.pth"
        if self.rt.is_main:
            ckpt.atomic_save(backbone_state(self.model), path)
        return path

    def _epoch_of(self, step: int) -> int:
        """The 1-based epoch that step ``step`` (1-based) belongs to; 0 before the first step."""
        return -(-step // self.steps_per_epoch)

    # ------------------------------------------------------------------ steps

    def _forward(
        self, crops: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """(loss, target embeddings or None, online embeddings)."""
        with torch.autocast(
            self.rt.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None
        ):
            if self.ema is not None:
                with torch.no_grad():
                    target = self.ema([crops[0]])[0]
                online = self.net(crops[1:])
            else:
                emb = self.net(crops)
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
            if self.last_ckpt is None:
                kept = "No checkpoint had been written yet"
            else:
                kept = (
                    f"The last checkpoint (step {self.last_ckpt[0]}, {self.last_ckpt[1]}) is kept as it was"
                )
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.step + 1} (epoch {self.epoch + 1}); "
                f"stopping. {kept}; try a lower --base-lr or --amp none"
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
        """The spectrum of the global batch's embeddings (a collective: every rank calls it)."""
        stats = monitor.global_spectrum(z, self.step, self.args.collapse_fraction)
        if stats is None:
            return {}
        self.logger.log_spectrum(self.step, stats)
        return {k: stats[k] for k in ("ioc", "erank", "rank_bound", "collapsed")}

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
                loader=self.args.loader,
            )
            self.logger.log_knn({"step": self.step, "epoch": self.epoch, **res})
        runtime.barrier(self.rt)
        return res

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        """Train until --epochs or --max-steps; returns a summary."""
        args, rt = self.args, self.rt
        progress = monitor.Progress(
            self.last_step, self.step, f"{self.prog} step", rt.is_main, args.progress_interval
        )
        last_loss = float("nan")
        tick, seen, data_s, steps = time.perf_counter(), 0, 0.0, 0
        self.model.train()
        while self.step < self.last_step and self.epoch < args.epochs:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start_batch = self.batch
            fetch = time.perf_counter()
            for views, _, skipped in self.loader:
                data_s += time.perf_counter() - fetch
                out = self.train_step(views)
                self.skipped += int(skipped.sum())
                seen += args.batch_size
                steps += 1
                row, shown = None, {"epoch": f"{self.epoch + 1}/{args.epochs}"}
                if self.step % args.log_every == 0 or self.step == self.last_step:
                    last_loss = float(out["loss"])
                    now = time.perf_counter()
                    ips = seen / max(now - tick, 1e-9)
                    row = {
                        "step": self.step,
                        "epoch": self.epoch + 1,
                        "loss": last_loss,
                        "lr": out["lr"],
                        "images_per_s": ips,
                        "step_s": (now - tick) / steps,
                        "data_s": data_s / steps,
                    }
                    tick, seen, data_s, steps = now, 0, 0.0, 0
                    if "loss_mse" in out:
                        row["loss_mse"] = float(out["loss_mse"])
                        row["loss_trace"] = last_loss - row["loss_mse"]
                    if self.skipped:
                        row["skipped_images"] = self.skipped
                    shown.update(loss=f"{last_loss:.4f}", lr=f"{out['lr']:.3g}")
                    shown["img/s"] = f"{ips:.0f}"
                if args.spectrum_every and (
                    self.step % args.spectrum_every == 0 or self.step == self.last_step
                ):
                    stats = self.spectrum(out["embedding"])
                    if rt.is_main:
                        row = row or {"step": self.step, "epoch": self.epoch + 1}
                        row.update(stats)
                if row is not None and rt.is_main:
                    self.logger.log(row)
                progress.update(1, **shown)
                mid_epoch = self.batch < self.steps_per_epoch
                timed = self._save_due()
                if mid_epoch and ((args.ckpt_every and self.step % args.ckpt_every == 0) or timed):
                    self.save()
                if self.step >= self.last_step:
                    break
                fetch = time.perf_counter()
            if self.batch >= self.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
                self.save()
                if rt.is_main and args.keep_every and self.epoch % args.keep_every == 0:
                    ckpt.keep_snapshot(self.ckpt_path, self.exp / SNAPSHOT.format(self.epoch))
                self.export()
                if args.knn_every and self.epoch % args.knn_every == 0:
                    self.knn()
        progress.close()
        if self.batch:  # stopped inside an epoch by --max-steps
            self.save()
        backbone = self.export()
        summary = {
            "step": self.step,
            "epoch": self._epoch_of(self.step),
            "epochs_completed": self.epoch,
            "loss": last_loss,
            "checkpoint": str(self.ckpt_path),
            "backbone": str(backbone),
            "exp_dir": str(self.exp),
        }
        if rt.is_main:
            png = monitor.plot_spectra(self.exp / "spectrum.jsonl", self.exp / "spectrum.png")
            summary["spectrum_png"] = None if png is None else str(png)
            if png is None:
                why = (
                    "--spectrum-every 0 turns the spectrum monitor off"
                    if not args.spectrum_every
                    else "no spectrum was recorded (no training step was taken)"
                )
                cli.note(self.prog, f"no spectrum.png: {why}")
            if self.skipped:
                summary["skipped_images"] = self.skipped
            self.logger.close()
        return monitor.json_safe(summary)

    def close(self) -> None:
        """Let go of the process group: drop the DDP wrapper (its reducer holds the group). The
        Trainer itself may outlive this (rank 0's is kept by frames of a traceback caught inside
        matplotlib), so the group would otherwise be freed only at exit."""
        self.ddp = None
        self.net = None


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, train, print a JSON summary (rank 0, last line of stdout) and return it.

    Raises UsageError (bad flags, data or exp-dir) and RunError (a non-finite loss); ``cli``
    turns them into one line and an exit status.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_args(args, cli.env_world_size())
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
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        trainer = Trainer(args, rt, parser.prog, argv)
        try:
            summary = trainer.run()
        finally:
            trainer.close()
        if rt.is_main:
            print(monitor.dumps(summary), flush=True)
        finished = True
        return summary
    finally:
        for held in lock:
            held.release()
        runtime.cleanup(synchronize=finished)


def cli_main(argv: list[str] | None = None) -> None:
    """The ``intl-pretrain`` command: ``main`` with one-line errors and exit statuses."""
    cli.entry(main, build_parser().prog, argv)


if __name__ == "__main__":
    cli_main()
