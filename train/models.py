"""Backbones, the INTL projector, and exporting / loading a pretrained backbone.

Backbones are torchvision ResNets with ``fc`` replaced by the identity, so an exported
backbone state dict loads into ``torchvision.models.<arch>()`` with only ``fc`` missing.
``resnet_tiny`` (BasicBlock, one block per stage, widths 16-32-64-128) is the small model
of the digits demo. The CIFAR stem (3×3 stride-1 first convolution, no max-pool) suits
small images; its ``conv1`` differs from torchvision's, so its export loads into a
torchvision model built the same way.
"""

from __future__ import annotations

import copy
import hashlib
import os

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from .cli import UsageError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet_tiny")


class TinyResNet(ResNet):
    """A torchvision ResNet (BasicBlock, layers [1, 1, 1, 1]) with stage widths 16-32-64-128."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128)) -> None:
        super().__init__(BasicBlock, [1, 1, 1, 1])
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=2)
        self.fc = nn.Linear(widths[3], 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_backbone(arch: str, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """A ResNet without its classifier.

    Args:
        arch: one of ``ARCHS``.
        cifar_stem: 3×3 stride-1 ``conv1`` and no max-pool (for small images).

    Returns:
        (backbone mapping (N, 3, H, W) to (N, F), F).
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    net = TinyResNet() if arch == "resnet_tiny" else getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        width = net.conv1.out_channels
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def parse_projector(spec: str) -> list[int]:
    """``"8192-8192-8192"`` → [8192, 8192, 8192] (hidden sizes, then the embedding size)."""
    try:
        dims = [int(d) for d in spec.split("-")]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"--proj must be positive integers joined by '-', e.g. 8192-8192-8192, got {spec!r}")
    return dims


def build_projector(in_dim: int, spec: str) -> nn.Sequential:
    """INTL's projector: Linear (no bias) + BN + ReLU per hidden layer, then Linear with bias."""
    dims = [in_dim, *parse_projector(spec)]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-2], dims[1:-1], strict=True):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


class INTLModel(nn.Module):
    """Backbone + projector; ``forward(crops)`` embeds each crop (a (N, 3, h, w) tensor) separately.

    Each crop goes through the network on its own (as in the authors' pseudocode), so BN
    statistics are per view; calling the module once per step keeps DDP to one forward.
    """

    def __init__(self, arch: str, proj: str, cifar_stem: bool = False) -> None:
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(arch, cifar_stem)
        self.projector = build_projector(self.feat_dim, proj)

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.projector(self.backbone(c)) for c in crops]


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of the model for the EMA target."""
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """ema ← m·ema + (1 − m)·model, parameters only (buffers: the EMA model keeps its own)."""
    e = [p for p in ema.parameters()]
    o = [p.detach() for p in model.parameters()]
    torch._foreach_mul_(e, momentum)
    torch._foreach_add_(e, o, alpha=1.0 - momentum)


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict (keys as in torchvision, no ``fc``), on CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: the same weights wherever they
    are stored (a linear evaluation resumes on a moved ``--pretrained``, refuses other weights)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """(arch, cifar_stem) of a backbone state dict, from its keys and shapes."""
    if "conv1.weight" not in state or "layer4.0.conv1.weight" not in state:
        raise ValueError("not a ResNet backbone state dict (no conv1.weight / layer4.0.conv1.weight)")
    cifar = state["conv1.weight"].shape[-1] == 3
    bottleneck = "layer1.0.conv3.weight" in state
    blocks3 = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    if bottleneck:
        archs = {6: "resnet50"}
    elif state["conv1.weight"].shape[0] == 16:
        archs = {1: "resnet_tiny"}
    else:
        archs = {2: "resnet18", 6: "resnet34"}
    if blocks3 not in archs:
        raise ValueError(
            f"unsupported ResNet layout ({'Bottleneck' if bottleneck else 'BasicBlock'}, {blocks3} blocks)"
        )
    return archs[blocks3], cifar


def load_backbone(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a pretrained backbone from a ``checkpoint.pth`` of train.pretrain or an exported backbone.

    Args:
        path: a training checkpoint (its online model's backbone is used) or a backbone
            state dict (``<arch>.pth`` written by train.pretrain, torchvision keys).

    Returns:
        (backbone with ``fc`` = identity, info: {"arch", "cifar_stem", "feat_dim", "source"}).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"--pretrained: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"--pretrained: {path} is not a readable torch checkpoint ({err})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"--pretrained: {path} holds a {type(obj).__name__}, expected a state dict")
    if "model" in obj and isinstance(obj["model"], dict):
        state = {k[len("backbone.") :]: v for k, v in obj["model"].items() if k.startswith("backbone.")}
        source = "checkpoint"
    else:
        state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        source = "backbone"
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        arch, cifar = infer_arch(state)
    except ValueError as err:
        raise UsageError(
            f"--pretrained: {path} holds no ResNet backbone ({err}); expected a checkpoint.pth of "
            "train.pretrain (keys 'model' → 'backbone.*') or an exported backbone state dict "
            "(torchvision ResNet keys: conv1.weight, …)"
        ) from None
    net, dim = build_backbone(arch, cifar)
    net.load_state_dict(state)
    return net, {"arch": arch, "cifar_stem": cifar, "feat_dim": dim, "source": source}
