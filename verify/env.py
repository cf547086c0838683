"""The env step of ``make gpu-check``: what the machine has, recorded before anything runs.

    python -m verify.env --out DIR [--deadline T] [--dry-run]

Writes ``DIR/env.json`` twice: first the facts read in a second or two (GPU name, compute
capability, SM count and memory; driver; python, torch, Triton and numpy versions; torch's CUDA
release against nvcc's and whether their major versions match, which the extension's build
needs; ninja), then again with the tools probed by running them: compute-sanitizer and ncu,
each on a tiny torch program, concurrently and with a short timeout. Some GPU machines refuse
them ("Device not supported", error 999, "LibraryNotLoaded" under gVisor); the probe records
whether the tool works and, if not, why, so the sanitizer tier can skip with that reason.

``--dry-run`` (a CPU machine): GPU facts are "n/a"; compute-sanitizer, if present, is probed on a
CPU program (whether it starts and runs one, not whether it instruments GPU kernels); ncu is not
probed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NA = "n/a"
PROBE_SECONDS = 60.0
# A tiny torch program (argv[1]: the device): one elementwise kernel and a reduction.
PROBE_PROGRAM = (
    "import sys, torch\n"
    "x = torch.arange(256.0, device=sys.argv[1])\n"
    "s = float((x * 2).sum())\n"
    "print('probe sum', s)\n"
    "sys.exit(0 if s == 65280.0 else 1)\n"
)
SANITIZER_ERROR_EXIT = 86  # compute-sanitizer's exit status when it reports errors
# What compute-sanitizer and ncu print where the machine does not let them instrument anything.
REFUSALS = re.compile(
    r"device not supported|error 999|librarynotloaded|not supported on this|"
    r"unable to (?:initialize|load)|err_nvgpuctrperm|permission|insufficient privilege",
    re.IGNORECASE,
)
NCU_METRIC = "gpu__time_duration.sum"


def command_output(cmd: list[str], timeout: float = 30.0) -> str:
    """Stripped stdout of ``cmd`` run from the project root, "" if it fails or is missing."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def cuda_home() -> str | None:
    """The CUDA toolkit the extension's build would use: CUDA_HOME / CUDA_PATH, else nvcc's on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in the CUDA toolkit's bin/ (or its own folder there)."""
    found = shutil.which(name)
    if found:
        return found
    home = cuda_home()
    for sub in ("bin", name):
        path = Path(home or "/nonexistent") / sub / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def major(version: str) -> str:
    return version.split(".")[0] if version else ""


def quick_facts(dry_run: bool) -> dict:
    """Versions, the GPU (``n/a`` in the dry run or without one), CUDA releases, ninja."""
    import numpy
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    home = cuda_home()
    nvcc = str(Path(home) / "bin" / "nvcc") if home and (Path(home) / "bin" / "nvcc").exists() else "nvcc"
    m = re.search(r"release ([\d.]+)", command_output([nvcc, "--version"]))
    nvcc_release = m.group(1) if m else ""
    torch_cuda = torch.version.cuda or ""
    driver = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "cuda_runtime": torch_cuda,
        "nvcc": nvcc_release,
        "driver": driver.splitlines()[0] if driver else "",
        "commit": command_output(["git", "rev-parse", "--short", "HEAD"]),
    }
    if dry_run or not torch.cuda.is_available():
        gpu = {"name": NA, "capability": NA, "sms": NA, "memory_gib": NA}
        device = f"cpu ({platform.processor() or platform.machine()}{', dry run' if dry_run else ''})"
    else:
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
        device = f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"
    ninja = shutil.which("ninja")
    return {
        "device": device,
        "gpu": gpu,
        "driver": versions["driver"] or NA,
        "versions": versions,
        "cuda": {
            "torch": torch_cuda or NA,
            "nvcc": nvcc_release or NA,
            "nvcc_path": nvcc if nvcc_release else NA,
            # the extension builds only with nvcc of torch's CUDA major version
            "majors_match": (major(torch_cuda) == major(nvcc_release)) if torch_cuda and nvcc_release else NA,
        },
        "ninja": {
            "present": ninja is not None,
            "path": ninja or "",
            "version": command_output(["ninja", "--version"]),
        },
        "cpu_count": os.cpu_count(),
    }


