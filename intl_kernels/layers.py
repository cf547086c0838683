"""Layers for any model: the IterNorm layer (Huang et al., CVPR 2019), ``convert_batchnorm``
and ``ChannelWhitening`` (INTL's channel whitening as a module).

The IterNorm layer whitens contiguous groups of c channels over the batch and spatial
positions: for group g, Z_g = x[:, g·c:(g+1)·c] as a c × (N·H·W) matrix, divisor N·H·W,
ridge eps, T Newton steps (docs/design.md §2, mode batch/group). The groups are read as
(G, c, N, H·W) views of the input's memory, NCHW or channels_last, and the output is
written in the input's layout: the triton, cpu and cuda backends read and write those views
directly (cpu and cuda also fold the per-channel affine into their op), the torch
backend takes one reshaped copy.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from intl_kernels import _backends
from intl_kernels._checks import check_float_tensor, check_int, check_real
from intl_kernels.whiten import (
    _cast,
    _newton_bwd_torch,
    _newton_torch,
    _safe_tau,
    iter_norm,
    pow2_rscale_of_max,
    stats_dtype,
)

_log = logging.getLogger("intl_kernels")


def _columns(t: torch.Tensor, G: int, c: int) -> torch.Tensor:
    """(N, C, *spatial) → (G, c, N, L) with L = prod(spatial): a view for NCHW and channels_last."""
    t3 = t.unsqueeze(-1) if t.dim() == 2 else t.flatten(2)
    return t3.unflatten(1, (G, c)).permute(1, 2, 0, 3)


def _from_columns(t4: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of _columns: (G, c, N, L) → (N, C, *spatial); a view when t4 came from one."""
    return t4.permute(2, 0, 1, 3).reshape(shape)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """New tensor shaped like x: channels_last (3d) when x is, else contiguous (both view-able by
    _columns)."""
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return torch.empty_like(x, memory_format=fmt)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# Backends whose fwd/bwd take the (G, c, N, L) group view itself and return results in its
# layout (at::empty_like); the torch backend takes a reshaped (G, c, N·L) copy.
_READS_GROUP_VIEWS = ("cpu", "triton", "cuda")
# Backends whose ops apply the per-channel affine themselves (torch.ops.intl_kernels.whiten_affine_*).
_FOLDS_AFFINE = ("cpu", "cuda")


class GroupWhitenFn(torch.autograd.Function):
    """Whitening of the channel groups of an (N, C, *spatial) tensor.

    Returns y4, the whitened groups as a (G, c, N, L) tensor, laid out in memory like x on the
    backends that read the group views (``_from_columns(y4, x.shape)`` is then a view in x's
    layout; taking that view outside the Function keeps in-place ops such as ReLU(inplace=True)
    on it legal) and contiguous on the torch backend (the layer copies it into x's layout
    outside the Function: a Function returning an in-place copy gets a zero gradient under
    torch.compile on torch 2.11), and the batch
    statistics in the input's scale for the running averages (not differentiable): mean
    (G, c, 1) and whitening matrix W = P_T/√tr S (G, c, c), float32 (float64 for float64
    inputs).
    """

    @staticmethod
    def forward(ctx, x, c, T, eps, backend, precision):
        N, C = x.shape[:2]
        G, L = C // c, math.prod(x.shape[2:])
        n = N * L
        z4 = _columns(x, G, c)
        fwd, _ = _backends.kernels(backend)
        with torch.autocast(x.device.type, enabled=False):
            if backend == "triton" and not torch.compiler.is_compiling():
                from intl_kernels.triton.whiten import _whiten_fwd

                y4 = torch.empty_like(z4)
                _, *stats = _whiten_fwd(z4, T, eps, float(n), precision, out=y4)
            elif backend in _READS_GROUP_VIEWS:  # strided reads; y4 = empty_like(z4)
                y4, *stats = fwd(z4, T, eps, float(n), precision)
            else:  # a reshaped copy in, (G, c, N, L) out; the layer copies it into x's layout
                y3, *stats = fwd(z4.reshape(G, c, n), T, eps, float(n), precision)
                y4 = y3.view(G, c, N, L)
            mu, wm = _running_terms(z4, *stats)
        ctx.save_for_backward(x, *stats)
        ctx.meta = (c, n, backend, precision)
        ctx.mark_non_differentiable(mu, wm)
        return y4, mu, wm

    @staticmethod
    @once_differentiable
    def backward(ctx, dy4, _dmu, _dwm):
        x, *stats = ctx.saved_tensors
        c, n, backend, precision = ctx.meta
        G = x.shape[1] // c
        z4 = _columns(x, G, c)
        _, bwd = _backends.kernels(backend)
        with torch.autocast(x.device.type, enabled=False):
            if backend == "triton" and not torch.compiler.is_compiling():
                from intl_kernels.triton.whiten import _whiten_bwd

                dx4 = _whiten_bwd(dy4, z4, *stats, float(n), precision, out=torch.empty_like(z4))
            elif backend in _READS_GROUP_VIEWS:
                dx4 = bwd(dy4, z4, *stats, float(n), precision)
            else:
                dz3 = bwd(dy4.reshape(G, c, n), z4.reshape(G, c, n), *stats, float(n), precision)
                dx4 = torch.empty_like(z4).copy_(dz3.view(z4.shape))  # in x's layout
        return _from_columns(dx4, x.shape), None, None, None, None, None


