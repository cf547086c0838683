"""make gpu-check on the CPU: the dry run end to end, deadlines, tier isolation, poisoning, and
the suite tier's pytest plugin (the GPU script cannot rot untested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
TIERS = ["build", "warmup", "smoke", "goals", "suite"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # gpu_check sets it per tier
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
def test_dry_run_writes_every_file_and_passes(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--dry-run", "--jobs", "2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"device", "versions", "tiers", "goals"}
    assert [t["name"] for t in summary["tiers"]] == TIERS
    status = {t["name"]: t["status"] for t in summary["tiers"]}
    assert status == {
        "build": "skipped",
        "warmup": "passed",
        "smoke": "passed",
        "goals": "passed",
        "suite": "passed",
    }
    for t in summary["tiers"]:
        assert set(t) == {"name", "status", "seconds", "detail"} and t["detail"]
    for name in ("summary.md", "gpu_check.log", "junit.xml", "smoke.md", "warmup.json"):
        assert (out / name).stat().st_size > 0, name
    smoke = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    assert {r["backend"] for r in smoke} == {"triton", "cuda"}  # cuda: the host emulator
    assert all(r["status"] == "passed" for r in smoke)
    assert {r["case"].split("-")[0] for r in smoke} == {"channel", "layer", "whiten"}
    assert all(set(r["tensors"]) >= {"y", "dx"} for r in smoke)
    for pattern in ("*.csv", "*-goals.json", "*-train.json", "*.md", "*.png"):
        assert list(out.glob(pattern)), pattern
    warm = json.loads((out / "warmup.json").read_text())
    assert warm["recorded_compiles"] > warm["compiled"] == gpu_check.DRY_RUN_WARMUP_VARIANTS
    # the last lines printed are the verdict table
    tail = proc.stdout.strip().splitlines()[-len(TIERS) - 1 :]
    assert tail[0].split()[:3] == ["tier", "status", "seconds"]
    assert [line.split()[0] for line in tail[1:]] == TIERS


def test_tiers_that_cannot_finish_before_the_deadline_are_skipped(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--dry-run", "--budget", "10"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tiers = json.loads((out / "summary.json").read_text())["tiers"]
    assert [t["status"] for t in tiers] == ["skipped"] * len(TIERS)
    assert all("left before its deadline" in t["detail"] for t in tiers[1:]), tiers
    assert "skipped" in proc.stdout.strip().splitlines()[-1]


def test_a_failing_tier_does_not_stop_the_next(tmp_path, monkeypatch):
    ran = []

    def passed(name):
        def step(*args):
            ran.append(name)
            return "passed", "ok"

        return step

    def broken(*args):
        ran.append("smoke")
        raise RuntimeError("illegal memory access")

    for name in ("build", "warmup", "goals", "suite"):
        monkeypatch.setattr(gpu_check, name, passed(name))
    monkeypatch.setattr(gpu_check, "smoke", broken)
    rc = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget", "600"])
    assert rc == 1
    assert ran == TIERS
    tiers = {t["name"]: t for t in json.loads((tmp_path / "summary.json").read_text())["tiers"]}
    assert tiers["smoke"]["status"] == "failed" and "illegal memory access" in tiers["smoke"]["detail"]
    assert tiers["goals"]["status"] == tiers["suite"]["status"] == "passed"


def test_poisoning_fills_new_allocations_with_nan_and_unwritten_outputs_fail():
    from bench.gpu_smoke import poisoned
    from intl_kernels.testing import tolerance_rule

    with poisoned():
        y = torch.empty(4, 6)
        idx = torch.empty(3, dtype=torch.int32)
    assert torch.isnan(y).all() and (idx == torch.iinfo(torch.int32).max).all()
    assert not torch.are_deterministic_algorithms_enabled()  # restored
    ref = torch.ones(4, 6)
    y[:, :5] = 1.0  # a "kernel" that forgot the last column
    assert not tolerance_rule(y, ref, ref, 1e-5)["passed"]
    y[:, 5] = 1.0
    assert tolerance_rule(y, ref, ref, 1e-5)["passed"]


def test_smoke_cases_cover_the_goal_shapes():
    from bench import gpu_smoke
    from bench.goals import RESNET50_STAGES

    cases = gpu_smoke.cases(dry_run=False)
    layer = {(c.shape, c.dtype, c.layout) for c in cases if c.op == "layer"}
    assert layer == {
        (s, d, lay)
        for s in RESNET50_STAGES
        for d in ("float32", "bfloat16")
        for lay in ("nchw", "channels_last")
    }
    channel = {(c.shape, c.dtype) for c in cases if c.op == "channel"}
    assert channel == {(s, d) for s in ((256, 8192), (6, 256, 8192)) for d in ("float32", "bfloat16")}
    assert [c.shape for c in cases if c.op == "whiten"] == [(1, 4096, 8192)]
    assert gpu_smoke.RESNET50_STAGES == RESNET50_STAGES


def _pytest(tmp_path, body: str, *args: str):
    test = tmp_path / "test_sample.py"
    test.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(test), "-p", "bench.pytest_deadline", "-q",
         "-p", "no:cacheprovider", f"--rootdir={tmp_path}", *args],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_per_test_timeout_fails_a_slow_test_and_the_next_runs(tmp_path):
    proc = _pytest(
        tmp_path,
        """
        import time
        def test_slow():
            time.sleep(30)
        def test_fast():
            pass
        """,
        "--per-test-timeout",
        "1",
    )
    assert proc.returncode == 1, proc.stdout
    assert "ran longer than the per-test timeout of 1 s" in proc.stdout
    assert "1 failed, 1 passed" in proc.stdout


def test_tests_after_the_deadline_are_skipped(tmp_path):
    proc = _pytest(tmp_path, "def test_a():\n    pass\n", "--deadline", str(time.time() - 1), "-rs")
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout and "deadline" in proc.stdout


OPTIONAL = (
    "hypothesis",
    "torchvision",
    "PIL",
    "sklearn",
    "matplotlib",
    "scipy",
    "onnx",
    "onnxruntime",
    "tqdm",
)


def test_cuda_suite_collects_without_optional_packages(tmp_path):
    """`pytest -m cuda tests` on an image without the optional packages: every module collects
    (modules that need one skip with the reason), none errors."""
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            class _Block:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in {OPTIONAL!r}:
                        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            sys.meta_path.insert(0, _Block())
            """
        )
    )
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "--collect-only", "-q",
         "-p", "no:cacheprovider", "-p", "no:hypothesispytest"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "error" not in out.lower().split("short test summary")[-1], out[-5000:]
    assert "tests/test_triton_cuda.py::" in out and "tests/test_cuda_backend.py::" in out
