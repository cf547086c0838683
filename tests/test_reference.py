"""Tests of python_ref, the literal paper transcriptions, against mathematics.

Expected values come from the papers' theorems (INTL Theorem 1, Propositions 1–2),
from an independent eigendecomposition, or from closed forms worked out by hand, never
from running the code under test. CPU, float64 unless stated.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from python_ref import IterNormRef, intl_loss_ref, iter_norm_ref, norm_mse_ref, trace_loss_ref, whiten_ref

F64 = torch.float64


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0, what: str = ""
):
    """Assert |actual − expected| <= atol + rtol·max|expected|; on failure print max error and where."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.to(F64) - expected.to(F64)).abs().nan_to_num(nan=math.inf)
    scale = expected.to(F64).abs().max().item()
    bound = atol + rtol * scale
    max_err = err.max().item()
    if not max_err <= bound:
        idx = tuple(torch.nonzero(err == max_err)[0].tolist())
        pytest.fail(
            f"{what}: max abs error {max_err:.3e} > bound {bound:.3e} "
            f"(rtol={rtol:g} x max|expected|={scale:.3e} + atol={atol:g}); "
            f"mean error {err.mean().item():.3e}; first worst index {idx}: "
            f"actual {actual[idx].item():.17g}, expected {expected[idx].item():.17g}"
        )


def newton_f(u: torch.Tensor, T: int) -> torch.Tensor:
    """f_T(u): f_0 = 1, f_{k+1} = 1.5 f_k − 0.5 u f_k³ (INTL Theorem 1)."""
    f = torch.ones_like(u)
    for _ in range(T):
        f = 1.5 * f - 0.5 * u * f**3
    return f


def spectrum_z(G: int, r: int, n: int, decades: float, seed: int) -> torch.Tensor:
    """(G, r, n) with singular values of the centred rows spread over `decades` decades, plus row offsets."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(G, r, n, generator=g, dtype=F64)
    U, _, Vh = torch.linalg.svd(z - z.mean(-1, keepdim=True), full_matrices=False)
    k = min(r, n - 1)  # centring removes one column direction
    s = torch.logspace(0, -decades, k, dtype=F64).expand(G, k)
    zc = U[..., :k] @ torch.diag_embed(s) @ Vh[..., :k, :]
    offsets = 3.0 * torch.randn(G, r, 1, generator=g, dtype=F64)
    return zc + offsets


def eigvals_desc(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(m).flip(-1)


def group_view(X: torch.Tensor, g: int) -> torch.Tensor:
    """(N, C, *spatial) -> (g, c, N·prod(spatial)), column index n·HW + spatial position."""
    C = X.shape[1]
    perm = (1, 0, *range(2, X.dim()))
    return X.permute(perm).reshape(g, C // g, -1)


def ungroup(Y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of group_view for an input of `shape`."""
    N, C, *spatial = shape
    perm = (1, 0, *range(2, len(shape)))
    return Y.reshape(C, N, *spatial).permute(perm)