def _running_terms(z4, mean, rscale, tau, A, P, X):
    """(batch mean (G, c, 1), whitening matrix (G, c, c)) in the input's scale, from the
    statistics of the rescaled, shifted groups."""
    mu = mean / rscale + z4[:, :, 0, :1].to(mean.dtype)
    return mu, P[-1] * (rscale * _safe_tau(tau)[1])


class GroupWhitenAffineFn(torch.autograd.Function):
    """GroupWhitenFn with the per-channel affine folded into the C++ op (cpu and cuda backends):
    y = weight·ŷ + bias comes out of the op's last product, and its backward returns the
    weight and bias gradients from products it forms anyway. weight, bias: (G, c)."""

    @staticmethod
    def forward(ctx, x, weight, bias, c, T, eps):
        N, C = x.shape[:2]
        G = C // c
        n = N * math.prod(x.shape[2:])
        z4 = _columns(x, G, c)
        with torch.autocast(x.device.type, enabled=False):
            y4, *stats = torch.ops.intl_kernels.whiten_affine_fwd(z4, weight, bias, T, eps, float(n))
            mu, wm = _running_terms(z4, *stats)
        ctx.save_for_backward(x, weight, *stats)
        ctx.meta = (c, n)
        ctx.mark_non_differentiable(mu, wm)
        return y4, mu, wm

    @staticmethod
    @once_differentiable
    def backward(ctx, dy4, _dmu, _dwm):
        x, weight, *stats = ctx.saved_tensors
        c, n = ctx.meta
        G = x.shape[1] // c
        with torch.autocast(x.device.type, enabled=False):
            dz4, dweight, dbias = torch.ops.intl_kernels.whiten_affine_bwd(
                dy4, _columns(x, G, c), weight, *stats, float(n)
            )
        return _from_columns(dz4, x.shape), dweight, dbias, None, None, None


DEFAULT_CHANNELS = 64  # channels per group when neither num_groups nor num_channels is given