def _reason(text: str, rc: int | None) -> str:
    """Why a probe failed: the refusal line if there is one, else the exit status and last line."""
    lines = [ln.strip(" =") for ln in text.splitlines() if ln.strip(" =")]
    for line in lines:
        if REFUSALS.search(line):
            return line[:300]
    if rc is None:
        return "no answer within the probe's timeout"
    return f"exit status {rc}" + (f": {lines[-1][:300]}" if lines else "")


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, output) of a started probe."""
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1.0))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def probe_tools(dry_run: bool, timeout: float = PROBE_SECONDS) -> dict:
    """{"compute_sanitizer": {...}, "ncu": {...}}: present, path, version, probe, working, reason."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    )
    env.pop("TRITON_INTERPRET", None)
    device = "cpu" if dry_run else "cuda"
    facts, running = {}, {}
    for key, name in (("compute_sanitizer", "compute-sanitizer"), ("ncu", "ncu")):
        path = find_tool(name)
        fact = {"present": path is not None, "path": path or "", "version": "", "probe": "", "working": False}
        facts[key] = fact
        if path is None:
            fact["reason"] = f"{name} not found on PATH or in the CUDA toolkit"
            continue
        version = command_output([path, "--version"], timeout=15)
        fact["version"] = next((ln for ln in version.splitlines() if "version" in ln.lower()), version[-200:])
        if key == "ncu" and dry_run:
            fact["working"], fact["reason"] = NA, "dry run: no GPU to profile"
            continue
        program = [sys.executable, "-c", PROBE_PROGRAM, device]
        if key == "compute_sanitizer":
            cmd = [path, "--tool", "memcheck", "--error-exitcode", str(SANITIZER_ERROR_EXIT), *program]
        else:
            cmd = [path, "--metrics", NCU_METRIC, "-c", "1", *program]
        fact["probe"] = (
            f"memcheck on a tiny torch program ({device})"
            if key == "compute_sanitizer"
            else (f"{NCU_METRIC} of one kernel of a tiny torch program")
        )
        running[key] = _start(cmd, env)
    end = time.time() + timeout
    for key, proc in running.items():
        rc, out = _finish(proc, end - time.time())
        fact = facts[key]
        if key == "compute_sanitizer":
            m = re.search(r"ERROR SUMMARY: (\d+) error", out)
            fact["working"] = rc == 0 and m is not None and m.group(1) == "0" and "probe sum" in out
        else:
            fact["working"] = rc == 0 and NCU_METRIC in out
            if rc == 0 and not fact["working"] and "No kernels were profiled" in out:
                fact["reason"] = "no kernels were profiled"
        if not fact["working"]:
            fact.setdefault("reason", _reason(out, rc))
        else:
            fact["reason"] = ""
    return facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verify.env", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for env.json")
    ap.add_argument("--deadline", type=float, default=None, help="time.time() by which the probes end")
    ap.add_argument("--dry-run", action="store_true", help="a CPU machine: GPU facts n/a")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "env.json"
    facts = quick_facts(args.dry_run)
    tools = {
        k: {"present": NA, "working": NA, "reason": "not probed yet"} for k in ("compute_sanitizer", "ncu")
    }
    path.write_text(json.dumps({**facts, **tools}, indent=2) + "\n")
    print(
        f"{facts['device']}; " + ", ".join(f"{k} {v}" for k, v in facts["versions"].items() if v), flush=True
    )
    timeout = PROBE_SECONDS if args.deadline is None else min(PROBE_SECONDS, args.deadline - time.time())
    tools = probe_tools(args.dry_run, timeout)
    path.write_text(json.dumps({**facts, **tools}, indent=2) + "\n")
    for key, fact in tools.items():
        print(f"{key}: working {fact['working']}" + (f" ({fact['reason']})" if fact.get("reason") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
