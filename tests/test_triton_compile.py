"""Every Triton kernel variant compiles to a cubin for sm_80 and sm_90 (no GPU needed).

The interpreter tests check what the kernels compute; only the real compiler checks dot
shapes, dtype rules and constexpr branches. This runs ``intl_kernels.triton.compile_check
--quick`` (the CI subset, ~3 minutes on 2 cores) in a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "intl_kernels.triton.compile_check", "--quick", "--arch", "80,90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "0 failures" in out, out[-8000:]