def group_sizes(num_features: int, num_groups: int | None, num_channels: int | None) -> tuple[int, int]:
    """(num_groups, num_channels) of an IterNorm layer over C = num_features channels.

    The IterNorm authors' rule: c = num_channels if given, else ceil(C / num_groups), then c is
    halved until it divides C. This function takes what the arguments ask for exactly and raises
    a ValueError naming them where that rule would change it (``python_ref.IterNormRef`` applies
    the rule literally, and the two agree wherever this one returns):

    - num_groups alone: it must divide C (c = C / num_groups);
    - num_channels alone: it must divide C;
    - both: num_groups · num_channels must equal C (the authors' module ignores num_groups then);
    - neither: groups of 64 channels, halved until they divide C (C = 48: 3 groups of 16), an
      error where that leaves groups of one channel (which whiten nothing).

    The authors' module defaults to one group of all channels (num_groups=1); this layer's
    default is the groups of 64 of their ImageNet setting (``IterNorm(C, num_groups=1)`` gives
    theirs).
    """
    fn = "IterNorm"

    def divisors() -> str:
        ds = [d for d in range(1, num_features + 1) if num_features % d == 0]
        return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")

    if num_groups is not None and num_channels is not None:
        if num_groups * num_channels != num_features:
            raise ValueError(
                f"{fn}: num_groups={num_groups} and num_channels={num_channels} give "
                f"{num_groups * num_channels} channels, but num_features is {num_features}; pass one "
                f"of them, or both with num_groups·num_channels = {num_features}"
            )
        return num_groups, num_channels
    if num_groups is not None:
        if num_features % num_groups:
            raise ValueError(
                f"{fn}: num_groups={num_groups} does not divide num_features={num_features} into equal "
                f"groups; pass a divisor of {num_features} ({divisors()})"
            )
        return num_groups, num_features // num_groups
    if num_channels is not None:
        if num_features % num_channels:
            raise ValueError(
                f"{fn}: num_channels={num_channels} does not divide num_features={num_features}; pass a "
                f"divisor of {num_features} ({divisors()})"
            )
        return num_features // num_channels, num_channels
    c = DEFAULT_CHANNELS
    while num_features % c:
        c //= 2
    if c == 1 and num_features > 1:
        raise ValueError(
            f"{fn}: the default groups of {DEFAULT_CHANNELS} channels halve to 1 channel for "
            f"num_features={num_features}, which whitens nothing; pass num_channels or num_groups "
            f"(divisors of {num_features}: {divisors()})"
        )
    return num_features // c, c


