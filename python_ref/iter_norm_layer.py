"""Reference IterNorm layer (batch/group mode).

Source: Huang, Zhou, Zhu, Liu, Shao, "Iterative Normalization: Beyond Standardization
towards Efficient Whitening", CVPR 2019, Algorithm 1, following the authors' module
(``IterNorm`` / ``iterative_normalization_py.forward``): group sizing, the
``baddbmm``/``matrix_power`` Newton steps, biased covariance with eps·I, momentum
updates of ``running_mean`` and ``running_wm``, per-channel affine. Autograd runs
through the loop instead of the authors' hand-written backward.

Limits: no rescaling and no input checks; the momentum update is not tracked by
autograd.
"""

from __future__ import annotations

import torch
from torch import nn


class IterNormRef(nn.Module):
    """IterNorm layer: whiten contiguous groups of c channels over the batch and space.

    For group g, Z_g is c × m with m = N·H·W, column index n·HW + spatial position.

    Group sizing is the authors' rule, literally: c = num_channels if given (num_groups is then
    ignored), else ceil(C / num_groups); c is halved until it divides C. Their defaults:
    num_groups=1, num_channels=None, one group of all channels. (``intl_kernels.IterNorm`` takes
    the same rule but raises where it would change what the arguments ask for.)

    Args:
        num_features: C, the number of channels.
        num_groups: G; c = ceil(C / G) when num_channels is None.
        num_channels: c, channels per group; halved until it divides C.
        T: number of Newton steps (IterNorm: 5).
        dim: input rank: 2 for (N, C), 3 for (N, C, L), 4 for (N, C, H, W).
        eps: ridge added to the diagonal of the covariance.
        momentum: running = momentum·batch + (1 − momentum)·running.
        affine: learn per-channel weight and bias, shape [1, C, 1, ...] (length dim).
        upcast: compute in float64 and return the input dtype.

    Shapes:
        input: (N, C), (N, C, L) or (N, C, H, W); output: same shape and dtype.
        running_mean: (g, c, 1); running_wm: (g, c, c).
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 1,
        num_channels: int | None = None,
        T: int = 5,
        dim: int = 4,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        self.T = T
        self.eps = eps
        self.momentum = momentum
        self.num_features = num_features
        self.affine = affine
        self.dim = dim
        self.upcast = upcast
        if num_channels is None:
            num_channels = (num_features - 1) // num_groups + 1
        num_groups = num_features // num_channels
        while num_features % num_channels != 0:
            num_channels //= 2
            num_groups = num_features // num_channels
        self.num_groups = num_groups
        self.num_channels = num_channels
        shape = [1] * dim
        shape[1] = num_features
        if affine:
            self.weight = nn.Parameter(torch.ones(*shape))
            self.bias = nn.Parameter(torch.zeros(*shape))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_groups, num_channels, 1))
        self.register_buffer(
            "running_wm", torch.eye(num_channels).expand(num_groups, num_channels, num_channels).clone()
        )

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        Xc = X.to(torch.float64) if self.upcast else X
        g, d = self.num_groups, self.num_channels
        # NxCxHxW -> (g x d) x (NxHxW), i.e. g*d*m
        x = Xc.transpose(0, 1).reshape(g, d, -1)
        m = x.size(2)
        if self.training:
            mean = x.mean(-1, keepdim=True)
            xc = x - mean
            P = [None] * (self.T + 1)
            P[0] = torch.eye(d, dtype=x.dtype, device=x.device).expand(g, d, d)
            Sigma = torch.baddbmm(P[0], xc, xc.transpose(1, 2), beta=self.eps, alpha=1.0 / m)
            rTr = (Sigma * P[0]).sum((1, 2), keepdim=True).reciprocal()
            Sigma_N = Sigma * rTr
            for k in range(self.T):
                P[k + 1] = torch.baddbmm(P[k], torch.matrix_power(P[k], 3), Sigma_N, beta=1.5, alpha=-0.5)
            wm = P[self.T] * rTr.sqrt()
            with torch.no_grad():
                rm, rw = self.running_mean, self.running_wm
                rm.copy_(self.momentum * mean.detach().to(rm.dtype) + (1.0 - self.momentum) * rm)
                rw.copy_(self.momentum * wm.detach().to(rw.dtype) + (1.0 - self.momentum) * rw)
        else:
            xc = x - self.running_mean.to(x.dtype)
            wm = self.running_wm.to(x.dtype)
        xn = wm.matmul(xc)
        X_hat = xn.reshape(Xc.size(1), Xc.size(0), *Xc.size()[2:]).transpose(0, 1).contiguous()
        if self.affine:
            X_hat = X_hat * self.weight.to(X_hat.dtype) + self.bias.to(X_hat.dtype)
        return X_hat.to(X.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, num_channels={self.num_channels}, "
            f"T={self.T}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"upcast={self.upcast}"
        )
