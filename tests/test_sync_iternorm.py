"""SyncIterNorm: IterNorm statistics over a process group, against one process holding the global
batch (two gloo processes), and convert_batchnorm's handling of SyncBatchNorm."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn

import intl_kernels as ik

WORLD = 2
C, GROUP = 8, 4
SHAPES = {"dim4": (3, C, 3, 4), "dim2": (5, C)}  # per rank


def _inputs(dim: str, dtype, channels_last: bool):
    """Global (x, dy) and the layer's affine parameters, the same in every process."""
    g = torch.Generator().manual_seed(7)
    shape = SHAPES[dim]
    glob = (WORLD * shape[0], *shape[1:])
    x = (torch.randn(glob, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    dy = torch.randn(glob, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    return x, dy, w, b


def _layer(cls, dim: str, dtype, w, b, **kwargs):
    layer = cls(C, num_channels=GROUP, dim=4 if dim == "dim4" else 2, **kwargs).to(dtype)
    with torch.no_grad():
        layer.weight.view(-1).copy_(w)
        layer.bias.view(-1).copy_(b)
    return layer


def _step(layer, x, dy):
    x = x.detach().requires_grad_()
    y = layer(x)
    dx, dw, db = torch.autograd.grad(y, [x, layer.weight, layer.bias], dy)
    fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format
    return {
        "y": y.detach(), "dx": dx, "dw": dw, "db": db,
        "contiguous_like_x": y.is_contiguous(memory_format=fmt),
        "running_mean": layer.running_mean.clone(), "running_wm": layer.running_wm.clone(),
    }  # fmt: skip


CASES = [("dim4", torch.float64, False), ("dim4", torch.float32, True), ("dim2", torch.float64, False)]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for dim, dtype, cl in CASES:
            x, dy, w, b = _inputs(dim, dtype, cl)
            n = SHAPES[dim][0]
            rows = slice(rank * n, (rank + 1) * n)
            layer = _layer(ik.SyncIterNorm, dim, dtype, w, b)
            results[(dim, str(dtype), cl)] = [_step(layer, x[rows], dy[rows]) for _ in range(2)]
        # convert_batchnorm turns SyncBatchNorm into a SyncIterNorm that trains under the group
        torch.manual_seed(0)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)))
        ik.convert_batchnorm(model)
        x = torch.randn(WORLD * 3, 3, 4, 4, generator=torch.Generator().manual_seed(3))
        xr = x[rank * 3 : (rank + 1) * 3].requires_grad_()
        model(xr).square().sum().backward()
        results["converted"] = (type(model[1]).__name__, xr.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for dim, dtype, cl in CASES:
        x, dy, w, b = _inputs(dim, dtype, cl)
        ref = _layer(ik.IterNorm, dim, dtype, w, b, backend="torch")
        expected = [_step(ref, x, dy) for _ in range(2)]
        # float64: rounding only (sums in another order); float32: a few ulps of O(1) values
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
        n = SHAPES[dim][0]
        for step, want in enumerate(expected):
            what = f"{dim} {dtype} channels_last={cl} step {step}"
            for rank in range(WORLD):
                have = got[rank][(dim, str(dtype), cl)][step]
                rows = slice(rank * n, (rank + 1) * n)
                assert have["contiguous_like_x"], what
                torch.testing.assert_close(have["y"], want["y"][rows], **tol, msg=f"{what} y rank {rank}")
                torch.testing.assert_close(have["dx"], want["dx"][rows], **tol, msg=f"{what} dx rank {rank}")
                for k in ("running_mean", "running_wm"):  # the global statistics, on every rank
                    torch.testing.assert_close(have[k], want[k], **tol, msg=f"{what} {k} rank {rank}")
            for k in ("dw", "db"):  # each rank's parameter gradient is its rows' share: they sum up
                total = sum(got[r][(dim, str(dtype), cl)][step][k] for r in range(WORLD))
                torch.testing.assert_close(total, want[k], **tol, msg=f"{what} {k}")
    names = {got[r]["converted"][0] for r in range(WORLD)}
    assert names == {"SyncIterNorm"}
    for r in range(WORLD):
        assert torch.isfinite(got[r]["converted"][1]).all() and got[r]["converted"][1].abs().max() > 0


def test_sync_layer_is_an_iternorm_in_one_process():
    torch.manual_seed(0)
    x = torch.randn(4, C, 3, 3, dtype=torch.float64)
    a = ik.SyncIterNorm(C, num_channels=GROUP).double()
    b = ik.IterNorm(C, num_channels=GROUP).double()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    torch.testing.assert_close(a.running_wm, b.running_wm, rtol=0, atol=0)
