"""Benchmark providers and cases: every input is built here, outside the timed region.

Workloads (the ``op`` column of the results):

- ``channel``: INTL channel whitening of one (N, D) embedding batch, T = 4;
- ``crops``: multi-crop, B views of (N, D): the authors' code whitens one crop per call,
  ours whitens the (B, N, D) stack in one call;
- ``layer``: the IterNorm layer in training mode on (N, C, H, W), 64 channels per group,
  T = 5, per-channel affine;
- ``newton``: the Newton part alone (T = 4) from a fixed r×r covariance: what recomputing
  P_k in the backward would cost, and goal P4.

Providers (baselines first, then ours):

- ``official``: the INTL authors' formulation, eager: ``torch.matrix_power(P, 3)`` and
  ``addmm`` per step, autograd backward, one call per crop; computes in the input dtype;
- ``official_amp``: the same under fp16 autocast, as the authors train (float32 inputs);
- ``compiled``: ``torch.compile(iter_norm_ref, mode="max-autotune-no-cudagraphs")``,
  static shapes, one shape compiled at a time;
- ``eigh_zca`` / ``cholesky``: ZCA whitening by ``torch.linalg.eigh`` and Cholesky
  whitening (W = L⁻¹ by a triangular solve, as W-MSE does), autograd backward, float32
  inputs; a ridge of 1e-4 × the mean eigenvalue keeps rank-deficient S (N > D) factorable;
- ``iternorm_pytorch``: the IterNorm authors' layer (``IterNormPytorch``): permute copies
  in and out, ``baddbmm``/``matrix_power`` steps, hand-written backward;
- ``batchnorm``: ``nn.BatchNorm2d`` (cuDNN on GPU), the memory-pass anchor of the layer;
- ``products``: the layer's five c×c×n matrix products alone (float32), its compute floor;
- ``cublas``: the Newton part with ``torch.matmul`` (cuBLAS on GPU);
- ours, ``torch``, ``cpu``, ``triton``, ``cuda``: ``intl_kernels.iter_norm`` /
  ``intl_kernels.IterNorm`` with that backend, whichever ``intl_kernels.available_backends()``
  lists for the device.

Modes: ``fwd`` times the forward as a training step runs it (autograd records the graph);
``bwd`` runs the forward once when the case is built and times
``y.backward(dy, retain_graph=True)``; ``full`` times forward + ``backward(dy)``. ``dy`` is
a fixed random upstream gradient built here. ``Case.grads`` lists the leaves whose
``.grad`` the timer sets to None before each timed call, so no call accumulates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import intl_kernels
from intl_kernels import _backends
from python_ref import iter_norm_ref

T_CHANNEL = 4
T_LAYER = 5
GROUP = 64  # channels per group of the IterNorm layer
RIDGE = 1e-4
OPS = ("channel", "crops", "layer", "newton")
MODES = ("fwd", "bwd", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OURS = ("torch", "cpu", "triton", "cuda")
# Ratios in tables and goals are taken against this provider, measured in the same run.
BASELINE = {
    "channel": "official",
    "crops": "official",
    "layer": "iternorm_pytorch",
    "newton": "cublas",
    "train_step": "official",  # bench.train_step: the whole step
    "train_loss": "official",  # bench.train_step: its whitening+loss part
}
_FP32 = ("float32",)
_BOTH = tuple(DTYPES)


@dataclass(frozen=True)
class Provider:
    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    cpu_default: bool = True  # part of the default CPU grid


PROVIDERS: dict[str, Provider] = {
    "official": Provider(("channel", "crops"), _BOTH),
    # fp16 autocast, inductor's autotuning and cuBLAS are GPU matters (and slow on a CPU).
    "official_amp": Provider(("channel", "crops"), _FP32, cpu_default=False),
    "compiled": Provider(("channel",), _FP32, cpu_default=False),
    "eigh_zca": Provider(("channel", "crops"), _FP32),
    "cholesky": Provider(("channel", "crops"), _FP32),
    "iternorm_pytorch": Provider(("layer",), _BOTH),
    "batchnorm": Provider(("layer",), _BOTH),
    # The layer's five c×c×n products alone, float32: the floor of any implementation.
    "products": Provider(("layer",), _BOTH),
    "cublas": Provider(("newton",), _FP32, cpu_default=False),
    "torch": Provider(("channel", "crops", "layer"), _BOTH),
    "cpu": Provider(("channel", "crops", "layer"), _BOTH),
    "triton": Provider(("channel", "crops", "layer", "newton"), _BOTH),
    "cuda": Provider(("channel", "crops", "layer"), _BOTH),
}


def _backend_device(name: str) -> str | None:
    """Device type whose tensors backend ``name`` takes here (None: any)."""
    if name == "triton":
        return "cpu" if _backends.triton_interpret() else "cuda"
    return {"cpu": "cpu", "cuda": "cuda"}.get(name)


def available(device: str) -> list[str]:
    """Providers that run on ``device`` ("cpu" or "cuda") in this process."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    backends = intl_kernels.available_backends()
    names = []
    for name in PROVIDERS:
        if name in OURS and (name not in backends or _backend_device(name) not in (None, device)):
            continue
        names.append(name)
    return names


