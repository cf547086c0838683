"""The cuda backend on a GPU (all tests need one; they skip cleanly without).

What CI checks without a GPU is in test_cuda_kernels.py (the same kernel bodies in the host
emulator) and test_cuda_build.py (compilation and registration).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import check_whiten_against_reference, output_and_grad

import intl_kernels as ik

pytestmark = pytest.mark.cuda
DEV = "cuda"


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    """Skip (with the reason) where the CUDA kernels were not built, instead of failing every test."""
    if torch.cuda.is_available() and "cuda" not in ik.available_backends():
        from intl_kernels import _backends

        pytest.skip(f"the cuda backend is not available: {_backends.unavailable_reason('cuda')}")


def _inputs(shape, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    z = torch.randn(shape, generator=g, device=DEV)
    z = z * torch.rand(shape[:2] + (1,) * (len(shape) - 2), generator=g, device=DEV).add(0.5) + 0.3
    dy = torch.randn(shape, generator=g, device=DEV)
    return z.to(dtype), dy.to(dtype)


def _whiten(T, eps, divisor):
    return lambda t: ik.whiten(t, T, eps=eps, divisor=divisor, backend="cuda")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = {"n2": (1, 2), "n1e3": (4, 1000), "G64": (64, 3000), "n1e6": (2, 1_000_000)}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("c", [2, 16, 32, 64, 65, 128])
@pytest.mark.parametrize("G,n", SIZES.values(), ids=SIZES.keys())
def test_matches_reference(c, G, n, dtype):
    if n == 1_000_000 and c > 64 and dtype != torch.float32:
        pytest.skip("float32 covers the largest c at n = 1e6")
    z, dy = _inputs((G, c, n), dtype, c + G)
    check_whiten_against_reference(_whiten(5, 1e-5, float(n)), z, dy, 5, 1e-5, float(n))


LAYER_SHAPES = {"stage1": (256, 64, 56), "stage4": (32, 2048, 7), "odd": (8, 130, 3)}


def _group_view(x, G, c):
    return x.flatten(2).unflatten(1, (G, c)).permute(1, 2, 0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("N,C,H", LAYER_SHAPES.values(), ids=LAYER_SHAPES.keys())
def test_layer_layouts_match_reference(N, C, H, layout, dtype):
    """The IterNorm layer's (G, c, N, H·W) group views, read in place, against the reference."""
    g = torch.Generator(device=DEV).manual_seed(C)
    x = torch.randn(N, C, H, H, generator=g, device=DEV).to(dtype)
    d = torch.randn(N, C, H, H, generator=g, device=DEV).to(dtype)
    if layout == "channels_last":
        x, d = x.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    c = 64 if C % 64 == 0 else 65
    z, dy = _group_view(x, C // c, c), _group_view(d, C // c, c)
    n = float(N * H * H)

    check_whiten_against_reference(_whiten(5, 1e-5, n), z.flatten(2), dy.flatten(2), 5, 1e-5, n)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_iternorm_layer_matches_torch_backend(layout):
    """Outputs, input and parameter gradients, running statistics over a few steps, eval."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    layers = {b: ik.IterNorm(128, num_channels=64, backend=b).to(DEV) for b in ("cuda", "torch")}
    layers["torch"].load_state_dict(layers["cuda"].state_dict())
    for step in range(3):
        x = torch.randn(16, 128, 9, 9, device=DEV).to(memory_format=fmt)
        dy = torch.randn_like(x)
        outs = {}
        for b, layer in layers.items():
            xb = x.clone().requires_grad_()
            y = layer(xb)
            grads = torch.autograd.grad(y, [xb, layer.weight, layer.bias], dy)
            outs[b] = (y, *grads)
        assert outs["cuda"][0].is_contiguous(memory_format=fmt)
        for a, b in zip(outs["cuda"], outs["torch"], strict=True):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=f"step {step}")
    for name in ("running_mean", "running_wm"):
        torch.testing.assert_close(
            getattr(layers["cuda"], name), getattr(layers["torch"], name), atol=1e-5, rtol=1e-5
        )
    for layer in layers.values():
        layer.eval()
    x = torch.randn(4, 128, 5, 5, device=DEV)
    torch.testing.assert_close(layers["cuda"](x), layers["torch"](x))


def test_deterministic():
    z, dy = _inputs((8, 64, 200_000), torch.float32, 1)
    runs = [output_and_grad(_whiten(5, 1e-5, 2e5), z, dy) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_large_groups_rejected_with_the_limit():
    z = torch.randn(1, 129, 100, device=DEV)
    with pytest.raises(ValueError, match="at most 128 rows"):
        ik.whiten(z, 5, backend="cuda")
    with pytest.raises(RuntimeError, match="1 <= r <= 128"):
        torch.ops.intl_kernels.whiten_fwd(z, 5, 0.0, 99.0)


def test_no_host_sync_and_cuda_graph_capture():
    z, dy = _inputs((4, 64, 5000), torch.float32, 2)
    z.requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ik.whiten(z, 5, eps=1e-5, divisor=5000.0, backend="cuda")
        torch.autograd.grad(y, z, dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = z.detach().clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ik.whiten(static, 5, eps=1e-5, divisor=5000.0, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ik.whiten(static, 5, eps=1e-5, divisor=5000.0, backend="cuda")
    static.copy_(z.detach() * 2.0)
    graph.replay()
    torch.testing.assert_close(out, ik.whiten(z.detach(), 5, eps=1e-5, divisor=5000.0, backend="cuda"))


def test_torch_compile_inductor_through_the_layer():
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), ik.IterNorm(64, backend="cuda"), torch.nn.ReLU()
    ).to(DEV)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 16, 16, device=DEV)
    y = compiled(x)
    y.sum().backward()
    assert torch.isfinite(y).all()


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not found")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_small_cases(tool):
    code = (
        "import torch, intl_kernels as ik\n"
        "for c, n in ((2, 70), (17, 300), (64, 130), (65, 100), (128, 200)):\n"
        "    for dt in (torch.float32, torch.bfloat16):\n"
        "        z = torch.randn(3, c, n, device='cuda', dtype=dt, requires_grad=True)\n"
        "        y = ik.whiten(z, 5, eps=1e-5, backend='cuda')\n"
        "        torch.autograd.grad(y, z, torch.randn_like(y))\n"
        "torch.cuda.synchronize()\n"
    )
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", sys.executable, "-c", code]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
