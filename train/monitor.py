"""Watching a run: JSON lines, optional TensorBoard, progress, the spectrum monitor and its plot.

Spectrum monitor. For an (N, D) batch of embeddings Z, the covariance C = Zcᵀ Zc/(N − 1)
(Zc: Z centred over the batch) has at most r = min(N − 1, D) non-zero eigenvalues, the
eigenvalues of the N×N matrix Zc Zcᵀ/(N − 1) (computed in float64). Reported:
``ioc`` = λ_r/λ_1, the inverse condition number over those r eigenvalues (the figure the
INTL paper tracks), and ``erank`` = exp(entropy of λ/Σλ), the effective rank (Roy &
Vetterli, 2007), between 1 (collapse to one direction) and r (a white spectrum). Under
torchrun the batch is the global one: every rank's embeddings are gathered on rank 0 at the
spectrum steps (and only there), so r = min(global batch − 1, D), the largest effective rank
that batch can have; the collapse warning fires below ``--collapse-fraction`` × r.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .cli import UsageError, utc_stamp


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


def gather_batch(z: torch.Tensor) -> torch.Tensor | None:
    """Every rank's (n, D) rows stacked in rank order on rank 0 (None on the other ranks).

    A collective: under torch.distributed every rank must call it, with the same n. Without a
    process group (or with one rank) it returns ``z``.
    """
    z = z.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    rank, world = dist.get_rank(), dist.get_world_size()
    parts = [torch.empty_like(z) for _ in range(world)] if rank == 0 else None
    dist.gather(z.contiguous(), parts, dst=0)
    return torch.cat(parts) if rank == 0 else None


def json_safe(obj: object) -> object:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: object) -> str:
    """Strict JSON of ``obj`` (NaN and infinities as null)."""
    return json.dumps(json_safe(obj), allow_nan=False)


def set_aside(exp_dir: str | os.PathLike, names: list[str]) -> Path | None:
    """Move the files or folders ``names`` that exist in ``exp_dir`` into
    ``exp_dir/earlier-<UTC time>/`` (a fresh start never deletes an earlier run's outputs);
    returns that folder, or None when there was nothing to move."""
    exp = Path(exp_dir)
    present = [n for n in names if (exp / n).exists()]
    if not present:
        return None
    dest = exp / f"earlier-{utc_stamp()}"
    n = 1
    while dest.exists():
        dest = exp / f"earlier-{utc_stamp()}-{n}"
        n += 1
    dest.mkdir()
    for name in present:
        shutil.move(str(exp / name), str(dest / name))
    return dest


def copy_history(src_dir: Path, dst_dir: Path, names: list[str], last: int, key: str = "step") -> list[str]:
    """Copy the JSON lines of ``names`` in ``src_dir`` whose ``key`` is at most ``last`` to
    ``dst_dir`` (a run resumed into a new exp-dir keeps its history); returns the names copied."""
    copied = []
    for name in names:
        src = src_dir / name
        if src.is_file() and not (dst_dir / name).exists():
            shutil.copyfile(src, dst_dir / name)
            truncate_jsonl(dst_dir / name, last, key)
            copied.append(name)
    return copied


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
    """``torch.utils.tensorboard.SummaryWriter``, or a UsageError saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise UsageError(
            f"--tensorboard needs the tensorboard package ({err}); install it with `pip install tensorboard` "
            "or run without --tensorboard (stats.jsonl has the same numbers)"
        ) from None
    return SummaryWriter


# The per-step logs of a pretraining run (a resume truncates them to its step).
STEP_LOGS = ["stats.jsonl", "spectrum.jsonl", "knn.jsonl"]


class StatsLogger:
    """JSON lines to ``stats.jsonl`` (spectra to ``spectrum.jsonl``, online k-NN results to
    ``knn.jsonl``), scalars mirrored to TensorBoard.

    On resume from step s, lines after s (written before an interruption) are dropped, so
    the files describe one run without duplicates. A fresh start finds the files of an
    earlier run already set aside (see ``set_aside``).
    """

    def __init__(self, exp_dir: str | os.PathLike, resume_step: int = 0, tensorboard: bool = False) -> None:
        self.dir = Path(exp_dir)
        self.stats = self.dir / "stats.jsonl"
        self.spectra = self.dir / "spectrum.jsonl"
        self.knn_file = self.dir / "knn.jsonl"
        if resume_step > 0:
            for name in STEP_LOGS:
                truncate_jsonl(self.dir / name, resume_step)
        self.writer = check_tensorboard()(log_dir=str(self.dir / "tb")) if tensorboard else None

    @staticmethod
    def _append(path: Path, row: dict) -> None:
        with open(path, "a") as f:
            f.write(dumps(row) + "\n")

    def log(self, row: dict) -> None:
        """Append one JSON line (must hold ``step``); numbers also go to TensorBoard."""
        self._append(self.stats, row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, row["step"])

    def log_spectrum(self, step: int, stats: dict) -> None:
        self._append(self.spectra, {"step": step, **stats})

    def log_knn(self, row: dict) -> None:
        """An online k-NN result: to ``knn.jsonl`` (all its fields) and ``stats.jsonl`` (top-1)."""
        self._append(self.knn_file, row)
        self.log({"step": row["step"], "epoch": row["epoch"], "knn_top1": row["knn_top1"]})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def warn_collapse(step: int, stats: dict, fraction: float) -> bool:
    """Print a warning when the effective rank is below ``fraction`` of its maximum r (the
    ``rank_bound`` of ``spectrum``: min(N − 1, D) of the batch it saw); True if it did."""
    limit = fraction * stats["rank_bound"]
    if stats["erank"] < limit:
        print(
            f"warning: step {step}: effective rank of the embeddings {stats['erank']:.2f} is below "
            f"{limit:.2f} ({fraction:g} × {stats['rank_bound']}, the largest possible for this batch): "
            "the representation may be collapsing",
            file=sys.stderr,
            flush=True,
        )
        return True
    return False


def global_spectrum(z: torch.Tensor, step: int, fraction: float) -> dict | None:
    """The spectrum monitor at one step, on the global batch: ``spectrum`` of every rank's
    embeddings gathered on rank 0, with ``collapsed`` (whether ``warn_collapse`` fired).

    A collective under torch.distributed (every rank calls it with its (n, D) rows); returns
    None on the ranks other than 0.
    """
    full = gather_batch(z)
    if full is None:
        return None
    stats = spectrum(full)
    stats["collapsed"] = warn_collapse(step, stats, fraction)
    return stats


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of a loop on stderr: a tqdm bar on a terminal; otherwise (a log file, a pipe) a
    plain line at the first update, then at most every ``interval`` seconds, and at the end.

    Args:
        total: number of units (steps) of the whole loop.
        initial: units already done (a resumed run).
        desc: the name at the start of each line.
        enabled: False on ranks other than 0.
        interval: seconds between plain lines (0: a line at every update).
        stream: where to write (default sys.stderr); a bar only if it is a terminal.
        leave: keep the bar on the terminal when done (plain lines always stay).
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "",
        enabled: bool = True,
        interval: float = 30.0,
        stream=None,
        leave: bool = True,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.n, self.desc, self.interval = total, initial, desc, interval
        self.enabled = enabled
        self.start_n, self.start = initial, time.monotonic()
        self.last_line: float | None = None
        self.fields: dict = {}
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        if enabled and tty:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                file=self.stream,
                dynamic_ncols=True,
                mininterval=1.0,
                leave=leave,
            )

    def update(self, n: int = 1, **fields: object) -> None:
        """``n`` more units done; ``fields`` (name=value) are shown beside the count."""
        self.n += n
        self.fields.update(fields)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix(self.fields, refresh=False)
            return
        now = time.monotonic()
        if self.last_line is None or now - self.last_line >= self.interval or self.n >= self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last_line = now
        elapsed = now - self.start
        done = self.n - self.start_n
        eta = (self.total - self.n) * elapsed / done if done > 0 else float("nan")
        parts = [f"{self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"elapsed {_clock(elapsed)}")
        if math.isfinite(eta) and self.n < self.total:
            parts.append(f"ETA {_clock(eta)}")
        print(f"{self.desc}: " + ", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.last_line is not None and self.n < self.total:
            self._line(time.monotonic())  # the last position of a loop that stopped early


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
