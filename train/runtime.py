"""Process set-up shared by the entry points: torchrun/DDP, device choice, seeds, versions.

Launched by ``torchrun`` (RANK, WORLD_SIZE and LOCAL_RANK in the environment) the process
joins a process group: NCCL on GPUs, gloo on CPUs, after refusing a launch whose restarts would
fail (``check_restartable_launch``). Without torchrun it is a single process and no process
group is created. ``from_main`` hands a decision of rank 0 to every rank.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .cli import PeerFailed, UsageError, check_device

T = TypeVar("T")

if dist.is_available():
    # Imported before any process group exists: its functions take ``group=group.WORLD`` as a default
    # argument, evaluated at import (torch._dynamo imports it, and DDP's constructor imports dynamo).
    # Imported after init_process_group it would hold the world group past destroy_process_group,
    # to be freed only in interpreter finalization at exit, its gloo threads still running there.
    import torch.distributed.nn.functional  # noqa: F401


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: rank, world size, local rank and the torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes files and shows progress)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True inside a process group of more than one rank."""
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device: str = "auto", threads: int = 0) -> Runtime:
    """Choose the device and, under torchrun, join the process group.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cuda"`` or ``"cpu"``.
        threads: torch's intra-op CPU threads (0: leave torch's default). Small CPU models
            run far faster with 1 thread on a busy machine (no spinning OpenMP workers).

    Returns:
        the Runtime of this process.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device must be auto, cuda or cpu, got {device!r}")
    if threads < 0:
        raise UsageError(f"--threads must be an integer >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    use_cuda = check_device(device).type == "cuda"
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world is None:
        rank, world, local_rank = 0, 1, 0
    local_rank = rank if local_rank is None else local_rank
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        _stop_with_launcher()  # first: a rank waiting in check_restartable_launch ends with torchrun too
        check_restartable_launch()
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=dev)


# How long a rank other than 0 that refuses the launch waits for torchrun to stop it before it
# reports the refusal itself (see check_restartable_launch): far longer than rank 0 can lag behind
# it on the way to the same check, which takes seconds.
REFUSAL_WAIT_S = 60.0


def restart_refusal() -> str | None:
    """Why this torchrun launch's restarts would fail (the message of ``check_restartable_launch``),
    or None when they would not (or it is no torchrun launch that restarts).

    With TORCHELASTIC_USE_AGENT_STORE=True the workers' process group lives in torchrun's own
    TCPStore, which survives a restart of the workers (pytorch issue #135712). The restarted workers
    find the previous round's keys there (gloo's peer addresses, NCCL's unique id), read them instead
    of the new ones and fail to connect ("Connection refused") or hang: measured on torch 2.14.1,
    13 of 16 runs with a SIGKILLed worker failed to recover. With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    in torchrun's environment the c10d rendezvous gives every round a new store (0 failures in 20).
    The static rendezvous (--master-addr/--master-port) always shares its store, whatever that
    variable says (4 and 5 of 6 runs failed, without and with it).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restarts = _env_int("TORCHELASTIC_MAX_RESTARTS") or 0
    if restarts <= 0:
        return None
    cause = (
        f"torchrun may restart the workers (--max-restarts {restarts}) but shares its rendezvous store "
        "with them (TORCHELASTIC_USE_AGENT_STORE=True), so restarted workers would find the previous "
        "round's addresses there and fail to connect (pytorch issue #135712)"
    )
    if os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1":  # set, yet shared: static rendezvous
        return (
            f"{cause}; the static rendezvous (--master-addr/--master-port) shares it whatever "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE says: launch with --rdzv-backend c10d --rdzv-endpoint "
            "HOST:PORT --rdzv-id ID (one node: --standalone), or with --max-restarts 0"
        )
    return (
        f"{cause}; launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment "
        "(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --rdzv-backend c10d ... or --standalone), "
        "or with --max-restarts 0"
    )


def check_restartable_launch(wait_s: float = REFUSAL_WAIT_S) -> None:
    """Refuse a torchrun launch whose restarts would fail (``restart_refusal`` says why): the
    launcher shares its store with the workers and may restart them. Failing here, in the first
    seconds, beats failing at the first fault hours later. (torchrun then restarts the refusing
    workers --max-restarts times; each round refuses the same way.)

    Rank 0 raises at once; the entry points print the one line and exit with status 2. Every other
    rank waits for torchrun to stop it (SIGTERM, once it sees rank 0 fail), at most ``wait_s``
    seconds: a rank that exited at once could be seen failing first, and torchrun would then stop
    rank 0 before it printed anything (measured: rank 0 five seconds late lost its line, and the run
    ended on a bare "exitcode: 2"). A rank still waiting after ``wait_s`` (rank 0 did not refuse:
    a node launched with another environment) prints the line itself, naming its rank, and raises.

    Raises:
        UsageError: restarts are allowed (TORCHELASTIC_MAX_RESTARTS > 0) and the store is shared.
    """
    message = restart_refusal()
    if message is None:
        return
    rank = _env_int("RANK") or 0
    if rank != 0:
        time.sleep(wait_s)  # ended early by torchrun's SIGTERM (SystemExit in the entry points)
        print(f"rank {rank}: error: {message}", file=sys.stderr, flush=True)
    raise UsageError(message)


def _stop_with_launcher() -> None:
    """Under torchrun on Linux, ask the kernel for SIGTERM when the launcher dies (PR_SET_PDEATHSIG).

    Without it, a ``kill -9`` of torchrun leaves its workers running on, orphaned, still writing
    to the exp-dir. SIGTERM becomes SystemExit in the entry points, so the lock is released.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the exp-dir lock still guards the files
        return


def from_main(rt: Runtime, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its result (or its error) handed to every rank.

    For decisions only rank 0 may take (creating and locking the exp-dir, choosing and setting
    aside checkpoints). A UsageError on rank 0 is raised on every rank (rank 0 alone prints
    it); any other error of rank 0 makes the other ranks raise PeerFailed (quiet, status 1).
    """
    if not rt.distributed:
        return fn()
    payload: list = [None]
    error: BaseException | None = None
    if rt.is_main:
        try:
            payload = [("ok", fn())]
        except UsageError as err:
            error, payload = err, [("usage", str(err))]
        except BaseException as err:
            error, payload = err, [("fail", f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    kind, value = payload[0]
    if kind == "usage":
        raise UsageError(value)
    if kind == "fail":
        raise PeerFailed(f"rank 0 failed: {value}")
    return value


def cleanup(synchronize: bool = False) -> None:
    """Leave the process group (if one was joined) in order, while the interpreter is whole.

    Call it once this process has let go of the group (drop DDP models first: their reducers hold
    it), so that destroy_process_group frees the group, its gloo threads and its store connection
    here, not in interpreter finalization at exit (where a gloo thread that needs the GIL aborts
    the process: "terminate called without an active exception").

    Args:
        synchronize: first wait for every rank at a barrier, so that no rank tears down while another
            is still in its last collective. Only on the success path: after an error the other
            ranks may never reach the barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize and dist.get_world_size() > 1:
        dist.barrier()
    # Objects in reference cycles (e.g. frames kept by a caught exception's traceback) are freed
    # only by the garbage collector: collect them now, so that a DDP model among them lets go of the
    # group before it is destroyed rather than at exit.
    gc.collect()
    dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    """Wait for every rank (no-op in a single process)."""
    if rt.distributed:
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict:
    """Python, torch, torchvision and intl_kernels versions, and the git commit of this code when
    it runs from a git checkout (``git_dirty``: tracked files differ from that commit)."""
    import torchvision

    import intl_kernels

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "intl_kernels": intl_kernels.__version__,
        "git_commit": None,
        "git_dirty": None,
    }
    # Only when this file is tracked: an installed copy inside some other repository has no commit.
    if _git("ls-files", "--error-unmatch", os.path.basename(__file__)) is not None:
        out["git_commit"] = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        out["git_dirty"] = None if status is None else bool(status)
    return out
