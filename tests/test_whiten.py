"""Backends of whiten / iter_norm against the paper reference (python_ref), docs/design.md §2–§4."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS, assert_tolerance_rule, describe_error

import intl_kernels as ik
from python_ref import iter_norm_ref, whiten_ref

# atol of the tolerance rule per input dtype: the reference at float64 has no error
# against itself, so float64 needs a floor; float32 gets a few ulps of O(1) outputs.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (G, r, n) with readable ids: odd sizes, r > n (rank deficient), batch of 1.
SHAPES = {
    "G1-r2-n5": (1, 2, 5),
    "G3-r3-n8": (3, 3, 8),
    "G2-r17-n40": (2, 17, 40),
    "G1-r64-n100": (1, 64, 100),
    "G1-r65-n50-rank-deficient": (1, 65, 50),
    "G2-r130-n150": (2, 130, 150),
    "G1-r260-n300-blocked": (1, 260, 300),
}


def _grads(fn, z, dy):
    z = z.detach().requires_grad_()
    y = fn(z)
    (dz,) = torch.autograd.grad(y, z, dy)
    return y.detach(), dz


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("T,eps", [(4, 0.0), (5, 1e-3)], ids=["T4", "T5-eps"])
def test_whiten_matches_reference(backend, dtype, shape, T, eps):
    torch.manual_seed(sum(shape) + T)
    z = torch.randn(shape, dtype=dtype) * torch.rand(shape[:2] + (1,), dtype=dtype).add(0.5)
    dy = torch.randn(shape, dtype=dtype)
    div = shape[2] - 1 if eps == 0 else shape[2]
    y, dz = _grads(lambda t: ik.whiten(t, T, eps=eps, divisor=div, backend=backend), z, dy)
    y_lp, dz_lp = _grads(lambda t: whiten_ref(t, T, eps=eps, divisor=div), z, dy)
    y64, dz64 = _grads(lambda t: whiten_ref(t, T, eps=eps, divisor=div, upcast=True), z, dy)
    assert_tolerance_rule(y, y_lp, y64.to(dtype), ATOL[dtype], "y")
    assert_tolerance_rule(dz, dz_lp, dz64.to(dtype), ATOL[dtype], "dz")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_use_fp32_statistics(backend, dtype):
    """bf16/fp16 in, same dtype out; the result equals the fp32 computation rounded once."""
    torch.manual_seed(0)
    x = torch.randn(2, 24, 96).to(dtype)
    dy = torch.randn(2, 24, 96).to(dtype)
    y, dz = _grads(lambda t: ik.iter_norm(t, backend=backend), x, dy)
    y32, dz32 = _grads(lambda t: ik.iter_norm(t, backend=backend), x.float(), dy.float())
    y_lp, dz_lp = _grads(iter_norm_ref, x, dy)
    assert y.dtype == dtype and dz.dtype == dtype
    # One rounding to the output dtype: within one ulp of the fp32 result.
    ulp = torch.finfo(dtype).eps
    assert ((y.float() - y32).abs() <= ulp * y32.abs() + 1e-6).all(), describe_error(y, y32)
    assert ((dz.float() - dz32).abs() <= ulp * dz32.abs() + 1e-6).all(), describe_error(dz, dz32)
    y64, dz64 = _grads(lambda t: iter_norm_ref(t, upcast=True), x, dy)
    assert_tolerance_rule(y, y_lp, y64.to(dtype), 0.0, "y")
    assert_tolerance_rule(dz, dz_lp, dz64.to(dtype), 0.0, "dz")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 40), (3, 5, 33)], ids=["N-D", "B-N-D"])
def test_iter_norm_matches_reference(backend, shape):
    torch.manual_seed(1)
    x = torch.randn(shape)
    dy = torch.randn(shape)
    y, dx = _grads(lambda t: ik.iter_norm(t, backend=backend), x, dy)
    y_lp, dx_lp = _grads(iter_norm_ref, x, dy)
    y64, dx64 = _grads(lambda t: iter_norm_ref(t, upcast=True), x, dy)
    assert y.shape == x.shape
    assert_tolerance_rule(y, y_lp, y64.float(), ATOL[torch.float32], "y")
    assert_tolerance_rule(dx, dx_lp, dx64.float(), ATOL[torch.float32], "dx")


NONCONTIGUOUS = {
    "strided-columns": lambda z: torch.stack([z, -z], -1).flatten(-2)[..., ::2],
    "column-window": lambda z: torch.nn.functional.pad(z, (3, 4))[..., 3:-4],
    "transposed": lambda z: z.mT.contiguous().mT,
    "batch-stride": lambda z: torch.stack([z, z], 1)[:, 0],
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("make", NONCONTIGUOUS.values(), ids=NONCONTIGUOUS.keys())
def test_noncontiguous_inputs(backend, make):
    torch.manual_seed(2)
    z = torch.randn(2, 9, 31, dtype=torch.float64)
    dy = torch.randn(2, 9, 31, dtype=torch.float64)
    zn = make(z)
    assert not zn.is_contiguous() and torch.equal(zn, z)
    y, dz = _grads(lambda t: ik.whiten(t, 4, backend=backend), z, dy)
    yn, dzn = _grads(lambda t: ik.whiten(t, 4, backend=backend), zn, dy)
    torch.testing.assert_close(yn, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(dzn, dz, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 4])
def test_gradcheck_float64(backend, T):
    torch.manual_seed(3)
    z = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ik.whiten(t, T, eps=0.05, divisor=9.0, backend=backend), (z,))
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ik.iter_norm(t, T, backend=backend), (x,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_rank_deficient(backend):
    """r > n: S is singular; the whitening is still smooth on its range."""
    torch.manual_seed(4)
    z = torch.randn(1, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ik.whiten(t, 3, backend=backend), (z,))


def test_backends_agree_in_float64():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("C++ extension not built")
    torch.manual_seed(5)
    z = torch.randn(3, 33, 70, dtype=torch.float64)
    dy = torch.randn_like(z)
    y_t, dz_t = _grads(lambda t: ik.whiten(t, 4, eps=1e-4, backend="torch"), z, dy)
    y_c, dz_c = _grads(lambda t: ik.whiten(t, 4, eps=1e-4, backend="cpu"), z, dy)
    torch.testing.assert_close(y_c, y_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(dz_c, dz_t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_power_of_two_scale_gives_the_same_bits(backend, dtype, layout):
    """Y(2^k·Z) = Y(Z) and dZ scales by 2^-k, bit for bit (eps = 0): the rescale is exact.

    For the cpu backend k = ±40 takes the rescaled centring and k = 0, ±8 the unscaled one
    with the rescale folded into S and W afterwards; both must give the same bits.
    """
    torch.manual_seed(6)
    z = torch.randn(2, 9, 31, dtype=dtype)
    dy = torch.randn_like(z)
    if layout == "strided":  # every column read through a stride
        z = z.mT.contiguous().mT
    y, dz = _grads(lambda t: ik.whiten(t, 4, backend=backend), z, dy)
    for k in (-40, -8, 8, 40):
        yk, dzk = _grads(lambda t: ik.whiten(t, 4, backend=backend), z * 2.0**k, dy)
        assert torch.equal(yk, y), f"k={k}: {describe_error(yk, y)}"
        assert torch.equal(dzk * 2.0**k, dz), f"k={k}: {describe_error(dzk * 2.0**k, dz)}"


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("k", [-40, -8, 8, 40])
def test_cpu_channel_group_view_power_of_two_scale(k):
    """The (G, r, n1, n2) view of an NCHW tensor (the layer's input) under both centrings."""
    torch.manual_seed(7)
    x = torch.randn(5, 6, 3, 7)  # N, C, H, W: 2 groups of 3 channels
    view = lambda t: t.view(5, 2, 3, 21).permute(1, 2, 0, 3)  # noqa: E731  (G, r, N, H·W)
    fwd = torch.ops.intl_kernels.whiten_fwd
    y, mean, rscale, *_ = fwd(view(x), 4, 0.0, 104.0)
    yk, meank, rscalek, *_ = fwd(view(x * 2.0**k), 4, 0.0, 104.0)
    assert torch.equal(yk, y)
    assert torch.equal(rscalek * 2.0**k, rscale) and torch.equal(meank, mean)
