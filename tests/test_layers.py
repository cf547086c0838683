"""IterNorm layer, convert_batchnorm and ChannelWhitening against the paper reference."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS, FP32_BACKENDS, assert_tolerance_rule, backend_device, describe_error
from torch import nn

import intl_kernels as ik
from python_ref import IterNormRef, iter_norm_ref

# (input shape, num_channels, dim): dims 2/3/4/5, odd groups (C = 12 in groups of 3), the default
# sizing (None: groups of 64 halved until they divide C; the reference's num_groups=1 gives the same
# one group at C = 8), one group, many groups.
CASES = {
    "dim4-C128-c64": ((6, 128, 5, 4), 64, 4),
    "dim4-C64-c32-HW256": ((3, 64, 16, 16), 32, 4),  # H·W >= 256: per-group batched GEMM in place
    "dim4-C24-c8": ((4, 24, 3, 3), 8, 4),
    "dim3-C12-c3-odd": ((5, 12, 7), 3, 3),
    "dim2-C32-c32": ((40, 32), 32, 2),
    "dim2-C8-default-one-group": ((9, 8), None, 2),
    "dim5-C8-c4": ((3, 8, 2, 3, 4), 4, 5),
}


def _layers(C, c, dim, backend, dtype, affine=True):
    """Ours on the backend's device in ``dtype``, and the reference in float64 and in float32,
    all three with the same non-trivial affine parameters."""
    torch.manual_seed(C + (c or 0) + dim)
    ours = ik.IterNorm(C, num_channels=c, dim=dim, affine=affine, backend=backend)
    if affine:
        with torch.no_grad():
            ours.weight.copy_(torch.rand_like(ours.weight) + 0.5)
            ours.bias.copy_(torch.randn_like(ours.bias))
    refs = []
    for ref_dtype in (torch.float64, torch.float32):
        ref = IterNormRef(C, num_channels=c, dim=dim, affine=affine)
        ref.load_state_dict(ours.state_dict())
        refs.append(ref.to(ref_dtype))
    return ours.to(backend_device(backend), dtype), *refs


def _step(layer, x, dy, params=False):
    """(y, dx) of one training step, and with params=True also the affine parameters' grads."""
    x = x.detach().requires_grad_()
    y = layer(x)
    inputs = [x] + ([layer.weight, layer.bias] if params else [])
    grads = torch.autograd.grad(y, inputs, dy)
    out = [y.detach().cpu()] + [g.cpu() for g in grads]
    return out if params else tuple(out)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("backend", FP32_BACKENDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_layer_matches_reference_over_steps(backend, case, affine):
    """Three training steps (outputs, input and affine-parameter gradients, running
    statistics), then eval. CPU backends in float64 against the float64 reference; triton
    in float32 under the tolerance rule (docs/design.md §4) against the float64 and float32 references."""
    shape, c, dim = case
    dtype = torch.float32 if backend == "triton" else torch.float64
    dev = backend_device(backend)
    ours, ref64, ref32 = _layers(shape[1], c, dim, backend, dtype, affine)
    assert (ours.num_groups, ours.num_channels) == (ref64.num_groups, ref64.num_channels)
    names = ["y", "dx", "dweight", "dbias"] if affine else ["y", "dx"]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        got = _step(ours, x.to(dev, dtype), dy.to(dev, dtype), params=affine)
        want64 = _step(ref64, x, dy, params=affine)
        want32 = _step(ref32, x.float(), dy.float(), params=affine)
        for name, a, b64, b32 in zip(names, got, want64, want32, strict=True):
            if dtype == torch.float64:
                torch.testing.assert_close(a, b64, rtol=1e-9, atol=1e-10, msg=f"step {step} {name}")
            else:
                assert_tolerance_rule(a, b32, b64.float(), 1e-5, f"step {step} {name}")
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        for name in ("running_mean", "running_wm"):
            a, b = getattr(ours, name).double().cpu(), getattr(ref64, name)
            err = (a - b).abs().max()
            assert err <= tol * b.abs().max().clamp_min(1), f"step {step} {name}: " + describe_error(a, b)
    ours.eval()
    ref64.eval()
    x = torch.randn(shape, dtype=torch.float64)
    y, y64 = ours(x.to(dev, dtype)).cpu().double(), ref64(x)
    assert (y - y64).abs().max() <= (1e-9 if dtype == torch.float64 else 1e-4), describe_error(y, y64)


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_channels_last_read_and_written_in_place(backend):
    dev = backend_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    x = torch.randn(3, 16, 4, 5, dtype=dtype, device=dev)
    dy = torch.randn_like(x)
    layer = ik.IterNorm(16, num_channels=8, backend=backend).to(dev, dtype)
    y, dx = _step(layer, x, dy)
    layer_cl = ik.IterNorm(16, num_channels=8, backend=backend).to(dev, dtype)
    cl = torch.channels_last
    y_cl, dx_cl = _step(layer_cl, x.to(memory_format=cl), dy.to(memory_format=cl))
    assert y_cl.is_contiguous(memory_format=cl) and dx_cl.is_contiguous(memory_format=cl)
    assert y.is_contiguous() and dx.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_cl, y, **tol)
    torch.testing.assert_close(dx_cl, dx, **tol)
    torch.testing.assert_close(layer_cl.running_wm, layer.running_wm, **tol)


