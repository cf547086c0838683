"""One GPU run, one verdict: what only a GPU can decide first, then the benchmarks and the suite.

    python -m verify.gpu_check --out DIR [--budget SECONDS] [--dry-run] [--jobs N] [--tiers a,b]

Run from the project root on a GPU machine with what its image has (python3 with torch,
Triton, pytest; nvcc); it installs nothing and needs no network. Steps, in this order, each in
its own process so that a crash in one (a CUDA error poisons its context) does not stop the next:

1. env: ``verify.env``: GPU, driver, versions (python, torch, Triton, numpy), torch's CUDA
   against nvcc's, ninja, and whether compute-sanitizer and ncu work here (each run on a tiny
   program; ``env.json``). ``summary.json`` is written as soon as it ends and rewritten after
   every tier, so a run stopped at any point leaves the facts and what finished;
2. build: ``setup.py build_ext --inplace`` of ``intl_kernels._C`` for the present GPU only,
   on all cores (``build.log``);
3. warmup: the triton launches of the smoke, sanitizer and goals tiers recorded on meta tensors
   (``intl_kernels.triton.launches``) and compiled into Triton's cache on all cores, so the
   tiers below load kernels instead of compiling them one at a time (``warmup.json``);
4. smoke: ``verify.gpu_smoke``: every GPU backend, forward and backward, at r = 8, 16, 32, 64 and
   at the goal shapes, in every precision mode and dtype, against the float64 reference,
   outputs NaN-poisoned (``smoke.jsonl``, ``smoke.md``);
5. sanitizer: ``verify.sanitize``: compute-sanitizer racecheck, synccheck and memcheck on each
   case of ``verify.sanitize_case`` (the cuda backend's kernels, the triton one-program Newton
   kernels; small shapes and a goal shape), one process per tool and case; skipped with the env
   step's reason where compute-sanitizer is absent or refuses (``sanitizer.jsonl``,
   ``sanitizer.md``, ``sanitizer/``);
6. goals: ``bench.train_step`` (P5) and ``bench.run_gpu --grid goals --modes full`` (P1-P4,
   torch.compile's points last): the bench harness's CSV, goals JSON, markdown and PNGs;
7. suite: ``pytest -m cuda tests`` with a per-test timeout, never-GPU-run paths first (tf32
   modes, small r, device guards, compute-sanitizer; ``verify.pytest_deadline``), JUnit XML
   (``junit.xml``, the order in ``suite-order.json``).

Time shares of the budget (540 s by default): env at most ENV_SECONDS; build and warm-up as long
as they need (about a minute each predicted); the smoke tier takes no new case after 35% of the
budget (189 s), the sanitizer tier starts no run after 55% (297 s), the goals tier takes no new
point after 75% (405 s), and the suite runs to the deadline. A tier that ends early leaves its
time to the next. A tier that cannot start with the time it needs (MIN_SECONDS) is skipped with
a line saying so. Every tier writes its files as it goes. DIR gets ``summary.json``
({"device", "versions", "env", "plan", "tiers": [{"name", "status", "seconds", "detail"}],
"goals"}), ``summary.md`` and ``gpu_check.log``; the last lines printed are the verdict table.
Exit status 1 if a tier failed.

``--dry-run`` runs the same plumbing on the CPU: the env step with GPU facts n/a, no build, the
warm-up recorded for sm_90 and two variants compiled, triton under the interpreter and cuda
through the host emulator at tiny shapes (the sanitizer tier's cases too, in both thread orders,
where compute-sanitizer is absent), the bench on ``--device cpu``, the suite collected (its tests
skip without a GPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import select
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET = 540.0
TIERS = ("env", "build", "warmup", "smoke", "sanitizer", "goals", "suite")
# Seconds a tier needs to be worth starting (the env step always runs), and the share of the
# budget after which the smoke, sanitizer and goals tiers take no new work.
MIN_SECONDS = {"env": 0, "build": 20, "warmup": 20, "smoke": 30, "sanitizer": 20, "goals": 45, "suite": 45}
SOFT_END = {"smoke": 0.35, "sanitizer": 0.55, "goals": 0.75}
ENV_SECONDS = 90.0  # the env step's cap (its probes time out within it)
GRACE = 30.0  # after its soft end a tier is killed if it has not stopped by itself
DRY_RUN_WARMUP_VARIANTS = 2
SANITIZER_JOBS = 4


class Log:
    """Prints and appends to DIR/gpu_check.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (closed at exit)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")


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


