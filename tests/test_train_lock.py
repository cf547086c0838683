"""The exp-dir lock: a live run refuses a second one (two gloo processes under torchrun), a killed
launcher takes its ranks and their lock with it, a stale lock is taken over, another host's lock
needs --break-lock, and the lock is released after errors (CPU, tiny runs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision", reason="the training tests need torchvision")
from test_train import ROOT, TINY, make_image_folder  # noqa: E402
from torchrun_helpers import children  # noqa: E402

from train import linear_eval, pretrain  # noqa: E402
from train.cli import UsageError  # noqa: E402
from train.lock import LOCK_NAME  # noqa: E402

TINY16 = [*TINY, "--crop-size", "16", "--epochs", "100000"]
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), size=16)


def _write_lock(exp: Path, **info) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    (exp / LOCK_NAME).write_text(json.dumps({"started": "2025-01-01T00:00:00+00:00", **info}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process (until the system reuses it)
    return proc.pid


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    # Polls a condition on files the other processes write; the deadline only bounds a failure.
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_live_torchrun_run_refuses_a_second_start_and_a_killed_launcher_frees_the_exp_dir(
    tmp_path, data, one_thread, capsys
):
    exp = tmp_path / "exp"
    args = ["--data", str(data), "--exp-dir", str(exp), "--batch-size", "16", *TINY16]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        agent = subprocess.Popen(
            [*launcher, "-m", "train.pretrain", *args, "--max-steps", "1000000"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=err,
        )
    workers: list[int] = []
    try:
        _wait_for(lambda: (exp / "checkpoint.pth").exists() or agent.poll() is not None, "a checkpoint")
        assert agent.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
        workers = children(agent.pid)
        holder = json.loads((exp / LOCK_NAME).read_text())
        assert holder["host"] == HOST and holder["pid"] in workers

        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            pretrain.cli_main([*args, "--max-steps", "1"])
        assert info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"is in use by another run (pid {holder['pid']} on host {HOST}, started " in lines[0]

        agent.send_signal(signal.SIGKILL)  # the launcher dies; its ranks get SIGTERM and clean up
        agent.wait()
        _wait_for(lambda: not (exp / LOCK_NAME).exists(), "the orphaned ranks to release the lock")
    finally:
        for pid in workers:  # only reached by a failure above: never leave ranks behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    step = torch.load(exp / "checkpoint.pth", weights_only=True)["step"]
    capsys.readouterr()
    summary = pretrain.main([*args, "--max-steps", str(step + 1)])  # the exp-dir is free again
    assert summary["step"] == step + 1
    assert "took over the lock" not in capsys.readouterr().err  # released, not left stale


def test_stale_lock_is_taken_over_and_released_at_the_end(tmp_path, data, one_thread, capsys):
    exp = tmp_path / "exp"
    pid = _dead_pid()
    _write_lock(exp, pid=pid, host=HOST)
    pretrain.main(
        ["--data", str(data), "--exp-dir", str(exp), "--batch-size", "8", "--max-steps", "1", *TINY16]
    )
    err = capsys.readouterr().err
    assert f"warning: took over the lock {exp / LOCK_NAME} (stale: pid {pid} on host {HOST}" in err
    assert "which is no longer running" in err
    assert not (exp / LOCK_NAME).exists()


def test_live_or_foreign_lock_is_refused_and_break_lock_takes_it(tmp_path, data, one_thread, capsys):
    exp = tmp_path / "exp"
    args = ["--data", str(data), "--exp-dir", str(exp), "--batch-size", "8", "--max-steps", "1", *TINY16]
    _write_lock(exp, pid=os.getpid(), host=HOST)  # this test process: alive
    with pytest.raises(UsageError, match=rf"is in use by another run \(pid {os.getpid()} on host {HOST}"):
        pretrain.main(args)
    assert json.loads((exp / LOCK_NAME).read_text())["pid"] == os.getpid()  # left alone
    assert not (exp / "checkpoint.pth").exists()

    _write_lock(exp, pid=1234, host="elsewhere.example")
    with pytest.raises(
        UsageError,
        match=r"locked by a run on another host \(pid 1234 on host elsewhere.example.*--break-lock",
    ):
        pretrain.main(args)
    capsys.readouterr()
    pretrain.main([*args, "--break-lock"])
    assert "broken by --break-lock" in capsys.readouterr().err
    assert not (exp / LOCK_NAME).exists()

    # linear_eval locks its exp-dir the same way.
    lin = tmp_path / "linear"
    _write_lock(lin, pid=os.getpid(), host=HOST)
    with pytest.raises(UsageError, match="is in use by another run"):
        linear_eval.main(
            ["--data", str(data), "--pretrained", str(exp / "resnet_tiny.pth"), "--exp-dir", str(lin)]
            + ["--device", "cpu", "--threads", "1", "--workers", "0", "--crop-size", "16"]
        )


def test_lock_is_released_after_an_error(tmp_path, data, one_thread):
    exp = tmp_path / "exp"
    args = ["--data", str(data), "--exp-dir", str(exp), "--max-steps", "1", *TINY16]
    pretrain.main([*args, "--batch-size", "8"])
    with pytest.raises(UsageError, match="different run"):  # raised after the lock was taken
        pretrain.main([*args, "--batch-size", "16"])
    assert not (exp / LOCK_NAME).exists()
    with pytest.raises(pretrain.NonFiniteLossError):
        pretrain.main([*args, "--batch-size", "8", "--max-steps", "10", "--base-lr", "1e30"])
    assert not (exp / LOCK_NAME).exists()
