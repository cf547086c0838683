"""One GPU run, one verdict: build, warm up, smoke, goals and the GPU suite against a deadline.

    python -m bench.gpu_check --out DIR [--budget SECONDS] [--dry-run] [--jobs N]

Run from the project root on a GPU machine with what its image has (python3 with torch,
Triton, pytest; nvcc); it installs nothing and needs no network. Steps, each in its own
process so that a crash in one (a CUDA error poisons its context) does not stop the next:

- build: ``setup.py build_ext --inplace`` of ``intl_kernels._C`` for the present GPU only,
  on all cores (``build.log``);
- warmup: the triton launches of the smoke and goals tiers recorded on meta tensors
  (``intl_kernels.triton.launches``) and compiled into Triton's cache on all cores, so the
  tiers below load kernels instead of compiling them one at a time (``warmup.json``);
- a. smoke: ``bench.gpu_smoke``: every GPU backend against the float64 reference at the goal
  shapes, outputs NaN-poisoned (``smoke.jsonl``, ``smoke.md``);
- b. goals: ``bench.train_step`` (P5) and ``bench.run_gpu --grid goals --modes full`` (P1-P4,
  torch.compile's points last): the bench harness's CSV, goals JSON, markdown and PNGs;
- c. suite: ``pytest -m cuda tests`` with a per-test timeout, JUnit XML (``junit.xml``).

Every tier writes its files as it goes. A tier that cannot start with the time it needs left is
skipped with a line saying so; tiers a and b stop taking new points at 40% and 60% of the
budget, the suite at the deadline. DIR gets ``summary.json`` ({"device", "versions", "tiers":
[{"name", "status", "seconds", "detail"}], "goals"}), ``summary.md`` and ``gpu_check.log``;
the last lines printed are the verdict table. Exit status 1 if a tier failed.

``--dry-run`` runs the same plumbing on the CPU: no build, the warm-up recorded for sm_90 and
two variants compiled, triton under the interpreter and cuda through the host emulator at tiny
shapes, the bench on ``--device cpu``, the suite collected (its tests skip without a GPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET = 540.0
# Seconds a tier needs to be worth starting, and the share of the budget by which tiers a
# and b stop taking new work (so the suite keeps its time).
MIN_SECONDS = {"build": 20, "warmup": 20, "smoke": 30, "goals": 45, "suite": 45}
SOFT_END = {"smoke": 0.40, "goals": 0.60}
GRACE = 30.0  # after its soft end a tier is killed if it has not stopped by itself
DRY_RUN_WARMUP_VARIANTS = 2


class Log:
    """Prints and appends to DIR/gpu_check.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (closed at exit)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")


# ---------------------------------------------------------------------------- environment


