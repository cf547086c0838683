"""fold_iternorm: IterNorm layers folded into the Conv/Linear before them, for inference.

Tolerance of the float32 comparisons: the project's tolerance rule (intl_kernels.testing), with
the unfolded model upcast to float64 as the reference. The folded float32 model must be at most
twice as far from it as the unfolded float32 model is, plus atol = 4 float32 ulps of the largest
output: folding changes the rounding (one product K'·x instead of K·x then W·(x − μ)), not the
function, so its error must stay of the size the unfolded model's float32 rounding already has.
The fold itself is checked in float64 (the same model upcast, folded, against the unfolded
float64 model), where the only difference left is float64 rounding: relative error <= 1e-10.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import intl_kernels as ik
from intl_kernels.testing import assert_tolerance_rule

F32_ULP = 2.0**-23


def randomize_affine(model: nn.Module) -> None:
    """IterNorm weight in [0.5, 1.5], bias N(0, 0.1²), so that the affine part of the fold matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ik.IterNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def update_running_stats(model: nn.Module, shape, passes: int = 3) -> None:
    """Train-mode forward passes (no gradients) on random data: non-trivial running statistics."""
    dtype = next(model.parameters()).dtype
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(shape, dtype=dtype))
    model.eval()


def iternorm_paths(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, ik.IterNorm)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def check_fold(model: nn.Module, x: torch.Tensor, folded: set[str], **kwargs) -> nn.Module:
    """Fold a copy of eval-mode ``model``; check that exactly the IterNorm layers ``folded`` went
    (replaced by Identity, the layer before them changed) and that outputs match (module docstring).
    Returns the folded copy."""
    model.eval()
    before = iternorm_paths(model)
    assert folded <= before
    ref64 = copy.deepcopy(model).double()
    target = copy.deepcopy(model)
    params_before = {name: p.detach().clone() for name, p in target.named_parameters()}
    param_objects = dict(target.named_parameters())
    out = ik.fold_iternorm(target, **kwargs)
    assert out is target and type(out) is type(model)
    assert iternorm_paths(out) == before - folded
    for path in folded:
        assert type(out.get_submodule(path)) is nn.Identity, path
    after = dict(out.named_parameters())
    for name, p in param_objects.items():  # parameters updated in place: the same objects
        if name in after:
            assert after[name] is p, name
        else:  # gone with a folded IterNorm, unedited
            assert name.rpartition(".")[0] in folded, name
    changed = {n for n, p in after.items() if n not in params_before or not torch.equal(p, params_before[n])}
    layers_changed = {n.rpartition(".")[0] for n in changed}
    assert len(layers_changed) == len(folded), (sorted(layers_changed), sorted(folded))
    for layer in layers_changed:  # the weight itself changed, not only a bias
        assert not torch.equal(after[layer + ".weight"], params_before[layer + ".weight"]), layer

    with torch.no_grad():
        y64 = ref64(x.double())
        y32 = model(x)
        yf = out(x)
        kwargs64 = dict(kwargs)
        if kwargs.get("example_inputs") is not None:
            kwargs64["example_inputs"] = [t.double() for t in kwargs["example_inputs"]]
        yf64 = ik.fold_iternorm(copy.deepcopy(ref64), **kwargs64)(x.double())
    assert yf.dtype == y32.dtype and yf.shape == y32.shape
    atol = 4 * F32_ULP * y64.abs().max().item()
    assert_tolerance_rule(yf, y32, y64.float(), atol, "folded float32 output")
    assert relative_error(yf64, y64) <= 1e-10
    return out


# ---------------------------------------------------------------------------- torchvision ResNets


