"""train.pretrain resumes by content: a moved data folder (and a relative path), --resume into a new
exp-dir, a corrupt checkpoint set aside and never rotated over a good one, earlier outputs set aside
on a fresh start, kept snapshots, time-based checkpoints; linear_eval resumes on moved weights
(CPU, tiny runs, in-process)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("torchvision", reason="the training tests need torchvision")
from test_train import TINY, losses, make_image_folder, run_module  # noqa: E402

from train import checkpoint as ckpt  # noqa: E402
from train import linear_eval, pretrain  # noqa: E402
from train.cli import UsageError  # noqa: E402

# 32 images of 16 px, batch 8: 4 steps per epoch.
TINY16 = [*TINY, "--crop-size", "16", "--batch-size", "8", "--epochs", "50"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of an uninterrupted 6-step run on a tiny folder."""
    root = tmp_path_factory.mktemp("ref")
    data = make_image_folder(root / "data", size=16)
    n = torch.get_num_threads()
    try:
        pretrain.main(["--data", str(data), "--exp-dir", str(root / "exp"), "--max-steps", "6", *TINY16])
    finally:
        torch.set_num_threads(n)
    return losses(root / "exp")


def test_moved_data_and_relative_path_resume_with_a_warning(
    tmp_path, monkeypatch, reference, one_thread, capsys
):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "data", size=16)
    exp = tmp_path / "exp"
    pretrain.main(["--data", str(tmp_path / "data"), "--exp-dir", str(exp), "--max-steps", "2", *TINY16])
    # The job's data moved (a copy to another scratch folder), named by a relative path now.
    shutil.move(tmp_path / "data", tmp_path / "scratch")
    capsys.readouterr()
    pretrain.main(["--data", "scratch", "--exp-dir", "exp", "--max-steps", "6", *TINY16])
    err = capsys.readouterr().err
    assert f"warning: --data moved from {tmp_path / 'data'} to {tmp_path / 'scratch'}" in err
    assert "resumed from step 2" in err
    assert losses(exp) == reference  # the same run, continued

    # Other data under the same path spelling is refused, naming what differs.
    (tmp_path / "scratch" / "train" / "class1" / "3.png").unlink()
    with pytest.raises(
        UsageError, match=r"not the dataset of the checkpoint .*images per class changed: class1 16"
    ):
        pretrain.main(
            ["--data", str(tmp_path / "scratch"), "--exp-dir", str(exp), "--max-steps", "8", *TINY16]
        )
    shutil.copytree(tmp_path / "scratch", tmp_path / "renamed")
    (tmp_path / "renamed" / "train" / "class1").rename(tmp_path / "renamed" / "train" / "classB")
    with pytest.raises(
        UsageError, match=r"1 class folder\(s\) missing: class1; 1 new class folder\(s\): classB"
    ):
        pretrain.main(
            ["--data", str(tmp_path / "renamed"), "--exp-dir", str(exp), "--max-steps", "8", *TINY16]
        )