def default_providers(device: str) -> list[str]:
    """``available(device)`` less what the default CPU grid leaves out (official_amp, compiled, cublas)."""
    return [p for p in available(device) if device == "cuda" or PROVIDERS[p].cpu_default]


def check_provider(name: str, device: str) -> str:
    if name not in PROVIDERS:
        raise ValueError(f"provider must be one of {list(PROVIDERS)}, got {name!r}")
    if name not in available(device):
        raise ValueError(
            f"provider {name!r} does not run on {device} here (available: {available(device)}; "
            f"intl_kernels.available_backends() = {intl_kernels.available_backends()})"
        )
    return name


def runs(provider: str, op: str, dtype: str, shape: tuple[int, ...]) -> bool:
    """Whether ``provider`` takes part in workload ``op`` at ``dtype`` and ``shape``.

    A backend with a limit on the rows of one matrix (``cuda``: the small-group kernels)
    runs the shapes within it only: N rows for channel and crops, 64 for the layer.
    """
    p = PROVIDERS[provider]
    if op not in p.ops or dtype not in p.dtypes or (op == "newton" and dtype != "float32"):
        return False
    limit = getattr(_backends, "MAX_ROWS", {}).get(provider)
    rows = GROUP if op == "layer" else shape[-2] if op in ("channel", "crops") else shape[0]
    return limit is None or rows <= limit


# ---------------------------------------------------------------------------- channel whitening


def official_iter_norm(x: torch.Tensor, T: int = T_CHANNEL) -> torch.Tensor:
    """The INTL authors' channel whitening of one (N, D) batch, eager, autograd backward."""
    N, D = x.shape
    x = x - x.mean(dim=1, keepdim=True)
    sigma = x @ x.T / (D - 1)
    trace = sigma.diagonal().sum()
    sigma_norm = sigma / trace
    P = torch.eye(N, dtype=x.dtype, device=x.device)
    for _ in range(T):
        P = torch.addmm(P, torch.matrix_power(P, 3), sigma_norm, beta=1.5, alpha=-0.5)
    return P / trace.sqrt() @ x


def _per_crop(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: fn(x) if x.dim() == 2 else torch.stack([fn(v) for v in x.unbind(0)])


def _official_amp(x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.float16):
        y = _per_crop(official_iter_norm)(x)
    return y.to(x.dtype)


def _centred_covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Zc, S + ridge) of x: (..., N, D) in float32 (float64 stays): S = Zc Zcᵀ/(D − 1)."""
    z = x if x.dtype == torch.float64 else x.float()
    zc = z - z.mean(-1, keepdim=True)
    S = zc @ zc.mT / (z.shape[-1] - 1)
    ridge = RIDGE * S.diagonal(dim1=-2, dim2=-1).mean(-1)
    return zc, S + ridge[..., None, None] * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)


def eigh_zca(x: torch.Tensor) -> torch.Tensor:
    """ZCA whitening of the rows of x: (N, D) or (B, N, D): Y = U Λ^-1/2 Uᵀ Zc, S = U Λ Uᵀ."""
    zc, S = _centred_covariance(x)
    lam, U = torch.linalg.eigh(S)
    return ((U * lam.rsqrt().unsqueeze(-2)) @ U.mT @ zc).to(x.dtype)


def cholesky_whiten(x: torch.Tensor) -> torch.Tensor:
    """Cholesky whitening of the rows of x: (N, D) or (B, N, D): Y = L⁻¹ Zc, S = L Lᵀ."""
    zc, S = _centred_covariance(x)
    L = torch.linalg.cholesky(S)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    return (torch.linalg.solve_triangular(L, eye, upper=False) @ zc).to(x.dtype)


def _iter_norm_ref_t4(x: torch.Tensor) -> torch.Tensor:
    return iter_norm_ref(x, T_CHANNEL)


_COMPILED: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}


def _compiled(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.compile of the reference for x's shape and dtype (one at a time: no recompile limit)."""
    key = (tuple(x.shape), x.dtype, x.device.type)
    if key not in _COMPILED:
        torch._dynamo.reset()
        _COMPILED.clear()
        # mode "bwd" runs one backward graph repeatedly (retain_graph=True), which donated
        # buffers forbid.
        torch._functorch.config.donated_buffer = False
        _COMPILED[key] = torch.compile(_iter_norm_ref_t4, mode="max-autotune-no-cudagraphs", dynamic=False)
    return _COMPILED[key]


