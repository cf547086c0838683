"""The cuda backend's kernels on the CPU, through the host emulator (csrc/whiten_emulate.cpp).

The kernel bodies in csrc/whiten_blocks.h are the code the GPU runs; the emulator runs them
block by block and thread by thread, with the launch sequence of the CUDA launcher
(csrc/whiten_small.h). These tests check that code against the paper reference under the
tolerance rule (DESIGN §4), against the torch backend's statistics contract, for strided
layouts, block partitions, extreme scales, and thread-order independence (a missing
barrier shows up as a difference between the two thread orders). On a GPU the same
checks run on the real kernels in test_cuda_backend.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import check_whiten_against_reference, describe_error

import intl_kernels as ik
from intl_kernels.whiten import _whiten_bwd_torch, _whiten_fwd_torch

_C = pytest.importorskip("intl_kernels._C", reason="the C++ extension is not built")
OPS = torch.ops.intl_kernels


class _Emulated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, T, eps, divisor, chunk, reverse):
        y, *stats = OPS.emulate_small_whiten_fwd(z, None, None, T, eps, divisor, chunk, reverse)
        ctx.save_for_backward(z, *stats)
        ctx.args = (divisor, chunk, reverse)
        return y

    @staticmethod
    def backward(ctx, dy):
        z, *stats = ctx.saved_tensors
        divisor, chunk, reverse = ctx.args
        dz, _, _ = OPS.emulate_small_whiten_bwd(dy, z, None, *stats, divisor, chunk, reverse)
        return dz, None, None, None, None, None


def emulated(z, T, eps=0.0, divisor=None, chunk=64, reverse=False):
    divisor = float(z.shape[-1] - 1) if divisor is None else float(divisor)
    return _Emulated.apply(z, T, eps, divisor, chunk, reverse)


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g) * torch.rand(shape[:2] + (1,), generator=g).add(0.5) + 0.3
    dy = torch.randn(shape, generator=g)
    return z.to(dtype), dy.to(dtype)


def _check(z, dy, T, eps, divisor, chunk=64):
    check_whiten_against_reference(lambda t: emulated(t, T, eps, divisor, chunk), z, dy, T, eps, divisor)


# (G, r, n): every row bucket (32, 64, 128), odd sizes, r > n (rank deficient), one and
# several 64-column blocks and tiles, a last block shorter than a tile.
SHAPES = {
    "G1-r1-n10": (1, 1, 10),
    "G1-r2-n5": (1, 2, 5),
    "G3-r3-n70": (3, 3, 70),
    "G2-r16-n200": (2, 16, 200),
    "G1-r17-n9-rank-deficient": (1, 17, 9),
    "G2-r32-n130": (2, 32, 130),
    "G1-r33-n100": (1, 33, 100),
    "G1-r64-n300": (1, 64, 300),
    "G1-r65-n100": (1, 65, 100),
    "G1-r128-n150": (1, 128, 150),
}


@pytest.mark.parametrize("T,eps", [(4, 0.0), (5, 1e-3), (1, 0.0), (2, 0.0)], ids=["T4", "T5-eps", "T1", "T2"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_float32_matches_reference(shape, T, eps):
    z, dy = _inputs(shape, torch.float32, sum(shape) + T)
    _check(z, dy, T, eps, shape[2] - 1 if eps == 0 else shape[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 17, 140), (1, 65, 100)], ids=["r17", "r65"])
def test_half_matches_reference(shape, dtype):
    z, dy = _inputs(shape, dtype, 11)
    _check(z, dy, 5, 1e-5, shape[2])


@pytest.mark.parametrize("chunk", [0, 64, 128, 192], ids=["default", "64", "128", "192"])
def test_block_partitions_merge_correctly(chunk):
    """Columns split over 1 to 7 blocks per group, merged by the parallel-variance formula."""
    z, dy = _inputs((2, 24, 400), torch.float32, 3)
    _check(z, dy, 5, 0.0, 400.0, chunk=chunk)


def test_thread_order_and_repeat_are_bitwise_identical():
    """Both thread orders in every phase give the same bits: no phase reads what another
    thread of the same phase writes (a missing barrier); two runs give the same bits."""
    z, dy = _inputs((2, 40, 300), torch.float32, 4)
    fwd = OPS.emulate_small_whiten_fwd(z, None, None, 5, 1e-5, 300.0, 64, False)
    rev = OPS.emulate_small_whiten_fwd(z, None, None, 5, 1e-5, 300.0, 64, True)
    again = OPS.emulate_small_whiten_fwd(z, None, None, 5, 1e-5, 300.0, 64, False)
    for a, b, c in zip(fwd, rev, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    w = torch.rand(2, 40) + 0.5
    d1 = OPS.emulate_small_whiten_bwd(dy, z, w, *fwd[1:], 300.0, 64, False)
    d2 = OPS.emulate_small_whiten_bwd(dy, z, w, *fwd[1:], 300.0, 64, True)
    for a, b in zip(d1, d2, strict=True):
        assert torch.equal(a, b)


def _stats_close(a, b, what, rtol=1e-5):
    scale = b.abs().max().clamp_min(1.0)
    assert (a - b).abs().max() <= rtol * scale, f"{what}: " + describe_error(a, b)


def test_statistics_contract_shared_with_torch_backend():
    """Same saved statistics as the torch backend, and each backward accepts the other's."""
    z, dy = _inputs((3, 20, 200), torch.float32, 5)
    div = 199.0
    ours = OPS.emulate_small_whiten_fwd(z, None, None, 3, 1e-4, div)
    theirs = _whiten_fwd_torch(z, 3, 1e-4, div)
    for name, a, b in zip(("y", "mean", "rscale", "tau", "A", "P", "X"), ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        )
        _stats_close(a, b, name)
    dz = OPS.emulate_small_whiten_bwd(dy, z, None, *ours[1:], div)[0]
    _stats_close(_whiten_bwd_torch(dy, z, *ours[1:], div), dz, "torch bwd on emulated stats")
    _stats_close(
        OPS.emulate_small_whiten_bwd(dy, z, None, *theirs[1:], div)[0], dz, "emulated bwd on torch stats"
    )