def whitening_matrix_eigh(
    Z: torch.Tensor, T: int, eps: float, divisor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, W) of Z: (G, r, n) computed by eigendecomposition: W = U f_T(u) Uᵀ / √τ (INTL Theorem 1)."""
    mu = Z.mean(-1, keepdim=True)
    Zc = Z - mu
    S = Zc @ Zc.mT / divisor + eps * torch.eye(Z.shape[1], dtype=F64)
    lam, U = torch.linalg.eigh(S)
    tau = lam.sum(-1, keepdim=True)
    f = newton_f(lam / tau, T)
    W = U @ torch.diag_embed(f / tau.sqrt()) @ U.mT
    return mu, W


# ---------------------------------------------------------------------------------------------------
# INTL Theorem 1: eigenvalues of Y's covariance are u·f_T(u)², u = λ/tr(S)
# ---------------------------------------------------------------------------------------------------

WHITEN_SHAPES = [
    pytest.param(3, 8, 50, 0.0, id="G3-r8-n50"),
    pytest.param(2, 17, 40, 2.0, id="G2-r17-n40-spread1e2"),
    pytest.param(1, 2, 3, 0.0, id="G1-r2-n3"),
    pytest.param(2, 20, 7, 1.0, id="G2-r20-n7-rankdef"),
    pytest.param(1, 64, 65, 3.0, id="G1-r64-n65-spread1e3"),
]


@pytest.mark.parametrize("T", range(1, 7), ids=lambda T: f"T{T}")
@pytest.mark.parametrize("G,r,n,decades", WHITEN_SHAPES)
def test_theorem1_whiten_ref_spectrum(G, r, n, decades, T):
    Z = spectrum_z(G, r, n, decades, seed=100 * r + n)
    Y = whiten_ref(Z, T)
    Zc = Z - Z.mean(-1, keepdim=True)
    lam = eigvals_desc(Zc @ Zc.mT / (n - 1))
    u = lam / lam.sum(-1, keepdim=True)
    expected = u * newton_f(u, T) ** 2
    actual = eigvals_desc(Y @ Y.mT / (n - 1))
    assert_close(actual, expected, rtol=1e-10, what="eigenvalues of cov(Y) vs u f_T(u)^2")


@pytest.mark.parametrize("T", [1, 4, 6], ids=lambda T: f"T{T}")
def test_theorem1_whiten_ref_spectrum_with_eps(T):
    # With a ridge, S = C + eps·I with C = Zc Zcᵀ/divisor, so cov(Y) = W C W has eigenvalues
    # (λ_S − eps)/τ · f_T(λ_S/τ)².
    G, r, n, eps = 2, 12, 30, 0.05
    Z = spectrum_z(G, r, n, 2.0, seed=7)
    Y = whiten_ref(Z, T, eps=eps, divisor=n)
    Zc = Z - Z.mean(-1, keepdim=True)
    lam = eigvals_desc(Zc @ Zc.mT / n + eps * torch.eye(r, dtype=F64))
    u = lam / lam.sum(-1, keepdim=True)
    expected = (lam - eps) / lam.sum(-1, keepdim=True) * newton_f(u, T) ** 2
    assert_close(eigvals_desc(Y @ Y.mT / n), expected, rtol=1e-10, what="eigenvalues with eps")


ITER_NORM_SHAPES = [
    pytest.param((16, 64), 0.0, id="N16-D64"),
    pytest.param((32, 10), 0.0, id="N32-D10-rankdef"),
    pytest.param((24, 100), 2.5, id="N24-D100-spread"),
    pytest.param((2, 8, 32), 1.0, id="B2-N8-D32"),
]


@pytest.mark.parametrize("T", range(1, 7), ids=lambda T: f"T{T}")
@pytest.mark.parametrize("shape,decades", ITER_NORM_SHAPES)
def test_theorem1_iter_norm_ref_spectrum(shape, decades, T):
    *B, N, D = shape
    x = spectrum_z(B[0] if B else 1, N, D, decades, seed=N * D)
    x = x.reshape(shape)
    y = iter_norm_ref(x, T)
    x3, y3 = x.reshape(-1, N, D), y.reshape(-1, N, D)
    xc = x3 - x3.mean(-1, keepdim=True)  # each sample centred over its features
    lam = eigvals_desc(xc @ xc.mT / (D - 1))
    u = lam / lam.sum(-1, keepdim=True)
    expected = u * newton_f(u, T) ** 2
    assert_close(eigvals_desc(y3 @ y3.mT / (D - 1)), expected, rtol=1e-10, what="eigenvalues of cov(t)")


# ---------------------------------------------------------------------------------------------------
# INTL Propositions 1–2, in exact rational arithmetic (float64 cannot resolve h_{T+1} > h_T near u = 1,
# where f_T has converged to 1/√u to all 53 bits)
# ---------------------------------------------------------------------------------------------------

PROP_GRID = [Fraction(i, 1024) for i in range(1, 1024)] + [Fraction(1, 2**k) for k in range(11, 41, 3)]
PROP_GRID.sort()


def exact_h(T: int) -> list[Fraction]:
    out = []
    for u in PROP_GRID:
        f = Fraction(1)
        for _ in range(T):
            f = Fraction(3, 2) * f - Fraction(1, 2) * u * f**3
        out.append(u * f * f)
    return out


EXACT_H = {T: exact_h(T) for T in range(0, 7)}


@pytest.mark.parametrize("T", range(1, 7), ids=lambda T: f"T{T}")
def test_proposition1_range_and_monotone_in_u(T):
    h = EXACT_H[T]
    bad = [(float(u), float(v)) for u, v in zip(PROP_GRID, h, strict=True) if not 0 < v < 1]
    assert not bad, f"h_{T}(u) outside (0, 1) at {len(bad)} grid points, first (u, h) = {bad[0]}"
    drops = [float(PROP_GRID[i]) for i in range(len(h) - 1) if not h[i] < h[i + 1]]
    assert not drops, f"h_{T} not increasing in u at {len(drops)} points, first at u = {drops[0]}"
    f = Fraction(1)
    for _ in range(T):
        f = Fraction(3, 2) * f - Fraction(1, 2) * f**3
    assert f == 1, f"h_{T}(1) should be exactly 1 (the paper's boundary case), got {f}"


@pytest.mark.parametrize("T", range(1, 7), ids=lambda T: f"T{T}")
def test_proposition2_increasing_in_T(T):
    lo, hi = EXACT_H[T - 1], EXACT_H[T]
    bad = [float(u) for u, a, b in zip(PROP_GRID, lo, hi, strict=True) if not a < b]
    assert not bad, f"h_{T}(u) <= h_{T - 1}(u) at {len(bad)} grid points, first at u = {bad[0]}"


# ---------------------------------------------------------------------------------------------------
# The references against the docs/design.md §2 formulas, in both modes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 4, 6], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("shape", [(16, 64), (32, 10), (3, 5, 40)], ids=lambda s: "x".join(map(str, s)))
def test_iter_norm_ref_is_channel_mode_whiten(shape, T):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=F64) + 2.0
    D = shape[-1]
    x3 = x.reshape(-1, *shape[-2:])
    expected = torch.stack([whiten_ref(xb[None], T, eps=0.0, divisor=D - 1)[0] for xb in x3]).reshape(shape)
    assert_close(iter_norm_ref(x, T), expected, rtol=1e-12, what="iter_norm_ref vs whiten_ref(channel mode)")


def test_whiten_ref_default_divisor_is_n_minus_1():
    z = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert_close(whiten_ref(z, 4), whiten_ref(z, 4, divisor=8), rtol=1e-15, what="default divisor")


LAYER_SHAPES = [
    pytest.param(2, (64, 12), id="dim2-N64-C12"),
    pytest.param(3, (4, 12, 9), id="dim3-N4-C12-L9"),
    pytest.param(4, (4, 12, 3, 5), id="dim4-N4-C12-H3-W5"),
]


def layer_input(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    scale = torch.logspace(0, 1, C, dtype=F64).reshape(1, C, *[1] * (len(shape) - 2))
    shift = torch.arange(C, dtype=F64).reshape(1, C, *[1] * (len(shape) - 2))
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift


@pytest.mark.parametrize("dim,shape", LAYER_SHAPES)
def test_iter_norm_layer_training_is_group_mode_whiten(dim, shape):
    m = IterNormRef(12, num_channels=4, dim=dim, affine=False).double()
    assert (m.num_groups, m.num_channels) == (3, 4)
    X = layer_input(shape)
    Y = m(X)
    divisor = X.numel() // X.shape[1]  # N·H·W
    expected = ungroup(whiten_ref(group_view(X, 3), 5, eps=1e-5, divisor=divisor), X.shape)
    assert_close(Y, expected, rtol=1e-12, what="IterNormRef (train) vs whiten_ref(group mode)")
    # and the whitening matrix by eigendecomposition (Theorem 1), independently of any Newton loop
    mu, W = whitening_matrix_eigh(group_view(X, 3), 5, 1e-5, divisor)
    expected_eigh = ungroup(W @ (group_view(X, 3) - mu), X.shape)
    assert_close(Y, expected_eigh, rtol=1e-10, what="IterNormRef (train) vs eigh whitening")


@pytest.mark.parametrize("dim,shape", LAYER_SHAPES)
def test_iter_norm_layer_running_stats_and_eval(dim, shape):
    m = IterNormRef(12, num_channels=4, dim=dim).double()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, 12, dtype=F64).reshape(m.weight.shape))
        m.bias.copy_(torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(m.bias.shape))
    X1, X2 = layer_input(shape, seed=1), layer_input(shape, seed=2) * 0.5 - 1.0
    divisor = X1.numel() // X1.shape[1]
    m(X1)
    m(X2)
    mu1, W1 = whitening_matrix_eigh(group_view(X1, 3), 5, 1e-5, divisor)
    mu2, W2 = whitening_matrix_eigh(group_view(X2, 3), 5, 1e-5, divisor)
    rm = 0.1 * mu2 + 0.9 * (0.1 * mu1 + 0.9 * torch.zeros_like(mu1))
    rw = 0.1 * W2 + 0.9 * (0.1 * W1 + 0.9 * torch.eye(4, dtype=F64).expand(3, 4, 4))
    assert_close(m.running_mean, rm, rtol=1e-10, what="running_mean after two steps")
    assert_close(m.running_wm, rw, rtol=1e-10, what="running_wm after two steps")

    m.eval()
    before = (m.running_mean.clone(), m.running_wm.clone())
    X3 = layer_input(shape, seed=3)
    Y = m(X3)
    X_hat = ungroup(m.running_wm @ (group_view(X3, 3) - m.running_mean), X3.shape)
    assert_close(Y, X_hat * m.weight + m.bias, rtol=1e-14, what="eval output")
    assert torch.equal(m.running_mean, before[0]), "eval changed running_mean"
    assert torch.equal(m.running_wm, before[1]), "eval changed running_wm"


def test_iter_norm_layer_affine():
    X = layer_input((4, 12, 3, 5))
    plain = IterNormRef(12, num_channels=4, affine=False).double()
    m = IterNormRef(12, num_channels=4).double()
    assert torch.equal(m.weight, torch.ones(1, 12, 1, 1, dtype=F64))
    assert torch.equal(m.bias, torch.zeros(1, 12, 1, 1, dtype=F64))
    w = torch.linspace(-2.0, 3.0, 12, dtype=F64).reshape(1, 12, 1, 1)
    b = torch.linspace(1.0, -1.0, 12, dtype=F64).reshape(1, 12, 1, 1)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    assert_close(m(X), plain(X) * w + b, rtol=1e-14, what="affine output")


@pytest.mark.parametrize(
    "num_features,num_groups,num_channels,expected",
    [
        # the authors' rule: c = num_channels if given (num_groups ignored), else ceil(C / num_groups);
        # c halved until it divides C; their default is num_groups=1, one group of all channels
        pytest.param(96, 1, None, (1, 96), id="C96-default-one-group"),
        pytest.param(96, 1, 64, (3, 32), id="C96-c64-to-3x32"),
        pytest.param(96, 4, None, (4, 24), id="C96-g4-to-4x24"),
        pytest.param(96, 4, 32, (3, 32), id="C96-g4-c32-num-channels-wins"),
        pytest.param(64, 1, 64, (1, 64), id="C64-c64-to-1x64"),
        pytest.param(32, 1, 64, (1, 32), id="C32-c64-to-1x32"),
        pytest.param(48, 1, 64, (3, 16), id="C48-c64-to-3x16"),
        pytest.param(10, 1, 64, (5, 2), id="C10-c64-to-5x2"),
        pytest.param(96, 5, None, (48, 2), id="C96-g5-c20-halved-to-48x2"),
        pytest.param(64, 1, 48, (64, 1), id="C64-c48-halved-to-64x1"),
    ],
)
def test_iter_norm_layer_group_sizing(num_features, num_groups, num_channels, expected):
    m = IterNormRef(num_features, num_groups=num_groups, num_channels=num_channels)
    g, c = expected
    assert (m.num_groups, m.num_channels) == expected
    assert m.running_mean.shape == (g, c, 1) and torch.equal(m.running_mean, torch.zeros(g, c, 1))
    assert torch.equal(m.running_wm, torch.eye(c).expand(g, c, c))
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_wm"]
    assert m.weight.shape == (1, num_features, 1, 1)
    assert "num_channels=" in repr(m)


@pytest.mark.parametrize("dim", [2, 3, 4], ids=lambda d: f"dim{d}")
def test_iter_norm_layer_param_shapes(dim):
    m = IterNormRef(8, num_channels=4, dim=dim)
    assert m.weight.shape == m.bias.shape == (1, 8, *[1] * (dim - 2))
    assert IterNormRef(8, affine=False).weight is None


def test_gradcheck_iter_norm_ref():
    x = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: iter_norm_ref(t, 3), (x,))


def test_gradcheck_whiten_ref_with_eps():
    z = torch.randn(2, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: whiten_ref(t, 4, eps=0.1, divisor=5), (z,))


def test_gradcheck_iter_norm_layer():
    m = IterNormRef(4, num_channels=2, T=3).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64).reshape(1, 4, 1, 1))
    x = torch.randn(2, 4, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


# ---------------------------------------------------------------------------------------------------
# upcast=True: float32 in and out, closer to the float64 result
# ---------------------------------------------------------------------------------------------------


def _loss_pair(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 32, generator=g, dtype=F64)
    return a, a + 1e-2 * torch.randn(16, 32, generator=g, dtype=F64)


# (function of (upcast, *inputs), float32 inputs): inputs chosen so the float32 computation visibly loses
# digits (offsets, spread spectra, cancellation in 1 − cos and ‖y‖²/(D − 1) − 1).
UPCAST_CASES = [
    pytest.param(
        lambda up, x: iter_norm_ref(x, 4, upcast=up),
        lambda: (spectrum_z(1, 24, 40, 2.0, 1)[0].float() + 50,),
        id="iter_norm_ref",
    ),
    pytest.param(
        lambda up, z: whiten_ref(z, 5, eps=1e-5, upcast=up),
        lambda: (spectrum_z(2, 10, 30, 2.0, 2).float() * 1e3,),
        id="whiten_ref",
    ),
    pytest.param(
        lambda up, x: IterNormRef(12, num_channels=4, upcast=up)(x),
        lambda: (layer_input((4, 12, 3, 5)).float() * 10,),
        id="IterNormRef",
    ),
    pytest.param(
        lambda up, a, b: norm_mse_ref(a, b, upcast=up),
        lambda: tuple(t.float() for t in _loss_pair(3)),
        id="norm_mse_ref",
    ),
    pytest.param(
        lambda up, y: trace_loss_ref(y, upcast=up),
        lambda: (iter_norm_ref(spectrum_z(1, 16, 40, 0.0, 4)[0], 8).float(),),
        id="trace_loss_ref",
    ),
    pytest.param(
        lambda up, a, b: intl_loss_ref(a, b, upcast=up),
        lambda: tuple((t * 100 + 1e3).float() for t in _loss_pair(5)),
        id="intl_loss_ref",
    ),
]


@pytest.mark.parametrize("fn,make_inputs", UPCAST_CASES)
def test_upcast_float32(fn, make_inputs):
    inputs = make_inputs()
    exact = fn(False, *(t.double() for t in inputs))
    low = fn(False, *inputs)
    up = fn(True, *inputs)
    assert low.dtype == up.dtype == torch.float32
    err_low = (low.double() - exact).abs().max().item()
    err_up = (up.double() - exact).abs().max().item()
    assert err_up < err_low, f"upcast error {err_up:.3e} not below float32 error {err_low:.3e}"


# ---------------------------------------------------------------------------------------------------
# Losses on hand-checkable inputs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a,b,expected",
    [
        pytest.param(
            [[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]],
            [[2.0, 4.0, 6.0], [-0.5, 0.0, 2.0]],
            0.0,
            id="parallel-rows-0",
        ),
        pytest.param([[1.0, 0.0], [0.0, 3.0]], [[0.0, 5.0], [2.0, 0.0]], 2.0, id="orthogonal-rows-2"),
        pytest.param([[1.0, 1.0]], [[-3.0, -3.0]], 4.0, id="opposite-rows-4"),
        pytest.param([[1.0, 0.0], [0.0, 3.0]], [[2.0, 0.0], [1.0, 0.0]], 1.0, id="cos1-and-cos0-1"),
        pytest.param([[1.0, 0.0]], [[1.0, 1.0]], 2.0 - math.sqrt(2.0), id="45deg-2-sqrt2"),
    ],
)
def test_norm_mse_ref_hand_values(a, b, expected):
    out = norm_mse_ref(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64))
    assert abs(out.item() - expected) <= 1e-15, f"norm_mse {out.item()!r} != {expected!r}"


@pytest.mark.parametrize(
    "y,expected",
    [
        # D = 3, D − 1 = 2: ‖y_i‖²/2 = 3/2 and 2 → (1/2)² + 1² = 5/4
        pytest.param([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]], 1.25, id="d1.5-d2-1.25"),
        # rows with ‖y_i‖² = D − 1 = 3 → 0
        pytest.param([[1.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, math.sqrt(3.0)]], 0.0, id="unit-variance-0"),
        # zero rows: each contributes (0 − 1)² = 1
        pytest.param([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], 3.0, id="zero-rows-3"),
    ],
)
def test_trace_loss_ref_hand_values(y, expected):
    out = trace_loss_ref(torch.tensor(y, dtype=F64))
    assert abs(out.item() - expected) <= 1e-15, f"trace_loss {out.item()!r} != {expected!r}"


def sylvester_hadamard(k: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=F64)
    for _ in range(k):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def f_exact(u: Fraction, T: int) -> Fraction:
    f = Fraction(1)
    for _ in range(T):
        f = Fraction(3, 2) * f - Fraction(1, 2) * u * f**3
    return f


@pytest.mark.parametrize("T,trade_off", [(4, None), (2, 0.25)], ids=["T4-default-beta", "T2-beta0.25"])
def test_intl_loss_ref_hand_example(T, trade_off):
    # N = 16 samples, D = 32 features. The centred rows of z1 are rows 1..16 of a Hadamard matrix:
    # zero mean, mutually orthogonal, ‖·‖² = 32, so S = (32/31)·I, A = I/16 and every P_k = f_k(1/16)·I.
    # Then t1 = f_T(1/16)/√(16·32/31) · zc1 and ‖t1_i‖²/(D − 1) = f_T(1/16)²/16 = h_T(1/16) for every i:
    # trace_loss(t1) = 16·(h_T(1/16) − 1)².
    # zc2 = 3·Q·zc1 with Q orthogonal (2×2 rotations by 60°): again S ∝ I, so trace_loss(t2) is the same,
    # and cos(t1_i, t2_i) = ⟨zc1_i, (Q zc1)_i⟩/32 = Q_ii = cos 60° = 1/2, so norm_mse = 2 − 2·(1/2) = 1.
    # β = 0.01·(log2 16 − 3) = 0.01 by default.
    N = 16
    zc1 = sylvester_hadamard(5)[1 : N + 1]  # (16, 32)
    c, s = 0.5, math.sqrt(3.0) / 2
    Q = torch.block_diag(*[torch.tensor([[c, -s], [s, c]], dtype=F64)] * (N // 2))
    offsets = torch.arange(N, dtype=F64).reshape(N, 1)
    z1 = zc1 + 0.5 * offsets
    z2 = 3.0 * Q @ zc1 - 2.0 * offsets
    h = float(Fraction(1, N) * f_exact(Fraction(1, N), T) ** 2)
    beta = 0.01 if trade_off is None else trade_off
    expected = 1.0 + beta * 2 * N * (h - 1.0) ** 2
    out = intl_loss_ref(z1, z2, T, trade_off)
    assert abs(out.item() - expected) <= 1e-13, f"intl_loss {out.item()!r} != {expected!r}"
