"""Process set-up shared by the entry points: torchrun/DDP, device choice, seeds.

Launched by ``torchrun`` (RANK, WORLD_SIZE and LOCAL_RANK in the environment) the process
joins a process group: NCCL on GPUs, gloo on CPUs. Without torchrun it is a single process
and no process group is created.
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

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
        raise ValueError(f"--device must be auto, cuda or cpu, got {device!r}")
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here; use --device cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
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
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=dev)


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
