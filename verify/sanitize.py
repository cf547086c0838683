"""Sanitizer tier of ``make gpu-check``: compute-sanitizer's racecheck, synccheck and memcheck on
each case of ``verify.sanitize_case``, one short process per tool and case.

    python -m verify.sanitize --out DIR [--deadline T] [--jobs N] [--cases a,b] [--dry-run]
                              [--sanitizer PATH | --skip-reason TEXT]

Runs ``compute-sanitizer --tool TOOL --error-exitcode 86 python -m verify.sanitize_case NAME``
for every case (small shapes first) and tool, ``--jobs`` at a time, none started after the
deadline, each stopped after ``RUN_SECONDS`` (or at the deadline plus a grace). A run passes
when the sanitizer reports 0 errors and the case exits 0; it fails when the sanitizer reports
errors (the first ones are quoted) or the case fails; it is skipped when the case's backend is
not available or the sanitizer refuses the machine. racecheck watches shared memory, synccheck
the barriers, memcheck every global access (with PyTorch's caching allocator off, so a read past
a tensor's end is past its allocation); data the one-program Newton kernels exchange through
global memory between barriers is checked by the smoke tier's results.

``--skip-reason TEXT`` (compute-sanitizer absent or refusing, as the env step found): every tool
and case is recorded as skipped with that reason; in the dry run the cases still run once,
plainly, in this process (``verify.sanitize_case.run_case``: triton under the interpreter, cuda
in the host emulator in both thread orders).

Writes ``DIR/sanitizer.jsonl`` (one line per tool and case, as they finish: tool, case, status
passed/failed/skipped/timeout, seconds, detail), ``DIR/sanitizer.md`` (cases × tools) and each
run's output under ``DIR/sanitizer/``; exit status 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from verify.sanitize_case import CASES, NOT_AVAILABLE

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("racecheck", "synccheck", "memcheck")
ERROR_EXIT = 86
RUN_SECONDS = 150.0
GRACE = 20.0
LOG_LIMIT = 200_000  # bytes of a run's output kept (head and tail)
REFUSALS = re.compile(r"device not supported|error 999|librarynotloaded", re.IGNORECASE)


def run_env(dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # memcheck sees each tensor's own allocation
    env.pop("TRITON_INTERPRET", None)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    return env


def case_command(name: str, dry_run: bool) -> list[str]:
    return [sys.executable, "-m", "verify.sanitize_case", *(["--dry-run"] if dry_run else []), name]


def verdict(tool: str, rc: int | None, output: str, seconds: float) -> tuple[str, str]:
    """(status, detail) of one sanitizer run from its exit status (None: stopped) and output."""
    lines = [ln.rstrip() for ln in output.splitlines()]
    m = re.search(r"ERROR SUMMARY: (\d+) error", output)
    errors = int(m.group(1)) if m else None
    if rc is None:
        return "timeout", f"no verdict: stopped after {seconds:.0f} s"
    refusal = next((ln.strip(" =") for ln in lines if REFUSALS.search(ln)), None)
    if refusal and not errors:
        return "skipped", f"{tool} refused: {refusal[:200]}"
    if errors:
        quoted = [
            ln.strip(" =")
            for ln in lines
            if ln.startswith("=========")
            and ln.strip(" =")
            and not re.search("COMPUTE-SANITIZER|ERROR SUMMARY", ln)
        ]
        first = "; ".join(quoted[:3])
        return "failed", f"{errors} error(s): {first[:400]}"
    if rc == NOT_AVAILABLE:
        note = next(
            (ln for ln in lines if "not available" in ln or "not built" in ln), "backend not available"
        )
        return "skipped", note.strip()[:200]
    if rc != 0:
        tail = next((ln.strip() for ln in reversed(lines) if ln.strip(" =")), "")
        return "failed", f"the case failed (exit status {rc}): {tail[:300]}"
    if errors is None:
        return "failed", "no ERROR SUMMARY in the sanitizer's output"
    return "passed", "0 errors"


def _keep(data: bytes) -> bytes:
    if len(data) <= LOG_LIMIT:
        return data
    half = LOG_LIMIT // 2
    return data[:half] + b"\n[... output cut ...]\n" + data[-half:]


class Run:
    """One sanitizer process, its output into its log file under DIR/sanitizer/."""

    def __init__(self, sanitizer: str, tool: str, name: str, dry_run: bool, logs: Path, stop_at: float):
        self.tool, self.name, self.stop_at = tool, name, stop_at
        self.log = logs / f"{tool}-{name}.log"
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", str(ERROR_EXIT), *case_command(name, dry_run)]
        self.sink = open(self.log, "wb")  # noqa: SIM115 (closed in poll)
        self.start = time.time()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=run_env(dry_run), stdout=self.sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def poll(self) -> dict | None:
        """The row once the run has ended (or been stopped), else None."""
        rc = self.proc.poll()
        if rc is None and time.time() < self.stop_at:
            return None
        if rc is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.sink.close()
        output = _keep(self.log.read_bytes())
        self.log.write_bytes(output)
        seconds = time.time() - self.start
        status, detail = verdict(self.tool, rc, output.decode(errors="replace"), seconds)
        return {
            "tool": self.tool,
            "case": self.name,
            "status": status,
            "seconds": round(seconds, 1),
            "detail": detail,
        }


def markdown(rows: list[dict], names: list[str]) -> str:
    """Cases × tools with each run's status; what was not a pass explained below, once per reason."""
    cell = {(r["case"], r["tool"]): r for r in rows}
    lines = ["| case | what | " + " | ".join(TOOLS) + " |", "|---|---|" + "---|" * len(TOOLS)]
    for name in names:
        cells = [cell[name, tool]["status"] if (name, tool) in cell else "" for tool in TOOLS]
        lines.append(f"| {name} | {CASES[name][1]} | " + " | ".join(cells) + " |")
    reasons: dict[str, list[str]] = {}
    for r in rows:
        if r["tool"] != "plain" and r["status"] != "passed":
            reasons.setdefault(f"{r['status']}: {r['detail']}", []).append(f"{r['tool']} {r['case']}")
    for reason, runs in reasons.items():
        which = "every run" if len(runs) == len(names) * len(TOOLS) else ", ".join(runs)
        lines += ["", f"- {which}: {reason}"]
    plain = [r for r in rows if r["tool"] == "plain"]
    if plain:
        lines += ["", "Run without the sanitizer: " + ", ".join(f"{r['case']} {r['status']}" for r in plain)]
    return "\n".join(lines) + "\n"