def env_tier(args, end, log) -> tuple[str, str]:
    cmd = [sys.executable, "-m", "verify.env", "--out", str(args.out), "--deadline", str(end - 5)]
    rc = run_step("env", cmd + (["--dry-run"] if args.dry_run else []), tier_env(False), end, log)
    facts = _read_json(args.out / "env.json")
    if facts is None:
        return "failed", "no env.json written" + (
            " (stopped at its time limit)" if rc is None else f" (exit status {rc})"
        )
    tools = "; ".join(
        f"{name} " + ("works" if f.get("working") is True else f"n/a ({f.get('reason', '')})")
        for name, f in (
            ("compute-sanitizer", facts.get("compute_sanitizer", {})),
            ("ncu", facts.get("ncu", {})),
        )
    )
    cuda = facts["cuda"]
    detail = (
        f"CUDA: torch {cuda['torch']}, nvcc {cuda['nvcc']} (majors match: {cuda['majors_match']}); {tools}"
    )
    if rc is None:
        return "failed", "stopped at its time limit with the quick facts written; " + detail
    return ("passed" if rc == 0 else "failed"), detail


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
    from intl_kernels.triton import launches
    from verify import gpu_smoke, sanitize_case
    from verify.compile_budget import record_goals

    start = time.time()
    with launches.record(gpu=not dry_run) as rec:
        gpu_smoke.record_launches(dry_run)
        sanitize_case.record_launches(dry_run)
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
        "verify.gpu_check",
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
    cmd = [sys.executable, "-m", "verify.gpu_smoke", "--out", str(args.out), "--deadline", str(end)]
    rc = run_step(
        "smoke", cmd + (["--dry-run"] if args.dry_run else []), tier_env(args.dry_run), end + GRACE, log
    )
    rows = [json.loads(line) for line in _read_lines(args.out / "smoke.jsonl")]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "error", "n/a", "skipped")}
    detail = (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['n/a']} not applicable"
    ) + (f", {counts['skipped']} skipped at its time share" if counts["skipped"] else "")
    if rc is None:
        return "failed", "stopped at the deadline; " + detail
    return ("passed" if rc == 0 else "failed"), detail


def sanitizer_skip_reason(facts: dict) -> str | None:
    """Why the sanitizer tier cannot run compute-sanitizer here (None: it works)."""
    tool = facts.get("compute_sanitizer") or {}
    if tool.get("working") is True:
        return None
    reason = str(tool.get("reason") or "not probed")
    return f"compute-sanitizer does not work here: {reason}" if tool.get("present") is True else reason


def sanitizer(args, facts, end, log) -> tuple[str, str]:
    skip = sanitizer_skip_reason(facts)
    cmd = [sys.executable, "-m", "verify.sanitize", "--out", str(args.out), "--deadline", str(end)]
    cmd += ["--jobs", str(min(SANITIZER_JOBS, args.jobs))] + (["--dry-run"] if args.dry_run else [])
    if args.sanitize_cases:
        cmd += ["--cases", args.sanitize_cases]
    if skip:
        cmd += ["--skip-reason", skip]
    else:
        cmd += ["--sanitizer", facts["compute_sanitizer"]["path"]]
    rc = run_step("sanitizer", cmd, tier_env(args.dry_run), end + GRACE, log)
    rows = [json.loads(line) for line in _read_lines(args.out / "sanitizer.jsonl")]
    runs = [r for r in rows if r["tool"] != "plain"]
    plain = [r for r in rows if r["tool"] == "plain"]
    counts = {s: sum(r["status"] == s for r in runs) for s in ("passed", "failed", "skipped", "timeout")}
    detail = ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" (tool × case, of {len(runs)})"
    if rc is None:
        return "failed", "stopped at the deadline; " + detail
    if skip:
        ran = ""
        if plain:
            ok = sum(r["status"] == "passed" for r in plain)
            ran = (
                f"; without it, {ok} of {len(plain)} cases passed "
                "(triton under the interpreter, cuda in the host emulator in both thread orders)"
            )
        return ("skipped" if rc == 0 else "failed"), skip + ran
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