class IterNorm(nn.Module):
    """IterNorm layer: whitening of channel groups by Newton's iteration, a drop-in for BatchNorm.

    Training whitens each group of ``num_channels`` contiguous channels over the batch and
    spatial positions (covariance divisor N·H·W, ridge eps, T Newton steps) and updates
    ``running_mean`` and ``running_wm`` with ``running = momentum·batch + (1 − momentum)·running``;
    eval applies ``running_wm @ (x − running_mean)``. Names and shapes follow the IterNorm
    authors' module, so its state_dicts load; its default is one group of all channels, this
    layer's groups of 64 channels (their ImageNet setting): ``num_groups=1`` gives theirs.

    Args:
        num_features: C, channels of the input.
        num_groups: G, groups of C / G channels; must divide C.
        num_channels: c, channels per group; must divide C. With neither, groups of 64 channels
            halved until they divide C (the authors' rule; ``group_sizes``). Arguments that the
            layer cannot honour exactly are a ValueError naming them, never a silent resize.
        T: Newton steps (IterNorm: 5).
        dim: input rank: 2 for (N, C), 3 for (N, C, L), 4 for (N, C, H, W), 5 for (N, C, D, H, W).
        eps: ridge added to each group's covariance, >= 0.
        momentum: weight of the batch statistics in the running averages, in [0, 1].
        affine: learn per-channel ``weight`` and ``bias`` of shape [1, C, 1, ...] (length dim).
        backend: whitening backend, as in ``intl_kernels.whiten``.

    Shapes:
        input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) per ``dim``, any layout (NCHW
            and channels_last are read in place); output: same shape, dtype and layout.
        running_mean: (G, c, 1); running_wm: (G, c, c).

    Example:
        >>> import torch, intl_kernels as ik
        >>> layer = ik.IterNorm(128, num_channels=64)
        >>> layer(torch.randn(8, 128, 5, 5)).shape
        torch.Size([8, 128, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        num_channels: int | None = None,
        T: int = 5,
        dim: int = 4,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        fn = "IterNorm"
        num_features = check_int(fn, "num_features", num_features, 1)
        if num_groups is not None:
            num_groups = check_int(fn, "num_groups", num_groups, 1)
            if num_groups > num_features:
                raise ValueError(
                    f"{fn}: num_groups must be <= num_features ({num_features}), got {num_groups}"
                )
        if num_channels is not None:
            num_channels = check_int(fn, "num_channels", num_channels, 1)
        self.T = check_int(fn, "T", T, 1)
        if dim not in (2, 3, 4, 5) or isinstance(dim, bool):
            raise ValueError(f"{fn}: dim must be 2, 3, 4 or 5, got {dim!r}")
        self.eps = check_real(fn, "eps", eps, minimum=0.0, strict=False)
        self.momentum = check_real(fn, "momentum", momentum, minimum=0.0, strict=False)
        if self.momentum > 1.0:
            raise ValueError(f"{fn}: momentum must be in [0, 1], got {momentum}")
        _backends._check_name(fn, backend, "backend")
        self.num_features = num_features
        self.affine = bool(affine)
        self.dim = dim
        self.backend = backend
        self.num_groups, self.num_channels = group_sizes(num_features, num_groups, num_channels)
        self._ndims = (dim,)
        shape = [1] * dim
        shape[1] = num_features
        if self.affine:
            self.weight = nn.Parameter(torch.ones(*shape))
            self.bias = nn.Parameter(torch.zeros(*shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        G, c = self.num_groups, self.num_channels
        self.register_buffer("running_mean", torch.zeros(G, c, 1))
        self.register_buffer("running_wm", torch.eye(c).expand(G, c, c).clone())

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_wm.copy_(torch.eye(self.num_channels).expand_as(self.running_wm))

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        fn = "IterNorm"
        check_float_tensor(fn, "input", x)
        if x.dim() not in self._ndims:
            layout = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
            want = " or ".join(f"{d}-D {layout[d]}" for d in self._ndims)
            raise ValueError(f"{fn}: input must be {want} (dim={self.dim}), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{fn}: input has {x.shape[1]} channels but num_features is {self.num_features}, "
                f"shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        c = self.num_channels
        if self.training:
            n = x.shape[0] * math.prod(x.shape[2:])
            if n < 2:
                raise ValueError(
                    f"IterNorm: expected more than 1 value per channel when training "
                    f"(N·H·W = {n}), got input of shape {tuple(x.shape)}"
                )
            groups = _columns(x, self.num_groups, c)  # r = c for the backends' row limits
            backend, precision = _backends.resolve("IterNorm", self.backend, groups, None)
            folded = self.affine and backend in _FOLDS_AFFINE  # the op applies the affine itself
            if folded:
                G = self.num_groups
                weight, bias = self.weight.view(G, c), self.bias.view(G, c)
                y4, mu, wm = GroupWhitenAffineFn.apply(x, weight, bias, c, self.T, self.eps)
            else:
                y4, mu, wm = GroupWhitenFn.apply(x, c, self.T, self.eps, backend, precision)
            if folded or backend in _READS_GROUP_VIEWS:
                y = _from_columns(y4, x.shape)  # a view in x's layout
            else:
                y = _empty_like_layout(x)
                _columns(y, self.num_groups, c).copy_(y4)
            with torch.no_grad():
                self.running_mean.lerp_(mu.to(self.running_mean.dtype), self.momentum)
                self.running_wm.lerp_(wm.to(self.running_wm.dtype), self.momentum)
        else:
            folded = False
            y = self._apply_running(x)
        if self.affine and not folded:
            shape = (1, self.num_features) + (1,) * (x.dim() - 2)
            y = torch.addcmul(self.bias.to(y.dtype).view(shape), y, self.weight.to(y.dtype).view(shape))
        return y

    def _apply_running(self, x: torch.Tensor) -> torch.Tensor:
        """Eval: running_wm @ (x − running_mean) per group, in the running statistics' dtype."""
        G, c = self.num_groups, self.num_channels
        N = x.shape[0]
        z4 = _columns(x, G, c)
        y = _empty_like_layout(x)
        with torch.autocast(x.device.type, enabled=False):
            wm, rm = self.running_wm, self.running_mean
            z3 = z4.reshape(G, c, -1).to(wm.dtype)
            y3 = torch.baddbmm(torch.bmm(wm, rm).neg_(), wm, z3)
            _columns(y, G, c).copy_(y3.view(G, c, N, -1))
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, num_channels={self.num_channels}, "
            f"T={self.T}, dim={self.dim}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"backend={self.backend!r}"
        )


