"""GPU-only tests of the triton backend: large shapes, every precision mode, CUDA graphs.

Run with ``pytest -m cuda tests`` on a machine with a GPU (skipped elsewhere).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_tolerance_rule, check_compiled_intl_loss, describe_error

import intl_kernels as ik
from python_ref import whiten_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _grads(fn, z, dy):
    z = z.detach().requires_grad_()
    y = fn(z)
    (dz,) = torch.autograd.grad(y, z, dy)
    return y.detach(), dz


def _inputs(shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(shape, device="cuda", generator=g)
    z = z * torch.rand(shape[:2] + (1,), device="cuda", generator=g).add(0.5) + 0.3
    return z.to(dtype), torch.randn(shape, device="cuda", generator=g).to(dtype)


class _Tf32:
    """cuBLAS TF32 matmuls for the reference (the 'input precision' of the tf32 mode)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


# (G, r, n) up to r = 4096 and n = 8192: the one-program Newton kernels at 4 warps (r <= 32,
# BLOCK 16 and 32, odd r included) and 8 warps (r <= 64), the per-r formula configs up to
# r = 128, the tiled path, channel mode at INTL's batch sizes, six crops in one call.
SHAPES = {
    "G8-r8-n512-small-r": (8, 8, 512),
    "G4-r17-n1000-small-r": (4, 17, 1000),
    "G4-r32-n2048-small-r": (4, 32, 2048),
    "G32-r64-n3136-layer": (32, 64, 3136),
    "G4-r128-n4096": (4, 128, 4096),
    "G1-r256-n8192-intl": (1, 256, 8192),
    "G6-r256-n8192-crops": (6, 256, 8192),
    "G1-r1024-n2048": (1, 1024, 2048),
    "G1-r4096-n8192": (1, 4096, 8192),
    "G1-r300-n200-rank-deficient": (1, 300, 200),
}
# Per precision mode: the reference at the matching precision and the atol of the rule.
MODES = {
    "ieee": (False, 1e-5),
    "tf32x3": (False, 1e-5),  # about fp32 accuracy: held to the fp32 reference
    "tf32": (True, 1e-3),  # held to PyTorch's own TF32 matmuls
}


@pytest.mark.parametrize("precision", MODES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_float32_every_precision_mode(shape, precision):
    tf32_ref, atol = MODES[precision]
    z, dy = _inputs(shape, torch.float32)
    T = 5 if shape[1] <= 128 else 4
    y, dz = _grads(lambda t: ik.whiten(t, T, backend="triton", precision=precision), z, dy)
    with _Tf32(tf32_ref):
        y_lp, dz_lp = _grads(lambda t: whiten_ref(t, T), z, dy)
    with _Tf32(False):
        y64, dz64 = _grads(lambda t: whiten_ref(t, T, upcast=True), z, dy)
    assert_tolerance_rule(y, y_lp, y64.float(), atol, f"{precision} y")
    assert_tolerance_rule(dz, dz_lp, dz64.float(), atol, f"{precision} dz")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape", [SHAPES["G32-r64-n3136-layer"], SHAPES["G1-r256-n8192-intl"], SHAPES["G1-r1024-n2048"]]
)
def test_half_inputs(shape, dtype):
    z, dy = _inputs(shape, dtype)
    y, dz = _grads(lambda t: ik.whiten(t, 4, backend="triton"), z, dy)
    y_lp, dz_lp = _grads(lambda t: whiten_ref(t, 4), z, dy)
    y64, dz64 = _grads(lambda t: whiten_ref(t, 4, upcast=True), z, dy)
    assert y.dtype == dtype and dz.dtype == dtype
    assert_tolerance_rule(y, y_lp, y64.to(dtype), 0.0, "y")
    assert_tolerance_rule(dz, dz_lp, dz64.to(dtype), 0.0, "dz")


def test_fp16_gram_that_would_overflow_stays_finite():
    """|x| ~ 300, D = 8192: x xᵀ exceeds fp16's 65504; the rescale keeps everything finite."""
    z, dy = _inputs((1, 64, 8192), torch.float16)
    z = z * 300
    y, dz = _grads(lambda t: ik.iter_norm(t, backend="triton"), z, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dz).all()
    y32 = ik.iter_norm(z.float(), backend="triton")
    assert (y.float() - y32).abs().max() < 2e-2, describe_error(y.float(), y32)


@pytest.mark.parametrize("shape", [(3, 40, 500), (2, 300, 1000)], ids=["one-program", "tiled"])
def test_agrees_with_torch_backend_on_cuda(shape):
    z, dy = _inputs(shape, torch.float32)
    with _Tf32(False):
        y_t, dz_t = _grads(lambda t: ik.whiten(t, 4, backend="torch"), z, dy)
    y, dz = _grads(lambda t: ik.whiten(t, 4, backend="triton"), z, dy)
    torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dz, dz_t, rtol=1e-4, atol=1e-5)


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    from intl_kernels import _backends

    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    assert _backends.resolve("whiten", "auto", torch.randn(1, 3, 4, device="cuda"), None)[0] == "triton"
    assert (
        _backends.resolve("whiten", "auto", torch.randn(1, 3, 4, device="cuda").double(), None)[0] == "torch"
    )


@pytest.mark.parametrize("N", [64, 256, 512], ids=lambda n: f"N{n}")
def test_no_host_sync_and_cuda_graph_replay(N):
    """Forward + backward of INTL channel whitening: no synchronisation, and a captured
    CUDA graph replays with new inputs to the eager result."""
    x = torch.randn(2, N, 1024, device="cuda", requires_grad=True)
    dy = torch.randn(2, N, 1024, device="cuda")

    def step():
        y = ik.iter_norm(x, backend="triton")
        (dx,) = torch.autograd.grad(y, x, dy)
        return y, dx

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # autotuning (which benchmarks) happens here, before capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, dx_static = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()
    y_eager, dx_eager = step()
    torch.testing.assert_close(y_static, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(dx_static, dx_eager, rtol=0, atol=0)


def test_deterministic():
    z, dy = _inputs((2, 200, 20000), torch.float32)
    a = _grads(lambda t: ik.whiten(t, 4, backend="triton"), z, dy)
    b = _grads(lambda t: ik.whiten(t, 4, backend="triton"), z, dy)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_torch_compile_inductor_fullgraph():
    check_compiled_intl_loss("triton", "cuda", None)  # the default inductor backend


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the launchers make cuda:1 current for their
    launches (Triton launches on the current device) and give the results of a run on cuda:0."""
    z, dy = _inputs((3, 40, 700), torch.float32)
    torch.cuda.set_device(0)
    results = []
    for device in ("cuda:0", "cuda:1"):
        results.append(_grads(lambda t: ik.whiten(t, 5, backend="triton"), z.to(device), dy.to(device)))
        assert torch.cuda.current_device() == 0, "the guard restores the current device"
    (y0, dz0), (y1, dz1) = results
    assert y1.device == torch.device("cuda:1")
    # same kernels, same inputs: equal up to the split of the column reductions, which follows
    # each GPU's SM count (bitwise equal on two GPUs of one model)
    torch.testing.assert_close(y1.cpu(), y0.cpu())
    torch.testing.assert_close(dz1.cpu(), dz0.cpu())