def plain_run(names: list[str]) -> list[dict]:
    """The dry run's cases once without a sanitizer, in this process: rows with tool "plain"."""
    from verify.sanitize_case import run_case

    rows = []
    for name in names:
        start = time.time()
        try:
            rc, line = run_case(name, dry_run=True)
        except Exception as exc:  # recorded; the next case still runs
            rc, line = 1, f"{name}: {type(exc).__name__}: {exc}"
        status = {0: "passed", NOT_AVAILABLE: "skipped"}.get(rc, "failed")
        detail = line.split(": ", 1)[1] if ": " in line else line
        rows.append(
            {
                "tool": "plain",
                "case": name,
                "status": status,
                "seconds": round(time.time() - start, 1),
                "detail": detail,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verify.sanitize", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for sanitizer.jsonl / .md / logs")
    ap.add_argument("--deadline", type=float, default=None, help="start no run after this time.time()")
    ap.add_argument("--jobs", type=int, default=4, help="sanitizer processes at a time (default 4)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names (default: all)")
    ap.add_argument(
        "--dry-run", action="store_true", help="the cases on the CPU (interpreter, host emulator)"
    )
    ap.add_argument("--sanitizer", default="compute-sanitizer", help="the compute-sanitizer executable")
    ap.add_argument("--skip-reason", default=None, help="record every run as skipped with this reason")
    args = ap.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        ap.error(f"--cases must name cases among {', '.join(CASES)}; got {args.cases!r}")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0").strip() != "1":
        ap.error("--dry-run runs triton under the interpreter: set TRITON_INTERPRET=1")
    deadline = args.deadline if args.deadline is not None else time.time() + 3600
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "sanitizer.jsonl"
    jsonl.write_text("")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{row['tool']:10s} {row['case']:12s} {row['status']:8s} {row['seconds']:6.1f} s {row['detail']}",
            flush=True,
        )

    todo = [(name, tool) for name in names for tool in TOOLS]  # case-major: small shapes first
    if args.skip_reason is not None:
        if args.dry_run:
            for row in plain_run(names):
                emit(row)
        for name, tool in todo:
            emit(
                {"tool": tool, "case": name, "status": "skipped", "seconds": 0.0, "detail": args.skip_reason}
            )
    else:
        logs = args.out / "sanitizer"
        logs.mkdir(exist_ok=True)
        running: list[Run] = []
        while todo or running:
            while todo and len(running) < args.jobs and time.time() < deadline:
                name, tool = todo.pop(0)
                stop_at = min(time.time() + RUN_SECONDS, deadline + GRACE)
                running.append(Run(args.sanitizer, tool, name, args.dry_run, logs, stop_at))
            if todo and time.time() >= deadline:
                for name, tool in todo:
                    emit(
                        {
                            "tool": tool,
                            "case": name,
                            "status": "skipped",
                            "seconds": 0.0,
                            "detail": "deadline",
                        }
                    )
                todo = []
            for run in list(running):
                row = run.poll()
                if row is not None:
                    running.remove(run)
                    emit(row)
            time.sleep(0.2)
    (args.out / "sanitizer.md").write_text(markdown(rows, names))
    counts = {
        s: sum(r["status"] == s for r in rows if r["tool"] != "plain")
        for s in ("passed", "failed", "skipped", "timeout")
    }
    print("sanitizer: " + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
