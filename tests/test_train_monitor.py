"""The collapse alarm looks at the global batch (one process and two gloo processes), and a
torch.compile'd training step equals the eager one (CPU, tiny shapes)."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

pytest.importorskip("torchvision", reason="the training tests need torchvision")
from test_train import TINY, make_image_folder  # noqa: E402

from train import monitor, pretrain  # noqa: E402

WORLD, N, D = 2, 8, 32  # ranks, rows per rank, embedding features


def _embeddings(kind: str) -> torch.Tensor:
    """(WORLD·N, D) rows: ``healthy`` (Gaussian), ``rank3`` (three equal directions plus a little
    noise: effective rank ~3 of at most min(16 − 1, 32) = 15)."""
    g = torch.Generator().manual_seed(0)
    if kind == "healthy":
        return torch.randn(WORLD * N, D, generator=g)
    basis = torch.linalg.qr(torch.randn(D, 3, generator=g)).Q.T  # 3 orthonormal directions
    return torch.randn(WORLD * N, 3, generator=g) @ basis + 1e-4 * torch.randn(WORLD * N, D, generator=g)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {}
        for kind in ("healthy", "rank3"):
            rows = _embeddings(kind)[rank * N : (rank + 1) * N]
            result[kind] = monitor.global_spectrum(rows, 1, 0.3)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_collapse_alarm_sees_the_global_batch_of_two_gloo_processes(tmp_path, capsys):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert rank1 == {"healthy": None, "rank3": None}  # rank 0 alone computes and warns
    healthy, collapsed = rank0["healthy"], rank0["rank3"]
    assert healthy["rank_bound"] == collapsed["rank_bound"] == WORLD * N - 1  # the global batch's
    assert not healthy["collapsed"] and healthy["erank"] > 0.3 * 15
    assert collapsed["collapsed"] and collapsed["erank"] < 3.01
    # Each rank's own 8 rows would not have fired: their bound is min(8 − 1, 32) = 7, the limit 2.1.
    for r in range(WORLD):
        local = monitor.spectrum(_embeddings("rank3")[r * N : (r + 1) * N])
        assert local["rank_bound"] == N - 1 and local["erank"] > 0.3 * (N - 1)
    # The same numbers in one process on the whole batch.
    single = monitor.global_spectrum(_embeddings("rank3"), 1, 0.3)
    assert single["collapsed"] and single["erank"] == pytest.approx(collapsed["erank"], rel=1e-9)
    assert "warning: step 1: effective rank of the embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [1, 2])
def test_default_alarm_fires_on_a_low_rank_batch_of_the_readme_size(rank, capsys):
    # 8 GPUs × 64 images: r = min(512 − 1, 1024) = 511, the limit 0.02 × 511 = 10.2.
    g = torch.Generator().manual_seed(rank)
    z = torch.randn(512, rank, generator=g) @ torch.randn(rank, 1024, generator=g)
    stats = monitor.global_spectrum(z, 7, 0.02)
    assert stats["rank_bound"] == 511 and stats["erank"] <= rank + 1e-6 and stats["collapsed"]
    healthy = monitor.global_spectrum(torch.randn(512, 1024, generator=g), 7, 0.02)
    assert not healthy["collapsed"] and healthy["erank"] > 100
    assert capsys.readouterr().err.count("may be collapsing") == 1


def test_compiled_training_step_equals_eager(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8, size=16)
    args = ["--data", str(data), *TINY, "--crop-size", "16", "--batch-size", "8", "--max-steps", "2"]
    threads = torch.get_num_threads()
    try:
        pretrain.main([*args, "--exp-dir", str(tmp_path / "eager")])
        # aot_eager: TorchDynamo's graph capture and AOTAutograd's joint forward/backward graph (what
        # --compile changes in the training step) without Inductor's code generation, which takes
        # ~70 s for this model on one CPU core; Inductor's kernels are torch's own concern.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        pretrain.main([*args, "--exp-dir", str(tmp_path / "compiled"), "--compile", "aot_eager"])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    finally:
        torch.set_num_threads(threads)

    def loaded(name):
        rows = [json.loads(line) for line in (tmp_path / name / "stats.jsonl").read_text().splitlines()]
        state = torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)["model"]
        return [r["loss"] for r in rows if "loss" in r], state

    (loss_e, model_e), (loss_c, model_c) = loaded("eager"), loaded("compiled")
    # Measured bitwise equal (torch 2.14, CPU). The tolerance admits what a compiled graph may do
    # on other versions, backends or devices: ops fused or decomposed (batch norm and its backward)
    # that sum in another order, i.e. float32 rounding, grown over 2 SGD steps. Inductor, measured
    # once on this setup: losses within 6e-7 relative, parameters within 7e-7 absolute.
    torch.testing.assert_close(torch.tensor(loss_c), torch.tensor(loss_e), rtol=1e-5, atol=1e-6)
    assert model_c.keys() == model_e.keys()
    for k in model_e:
        torch.testing.assert_close(
            model_c[k], model_e[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_sparse_lines_elsewhere():
    log = io.StringIO()
    bar = monitor.Progress(10, 2, "run step", interval=3600, stream=log)
    for i in range(8):
        bar.update(1, loss=f"{i:.1f}")
    bar.close()
    lines = log.getvalue().splitlines()
    # The first update and the last one (an hour between lines otherwise), no carriage returns.
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0].startswith("run step: 3/10 (30%), loss 0.0, elapsed ")
    assert lines[1].startswith("run step: 10/10 (100%), loss 7.0, elapsed ")
    stopped = io.StringIO()
    early = monitor.Progress(10, 0, "early", interval=3600, stream=stopped)
    early.update(1)
    early.update(1)
    early.close()  # a loop that stopped early still shows where it stopped
    assert [line.split(",")[0] for line in stopped.getvalue().splitlines()] == [
        "early: 1/10 (10%)",
        "early: 2/10 (20%)",
    ]
    term = _Terminal()
    tty = monitor.Progress(10, 0, "tty", stream=term)
    tty.update(10, loss="1.0")
    tty.close()
    assert "\r" in term.getvalue() and "10/10" in term.getvalue()  # tqdm's bar
