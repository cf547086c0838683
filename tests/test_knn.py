"""train.knn_eval: k-NN rules on hand-placed points, and a digits run that beats random init."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("torchvision", reason="the training code needs torchvision")
from train import knn_eval, pretrain  # noqa: E402
from train.cli import UsageError  # noqa: E402


def _angles(*degrees: float) -> torch.Tensor:
    r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], dim=1)


def test_weighted_cosine_knn_on_hand_placed_points():
    # class 0: one point at 0°; class 1: three at ±25° and 30°; class 2: three around 180°.
    bank = _angles(0, 25, -25, 30, 180, 170, 190)
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 2])
    queries = 5 * _angles(0, 178, 28)  # the norm does not matter for cosine similarity
    # Query 0°, k = 4: class 0 has cos 1 (weight e^0 = 1 after dividing all weights by e^(1/T));
    # class 1 has cos 0.906, 0.906, 0.866: 2·e^(−0.094/0.07) + e^(−0.134/0.07) = 0.67 < 1.
    assert knn_eval.knn_cosine(bank, labels, queries, k=4, temperature=0.07).tolist() == [0, 2, 1]
    # At T = 1 the three class-1 votes (2·e^−0.094 + e^−0.134 = 2.70) outweigh class 0's 1.
    assert knn_eval.knn_cosine(bank, labels, queries, k=4, temperature=1.0).tolist() == [1, 2, 1]
    # k larger than the bank is clipped; every query then sees every point.
    assert knn_eval.knn_cosine(bank, labels, queries[:1], k=50, temperature=0.07).tolist() == [0]


def test_euclidean_5nn_majority_and_tie_to_the_nearest_class():
    # Points on the x axis; queries at x = 0 and x = 100.
    x = [1.0, -2.0, 3.0, -4.0, 5.0, 50.0, 99.0, 101.5, 102.0, 97.0, 103.0]
    y = [1, 0, 0, 1, 2, 2, 0, 1, 2, 2, 2]
    bank = torch.tensor([[v, 0.0] for v in x])
    queries = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    # Query 0: nearest 5 are 1(d1), 0(d2), 0(d3), 1(d4), 2(d5): classes 0 and 1 tie with 2 votes,
    # class 1 owns the nearest point. Query 100: 0(d1), 1(d1.5), 2(d2), 2(d3), 2(d3): class 2 wins 3–1–1.
    pred = knn_eval.knn_euclidean(bank, torch.tensor(y), queries, k=5)
    assert pred.tolist() == [1, 2]


@pytest.mark.parametrize(
    "bank, labels, queries, k, message",
    [
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5), 2, "the same F"),
        (torch.randn(4, 3), torch.zeros(3, dtype=torch.long), torch.randn(2, 3), 2, r"labels must be \(M,\)"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3), 0, "k must be >= 1"),
    ],
)
def test_knn_bad_input(bank, labels, queries, k, message):
    with pytest.raises(ValueError, match=message):
        knn_eval.knn_cosine(bank, labels, queries, k=k)


@pytest.mark.slow
def test_digits_pretraining_beats_random_init(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        # ~40 s on 2 cores: 6 epochs of 10 steps (batch 128) of the small ResNet on 16 px digits.
        pretrain.main(
            ["--data", "digits", "--exp-dir", str(tmp_path), "--epochs", "6", "--batch-size", "128"]
            + ["--warmup-epochs", "1", "--base-lr", "1.0", "--threads", "1", "--spectrum-every", "20"]
        )
        capsys.readouterr()
        trained = knn_eval.main(["--data", "digits", "--pretrained", str(tmp_path / "checkpoint.pth")])
        lines = capsys.readouterr().out.strip().splitlines()
        assert json.loads(lines[-1]) == trained  # the last line printed is the JSON result
        # The same network (seed 0 initialises the backbone identically) before training.
        random = knn_eval.main(
            ["--data", "digits", "--random-init", "--seed", "0", "--exp-dir", str(tmp_path / "random")]
        )
    finally:
        torch.set_num_threads(threads)
    assert trained["k"] == 20 and trained["temperature"] == 0.07 and trained["metric"] == "cosine"
    assert trained["n_bank"] == 1347 and trained["n_queries"] == 450
    # Measured: 95.6% against 93.6% (cosine 20-NN), 97.6% against 95.1% (Euclidean 5-NN).
    assert trained["knn_top1"] >= random["knn_top1"] + 1.0, (trained, random)
    assert trained["euclidean_5nn_top1"] > random["euclidean_5nn_top1"], (trained, random)
    assert (tmp_path / "spectrum.png").stat().st_size > 10_000


def test_online_knn_monitor_logs_each_epoch_and_needs_val(tmp_path):
    from test_train import TINY, make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=8)
    args = ["--data", str(data), "--batch-size", "8", "--epochs", "2", "--knn-every", "1", *TINY]
    threads = torch.get_num_threads()
    try:
        pretrain.main([*args, "--exp-dir", str(tmp_path / "a")])
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    # 16 images, batch 8: 2 steps per epoch; one k-NN figure after each epoch, in % of 16 queries.
    assert [(r["step"], r["epoch"]) for r in knn] == [(2, 1), (4, 2)]
    assert all(r["knn_top1"] in {100 * i / 16 for i in range(17)} for r in knn)
    # The full results in knn.jsonl: k = 20 clipped to the 16 bank images, and reported as 16.
    full = [json.loads(line) for line in (tmp_path / "a" / "knn.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["knn_top1"]) for r in full] == [
        (r["step"], r["epoch"], r["knn_top1"]) for r in knn
    ]
    assert all(r["k"] == 16 and r["n_bank"] == 16 and "euclidean_5nn_top1" in r for r in full)
    no_val = make_image_folder(tmp_path / "no_val", per_class=8, splits=("train",))
    with pytest.raises(UsageError, match=f"{no_val} has no val/ folder"):
        pretrain.main(
            [
                "--data",
                str(no_val),
                "--batch-size",
                "8",
                "--knn-every",
                "1",
                "--exp-dir",
                str(tmp_path / "b"),
                *TINY,
            ]
        )
