"""Two gloo processes: gathered whitening and the INTL loss equal single-process training on
the global batch (INTL whitens the global batch on every rank)."""

from __future__ import annotations

import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import intl_kernels as ik

if dist.is_available():
    # Imported here, before any process group exists. DDP's constructor imports torch._dynamo,
    # which imports this module, whose functions take ``group=group.WORLD`` as a default argument
    # (evaluated at import). Imported after init_process_group it would hold the world group past
    # destroy_process_group, to be freed only in interpreter finalization, its gloo threads still
    # running: the workers' SIGABRT ("terminate called without an active exception") under load.
    import torch.distributed.nn.functional  # noqa: F401

WORLD = 2
N, D_IN, D = 8, 6, 12  # rows per rank, input and embedding features


def _data():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(WORLD * N, D_IN, generator=g, dtype=torch.float64) for _ in range(4)]
    return xs  # x1, x2 (two views), and two more crops for the multi-crop form


def _model():
    torch.manual_seed(0)
    return nn.Linear(D_IN, D).double()


def _losses(model, xs, ema_model):
    """(two-view loss, multi-crop loss with an EMA target) on whatever rows xs hold."""
    two_view = ik.INTLLoss()(model(xs[0]), model(xs[1]))
    with torch.no_grad():
        target = ema_model(xs[0])
    multi = ik.INTLLoss(T=5)(target, [model(x) for x in xs[1:]])
    return two_view, multi


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _rank_results(rank):
    """This rank's (loss, grads) per form and its rows of the whitened batch. The DDP models (whose
    reducers hold the process group) live only in this frame: gone when it returns."""
    rows = slice(rank * N, (rank + 1) * N)
    xs = [x[rows] for x in _data()]
    result = {}
    for form in ("two_view", "multi"):
        model, ema = DDP(_model()), _model()
        two_view, multi = _losses(model, xs, ema)
        loss = two_view if form == "two_view" else multi
        loss.backward()
        result[form] = (loss.detach(), _grads(model.module))
    z = _model()(_data()[0]).detach()
    result["whitened_rows"] = ik.ChannelWhitening()(z[rows])
    return result


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    world = weakref.ref(dist.group.WORLD)
    try:
        result = _rank_results(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank is past its last collective before any rank tears down
    finally:
        dist.destroy_process_group()
    # Nothing else holds the group: it (and its gloo threads) went with destroy_process_group, while
    # the interpreter is alive, not in interpreter finalization at exit.
    assert world() is None, "the process group outlived destroy_process_group"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_gathered_loss_and_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    xs = _data()
    expected = {}
    for form in ("two_view", "multi"):
        model, ema = _model(), _model()
        two_view, multi = _losses(model, xs, ema)
        loss = two_view if form == "two_view" else multi
        loss.backward()
        expected[form] = (loss.detach(), _grads(model))
    whitened = ik.iter_norm(_model()(xs[0]).detach())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for form, (loss, grads) in expected.items():
            torch.testing.assert_close(
                got[form][0], loss, rtol=1e-6, atol=1e-6, msg=f"rank {rank} {form} loss"
            )
            for a, b in zip(got[form][1], grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"rank {rank} {form} grad")
        rows = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(got["whitened_rows"], whitened[rows], rtol=1e-6, atol=1e-6)