@pytest.mark.slow
def test_fold_resnet18_after_sgd_steps():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = ik.convert_batchnorm(torchvision.models.resnet18(num_classes=10))
    randomize_affine(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(3):
        loss = model(torch.randn(2, 3, 64, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    layers = iternorm_paths(model)
    assert len(layers) == 20
    rm = model.bn1.running_mean
    assert rm.abs().max() > 1e-3  # the statistics moved away from their initial (0, I)
    out = check_fold(model, torch.randn(2, 3, 64, 64), layers)
    assert out.conv1.bias is not None and out.layer2[0].downsample[0].bias is not None
    assert type(out.layer2[0].downsample[1]) is nn.Identity


@pytest.mark.slow
def test_fold_resnet50_after_training_passes():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    model = ik.convert_batchnorm(torchvision.models.resnet50(num_classes=10))
    randomize_affine(model)
    # a train-mode forward pass updates the running statistics as an SGD step would (the conv
    # weights are random already); momentum 0.5 moves them half way to the batch's in one pass.
    # SGD steps of ResNet-50 (about 10 s each on 2 busy cores) would exceed this test's budget
    for m in model.modules():
        if isinstance(m, ik.IterNorm):
            m.momentum = 0.5
    update_running_stats(model, (2, 3, 64, 64), passes=1)
    layers = iternorm_paths(model)
    assert len(layers) == 53
    check_fold(model, torch.randn(2, 3, 64, 64), layers)


# ---------------------------------------------------------------------------- small models


GROUP_CASES = [  # (num_features, num_channels, num_groups) → c: even, odd (3, 5), default, from num_groups
    (12, 4, None),
    (15, 5, None),
    (9, 3, None),
    (10, None, None),  # the default: 64 halved until it divides 10 → c = 2
    (12, None, 3),  # c = 12 / 3 = 4
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("C", "num_channels", "num_groups"), GROUP_CASES)
def test_fold_linear_dim2(C, num_channels, num_groups, affine, bias):
    torch.manual_seed(C + 2 * affine + bias)
    norm = ik.IterNorm(C, num_groups=num_groups, num_channels=num_channels, dim=2, affine=affine)
    model = nn.Sequential(nn.Linear(7, C, bias=bias), norm, nn.ReLU(), nn.Linear(C, 3))
    randomize_affine(model)
    update_running_stats(model, (32, 7))
    out = check_fold(model, torch.randn(16, 7), {"1"})
    assert out[0].bias is not None


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("C", "num_channels", "num_groups"), GROUP_CASES)
def test_fold_conv2d_dim4(C, num_channels, num_groups, affine, bias):
    torch.manual_seed(C + 2 * affine + bias)
    norm = ik.IterNorm(C, num_groups=num_groups, num_channels=num_channels, dim=4, affine=affine)
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=bias), norm, nn.ReLU(), nn.Conv2d(C, 4, 1))
    randomize_affine(model)
    update_running_stats(model, (4, 3, 6, 6))
    check_fold(model, torch.randn(2, 3, 5, 7), {"1"})


def test_fold_channels_last_conv():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ik.IterNorm(8, num_channels=4))
    randomize_affine(model)
    update_running_stats(model, (4, 3, 6, 6))
    model = model.to(memory_format=torch.channels_last)
    out = check_fold(model, torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last), {"1"})
    assert out[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_fold_conv1d_and_converted_batchnorm1d():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv1d(3, 10, 3), ik.IterNorm(10, num_channels=5, dim=3), nn.ReLU(),
        nn.Flatten(), nn.Linear(40, 6), nn.BatchNorm1d(6), nn.ReLU(),
    )  # fmt: skip
    ik.convert_batchnorm(model, num_channels=3)
    randomize_affine(model)
    update_running_stats(model, (8, 3, 6))
    check_fold(model, torch.randn(4, 3, 6), {"1", "5"})


