"""--loader dali without NVIDIA DALI installed: one line naming the install command, before any work."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("torchvision", reason="the training tests need torchvision")

from train import knn_eval, linear_eval, pretrain  # noqa: E402
from train.cli import UsageError  # noqa: E402

INSTALL = r"--loader dali needs NVIDIA DALI, which is not installed .*"
INSTALL += r"pip install -e \"\.\[dali\]\".*nvidia-dali-cuda120"


@pytest.fixture
def no_dali(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # the import fails as if it were not installed


def test_pretrain_names_the_install_command(tmp_path, no_dali, capsys):
    args = ["--data", "digits", "--exp-dir", str(tmp_path / "exp"), "--device", "cpu", "--loader", "dali"]
    with pytest.raises(UsageError, match=INSTALL) as info:
        pretrain.main(args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "exp").exists()  # refused before any work
    with pytest.raises(SystemExit) as code:
        pretrain.cli_main(args)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0]


def test_evaluations_name_the_install_command(tmp_path, no_dali):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    with pytest.raises(UsageError, match=INSTALL):
        knn_eval.main(["--data", "digits", "--random-init", "--loader", "dali", "--exp-dir", str(tmp_path)])
    with pytest.raises(UsageError, match=INSTALL):
        linear_eval.main(["--data", "digits", "--pretrained", str(weights), "--loader", "dali"])
