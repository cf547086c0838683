"""Atomic checkpoints with a fallback, and the random-generator states a resume restores.

``atomic_save`` writes ``<name>.tmp`` next to the target, fsyncs it, moves the current
checkpoint to ``<stem>.prev.pth`` and renames the temporary file into place (then fsyncs
the folder), so a crash at any point leaves a complete checkpoint or a complete previous
one. ``load_latest`` reads the checkpoint, and when it is truncated or corrupt says so and
falls back to the previous one; the unreadable file is then renamed
``<stem>.corrupt-<UTC time><suffix>`` (``checkpoint.corrupt-20250131T235959Z.pth``), so the
next save cannot rotate it over the good previous checkpoint. ``keep_snapshot`` adds a
hard link (or a copy) that rotation never touches.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .cli import UsageError, utc_stamp

FORMAT = "intl_kernels.train/1"


def prev_path(path: Path) -> Path:
    """``checkpoint.pth`` → ``checkpoint.prev.pth``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: object, path: str | os.PathLike, keep_prev: bool = False) -> None:
    """torch.save to a temporary file, fsync, (keep the old file as .prev), rename into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_prev and path.exists():
        os.replace(path, prev_path(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def keep_snapshot(path: str | os.PathLike, keep: str | os.PathLike) -> None:
    """Make ``keep`` a lasting copy of checkpoint ``path``: a hard link (no extra space; the
    rotation of ``path`` renames and replaces it, the link keeps its content) or, where the
    file system has no hard links, a copy written atomically."""
    path, keep = Path(path), Path(keep)
    tmp = keep.with_name(keep.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, keep)
    _fsync_dir(keep.parent)


def corrupt_path(path: Path) -> Path:
    """A free name for setting an unreadable ``path`` aside: ``<stem>.corrupt-<UTC><suffix>``."""
    base = f"{path.stem}.corrupt-{utc_stamp()}"
    out = path.with_name(base + path.suffix)
    n = 1
    while out.exists():
        out = path.with_name(f"{base}-{n}{path.suffix}")
        n += 1
    return out


def _read(path: Path, required: tuple[str, ...]) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"not a checkpoint of this trainer (format {FORMAT!r} expected)")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"missing entries {missing}")
    return obj


def load_latest(
    path: str | os.PathLike, required: tuple[str, ...] = (), set_aside: bool = False
) -> tuple[dict, Path] | None:
    """The newest readable checkpoint and its path: ``path``, else ``<stem>.prev.pth``; None
    when neither exists.

    A truncated or corrupt file is reported on stderr (naming the file and the error) and
    the previous checkpoint is used. With ``set_aside`` (only the process that owns the folder:
    rank 0 holding the exp-dir lock), the unreadable file is then renamed
    ``<stem>.corrupt-<UTC time><suffix>``. When files exist and none is readable, a UsageError
    names them all, and nothing is renamed (the next start says the same).
    """
    path = Path(path)
    errors, bad = [], []
    for candidate in (path, prev_path(path)):
        if not candidate.exists():
            continue
        try:
            obj = _read(candidate, required)
        except Exception as err:  # a truncated zip, a bad pickle, a foreign file: all mean "unusable"
            msg = f"checkpoint {candidate} is truncated or corrupt ({type(err).__name__}: {err})"
            errors.append(msg)
            bad.append(candidate)
            print(f"warning: {msg}; trying the previous checkpoint", file=sys.stderr, flush=True)
            continue
        if candidate != path:
            print(f"resuming from the previous checkpoint {candidate}", file=sys.stderr, flush=True)
        if set_aside:
            for b in bad:
                aside = corrupt_path(b)
                os.replace(b, aside)
                print(f"set the unreadable {b} aside as {aside}", file=sys.stderr, flush=True)
            if bad:
                _fsync_dir(path.parent)
        return obj, candidate
    if errors:
        raise UsageError("no usable checkpoint: " + "; ".join(errors) + "; move them away to start afresh")
    return None


def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and CUDA generator states (tensors and ints only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": (version, torch.tensor(internal, dtype=torch.int64), gauss),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
