"""Command-line plumbing shared by the entry points: user errors, flag checks, exit statuses.

A mistake in the command line or in what it names (a bad flag value, a missing folder, an
exp-dir in use by another run) raises ``UsageError``. The entry points (``cli`` in each
script, also the console scripts ``intl-pretrain``, ``intl-knn-eval``, ``intl-linear-eval``)
print it as one line ``<prog>: error: <message>`` and exit with status 2, as argparse does
for the flags it checks itself. A run that stops for a reason it can explain (a non-finite
loss) raises ``RunError``: one line, status 1. Anything else keeps its traceback.

Under torchrun every rank reaches the same decision (the flags and files are the same, and a
decision only rank 0 can take, such as the exp-dir lock, is broadcast), and only rank 0
prints it. ``main`` functions raise these errors instead of exiting, so they can be called
from Python (the tests, the demo).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import signal
import sys
from collections.abc import Callable

import torch


class UsageError(ValueError):
    """A mistake in the command line or in the files it names: one line, exit status 2."""


class RunError(RuntimeError):
    """The run stopped for a reason it can state in one line (exit status 1)."""


class PeerFailed(RuntimeError):
    """Rank 0 failed with an error it reports itself; this rank stops without printing."""


def env_rank() -> int:
    """This process's rank under torchrun (0 without it), readable before any process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def env_world_size() -> int:
    """The number of processes under torchrun (1 without it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def utc_stamp() -> str:
    """The current UTC time for file names: ``20250131T235959Z``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def utc_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def note(prog: str, message: str) -> None:
    """One line on stderr from rank 0: what the run decided or noticed (not an error)."""
    if env_rank() == 0:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, printed by rank 0 only (every rank exits with status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if env_rank() == 0:
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)

    def print_help(self, file=None) -> None:
        if env_rank() == 0:
            super().print_help(file)


def prog_name(module: str, script: str) -> str:
    """How the user started the entry point: the console script, ``python -m train.X`` (in a
    checkout) or ``python -m intl_kernels.train.X``."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == script:
        return script
    return f"python -m {module}"


# ----------------------------------------------------------------------------- flag checks


def flag(dest: str) -> str:
    """``batch_size`` → ``--batch-size``."""
    return "--" + dest.replace("_", "-")


def check_int(args: argparse.Namespace, dest: str, minimum: int = 0, maximum: int | None = None) -> None:
    """``args.<dest>`` (None: not given) must be an integer in [minimum, maximum]."""
    value = getattr(args, dest)
    if value is None:
        return
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UsageError(f"{flag(dest)} must be an integer {bound}, got {value}")


def check_float(
    args: argparse.Namespace,
    dest: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``args.<dest>`` (None: not given) must be finite and within the (half-)open interval."""
    value = getattr(args, dest)
    if value is None:
        return
    parts = []
    if low is not None:
        parts.append(f"> {low:g}" if low_open else f">= {low:g}")
    if high is not None:
        parts.append(f"< {high:g}" if high_open else f"<= {high:g}")
    want = "a finite number" + (f" {' and '.join(parts)}" if parts else "")
    ok = math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise UsageError(f"{flag(dest)} must be {want}, got {value}")


def check_device(device: str) -> torch.device:
    """The torch device of ``--device`` (auto: CUDA when available)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(
        "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    )


def check_exp_dir(path: str) -> None:
    """``--exp-dir`` must be a folder or not exist yet (it is created), not a file."""
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if os.path.exists(p) and not os.path.isdir(p):
        what = "is a file" if p == os.path.abspath(path) else f"is inside {p}, which is a file"
        raise UsageError(f"--exp-dir {path} {what}; expected a folder (created if missing)")


def make_exp_dir(path: str) -> None:
    """Create ``--exp-dir`` (rank 0), turning the OS's refusal into a one-line user error."""
    check_exp_dir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--exp-dir {path}: cannot create it ({err.strerror or err})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--exp-dir {path}: not writable")


# ----------------------------------------------------------------------------- entry


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (torchrun stopping its workers, a scheduler's time limit, or the launcher's death
    # through PR_SET_PDEATHSIG) becomes SystemExit, so `finally` blocks release the exp-dir lock.
    raise SystemExit(128 + signum)


def entry(main: Callable[[list[str] | None], object], prog: str, argv: list[str] | None = None) -> None:
    """Run ``main(argv)`` as a command: user errors in one line (status 2), run errors in one
    line (status 1), printed by rank 0 only; SIGTERM exits through the ``finally`` blocks."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        previous = None
    try:
        main(argv)
    except UsageError as err:
        if env_rank() == 0:
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunError as err:
        if env_rank() == 0:
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except PeerFailed:
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
