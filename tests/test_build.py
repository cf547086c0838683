"""setup.py decides what to compile without crashing on machines without CUDA."""

from __future__ import annotations

import importlib.util
import os
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_module():
    spec = importlib.util.spec_from_file_location("intl_kernels_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": nothing is built
    return module


def _torch(cuda):
    return types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda))


def test_skip_flag(setup_module, monkeypatch):
    monkeypatch.setenv("INTL_KERNELS_SKIP_CUDA_BUILD", "1")
    assert setup_module._cuda_disabled_reason(_torch("13.0")) == "INTL_KERNELS_SKIP_CUDA_BUILD=1"


def test_cpu_only_torch(setup_module, monkeypatch):
    monkeypatch.delenv("INTL_KERNELS_SKIP_CUDA_BUILD", raising=False)
    assert setup_module._cuda_disabled_reason(_torch(None)) == "torch is not a CUDA build"


def test_no_nvcc(setup_module, monkeypatch, tmp_path):
    monkeypatch.delenv("INTL_KERNELS_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # a toolkit folder without bin/nvcc
    assert "nvcc not found" in setup_module._cuda_disabled_reason(_torch("13.0"))


def test_nvcc_found(setup_module, monkeypatch, tmp_path):
    monkeypatch.delenv("INTL_KERNELS_SKIP_CUDA_BUILD", raising=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup_module._cuda_disabled_reason(_torch("13.0")) is None


@pytest.mark.parametrize("release, builds", [("13.0", True), ("12.8", False)])
def test_nvcc_major_must_match_torch_cuda(setup_module, monkeypatch, tmp_path, release, builds):
    """torch's cpp_extension refuses an nvcc of another CUDA major: the build goes CPU-only and says why."""
    monkeypatch.delenv("INTL_KERNELS_SKIP_CUDA_BUILD", raising=False)
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    reason = setup_module._cuda_disabled_reason(_torch("13.0"))
    if builds:
        assert reason is None
    else:
        assert f"nvcc is CUDA {release}" in reason and "CUDA 13.0" in reason, reason


def test_skip_build_gives_no_extension(setup_module, monkeypatch):
    monkeypatch.setenv("INTL_KERNELS_SKIP_BUILD", "1")
    assert setup_module._ext_modules() == ([], {})


def test_flag_values_are_compared_to_one(setup_module, monkeypatch):
    monkeypatch.setenv("INTL_KERNELS_SKIP_BUILD", "0")
    assert not setup_module._flag("INTL_KERNELS_SKIP_BUILD")
    monkeypatch.setenv("INTL_KERNELS_SKIP_BUILD", " 1 ")
    assert setup_module._flag("INTL_KERNELS_SKIP_BUILD")