def _command_output(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def environment(dry_run: bool) -> tuple[str, dict, str | None]:
    """(device, versions, compute capability such as "90" or None)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    nvcc = _command_output(["nvcc", "--version"])
    m = re.search(r"release ([\d.]+)", nvcc)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda or "",
        "nvcc": m.group(1) if m else "",
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),
    }
    if dry_run or not torch.cuda.is_available():
        return f"cpu ({platform.processor() or platform.machine()}, dry run)", versions, None
    props = torch.cuda.get_device_properties(0)
    cc = f"{props.major}{props.minor}"
    return f"{props.name}, sm_{cc}, {props.multi_processor_count} SMs", versions, cc


# ---------------------------------------------------------------------------- tiers


def run_step(
    name: str, cmd: list[str], env: dict, end: float, log: Log, out_file: Path | None = None
) -> int | None:
    """Run ``cmd`` from the project root, its output into the log line by line, prefixed with the
    step name (or into ``out_file``); killed with its process group at ``end`` (returns None
    then), else its exit status."""
    log(f"[{name}] $ {' '.join(cmd)}")
    sink = open(out_file, "wb") if out_file else None  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    pending, killed = b"", False

    def emit(data: bytes, final: bool = False) -> bytes:
        if sink:
            sink.write(data)
            return b""
        *lines, rest = data.split(b"\n")
        if final and rest:
            lines, rest = [*lines, rest], b""
        for line in lines:
            log(f"[{name}] " + line.decode(errors="replace").rstrip())
        return rest

    while True:
        if time.time() >= end and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue  # nothing this second: check the deadline again
        chunk = os.read(fd, 65536)
        if not chunk:
            break  # end of output: every process of the step has closed it
        pending = emit(pending + chunk)
    emit(pending, final=True)
    proc.wait()
    if sink:
        sink.close()
    return None if killed else proc.returncode


def tier_env(interpret: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS under the smoke's poisoning
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def build(args, cc, end, log) -> tuple[str, str]:
    if args.dry_run:
        return "skipped", "dry run: the extension installed here is used"
    env = tier_env(False)
    env["INTL_KERNELS_CUDA_ARCHS"] = cc
    env["MAX_JOBS"] = str(args.jobs)
    rc = run_step(
        "build", [sys.executable, "setup.py", "build_ext", "--inplace"], env, end, log, args.out / "build.log"
    )
    if rc is None:
        return "failed", "stopped at the deadline (build.log)"
    built = sorted(glob.glob(str(ROOT / "intl_kernels" / "_C*.so")))
    if rc != 0 or not built:
        return "failed", f"exit status {rc}; see build.log"
    return "passed", f"sm_{cc}, {args.jobs} jobs: {Path(built[-1]).name}"


def warmup_main(out: Path, dry_run: bool, jobs: int, deadline: float) -> int:
    """The warm-up step (run in its own process): record, then compile in parallel."""
    from bench import gpu_smoke
    from bench.compile_budget import record_goals
    from intl_kernels.triton import launches

    start = time.time()
    with launches.record(gpu=not dry_run) as rec:
        gpu_smoke.record_launches(dry_run)
        record_goals()
    variants = rec.variants[:DRY_RUN_WARMUP_VARIANTS] if dry_run else rec.variants
    print(
        f"recorded {rec.launches} launches: {len(rec.variants)} distinct compiles, {rec.benchmarks} "
        f"autotune benchmarks; compiling {len(variants)} on {jobs} processes",
        flush=True,
    )
    results = launches.compile_all(variants, jobs=jobs, log=lambda m: print(m, flush=True), deadline=deadline)
    failures = [f"{v.kernel} {v.config()}: {err}" for v, _, _, err in results if err]
    report = {
        "target": "sm_90 (stand-in, dry run)" if dry_run else "present GPU",
        "recorded_compiles": len(rec.variants),
        "benchmarks": rec.benchmarks,
        "compiled": sum(1 for *_, err in results if err is None),
        "seconds": round(time.time() - start, 1),
        "compile_seconds_one_core": round(sum(t for _, t, _, err in results if err is None), 1),
        "failures": failures,
    }
    (out / "warmup.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"compiled {report['compiled']}/{len(variants)} in {report['seconds']} s", flush=True)
    return 1 if failures else 0


def warmup(args, end, log) -> tuple[str, str]:
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--out",
        str(args.out),
        "--jobs",
        str(args.jobs),
        "--warmup-step",
        "--deadline",
        str(end),
    ] + (["--dry-run"] if args.dry_run else [])
    rc = run_step("warmup", cmd, tier_env(False), end + GRACE, log)
    report = _read_json(args.out / "warmup.json")
    if rc is None or report is None:
        return "failed", "stopped at the deadline" if rc is None else f"exit status {rc}"
    detail = (
        f"{report['compiled']} of {report['recorded_compiles']} variants compiled in {report['seconds']} s "
        f"({report['benchmarks']} autotune benchmarks to come)"
    )
    return ("passed" if rc == 0 else "failed"), detail + (f"; {len(report['failures'])} failed" if rc else "")


def smoke(args, end, log) -> tuple[str, str]:
    cmd = [sys.executable, "-m", "bench.gpu_smoke", "--out", str(args.out), "--deadline", str(end)]
    rc = run_step(
        "smoke", cmd + (["--dry-run"] if args.dry_run else []), tier_env(args.dry_run), end + GRACE, log
    )
    rows = [json.loads(line) for line in _read_lines(args.out / "smoke.jsonl")]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "error", "n/a")}
    detail = (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['n/a']} not applicable"
    )
    if rc is None:
        return "failed", "stopped at the deadline; " + detail
    return ("passed" if rc == 0 else "failed"), detail


def goals(args, end, log) -> tuple[str, str]:
    env = tier_env(args.dry_run)
    out = ["--out", str(args.out), "--deadline", str(end)]
    if args.dry_run:
        grid = [
            "--device",
            "cpu",
            "--grid",
            "quick",
            "--providers",
            "official,iternorm_pytorch,batchnorm,cublas,triton",
        ]
        train = ["--device", "cpu", "--smoke", "--providers", "official,triton"]
    else:
        grid, train = ["--grid", "goals"], []
    # P5 first (about half a minute), then the grid, whose torch.compile points come last
    rc2 = run_step("goals", [sys.executable, "-m", "bench.train_step", *train, *out], env, end + GRACE, log)
    rc1 = run_step(
        "goals",
        [sys.executable, "-m", "bench.run_gpu", *grid, "--modes", "full", *out],
        env,
        end + GRACE,
        log,
    )
    found = _goals(args.out)
    measured = [g for g in found.values() if g.get("met") is not None]
    met = sum(1 for g in measured if g["met"])
    detail = f"{met} of {len(measured)} measured goals met"
    if rc1 is None or rc2 is None:
        return "failed", "stopped at the deadline; " + detail
    if rc1 or rc2:
        return "failed", f"exit status {rc1} (grid), {rc2} (train step); " + detail
    return "passed", detail


def suite(args, end, log) -> tuple[str, str]:
    junit = args.out / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests",
        "-p",
        "bench.pytest_deadline",
        "--per-test-timeout",
        str(args.per_test_timeout),
        "--deadline",
        str(end),
        f"--junitxml={junit}",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
    ]
    if not args.dry_run and _has_module("xdist") and args.suite_workers > 1:
        cmd += ["-n", str(args.suite_workers)]
    rc = run_step("suite", cmd, tier_env(False), end + GRACE, log)
    counts = _junit_counts(junit)
    detail = ", ".join(f"{v} {k}" for k, v in counts.items()) if counts else "no JUnit XML written"
    if rc is None:
        return "failed", "stopped at the deadline; " + detail
    return ("passed" if rc == 0 else "failed"), f"exit status {rc}; " + detail


# ---------------------------------------------------------------------------- results


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _goals(out: Path) -> dict:
    """The goals of the bench run in ``out`` (P1-P4 from its goals JSON, P5 from the train JSON)."""
    found: dict = {}
    for path in sorted(out.glob("*-goals.json")):
        found.update((_read_json(path) or {}).get("goals", {}))
    for path in sorted(out.glob("*-train.json")):
        p5 = (_read_json(path) or {}).get("P5")
        if p5:
            found["P5"] = {
                "what": "whitening+loss share of the training step",
                "per_provider": p5,
                "met": None,
            }
    return found


def _junit_counts(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def verdict_table(tiers: list[dict]) -> str:
    lines = [f"{'tier':8s} {'status':8s} {'seconds':>8s}  detail"]
    for t in tiers:
        lines.append(f"{t['name']:8s} {t['status']:8s} {t['seconds']:8.1f}  {t['detail']}")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v)
    head = f"{summary['date']}; budget {summary['budget_s']:.0f} s; {versions}"
    lines = [f"# gpu-check: {summary['device']}", "", head]
    lines += ["", "| tier | status | seconds | detail |", "|---|---|---:|---|"]
    for t in summary["tiers"]:
        lines.append(f"| {t['name']} | {t['status']} | {t['seconds']:.1f} | {t['detail']} |")
    measured = {k: g for k, g in summary["goals"].items() if g.get("ratio") is not None}
    if measured:
        lines += ["", "| goal | what | ratio | goal | verdict |", "|---|---|---:|---:|---|"]
        for name, g in measured.items():
            lines.append(
                f"| {name} | {g['what']} | {g['ratio']:.2f}x | {g['goal']:.2f}x | "
                f"{'met' if g['met'] else 'NOT met'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="result directory (created)")
    ap.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET, help=f"seconds in all (default {DEFAULT_BUDGET:.0f})"
    )
    ap.add_argument("--dry-run", action="store_true", help="the plumbing on the CPU (tiny shapes)")
    ap.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="build and compile processes (default: all)"
    )
    ap.add_argument(
        "--per-test-timeout", type=float, default=120.0, help="suite: seconds per test (default 120)"
    )
    ap.add_argument(
        "--suite-workers", type=int, default=4, help="suite: pytest-xdist workers where installed (default 4)"
    )
    ap.add_argument("--warmup-step", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget <= 0 or args.jobs < 1:
        ap.error(f"--budget must be > 0 and --jobs >= 1, got {args.budget} and {args.jobs}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.warmup_step:
        return warmup_main(args.out, args.dry_run, args.jobs, args.deadline or time.time() + args.budget)

    start = time.time()
    deadline = start + args.budget
    log = Log(args.out / "gpu_check.log")
    device, versions, cc = environment(args.dry_run)
    if not args.dry_run and cc is None:
        ap.error("no CUDA device here (--dry-run runs the plumbing on the CPU)")
    log(f"gpu-check on {device}; " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    log(
        f"budget {args.budget:.0f} s (until {dt.datetime.fromtimestamp(deadline):%H:%M:%S}); {args.jobs} jobs"
    )
    steps = [
        ("build", lambda end: build(args, cc, end, log), deadline),
        ("warmup", lambda end: warmup(args, end, log), deadline),
        ("smoke", lambda end: smoke(args, end, log), start + SOFT_END["smoke"] * args.budget),
        ("goals", lambda end: goals(args, end, log), start + SOFT_END["goals"] * args.budget),
        ("suite", lambda end: suite(args, end, log), deadline),
    ]
    tiers = []
    for name, step, end in steps:
        t0 = time.time()
        left = min(end, deadline) - t0
        if left < MIN_SECONDS[name]:
            status, detail = (
                "skipped",
                f"{max(left, 0):.0f} s left before its deadline, it needs {MIN_SECONDS[name]} s",
            )
        else:
            try:
                status, detail = step(min(end, deadline))
            except Exception as exc:  # a broken step is a failed tier; the next still runs
                status, detail = "failed", f"{type(exc).__name__}: {exc}"
        tiers.append(
            {"name": name, "status": status, "seconds": round(time.time() - t0, 1), "detail": detail}
        )
        log(f"== {name}: {status} ({tiers[-1]['seconds']} s): {detail}")
    summary = {
        "device": device,
        "versions": versions,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "dry_run": args.dry_run,
        "tiers": tiers,
        "goals": _goals(args.out),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(summary_markdown(summary))
    log(f"wrote {args.out}/summary.json, summary.md, gpu_check.log ({time.time() - start:.0f} s in all)")
    log(verdict_table(tiers))
    return 1 if any(t["status"] == "failed" for t in tiers) else 0


if __name__ == "__main__":
    sys.exit(main())
