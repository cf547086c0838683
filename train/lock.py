"""The exp-dir lock: one run at a time writes to an exp-dir.

Rank 0 creates ``<exp-dir>/run.lock`` with O_CREAT | O_EXCL and writes who holds it (pid,
host, start time, the process's start time since boot and the boot id, the command line, a
random token). A second run that finds the file:

- refuses when the holder is alive on this host, naming it;
- takes the lock over, with a warning, when the holder is on this host and not alive (its pid
  is gone, or now belongs to a process started at another time, or the machine was rebooted
  since): the lock of a run that was killed (``kill -9``, an out-of-memory kill, a node crash);
- refuses when the holder is on another host, whose processes cannot be checked from here,
  unless ``--break-lock`` is given (also needed for a lock file that cannot be read).

A take-over renames the old file to a unique name first, reads it back and creates the new
lock with O_EXCL again, so two runs that find the same stale lock at once cannot both win.
The lock is released (the file deleted, if it is still this run's) when the run ends, also
on errors and on SIGTERM (see ``cli.entry``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path

from .cli import UsageError, utc_iso

LOCK_NAME = "run.lock"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...; Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else None."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None  # field 22 of proc(5)
    except (ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))  # a zombie has ended; it waits to be reaped


def holder_alive(info: dict) -> bool:
    """Whether the process described by a lock file of this host is still the one that wrote it."""
    boot = _boot_id()
    if boot is not None and info.get("boot_id") not in (None, boot):
        return False  # written before the last reboot
    pid = info.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return False
    start = _proc_start(pid)
    return start is None or info.get("proc_start") in (None, start)


def describe(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


class ExpDirLock:
    """``<exp_dir>/run.lock`` held by this process (see the module docstring)."""

    def __init__(self, exp_dir: str | os.PathLike, prog: str) -> None:
        self.path = Path(exp_dir) / LOCK_NAME
        self.prog = prog
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": utc_iso(),
            "proc_start": _proc_start(os.getpid()),
            "boot_id": _boot_id(),
            "command": sys.argv,
            "token": uuid.uuid4().hex,
        }
        self.held = False

    def _create(self) -> bool:
        """Create the lock file exclusively; False when it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        self.held = True
        return True

    def _read(self) -> tuple[bytes | None, dict | None]:
        """(content, parsed holder) of the lock file; (None, None) when there is none."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            info = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return raw, None
        return raw, info if isinstance(info, dict) else None

    def _take_over(self, seen: bytes) -> bool:
        """Replace the lock file whose content was ``seen``; False if another run changed it first."""
        aside = self.path.with_name(f"{LOCK_NAME}.old-{self.info['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()
        if aside.read_bytes() != seen:  # a newer lock than the one judged: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        return self._create()

    def acquire(self, break_lock: bool = False) -> None:
        """Take the lock or raise UsageError naming the holder; warnings go to stderr."""
        for _ in range(3):  # another run may change the file between our steps; then judge again
            if self._create():
                return
            raw, info = self._read()
            if raw is None:
                continue  # released in between
            if info is None:  # empty (being written this instant) or not a lock of this trainer
                if not break_lock:
                    raise UsageError(
                        f"--exp-dir {self.path.parent}: the lock file {self.path} cannot be read; if no run "
                        "uses this exp-dir, delete it or pass --break-lock"
                    )
                why = "unreadable"
            elif info.get("host") == self.info["host"]:
                if holder_alive(info):
                    if not break_lock:
                        raise UsageError(
                            f"--exp-dir {self.path.parent} is in use by another run ({describe(info)}; "
                            f"lock file {self.path}); wait for it to end, stop it, or use another --exp-dir"
                        )
                    why = f"held by a live process ({describe(info)}), broken by --break-lock"
                else:
                    why = f"stale: {describe(info)}, which is no longer running"
            else:
                if not break_lock:
                    raise UsageError(
                        f"--exp-dir {self.path.parent} is locked by a run on another host ({describe(info)}; "
                        f"lock file {self.path}); this host cannot tell whether it is still running. If it "
                        "is not, pass --break-lock"
                    )
                why = f"held by {describe(info)}, broken by --break-lock"
            if self._take_over(raw):
                print(
                    f"{self.prog}: warning: took over the lock {self.path} ({why})",
                    file=sys.stderr,
                    flush=True,
                )
                return
        raise UsageError(
            f"--exp-dir {self.path.parent}: another run is taking the lock {self.path} at the same time"
        )

    def release(self) -> None:
        """Delete the lock file if it is still this run's."""
        if not self.held:
            return
        self.held = False
        _, info = self._read()
        if info and info.get("token") == self.info["token"]:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