class SyncGroupWhitenFn(torch.autograd.Function):
    """Group whitening whose statistics span a process group (SyncIterNorm's training forward).

    Forward, per group of the (N_r, C, *spatial) input of rank r: the power-of-two rescale from the
    global max |x| (all-reduce max), the global row means from row sums and counts (all-reduce, in
    float64), the Gram matrix of the rows centred on those means (all-reduce), then T Newton steps
    on the global covariance (the same on every rank) and Y = W·Zc on the local columns. Backward:
    the local Ȳ Zcᵀ and row sums of Ȳ are all-reduced, so that every rank derives the same M and
    its input gradient is that of the sum of every rank's loss, as on one process holding the
    global batch (docs/design.md §3 with the column sums taken over all ranks). Plain torch
    operations on any device; statistics in float32 (float64 for float64 inputs).
    """

    @staticmethod
    def forward(ctx, x, c, T, eps, group):
        N, C = x.shape[:2]
        G, L = C // c, math.prod(x.shape[2:])
        cdt = stats_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            z3 = _columns(x, G, c).reshape(G, c, N * L)
            amax = z3.abs().amax(dim=(1, 2)).to(cdt)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
            rscale = pow2_rscale_of_max(amax.view(G, 1, 1), eps)
            zs = z3.to(cdt) * rscale
            sums = torch.cat(
                [zs.sum(dim=-1, dtype=torch.float64).view(-1), zs.new_full((1,), N * L, dtype=torch.float64)]
            )
            dist.all_reduce(sums, group=group)
            n = sums[-1:]  # columns over every rank, a device tensor (no host synchronisation)
            mean64 = (sums[:-1] / n).view(G, c, 1)
            mean_hi = mean64.to(cdt)
            mean_lo = (mean64 - mean_hi.to(torch.float64)).to(cdt)  # the mean to float64 accuracy
            zc = (zs - mean_hi) - mean_lo
            gram = torch.bmm(zc, zc.mT)
            dist.all_reduce(gram, group=group)
            S = gram / n.to(cdt)
            if eps > 0.0:
                S = S + (math.sqrt(eps) * rscale).square() * torch.eye(c, dtype=cdt, device=x.device)
            tau, A, P, X = _newton_torch(S, T)
            W = P[-1] * _safe_tau(tau)[1]
            y4 = _cast(torch.bmm(W, zc), x.dtype).view(G, c, N, L)
            mu = (mean64 / rscale.to(torch.float64)).to(cdt)
            wm = W * rscale
        ctx.save_for_backward(x, rscale, mean_hi, mean_lo, n, tau, A, P, X)
        ctx.meta = (c, group)
        ctx.mark_non_differentiable(mu, wm)
        return y4, mu, wm

    @staticmethod
    @once_differentiable
    def backward(ctx, dy4, _dmu, _dwm):
        x, rscale, mean_hi, mean_lo, n, tau, A, P, X = ctx.saved_tensors
        c, group = ctx.meta
        N, C = x.shape[:2]
        G = C // c
        cdt = A.dtype
        with torch.autocast(x.device.type, enabled=False):
            zc = (_columns(x, G, c).reshape(G, c, -1).to(cdt) * rscale - mean_hi) - mean_lo
            dy = dy4.reshape(G, c, -1).to(cdt)
            parts = torch.cat([torch.bmm(dy, zc.mT).view(-1), dy.sum(dim=-1).view(-1)])
            dist.all_reduce(parts, group=group)
            dW, dysum = parts[: G * c * c].view(G, c, c), parts[G * c * c :].view(G, c, 1)
            dS = _newton_bwd_torch(dW, tau, A, P, X)
            nc = n.to(cdt)
            W = P[-1] * _safe_tau(tau)[1]
            dz = torch.baddbmm(torch.bmm(W.mT, dy - dysum / nc), (dS + dS.mT) / nc, zc) * rscale
            dx = _empty_like_layout(x)
            _columns(dx, G, c).copy_(dz.view(G, c, N, -1))
        return dx, None, None, None, None


