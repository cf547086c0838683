"""Atomic checkpoints with a fallback, and the random-generator states a resume restores.

``save`` writes ``<name>.tmp`` next to the target, fsyncs it, moves the current
checkpoint to ``<stem>.prev.pth`` and renames the temporary file into place (then fsyncs
the folder), so a crash at any point leaves a complete checkpoint or a complete previous
one. ``load_latest`` reads the checkpoint, and when it is truncated or corrupt says so and
falls back to the previous one.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

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


def _read(path: Path, required: tuple[str, ...]) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"not a checkpoint of this trainer (format {FORMAT!r} expected)")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"missing entries {missing}")
    return obj


def load_latest(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict | None:
    """The newest readable checkpoint: ``path``, else ``<stem>.prev.pth``; None when neither exists.

    A truncated or corrupt file is reported on stderr (naming the file and the error) and
    the previous checkpoint is used; when both exist and neither is readable, a
    RuntimeError names both.
    """
    path = Path(path)
    errors = []
    for candidate in (path, prev_path(path)):
        if not candidate.exists():
            continue
        try:
            obj = _read(candidate, required)
        except Exception as err:  # a truncated zip, a bad pickle, a foreign file: all mean "unusable"
            msg = f"checkpoint {candidate} is truncated or corrupt ({type(err).__name__}: {err})"
            errors.append(msg)
            print(f"warning: {msg}; trying the previous checkpoint", file=sys.stderr, flush=True)
            continue
        if candidate != path:
            print(f"resuming from the previous checkpoint {candidate}", file=sys.stderr, flush=True)
        return obj
    if errors:
        raise RuntimeError("no usable checkpoint: " + "; ".join(errors) + "; delete them to start afresh")
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
