"""train.pretrain: 2-process torchrun smoke run, exact resume after SIGKILL, corrupt-checkpoint
fallback, data errors, backbone export, schedules and the spectrum monitor (CPU, tiny shapes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision", reason="the training tests need torchvision")
Image = pytest.importorskip("PIL.Image", reason="the training tests need Pillow")

from train import checkpoint as ckpt  # noqa: E402
from train import monitor, pretrain  # noqa: E402
from train.cli import UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# A tiny run: 16 images per class, 32 px, the small ResNet, a 32-32 projector, one thread.
TINY = ["--arch", "resnet_tiny", "--stem", "cifar", "--proj", "32-32", "--crop-size", "32"]
TINY += ["--device", "cpu", "--workers", "0", "--threads", "1", "--log-every", "1", "--spectrum-every", "2"]


def make_image_folder(
    root: Path, per_class: int = 16, size: int = 32, classes: int = 2, splits=("train", "val")
):
    """ImageFolder with ``classes`` class folders of noisy images whose colour depends on the class."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3)) + 60 + 120 * np.eye(3)[c % 3]
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def run_module(module: str, args: list[str], cwd: Path, launcher: list[str] | None = None, **kw):
    """Run ``python -m module args`` (or under ``launcher``) with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, *(launcher or []), "-m", module, *args]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def losses(exp: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (exp / "stats.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


# --- distributed -----------------------------------------------------------------------


def test_torchrun_two_process_gloo_ema_multicrop(tmp_path, folder):
    exp = tmp_path / "exp"
    args = ["--data", str(folder), "--exp-dir", str(exp), "--batch-size", "16", "--max-steps", "3"]
    args += [*TINY, "--ema", "--multi-crop", "--epochs", "2", "--save-every-minutes", "1e-9"]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = run_module("train.pretrain", args, tmp_path, launcher)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])  # rank 0 prints the summary; rank 1 nothing
    assert summary["step"] == 3
    assert len(out.strip().splitlines()) == 1
    state = torch.load(exp / "checkpoint.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["step"] == 3 and state["ema"] is not None
    # 32 images, 16 per step over 2 ranks: 2 steps per epoch, so step 3 is epoch 1, batch 1.
    assert (state["epoch"], state["batch"]) == (1, 1)
    # The EMA target moved away from the online model but stayed close to it.
    online, ema = state["model"]["projector.0.weight"], state["ema"]["projector.0.weight"]
    assert 0 < (online - ema).abs().max() < (online.abs().max())
    rows = losses(exp)
    assert sorted(rows) == [1, 2, 3] and all(math.isfinite(v) for v in rows.values())
    assert (exp / "resnet_tiny.pth").exists() and (exp / "spectrum.png").exists()
    # The spectrum monitor sees the global batch (16 rows gathered from both ranks, embedding
    # dim 32: at most 15), at step 2 (--spectrum-every 2) and at the last step.
    spectra = [json.loads(line) for line in (exp / "spectrum.jsonl").read_text().splitlines()]
    assert [(s["step"], s["rank_bound"]) for s in spectra] == [(2, 15), (3, 15)]
    # --save-every-minutes (rank 0's clock, broadcast): every step is past a 1e-9-minute deadline,
    # so step 3 was saved by the timer and again at the end; both ranks took part in each save.
    assert torch.load(exp / "checkpoint.prev.pth", weights_only=True)["step"] == 3


# --- resume ----------------------------------------------------------------------------


def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path, folder, one_thread):
    # 32 images, batch 8: 4 steps per epoch; checkpoints every 3 steps and at epoch ends.
    common = ["--data", str(folder), "--batch-size", "8", "--epochs", "50", "--ckpt-every", "3", *TINY]
    ref = tmp_path / "ref"
    pretrain.main([*common, "--exp-dir", str(ref), "--max-steps", "10"])
    expected = losses(ref)

    exp = tmp_path / "run"
    proc = run_module("train.pretrain", [*common, "--exp-dir", str(exp), "--max-steps", "200"], tmp_path)
    deadline = time.monotonic() + 180
    while not (exp / "checkpoint.pth").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(exp / "checkpoint.pth", weights_only=True)["step"]
    assert killed_at < 10, "the run went past step 10 before it was killed"

    resumed = run_module("train.pretrain", [*common, "--exp-dir", str(exp), "--max-steps", "10"], tmp_path)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from step {killed_at}" in err
    assert losses(exp) == expected  # bitwise equal: same batches, same augmentations, same updates


def test_mid_epoch_resume_and_truncated_checkpoint_falls_back_to_prev(tmp_path, folder, one_thread, capsys):
    common = ["--data", str(folder), "--batch-size", "8", "--epochs", "50", *TINY]
    ref = tmp_path / "ref"
    pretrain.main([*common, "--exp-dir", str(ref), "--max-steps", "7"])
    expected = losses(ref)

    exp = tmp_path / "run"
    pretrain.main([*common, "--exp-dir", str(exp), "--max-steps", "2"])  # stops mid-epoch (batch 2 of 4)
    pretrain.main(
        [*common, "--exp-dir", str(exp), "--max-steps", "6"]
    )  # resumes at batch 2; saves at 4 and 6
    assert torch.load(exp / "checkpoint.prev.pth", weights_only=True)["step"] == 4
    data = (exp / "checkpoint.pth").read_bytes()
    (exp / "checkpoint.pth").write_bytes(data[: len(data) // 2])  # a crash cut the file short
    capsys.readouterr()
    pretrain.main([*common, "--exp-dir", str(exp), "--max-steps", "7"])
    err = capsys.readouterr().err
    assert f"checkpoint {exp / 'checkpoint.pth'} is truncated or corrupt" in err
    assert f"resuming from the previous checkpoint {exp / 'checkpoint.prev.pth'}" in err
    assert "resumed from step 4" in err
    assert losses(exp) == expected


def test_losses_do_not_depend_on_the_number_of_workers(tmp_path, folder, one_thread):
    # Each sample's views are drawn from its own seed (run seed, epoch, index), wherever it is loaded.
    common = ["--data", str(folder), "--batch-size", "8", "--max-steps", "3", *TINY]
    pretrain.main([*common, "--exp-dir", str(tmp_path / "w0")])
    pretrain.main([*common, "--exp-dir", str(tmp_path / "w2"), "--workers", "2"])
    assert losses(tmp_path / "w2") == losses(tmp_path / "w0")


def test_both_checkpoints_corrupt_is_an_error(tmp_path):
    for name in ("checkpoint.pth", "checkpoint.prev.pth"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="no usable checkpoint: checkpoint .*checkpoint.pth is truncated"):
        ckpt.load_latest(tmp_path / "checkpoint.pth", set_aside=True)
    # Nothing is renamed when no checkpoint is usable: the next start says the same.
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pth", "checkpoint.prev.pth"}


def test_atomic_save_keeps_previous_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "c.pth"
    ckpt.atomic_save({"format": ckpt.FORMAT, "step": 1}, path, keep_prev=True)
    ckpt.atomic_save({"format": ckpt.FORMAT, "step": 2}, path, keep_prev=True)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert torch.load(tmp_path / "c.prev.pth", weights_only=True)["step"] == 1
    assert {p.name for p in tmp_path.iterdir()} == {"c.pth", "c.prev.pth"}


def test_checkpoint_of_another_run_is_refused(tmp_path, folder, one_thread):
    common = [
        "--data",
        str(folder),
        "--batch-size",
        "8",
        "--exp-dir",
        str(tmp_path),
        "--max-steps",
        "1",
        *TINY,
    ]
    pretrain.main(common)
    with pytest.raises(ValueError, match=r"different run \(--batch-size 8 → 16\)"):
        pretrain.main([*common, "--batch-size", "16"])


# --- export, data errors, monitors ------------------------------------------------------


def test_exported_resnet50_backbone_loads_into_torchvision_with_only_fc_missing(tmp_path, folder, one_thread):
    args = ["--data", str(folder), "--exp-dir", str(tmp_path), "--arch", "resnet50", "--proj", "16-16"]
    args += [
        "--crop-size",
        "32",
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    args += ["--threads", "1"]
    summary = pretrain.main(args)
    assert summary["backbone"] == str(tmp_path / "resnet50.pth")
    state = torch.load(tmp_path / "resnet50.pth", weights_only=True)
    net = torchvision.models.resnet50()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    trained = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert torch.equal(net.layer4[2].conv3.weight, trained["backbone.layer4.2.conv3.weight"])


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "is not a directory"),
        ("no_train", "has no train/ folder"),
        ("empty_train", "holds no images in class folders"),
    ],
)
def test_bad_data_paths_name_the_path(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "empty_train":
        (root / "train" / "class0").mkdir(parents=True)
    with pytest.raises(UsageError, match=message) as info:
        pretrain.main(["--data", str(root), "--exp-dir", str(tmp_path / "exp"), *TINY])
    assert str(root) in str(info.value)


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, one_thread):
    data = make_image_folder(tmp_path / "data", per_class=8, splits=("train",))
    bad = data / "train" / "class1" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
    args = ["--data", str(data), "--batch-size", "16", "--epochs", "1", *TINY]
    with pytest.raises(RuntimeError, match=f"unreadable image {bad}.*--skip-corrupt"):
        pretrain.main([*args, "--exp-dir", str(tmp_path / "a")])
    with pytest.warns(UserWarning, match=f"skipping unreadable image {bad}"):
        summary = pretrain.main([*args, "--exp-dir", str(tmp_path / "b"), "--skip-corrupt"])
    assert summary["skipped_images"] == 1  # one epoch reads every image once


def test_tensorboard_missing_says_how_to_install(tmp_path, folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UsageError, match="pip install tensorboard"):
        pretrain.main(["--data", str(folder), "--exp-dir", str(tmp_path), "--tensorboard", *TINY])


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, folder, one_thread):
    args = ["--data", str(folder), "--exp-dir", str(tmp_path), "--batch-size", "8", *TINY]
    pretrain.main([*args, "--max-steps", "2"])
    before = (tmp_path / "checkpoint.pth").read_bytes()
    # lr 1e30 blows the weights up in step 3 (its loss, from step 2's weights, is finite); the
    # activations of step 4 overflow and its loss is NaN (measured) or infinite.
    with pytest.raises(
        pretrain.NonFiniteLossError, match=r"non-finite loss \((nan|-?inf)\) at step 4 \(epoch 1\)"
    ):
        pretrain.main([*args, "--max-steps", "10", "--base-lr", "1e30"])
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--proj", "64-x"], "--proj must be positive integers"),
        (["--batch-size", "4"], "--batch-size must be >= 8"),
        (["--epochs", "0"], "--epochs must be an integer >= 1"),
        (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    ],
)
def test_bad_flags_are_named(tmp_path, folder, flags, message):
    with pytest.raises(ValueError, match=message):
        pretrain.main(["--data", str(folder), "--exp-dir", str(tmp_path), *TINY, *flags])


def test_lr_warmup_cosine_and_ema_momentum_schedules():
    peak, total, warm = 2.0, 100, 10
    lrs = [pretrain.lr_at(s, total, warm, peak, 0.001) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[warm - 1] == pytest.approx(peak)
    assert lrs[warm] == pytest.approx(peak)  # the cosine starts at the peak
    assert all(a >= b for a, b in zip(lrs[warm:-1], lrs[warm + 1 :], strict=True))
    assert pretrain.lr_at(total, total, warm, peak, 0.001) == pytest.approx(0.001 * peak)
    assert pretrain.ema_momentum_at(0, total, 0.996) == pytest.approx(0.996)
    assert pretrain.ema_momentum_at(total // 2, total, 0.996) == pytest.approx(0.998)
    assert pretrain.ema_momentum_at(total, total, 0.996) == pytest.approx(1.0)


def test_spectrum_monitor_figures_and_collapse_warning(capsys):
    # Batch-centred embeddings with covariance diag(4, 1, 1, 0, ...): rows ±(2e_0), ±e_1, ±e_2.
    basis = torch.zeros(6, 8, dtype=torch.float64)
    basis[0, 0], basis[1, 0], basis[2, 1], basis[3, 1], basis[4, 2], basis[5, 2] = 2, -2, 1, -1, 1, -1
    s = monitor.spectrum(basis)
    # Covariance Zcᵀ Zc/(N − 1) with N = 6: eigenvalues 8/5, 2/5, 2/5 and zeros; r = min(5, 8) = 5.
    np.testing.assert_allclose(s["eigs"], [1.6, 0.4, 0.4, 0.0, 0.0], atol=1e-12)
    assert s["rank_bound"] == 5 and s["ioc"] == pytest.approx(0.0, abs=1e-12)
    p = np.array([1.6, 0.4, 0.4]) / 2.4
    assert s["erank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert not monitor.warn_collapse(7, s, 0.2)  # 2.6 > 0.2 × 5
    collapsed = monitor.spectrum(torch.randn(16, 1) @ torch.randn(1, 32))  # rank one
    assert collapsed["erank"] == pytest.approx(1.0, abs=1e-6)
    assert monitor.warn_collapse(7, collapsed, 0.2)
    assert "warning: step 7: effective rank of the embeddings 1.00" in capsys.readouterr().err


def test_help_documents_every_flag():
    text = pretrain.build_parser().format_help()
    for flag in (
        "--data",
        "--arch",
        "--proj",
        "--iters",
        "--epochs",
        "--batch-size",
        "--base-lr",
        "--wd",
        "--ema",
    ):
        assert flag in text
    for flag in (
        "--multi-crop",
        "--amp",
        "--channels-last",
        "--exp-dir",
        "--max-steps",
        "--device",
        "--workers",
    ):
        assert flag in text
    for flag in ("--seed", "--ckpt-every", "--tensorboard", "--skip-corrupt", "--knn-every"):
        assert flag in text
    for flag in ("--resume", "--break-lock", "--save-every-minutes", "--keep-every", "--compile"):
        assert flag in text
    assert "--progress-interval" in text
