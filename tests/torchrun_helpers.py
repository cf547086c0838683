"""Helpers of the torchrun fault tests (test_restart.py, test_multinode.py): launching agents with
their output in files, finding their workers by rank and round in /proc, waiting on the files a run
writes, comparing final checkpoints, and stopping every process a test started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from test_train import ROOT, TINY

# 64 images of 16 px, global batch 8: 8 steps per epoch; checkpoints every 5 steps and at epoch ends.
PER_CLASS, BATCH, CKPT_EVERY = 32, 8, 5
STEPS_PER_EPOCH = 2 * PER_CLASS // BATCH
TRAIN = [*TINY, "--crop-size", "16", "--batch-size", str(BATCH), "--epochs", "50"]
TRAIN += ["--ckpt-every", str(CKPT_EVERY), "--spectrum-every", "0"]
# Every torchrun the fault tests start: a new rendezvous store per round (see train/runtime.py).
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def checkpoint_steps_before(step: int) -> int:
    """The last step < ``step`` after which a checkpoint is written (--ckpt-every and epoch ends).
    A stats.jsonl row of step s is written after that checkpoint is complete, so a run killed
    once the row is seen resumes from this step or a later one."""
    return max(c for c in range(step) if c % CKPT_EVERY == 0 or c % STEPS_PER_EPOCH == 0)


def is_checkpoint_step(step: int) -> bool:
    return step % CKPT_EVERY == 0 or step % STEPS_PER_EPOCH == 0


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", **NO_SHARED_STORE, **extra}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    return out


class Processes:
    """The agents a test started (and the workers it saw): all killed at the end of the test."""

    def __init__(self) -> None:
        self.agents: list[subprocess.Popen] = []
        self.workers: set[int] = set()

    def start(self, cmd: list[str], log: Path, cwd: Path, environ: dict[str, str]) -> subprocess.Popen:
        """Start ``cmd`` with stdout in ``log``.out and stderr in ``log``.err (files, not pipes:
        a pipe nobody reads would block the run once it is full)."""
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=out, stderr=err)
        self.agents.append(proc)
        return proc

    def stop(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                self.workers.update(children(agent.pid))
                agent.kill()
            agent.wait()
        for pid in self.workers:  # orphans of a killed agent (they also get SIGTERM, see runtime.py)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def torchrun(*launcher_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args]


def pretrain_args(data: Path, exp: Path, last_step: int) -> list[str]:
    return ["-m", "train.pretrain", "--data", str(data), "--exp-dir", str(exp), "--max-steps", str(last_step)]


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, waiting to be reaped by whoever adopted it, has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def worker(agent: subprocess.Popen, rank: int, round_: int) -> int | None:
    """The pid of the agent's worker of global rank ``rank`` in restart round ``round_`` (its
    TORCHELASTIC_RESTART_COUNT), read from the workers' environments; None if it is not running."""
    for pid in children(agent.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        want = {f"RANK={rank}".encode(), f"TORCHELASTIC_RESTART_COUNT={round_}".encode()}
        if want <= set(environ) and alive(pid):
            return pid
    return None


def stats_rows(exp: Path) -> list[dict]:
    """The complete rows of stats.jsonl (a row being appended this instant is left out)."""
    try:
        lines = (exp / "stats.jsonl").read_text().split("\n")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines[:-1] if line]


def round_rows(exp: Path, round_: int) -> list[dict] | None:
    """The rows of restart round ``round_`` (those after its start/resume event), None before it
    wrote its event. On resume the trainer drops the rows after its checkpoint step, so the file
    holds one event row per round, in order."""
    rows = stats_rows(exp)
    events = [i for i, r in enumerate(rows) if "event" in r]
    if len(events) <= round_:
        return None
    return rows[events[round_] + 1 :]


def wait_for(condition, what: str, agents: list[subprocess.Popen], log: Path, timeout: float = 300.0):
    """Poll ``condition()`` until it returns something true, and return that. Fails if an agent
    exits first or after ``timeout`` seconds (generous: it only bounds a failure; nothing waits
    for a fixed time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for agent in agents:
            assert agent.poll() is None, f"torchrun exited ({agent.returncode}) before {what}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s: {what}:\n{tail(log)}"
        time.sleep(0.02)


def tail(log: Path, chars: int = 4000) -> str:
    return Path(f"{log}.err").read_text()[-chars:]


def finish(agent: subprocess.Popen, log: Path, timeout: float = 300.0, status: int = 0) -> str:
    """Wait for the agent to exit with ``status``; its stderr."""
    try:
        agent.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"torchrun still running after {timeout:.0f} s:\n{tail(log)}") from None
    err = Path(f"{log}.err").read_text()
    assert agent.returncode == status, (
        f"torchrun exited with {agent.returncode}, not {status}:\n{err[-4000:]}"
    )
    return err


def resumed_steps(err: str) -> list[int]:
    """The steps of the trainer's "resumed from step N of ..." lines, in order."""
    marker = "resumed from step "
    return [int(line.split(marker)[1].split()[0]) for line in err.splitlines() if marker in line]


def losses(exp: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in stats_rows(exp) if "loss" in r}


def assert_same_final_state(exp: Path, ref: Path, rtol: float = 0.0, atol: float = 0.0) -> None:
    """The final checkpoints of two runs: position, model (parameters and BN statistics) and
    optimizer state (momentum buffers) equal within rtol/atol (0: bit for bit), and the logged
    loss of every step."""
    got = torch.load(exp / "checkpoint.pth", weights_only=True)
    want = torch.load(ref / "checkpoint.pth", weights_only=True)
    for key in ("step", "epoch", "batch", "world_size"):
        assert got[key] == want[key], f"{key}: {got[key]} != {want[key]}"
    assert got["model"].keys() == want["model"].keys()
    pairs = [(f"model {k}", got["model"][k], want["model"][k]) for k in want["model"]]
    for i, s in want["optimizer"]["state"].items():
        pairs += [(f"optimizer state {i} {k}", got["optimizer"]["state"][i][k], v) for k, v in s.items()]
    for what, a, b in pairs:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, w=what: f"{w}: {m}")
    got, want = losses(exp), losses(ref)
    assert got.keys() == want.keys()
    differ = [s for s in want if abs(got[s] - want[s]) > atol + rtol * abs(want[s])]
    assert not differ, f"losses differ at steps {differ}: {[(got[s], want[s]) for s in differ]}"


def start_reference(
    procs: Processes, root: Path, data: Path, last_step: int
) -> tuple[subprocess.Popen, Path]:
    """Start an uninterrupted two-process run on one node (torchrun --standalone) in ``root``:
    (its agent, its exp-dir); ``finish(agent, root / "ref")`` waits for it."""
    root.mkdir(parents=True, exist_ok=True)
    exp = root / "ref"
    cmd = torchrun("--standalone", "--nproc-per-node", "2") + pretrain_args(data, exp, last_step) + TRAIN
    return procs.start(cmd, exp, root, env()), exp


def reference_run(root: Path, data: Path, last_step: int) -> Path:
    """An uninterrupted two-process run on one node (torchrun --standalone): the exp-dir."""
    procs = Processes()
    try:
        agent, exp = start_reference(procs, root, data, last_step)
        finish(agent, root / "ref")
    finally:
        procs.stop()
    return exp
