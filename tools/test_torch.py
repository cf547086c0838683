"""Test the package against another torch release in a side environment (CPU).

    python3 tools/test_torch.py VERSION [--numpy SPEC] [--env DIR] [--no-suite] [-- PYTEST ARGS]
    make test-torch TORCH=2.11.0

Steps, each printed before it runs:

1. a virtual environment ``.venv-torch-VERSION`` (reused when it already holds that torch);
2. ``torch==VERSION`` and the Triton release that torch pins, then the package's test, bench and
   train extras, with a constraint that keeps torch at VERSION (pip picks the matching
   torchvision). Where the pip configuration caps torch below VERSION (a machine that serves a
   fixed torch from local wheels), pip runs without its configuration file for this
   environment, and the script says so;
3. a copy of the working tree (tracked and untracked, not ignored files) in ``DIR/src``, where
   the C++ extension is built in place against this torch: the checkout's own build, made
   against another torch, is left alone. CUDA kernels are compiled (for sm_90, as in CI, unless
   INTL_KERNELS_CUDA_ARCHS says otherwise) when nvcc's major version equals
   ``torch.version.cuda``'s (setup.py decides and says why not);
4. the CPU suite (``pytest -n 2 tests``, JUnit XML in ``DIR/junit.xml``) and the gpu-check dry
   run (``DIR/gpu-check-dry-run``);
5. one result line: date, commit, torch, Triton, numpy, Python, CUDA of torch and nvcc, the
   counts and the failing tests, in ``DIR/result.json`` and printed as a row of the version table in
   docs/versions.md.

Exit status: 0 when the suite and the dry run pass, 1 when either fails, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "test,bench,train"
# Files of an earlier copy kept across runs so that the extension rebuild is incremental (ninja).
KEEP_IN_COPY = {"build"}


class SetupError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"test-torch: {msg}", flush=True)


def run(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, check: bool = True) -> int:
    say("$ " + " ".join(str(c) for c in cmd))
    rc = subprocess.run(cmd, env=env, cwd=cwd).returncode
    if check and rc != 0:
        raise SetupError(f"exit status {rc}: {' '.join(str(c) for c in cmd)}")
    return rc


def python_of(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def installed_torch(py: Path) -> str | None:
    proc = subprocess.run(
        [str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def pip_env(env_dir: Path) -> dict:
    """Environment for this side environment's pip: without the pip configuration file where an
    earlier run found that it caps torch (the marker file records it)."""
    env = dict(os.environ)
    if (env_dir / ".pip-without-config").exists():
        env["PIP_CONFIG_FILE"] = os.devnull
    return env


def install_torch(env_dir: Path, version: str) -> None:
    py = python_of(env_dir)
    have = installed_torch(py)
    if have is not None and have.split("+")[0] == version:
        say(f"torch {have} already installed")
        return
    cmd = [str(py), "-m", "pip", "install", f"torch=={version}"]
    say("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, env=pip_env(env_dir), capture_output=True, text=True)
    if proc.returncode != 0 and "(constraint)" in proc.stdout + proc.stderr:
        say(
            f"the pip configuration constrains torch below {version}; this environment's pip runs "
            "without the configuration file (PIP_CONFIG_FILE set to the null device)"
        )
        (env_dir / ".pip-without-config").touch()
        proc = subprocess.run(cmd, env=pip_env(env_dir), capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SetupError(f"could not install torch=={version}")


def copy_tree(dst: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files into dst, replacing an earlier
    copy but for its build directory."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.iterdir():
        if old.name not in KEEP_IN_COPY:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if not src.exists():  # deleted in the working tree, not yet in the index
            continue
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)  # keeps mtimes: ninja rebuilds only what changed
    # a repository of its own, holding the copied files: tests that list the project's files ask
    # git, which would otherwise answer for the checkout around the environment's folder
    git = ["git", "-c", "user.name=test-torch", "-c", "user.email=test-torch@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)


def versions(py: Path) -> dict:
    code = (
        "import json, platform, torch, numpy\n"
        "try:\n import triton; tv = triton.__version__\n"
        "except ImportError:\n tv = ''\n"
        "print(json.dumps({'torch': torch.__version__, 'triton': tv, 'numpy': numpy.__version__,"
        " 'python': platform.python_version(), 'torch_cuda': torch.version.cuda or ''}))"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    nvcc = shutil.which("nvcc")
    release = ""
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        release = m.group(1) if m else ""
    found["nvcc"] = release
    return found


def junit_result(path: Path) -> dict:
    """Counts and the ids of failed or erroring tests from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"error": f"no JUnit XML at {path.name}"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            if case.find(kind) is not None:
                counts[key] += 1
                if kind != "skipped":
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def table_row(result: dict) -> str:
    v = result["versions"]
    suite = result["suite"]
    if "error" in suite:
        outcome = suite["error"]
    else:
        failed = suite["failures"] + suite["errors"]
        outcome = f"{suite['passed']} passed, {failed} failed, {suite['skipped']} skipped"
    dry = "passed" if result["dry_run_rc"] == 0 else f"failed ({result['dry_run_rc']})"
    return (
        f"| {v['torch']} | {v['triton']} | {v['numpy']} | {v['python']} | {outcome} | {dry} | "
        f"{result['date']} | {result.get('commit', 'unknown')} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("version", help="torch release, e.g. 2.11.0")
    ap.add_argument("--numpy", default=None, help="numpy requirement, e.g. '==2.3.5' (default: pip's choice)")
    ap.add_argument("--env", type=Path, default=None, help="environment (default .venv-torch-VERSION)")
    ap.add_argument("--no-suite", action="store_true", help="set up and build only")
    ap.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest (default: -n 2 tests)")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", args.version):
        ap.error(f"version must look like 2.11.0, got {args.version!r}")
    env_dir = (args.env or ROOT / f".venv-torch-{args.version}").resolve()
    src = env_dir / "src"
    py = python_of(env_dir)
    start = time.time()
    try:
        if not py.exists():
            run([sys.executable, "-m", "venv", str(env_dir)])
            run([str(py), "-m", "pip", "install", "--quiet", "--upgrade", "pip", "setuptools>=64", "wheel"])
        install_torch(env_dir, args.version)
        constraints = env_dir / "constraints.txt"
        pins = [f"torch=={args.version}"] + ([f"numpy{args.numpy}"] if args.numpy else [])
        constraints.write_text("\n".join(pins) + "\n")
        copy_tree(src)
        pip = [str(py), "-m", "pip", "install", "-c", str(constraints)]
        run([*pip, "--quiet", "ninja", "numpy"], env=pip_env(env_dir))
        build_env = pip_env(env_dir)
        # as CI: the CUDA kernels for sm_90 only (the tests read sm_90 cubins; a second
        # architecture adds two thirds to the nvcc time)
        build_env.setdefault("INTL_KERNELS_CUDA_ARCHS", "90")
        run([*pip, "--no-build-isolation", "-e", f".[{EXTRAS}]"], env=build_env, cwd=src)
    except SetupError as exc:
        say(f"setup failed: {exc}")
        return 2
    found = versions(py)
    say("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if args.no_suite:
        return 0
    junit = env_dir / "junit.xml"
    test_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    test_env["OMP_NUM_THREADS"] = "1"
    pytest_args = args.pytest_args or ["-n", "2", "--dist", "worksteal", "tests"]
    suite_rc = run(
        [str(py), "-m", "pytest", *pytest_args, f"--junitxml={junit}", "-p", "no:cacheprovider"],
        env=test_env, cwd=src, check=False,
    )  # fmt: skip
    dry_out = env_dir / "gpu-check-dry-run"
    shutil.rmtree(dry_out, ignore_errors=True)
    dry_rc = run(
        [str(py), "-m", "verify.gpu_check", "--out", str(dry_out), "--dry-run", "--jobs", "2"],
        env=test_env, cwd=src, check=False,
    )  # fmt: skip
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    result = {
        "date": dt.date.today().isoformat(),
        "commit": (head.stdout.strip() or "unknown") + ("+changes" if dirty.stdout.strip() else ""),
        "versions": found,
        "suite_rc": suite_rc,
        "suite": junit_result(junit),
        "dry_run_rc": dry_rc,
        "seconds": round(time.time() - start),
    }
    (env_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"result in {env_dir / 'result.json'} ({result['seconds']} s)")
    for name in result["suite"].get("failed", []):
        say(f"FAILED {name}")
    say("row for docs/versions.md:")
    print(table_row(result), flush=True)
    return 0 if suite_rc == 0 and dry_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