def _distributed(group) -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class SyncIterNorm(IterNorm):
    """IterNorm whose training statistics span a process group, as SyncBatchNorm's do.

    In training under ``torch.distributed`` the row means and covariance of each group are taken
    over the samples of every rank of ``process_group`` (default: the world): row sums and Gram
    matrices are all-reduced in the forward, their gradients in the backward, so N ranks with
    batches of B whiten as one process with the N·B samples would (``SyncGroupWhitenFn``). The
    running statistics are the global ones, the same on every rank. In one process, and in eval,
    it is an ``IterNorm`` (any backend). ``convert_batchnorm`` turns SyncBatchNorm into it.

    Args:
        as IterNorm, and process_group: the group the statistics span (None: the world).
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed(self.process_group)):
            return super().forward(x)
        self._check_input(x)
        c = self.num_channels
        if x.shape[0] * math.prod(x.shape[2:]) < 1:
            raise ValueError(f"SyncIterNorm: got an empty input of shape {tuple(x.shape)}")
        y4, mu, wm = SyncGroupWhitenFn.apply(x, c, self.T, self.eps, self.process_group)
        y = _empty_like_layout(x)
        _columns(y, self.num_groups, c).copy_(y4)
        with torch.no_grad():
            self.running_mean.lerp_(mu.to(self.running_mean.dtype), self.momentum)
            self.running_wm.lerp_(wm.to(self.running_wm.dtype), self.momentum)
        if self.affine:
            shape = (1, self.num_features) + (1,) * (x.dim() - 2)
            y = torch.addcmul(self.bias.to(y.dtype).view(shape), y, self.weight.to(y.dtype).view(shape))
        return y


_BN_DIMS = {nn.BatchNorm1d: (2, (2, 3)), nn.BatchNorm2d: (4, (4,)), nn.BatchNorm3d: (5, (5,))}


def convert_batchnorm(
    module: nn.Module, num_channels: int | None = None, T: int = 5, *, verbose: bool = False, **kwargs
) -> nn.Module:
    """Replace every BatchNorm in ``module`` by an IterNorm layer, in place.

    BatchNorm1d becomes a layer taking (N, C) or (N, C, L), BatchNorm2d (N, C, H, W), BatchNorm3d
    (N, C, D, H, W), and SyncBatchNorm a ``SyncIterNorm`` (statistics over its process group;
    inputs of any rank). The layer takes the BatchNorm's num_features, eps and momentum (momentum
    None, BatchNorm's cumulative average, becomes 0.1), keeps its affine parameters (weight and
    bias copied) and its device and dtype. Running statistics are not carried over (they mean
    different things). A lazy BatchNorm that has not seen an input yet (no num_features) is an
    error; other norm layers (GroupNorm, LayerNorm, InstanceNorm) are left alone.

    Args:
        module: any model, e.g. a torchvision ResNet; a BatchNorm itself is replaced and returned.
        num_channels: channels per whitening group, for every layer (each num_features must be a
            multiple); default: IterNorm's (groups of 64, halved until they divide num_features).
        T: Newton steps.
        verbose: print one line per converted layer (name, kind, groups) and a total.
        **kwargs: other IterNorm arguments (num_groups, backend).

    Returns:
        the module, with the replacements made; what was converted is logged (logger
        ``intl_kernels``, level INFO) and printed with ``verbose``.
    """
    # every replacement is built (and checked) before any is made: an error leaves module as it was
    plan: list[tuple[nn.Module | None, str, nn.Module]] = []
    _plan(module, None, "", num_channels, T, kwargs, plan)
    converted = []
    for parent, name, (bn, layer) in plan:
        if parent is not None:
            setattr(parent, name.rsplit(".", 1)[-1], layer)
        converted.append(
            f"  {name or '(module)'}: {type(bn).__name__}({bn.num_features}) -> "
            f"{type(layer).__name__} {layer.num_groups} groups of {layer.num_channels}"
        )
    summary = f"convert_batchnorm: {len(converted)} BatchNorm layers converted to IterNorm"
    for line in converted:
        _log.info(line)
    _log.info(summary)
    if verbose:
        print("\n".join([*converted, summary]), flush=True)
    return plan[0][2][1] if plan and plan[0][0] is None else module


def _plan(module: nn.Module, parent, name: str, num_channels, T, kwargs, plan: list) -> None:
    """Append (parent, dotted name, (BatchNorm, its IterNorm)) for every BatchNorm under module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        layer = _iternorm_from_bn(module, name or "(the module itself)", num_channels, T, kwargs)
        plan.append((parent, name, (module, layer)))
        return
    for child_name, child in module.named_children():
        _plan(child, module, f"{name}.{child_name}" if name else child_name, num_channels, T, kwargs, plan)


