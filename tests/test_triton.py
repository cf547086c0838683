"""The triton backend against the paper reference and the torch backend (docs/design.md §2–§4).

Without a GPU these run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so shapes are small; on a GPU the same tests run on CUDA tensors.
Large shapes, the tf32 modes and CUDA graphs are in test_triton_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TRITON_DEVICE,
    WHITEN_ATOL,
    assert_tolerance_rule,
    check_whiten_against_reference,
    describe_error,
    needs_triton,
    output_and_grad,
)

import intl_kernels as ik
from intl_kernels import _backends
from python_ref import iter_norm_ref

pytestmark = needs_triton
DEV = TRITON_DEVICE

ATOL = WHITEN_ATOL

# (G, r, n): odd sizes, r > n (rank deficient), G = 1 and 3, one and several gram tiles
# (64-row tiles), the one-program Newton path (r <= 128) and the tiled one (r = 130).
SHAPES = {
    "G1-r2-n5": (1, 2, 5),
    "G3-r3-n8": (3, 3, 8),
    "G3-r17-n40": (3, 17, 40),
    "G1-r17-n9-rank-deficient": (1, 17, 9),
    "G1-r64-n100": (1, 64, 100),
    "G1-r65-n50-rank-deficient": (1, 65, 50),
    "G2-r130-n150-tiled": (2, 130, 150),
}


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g) * torch.rand(shape[:2] + (1,), generator=g).add(0.5) + 0.3
    dy = torch.randn(shape, generator=g)
    return z.to(DEV, dtype), dy.to(DEV, dtype)


def _check_against_reference(z, dy, T, eps, divisor, what=""):
    fn = lambda t: ik.whiten(t, T, eps=eps, divisor=divisor, backend="triton")  # noqa: E731
    check_whiten_against_reference(fn, z, dy, T, eps, divisor, what)


@pytest.mark.parametrize("T,eps", [(4, 0.0), (5, 1e-3), (1, 0.0), (2, 0.0)], ids=["T4", "T5-eps", "T1", "T2"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_whiten_float32_matches_reference(shape, T, eps):
    if shape[1] > 128 and T != 4:
        pytest.skip("the tiled path is slow in the interpreter: T = 4 only")
    z, dy = _inputs(shape, torch.float32, sum(shape) + T)
    _check_against_reference(z, dy, T, eps, shape[2] - 1 if eps == 0 else shape[2])


HALF_SHAPES = {k: SHAPES[k] for k in ("G3-r17-n40", "G1-r65-n50-rank-deficient", "G2-r130-n150-tiled")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", HALF_SHAPES.values(), ids=HALF_SHAPES.keys())
def test_whiten_half_matches_reference(shape, dtype):
    """Half inputs: half operands for the products with Z, float32 statistics, half output."""
    if dtype == torch.float16 and shape[1] > 128:
        pytest.skip("bf16 covers the tiled path; the Newton part is float32 for both")
    z, dy = _inputs(shape, dtype, 11)
    _check_against_reference(z, dy, 4, 0.0, shape[2] - 1)


@pytest.mark.parametrize("shape", [(2, 40), (3, 5, 33)], ids=["N-D", "B-N-D"])
def test_iter_norm_matches_reference(shape):
    torch.manual_seed(1)
    x, dy = torch.randn(shape).to(DEV), torch.randn(shape).to(DEV)
    y, dx = output_and_grad(lambda t: ik.iter_norm(t, backend="triton"), x, dy)
    y_lp, dx_lp = output_and_grad(iter_norm_ref, x, dy)
    y64, dx64 = output_and_grad(lambda t: iter_norm_ref(t, upcast=True), x, dy)
    assert y.shape == x.shape and y.device == x.device
    assert_tolerance_rule(y, y_lp, y64.float(), ATOL[torch.float32], "y")
    assert_tolerance_rule(dx, dx_lp, dx64.float(), ATOL[torch.float32], "dx")


def _stats_close(a, b, what):
    scale = b.abs().max().clamp_min(1.0)
    assert (a - b).abs().max() <= 1e-5 * scale, f"{what}: " + describe_error(a, b)


@pytest.mark.parametrize("shape", [(3, 17, 40), (2, 130, 150)], ids=["one-program", "tiled"])
def test_statistics_contract_shared_with_torch_backend(shape):
    """Same saved statistics as the torch backend, and each backward accepts the other's."""
    from intl_kernels.triton.whiten import _whiten_bwd, _whiten_fwd
    from intl_kernels.whiten import _whiten_bwd_torch, _whiten_fwd_torch

    z, dy = _inputs(shape, torch.float32, 5)
    div = float(shape[2] - 1)
    ours = _whiten_fwd(z, 3, 1e-4, div, "ieee")
    theirs = _whiten_fwd_torch(z, 3, 1e-4, div)
    for name, a, b in zip(("y", "mean", "rscale", "tau", "A", "P", "X"), ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        )
        _stats_close(a, b, name)
    dz = _whiten_bwd(dy, z, *ours[1:], div, "ieee")
    _stats_close(_whiten_bwd_torch(dy, z, *ours[1:], div), dz, "torch bwd on triton stats")
    _stats_close(_whiten_bwd(dy, z, *theirs[1:], div, "ieee"), dz, "triton bwd on torch stats")


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["sm80-tiled-adjoint", "sm90-one-program"])
def test_newton_adjoint_paths_agree_with_the_reference(monkeypatch, capability):
    """r = 40 (not a multiple of 16): the tiled adjoint that sm_80 takes and the one-program
    adjoint of sm_90 both match the reference."""
    from intl_kernels.triton import whiten as tw

    monkeypatch.setattr(tw, "_capability", lambda device: capability)
    assert tw._newton_bwd_one_program(40, torch.device(DEV)) == (capability >= (9, 0))
    z, dy = _inputs((2, 40, 60), torch.float32, 11)
    _check_against_reference(z, dy, 3, 0.0, 60.0, f"capability {capability}")


