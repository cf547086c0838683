"""The cuda backend's kernels on the CPU, through the host emulator (csrc/whiten_emulate.cpp).

The kernel bodies in csrc/whiten_blocks.h are the code the GPU runs; the emulator runs them
block by block and thread by thread, with the launch sequence of the CUDA launcher
(csrc/whiten_small.h). These tests check that code against the paper reference under the
tolerance rule (docs/design.md §4), against the torch backend's statistics contract, for strided
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


# Per-tile indexing: every layout reads the same tile contents through its strides (a column's
# offset once per tile, a row's once per block), so each gives the bits of a contiguous copy.
# c = 64 fills its row bucket, c = 40 pads it (rows repeat row c − 1 and are dropped), c = 100 is
# the c > 64 bucket (the backward streams [W | M]ᵀ in chunks); columns over several tiles and
# blocks, a last tile shorter than the others.
def _layout_case(layout, G, c, seed):
    g = torch.Generator().manual_seed(seed)
    N, H, W = 5, 6, 7  # n = 210 columns: n2 = 42 in NCHW, not a multiple of the tile width
    if layout in ("nchw", "channels_last", "dy_other_layout"):
        x = torch.randn(N, G * c, H, W, generator=g) * 2.0 + 0.5
        d = torch.randn(N, G * c, H, W, generator=g)
        if layout != "nchw":
            x = x.to(memory_format=torch.channels_last)
        if layout == "channels_last":
            d = d.to(memory_format=torch.channels_last)
        return _group_view(x, G, c), _group_view(d, G, c)
    if layout == "sliced":  # every other column of a wider tensor, and a row slice
        wide = torch.randn(G, c + 3, 2 * 210, generator=g) + 0.5
        return wide[:, 1 : c + 1, ::2], torch.randn(G, c + 3, 210, generator=g)[:, :c]
    if layout == "expanded_columns":  # (G, c, n1, n2) with stride 0 along n1
        base = torch.randn(G, c, 1, 42, generator=g) + 0.5
        return base.expand(G, c, 5, 42), torch.randn(G, c, 5, 42, generator=g)
    if layout == "expanded_groups":  # groups sharing one (c, n) block: stride 0 along G
        base = torch.randn(1, c, 210, generator=g) + 0.5
        return base.expand(G, c, 210), torch.randn(G, c, 210, generator=g)
    if layout == "transposed":  # (G, c, n) with unit row stride, as channels_last without batches
        z = (torch.randn(G, 210, c, generator=g) + 0.5).transpose(1, 2)
        return z, torch.randn(G, c, 210, generator=g)
    raise AssertionError(layout)


LAYOUTS = [
    "nchw",
    "channels_last",
    "dy_other_layout",
    "sliced",
    "expanded_columns",
    "expanded_groups",
    "transposed",
]


@pytest.mark.parametrize("c", [64, 40, 100], ids=["c64", "c40-padded", "c100"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_tile_indexing_matches_contiguous_copy(layout, c):
    G = 2
    z, dy = _layout_case(layout, G, c, seed=c)
    n = z.shape[2] * (z.shape[3] if z.dim() == 4 else 1)
    zc, dyc = z.reshape(G, c, n).contiguous(), dy.reshape(G, c, n).contiguous()
    w = torch.rand(G, c, generator=torch.Generator().manual_seed(1)) + 0.5
    b = torch.randn(G, c, generator=torch.Generator().manual_seed(2))
    for chunk in (128, 0):  # two blocks per group; the planner's default
        out = OPS.emulate_small_whiten_fwd(z, w, b, 5, 1e-5, float(n), chunk)
        ref = OPS.emulate_small_whiten_fwd(zc, w, b, 5, 1e-5, float(n), chunk)
        assert out[0].shape == z.shape
        assert torch.equal(out[0].reshape(G, c, n), ref[0]), layout
        for a, r in zip(out[1:], ref[1:], strict=True):
            assert torch.equal(a, r), layout
        grads = OPS.emulate_small_whiten_bwd(dy, z, w, *out[1:], float(n), chunk)
        grads_ref = OPS.emulate_small_whiten_bwd(dyc, zc, w, *ref[1:], float(n), chunk)
        assert grads[0].shape == z.shape
        assert torch.equal(grads[0].reshape(G, c, n), grads_ref[0]), layout
        assert torch.equal(grads[1], grads_ref[1]) and torch.equal(grads[2], grads_ref[2])
    if layout in ("nchw", "channels_last"):
        assert out[0].stride() == z.stride() and grads[0].stride() == z.stride()
    # and the contiguous copy against the reference
    _check(zc, dyc, 5, 1e-5, float(n), chunk=128)


@pytest.mark.parametrize("c", [64, 100], ids=["c64", "c100"])
def test_thread_order_bitwise_identical_full_and_streamed_buckets(c):
    """The c = 64 bucket (split-K Gram, no padding rows) and c > 64 (streamed [W | M]ᵀ) in both
    thread orders, channels_last views (threads along rows)."""
    z, dy = _layout_case("channels_last", 1, c, seed=3)
    fwd = OPS.emulate_small_whiten_fwd(z, None, None, 4, 1e-5, 210.0, 64, False)
    rev = OPS.emulate_small_whiten_fwd(z, None, None, 4, 1e-5, 210.0, 64, True)
    for a, b in zip(fwd, rev, strict=True):
        assert torch.equal(a, b)
    w = torch.rand(1, c) + 0.5
    d1 = OPS.emulate_small_whiten_bwd(dy, z, w, *fwd[1:], 210.0, 64, False)
    d2 = OPS.emulate_small_whiten_bwd(dy, z, w, *fwd[1:], 210.0, 64, True)
    for a, b in zip(d1, d2, strict=True):
        assert torch.equal(a, b)


def test_exponent_grows_from_all_zero_tiles():
    """A block whose first tiles (and first column) are zero: its exponent starts unset and the
    first nonzero tile sets it (the rescale path from 'nothing summed'), then grows again."""
    z, dy = _inputs((1, 64, 600), torch.float32, 13)
    z[:, :, :200] = 0.0
    z[:, :, 400:] *= 1e6
    _check(z, dy, 4, 0.0, 599.0, chunk=320)


def test_dy_on_another_device_rejected():
    z = torch.randn(2, 4, 50)
    _, *stats = OPS.emulate_small_whiten_fwd(z, None, None, 5, 0.0, 50.0)
    with pytest.raises(RuntimeError, match=r"dy must be on z's device cpu, got meta"):
        OPS.emulate_small_whiten_bwd(torch.empty(2, 4, 50, device="meta"), z, None, *stats, 50.0)


# The grid planner (csrc/whiten_small.h, plan_blocks) as a pure function: the IterNorm layer's
# groups of 64 channels at the ResNet-50 stages (N = 256), 132 SMs, and the blocks per SM a
# streaming kernel can have at c = 64 (registers budgeted for 2 or 4; 1 where a device allows
# less): the grid is whole waves of the resident slots, every block with at least 2 tiles.
RESNET50 = [(256, 64, 56), (256, 256, 56), (256, 512, 28), (256, 1024, 14), (256, 2048, 7)]


@pytest.mark.parametrize("per_sm", [1, 2, 4])
def test_grid_planner_whole_waves_at_resnet50_stages(per_sm):
    shapes = [s for s in _C.small_kernel_shapes() if s["rows"] == 64]
    assert {(s["kernel"], s["bwd"]) for s in shapes} == {
        ("stats", False),
        ("apply", False),
        ("dstats", True),
        ("apply", True),
    }
    slots = per_sm * 132
    for s in shapes:
        for N, C, H in RESNET50:
            G, n = C // 64, N * H * H
            tiles = -(-n // s["columns"])
            nb = _C.plan_blocks(tiles, G, slots)
            assert (G * nb) % slots == 0, (s, C, H, nb)
            assert 2 * nb <= tiles, (s, C, H, nb)


def test_grid_planner_small_and_awkward_grids():
    # fewer tiles than slots: one block per tile (a single partial wave, no tail)
    assert _C.plan_blocks(3, 1, 264) == 3

    # no whole number of waves within 16 (G = 17 on 264 slots): the shortest makespan in tiles
    def makespan(nb):
        return -(-17 * nb // 264) * -(-1000 // nb)

    nb = _C.plan_blocks(1000, 17, 264)
    assert makespan(nb) == min(makespan(k) for k in range(1, 1001))
    # G = 7 on 264 slots: 7 whole waves of 264 blocks
    assert _C.plan_blocks(1000, 7, 264) == 264
    # whole waves when they exist: the fewest
    assert _C.plan_blocks(12544, 1, 264) == 264 and _C.plan_blocks(196, 32, 264) == 33
    for tiles, G, slots in [(1, 1, 1), (5, 65535, 528), (10**7, 3, 396)]:
        assert 1 <= _C.plan_blocks(tiles, G, slots) <= tiles
    with pytest.raises(RuntimeError, match="must be >= 1"):
        _C.plan_blocks(0, 1, 264)
