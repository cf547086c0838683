"""The training commands as users run them: every flag checked before any work, one-line errors with
exit status 2 (once under torchrun), the installed console scripts from any folder, progress lines
in log files, args.json, strict JSON results, the k of k-NN that was used (CPU, tiny runs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision", reason="the training tests need torchvision")
from test_train import ROOT, TINY, make_image_folder  # noqa: E402

from train import knn_eval, linear_eval, pretrain  # noqa: E402
from train.lock import LOCK_NAME  # noqa: E402

TINY16 = [*TINY, "--crop-size", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), size=16)


def _user_error(entry, argv: list[str], capsys) -> str:
    """Run a command's entry point; it must exit with status 2 after one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        entry(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


PRETRAIN_CASES = [
    (["--base-lr", "nan"], "--base-lr must be a finite number > 0, got nan"),
    (["--base-lr", "inf"], "--base-lr must be a finite number > 0, got inf"),
    (["--base-lr", "0"], "--base-lr must be a finite number > 0, got 0.0"),
    (["--proj", "1"], "--proj: the embedding (last size) must have >= 2 features"),
    (["--proj", "64-x"], "--proj must be positive integers"),
    (["--proj", "0-8"], "--proj must be positive integers"),
    (["--wd", "-1"], "--wd must be a finite number >= 0, got -1.0"),
    (["--momentum", "1"], "--momentum must be a finite number >= 0 and < 1, got 1.0"),
    (["--ema-momentum", "nan"], "--ema-momentum must be a finite number >= 0 and <= 1, got nan"),
    (["--warmup-epochs=-inf"], "--warmup-epochs must be a finite number >= 0, got -inf"),
    (["--final-lr-ratio", "2"], "--final-lr-ratio must be a finite number >= 0 and <= 1, got 2.0"),
    (["--collapse-fraction", "-0.1"], "--collapse-fraction must be a finite number >= 0 and <= 1"),
    (["--save-every-minutes", "inf"], "--save-every-minutes must be a finite number >= 0, got inf"),
    (["--progress-interval", "nan"], "--progress-interval must be a finite number >= 0, got nan"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--iters", "0"], "--iters must be an integer >= 1, got 0"),
    (["--batch-size", "4"], "--batch-size must be >= 8"),
    (["--crop-size", "0"], "--crop-size must be an integer >= 1, got 0"),
    (["--log-every", "0"], "--log-every must be an integer >= 1, got 0"),
    (["--knn-samples", "0"], "--knn-samples must be an integer >= 1, got 0"),
    (["--max-steps", "0"], "--max-steps must be an integer >= 1, got 0"),
    (["--ckpt-every", "-1"], "--ckpt-every must be an integer >= 0, got -1"),
    (["--spectrum-every", "-1"], "--spectrum-every must be an integer >= 0, got -1"),
    (["--keep-every", "-1"], "--keep-every must be an integer >= 0, got -1"),
    (["--knn-every", "-2"], "--knn-every must be an integer >= 0, got -2"),
    (["--workers", "-1"], "--workers must be an integer >= 0, got -1"),
    (["--threads", "-1"], "--threads must be an integer >= 0, got -1"),
    (["--seed", "-1"], "--seed must be an integer in [0, 9223372036854775807], got -1"),
    (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    (["--compile", "nosuch"], "--compile: unknown backend 'nosuch'; expected one of"),
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x' (see --help)"),
    (["--resume", "nowhere.pth"], "--resume nowhere.pth: no such checkpoint"),
]
if not torch.cuda.is_available():
    PRETRAIN_CASES.append((["--device", "cuda"], "--device cuda: no CUDA device is available here"))


@pytest.mark.parametrize("flags, message", PRETRAIN_CASES, ids=[" ".join(c[0]) for c in PRETRAIN_CASES])
def test_pretrain_flag_errors_are_one_line_before_any_work(tmp_path, data, flags, message, capsys):
    exp = tmp_path / "exp"
    line = _user_error(
        pretrain.cli_main, ["--data", str(data), "--exp-dir", str(exp), *TINY16, *flags], capsys
    )
    assert line.startswith("python -m train.pretrain: error: ") and message in line, line
    assert not exp.exists()  # refused before anything was created


def test_pretrain_path_errors(tmp_path, data, capsys):
    (tmp_path / "file").write_text("")
    line = _user_error(
        pretrain.cli_main, ["--data", str(data), "--exp-dir", str(tmp_path / "file"), *TINY16], capsys
    )
    assert f"--exp-dir {tmp_path / 'file'} is a file; expected a folder" in line
    no_val = make_image_folder(tmp_path / "no_val", per_class=8, size=16, splits=("train",))
    line = _user_error(
        pretrain.cli_main,
        ["--data", str(no_val), "--knn-every", "1", "--exp-dir", str(tmp_path / "e"), *TINY16],
        capsys,
    )
    assert f"{no_val} has no val/ folder" in line


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path, data, one_thread, capsys):
    args = ["--data", str(data), "--exp-dir", str(tmp_path), *TINY16, "--max-steps", "4", "--base-lr", "1e30"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        pretrain.cli_main(args)
    assert info.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: non-finite loss" in line and "No checkpoint had been written yet" in line, line
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--k", "0"], "--k must be an integer >= 1, got 0"),
        (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
        (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--crop-size", "-3"], "--crop-size must be an integer >= 1, got -3"),
        (["--workers", "-1"], "--workers must be an integer >= 0, got -1"),
        (["--arch", "resnet18"], "--arch applies to --random-init only"),
    ],
)
def test_knn_eval_flag_errors_come_before_feature_extraction(tmp_path, data, flags, message, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    line = _user_error(knn_eval.cli_main, ["--data", str(data), "--pretrained", str(weights), *flags], capsys)
    assert line.startswith("python -m train.knn_eval: error: ") and message in line, line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr-classifier", "nan"], "--lr-classifier must be a finite number > 0, got nan"),
        (["--lr-backbone", "0.1"], "--lr-backbone applies to --weights finetune only"),
        (
            ["--weights", "finetune", "--lr-backbone", "-1"],
            "--lr-backbone must be a finite number > 0, got -1.0",
        ),
        (["--wd", "inf"], "--wd must be a finite number >= 0, got inf"),
        (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["--split-seed", "-1"], "--split-seed must be an integer >= 0, got -1"),
        (["--train-percent", "5"], "argument --train-percent: invalid choice: 5"),
    ],
)
def test_linear_eval_flag_errors(tmp_path, data, flags, message, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    argv = ["--data", str(data), "--pretrained", str(weights), "--exp-dir", str(tmp_path / "exp"), *flags]
    line = _user_error(linear_eval.cli_main, argv, capsys)
    assert line.startswith("python -m train.linear_eval: error: ") and message in line, line
    assert not (tmp_path / "exp").exists()


def test_knn_eval_reports_the_k_it_used_and_writes_its_result(tmp_path, data, one_thread, capsys):
    res = knn_eval.main(
        ["--data", str(data), "--random-init", "--arch", "resnet_tiny", "--stem", "cifar", "--k", "500"]
        + ["--crop-size", "16", "--device", "cpu", "--threads", "1", "--workers", "0"]
        + ["--exp-dir", str(tmp_path)]
    )
    out, err = capsys.readouterr()
    assert res["k"] == 32 and res["n_bank"] == 32  # 32 train images: k clipped to 32, reported as 32
    assert "--k 500 is more than the 32 bank images: using k = 32" in err
    assert "weighted cosine 32-NN" in out
    (row,) = [json.loads(line) for line in (tmp_path / "knn_eval.jsonl").read_text().splitlines()]
    assert row["k"] == 32 and row["knn_top1"] == res["knn_top1"] and row["data"] == str(data)


def _strict_json(line: str) -> dict:
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))