def suite(args, facts, end, log) -> tuple[str, str]:
    junit, order = args.out / "junit.xml", args.out / "suite-order.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests",
        "-p",
        "verify.pytest_deadline",
        "--per-test-timeout",
        str(args.per_test_timeout),
        "--deadline",
        str(end),
        "--order-file",
        str(order),
        f"--junitxml={junit}",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
    ]
    tool = facts.get("compute_sanitizer") or {}
    if not args.dry_run and tool.get("present") is True and tool.get("working") is not True:
        # they would fail on the machine, not on the code; the sanitizer tier says why
        cmd += ["-k", "not compute_sanitizer"]
        log(f"[suite] compute-sanitizer tests deselected: {tool.get('reason')}")
    if not args.dry_run and _has_module("xdist") and args.suite_workers > 1:
        cmd += ["-n", str(args.suite_workers)]
    rc = run_step("suite", cmd, tier_env(False), end + GRACE, log)
    counts = _junit_counts(junit)
    detail = ", ".join(f"{v} {k}" for k, v in counts.items()) if counts else "no JUnit XML written"
    groups = (_read_json(order) or {}).get("groups")
    if groups:
        detail += "; order: " + ", ".join(f"{n} {label}" for label, n in groups.items() if n)
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
    lines = [f"{'tier':9s} {'status':8s} {'seconds':>8s}  detail"]
    for t in tiers:
        lines.append(f"{t['name']:9s} {t['status']:8s} {t['seconds']:8.1f}  {t['detail']}")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v)
    head = f"{summary['date']}; budget {summary['budget_s']:.0f} s; {versions}"
    lines = [f"# gpu-check: {summary['device']}", "", head]
    env = summary.get("env") or {}
    if env:
        gpu, cuda, ninja = env.get("gpu", {}), env.get("cuda", {}), env.get("ninja", {})
        facts = [
            f"GPU {gpu.get('name')} (capability {gpu.get('capability')}, {gpu.get('sms')} SMs), "
            f"driver {env.get('driver')}",
            f"CUDA: torch {cuda.get('torch')}, nvcc {cuda.get('nvcc')}, "
            f"majors match: {cuda.get('majors_match')}",
            f"ninja: {ninja.get('version') or 'absent'}",
        ]
        for key, name in (("compute_sanitizer", "compute-sanitizer"), ("ncu", "ncu")):
            tool = env.get(key, {})
            state = (
                "works" if tool.get("working") is True else f"does not work here ({tool.get('reason', '')})"
            )
            facts.append(f"{name}: {state}")
        lines += [""] + [f"- {f}" for f in facts]
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