def _iternorm_from_bn(
    bn: nn.modules.batchnorm._BatchNorm, name: str, num_channels, T: int, kwargs
) -> IterNorm:
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        raise ValueError(
            f"convert_batchnorm: {name} is a lazy {type(bn).__name__} that has not seen an input, so "
            "its number of channels is unknown; run one forward pass before converting"
        )
    sync = isinstance(bn, nn.SyncBatchNorm)
    kind = next((k for k in _BN_DIMS if isinstance(bn, k)), None)
    if kind is None and not sync:
        raise ValueError(
            f"convert_batchnorm: {name} is a {type(bn).__name__}, a BatchNorm of a kind it does not "
            "know (BatchNorm1d/2d/3d and SyncBatchNorm are converted)"
        )
    dim, ndims = (4, (2, 3, 4, 5)) if sync else _BN_DIMS[kind]
    cls, extra = (SyncIterNorm, {"process_group": bn.process_group}) if sync else (IterNorm, {})
    momentum = 0.1 if bn.momentum is None else bn.momentum
    try:
        layer = cls(
            bn.num_features,
            num_channels=num_channels,
            T=T,
            dim=dim,
            eps=bn.eps,
            momentum=momentum,
            affine=bn.affine,
            **kwargs,
            **extra,
        )
    except ValueError as err:
        raise ValueError(
            f"convert_batchnorm: {name} ({type(bn).__name__}({bn.num_features})): {err}"
        ) from None
    layer._ndims = ndims
    ref = bn.weight if bn.affine else bn.running_mean
    if ref is not None:
        layer.to(device=ref.device, dtype=ref.dtype)
    if bn.affine:
        with torch.no_grad():
            layer.weight.view(-1).copy_(bn.weight)
            layer.bias.view(-1).copy_(bn.bias)
    layer.train(bn.training)
    return layer


class ChannelWhitening(nn.Module):
    """INTL channel whitening as a module: ``iter_norm`` of (N, D) or (B, N, D) embeddings.

    Args:
        T: Newton steps (INTL: 4).
        gather_distributed: under torch.distributed, whiten the global batch (rows of every
            rank, all-gathered with an autograd-aware gather) and return this rank's rows,
            as the INTL authors do; a no-op in a single process.
        backend: whitening backend, as in ``intl_kernels.whiten``.

    Shapes:
        input (N, D) or (B, N, D); output the same.
    """

    def __init__(self, T: int = 4, gather_distributed: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.T = check_int("ChannelWhitening", "T", T, 1)
        _backends._check_name("ChannelWhitening", backend, "backend")
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return iter_norm(x, self.T, gather_distributed=self.gather_distributed, backend=self.backend)

    def extra_repr(self) -> str:
        return f"T={self.T}, gather_distributed={self.gather_distributed}, backend={self.backend!r}"
