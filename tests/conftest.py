"""Shared test helpers: backends under test, the tolerance rule, verbose comparisons."""

from __future__ import annotations

import os
import socket

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (small
# shapes only). Triton reads this when the kernels are decorated, so it is set before
# intl_kernels (which loads them lazily) is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import intl_kernels as ik  # noqa: E402
from intl_kernels import _backends  # noqa: E402
from intl_kernels.testing import assert_tolerance_rule, describe_error, max_err  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    # Slow tests first (stable otherwise): with several workers (make test) the long ones start
    # at once and the short ones fill in around them, instead of one long test ending the run.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


CPU_BACKENDS = [b for b in ik.available_backends() if b in ("torch", "cpu")]
HAS_TRITON = "triton" in ik.available_backends()
# Backends whose float32 results the shared correctness tests check (triton included).
FP32_BACKENDS = CPU_BACKENDS + (["triton"] if HAS_TRITON else [])
TRITON_DEVICE = "cpu" if _backends.triton_interpret() else "cuda"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable here")


def backend_device(backend: str) -> str:
    """Device of the tensors a backend takes in this process."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


# atol of the tolerance rule for whiten outputs and gradients: a few float32 ulps of O(1)
# values; half inputs compare after the output rounding, which the reference at input
# precision also pays.
WHITEN_ATOL = {torch.float32: 1e-5, torch.bfloat16: 0.0, torch.float16: 0.0}


def output_and_grad(fn, z: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(z), the gradient of ⟨fn(z), dy⟩ with respect to z), both detached."""
    z = z.detach().requires_grad_()
    y = fn(z)
    (dz,) = torch.autograd.grad(y, z, dy)
    return y.detach(), dz


def check_whiten_against_reference(fn, z, dy, T: int, eps: float, divisor: float, what: str = "") -> None:
    """``fn`` (a whiten implementation of z) against ``python_ref.whiten_ref`` at z's
    precision and upcast to float64, under the tolerance rule, for Y and dZ."""
    from python_ref import whiten_ref

    y, dz = output_and_grad(fn, z, dy)
    y_lp, dz_lp = output_and_grad(lambda t: whiten_ref(t, T, eps=eps, divisor=divisor), z, dy)
    y64, dz64 = output_and_grad(lambda t: whiten_ref(t, T, eps=eps, divisor=divisor, upcast=True), z, dy)
    atol = WHITEN_ATOL[z.dtype]
    assert_tolerance_rule(y, y_lp, y64.to(z.dtype), atol, what + "y")
    assert_tolerance_rule(dz, dz_lp, dz64.to(z.dtype), atol, what + "dz")


# Property tests: a fixed example sequence in CI (a red run must be reproducible), fresh
# random examples on developer machines (where they keep finding new corners). hypothesis is
# optional: without it the property tests skip (test_robustness.py), the rest still runs.
try:
    from hypothesis import settings
except ImportError:
    settings = None
if settings is not None:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    settings.load_profile("ci" if os.environ.get("CI") else "default")


def check_compiled_intl_loss(backend: str, device: str, compile_backend: str | None) -> None:
    """torch.compile(fullgraph=True) of intl_loss on ``backend``: loss and gradient as eager."""
    torch._dynamo.reset()

    def step(x1, x2):
        return ik.intl_loss(x1, x2, trade_off=0.05, backend=backend)

    kwargs = {} if compile_backend is None else {"backend": compile_backend}
    compiled = torch.compile(step, fullgraph=True, **kwargs)
    x1 = torch.randn(12, 20, device=device, requires_grad=True)
    x2 = torch.randn(12, 20, device=device)
    loss = compiled(x1, x2)
    (g,) = torch.autograd.grad(loss, x1)
    x1e = x1.detach().requires_grad_()
    loss_e = step(x1e, x2)
    (ge,) = torch.autograd.grad(loss_e, x1e)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, ge)


def free_port() -> int:
    """A TCP port free on the loopback now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """Restores torch's thread count after a test that sets it (the trainers' --threads)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