def test_split_k_partials_are_deterministic_and_correct(monkeypatch):
    """n ≫ r: the covariance and Ȳ Zcᵀ are split over columns and reduced in a fixed order."""
    from intl_kernels.triton import whiten as tw

    shape = (2, 20, 1300)
    z, dy = _inputs(shape, torch.float32, 6)
    unsplit = output_and_grad(lambda t: ik.whiten(t, 4, backend="triton"), z, dy)
    monkeypatch.setattr(tw, "_MIN_SPLIT_COLUMNS", 128)
    n_split, chunk = tw._split_k(1300, 2, z.device, None)
    assert n_split > 1 and (n_split - 1) * chunk < 1300 <= n_split * chunk
    split = output_and_grad(lambda t: ik.whiten(t, 4, backend="triton"), z, dy)
    again = output_and_grad(lambda t: ik.whiten(t, 4, backend="triton"), z, dy)
    for a, b in zip(split, again, strict=True):
        assert torch.equal(a, b), "split-K results differ between two identical runs"
    _check_against_reference(z, dy, 4, 0.0, 1299.0, "split-K ")
    for a, b in zip(split, unsplit, strict=True):
        _stats_close(a, b, "split vs unsplit")


@pytest.mark.parametrize("split", [1, 3])
def test_gram_tiles_and_split_partials(split):
    """S from lower-triangle tiles (mirrored) equals the full product, for 1 and 3 column splits."""
    from intl_kernels.triton import whiten as tw

    z, _ = _inputs((2, 130, 700), torch.float32, 7)
    rowstats = tw._whiten_rowstats(tw._as4d(z), 0.0)
    S, trp, mean, rscale = tw._whiten_gram(
        tw._as4d(z), divisor=699.0, sqrt_eps=0.0, prec="ieee", rowstats=rowstats, split=split
    )
    zc = (z.double() * rscale.double() - z[..., :1].double() * rscale.double()) - mean.double()
    expected = zc @ zc.mT / 699.0
    assert torch.equal(S, S.mT), "S is not exactly symmetric"
    _stats_close(S.double(), expected, "S")
    _stats_close(trp.sum(1).double(), expected.diagonal(dim1=1, dim2=2).sum(1), "trace partials")


