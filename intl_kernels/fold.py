"""Folding IterNorm layers into the convolution or linear layer before them, for inference.

In eval mode an IterNorm layer is an affine map per group of c channels (``IterNorm._apply_running``
followed by the per-channel affine): y_g = diag(weight_g)·W_g·(x_g − μ_g) + bias_g with
W = ``running_wm`` (G, c, c) and μ = ``running_mean`` (G, c, 1). When x is the output of a
Conv1d/Conv2d/Linear, x_g = K_g ∗ input + b_g, the map folds into that layer like BatchNorm does
(``torch.nn.utils.fusion.fuse_conv_bn_eval``):

    K'_g = diag(weight_g) · W_g · K_g                   (mixes the group's c output channels)
    b'_g = diag(weight_g) · W_g · (b_g − μ_g) + bias_g  (b = 0 for a layer without bias)

and the IterNorm layer becomes ``nn.Identity``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from intl_kernels.layers import IterNorm

__all__ = ["fold_iternorm"]

# Layers an IterNorm folds into (exactly these forwards) and the rank of the IterNorm input after each.
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BASE_FORWARD = {nn.Conv1d: nn.Conv1d.forward, nn.Conv2d: nn.Conv2d.forward, nn.Linear: nn.Linear.forward}
_OUT_RANK = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Linear: 2}


class _Tracer(fx.Tracer):
    """FX tracer that keeps IterNorm, Conv1d/2d and Linear (subclasses included) as leaf calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (IterNorm, *_FOLDABLE)) or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class _Pair:
    layer_path: str  # the Conv/Linear, as a qualified name in the model
    norm_path: str  # the IterNorm that directly follows it