def test_state_dict_round_trip_with_reference_layer():
    ref = IterNormRef(96, num_channels=32)
    ref.train()
    ref(torch.randn(4, 96, 3, 3))  # non-trivial running statistics
    ours = ik.IterNorm(96, num_channels=32)
    missing = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert set(ours.state_dict()) == {"weight", "bias", "running_mean", "running_wm"}
    ours.eval()
    ref.eval()
    x = torch.randn(2, 96, 3, 3)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    ref2 = IterNormRef(96, num_channels=32)
    ref2.load_state_dict(ours.state_dict(), strict=True)


def _sizes(layer):
    return layer.num_groups, layer.num_channels


def test_group_sizing_takes_the_arguments_exactly_or_names_them():
    # neither argument: groups of 64, halved until they divide C (the authors' rule at 64)
    assert _sizes(ik.IterNorm(64)) == (1, 64) and _sizes(ik.IterNorm(2048)) == (32, 64)
    assert _sizes(ik.IterNorm(48)) == (3, 16) == _sizes(IterNormRef(48, num_channels=64))
    # the authors' default, one group of all channels, is num_groups=1
    assert _sizes(ik.IterNorm(96, num_groups=1)) == (1, 96) == _sizes(IterNormRef(96))
    # what the arguments ask for exactly
    assert _sizes(ik.IterNorm(24, num_channels=8)) == (3, 8)
    assert _sizes(ik.IterNorm(30, num_groups=5)) == (5, 6)
    assert _sizes(ik.IterNorm(64, num_groups=2, num_channels=32)) == (2, 32)
    # what they cannot have is an error naming them, never a silent resize
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide num_features=64 .*\(1, 2, 4, 8"):
        ik.IterNorm(64, num_groups=3)  # the authors' rule: 32 groups of 2
    with pytest.raises(ValueError, match="num_channels=48 does not divide num_features=64"):
        ik.IterNorm(64, num_channels=48)  # the authors' rule: 64 groups of 1, no whitening
    with pytest.raises(
        ValueError, match="num_groups=4 and num_channels=32 give 128 channels, but num_features is 64"
    ):
        ik.IterNorm(64, num_groups=4, num_channels=32)
    with pytest.raises(ValueError, match="halve to 1 channel for num_features=3"):
        ik.IterNorm(3)


def test_group_sizing_is_the_reference_rule_wherever_it_is_taken():
    """Over a grid of arguments: the layer's sizes are the authors' rule (python_ref, literally)
    wherever the layer takes the arguments, and where it raises the rule would have changed them."""
    taken = refused = 0
    for C in range(1, 131):
        for g in (None, 1, 2, 3, 4, 5, 8):
            for c in (None, 1, 2, 3, 4, 8, 16, 32, 48, 64):
                if (g is not None and g > C) or (g is not None and c is not None and g * c != C and c > C):
                    continue
                ref = IterNormRef(C, num_groups=g or 1, num_channels=64 if g is c is None else c)
                try:
                    ours = _sizes(ik.IterNorm(C, num_groups=g, num_channels=c))
                except ValueError:
                    refused += 1
                    asked_g = g is not None and _sizes(ref)[0] != g
                    asked_c = c is not None and _sizes(ref)[1] != c
                    both = g is not None and c is not None and g * c != C
                    one_channel = g is c is None and _sizes(ref)[1] == 1 and C > 1
                    assert asked_g or asked_c or both or one_channel, (C, g, c, _sizes(ref))
                    continue
                taken += 1
                assert ours == _sizes(ref), (C, g, c)
    assert taken > 500 and refused > 500  # both branches exercised over the grid


@pytest.mark.parametrize(
    "setting, theirs, ours",
    [
        # the IterNorm authors' ImageNet setting: num_channels=64 (their ResNet stem, 64 channels)
        ("imagenet", lambda: IterNormRef(64, num_channels=64), lambda: ik.IterNorm(64, num_channels=64)),
        # their default: one group of all channels
        ("default", lambda: IterNormRef(256), lambda: ik.IterNorm(256, num_groups=1)),
    ],
)
def test_strict_load_of_the_authors_state_dicts(setting, theirs, ours):
    ref = theirs().train()
    ref(torch.randn(6, ref.num_features, 3, 3))  # non-trivial running statistics
    state = ref.state_dict()
    g, c = ref.num_groups, ref.num_channels
    layer = ours()
    result = layer.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert _sizes(layer) == (g, c)
    ref.eval(), layer.eval()
    x = torch.randn(2, ref.num_features, 3, 3)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    if setting == "default":  # this layer's own default groups differently: the shapes say so
        with pytest.raises(RuntimeError, match="size mismatch for running_wm"):
            ik.IterNorm(256).load_state_dict(state, strict=True)


def test_eval_mode_uses_running_statistics_only():
    layer = ik.IterNorm(8, num_channels=4, dim=2)
    layer.train()
    for _ in range(5):
        layer(torch.randn(32, 8) * 3 + 1)
    layer.eval()
    x = torch.randn(7, 8)
    y1 = layer(x)
    y2 = layer(torch.cat([x, torch.randn(5, 8) * 100]))[:7]  # other samples change nothing
    torch.testing.assert_close(y1, y2)
    rm = layer.running_mean.clone()
    layer(x)
    assert torch.equal(rm, layer.running_mean)


def test_momentum_update_formula():
    layer = ik.IterNorm(4, num_channels=4, dim=2, momentum=0.25, affine=False)
    x = torch.randn(50, 4, dtype=torch.float64)
    layer.double()(x)
    mu = x.mean(0).view(1, 4, 1)
    torch.testing.assert_close(layer.running_mean, 0.25 * mu, rtol=1e-12, atol=1e-14)
    ref = IterNormRef(4, num_channels=4, dim=2, momentum=0.25, affine=False).double()
    ref(x)
    torch.testing.assert_close(layer.running_wm, ref.running_wm, rtol=1e-12, atol=1e-14)
    # the batch's whitening matrix W = P_T/√tr Σ whitens the batch: W Σ W ≈ I (T = 5)
    xc = (x - x.mean(0)).T
    sigma = xc @ xc.T / 50 + 1e-5 * torch.eye(4, dtype=torch.float64)
    W = (layer.running_wm[0] - 0.75 * torch.eye(4, dtype=torch.float64)) / 0.25
    assert (W @ sigma @ W - torch.eye(4, dtype=torch.float64)).abs().max() < 0.1


BAD = [
    (
        "channels",
        lambda: ik.IterNorm(16)(torch.randn(2, 8, 3, 3)),
        ValueError,
        "input has 8 channels but num_features is 16",
    ),
    (
        "ndim",
        lambda: ik.IterNorm(16)(torch.randn(2, 16)),
        ValueError,
        r"input must be 4-D \(N, C, H, W\) \(dim=4\)",
    ),
    ("dim-arg", lambda: ik.IterNorm(16, dim=6), ValueError, "dim must be 2, 3, 4 or 5"),
    ("groups", lambda: ik.IterNorm(4, num_groups=8), ValueError, "num_groups must be <= num_features"),
    ("num_features", lambda: ik.IterNorm(0), ValueError, "num_features must be >= 1"),
    ("momentum", lambda: ik.IterNorm(4, momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
    ("eps", lambda: ik.IterNorm(4, eps=-1.0), ValueError, "eps must be finite and >= 0.0"),
    (
        "int-input",
        lambda: ik.IterNorm(4, dim=2)(torch.ones(3, 4, dtype=torch.long)),
        TypeError,
        "floating dtype",
    ),
    ("n<2", lambda: ik.IterNorm(4, dim=2)(torch.randn(1, 4)), ValueError, "more than 1 value per channel"),
    ("backend", lambda: ik.IterNorm(4, backend="gpu"), ValueError, "backend must be 'auto' or one of"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, make, exc, msg = case
    with pytest.raises(exc, match=msg):
        make()


def test_one_sample_per_column_is_fine_in_eval():
    layer = ik.IterNorm(4, dim=2).eval()
    assert layer(torch.randn(1, 4)).shape == (1, 4)


def test_extra_repr():
    text = repr(ik.IterNorm(128, num_channels=64, T=3))
    for part in ("128", "num_groups=2", "num_channels=64", "T=3", "eps=1e-05", "momentum=0.1", "affine=True"):
        assert part in text, text


def test_convert_batchnorm_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    weights = [bn.weight.detach().clone() for bn in bns]
    out = ik.convert_batchnorm(model, num_channels=32, T=4)
    assert out is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, ik.IterNorm)]
    assert len(layers) == len(bns) == 20
    for layer, w in zip(layers, weights, strict=True):
        assert layer.num_channels == 32 and layer.T == 4
        torch.testing.assert_close(layer.weight.view(-1), w)
    x = torch.randn(4, 3, 32, 32)
    loss = model(x).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_convert_batchnorm1d_takes_2d_and_3d():
    mlp = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU())
    ik.convert_batchnorm(mlp, num_channels=8)
    layer = mlp[1]
    assert isinstance(layer, ik.IterNorm) and layer.momentum == 0.1
    assert mlp(torch.randn(10, 6)).shape == (10, 16)
    assert layer(torch.randn(4, 16, 5)).shape == (4, 16, 5)
    assert isinstance(ik.convert_batchnorm(nn.BatchNorm2d(4)), ik.IterNorm)


def test_convert_batchnorm_3d_sync_and_lazy(capsys, caplog):
    model = nn.Sequential(
        nn.Conv3d(2, 16, 1), nn.BatchNorm3d(16), nn.Identity(),
        nn.SyncBatchNorm(16), nn.LazyBatchNorm1d(),
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"convert_batchnorm: 4 is a lazy LazyBatchNorm1d .* one forward pass"
    ):
        ik.convert_batchnorm(model)
    model[4] = nn.Identity()
    with caplog.at_level("INFO", logger="intl_kernels"):
        ik.convert_batchnorm(model, verbose=True)
    assert type(model[1]) is ik.IterNorm and model[1].dim == 5
    assert type(model[3]) is ik.SyncIterNorm  # one process: an IterNorm
    printed = capsys.readouterr().out
    assert "1: BatchNorm3d(16) -> IterNorm 1 groups of 16" in printed, printed
    assert "3: SyncBatchNorm(16) -> SyncIterNorm 1 groups of 16" in printed
    assert "2 BatchNorm layers converted" in printed and "2 BatchNorm layers converted" in caplog.text
    x = torch.randn(3, 2, 4, 5, 6, requires_grad=True)
    y = model(x)
    assert y.shape == (3, 16, 4, 5, 6)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    h = torch.randn(3, 16, 4, 5, 6)
    for fmt in (torch.contiguous_format, torch.channels_last_3d):  # the input's layout is kept
        hi = h.to(memory_format=fmt).requires_grad_()
        out = model[1](hi)
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, model[1](h))
        (g,) = torch.autograd.grad(out, hi, torch.ones_like(out))
        assert g.is_contiguous(memory_format=fmt)


def test_convert_batchnorm_names_a_layer_it_cannot_size():
    model = nn.Sequential(nn.Conv2d(3, 48, 1), nn.BatchNorm2d(48))
    with pytest.raises(
        ValueError, match=r"convert_batchnorm: 1 \(BatchNorm2d\(48\)\): IterNorm: num_channels=32"
    ):
        ik.convert_batchnorm(model, num_channels=32)
    assert _sizes(ik.convert_batchnorm(model)[1]) == (3, 16)  # the default: 64 halved to 16


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_model_with_iternorm_layers(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), ik.IterNorm(16, num_channels=8, backend=backend), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), ik.IterNorm(16, num_channels=16, backend=backend),
    )  # fmt: skip
    eager = [m for m in model.modules()]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 6)
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # eager on a copy of the state before the compiled step
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), ik.IterNorm(16, num_channels=8, backend=backend), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), ik.IterNorm(16, num_channels=16, backend=backend),
    )  # fmt: skip
    y_ref = ref(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), list(ref.parameters()))
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    for k, v in ref.state_dict().items():  # running statistics updated by the compiled step too
        torch.testing.assert_close(state[k], v)
    assert len(eager) == len(list(ref.modules()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_layer_keeps_fp32_statistics(dtype):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ik.IterNorm(8, num_channels=4))
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    layer = model[1]
    assert layer.running_wm.dtype == torch.float32 and torch.isfinite(layer.running_wm).all()
    y.float().sum().backward()
    assert torch.isfinite(model[0].weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_channel_whitening(dtype):
    proj = nn.Linear(16, 64)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=dtype):
        z = proj(x)
        y = ik.ChannelWhitening()(z)
    assert z.dtype == dtype and y.dtype == dtype
    y32 = ik.iter_norm(z.float())
    assert (y.float() - y32).abs().max() < 4 * torch.finfo(dtype).eps * y32.abs().max()


def test_fp16_embedding_whose_gram_overflows_stays_finite():
    """|x| ~ 300, D = 1024: the fp16 Gram matrix would reach ~1e8 > 65504."""
    x = (torch.randn(16, 1024) * 300).half().requires_grad_()
    y = ik.iter_norm(x)
    (dx,) = torch.autograd.grad(y.float().square().sum(), x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and torch.isfinite(dx).all()
    with pytest.raises(AssertionError):  # the paper's fp16 formulation overflows here
        assert torch.isfinite(iter_norm_ref(x.detach())).all()


def test_channel_whitening_module():
    x = torch.randn(3, 20, 30, requires_grad=True)
    m = ik.ChannelWhitening(T=5, backend="torch")
    torch.testing.assert_close(m(x), ik.iter_norm(x, 5, backend="torch"))
    assert "T=5" in repr(m) and "gather_distributed=True" in repr(m)
    with pytest.raises(ValueError, match="ChannelWhitening: T must be >= 1"):
        ik.ChannelWhitening(T=0)