def test_row_statistics_split_over_columns_merge_exactly_when_the_exponent_grows(monkeypatch):
    """Row statistics in column chunks: each chunk's sum in its own power-of-two scale, raised
    as larger values arrive (here the rows grow by 2^40 from the first to the last chunk); the
    merge gives the mean of the unsplit computation, the exponents of the row maxima, and the
    same bits on every run."""
    from intl_kernels.triton import whiten as tw

    g = torch.Generator().manual_seed(9)
    n = 7 * 128
    growth = torch.exp2(torch.linspace(0, 40, n, dtype=torch.float64))
    z = (torch.randn(2, 5, n, generator=g, dtype=torch.float64) * growth + 0.5 * growth).float().to(DEV)
    z4 = tw._as4d(z)
    psum, pexp, gexp = tw._whiten_rowstats(z4, 0.0, chunks=7)
    assert psum.shape == (7, 2, 5)
    assert (pexp[-1] > pexp[0] + 30).all(), "later chunks should hold larger exponents"
    row_max_exp = torch.frexp(z.abs().amax(-1)).exponent.clamp(-125, 126).cpu()
    torch.testing.assert_close(pexp.amax(0).cpu(), row_max_exp.int(), rtol=0, atol=0)
    torch.testing.assert_close(gexp.cpu(), row_max_exp.amax(-1).int(), rtol=0, atol=0)

    def mean_of(rowstats):
        _, _, mean, rscale = tw._whiten_gram(
            z4, divisor=n - 1.0, sqrt_eps=0.0, prec="ieee", rowstats=rowstats
        )
        return mean.squeeze(-1), rscale

    split, rscale = mean_of((psum, pexp, gexp))
    whole, _ = mean_of(tw._whiten_rowstats(z4, 0.0, chunks=1))
    zs = z.double() * rscale.double()
    expected = (zs - zs[..., :1]).mean(-1)
    _stats_close(split.double(), expected, "split mean")
    _stats_close(whole.double(), expected, "unsplit mean")
    again, _ = mean_of(tw._whiten_rowstats(z4, 0.0, chunks=7))
    assert torch.equal(again, split), "split row statistics differ between two identical runs"
    # and end to end, with the heuristic splitting this small n
    monkeypatch.setattr(tw, "_MIN_ROWSTATS_COLUMNS", 64)
    assert tw._rowstats_chunks(n, 2 * 2, z.device, None)[0] > 1
    dy = torch.randn(z.shape, generator=g).to(DEV)
    _check_against_reference(z, dy, 4, 0.0, n - 1.0, "split row statistics ")


def test_split_k_reduction_bits_do_not_depend_on_the_piece_count(monkeypatch):
    """The reduction of split-K partials, in pieces of a tile or whole tiles (same splits per
    load): identical bits, and S exactly symmetric."""
    from intl_kernels.triton import whiten as tw

    z, _ = _inputs((2, 40, 900), torch.float32, 12)
    z4 = tw._as4d(z)
    rowstats = tw._whiten_rowstats(z4, 0.0)
    results = []
    for pieces, piece in ((1, 4096), (16, 256), (256, 16)):
        monkeypatch.setattr(
            tw, "_reduce_pieces", lambda tiles, G, n_split, block, device, p=pieces, e=piece: (p, e, 8)
        )
        S, trp, _, _ = tw._whiten_gram(
            z4, divisor=899.0, sqrt_eps=1e-3, prec="ieee", rowstats=rowstats, split=5
        )
        assert trp.shape == (2, pieces)
        results.append((S, trp.sum(1)))
    for S, tr in results:
        assert torch.equal(S, results[0][0]), "S depends on the piece count"
        assert torch.equal(S, S.mT), "S is not exactly symmetric"
        torch.testing.assert_close(tr, S.diagonal(dim1=1, dim2=2).sum(1), rtol=1e-6, atol=0)


def test_more_groups_than_the_grid_holds_is_a_clear_error():
    from intl_kernels.triton.whiten import MAX_GROUPS

    z = torch.randn(MAX_GROUPS + 1, 2, 3, device=DEV)
    with pytest.raises(ValueError, match=r"at most 65535 groups .* got G = 65536"):
        ik.whiten(z, 2, backend="triton")


NONCONTIGUOUS = {
    "strided-columns": lambda z: torch.stack([z, -z], -1).flatten(-2)[..., ::2],
    "column-window": lambda z: torch.nn.functional.pad(z, (3, 4))[..., 3:-4],
    "transposed": lambda z: z.mT.contiguous().mT,
    "batch-stride": lambda z: torch.stack([z, z], 1)[:, 0],
}


