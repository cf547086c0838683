"""The cuda backend on a GPU (all tests need one; they skip cleanly without).

What CI checks without a GPU is in test_cuda_kernels.py (the same kernel bodies in the host
emulator) and test_cuda_build.py (compilation and registration).
"""

from __future__ import annotations

import functools
import os
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


@functools.cache
def _sanitizer_refusal() -> str | None:
    """Why compute-sanitizer cannot check kernels here (None when it can): missing, or refusing
    the device (some GPU machines answer "Device not supported"), found by running it once on a
    tiny torch program (``verify.env``'s probe)."""
    from verify import env

    path = env.find_tool("compute-sanitizer")
    if path is None:
        return "compute-sanitizer not found"
    program = [sys.executable, "-c", env.PROBE_PROGRAM, "cuda"]
    cmd = [path, "--tool", "memcheck", "--error-exitcode", "1", *program]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "compute-sanitizer's probe did not finish in 300 s"
    out = done.stdout + done.stderr
    if done.returncode == 0 and "probe sum" in out and "ERROR SUMMARY: 0 errors" in out:
        return None
    return "compute-sanitizer does not run here: " + (out.strip().splitlines() or ["no output"])[-1][:300]


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_small_cases(tool):
    refusal = _sanitizer_refusal()
    if refusal:
        pytest.skip(refusal)
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


# Per-tile indexing on the GPU: NCHW and channels_last group views, sliced and expanded
# (stride 0) inputs give the bits of a contiguous copy (the tiles hold the same values; only the
# loads differ), at c = 64 (the layer's groups), a padded bucket and c > 64 (streamed [W | M]ᵀ).
def _strided_cases(c):
    g = torch.Generator(device=DEV).manual_seed(c)
    x = torch.randn(16, 2 * c, 9, 11, generator=g, device=DEV) + 0.5
    d = torch.randn(16, 2 * c, 9, 11, generator=g, device=DEV)
    yield "nchw", _group_view(x, 2, c), _group_view(d, 2, c)
    xl, dl = x.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    yield "channels_last", _group_view(xl, 2, c), _group_view(dl, 2, c)
    yield "dy_other_layout", _group_view(xl, 2, c), _group_view(d, 2, c)
    wide = torch.randn(2, c, 2 * 1584, generator=g, device=DEV) + 0.5
    yield "sliced", wide[:, :, ::2], torch.randn(2, c, 1584, generator=g, device=DEV)
    base = torch.randn(2, c, 1, 99, generator=g, device=DEV) + 0.5
    yield "expanded", base.expand(2, c, 16, 99), torch.randn(2, c, 16, 99, generator=g, device=DEV)


@pytest.mark.parametrize("c", [64, 40, 100])
def test_strided_inputs_bitwise_equal_contiguous_copy(c):
    for layout, z, dy in _strided_cases(c):
        n = z.shape[2] * (z.shape[3] if z.dim() == 4 else 1)
        zc, dyc = z.reshape(2, c, n).contiguous(), dy.reshape(2, c, n).contiguous()
        out = torch.ops.intl_kernels.whiten_fwd(z, 5, 1e-5, float(n))
        ref = torch.ops.intl_kernels.whiten_fwd(zc, 5, 1e-5, float(n))
        assert torch.equal(out[0].reshape(2, c, n), ref[0]), layout
        for a, b in zip(out[1:], ref[1:], strict=True):
            assert torch.equal(a, b), layout
        dz = torch.ops.intl_kernels.whiten_bwd(dy, z, *out[1:], float(n))
        dz_ref = torch.ops.intl_kernels.whiten_bwd(dyc, zc, *ref[1:], float(n))
        assert torch.equal(dz.reshape(2, c, n), dz_ref), layout


def test_resnet50_stage_grid_is_deterministic_and_accurate():
    """The occupancy-sized grid of a ResNet-50 stage (one group of 64 over 256·56·56 columns: a
    block per resident slot of every SM) merges in a fixed order: two runs give the same bits."""
    x = torch.randn(256, 64, 56, 56, device=DEV, dtype=torch.bfloat16)
    z = _group_view(x, 1, 64)
    n = float(256 * 56 * 56)
    runs = [torch.ops.intl_kernels.whiten_fwd(z, 5, 1e-5, n) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    cov = runs[0][0].float().flatten(1) @ runs[0][0].float().flatten(1).T / n
    torch.testing.assert_close(cov, torch.eye(64, device=DEV), atol=0.05, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_dy_on_another_gpu_rejected():
    z = torch.randn(2, 8, 300, device="cuda:0")
    _, *stats = torch.ops.intl_kernels.whiten_fwd(z, 5, 0.0, 300.0)
    with pytest.raises(RuntimeError, match=r"dy must be on z's device cuda:0, got cuda:1"):
        torch.ops.intl_kernels.whiten_bwd(torch.randn(2, 8, 300, device="cuda:1"), z, *stats, 300.0)


def test_shared_memory_within_the_devices_opt_in_limit():
    """Every streaming kernel fits the device's per-block opt-in shared memory (99 KiB on sm_86 /
    sm_89), so every c runs: the largest buckets forward and backward."""
    from intl_kernels import _C

    assert max(s["dynamic_smem"] for s in _C.small_kernel_shapes()) <= 101376  # sm_86's opt-in
    z, dy = _inputs((2, 128, 3000), torch.float32, 5)
    check_whiten_against_reference(_whiten(5, 1e-5, 3000.0), z, dy, 5, 1e-5, 3000.0)