def channel_op(provider: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x: (N, D) or (B, N, D) → whitened rows, same shape, as ``provider`` does it."""
    if provider == "official":
        return _per_crop(official_iter_norm)
    if provider == "official_amp":
        return _official_amp
    if provider == "compiled":
        return _compiled(x)
    if provider == "eigh_zca":
        return eigh_zca
    if provider == "cholesky":
        return cholesky_whiten
    if provider in OURS:
        return lambda v: intl_kernels.iter_norm(v, T_CHANNEL, backend=provider)
    raise ValueError(f"provider must be one of the channel providers {_for_op('channel')}, got {provider!r}")


# ---------------------------------------------------------------------------- IterNorm layer


class _IterNormPytorchFn(torch.autograd.Function):
    """The IterNorm authors' group whitening: permute copy, Newton steps, hand-written backward.

    Forward, per group of c channels, x: (G, c, m) with m = N·H·W:
        Σ = eps·I + Xc Xcᵀ/m,  r = 1/tr Σ,  Σ_N = r·Σ,  P_{k+1} = 1.5 P_k − 0.5 P_k³ Σ_N,
        W = √r · P_T,  Y = W Xc.
    Backward: the chain rule through those steps with the saved P_k (Huang et al. 2019,
    Section 3.2), no symmetrisation of the adjoints.
    """

    @staticmethod
    def forward(ctx, X, running_mean, running_wm, c, T, eps, momentum):
        N, C = X.shape[:2]
        g = C // c
        x = X.transpose(0, 1).contiguous().view(g, c, -1)
        m = x.shape[2]
        mean = x.mean(-1, keepdim=True)
        xc = x - mean
        eye = torch.eye(c, dtype=x.dtype, device=x.device).expand(g, c, c)
        sigma = torch.baddbmm(eye, xc, xc.transpose(1, 2), beta=eps, alpha=1.0 / m)
        r_tr = (sigma * eye).sum((1, 2), keepdim=True).reciprocal()
        sigma_n = sigma * r_tr
        P = [eye]
        for k in range(T):
            P.append(torch.baddbmm(P[k], torch.matrix_power(P[k], 3), sigma_n, beta=1.5, alpha=-0.5))
        wm = P[T] * r_tr.sqrt()
        running_mean.copy_(momentum * mean.detach() + (1.0 - momentum) * running_mean)
        running_wm.copy_(momentum * wm.detach() + (1.0 - momentum) * running_wm)
        xn = wm.matmul(xc)
        ctx.save_for_backward(xc, r_tr, sigma_n, wm, *P[1:T])
        return xn.view(C, N, *X.shape[2:]).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        xc, r_tr, sigma_n, wm, *P = ctx.saved_tensors
        g, c, m = xc.shape
        g_y = grad.transpose(0, 1).contiguous().view_as(xc)
        g_wm = g_y.matmul(xc.transpose(1, 2))
        g_r = (g_wm * wm).sum((1, 2), keepdim=True) * (0.5 / r_tr)  # W = √r·P_T
        g_p = g_wm * r_tr.sqrt()
        g_sn = torch.zeros_like(sigma_n)
        for pk in reversed(P):  # P_{T-1} … P_1; the step from P_0 = I is below
            p2 = pk.matmul(pk)
            g_sn.baddbmm_(p2.matmul(pk), g_p, alpha=-0.5)
            gs = g_p.matmul(sigma_n)
            term = gs.matmul(p2)
            term.baddbmm_(pk.matmul(gs), pk).baddbmm_(p2, gs)
            g_p = torch.add(1.5 * g_p, term, alpha=-0.5)
        g_sn.add_(g_p, alpha=-0.5)
        g_r += (g_sn * sigma_n).sum((1, 2), keepdim=True) / r_tr  # Σ_N = r·Σ
        g_sigma = g_sn * r_tr - (g_r * r_tr * r_tr) * torch.eye(c, dtype=xc.dtype, device=xc.device)
        g_x = torch.baddbmm(
            wm.matmul(g_y - g_y.mean(-1, keepdim=True)), g_sigma + g_sigma.transpose(1, 2), xc, alpha=1.0 / m
        )
        return g_x.view(grad.shape[1], grad.shape[0], *grad.shape[2:]).transpose(0, 1).contiguous(), *[
            None
        ] * 6


class IterNormPytorch(nn.Module):
    """The IterNorm authors' PyTorch layer (training path), written from their published method.

    Channels are split into groups of ``num_channels`` (halved until it divides C); per
    group the forward whitens over N·H·W columns taken by a permute copy, updates
    ``running_mean`` (g, c, 1) and ``running_wm`` (g, c, c), and the per-channel affine
    follows in autograd. Same outputs and gradients as ``python_ref.IterNormRef``, whose
    backward is autograd through the loop.

    Args:
        num_features: C.
        num_channels: c, channels per group.
        T: Newton steps.
        eps: ridge of each group's covariance.
        momentum: weight of the batch statistics in the running averages.
    """

    def __init__(
        self, num_features: int, num_channels: int = GROUP, T: int = T_LAYER, eps: float = 1e-5, momentum=0.1
    ) -> None:
        super().__init__()
        while num_features % num_channels:
            num_channels //= 2
        self.num_channels, self.T, self.eps, self.momentum = num_channels, T, eps, momentum
        g = num_features // num_channels
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.register_buffer("running_mean", torch.zeros(g, num_channels, 1))
        self.register_buffer(
            "running_wm", torch.eye(num_channels).expand(g, num_channels, num_channels).clone()
        )

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        y = _IterNormPytorchFn.apply(
            X, self.running_mean, self.running_wm, self.num_channels, self.T, self.eps, self.momentum
        )
        return (y * self.weight + self.bias).to(X.dtype)


def layer_module(provider: str, C: int) -> nn.Module:
    """The layer ``provider`` times for C channels (64 per group), in training mode."""
    if provider == "iternorm_pytorch":
        module = IterNormPytorch(C)
    elif provider == "batchnorm":
        module = nn.BatchNorm2d(C)
    elif provider in OURS:
        module = intl_kernels.IterNorm(C, num_channels=GROUP, T=T_LAYER, backend=provider)
    else:
        raise ValueError(f"provider must be one of the layer providers {_for_op('layer')}, got {provider!r}")
    return module.train()


def layer_products(
    shape: tuple[int, ...], mode: str, device: str, g: torch.Generator
) -> Callable[[], object]:
    """The matrix products every IterNorm layer performs, alone, in float32 (the statistics'
    dtype): forward S = Zc Zcᵀ and Y = W Zc; backward Ȳ Zcᵀ and Z̄ = W Ȳ + M Zc; per group
    of 64 channels over n = N·H·W columns. What the layer costs above this is memory passes."""
    N, C = shape[:2]
    G, n = C // GROUP, N * math.prod(shape[2:])

    def rand(*size):
        return torch.randn(size, generator=g, device=device)

    zc, dy, W, M = rand(G, GROUP, n), rand(G, GROUP, n), rand(G, GROUP, GROUP), rand(G, GROUP, GROUP)

    def fwd():
        return torch.bmm(zc, zc.mT), torch.bmm(W, zc)

    def bwd():
        return torch.bmm(dy, zc.mT), torch.baddbmm(torch.bmm(W, dy), M, zc)

    return {"fwd": fwd, "bwd": bwd, "full": lambda: (fwd(), bwd())}[mode]


# ---------------------------------------------------------------------------- Newton part


def _newton_op(provider: str, r: int, device: str) -> Callable[[], object]:
    """Newton part from a fixed covariance S (one group): (τ, A, P_1..P_T, P_1²..P_{T-1}²)."""
    if device == "meta":  # launch recording: shapes only
        S = torch.empty(1, r, r, device=device)
    else:
        g = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(1, r, 2 * r, generator=g).to(device)
        zc = z - z.mean(-1, keepdim=True)
        S = (zc @ zc.mT / (2 * r - 1)).contiguous()
    if provider == "triton":
        from intl_kernels.triton.whiten import _whiten_newton_fwd

        trp = torch.zeros(1, max(1, -(-r // 64)), device=device)
        trp[0, 0] = S.diagonal(dim1=1, dim2=2).sum()  # the trace partials the gram kernel leaves
        return lambda: _whiten_newton_fwd(S, trp, T_CHANNEL, "ieee")
    if provider != "cublas":
        raise ValueError(
            f"provider must be one of the newton providers {_for_op('newton')}, got {provider!r}"
        )
    eye = torch.eye(r, device=device)

    def cublas():
        tau = S.diagonal(dim1=1, dim2=2).sum(-1).view(1, 1, 1)
        A = S / tau
        P = 1.5 * eye - 0.5 * A
        Ps, Xs = [P], []
        for _ in range(1, T_CHANNEL):
            X = P @ P
            Xs.append(X)
            P = 1.5 * P - 0.5 * P @ (X @ A)
            Ps.append(P)
        return tau, A, Ps, Xs

    return cublas


# ---------------------------------------------------------------------------- cases


def _for_op(op: str) -> list[str]:
    return [p for p, spec in PROVIDERS.items() if op in spec.ops]


@dataclass
class Case:
    """``fn()`` is what is timed; ``grads`` are the leaves cleared (``.grad = None``) before each call."""

    fn: Callable[[], object]
    grads: list[torch.Tensor] = field(default_factory=list)


def expected_ndim(op: str) -> int:
    return {"channel": 2, "crops": 3, "layer": 4, "newton": 1}[op]


def make_case(
    op: str, provider: str, shape: tuple[int, ...], dtype: str, mode: str, device: str, *, seed: int = 0
) -> Case:
    """Build the inputs of one benchmark point and return what to time.

    Args:
        op: "channel", "crops", "layer" or "newton".
        provider: a name of ``PROVIDERS`` that runs ``op``.
        shape: (N, D) for channel, (B, N, D) for crops, (N, C, H, W) for layer, (r,) for newton.
        dtype: "float32" or "bfloat16" (the input's dtype).
        mode: "fwd", "bwd" or "full" ("fwd" only for newton).
        device: "cpu" or "cuda"; "meta" builds shape-only inputs, for recording the launches
            a point makes (``intl_kernels.triton.launches``).
        seed: seed of the standard normal input and upstream gradient.

    Returns:
        Case(fn, grads).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if provider not in _for_op(op):
        raise ValueError(f"provider must be one of the {op} providers {_for_op(op)}, got {provider!r}")
    if len(shape) != expected_ndim(op) or min(shape) < 1:
        raise ValueError(f"shape must have {expected_ndim(op)} positive sizes for op {op!r}, got {shape}")
    if op == "newton":
        if mode != "fwd" or dtype != "float32":
            raise ValueError(f"op 'newton' runs mode 'fwd' in float32 only, got {mode!r}, {dtype!r}")
        return Case(_newton_op(provider, shape[0], device))
    g = torch.Generator(device=device).manual_seed(seed) if device != "meta" else None
    if provider == "products":
        return Case(layer_products(shape, mode, device, g))
    x = torch.randn(shape, generator=g, device=device).to(DTYPES[dtype]).requires_grad_(True)
    dy = torch.randn(shape, generator=g, device=device).to(DTYPES[dtype])
    if op == "layer":
        forward = layer_module(provider, shape[1]).to(device)
        leaves = [x, *forward.parameters()]
    else:
        forward = channel_op(provider, x)
        leaves = [x]
    if mode == "fwd":
        return Case(lambda: forward(x), leaves)
    if mode == "full":
        return Case(lambda: forward(x).backward(dy), leaves)
    y = forward(x)
    return Case(lambda: y.backward(dy, retain_graph=True), leaves)
