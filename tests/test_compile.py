"""torch.compile gives eager's values and gradients on every backend (docs/design.md §5).

torch 2.11's compile hands a zero gradient to an autograd.Function whose forward returns the
output of a no-op op (``.to`` of the same dtype, ``.contiguous()`` of a contiguous tensor, an
in-place copy), with every compile backend, "eager" included. These tests compare compiled and
eager results of the IterNorm layer (NCHW and channels_last, affine folded into the op or not),
of ``intl_loss`` and of ``whiten`` for each backend this process has, under the "eager" and
"aot_eager" compile backends; they run in the side environments of ``make test-torch`` too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE
from torch import nn

import intl_kernels as ik
from intl_kernels import _backends

DEVICE = {"torch": "cpu", "cpu": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}
BACKENDS = ik.available_backends()
COMPILERS = ["eager", "aot_eager"]


def _grads_nonzero(grads) -> None:
    """The failure these tests guard against returns zeros where eager's gradient is not."""
    for g in grads:
        assert g is not None and g.abs().max() > 0, "a compiled gradient is all zero"


def _model(backend: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), ik.IterNorm(16, num_channels=8, backend=backend),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 8, 1), ik.IterNorm(8, num_channels=8, affine=False, backend=backend),
    ).to(device)  # fmt: skip


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_compiled_matches_eager(backend, channels_last, compiler):
    device = DEVICE[backend]
    torch._dynamo.reset()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, 6, 6, device=device).to(memory_format=fmt)
    eager, compiled_model = _model(backend, device), _model(backend, device)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    outs = []
    for model, run in ((eager, eager), (compiled_model, compiled)):
        xi = x.detach().requires_grad_()
        y = run(xi)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
        grads = torch.autograd.grad(y, [xi, *model.parameters()], dy)
        outs.append((y.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}))
    (y_e, g_e, s_e), (y_c, g_c, s_c) = outs
    torch.testing.assert_close(y_c, y_e)
    assert y_c.is_contiguous(memory_format=fmt), "the output keeps the input's layout"
    _grads_nonzero(g_c)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b)
    for k in s_e:  # running statistics updated by the compiled step as by the eager one
        torch.testing.assert_close(s_c[k], s_e[k])


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_intl_loss_compiled_matches_eager(backend, compiler):
    device = DEVICE[backend]
    if backend == "cuda":
        pytest.skip("intl_loss whitens the batch (r = N rows); the cuda backend is the layer's")
    torch._dynamo.reset()

    def step(a, b):
        return ik.intl_loss(a, b, trade_off=0.05, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    gen = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(12, 20, generator=gen).to(device) for _ in range(2))
    results = []
    for fn in (step, compiled):
        a, b = x1.detach().requires_grad_(), x2.detach().requires_grad_()
        loss = fn(a, b)
        results.append((loss.detach(), torch.autograd.grad(loss, (a, b))))
    (l_e, g_e), (l_c, g_c) = results
    torch.testing.assert_close(l_c, l_e)
    _grads_nonzero(g_c)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_whiten_compiled_matches_eager(backend):
    device = DEVICE[backend]
    torch._dynamo.reset()
    z = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(0)).to(device)
    dy = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def fn(t):
        return ik.whiten(t, 4, backend=backend)

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        zi = z.detach().requires_grad_()
        y = f(zi)
        results.append((y.detach(), torch.autograd.grad(y, zi, dy)[0]))
    (y_e, g_e), (y_c, g_c) = results
    torch.testing.assert_close(y_c, y_e)
    _grads_nonzero([g_c])
    torch.testing.assert_close(g_c, g_e)


def test_backend_env_var_is_read_when_compiling(monkeypatch):
    """A compiled call resolves ``backend="auto"`` without tracing os.environ: a bad value of
    INTL_KERNELS_BACKEND is the same clear error as in eager mode, and a good one is used."""
    torch._dynamo.reset()
    monkeypatch.setenv(_backends.ENV_VAR, "fast")
    x = torch.randn(8, 6)

    def fn(t):
        return ik.iter_norm(t)

    with pytest.raises(ValueError, match="environment variable INTL_KERNELS_BACKEND must be"):
        fn(x)
    with pytest.raises(Exception, match="environment variable INTL_KERNELS_BACKEND must be"):
        torch.compile(fn, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
    monkeypatch.setenv(_backends.ENV_VAR, "torch")
    torch.testing.assert_close(
        torch.compile(fn, fullgraph=True, backend="eager")(x), ik.iter_norm(x, backend="torch")
    )


def test_constant_marker_is_the_one_torch_compile_reads():
    """``constant_when_compiled`` sets what torch.compiler.assume_constant_result sets in this
    torch (so the environment read is a trace-time constant), without importing dynamo."""

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    ours = _backends.constant_when_compiled(lambda: 0)
    assert vars(ours) == vars(marked) == {"_dynamo_marked_constant": True}
    assert _backends.backend_from_env._dynamo_marked_constant is True