def fold_iternorm(
    model: nn.Module,
    *,
    example_inputs: Sequence | None = None,
    fallback: bool = True,
) -> nn.Module:
    """Fold every IterNorm layer that directly follows a Conv1d, Conv2d or Linear into it, in place.

    For inference, as BatchNorm is folded by ``torch.ao.quantization.fuse_modules``: in eval mode
    IterNorm is an affine map per channel group, y_g = diag(weight_g)·W_g·(x_g − μ_g) + bias_g
    (W = ``running_wm``, μ = ``running_mean``), so after a layer x_g = K_g ∗ input + b_g it folds into
    that layer's parameters, K'_g = diag(weight_g)·W_g·K_g and b'_g = diag(weight_g)·W_g·(b_g − μ_g)
    + bias_g, and the IterNorm layer is replaced by ``nn.Identity``. A layer without a bias gets one.
    The weight and bias tensors are updated in place (the same Parameter objects), so references to
    them stay valid. Other IterNorm layers are left as they are. The folded model computes the same
    function up to rounding (float32: a few ulps per layer); it must not be trained further with
    the expectation of IterNorm's training behaviour, since the whitening layers are gone.

    "Directly follows" is found on the FX graph (``torch.fx`` symbolic tracing with IterNorm,
    Conv1d/Conv2d and Linear as leaf modules): an IterNorm call whose only input is the output of
    a Conv1d/Conv2d/Linear call with no other user. A pair is folded only when, in addition:

    - the IterNorm follows a Conv2d and takes 4-D input (``dim=4``), a Conv1d and takes 3-D input,
      or a Linear and takes 2-D input (``dim=2``, e.g. from ``convert_batchnorm`` of a BatchNorm1d);
    - each of the two modules is called once in the graph, registered once in the model, has no
      forward hooks or parametrizations, and neither their parameters nor buffers are shared with
      other modules or read directly by the model's forward; both are instances of IterNorm resp.
      ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` without an overridden ``forward``;
    - grouped and depthwise convolutions: every IterNorm group of c channels lies inside one conv
      group (c divides ``out_channels // groups``), so that the mixing W_g stays within a conv
      group. Otherwise the pair is left unfolded (no error): e.g. a depthwise conv followed by
      IterNorm with c > 1 keeps its IterNorm layer.

    Shape check: a Linear applied to (N, L, in) inputs gives (N, L, out), and an IterNorm that also
    takes 3-D input (``convert_batchnorm`` of a BatchNorm1d) would then whiten over the L axis, which
    folding into the Linear cannot express; likewise an unbatched Conv1d. Such a pair runs only when
    L happens to equal the channel count. Pass ``example_inputs`` to rule it out: the model is run
    once on them (no grad) and only pairs whose IterNorm saw input of the rank above are folded.

    Models FX cannot trace (data-dependent control flow in ``forward``): with ``fallback=True``
    (the default) each child module is traced on its own instead, recursively, and pairs inside the
    children that trace are folded (torchvision blocks, ``nn.Sequential`` stacks). This assumes that
    the untraceable ``forward`` calls its children as whole modules and does not reach into their
    submodules (the conv and IterNorm being registered once is checked; calls from an untraceable
    forward are not visible). With ``fallback=False`` an untraceable model raises RuntimeError.

    Computation: in float64 on the layer's device (CPU for MPS), cast back to the layer's weight
    dtype; the IterNorm statistics may have another dtype.

    Args:
        model: a model in eval mode (``model.eval()``); every IterNorm in it must be in eval mode.
        example_inputs: optional positional inputs of ``model`` (a tuple, or one tensor) for the shape
            check above.
        fallback: trace children separately when the whole model does not trace (see above).

    Returns:
        ``model`` itself (not a GraphModule), with the foldable IterNorm layers replaced by
        ``nn.Identity`` and the preceding layers' weight and bias updated.

    Raises:
        RuntimeError: ``model`` or an IterNorm in it is in training mode (fold its running
            statistics only once training is done: call ``model.eval()`` first), or the model does
            not trace and ``fallback=False``.

    Shapes:
        Conv weight (out, in/groups, *kernel) and Linear weight (out, in), with out = C = G·c of the
        IterNorm; running_wm (G, c, c), running_mean (G, c, 1), IterNorm weight/bias C values.

    Example:
        >>> import torch, torchvision, intl_kernels as ik
        >>> model = ik.convert_batchnorm(torchvision.models.resnet18()).eval()
        >>> folded = ik.fold_iternorm(model)  # the same object; its 20 IterNorm layers folded
        >>> sum(isinstance(m, ik.IterNorm) for m in folded.modules())
        0
    """
    _check_eval(model)
    pairs = list(_find_pairs(model, model, "", fallback))
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        pairs = _check_shapes(model, pairs, example_inputs)
    for pair in pairs:
        layer = model.get_submodule(pair.layer_path)
        norm = model.get_submodule(pair.norm_path)
        _fold_into(layer, norm)
        _set_submodule(model, pair.norm_path, nn.Identity())
    return model


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise RuntimeError(
            "fold_iternorm: the model is in training mode; folding uses the IterNorm layers' running "
            "statistics (their eval-mode map), so call model.eval() first"
        )
    for name, m in model.named_modules():
        if isinstance(m, IterNorm) and m.training:
            raise RuntimeError(
                f"fold_iternorm: IterNorm layer {name!r} is in training mode while the model is in eval "
                "mode; folding uses its running statistics: call model.eval() first"
            )