def _group_view(x, G, c):  # (N, C, H, W) -> (G, c, N, H·W), a view for NCHW and channels_last
    return x.flatten(2).unflatten(1, (G, c)).permute(1, 2, 0, 3)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_strided_inputs_read_in_place(layout):
    """(G, c, N, H·W) group views and a sliced 3-D input give the same bits as a contiguous
    copy (the tiles hold the same values; only the load order differs), and outputs come
    back in the input's layout."""
    g = torch.Generator().manual_seed(6)
    if layout == "sliced":
        wide = torch.randn(2, 24, 2 * 150, generator=g)
        z = wide[:, :, ::2]
        dy = torch.randn(2, 24, 150, generator=g)
    else:
        x = torch.randn(6, 48, 5, 7, generator=g) + 0.5
        d = torch.randn(6, 48, 5, 7, generator=g)
        if layout == "channels_last":
            x, d = x.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
        z, dy = _group_view(x, 2, 24), _group_view(d, 2, 24)
    n = z.shape[2] * (z.shape[3] if z.dim() == 4 else 1)
    zc, dyc = z.reshape(2, 24, n).contiguous(), dy.reshape(2, 24, n).contiguous()
    out = OPS.emulate_small_whiten_fwd(z, None, None, 5, 1e-5, float(n), 64)
    ref = OPS.emulate_small_whiten_fwd(zc, None, None, 5, 1e-5, float(n), 64)
    assert out[0].shape == z.shape
    if layout != "sliced":
        assert out[0].stride() == z.stride()
    assert torch.equal(out[0].reshape(2, 24, n), ref[0])
    for a, b in zip(out[1:], ref[1:], strict=True):
        assert torch.equal(a, b)
    dz = OPS.emulate_small_whiten_bwd(dy, z, None, *out[1:], float(n), 64)[0]
    dz_ref = OPS.emulate_small_whiten_bwd(dyc, zc, None, *ref[1:], float(n), 64)[0]
    assert dz.shape == z.shape
    assert torch.equal(dz.reshape(2, 24, n), dz_ref)


