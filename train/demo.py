"""``make demo`` (training part): INTL on scikit-learn's digits on the CPU in a few minutes.

    intl-train-demo [--out demo_out/train] [--epochs 25] [--fresh] [--loader torch|dali] [--seed 0]
    python -m train.demo ...                 (in a checkout; make demo runs this)

Pretrains the small ResNet (16-32-64-128, CIFAR stem) with a 512-512-512 projector on the
1347 training digits (upsampled to 16×16 RGB), then measures the encoder on the 450
held-out digits: weighted cosine 20-NN, Euclidean 5-NN and a linear probe, next to the same
architecture at its random initialisation (the very weights training started from). Writes
the spectrum plot ``<out>/pretrain/spectrum.png``. An existing run in ``--out`` is resumed
(or reused when finished); ``--fresh`` starts over.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from . import checkpoint as ckpt
from . import cli, knn_eval, linear_eval, pretrain, runtime
from .models import build_backbone


def _quiet(fn, argv: list[str]) -> dict:
    """Run an entry point with its own printing captured (the demo prints one table)."""
    with redirect_stdout(StringIO()):
        return fn(argv)


def main(argv: list[str] | None = None) -> dict:
    prog = cli.prog_name(__spec__.name if __spec__ else "train.demo", "intl-train-demo")
    p = cli.Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out/train", help="output folder")
    p.add_argument("--epochs", type=int, default=25, help="pretraining epochs (10 steps each)")
    p.add_argument("--probe-epochs", type=int, default=10, help="linear probe epochs")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument(
        "--loader",
        choices=("torch", "dali"),
        default="torch",
        help="data loading (dali: NVIDIA DALI on the CPU)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the pretraining (initial weights, order, augmentations) and of the probes",
    )
    args = p.parse_args(argv)
    for k in ("epochs", "probe_epochs"):
        cli.check_int(args, k, 1)
    cli.check_int(args, "seed", 0)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cpu = ["--device", "cpu", "--threads", "1", "--loader", args.loader, "--seed", str(args.seed)]

    print(f"pretraining INTL on digits for {args.epochs} epochs (CPU) ...", flush=True)
    summary = _quiet(
        pretrain.main,
        ["--data", "digits", "--exp-dir", str(out / "pretrain"), "--epochs", str(args.epochs)]
        + ["--batch-size", "128", "--base-lr", "0.5", "--spectrum-every", "10", *cpu],
    )
    pretrain_s = time.perf_counter() - start

    # the initial weights of the run (pretrain seeds with --seed, then builds the backbone)
    runtime.seed_everything(args.seed)
    random_init = out / "random_init.pth"
    ckpt.atomic_save(build_backbone("resnet_tiny", cifar_stem=True)[0].state_dict(), random_init)

    rows = {}
    for name, path in (("trained", out / "pretrain" / "resnet_tiny.pth"), ("random init", random_init)):
        knn = _quiet(knn_eval.main, ["--data", "digits", "--pretrained", str(path), *cpu])
        probe = _quiet(
            linear_eval.main,
            ["--data", "digits", "--pretrained", str(path), "--epochs", str(args.probe_epochs)]
            + ["--batch-size", "128", "--exp-dir", str(out / f"linear_{name.replace(' ', '_')}"), *cpu],
        )
        rows[name] = {"knn_top1": knn["knn_top1"], "euclidean_5nn_top1": knn["euclidean_5nn_top1"]}
        rows[name]["linear_top1"] = probe["top1"]

    print("\nheld-out digits (450), encoder features (128-d):")
    print(f"{'encoder':<12} {'cosine 20-NN':>13} {'Euclidean 5-NN':>15} {'linear probe':>13}")
    for name, r in rows.items():
        print(
            f"{name:<12} {r['knn_top1']:>12.2f}% {r['euclidean_5nn_top1']:>14.2f}% {r['linear_top1']:>12.2f}%"
        )
    total = time.perf_counter() - start
    print(f"\npretraining {summary['step']} steps: {pretrain_s:.0f} s; total {total:.0f} s")
    print(f"wrote {summary['spectrum_png']}")
    result = {
        "trained": rows["trained"],
        "random_init": rows["random init"],
        "pretrain_s": round(pretrain_s, 1),
    }
    result.update(total_s=round(total, 1), steps=summary["step"], spectrum_png=summary["spectrum_png"])
    print(json.dumps(result), flush=True)
    return result


def cli_main(argv: list[str] | None = None) -> None:
    """The ``intl-train-demo`` command: ``main`` with one-line errors and exit statuses."""
    cli.entry(main, "intl-train-demo", argv)


if __name__ == "__main__":
    cli_main()
