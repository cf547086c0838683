"""train.linear_eval: end to end on a digits-pretrained checkpoint, the semi-supervised split,
exported backbones, resume after SIGKILL, and the errors for bad inputs (CPU, tiny runs)."""

from __future__ import annotations

import json
import math
import signal
import time
from collections import Counter

import pytest
import torch

pytest.importorskip("torchvision", reason="the training code needs torchvision")
from test_train import make_image_folder, run_module  # noqa: E402

from train import linear_eval, pretrain  # noqa: E402
from train.cli import UsageError  # noqa: E402
from train.data import DigitsSource  # noqa: E402
from train.models import load_backbone  # noqa: E402

LINEAR = ["--data", "digits", "--batch-size", "128", "--threads", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short digits pretraining run (20 steps): its checkpoint.pth and exported resnet_tiny.pth."""
    exp = tmp_path_factory.mktemp("pretrain")
    threads = torch.get_num_threads()
    try:
        pretrain.main(
            ["--data", "digits", "--exp-dir", str(exp), "--epochs", "2", "--batch-size", "128"]
            + ["--threads", "1", "--spectrum-every", "0"]
        )
    finally:
        torch.set_num_threads(threads)
    return exp


def test_linear_eval_end_to_end_prints_json(digits_run, tmp_path, capsys, one_thread):
    res = linear_eval.main(
        [
            *LINEAR,
            "--pretrained",
            str(digits_run / "checkpoint.pth"),
            "--epochs",
            "2",
            "--exp-dir",
            str(tmp_path),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == res
    assert res["epochs"] == 2 and res["n_train"] == 1347 and res["n_val"] == 450
    # 10 classes, chance is 10%; measured 78.9% after 2 epochs of the classifier on features of
    # the 20-step encoder (the bound leaves room for other CPUs' rounding, far above chance).
    assert 50.0 < res["top1"] <= res["top5"] <= 100.0
    rows = [json.loads(line) for line in (tmp_path / "linear_stats.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["top1"] == res["top1"]
    # Frozen backbone: the checkpoint stores the classifier only.
    state = torch.load(tmp_path / "linear.pth", weights_only=True)
    assert state["backbone"] is None and state["classifier"]["weight"].shape == (10, 128)


def test_exported_backbone_equals_checkpoint_backbone(digits_run, tmp_path, one_thread):
    from_ckpt, info_c = load_backbone(digits_run / "checkpoint.pth")
    from_export, info_e = load_backbone(digits_run / "resnet_tiny.pth")
    assert (info_c["source"], info_e["source"]) == ("checkpoint", "backbone")
    assert info_c["arch"] == info_e["arch"] == "resnet_tiny" and info_c["cifar_stem"]
    a, b = from_ckpt.state_dict(), from_export.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The same evaluation from either file gives the same numbers.
    runs = [
        linear_eval.main(
            [*LINEAR, "--pretrained", str(p), "--epochs", "1", "--exp-dir", str(tmp_path / p.stem)]
        )
        for p in (digits_run / "checkpoint.pth", digits_run / "resnet_tiny.pth")
    ]
    assert runs[0]["top1"] == runs[1]["top1"] and runs[0]["top5"] == runs[1]["top5"]


def test_semi_supervised_split_is_deterministic_and_class_balanced():
    targets = DigitsSource("train").targets
    per_class = Counter(targets)
    for percent in (1, 10):
        a = linear_eval.semi_supervised_indices(targets, percent, seed=0)
        assert a == linear_eval.semi_supervised_indices(targets, percent, seed=0)
        assert a == sorted(set(a)) and 0 <= a[0] and a[-1] < len(targets)
        counts = Counter(targets[i] for i in a)
        assert counts == {c: math.ceil(n * percent / 100) for c, n in per_class.items()}
        assert a != linear_eval.semi_supervised_indices(targets, percent, seed=1)
    assert linear_eval.semi_supervised_indices(targets, 100) == list(range(len(targets)))
    with pytest.raises(ValueError, match="--train-percent must be 1, 10 or 100, got 5"):
        linear_eval.semi_supervised_indices(targets, 5)


def test_finetune_on_ten_percent_updates_the_backbone(digits_run, tmp_path, one_thread):
    res = linear_eval.main(
        [*LINEAR, "--pretrained", str(digits_run / "resnet_tiny.pth"), "--weights", "finetune"]
        + ["--train-percent", "10", "--epochs", "1", "--exp-dir", str(tmp_path)]
    )
    assert res["weights"] == "finetune" and res["train_percent"] == 10
    assert res["n_train"] == sum(math.ceil(n / 10) for n in Counter(DigitsSource("train").targets).values())
    tuned = torch.load(tmp_path / "linear.pth", weights_only=True)["backbone"]
    start = torch.load(digits_run / "resnet_tiny.pth", weights_only=True)
    assert not torch.equal(tuned["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"])


def test_sigkill_then_resume_reproduces_uninterrupted_evaluation(digits_run, tmp_path, one_thread):
    args = [*LINEAR, "--pretrained", str(digits_run / "resnet_tiny.pth"), "--epochs", "3"]
    ref = linear_eval.main([*args, "--exp-dir", str(tmp_path / "ref")])
    expected = (tmp_path / "ref" / "linear_stats.jsonl").read_text()

    exp = tmp_path / "run"
    proc = run_module("train.linear_eval", [*args, "--exp-dir", str(exp)], tmp_path)
    deadline = time.monotonic() + 180
    while not (exp / "linear.pth").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_after = torch.load(exp / "linear.pth", weights_only=True)["epoch"]
    assert killed_after < 3, "the evaluation finished before it was killed"

    resumed = run_module("train.linear_eval", [*args, "--exp-dir", str(exp)], tmp_path)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed linear evaluation after epoch {killed_after}" in err
    assert json.loads(out.strip().splitlines()[-1]) == ref
    assert (exp / "linear_stats.jsonl").read_text() == expected


def test_checkpoint_without_backbone_is_refused(tmp_path):
    bad = tmp_path / "checkpoint.pth"
    torch.save({"model": {"projector.0.weight": torch.zeros(4, 4)}}, bad)
    with pytest.raises(
        ValueError, match=r"holds no ResNet backbone .*expected a checkpoint.pth of train.pretrain"
    ):
        linear_eval.main([*LINEAR, "--pretrained", str(bad), "--exp-dir", str(tmp_path / "exp")])


def test_missing_val_folder_and_class_mismatches_are_explained(digits_run, tmp_path, one_thread):
    pretrained = ["--pretrained", str(digits_run / "resnet_tiny.pth")]
    common = [*pretrained, "--batch-size", "8", "--crop-size", "16", "--threads", "1", "--workers", "0"]
    no_val = make_image_folder(tmp_path / "no_val", per_class=4, splits=("train",))
    with pytest.raises(UsageError, match=f"{no_val} has no val/ folder; expected {no_val / 'val'}"):
        linear_eval.main(["--data", str(no_val), *common, "--exp-dir", str(tmp_path / "a")])

    mixed = make_image_folder(tmp_path / "mixed", per_class=4, splits=("train",))
    make_image_folder(tmp_path / "mixed", per_class=4, classes=3, splits=("val",))
    with pytest.raises(
        ValueError, match="train/ has 2 classes and val/ has 3; expected the same class folders"
    ):
        linear_eval.main(["--data", str(mixed), *common, "--exp-dir", str(tmp_path / "b")])

    # An evaluation directory that holds a 10-class (digits) classifier, resumed on 2 classes.
    exp = tmp_path / "c"
    linear_eval.main([*LINEAR, *pretrained, "--epochs", "1", "--exp-dir", str(exp)])
    two = make_image_folder(tmp_path / "two", per_class=4)
    with pytest.raises(ValueError, match="classifier for 10 classes but --data has 2 classes"):
        linear_eval.main(["--data", str(two), *common, "--exp-dir", str(exp)])
