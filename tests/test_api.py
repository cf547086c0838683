"""Public API: argument errors, backend dispatch, op registration, losses."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import CPU_BACKENDS, FP32_BACKENDS, backend_device, check_compiled_intl_loss

import intl_kernels as ik
from intl_kernels import _backends
from python_ref import intl_loss_ref, norm_mse_ref, trace_loss_ref

# --- bad input --------------------------------------------------------------------

BAD_WHITEN = [
    ("ndim", dict(z=torch.randn(4, 5)), ValueError, "z must be 3-D"),
    ("int-dtype", dict(z=torch.ones(1, 3, 4, dtype=torch.int64)), TypeError, "floating dtype"),
    ("complex-dtype", dict(z=torch.randn(1, 3, 4, dtype=torch.complex64)), TypeError, "floating dtype"),
    ("not-tensor", dict(z=[[1.0, 2.0]]), TypeError, "z must be a torch.Tensor"),
    ("n<2", dict(z=torch.randn(1, 3, 1)), ValueError, "n >= 2"),
    ("G=0", dict(z=torch.randn(0, 3, 4)), ValueError, "G >= 1"),
    ("T=0", dict(T=0), ValueError, "T must be >= 1, got 0"),
    ("T-float", dict(T=2.5), TypeError, "T must be an int"),
    ("eps<0", dict(eps=-1e-3), ValueError, "eps must be finite and >= 0.0"),
    ("eps-nan", dict(eps=float("nan")), ValueError, "eps must be finite"),
    ("divisor=0", dict(divisor=0), ValueError, "divisor must be finite and > 0.0"),
    ("backend-unknown", dict(backend="gpu"), ValueError, "backend must be 'auto' or one of"),
    ("backend-type", dict(backend=3), TypeError, "backend must be a str"),
    ("precision", dict(precision="tf32"), ValueError, "precision must be None or 'ieee'"),
]


@pytest.mark.parametrize("case", BAD_WHITEN, ids=[c[0] for c in BAD_WHITEN])
def test_whiten_bad_input(case):
    _, kwargs, exc, msg = case
    args = dict(z=torch.randn(2, 3, 4), T=3) | kwargs
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")) as info:
        ik.whiten(args.pop("z"), args.pop("T"), **args)
    assert str(info.value).startswith("whiten: ")


BAD_ITER_NORM = [
    ("1-D", torch.randn(5), ValueError, r"x must be 2-D \(N, D\) or 3-D \(B, N, D\), got shape \(5,\)"),
    ("4-D", torch.randn(1, 2, 3, 4), ValueError, "x must be 2-D"),
    ("N=1", torch.randn(1, 8), ValueError, "N >= 2 samples"),
    ("D=1", torch.randn(8, 1), ValueError, "D >= 2 features"),
    ("int", torch.ones(4, 4, dtype=torch.int32), TypeError, "floating dtype"),
]


@pytest.mark.parametrize("case", BAD_ITER_NORM, ids=[c[0] for c in BAD_ITER_NORM])
def test_iter_norm_bad_input(case):
    _, x, exc, msg = case
    with pytest.raises(exc, match=msg):
        ik.iter_norm(x)


def test_iter_norm_bad_T():
    with pytest.raises(ValueError, match="iter_norm: T must be >= 1, got -1"):
        ik.iter_norm(torch.randn(4, 4), T=-1)


def test_losses_bad_input():
    with pytest.raises(ValueError, match="norm_mse: a and b must have the same shape"):
        ik.norm_mse(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="trace_loss: y must be 2-D"):
        ik.trace_loss(torch.randn(3))
    with pytest.raises(ValueError, match="trade_off: batch_size must be >= 8"):
        ik.trade_off(4)
    with pytest.raises(TypeError, match="trade_off: batch_size must be an int"):
        ik.trade_off(64.0)
    with pytest.raises(ValueError, match="intl_loss: z1 and z2 must have the same shape"):
        ik.intl_loss(torch.randn(8, 4), torch.randn(9, 4))


# --- dispatch -----------------------------------------------------------------------


def test_available_backends_lists_cpu_and_torch():
    """The test command builds the extension and installs triton: both must be usable."""
    backends = ik.available_backends()
    assert "torch" in backends
    if os.environ.get("INTL_KERNELS_SKIP_BUILD", "0") != "1":
        # The test command builds the extension: a silent fall back to torch is a failure.
        assert "cpu" in backends, _backends._UNAVAILABLE_REASON.get("cpu")
    assert "triton" in backends, _backends._UNAVAILABLE_REASON.get("triton")


def test_auto_prefers_cpu_extension(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    z = torch.randn(1, 3, 4)
    expected = "cpu" if "cpu" in ik.available_backends() else "torch"
    assert _backends.resolve("whiten", "auto", z, None)[0] == expected


def test_env_var_overrides_auto(monkeypatch):
    z = torch.randn(1, 3, 4)
    monkeypatch.setenv(_backends.ENV_VAR, "torch")
    assert _backends.resolve("whiten", "auto", z, None)[0] == "torch"
    if "cpu" in CPU_BACKENDS:  # an explicit backend wins over the variable
        assert _backends.resolve("whiten", "cpu", z, None)[0] == "cpu"
    monkeypatch.setenv(_backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="environment variable INTL_KERNELS_BACKEND must be"):
        ik.whiten(z, 2)


def test_unavailable_backend_says_how_to_build(monkeypatch):
    monkeypatch.delitem(_backends._KERNELS, "cpu", raising=False)
    monkeypatch.setitem(_backends._UNAVAILABLE_REASON, "cpu", "not built; " + _backends.BUILD_HINT)
    with pytest.raises(
        RuntimeError, match=r"backend 'cpu' is not available: .*pip install --no-build-isolation -e \."
    ):
        ik.whiten(torch.randn(1, 3, 4), 2, backend="cpu")
    assert "cpu" not in ik.available_backends() and "torch" in ik.available_backends()
    assert ik.whiten(torch.randn(1, 3, 4), 2).shape == (1, 3, 4)  # auto falls back to torch


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
def test_cpu_backend_rejects_cuda_tensors_message():
    z = torch.randn(1, 3, 4, device="meta")
    with pytest.raises(ValueError, match="backend 'cpu' needs cpu tensors, got a tensor on meta"):
        ik.whiten(z, 2, backend="cpu")


# --- torch.library registration -----------------------------------------------------

needs_ext = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")


@needs_ext
def test_ops_registered_with_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    z = torch.randn(2, 5, 7)
    with FakeTensorMode() as mode:
        fz = mode.from_tensor(z)
        y, mean, rscale, tau, A, P, X = torch.ops.intl_kernels.whiten_fwd(fz, 3, 0.0, 6.0)
        dz = torch.ops.intl_kernels.whiten_bwd(y, fz, mean, rscale, tau, A, P, X, 6.0)
    real = torch.ops.intl_kernels.whiten_fwd(z, 3, 0.0, 6.0)
    fakes = (y, mean, rscale, tau, A, P, X)
    for fake, t in zip(fakes, real, strict=True):
        assert fake.shape == t.shape and fake.dtype == t.dtype
    assert dz.shape == z.shape and dz.dtype == z.dtype


@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_group_views(layout):
    """(G, c, N, H·W) views of an (N, C, H, W) tensor: read in place, outputs in its layout
    (the fake implementation promises the same strides as the real op returns)."""
    x = torch.randn(3, 8, 4, 5)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    z4 = x.flatten(2).unflatten(1, (2, 4)).permute(1, 2, 0, 3)
    torch.library.opcheck(
        torch.ops.intl_kernels.whiten_fwd, (z4, 3, 1e-3, 60.0), test_utils=("test_schema", "test_faketensor")
    )
    y4, *stats = torch.ops.intl_kernels.whiten_fwd(z4, 3, 1e-3, 60.0)
    assert y4.stride() == z4.stride()
    torch.library.opcheck(
        torch.ops.intl_kernels.whiten_bwd,
        (torch.randn_like(z4), z4, *stats, 60.0),
        test_utils=("test_schema", "test_faketensor"),
    )
    w, b = torch.rand(2, 4) + 0.5, torch.randn(2, 4)
    torch.library.opcheck(
        torch.ops.intl_kernels.whiten_affine_fwd,
        (z4, w, b, 3, 1e-3, 60.0),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.intl_kernels.whiten_affine_bwd,
        (torch.randn_like(z4), z4, w, *stats, 60.0),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_ext
def test_affine_op_equals_whiten_then_affine():
    """The folded affine: y = w·ŷ + b, and its gradients, as the plain op plus torch ops."""
    z = torch.randn(3, 8, 20, dtype=torch.float64).view(3, 2, 4, 20).permute(1, 2, 0, 3)  # (G, r, N, L)
    w = (torch.rand(2, 4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    y, *stats = torch.ops.intl_kernels.whiten_affine_fwd(z, w, b, 4, 1e-3, 60.0)
    y0, *_ = torch.ops.intl_kernels.whiten_fwd(z, 4, 1e-3, 60.0)
    expected = y0 * w[..., None, None] + b[..., None, None]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    dz, dw, db = torch.ops.intl_kernels.whiten_affine_bwd(dy, z, w, *stats, 60.0)
    dz0 = torch.ops.intl_kernels.whiten_bwd(dy * w[..., None, None], z, *stats, 60.0)
    gw, gb = torch.autograd.grad(expected, (w, b), dy)
    torch.testing.assert_close(dz, dz0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, gw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(db, gb, rtol=1e-10, atol=1e-12)


@needs_ext
def test_opcheck():
    z = torch.randn(2, 5, 7)
    torch.library.opcheck(
        torch.ops.intl_kernels.whiten_fwd, (z, 3, 1e-3, 7.0), test_utils=("test_schema", "test_faketensor")
    )
    stats = torch.ops.intl_kernels.whiten_fwd(z, 3, 1e-3, 7.0)
    torch.library.opcheck(
        torch.ops.intl_kernels.whiten_bwd,
        (torch.randn_like(z), z, *stats[1:], 7.0),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_torch_compile_fullgraph(backend):
    check_compiled_intl_loss(backend, backend_device(backend), "aot_eager")


# --- losses -------------------------------------------------------------------------


def test_trade_off_formula():
    assert ik.trade_off(8) == 0.0
    assert ik.trade_off(256) == pytest.approx(0.05)
    assert ik.trade_off(4096) == pytest.approx(0.09)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_losses_match_reference(backend):
    torch.manual_seed(0)
    a, b = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    torch.testing.assert_close(ik.norm_mse(a, b), norm_mse_ref(a, b))
    torch.testing.assert_close(ik.trace_loss(a), trace_loss_ref(a))
    torch.testing.assert_close(ik.trace_loss(torch.stack([a, b])), trace_loss_ref(a) + trace_loss_ref(b))
    z1, z2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = ik.intl_loss(z1, z2, backend=backend)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    r1, r2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss_ref = intl_loss_ref(r1, r2)
    h1, h2 = torch.autograd.grad(loss_ref, (r1, r2))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, h1, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g2, h2, rtol=1e-8, atol=1e-10)
    assert float(ik.trade_off(32)) == pytest.approx(0.01 * (math.log2(32) - 3))