def test_resume_flag_continues_in_a_new_exp_dir(tmp_path, reference, one_thread, capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    first, second = tmp_path / "first", tmp_path / "second"
    pretrain.main(["--data", str(data), "--exp-dir", str(first), "--max-steps", "3", *TINY16])
    capsys.readouterr()
    args = ["--data", str(data), "--exp-dir", str(second), "--max-steps", "6", *TINY16]
    pretrain.main([*args, "--resume", str(first / "checkpoint.pth")])
    err = capsys.readouterr().err
    assert f"resumed from step 3 of {first / 'checkpoint.pth'}" in err
    assert losses(second) == reference  # history copied up to step 3, then steps 4-6 of this run
    assert torch.load(second / "checkpoint.pth", weights_only=True)["step"] == 6
    assert torch.load(first / "checkpoint.pth", weights_only=True)["step"] == 3  # the source is left alone
    # Started again (a requeued job, same command): the new exp-dir's own checkpoint wins.
    pretrain.main([*args, "--resume", str(first), "--max-steps", "7"])
    err = capsys.readouterr().err
    assert "has its own checkpoint (step 6), which continues the run" in err
    assert torch.load(second / "checkpoint.pth", weights_only=True)["step"] == 7


def test_corrupt_checkpoint_is_set_aside_and_never_rotated_over_a_good_one(tmp_path, one_thread, capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    exp = tmp_path / "exp"
    common = ["--data", str(data), "--exp-dir", str(exp), *TINY16]
    pretrain.main([*common, "--max-steps", "2"])
    pretrain.main([*common, "--max-steps", "3"])  # checkpoint.pth: step 3, prev: step 2
    blob = (exp / "checkpoint.pth").read_bytes()
    (exp / "checkpoint.pth").write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    pretrain.main([*common, "--max-steps", "4"])  # resumes from prev (step 2), saves step 4
    err = capsys.readouterr().err
    aside = sorted(exp.glob("checkpoint.corrupt-*.pth"))
    assert len(aside) == 1 and aside[0].read_bytes() == blob[: len(blob) // 2]
    assert f"set the unreadable {exp / 'checkpoint.pth'} aside as {aside[0]}" in err
    assert "resumed from step 2" in err
    pretrain.main([*common, "--max-steps", "5"])  # a second save rotates step 4 into prev
    for name, step in (("checkpoint.pth", 5), ("checkpoint.prev.pth", 4)):
        state, path = ckpt.load_latest(exp / name, pretrain.REQUIRED)
        assert path == exp / name and state["step"] == step
    assert len(list(exp.glob("checkpoint.corrupt-*.pth"))) == 1


def test_fresh_start_sets_earlier_outputs_aside_and_snapshots_are_kept(tmp_path, one_thread, capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    exp = tmp_path / "exp"
    common = ["--data", str(data), "--exp-dir", str(exp), *TINY16]
    pretrain.main([*common, "--epochs", "2", "--keep-every", "1"])  # 8 steps, snapshots after epochs 1, 2
    for epoch, step in ((1, 4), (2, 8)):
        assert torch.load(exp / f"checkpoint-epoch{epoch:04d}.pth", weights_only=True)["step"] == step
    first_stats = (exp / "stats.jsonl").read_text()
    # The checkpoints are removed by hand; a new run in the same folder keeps the old outputs.
    for name in ("checkpoint.pth", "checkpoint.prev.pth"):
        (exp / name).unlink()
    capsys.readouterr()
    summary = pretrain.main([*common, "--max-steps", "1"])
    err = capsys.readouterr().err
    (earlier,) = exp.glob("earlier-*")
    assert f"set the earlier run's outputs aside in {earlier}" in err
    assert (earlier / "stats.jsonl").read_text() == first_stats
    assert {p.name for p in earlier.iterdir()} >= {"spectrum.jsonl", "args.json", "resnet_tiny.pth"}
    assert (earlier / "checkpoint-epoch0002.pth").exists() and not (exp / "checkpoint-epoch0002.pth").exists()
    assert sorted(losses(exp)) == [1] and summary["step"] == 1


def test_time_based_checkpoints_and_a_finished_run_prints_valid_json(tmp_path, one_thread, capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    common = ["--data", str(data), "--exp-dir", str(tmp_path / "exp"), *TINY16, "--max-steps", "3"]
    # Every step is past a 1e-9-minute deadline: checkpoints after steps 1, 2, 3 (inside epoch 1,
    # where --ckpt-every 0 writes none), then the final one of step 3.
    pretrain.main([*common, "--save-every-minutes", "1e-9"])
    assert torch.load(tmp_path / "exp" / "checkpoint.prev.pth", weights_only=True)["step"] == 3
    capsys.readouterr()
    summary = pretrain.main(common)  # nothing left to train: no loss to report
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(out, parse_constant=pytest.fail) == summary
    assert summary["loss"] is None and summary["step"] == 3 and summary["epoch"] == 1


def test_linear_eval_resumes_on_moved_weights_and_refuses_other_weights(tmp_path, one_thread, capsys):
    data = make_image_folder(tmp_path / "data", size=16)
    pre = tmp_path / "pre"
    pretrain.main(["--data", str(data), "--exp-dir", str(pre), "--max-steps", "1", *TINY16])
    moved = tmp_path / "moved.pth"
    shutil.copyfile(pre / "resnet_tiny.pth", moved)
    pretrain.main(["--data", str(data), "--exp-dir", str(pre), "--max-steps", "2", *TINY16])  # other weights
    common = [
        "--data",
        str(data),
        "--exp-dir",
        str(tmp_path / "lin"),
        "--batch-size",
        "8",
        "--crop-size",
        "16",
    ]
    common += ["--device", "cpu", "--threads", "1", "--workers", "0"]
    linear_eval.main([*common, "--pretrained", str(moved), "--epochs", "1"])
    shutil.move(moved, tmp_path / "elsewhere.pth")
    capsys.readouterr()
    res = linear_eval.main([*common, "--pretrained", str(tmp_path / "elsewhere.pth"), "--epochs", "2"])
    err = capsys.readouterr().err
    assert f"warning: --pretrained {moved} → {tmp_path / 'elsewhere.pth'} (same content); resuming" in err
    assert "resumed linear evaluation after epoch 1" in err and res["epochs"] == 2
    with pytest.raises(UsageError, match=r"--pretrained .*resnet_tiny.pth holds other weights than the ones"):
        linear_eval.main([*common, "--pretrained", str(pre / "resnet_tiny.pth"), "--epochs", "3"])


def test_two_gloo_processes_resume_past_a_corrupt_checkpoint_on_moved_data(tmp_path, one_thread):
    # Rank 0 alone reads, checks and sets aside checkpoints; rank 1 must load the one rank 0 chose.
    make_image_folder(tmp_path / "data", size=16)
    exp = tmp_path / "exp"
    common = ["--exp-dir", str(exp), *TINY16]
    pretrain.main(["--data", str(tmp_path / "data"), *common, "--max-steps", "2"])
    pretrain.main(["--data", str(tmp_path / "data"), *common, "--max-steps", "3"])
    blob = (exp / "checkpoint.pth").read_bytes()
    (exp / "checkpoint.pth").write_bytes(blob[:1000])
    shutil.move(tmp_path / "data", tmp_path / "scratch")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = run_module(
        "train.pretrain", ["--data", "scratch", *common, "--max-steps", "4"], tmp_path, launcher
    )
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("set the unreadable") == 1 and "warning: --data moved from" in err, err
    assert "resumed from step 2 of" in err and "written by 1 processes, this run has 2" in err, err
    state = torch.load(exp / "checkpoint.pth", weights_only=True)
    assert (state["step"], state["world_size"], len(state["rng"])) == (4, 2, 2)
    assert len(list(exp.glob("checkpoint.corrupt-*.pth"))) == 1