def test_console_script_from_any_folder(tmp_path, data):
    """The installed ``intl-pretrain`` (pyproject [project.scripts]) run from a folder outside the
    checkout, output to a log file: default exp-dir in that folder, plain progress lines,
    args.json, a spectrum.png of a run shorter than --spectrum-every, strict JSON."""
    script = Path(sys.executable).parent / "intl-pretrain"
    assert script.exists(), f"{script} is missing: reinstall the package (make install)"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    args = [*TINY16, "--log-every", "2", "--spectrum-every", "100", "--epochs", "3", "--max-steps", "5"]
    proc = subprocess.run(
        [str(script), "--data", str(data), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _strict_json(proc.stdout.strip().splitlines()[-1])
    exp = cwd / "runs" / "pretrain"
    assert summary["exp_dir"] == "runs/pretrain" and (exp / "checkpoint.pth").exists()
    assert not (exp / LOCK_NAME).exists()
    # 4 steps per epoch: step 5 is in epoch 2 (epochs count from 1), one epoch completed.
    assert (summary["step"], summary["epoch"], summary["epochs_completed"]) == (5, 2, 1)
    progress = [line for line in proc.stderr.splitlines() if line.startswith("intl-pretrain step: ")]
    assert progress[0].startswith("intl-pretrain step: 1/5 (20%)") and progress[-1].startswith(
        "intl-pretrain step: 5/5 (100%), epoch 2/3"
    ), proc.stderr
    assert "\r" not in proc.stderr  # no terminal bar in a log file
    settings = json.loads((exp / "args.json").read_text())
    assert settings["command"][0] == "intl-pretrain"
    resolved = settings["resolved"]
    assert (resolved["steps_per_epoch"], resolved["dataset_size"], resolved["world_size"]) == (4, 32, 1)
    assert resolved["per_rank_batch"] == 8 and math.isclose(resolved["peak_lr"], 0.5 * 8 / 256)
    assert settings["versions"]["torch"] == torch.__version__
    assert "settings in runs/pretrain/args.json" in proc.stderr
    rows = [_strict_json(line) for line in (exp / "stats.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in logged] == [(2, 1), (4, 1), (5, 2)]
    assert all(r["data_s"] >= 0 and r["step_s"] >= r["data_s"] for r in logged)
    spectra = [_strict_json(line) for line in (exp / "spectrum.jsonl").read_text().splitlines()]
    assert [s["step"] for s in spectra] == [5]  # the last step, the run being shorter than 100 steps
    assert (exp / "spectrum.png").stat().st_size > 10_000


def test_installed_module_runs_from_any_folder(tmp_path, data, capsys):
    """``python -m intl_kernels.train.knn_eval`` outside the checkout (no top-level ``train``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('train') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env).returncode == 0
    proc = subprocess.run(
        [sys.executable, "-m", "intl_kernels.train.knn_eval", "--data", str(data), "--pretrained", "x.pth"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    prog = "python -m intl_kernels.train.knn_eval"
    assert proc.stderr.strip() == f"{prog}: error: --pretrained: x.pth does not exist (or is not a file)"


def test_torchrun_user_error_is_printed_once(tmp_path, data):
    exp = tmp_path / "exp"
    exp.mkdir()
    # A lock held by this (live) test process: only rank 0 can see it; it tells rank 1.
    (exp / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*launcher, "-m", "train.pretrain", "--data", str(data), "--exp-dir", str(exp), *TINY16],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("error: --exp-dir") == 1, out
    assert "is in use by another run" in out, out
    # No traceback of the ranks (torchrun adds its own report of their exit statuses).
    assert "UsageError" not in out and "PeerFailed" not in out and str(ROOT / "train") not in out, out
    assert "exitcode  : 2" in out, out