def test_affine_matches_cpu_op():
    """weight/bias folded into the apply pass, dweight/dbias from the adjoint kernel."""
    z, dy = _inputs((2, 30, 250), torch.float32, 7)
    g = torch.Generator().manual_seed(8)
    w, b = torch.rand(2, 30, generator=g) + 0.5, torch.randn(2, 30, generator=g)
    ours = OPS.emulate_small_whiten_fwd(z, w, b, 5, 1e-5, 250.0, 64)
    cpu = OPS.whiten_affine_fwd(z, w, b, 5, 1e-5, 250.0)
    for name, a, c in zip(("y", "mean", "rscale", "tau", "A", "P", "X"), ours, cpu, strict=True):
        _stats_close(a, c, name)
    grads = OPS.emulate_small_whiten_bwd(dy, z, w, *ours[1:], 250.0, 64)
    cpu_grads = OPS.whiten_affine_bwd(dy, z, w, *cpu[1:], 250.0)
    for name, a, c in zip(("dz", "dweight", "dbias"), grads, cpu_grads, strict=True):
        assert a.shape == c.shape, f"{name}: {a.shape} vs {c.shape}"
        _stats_close(a, c, name, rtol=2e-5)


@pytest.mark.parametrize(
    "scale,shift",
    [(1e30, 0.0), (1e-30, 0.0), (1e-41, 0.0), (1.0, 1e4)],
    ids=["huge", "tiny", "subnormal", "mean-much-larger-than-spread"],
)
def test_extreme_inputs_stay_accurate(scale, shift):
    """Y is invariant to the scale of Z: the power-of-two rescale keeps every finite input
    finite (subnormals included), and centring on load keeps a large mean harmless."""
    z, _ = _inputs((2, 12, 150), torch.float32, 9)
    base = emulated(z, 5, 1e-5, 150.0)
    zz = (z.double() * scale + shift).float()
    eps = 1e-5 * scale * scale  # the same ridge relative to the covariance
    y = emulated(zz, 5, eps, 150.0)
    y_torch = ik.whiten(zz, 5, eps=eps, divisor=150.0, backend="torch")
    assert torch.isfinite(y).all()
    _stats_close(y, y_torch, "vs torch backend", rtol=1e-4)
    if shift == 0.0 and scale >= 1e-30:  # subnormal inputs carry fewer significant bits
        _stats_close(y, base, "scale invariance", rtol=1e-4)


def test_exponent_growing_across_tiles():
    """Later column tiles much larger than the first: the running sums are rescaled exactly."""
    z, dy = _inputs((1, 20, 512), torch.float32, 10)
    z = z * torch.logspace(-4, 4, 512)
    _check(z, dy, 4, 0.0, 511.0, chunk=256)


def test_zero_and_nan_groups_are_isolated():
    z, _ = _inputs((3, 10, 100), torch.float32, 12)
    z[0] = 0.0
    z[2, 3, 17] = float("nan")
    y = emulated(z, 5, 0.0, 100.0)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert torch.isfinite(y[1]).all()
    assert torch.isnan(y[2]).any()
    torch.testing.assert_close(
        y[1], ik.whiten(z[1:2], 5, divisor=100.0, backend="torch")[0], atol=1e-5, rtol=1e-5
    )


def test_bad_input_errors():
    z = torch.randn(1, 129, 50)
    with pytest.raises(RuntimeError, match=r"at most|<= 128"):
        OPS.emulate_small_whiten_fwd(z, None, None, 5, 0.0, 50.0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        OPS.emulate_small_whiten_fwd(torch.randn(1, 4, 50, dtype=torch.float64), None, None, 5, 0.0, 50.0)
    with pytest.raises(RuntimeError, match="chunk must be"):
        OPS.emulate_small_whiten_fwd(torch.randn(1, 4, 50), None, None, 5, 0.0, 50.0, 30)
    with pytest.raises(RuntimeError, match="T must be >= 1"):
        OPS.emulate_small_whiten_fwd(torch.randn(1, 4, 50), None, None, 0, 0.0, 50.0)
    with pytest.raises(RuntimeError, match="weight must have"):
        OPS.emulate_small_whiten_fwd(torch.randn(2, 4, 50), torch.ones(3), torch.zeros(3), 5, 0.0, 50.0)
    y, *stats = OPS.emulate_small_whiten_fwd(torch.randn(2, 4, 50), None, None, 5, 0.0, 50.0)
    with pytest.raises(RuntimeError, match="dy must have z's shape"):
        OPS.emulate_small_whiten_bwd(torch.randn(2, 4, 49), torch.randn(2, 4, 50), None, *stats, 50.0)
    with pytest.raises(RuntimeError, match="A must have shape"):
        OPS.emulate_small_whiten_bwd(
            y, torch.randn(2, 4, 50), None, stats[0], stats[1], stats[2], stats[3][:1], *stats[4:], 50.0
        )