def write_summary(out: Path, summary: dict) -> None:
    """summary.json and summary.md, each replaced whole (written beside, then renamed)."""
    for name, text in (
        ("summary.json", json.dumps(summary, indent=2) + "\n"),
        ("summary.md", summary_markdown(summary)),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def tier_ends(start: float, budget: float) -> dict[str, float]:
    """time.time() after which each tier takes no new work (the env step: its cap)."""
    deadline = start + budget
    ends = {name: deadline for name in TIERS}
    ends["env"] = min(start + ENV_SECONDS, deadline)
    for name, share in SOFT_END.items():
        ends[name] = start + share * budget
    return ends


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verify.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="result directory (created)")
    ap.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET, help=f"seconds in all (default {DEFAULT_BUDGET:.0f})"
    )
    ap.add_argument("--dry-run", action="store_true", help="the plumbing on the CPU (tiny shapes)")
    ap.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="build and compile processes (default: all)"
    )
    ap.add_argument(
        "--tiers",
        default=",".join(TIERS),
        help="comma-separated tiers to run, in the fixed order (env always runs)",
    )
    ap.add_argument(
        "--sanitize-cases",
        default=None,
        help="sanitizer: comma-separated cases of verify.sanitize_case (default all)",
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
    selected = {t for t in args.tiers.split(",") if t} | {"env"}
    if not selected <= set(TIERS):
        ap.error(f"--tiers must name tiers among {', '.join(TIERS)}; got {args.tiers!r}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.warmup_step:
        return warmup_main(args.out, args.dry_run, args.jobs, args.deadline or time.time() + args.budget)

    start = time.time()
    deadline = start + args.budget
    ends = tier_ends(start, args.budget)
    log = Log(args.out / "gpu_check.log")
    log(
        f"gpu-check{' dry run' if args.dry_run else ''}: budget {args.budget:.0f} s "
        f"(until {dt.datetime.fromtimestamp(deadline):%H:%M:%S}), {args.jobs} jobs; tiers in order: "
        + ", ".join(
            f"{n} (to {ends[n] - start:.0f} s)" + ("" if n in selected else " [not selected]") for n in TIERS
        )
    )
    summary = {
        "device": "unknown (the env step has not ended)",
        "versions": {},
        "env": {},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "dry_run": args.dry_run,
        "plan": [
            {"name": n, "ends_at_s": round(ends[n] - start, 1), "selected": n in selected} for n in TIERS
        ],
        "tiers": [{"name": n, "status": "pending", "seconds": 0.0, "detail": "not run yet"} for n in TIERS],
        "goals": {},
    }
    state: dict = {"facts": {}, "cc": None}
    steps = {
        "env": lambda end: env_tier(args, end, log),
        "build": lambda end: build(args, state["cc"], end, log),
        "warmup": lambda end: warmup(args, end, log),
        "smoke": lambda end: smoke(args, end, log),
        "sanitizer": lambda end: sanitizer(args, state["facts"], end, log),
        "goals": lambda end: goals(args, end, log),
        "suite": lambda end: suite(args, state["facts"], end, log),
    }
    no_device = None
    for i, name in enumerate(TIERS):
        t0 = time.time()
        end = min(ends[name], deadline)
        left = end - t0
        if name not in selected:
            status, detail = "skipped", "not selected (--tiers)"
        elif no_device:
            status, detail = "skipped", no_device
        elif left < MIN_SECONDS[name] or left <= 0:
            status, detail = (
                "skipped",
                f"{max(left, 0):.0f} s left before its deadline, it needs {MIN_SECONDS[name]} s",
            )
        else:
            try:
                status, detail = steps[name](end)
            except Exception as exc:  # a broken step is a failed tier; the next still runs
                status, detail = "failed", f"{type(exc).__name__}: {exc}"
        summary["tiers"][i] = {
            "name": name,
            "status": status,
            "seconds": round(time.time() - t0, 1),
            "detail": detail,
        }
        log(f"== {name}: {status} ({summary['tiers'][i]['seconds']} s): {detail}")
        if name == "env":
            facts = _read_json(args.out / "env.json") or {}
            state["facts"] = facts
            summary["device"] = facts.get("device", "unknown (no env.json)")
            summary["versions"] = facts.get("versions", {})
            summary["env"] = {k: v for k, v in facts.items() if k not in ("device", "versions")}
            capability = str((facts.get("gpu") or {}).get("capability", ""))
            state["cc"] = capability.replace(".", "") if capability[:1].isdigit() else None
            if not args.dry_run and state["cc"] is None:
                no_device = "no CUDA device here (--dry-run runs the plumbing on the CPU)"
        summary["goals"] = _goals(args.out)
        write_summary(args.out, summary)
    log(f"wrote {args.out}/summary.json, summary.md, gpu_check.log ({time.time() - start:.0f} s in all)")
    log(verdict_table(summary["tiers"]))
    if no_device:
        print(f"gpu-check: {no_device}", file=sys.stderr)
        return 2
    return 1 if any(t["status"] == "failed" for t in summary["tiers"]) else 0


if __name__ == "__main__":
    sys.exit(main())