@pytest.mark.parametrize("make", NONCONTIGUOUS.values(), ids=NONCONTIGUOUS.keys())
def test_noncontiguous_inputs_read_by_strides(make):
    """Strided reads: bitwise the same result as the contiguous input (same arithmetic)."""
    z, dy = _inputs((2, 9, 31), torch.float32, 2)
    zn = make(z)
    assert not zn.is_contiguous() and torch.equal(zn, z)
    y, dz = output_and_grad(lambda t: ik.whiten(t, 4, backend="triton"), z, dy)
    yn, dzn = output_and_grad(lambda t: ik.whiten(t, 4, backend="triton"), zn, dy)
    dyn = make(dy)
    yn2, dzn2 = output_and_grad(lambda t: ik.whiten(t, 4, backend="triton"), zn, dyn)
    for a, b in ((yn, y), (dzn, dz), (yn2, y), (dzn2, dz)):
        assert torch.equal(a, b), describe_error(a, b)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nchw_groups_read_without_permute_copy(layout):
    """Z_g = x[:, g·c:(g+1)·c] as (G, c, N, H·W) views: two-level column strides, no copy."""
    from intl_kernels.triton.whiten import _whiten_bwd, _whiten_fwd
    from intl_kernels.whiten import _whiten_bwd_torch, _whiten_fwd_torch

    N, C, H, W, c = 3, 12, 4, 5, 6
    g = torch.Generator().manual_seed(9)
    x = torch.randn(N, C, H, W, generator=g).to(DEV)
    dyx = torch.randn(N, C, H, W, generator=g).to(DEV)
    if layout == "channels_last":
        x, dyx = x.to(memory_format=torch.channels_last), dyx.to(memory_format=torch.channels_last)

    def groups(t):  # (N, C, H, W) → (G, c, N, H·W) view
        return t.permute(1, 0, 2, 3).unflatten(0, (C // c, c)).flatten(-2)

    z4, dy4 = groups(x), groups(dyx)
    assert z4.data_ptr() == x.data_ptr()  # a view: the kernels read x itself
    # NCHW: the batch and spatial axes do not merge into one column stride (two-level
    # addressing); channels_last: they do (column stride C).
    assert (z4.stride(2) == z4.shape[3] * z4.stride(3)) == (layout == "channels_last")
    n = N * H * W
    y4, *stats = _whiten_fwd(z4, 5, 1e-5, float(n), "ieee")
    dz4 = _whiten_bwd(dy4, z4, *stats, float(n), "ieee")
    z3, dy3 = z4.reshape(C // c, c, n), dy4.reshape(C // c, c, n)  # copies, for the oracle
    y_t, *stats_t = _whiten_fwd_torch(z3, 5, 1e-5, float(n))
    dz_t = _whiten_bwd_torch(dy3, z3, *stats_t, float(n))
    assert y4.shape == z4.shape
    _stats_close(y4.reshape(C // c, c, n), y_t, "y")
    _stats_close(dz4.reshape(C // c, c, n), dz_t, "dz")


@pytest.mark.parametrize("precision", [None, "ieee", "tf32", "tf32x3"])
def test_precision_modes_are_accepted(precision):
    """Every mode runs; the interpreter computes float32 products exactly for all of them,
    so their error bounds are checked on a GPU (test_triton_cuda.py)."""
    z, _ = _inputs((1, 8, 20), torch.float32, 3)
    y = ik.whiten(z, 4, backend="triton", precision=precision)
    assert y.shape == z.shape and torch.isfinite(y).all()


def test_bad_input_errors():
    with pytest.raises(
        TypeError, match="backend 'triton' takes float32, bfloat16, float16 inputs, got torch.float64"
    ):
        ik.whiten(torch.randn(1, 3, 4, dtype=torch.float64, device=DEV), 2, backend="triton")
    with pytest.raises(
        ValueError, match="precision must be None or 'ieee' or 'tf32' or 'tf32x3' for backend 'triton'"
    ):
        ik.whiten(torch.randn(1, 3, 4, device=DEV), 2, backend="triton", precision="bf16")
    with pytest.raises(ValueError, match="precision must be None or 'ieee' for backend 'torch', got 'tf32'"):
        ik.whiten(torch.randn(1, 3, 4), 2, backend="torch", precision="tf32")
    other = "meta"
    with pytest.raises(ValueError, match=f"backend 'triton' needs {DEV} tensors, got a tensor on {other}"):
        ik.whiten(torch.randn(1, 3, 4, device=other), 2, backend="triton")


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    backend, _ = _backends.resolve("whiten", "auto", torch.randn(1, 3, 4), None)
    assert backend in ("cpu", "torch")


def test_custom_ops_registered_with_fake_impls():
    z = torch.randn(2, 5, 7, device=DEV)
    torch.library.opcheck(
        torch.ops.intl_kernels.whiten_fwd_triton,
        (z, 3, 1e-3, 7.0, "ieee"),
        test_utils=("test_schema", "test_faketensor"),
    )
    stats = torch.ops.intl_kernels.whiten_fwd_triton(z, 3, 1e-3, 7.0, "ieee")
    torch.library.opcheck(
        torch.ops.intl_kernels.whiten_bwd_triton,
        (torch.randn_like(z), z, *stats[1:], 7.0, "ieee"),
        test_utils=("test_schema", "test_faketensor"),
    )