def _find_pairs(root: nn.Module, module: nn.Module, prefix: str, fallback: bool) -> Iterator[_Pair]:
    """Foldable (layer, IterNorm) pairs of ``module`` (``prefix`` its path in ``root``)."""
    if isinstance(module, (IterNorm, *_FOLDABLE)):
        return
    try:
        graph = _Tracer().trace(module)
    except Exception as e:  # FX raises TraceError, TypeError, RuntimeError, ... on untraceable code
        if not fallback:
            what = f"submodule {prefix!r}" if prefix else "the model"
            raise RuntimeError(
                f"fold_iternorm: torch.fx cannot trace {what} ({type(e).__name__}: {e}); pass "
                "fallback=True to fold inside its children that trace"
            ) from e
        for name, child in module.named_children():
            yield from _find_pairs(root, child, _join(prefix, name), fallback)
        return
    yield from _pairs_in_graph(root, module, prefix, graph)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _pairs_in_graph(root: nn.Module, module: nn.Module, prefix: str, graph: fx.Graph) -> Iterator[_Pair]:
    calls = Counter()  # module object id → number of call_module nodes
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(module.get_submodule(node.target))] += 1
    attrs = [str(node.target) for node in graph.nodes if node.op == "get_attr"]
    registered = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    tensors = Counter(id(t) for _, t in root.named_parameters(remove_duplicate=False))
    tensors.update(id(t) for _, t in root.named_buffers(remove_duplicate=False))

    def usable(path: str, m: nn.Module) -> bool:
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        return (
            calls[id(m)] == 1
            and registered[id(m)] == 1
            and not any(a == path or a.startswith(path + ".") for a in attrs)
            and all(tensors[id(t)] == 1 for t in own)
            and not (m._forward_hooks or m._forward_pre_hooks)
            and not parametrize.is_parametrized(m)
        )

    for node in graph.nodes:
        if node.op != "call_module" or node.kwargs or len(node.args) != 1:
            continue
        norm = module.get_submodule(node.target)
        if not isinstance(norm, IterNorm):
            continue
        (src,) = node.args
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = module.get_submodule(src.target)
        kind = next((k for k in _FOLDABLE if isinstance(layer, k)), None)
        if kind is None or type(layer).forward is not _BASE_FORWARD[kind]:
            continue
        if (
            type(norm).forward is not IterNorm.forward
            or type(norm)._apply_running is not IterNorm._apply_running
        ):
            continue
        if not (usable(src.target, layer) and usable(node.target, norm)):
            continue
        if _OUT_RANK[kind] not in norm._ndims or not _groups_fit(layer, norm):
            continue
        yield _Pair(_join(prefix, src.target), _join(prefix, node.target))


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _groups_fit(layer: nn.Module, norm: IterNorm) -> bool:
    """Same channel count, and every IterNorm group of c channels inside one conv group."""
    out = _out_features(layer)
    if out != norm.num_features:
        return False
    per_group = out // getattr(layer, "groups", 1)
    return per_group % norm.num_channels == 0


def _check_shapes(model: nn.Module, pairs: list[_Pair], example_inputs: Sequence) -> list[_Pair]:
    """The pairs whose IterNorm receives input of the rank its layer produces with a channel axis 1."""
    ranks: dict[str, int] = {}
    handles = []
    for pair in pairs:
        norm = model.get_submodule(pair.norm_path)

        def hook(_m, args, path=pair.norm_path):
            ranks[path] = args[0].dim() if args and isinstance(args[0], torch.Tensor) else -1

        handles.append(norm.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    kept = []
    for pair in pairs:
        layer = model.get_submodule(pair.layer_path)
        kind = next(k for k in _FOLDABLE if isinstance(layer, k))
        if ranks.get(pair.norm_path) == _OUT_RANK[kind]:
            kept.append(pair)
    return kept


@torch.no_grad()
def _fold_into(layer: nn.Module, norm: IterNorm) -> None:
    """layer.weight ← diag(w)·W·K and layer.bias ← diag(w)·W·(b − μ) + β per group, in float64."""
    G, c = norm.num_groups, norm.num_channels
    weight = layer.weight
    device = weight.device if weight.device.type != "mps" else torch.device("cpu")
    f64 = {"device": device, "dtype": torch.float64}
    W = norm.running_wm.to(**f64)  # (G, c, c)
    mu = norm.running_mean.to(**f64)  # (G, c, 1)
    K = weight.to(**f64).reshape(G, c, math.prod(weight.shape[1:]))
    b = layer.bias.to(**f64).view(G, c, 1) if layer.bias is not None else torch.zeros(G, c, 1, **f64)
    K_new = torch.bmm(W, K)
    b_new = torch.bmm(W, b - mu)
    if norm.affine:
        scale = norm.weight.to(**f64).view(G, c, 1)
        K_new.mul_(scale)
        b_new.mul_(scale).add_(norm.bias.to(**f64).view(G, c, 1))
    weight.copy_(K_new.view(weight.shape))
    if layer.bias is None:
        layer.bias = nn.Parameter(
            torch.empty(weight.shape[0], device=weight.device, dtype=weight.dtype),
            requires_grad=weight.requires_grad,
        )
    layer.bias.copy_(b_new.view(-1))


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