# ---------------------------------------------------------------------------- grouped convolutions


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups", "num_channels", "folds"),
    [
        (4, 12, 2, 3, True),  # 6 output channels per conv group, IterNorm groups of 3 nest
        (4, 12, 2, 6, True),  # one IterNorm group per conv group
        (4, 12, 2, 4, False),  # channels 4..7 straddle the conv groups' boundary at 6
        (4, 12, 2, 12, False),  # one IterNorm group spanning both conv groups
        (8, 8, 8, 4, False),  # depthwise, IterNorm groups of 4 channels
        (8, 8, 8, 1, True),  # depthwise, IterNorm groups of 1 channel (per-channel affine)
        (4, 8, 4, 2, True),  # depthwise with channel multiplier 2, groups of 2
    ],
)
def test_grouped_and_depthwise_conv(in_channels, out_channels, groups, num_channels, folds):
    torch.manual_seed(5)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups)
    model = nn.Sequential(conv, ik.IterNorm(out_channels, num_channels=num_channels))
    randomize_affine(model)
    update_running_stats(model, (4, in_channels, 5, 5))
    assert model[1].num_channels == num_channels
    if folds:
        out = check_fold(model, torch.randn(2, in_channels, 5, 5), {"1"})
        assert out[0].groups == groups
        return
    weight = conv.weight.detach().clone()
    x = torch.randn(2, in_channels, 5, 5)
    with torch.no_grad():
        y = model(x)
    assert ik.fold_iternorm(model) is model
    assert isinstance(model[1], ik.IterNorm)
    assert torch.equal(conv.weight, weight)
    with torch.no_grad():
        assert torch.equal(model(x), y)


# ---------------------------------------------------------------------------- what is not folded


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ik.IterNorm(8, num_channels=4))
    weight = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"training mode.*model\.eval\(\)"):
        ik.fold_iternorm(model)  # a new module is in training mode
    model.eval()
    model[1].train()
    with pytest.raises(RuntimeError, match=r"IterNorm layer '1' is in training mode.*model\.eval\(\)"):
        ik.fold_iternorm(model)
    assert isinstance(model[1], ik.IterNorm) and torch.equal(model[0].weight, weight)
    model.eval()
    ik.fold_iternorm(model)
    assert isinstance(model[1], nn.Identity)


class Mixed(nn.Module):
    """One foldable pair (conv_a → norm_a) among IterNorm layers that must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_in = ik.IterNorm(3, num_channels=3)  # follows the input
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.norm_a = ik.IterNorm(8, num_channels=4)  # foldable
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.norm_b = ik.IterNorm(8, num_channels=4)  # conv_b's output also feeds the residual
        self.conv_c = nn.Conv2d(8, 8, 1)
        self.norm_c = ik.IterNorm(8, num_channels=2)  # follows a ReLU
        self.shared = nn.Conv2d(8, 8, 1)
        self.norm_s = ik.IterNorm(8, num_channels=8)  # its conv is called twice
        self.conv_h = nn.Conv2d(8, 8, 1)
        self.norm_h = ik.IterNorm(8, num_channels=4)  # its conv has a forward hook
        self.conv_h.register_forward_hook(lambda m, a, y: y * 2)
        self.conv_p = nn.Conv2d(8, 8, 1)
        self.norm_p = ik.IterNorm(8, num_channels=4)  # its conv's weight is read by forward itself
        self.norm_t = ik.IterNorm(8, num_channels=4)  # called twice

    def forward(self, x):
        x = self.norm_a(self.conv_a(self.norm_in(x)))
        b = self.conv_b(x)
        x = self.norm_b(b) + b
        x = self.norm_c(torch.relu(self.conv_c(x)))
        x = self.norm_s(self.shared(x)) + self.shared(x)
        x = self.norm_h(self.conv_h(x))
        x = self.norm_p(self.conv_p(x)) + self.conv_p.weight.sum()
        return self.norm_t(self.norm_t(x))


def test_iternorm_that_follows_no_single_use_conv_is_kept():
    torch.manual_seed(6)
    model = Mixed()
    randomize_affine(model)
    update_running_stats(model, (4, 3, 6, 6))
    out = check_fold(model, torch.randn(2, 3, 6, 6), {"norm_a"})
    assert isinstance(out.norm_in, ik.IterNorm) and isinstance(out.norm_t, ik.IterNorm)


def test_linear_on_3d_input_is_kept_with_example_inputs():
    # Linear on (N, 8, 5) → (N, 8, 8); the converted BatchNorm1d whitens over axis 1 (the 8
    # positions), not over the Linear's output features: folding would be wrong
    torch.manual_seed(7)
    model = ik.convert_batchnorm(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8)), num_channels=4)
    update_running_stats(model, (6, 8, 5))
    x = torch.randn(3, 8, 5)
    with torch.no_grad():
        y = model(x)
    weight = model[0].weight.detach().clone()
    ik.fold_iternorm(model, example_inputs=(x,))
    assert isinstance(model[1], ik.IterNorm) and torch.equal(model[0].weight, weight)
    with torch.no_grad():
        assert torch.equal(model(x), y)
    # with 2-D example inputs (the Linear's output features are IterNorm's channels) it folds
    model2d = ik.convert_batchnorm(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8)), num_channels=4)
    update_running_stats(model2d, (16, 5))
    check_fold(model2d, torch.randn(4, 5), {"1"}, example_inputs=(torch.randn(4, 5),))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace forward, its children trace."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 6, 3), ik.IterNorm(6, num_channels=3), nn.ReLU())
        self.head = nn.Linear(6, 4)
        self.norm = ik.IterNorm(4, num_channels=2, dim=2)

    def forward(self, x):
        y = self.block(x).mean((2, 3))
        if y.sum() > 0:
            y = -y
        return self.norm(self.head(y))


def test_untraceable_model_folds_inside_children_or_raises():
    torch.manual_seed(8)
    model = Untraceable()
    randomize_affine(model)
    update_running_stats(model, (8, 3, 6, 6))
    with pytest.raises(RuntimeError, match="cannot trace the model"):
        ik.fold_iternorm(copy.deepcopy(model), fallback=False)
    # head → norm is invisible (in the untraceable forward) and stays
    check_fold(model, torch.randn(4, 3, 6, 6), {"block.1"})


def test_fold_keeps_dtype_and_casts_back():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), ik.IterNorm(6, num_channels=3)).double()
    randomize_affine(model)
    update_running_stats(model, (4, 3, 5, 5))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    ik.fold_iternorm(model)
    assert model[0].weight.dtype == model[0].bias.dtype == torch.float64
    with torch.no_grad():
        assert relative_error(model(x), y) <= 1e-12
    half = nn.Sequential(nn.Conv2d(3, 6, 3), ik.IterNorm(6, num_channels=3))
    update_running_stats(half, (4, 3, 5, 5))
    half = half.to(torch.bfloat16)
    ik.fold_iternorm(half)
    assert half[0].weight.dtype == half[0].bias.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def resnet18_eval():
    """convert_batchnorm(resnet18(num_classes=10)) with running statistics, eval mode, and an input."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(10)
    model = ik.convert_batchnorm(torchvision.models.resnet18(num_classes=10))
    randomize_affine(model)
    update_running_stats(model, (2, 3, 64, 64), passes=2)
    return model, torch.randn(2, 3, 64, 64)


