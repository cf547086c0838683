"""Watching a run: JSON lines, optional TensorBoard, the spectrum monitor and its plot.

Spectrum monitor. For an (N, D) batch of embeddings Z, the covariance C = Zcᵀ Zc/(N − 1)
(Zc: Z centred over the batch) has at most r = min(N − 1, D) non-zero eigenvalues, the
eigenvalues of the N×N matrix Zc Zcᵀ/(N − 1) (computed in float64). Reported:
``ioc`` = λ_r/λ_1, the inverse condition number over those r eigenvalues (the figure the
INTL paper tracks), and ``erank`` = exp(entropy of λ/Σλ), the effective rank (Roy &
Vetterli, 2007), between 1 (collapse to one direction) and r (a white spectrum).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch


def spectrum(z: torch.Tensor) -> dict:
    """Eigenvalues (descending), inverse condition number and effective rank of z's covariance.

    Args:
        z: (N, D) embeddings, N >= 2.

    Returns:
        {"eigs": list of r floats, "ioc": float, "erank": float, "rank_bound": r}.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"spectrum: z must be (N, D) with N >= 2, got shape {tuple(z.shape)}")
    z = z.detach().double()
    zc = z - z.mean(dim=0, keepdim=True)
    n, d = zc.shape
    r = min(n - 1, d)
    gram = zc @ zc.T / (n - 1)
    eigs = torch.linalg.eigvalsh(gram).flip(0)[:r].clamp_min(0)
    total = float(eigs.sum())
    if total <= 0 or not math.isfinite(total):
        return {"eigs": eigs.tolist(), "ioc": 0.0, "erank": 0.0, "rank_bound": r}
    p = eigs / total
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return {
        "eigs": eigs.tolist(),
        "ioc": float(eigs[-1] / eigs[0]),
        "erank": math.exp(entropy),
        "rank_bound": r,
    }


def truncate_jsonl(path: Path, last: int, key: str = "step") -> None:
    """Keep the lines of a JSON-lines file whose ``key`` is at most ``last`` (after a resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get(key, 0) <= last:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def check_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a RuntimeError saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise RuntimeError(
            f"--tensorboard needs the tensorboard package ({err}); install it with `pip install tensorboard` "
            "or run without --tensorboard (stats.jsonl has the same numbers)"
        ) from None
    return SummaryWriter


class StatsLogger:
    """JSON lines to ``stats.jsonl`` (spectra to ``spectrum.jsonl``), scalars mirrored to TensorBoard.

    On resume from step s, lines after s (written before an interruption) are dropped, so
    the files describe one run without duplicates.
    """

    def __init__(self, exp_dir: str | os.PathLike, resume_step: int = 0, tensorboard: bool = False) -> None:
        self.dir = Path(exp_dir)
        self.stats = self.dir / "stats.jsonl"
        self.spectra = self.dir / "spectrum.jsonl"
        for p in (self.stats, self.spectra):
            if resume_step > 0:
                truncate_jsonl(p, resume_step)
            elif p.exists():
                p.unlink()
        self.writer = check_tensorboard()(log_dir=str(self.dir / "tb")) if tensorboard else None

    def log(self, row: dict) -> None:
        """Append one JSON line (must hold ``step``); numbers also go to TensorBoard."""
        with open(self.stats, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, row["step"])

    def log_spectrum(self, step: int, stats: dict) -> None:
        with open(self.spectra, "a") as f:
            f.write(json.dumps({"step": step, **stats}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def warn_collapse(step: int, stats: dict, fraction: float) -> bool:
    """Print a warning when the effective rank is below ``fraction`` of its maximum; True if it did."""
    limit = fraction * stats["rank_bound"]
    if stats["erank"] < limit:
        print(
            f"warning: step {step}: effective rank of the embeddings {stats['erank']:.2f} is below "
            f"{limit:.2f} ({fraction:g} × {stats['rank_bound']}): the representation may be collapsing",
            file=sys.stderr,
            flush=True,
        )
        return True
    return False


def plot_spectra(
    spectrum_jsonl: str | os.PathLike, png: str | os.PathLike, max_curves: int = 8
) -> Path | None:
    """PNG of the spectrum over training: normalised eigenvalues at up to ``max_curves`` steps,
    and IoC and effective rank against the step. Returns the path, or None without records."""
    rows = []
    path = Path(spectrum_jsonl)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    pick = sorted({round(i * (len(rows) - 1) / max(1, max_curves - 1)) for i in range(max_curves)})
    cmap = plt.get_cmap("viridis")
    for j, i in enumerate(pick):
        eigs = torch.tensor(rows[i]["eigs"], dtype=torch.float64)
        eigs = (eigs / eigs[0].clamp_min(1e-300)).clamp_min(1e-12)
        ax0.semilogy(range(1, len(eigs) + 1), eigs.tolist(), color=cmap(j / max(1, len(pick) - 1)))
        ax0.plot([], [], color=cmap(j / max(1, len(pick) - 1)), label=f"step {rows[i]['step']}")
    ax0.set(xlabel="index", ylabel="λ_i / λ_1", title="embedding covariance spectrum")
    ax0.legend(fontsize=7)
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [max(r["ioc"], 1e-12) for r in rows], color="C0", label="IoC = λ_r/λ_1")
    ax1.set(xlabel="step", ylabel="inverse condition number", yscale="log")
    ax2 = ax1.twinx()
    ax2.plot(steps, [r["erank"] for r in rows], color="C1", label="effective rank")
    ax2.set_ylabel("effective rank")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=7)
    ax1.set_title("inverse condition number and effective rank")
    fig.tight_layout()
    out = Path(png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
