"""The CUDA extension without a GPU: compiled and registered (CPU, CUDA and fake kernels),
shapes propagate through fake tensors, the CPU-only build (INTL_KERNELS_SKIP_CUDA_BUILD=1) is
the C++ sources alone and compiles without the CUDA macro, and the built extension carries
PTX and the occupancy its grid planner assumes."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

import intl_kernels as ik
from intl_kernels import _backends

_C = pytest.importorskip("intl_kernels._C", reason="the C++ extension is not built")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("whiten_fwd", "whiten_bwd", "whiten_affine_fwd", "whiten_affine_bwd")


def _setup_module():
    spec = importlib.util.spec_from_file_location("intl_kernels_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_kernels_built_where_setup_can_build_them():
    """With torch built for CUDA and nvcc found, the build compiles the .cu files (as CI does)."""
    if os.environ.get("INTL_KERNELS_SKIP_CUDA_BUILD", "0").strip() == "1":
        pytest.skip("INTL_KERNELS_SKIP_CUDA_BUILD=1 in this environment")
    reason = _setup_module()._cuda_disabled_reason(torch)
    assert _C.cuda_built() == (reason is None), f"cuda_built()={_C.cuda_built()}, setup says: {reason}"


def test_ops_registered_for_cpu_cuda_and_fake():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in OPS:
        name = f"intl_kernels::{op}"
        assert has(name, "CPU"), name
        assert has(name, "CUDA") == _C.cuda_built(), name
        assert torch._library.simple_registry.singleton.find(name).fake_impl.kernel is not None, name


def test_fake_tensor_shapes_on_cuda_device():
    """Shape, dtype, device and layout propagation of the ops for CUDA tensors, without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.empty(8, 128, 5, 5, device="cuda", dtype=torch.bfloat16).to(
            memory_format=torch.channels_last
        )
        z = x.flatten(2).unflatten(1, (2, 64)).permute(1, 2, 0, 3)
        y, mean, rscale, tau, A, P, X = torch.ops.intl_kernels.whiten_fwd(z, 5, 1e-5, 200.0)
        assert y.shape == z.shape and y.stride() == z.stride() and y.dtype == torch.bfloat16
        assert y.device.type == "cuda"
        assert mean.shape == (2, 64, 1) and rscale.shape == tau.shape == (2, 1, 1)
        assert A.shape == (2, 64, 64) and P.shape == (5, 2, 64, 64) and X.shape == (4, 2, 64, 64)
        assert all(t.dtype == torch.float32 for t in (mean, rscale, tau, A, P, X))
        dz = torch.ops.intl_kernels.whiten_bwd(y, z, mean, rscale, tau, A, P, X, 200.0)
        assert dz.shape == z.shape and dz.stride() == z.stride()
        w = torch.empty(2, 64, device="cuda")
        dz, dw, db = torch.ops.intl_kernels.whiten_affine_bwd(y, z, w, mean, rscale, tau, A, P, X, 200.0)
        assert dw.shape == db.shape == w.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_backend_unavailable_here_says_why():
    assert "cuda" not in ik.available_backends()
    with pytest.raises(
        RuntimeError, match="backend 'cuda' is not available: .*(no CUDA device|built without)"
    ):
        ik.whiten(torch.randn(1, 4, 10), 5, backend="cuda")


def test_cuda_unavailable_reasons():
    from types import SimpleNamespace

    from intl_kernels._ext import cuda_unavailable_reason

    assert "older than the package" in cuda_unavailable_reason(SimpleNamespace(), True)
    built = SimpleNamespace(cuda_built=lambda: True)
    not_built = SimpleNamespace(cuda_built=lambda: False)
    assert "INTL_KERNELS_SKIP_CUDA_BUILD" in cuda_unavailable_reason(not_built, True)
    assert cuda_unavailable_reason(built, False) == "no CUDA device"
    assert cuda_unavailable_reason(built, True) is None


def test_cuda_backend_limits_are_declared():
    assert _backends.MAX_ROWS["cuda"] == 128
    assert _backends.DTYPES["cuda"] == (torch.float32, torch.bfloat16, torch.float16)
    assert "cuda" in _backends.KNOWN