def _variant(resnet18_eval, folded: bool):
    model, x = resnet18_eval
    model = copy.deepcopy(model)
    if folded:
        ik.fold_iternorm(model)
        assert not iternorm_paths(model)
    else:
        assert len(iternorm_paths(model)) == 20
    with torch.no_grad():
        y = model(x)
    return model, x, y


@pytest.mark.slow
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
def test_onnx_export_runs_in_onnxruntime(resnet18_eval, folded):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, x, y = _variant(resnet18_eval, folded)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert "Conv" in ops
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (y_ort,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    y_ort = torch.from_numpy(y_ort)
    assert y_ort.shape == y.shape
    err = relative_error(y_ort, y)
    print(f"onnxruntime vs torch ({'folded' if folded else 'unfolded'}): relative max error {err:.2e}")
    assert err <= 1e-5, err  # float32, other kernels and summation orders: about 1e-6 here
    assert math.isfinite(err)


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
def test_torch_export_runs(resnet18_eval, folded):
    model, x, y = _variant(resnet18_eval, folded)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("conv" in t for t in targets)
    # IterNorm's eval map (bmm under a disabled autocast region, then the affine) is in the graph iff unfolded
    whitening = {"wrap_with_autocast", "aten.bmm.default", "aten.baddbmm.default", "aten.addcmul.default"}
    assert bool(targets & whitening) != folded, sorted(targets)
    with torch.no_grad():
        y_exp = exported.module()(x)
    err = relative_error(y_exp, y)
    print(f"torch.export vs eager ({'folded' if folded else 'unfolded'}): relative max error {err:.2e}")
    assert err <= 1e-6, err
