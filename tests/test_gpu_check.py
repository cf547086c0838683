"""make gpu-check on the CPU: the dry run end to end, the environment facts first, deadlines, tier
isolation, poisoning, the sanitizer tier (compute-sanitizer absent, refusing, passing and
reporting errors, simulated by executables on PATH), and the suite tier's pytest plugin (timeout,
deadline, the order that puts never-GPU-run paths first): the GPU script cannot rot untested."""

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

from verify import gpu_check, sanitize_case

ROOT = Path(__file__).resolve().parents[1]
# The order the GPU run takes: facts first, then what only a GPU can decide, then the benchmarks.
TIERS = ["env", "build", "warmup", "smoke", "sanitizer", "goals", "suite"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # gpu_check sets it per tier
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
def test_dry_run_writes_every_file_and_passes(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(
        [sys.executable, "-m", "verify.gpu_check", "--out", str(out), "--dry-run", "--jobs", "2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"device", "versions", "env", "plan", "tiers", "goals"}
    assert [t["name"] for t in summary["tiers"]] == TIERS
    assert [p["name"] for p in summary["plan"]] == TIERS
    ends = {p["name"]: p["ends_at_s"] for p in summary["plan"]}
    assert ends["smoke"] < ends["sanitizer"] < ends["goals"] < ends["suite"] == summary["budget_s"]
    status = {t["name"]: t["status"] for t in summary["tiers"]}
    sanitizer_works = summary["env"]["compute_sanitizer"]["working"] is True
    assert status == {
        "env": "passed",
        "build": "skipped",
        "warmup": "passed",
        "smoke": "passed",
        "sanitizer": "passed" if sanitizer_works else "skipped",
        "goals": "passed",
        "suite": "passed",
    }
    for t in summary["tiers"]:
        assert set(t) == {"name", "status", "seconds", "detail"} and t["detail"]
    # environment facts: versions known here, GPU facts n/a in the dry run
    env = summary["env"]
    assert {"python", "torch", "triton", "numpy", "cuda_runtime", "nvcc"} <= set(summary["versions"])
    assert summary["versions"]["torch"] == torch.__version__
    assert env["gpu"]["name"] == env["gpu"]["sms"] == "n/a"
    assert set(env["cuda"]) >= {"torch", "nvcc", "majors_match"} and "present" in env["ninja"]
    for tool in ("compute_sanitizer", "ncu"):
        assert set(env[tool]) >= {"present", "working", "reason"}
    for name in ("summary.md", "gpu_check.log", "junit.xml", "smoke.md", "warmup.json", "env.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("sanitizer.md", "suite-order.json"):
        assert (out / name).stat().st_size > 0, name
    smoke = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    assert {r["backend"] for r in smoke} == {"triton", "cuda"}  # cuda: the host emulator
    # the cuda backend has no tf32 modes: those are not applicable; everything else passes
    assert all(
        r["status"] == ("n/a" if r["backend"] == "cuda" and r["precision"] != "ieee" else "passed")
        for r in smoke
    ), [r for r in smoke if r["status"] != "passed"]
    assert {r["case"].split("-")[0] for r in smoke} == {"channel", "layer", "whiten"}
    assert {r["precision"] for r in smoke} == {"ieee", "tf32", "tf32x3"}
    assert {r["dtype"] for r in smoke} == {"float32", "bfloat16", "float16"}
    assert all(set(r["tensors"]) >= {"y", "dx"} for r in smoke if r["status"] == "passed")
    sanitizer = [json.loads(line) for line in (out / "sanitizer.jsonl").read_text().splitlines()]
    runs = [r for r in sanitizer if r["tool"] != "plain"]
    assert {(r["tool"], r["case"]) for r in runs} == {
        (tool, case) for tool in ("racecheck", "synccheck", "memcheck") for case in sanitize_case.CASES
    }
    if not sanitizer_works:  # skipped with the reason, and the cases ran once without it
        reason = env["compute_sanitizer"]["reason"]
        assert all(r["status"] == "skipped" and reason in r["detail"] for r in runs)
        plain = [r for r in sanitizer if r["tool"] == "plain"]
        assert {r["case"] for r in plain} == set(sanitize_case.CASES)
        assert all(r["status"] == "passed" for r in plain), plain
    for pattern in ("*.csv", "*-goals.json", "*-train.json", "*.md", "*.png"):
        assert list(out.glob(pattern)), pattern
    warm = json.loads((out / "warmup.json").read_text())
    assert warm["recorded_compiles"] > warm["compiled"] == gpu_check.DRY_RUN_WARMUP_VARIANTS
    order = json.loads((out / "suite-order.json").read_text())
    assert sum(order["groups"].values()) == len(order["order"]) > 0
    # the last lines printed are the verdict table
    tail = proc.stdout.strip().splitlines()[-len(TIERS) - 1 :]
    assert tail[0].split()[:3] == ["tier", "status", "seconds"]
    assert [line.split()[0] for line in tail[1:]] == TIERS


def test_a_budget_that_fits_only_the_env_step_still_records_the_facts(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(
        [sys.executable, "-m", "verify.gpu_check", "--out", str(out), "--dry-run", "--budget", "10"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    tiers = summary["tiers"]
    assert [t["status"] for t in tiers] == ["passed"] + ["skipped"] * (len(TIERS) - 1), tiers
    assert all("left before its deadline" in t["detail"] for t in tiers[2:]), tiers
    assert summary["versions"]["torch"] == torch.__version__ and summary["versions"]["python"]
    assert summary["env"]["compute_sanitizer"]["reason"]
    assert "skipped" in proc.stdout.strip().splitlines()[-1]


def _fake_tiers(monkeypatch, ran: list, broken: str | None = None, seen: dict | None = None):
    """Every tier after env replaced by a quick one recording its name (``broken`` raises)."""

    def make(name):
        def step(*args):
            ran.append(name)
            if seen is not None:
                seen[name] = json.loads((args[0].out / "summary.json").read_text())
            if name == broken:
                raise RuntimeError("illegal memory access")
            return "passed", "ok"

        return step

    for name in TIERS[1:]:
        monkeypatch.setattr(gpu_check, name, make(name))


def test_env_facts_are_in_the_summary_before_the_build_starts(tmp_path, monkeypatch):
    ran, seen = [], {}
    _fake_tiers(monkeypatch, ran, seen=seen)
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget", "600"]) == 0
    assert ran == TIERS[1:]
    before_build = seen["build"]
    assert before_build["versions"]["torch"] == torch.__version__
    assert before_build["env"]["cuda"]["torch"] and "working" in before_build["env"]["compute_sanitizer"]
    tiers = {t["name"]: t["status"] for t in before_build["tiers"]}
    assert tiers["env"] == "passed" and {tiers[n] for n in TIERS[1:]} == {"pending"}


def test_a_failing_tier_does_not_stop_the_next(tmp_path, monkeypatch):
    ran = []
    _fake_tiers(monkeypatch, ran, broken="smoke")
    rc = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget", "600"])
    assert rc == 1
    assert ran == TIERS[1:]
    tiers = {t["name"]: t for t in json.loads((tmp_path / "summary.json").read_text())["tiers"]}
    assert tiers["smoke"]["status"] == "failed" and "illegal memory access" in tiers["smoke"]["detail"]
    assert tiers["sanitizer"]["status"] == tiers["goals"]["status"] == tiers["suite"]["status"] == "passed"


def test_poisoning_fills_new_allocations_with_nan_and_unwritten_outputs_fail():
    from intl_kernels.testing import tolerance_rule
    from verify.gpu_smoke import poisoned

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


def test_smoke_cases_cover_small_r_every_mode_and_the_goal_shapes():
    from bench.goals import RESNET50_STAGES
    from verify import gpu_smoke

    cases = gpu_smoke.cases(dry_run=False)
    assert len({c.name for c in cases}) == len(cases)
    modes = {("float32", "ieee"), ("float32", "tf32x3"), ("float32", "tf32"), ("bfloat16", "ieee")}
    # r <= 64: the one-program Newton kernels (4 warps up to 32), every mode and both half dtypes
    small = {(c.shape[1], c.dtype, c.precision) for c in cases if c.op == "whiten" and c.shape[1] <= 64}
    assert small == {(r, d, p) for r in (8, 16, 32, 64) for d, p in modes | {("float16", "ieee")}}
    layer = {(c.shape, c.dtype, c.layout) for c in cases if c.op == "layer"}
    assert layer >= {
        (s, d, lay)
        for s in RESNET50_STAGES
        for d in ("float32", "bfloat16")
        for lay in ("nchw", "channels_last")
    }
    assert {c.precision for c in cases if c.op == "layer"} == {"ieee"}
    channel = {(c.shape, c.dtype, c.precision) for c in cases if c.op == "channel"}
    assert channel >= {(s, d, p) for s in ((256, 8192), (6, 256, 8192)) for d, p in modes}
    large = {(c.shape, c.precision) for c in cases if c.op == "whiten" and c.shape[1] > 64}
    assert large == {((1, 4096, 8192), p) for p in ("ieee", "tf32x3", "tf32")}
    # never-run small r first; cases sharing inputs follow each other (one reference each)
    assert all(c.op == "whiten" and c.shape[1] <= 64 for c in cases[: len(small)])
    keys = [c.inputs_key for c in cases]
    assert all(keys.index(k) == i or keys[i - 1] == k for i, k in enumerate(keys))
    assert gpu_smoke.RESNET50_STAGES == RESNET50_STAGES


def test_smoke_holds_tf32_to_torchs_tf32_matmuls_with_a_looser_atol():
    """docs/design.md §4: float32 and tf32x3 atol 1e-5, tf32 1e-3, bf16/fp16 0; the tf32 case's
    input-precision reference runs with TF32 matmuls switched on, the others with them off."""
    from verify import gpu_smoke

    assert gpu_smoke.atol("float32", "ieee") == gpu_smoke.atol("float32", "tf32x3") == 1e-5
    assert gpu_smoke.atol("float32", "tf32") == 1e-3
    assert gpu_smoke.atol("bfloat16", "ieee") == gpu_smoke.atol("float16", "ieee") == 0.0
    was = torch.backends.cuda.matmul.allow_tf32
    with gpu_smoke.matmul_tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32
    with gpu_smoke.matmul_tf32(False):
        assert not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == was


def _pytest(tmp_path, body: str, *args: str):
    test = tmp_path / "test_sample.py"
    test.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(test), "-p", "verify.pytest_deadline", "-q",
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


def test_suite_runs_never_gpu_run_paths_first_and_says_so(tmp_path):
    """tf32 modes, then small r, device guards and compute-sanitizer tests, then the rest in file
    order; the groups are printed after collection and written with the order."""
    proc = _pytest(
        tmp_path,
        """
        import pytest
        @pytest.fixture(autouse=True)
        def record(request):
            with open("ran.txt", "a") as f:
                f.write(request.node.name + "\\n")
        def test_plain():
            pass
        @pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
        def test_mode(precision):
            pass
        @pytest.mark.parametrize("shape", ["G4-r256-n1000", "G4-r8-n1000", "G4-r32-n1000"])
        def test_shape(shape):
            pass
        def test_compute_sanitizer_memcheck():
            pass
        def test_launch_on_another_gpu_uses_its_device():
            pass
        def test_last_in_file():
            pass
        """,
        "--order-file",
        str(tmp_path / "order.json"),
    )
    assert proc.returncode == 0, proc.stdout
    ran = (tmp_path / "ran.txt").read_text().split()
    assert ran == [
        "test_mode[tf32x3]",
        "test_mode[tf32]",
        "test_shape[G4-r8-n1000]",
        "test_shape[G4-r32-n1000]",
        "test_launch_on_another_gpu_uses_its_device",
        "test_compute_sanitizer_memcheck",
        "test_plain",
        "test_mode[ieee]",
        "test_shape[G4-r256-n1000]",
        "test_last_in_file",
    ]
    written = json.loads((tmp_path / "order.json").read_text())
    assert [n.split("::")[1] for n in written["order"]] == ran
    assert list(written["groups"].values()) == [2, 2, 1, 1, 4]
    assert "gpu-check order: 2 tf32 modes, 2 small r, 1 device guard, 1 compute-sanitizer, 4 the rest" in (
        proc.stdout
    )


def test_tests_after_the_deadline_are_skipped(tmp_path):
    proc = _pytest(tmp_path, "def test_a():\n    pass\n", "--deadline", str(time.time() - 1), "-rs")
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout and "deadline" in proc.stdout


def _fake_tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    path.chmod(0o755)


# compute-sanitizer stand-ins: one that refuses the machine as gVisor makes it, and one that runs
# the program (its options are pairs) and reports errors for the tool named in FAKE_ERRORS_FOR.
REFUSING = """
if [ "$1" = "--version" ]; then echo "Compute Sanitizer stand-in"; echo "Version 0.0"; exit 0; fi
echo "========= COMPUTE-SANITIZER"
echo "========= Error: Device not supported. Please refer to the Supported Devices section."
echo "========= Error: Target application returned an error"
exit 1
"""
PASS_THROUGH = """
if [ "$1" = "--version" ]; then echo "Compute Sanitizer stand-in"; echo "Version 0.0"; exit 0; fi
tool=memcheck
while [ "${1#--}" != "$1" ]; do
    if [ "$1" = "--tool" ]; then tool=$2; fi
    shift 2
done
"$@"
rc=$?
if [ "$tool" = "$FAKE_ERRORS_FOR" ]; then
    echo "========= Invalid __shared__ write of size 4 bytes"
    echo "=========     at _whiten_newton_kernel+0x1a0"
    echo "========= ERROR SUMMARY: 1 error"
    exit 86
fi
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


def _sanitizer_run(tmp_path, env: dict):
    out = tmp_path / "gc"
    proc = subprocess.run(
        [sys.executable, "-m", "verify.gpu_check", "--out", str(out), "--dry-run", "--jobs", "2",
         "--tiers", "sanitizer", "--sanitize-cases", "cuda-small"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "sanitizer.jsonl").read_text().splitlines()]
    return proc, summary, rows, out


@pytest.mark.parametrize("how", ["absent", "refuses"])
def test_sanitizer_tier_is_skipped_with_the_reason_where_compute_sanitizer_cannot_run(tmp_path, how):
    env = _env()
    bin_dir = tmp_path / "bin"
    if how == "absent":  # nothing on PATH, no CUDA toolkit
        bin_dir.mkdir()
        env["PATH"], env["CUDA_HOME"] = str(bin_dir), str(tmp_path / "no-cuda")
        expected = "compute-sanitizer not found"
    else:
        _fake_tool(bin_dir, "compute-sanitizer", REFUSING)
        env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
        expected = "Device not supported"
    proc, summary, rows, out = _sanitizer_run(tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    fact = summary["env"]["compute_sanitizer"]
    assert fact["present"] is (how == "refuses") and fact["working"] is False and expected in fact["reason"]
    tiers = {t["name"]: t for t in summary["tiers"]}
    assert tiers["sanitizer"]["status"] == "skipped" and expected in tiers["sanitizer"]["detail"]
    assert all(tiers[n]["detail"] == "not selected (--tiers)" for n in TIERS if n not in ("env", "sanitizer"))
    runs = [r for r in rows if r["tool"] != "plain"]
    assert {r["tool"] for r in runs} == {"racecheck", "synccheck", "memcheck"}
    assert all(r["status"] == "skipped" and expected in r["detail"] for r in runs)
    assert [(r["case"], r["status"]) for r in rows if r["tool"] == "plain"] == [("cuda-small", "passed")]
    assert expected in (out / "sanitizer.md").read_text()


def test_sanitizer_tier_runs_each_tool_and_reports_the_errors_it_finds(tmp_path):
    _fake_tool(tmp_path / "bin", "compute-sanitizer", PASS_THROUGH)
    env = _env()
    env["PATH"] = os.pathsep.join([str(tmp_path / "bin"), env["PATH"]])
    env["FAKE_ERRORS_FOR"] = "racecheck"
    proc, summary, rows, out = _sanitizer_run(tmp_path, env)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-3000:]  # a failed tier
    assert summary["env"]["compute_sanitizer"]["working"] is True
    status = {r["tool"]: r for r in rows}
    assert set(status) == {"racecheck", "synccheck", "memcheck"}  # no plain run: the tool works
    assert (
        status["racecheck"]["status"] == "failed"
        and "Invalid __shared__ write" in status["racecheck"]["detail"]
    )
    assert status["synccheck"]["status"] == status["memcheck"]["status"] == "passed"
    tier = {t["name"]: t for t in summary["tiers"]}["sanitizer"]
    assert tier["status"] == "failed" and "1 failed" in tier["detail"] and "2 passed" in tier["detail"]
    assert (out / "sanitizer" / "racecheck-cuda-small.log").stat().st_size > 0


def test_sanitizer_verdicts_of_stopped_failed_and_unavailable_runs():
    from verify.sanitize import verdict

    assert verdict("memcheck", None, "", 150.0)[0] == "timeout"
    status, detail = verdict(
        "memcheck", 1, "Traceback ...\nRuntimeError: boom\n========= ERROR SUMMARY: 0 errors", 3
    )
    assert status == "failed" and "exit status 1" in detail
    assert verdict("synccheck", 3, "cuda-small: backend 'cuda' is not available here\n", 2)[0] == "skipped"
    assert verdict("racecheck", 0, "cuda-small: ok\n", 2) == (
        "failed",
        "no ERROR SUMMARY in the sanitizer's output",
    )


def test_dry_run_sanitizer_case_fails_when_thread_orders_disagree(monkeypatch):
    """The CPU's stand-in for racecheck: the host emulator in both thread orders must agree bitwise."""
    from verify import gpu_smoke

    real = sanitize_case.run

    def racy(case, backend, x, dy, reverse_threads=False):
        out = real(case, backend, x, dy, reverse_threads)
        if reverse_threads:
            out["y"] = out["y"].clone()
            out["y"].view(-1)[0] += 1  # what a phase reading another thread's write would give
        return out

    monkeypatch.setattr(sanitize_case, "run", racy)
    assert gpu_smoke.run is real
    rc, line = sanitize_case.run_case("cuda-small", dry_run=True)
    assert rc == 1 and "differ between thread orders" in line, line
    monkeypatch.setattr(sanitize_case, "run", real)
    assert sanitize_case.run_case("cuda-small", dry_run=True) == (0, "cuda-small: ok")


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
            import importlib.util
            import sys
            # as if not installed: importing raises ModuleNotFoundError, importlib.util.find_spec
            # answers None (torch._dynamo probes optional packages that way at import)
            class _Block:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in {OPTIONAL!r}:
                        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            sys.meta_path.insert(0, _Block())
            _find_spec = importlib.util.find_spec
            def find_spec(name, package=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    return None
                return _find_spec(name, package)
            importlib.util.find_spec = find_spec
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