def test_cpu_only_build_is_an_extension_of_the_cpp_sources(monkeypatch, capsys):
    """INTL_KERNELS_SKIP_CUDA_BUILD=1: setup builds intl_kernels._C from the C++ sources alone,
    without the CUDA macro, and says why."""
    setup = _setup_module()
    monkeypatch.setenv("INTL_KERNELS_SKIP_CUDA_BUILD", "1")
    monkeypatch.chdir(ROOT)
    (ext,), cmdclass = setup._ext_modules()
    assert "building C++ CPU kernels only (INTL_KERNELS_SKIP_CUDA_BUILD=1)" in capsys.readouterr().out
    assert ext.name == "intl_kernels._C" and "build_ext" in cmdclass
    assert sorted(ext.sources) == sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")
    )
    assert not any(name == "INTL_KERNELS_WITH_CUDA" for name, _ in ext.define_macros)
    assert not any("cuda" in lib for lib in ext.libraries), ext.libraries


def _cxx_flags(with_cuda: bool) -> list[str]:
    from torch.utils import cpp_extension

    flags = ["-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-I{ROOT}/csrc"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    flags += [f"-I{p}" for p in (sysconfig.get_paths()["include"],)]
    return flags + (["-DINTL_KERNELS_WITH_CUDA=1"] if with_cuda else [])


@pytest.mark.slow
def test_cpu_only_build_compiles():
    """The C++ sources as the CPU-only build compiles them. A source that preprocesses to the
    same text with and without INTL_KERNELS_WITH_CUDA is the one this installation compiled; the
    others (the op registration and what includes whiten.h) must compile without it
    (-fsyntax-only: the CPU-only branches' declarations and types)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    differ = []
    for name in sorted(f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cpp")):
        src = os.path.join(ROOT, "csrc", name)
        texts = []
        for with_cuda in (False, True):
            pre = subprocess.run(
                [cxx, "-E", "-P", *_cxx_flags(with_cuda), src], capture_output=True, text=True
            )
            assert pre.returncode == 0, pre.stderr[-3000:]
            texts.append(pre.stdout)
        if texts[0] != texts[1]:
            differ.append(name)
            check = subprocess.run(
                [cxx, "-fsyntax-only", *_cxx_flags(False), src], capture_output=True, text=True
            )
            assert check.returncode == 0, f"{name} without INTL_KERNELS_WITH_CUDA:\n" + check.stderr[-4000:]
    assert "ops.cpp" in differ, differ  # the registration has CPU-only branches


def test_gencode_embeds_ptx_of_the_highest_arch():
    """A cubin per architecture and the PTX of the highest beside them (newer GPUs JIT it)."""
    setup = _setup_module()
    flags = setup.gencode_flags(setup.cuda_archs("80;90"))
    assert flags == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90",
    ]  # fmt: skip
    assert setup.gencode_flags(setup.cuda_archs("90, 86"))[-1] == "arch=compute_90,code=compute_90"


def _cuobjdump():
    from verify.sass_report import find_tool

    try:
        return find_tool("cuobjdump")
    except FileNotFoundError:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME/bin, triton's nvidia/bin)")


@pytest.fixture
def cuda_so():
    if not _C.cuda_built():
        pytest.skip("the extension has no CUDA kernels")
    return _C.__file__


def test_built_extension_carries_ptx_of_its_highest_cubin(cuda_so):
    tool = _cuobjdump()
    elf = subprocess.run([tool, "--list-elf", cuda_so], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", cuda_so], capture_output=True, text=True).stdout
    cubins = {int(a) for a in re.findall(r"\.sm_(\d+)\.cubin", elf)}
    ptxs = {int(a) for a in re.findall(r"\.sm_(\d+)\.ptx", ptx)}
    assert cubins, elf
    assert max(cubins) in ptxs, f"no PTX for sm_{max(cubins)} beside the cubins {sorted(cubins)}: {ptx!r}"


def test_streaming_kernels_occupancy_gives_whole_waves(cuda_so):
    """The sm_90 occupancy of the c = 64 streaming kernels, from their registers and shared memory
    as built, lets the grid planner fill whole waves of an H100's 132 SMs at the ResNet-50 stages."""
    _cuobjdump()
    from verify.sass_report import cuda_kernels, extension_geometry

    kernels = [k for k in cuda_kernels(cuda_so, "sm_90", extension_geometry(cuda_so)) if k["rows"] == 64]
    assert len(kernels) == 12  # 4 kernels × 3 dtypes
    for k in kernels:
        assert k["spill_bytes"] <= 16, k["name"]
        slots = k["blocks_per_sm"] * 132
        for N, C, H in ((256, 64, 56), (256, 256, 56), (256, 512, 28), (256, 1024, 14), (256, 2048, 7)):
            G, tiles = C // 64, -(-N * H * H // k["tile_columns"])
            assert G * _C.plan_blocks(tiles, G, slots) % slots == 0, (k["name"], k["blocks_per_sm"], C)
