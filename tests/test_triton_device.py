"""Every triton launch runs with the tensors' GPU as the current CUDA device (no GPU needed).

Triton launches a kernel on the current CUDA device, whatever device its tensors are on. The
launchers make the tensors' device current (``_on_tensor_device``). Here the launchers run on
fake tensors on ``cuda:1`` (FakeTensorMode: shapes, dtypes and devices, no memory) inside the
launch recorder, with ``torch.cuda.device`` replaced by a stand-in that tracks the current
device, and every kernel launch records the device current at that moment. The two-GPU test on
real tensors is ``tests/test_triton_cuda.py::test_launches_on_the_tensors_device``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = """
import contextlib, json
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime import jit
from intl_kernels.triton import launches
from intl_kernels.triton import whiten as W

current = []  # the stand-in's stack of current devices

class StandInDevice:
    def __init__(self, device):
        self.index = torch.device(device).index
    def __enter__(self):
        current.append(self.index)
    def __exit__(self, *exc):
        current.pop()

launched = []

def run(self, *args, **kwargs):  # records the current device instead of launching
    launched.append((self.fn.__name__, current[-1] if current else None))

torch.cuda.device = StandInDevice
with launches.record():
    recorder_run, jit.JITFunction.run = jit.JITFunction.run, run
    try:
        with FakeTensorMode():
            for G, r, n in GROUPS:
                z = torch.empty(G, r, n, device="cuda:1")
                T = 3
                y, *stats = W._whiten_fwd(z, T, 1e-5, float(n), PREC)
                W._whiten_bwd(torch.empty_like(y), z, *stats, float(n), PREC)
    finally:
        jit.JITFunction.run = recorder_run
print(json.dumps({"launched": launched, "left_current": current}))
"""


def _launches(groups, prec="ieee") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    code = f"GROUPS = {groups!r}\nPREC = {prec!r}\n" + textwrap.dedent(SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_launch_runs_under_the_tensors_device():
    # r = 8 and 64: one-program Newton kernels; r = 100: formula configs with the tiled Newton
    # products; r = 200: the autotuned path (its benchmark launches included)
    out = _launches([(2, 8, 300), (1, 64, 5000), (1, 100, 300), (1, 200, 300)])
    launched = out["launched"]
    kernels = {k for k, _ in launched}
    assert kernels >= {
        "_whiten_rowstats_kernel", "_whiten_gram_kernel", "_whiten_gram_reduce_kernel",
        "_whiten_newton_fwd_kernel", "_whiten_newton_bwd_kernel", "_whiten_newton_prep_kernel",
        "_whiten_mm_kernel", "_whiten_apply_kernel",
    }, kernels  # fmt: skip
    wrong = [(k, d) for k, d in launched if d != 1]
    assert not wrong, f"{len(wrong)} of {len(launched)} launches not under cuda:1, e.g. {wrong[:5]}"
    assert out["left_current"] == [], "the guard restores the previous device"


def test_backward_rejects_dy_on_another_device():
    code = """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from intl_kernels.triton import whiten as W
        with FakeTensorMode():
            z = torch.empty(1, 8, 40, device="cuda:1")
            stats = [torch.empty(1, device="cuda:1")] * 6
            try:
                W._whiten_bwd(torch.empty(1, 8, 40, device="cuda:0"), z, *stats, 40.0)
            except ValueError as exc:
                print(exc)
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dy must be on z's device cuda:1, got cuda:0" in proc.stdout, proc.stdout
