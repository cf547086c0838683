"""INTL loss: two-view and multi-crop forms, EMA target, batching, module form (CPU)."""

from __future__ import annotations

import pytest
import torch

import intl_kernels as ik
from intl_kernels import _backends
from python_ref import intl_loss_ref, intl_multicrop_loss_ref


def _embeddings(V, N=24, D=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(N, D, generator=g, dtype=torch.float64)
    views = [torch.randn(N, D, generator=g, dtype=torch.float64) + 0.3 * target for _ in range(V)]
    return target, views


@pytest.mark.parametrize("ema", [False, True], ids=["view0-target", "ema-target"])
@pytest.mark.parametrize("V", [1, 5])
def test_multicrop_matches_authors_loop(V, ema):
    target, views = _embeddings(V)
    t = target.clone().requires_grad_(not ema)
    vs = [v.clone().requires_grad_() for v in views]
    loss = ik.intl_loss(t, vs, trade_off=0.05)
    tr = target.clone().requires_grad_(not ema)
    vr = [v.clone().requires_grad_() for v in views]
    loss_ref = intl_multicrop_loss_ref(tr, vr, trade_off=0.05, ema=ema)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    inputs, inputs_ref = vs + ([] if ema else [t]), vr + ([] if ema else [tr])
    grads = torch.autograd.grad(loss, inputs)
    grads_ref = torch.autograd.grad(loss_ref, inputs_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_two_view_form_and_default_trade_off():
    z1, (z2,) = _embeddings(1, N=32)
    torch.testing.assert_close(ik.intl_loss(z1, z2), intl_loss_ref(z1, z2), rtol=1e-10, atol=1e-12)
    # the two-view form is the multi-crop form with one view and no EMA
    torch.testing.assert_close(ik.intl_loss(z1, z2), ik.intl_loss(z1, [z2], ema_target=False))


def test_ema_inference_and_override():
    target, views = _embeddings(3)
    vs = [v.requires_grad_() for v in views]
    ema = ik.intl_loss(target, vs, trade_off=0.1)  # target without grad, views with: EMA
    torch.testing.assert_close(ema, intl_multicrop_loss_ref(target, views, trade_off=0.1, ema=True))
    forced = ik.intl_loss(target, vs, trade_off=0.1, ema_target=False)
    torch.testing.assert_close(forced, intl_multicrop_loss_ref(target, views, trade_off=0.1, ema=False))
    with torch.no_grad():  # nothing needs a gradient (e.g. a validation loss): no EMA
        plain = ik.intl_loss(target, views, trade_off=0.1)
    torch.testing.assert_close(plain, forced)


class _Counting:
    """Counts the calls of a backend's forward and records the batch sizes G."""

    def __init__(self, name):
        self.name, self.fwd, self.bwd = name, *_backends.kernels(name)
        self.G = []

    def __call__(self, z, *args):
        self.G.append(z.shape[0])
        return self.fwd(z, *args)


@pytest.mark.parametrize("ema", [False, True])
def test_views_whitened_in_one_batched_call(monkeypatch, ema):
    counting = _Counting("torch")
    monkeypatch.setitem(_backends._KERNELS, "torch", (counting, counting.bwd))
    target, views = _embeddings(5)
    vs = [v.requires_grad_() for v in views]
    ik.intl_loss(target.requires_grad_(not ema), vs, backend="torch").backward()
    assert counting.G == ([5, 1] if ema else [6])


def test_module_forms():
    target, views = _embeddings(2)
    loss_fn = ik.INTLLoss(trade_off=0.02)
    torch.testing.assert_close(loss_fn(target, views[0]), ik.intl_loss(target, views[0], trade_off=0.02))
    torch.testing.assert_close(loss_fn(target, views), ik.intl_loss(target, views, trade_off=0.02))
    assert "trade_off=0.02" in repr(loss_fn) and "T=4" in repr(loss_fn)


BAD = [
    ("shape", lambda: ik.intl_loss(torch.randn(8, 4), [torch.randn(8, 4), torch.randn(8, 5)]), ValueError,
     r"target and views\[1\] must have the same shape"),
    ("empty", lambda: ik.intl_loss(torch.randn(8, 4), []), TypeError, "non-empty list of tensors"),
    ("type", lambda: ik.intl_loss(torch.randn(8, 4), 3.0), TypeError, "got float"),
    ("ndim", lambda: ik.intl_loss(torch.randn(8, 4, 2), torch.randn(8, 4, 2)), ValueError, "z1 must be 2-D"),
    ("T", lambda: ik.INTLLoss(T=0), ValueError, "INTLLoss: T must be >= 1"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, make, exc, msg = case
    with pytest.raises(exc, match=msg):
        make()


def test_torch_compile_multicrop_loss():
    torch._dynamo.reset()
    loss_fn = ik.INTLLoss(trade_off=0.05)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    target, views = _embeddings(3)
    target, views = target.float(), [v.float().requires_grad_() for v in views]
    loss = compiled(target, views)
    grads = torch.autograd.grad(loss, views)
    loss_e = loss_fn(target, views)
    grads_e = torch.autograd.grad(loss_e, views)
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(a, b)
