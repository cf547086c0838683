"""Triton without a GPU: the launch recorder, the compile budget of the goal points, and the
resource gate (every kept config compiled for sm_80 and sm_90 within shared memory, no spills).

The interpreter tests check what the kernels compute; these check what a GPU would meet:
how many compiles a first run costs and whether each compiled kernel fits. They run in
processes without TRITON_INTERPRET (the interpreter does not compile).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from intl_kernels.triton.resources import SHARED_LIMIT, problems

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _python(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_recorder_counts_distinct_specializations_and_autotune_events():
    """One compile per (kernel, specialization, options); an integer 1 and a multiple of 16 are
    specializations, dtypes too; an autotuner benchmarks every pruned config once per new key."""
    proc = _python(
        """
        import torch
        from intl_kernels.triton import launches, whiten as W
        z = lambda *s, dt=torch.float32: torch.empty(*s, dtype=dt, device="meta")
        with launches.record() as a:
            W._whiten_rowstats(W._as4d(z(2, 8, 64)), 0.0)
            W._whiten_rowstats(W._as4d(z(2, 8, 64)), 0.0)       # same shape: no new compile
            W._whiten_rowstats(W._as4d(z(3, 8, 48)), 0.0)       # still multiples of 16: none
        with launches.record() as b:
            W._whiten_rowstats(W._as4d(z(2, 8, 64)), 0.0)
            W._whiten_rowstats(W._as4d(z(2, 8, 63)), 0.0)       # n, strides not divisible by 16
            W._whiten_rowstats(W._as4d(z(2, 8, 64, dt=torch.bfloat16)), 0.0)
        with launches.record() as c:  # r = 300: the autotuned apply (two configs per kind)
            S = z(1, 300, 300)
            for n in (4000, 4096, 8192):  # 4000 and 4096: one size class
                W._whiten_apply(S, W._as4d(z(1, 300, n)), z(1, 300, 1), z(1, 1, 1), z(1, 1, 1),
                                W._as4d(z(1, 300, n)), prec="ieee")
        print(len(a.variants), len(b.variants), len(c.autotune_events), c.benchmarks, a.launches)
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b, events, benchmarks, launches = map(int, proc.stdout.split())
    assert (a, b, launches) == (1, 3, 3)
    assert events == 2 and benchmarks == 4


def test_compile_all_compiles_in_parallel_and_stops_at_the_deadline():
    proc = _python(
        """
        import time, torch
        from intl_kernels.triton import launches, whiten as W
        with launches.record() as rec:
            for n in (64, 63):
                W._whiten_rowstats(W._as4d(torch.empty(2, 8, n, device="meta")), 0.0)
        done = launches.compile_all(rec.variants, jobs=2)
        late = launches.compile_all(rec.variants, jobs=2, deadline=time.time() - 1)
        print([err for *_, err in done], [err for *_, err in late])
        print(all(res["shared"] >= 0 and res["registers"] > 0 for _, _, res, _ in done))
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors, ok = proc.stdout.strip().splitlines()[-2:]
    assert errors == "[None, None] ['deadline', 'deadline']" and ok == "True"


def test_layer_launches_fill_a_132_sm_gpu():
    """Every streaming launch of the IterNorm layer (row statistics, covariance and its
    reduction, apply; forward and backward) at the ResNet-50 shapes (N = 256) starts at least
    one program per SM of a 132-SM GPU."""
    proc = _python(
        """
        import torch
        from bench.goals import RESNET50_STAGES
        from bench.providers import make_case
        from intl_kernels.triton import launches
        streaming = ("_whiten_rowstats_kernel", "_whiten_gram_kernel", "_whiten_gram_reduce_kernel",
                     "_whiten_apply_kernel")
        for shape in RESNET50_STAGES:
            for dtype in ("float32", "bfloat16"):
                with launches.record() as rec:
                    make_case("layer", "triton", shape, dtype, "full", "meta").fn()
                seen = {}
                for kernel, (x, y, z) in rec.grids:
                    if kernel in streaming:
                        seen[kernel] = min(seen.get(kernel, x * y * z), x * y * z)
                print(shape, dtype, sorted(seen.items()))
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 10, proc.stdout
    for line in lines:
        programs = dict(eval(line.split(") ", 1)[1].split(" ", 1)[1]))
        assert len(programs) == 4, line
        assert min(programs.values()) >= 132, line


def test_goal_points_fit_the_compile_budget_and_the_committed_report_is_current(tmp_path):
    out = tmp_path / "budget.json"
    proc = _python(
        f"from bench import compile_budget; raise SystemExit(compile_budget.main(['--out', {str(out)!r}]))"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    goals = rep["goals"]
    assert goals["compiles"] <= 120 and goals["benchmarks"] <= 200, goals
    # every kernel of the forward and backward is launched at the goal points
    assert len(goals["per_kernel"]) == 8 and all(c["compiles"] >= 1 for c in goals["per_kernel"].values())
    committed = json.loads((ROOT / "bench" / "results" / "compile-budget-sm90.json").read_text())
    assert committed["goals"]["per_kernel"] == goals["per_kernel"], (
        "bench/results/compile-budget-sm90.json is stale: rerun python -m bench.compile_budget --compile"
    )
    assert committed["compile_seconds"]["variants"] == goals["compiles"]
    assert not committed["compile_seconds"]["failures"]


def test_problems_name_shared_memory_and_spills():
    fits = {"shared": 100_000, "registers": 128, "stack": 0, "spill_stores": 0, "spill_loads": 0}
    assert problems(fits, 90) == [] and problems(fits, 80) == []
    big = dict(fits, shared=200_000)
    assert problems(big, 90) == [] and problems(big, 80) == [
        f"shared memory 200000 B > sm_80 limit {SHARED_LIMIT[80]} B per block"
    ]
    spills = dict(fits, registers=255, stack=40, spill_stores=48, spill_loads=36)
    assert problems(spills, 90) == ["spills (48 B stores, 36 B loads, 40 B stack, 255 registers)"]


@pytest.mark.slow
def test_resource_gate_reports_a_config_that_does_not_fit():
    """A config beyond sm_90's shared memory (the covariance backward with BLOCK_K 512 in bf16,
    a 64 × 512 tile of Z and one of Ȳ per pipeline stage) is compiled and named, with its numbers."""
    proc = _python(
        """
        import torch
        from intl_kernels.triton import launches, whiten as W
        from intl_kernels.triton.resources import problems
        W.gram_config = lambda r, dtype, prec: ({"BLOCK_K": 512}, 8, 3)
        z = torch.empty(1, 64, 8192, dtype=torch.bfloat16, device="meta")
        mean, rscale = torch.empty(1, 64, 1, device="meta"), torch.empty(1, 1, 1, device="meta")
        with launches.record(90) as rec:
            W._whiten_gram(W._as4d(z), divisor=1.0, sqrt_eps=0.0, prec="ieee", mean=mean, rscale=rscale,
                           dy4=W._as4d(z))
        (v,) = [v for v in rec.variants if v.kernel == "_whiten_gram_kernel"]
        ((_, _, res, err),) = launches.compile_all([v], jobs=1)
        assert err is None, err
        print(v.config())
        print(problems(res, 90))
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    config, found = proc.stdout.strip().splitlines()[-2:]
    assert "'BLOCK_K': 512" in config and "'HAS_DY': True" in config
    assert "shared memory" in found and "> sm_90 limit 232448 B per block" in found


@pytest.mark.slow
def test_resource_gate_every_kept_config_fits_sm80_and_sm90():
    proc = subprocess.run(
        [sys.executable, "-m", "intl_kernels.triton.compile_check", "--arch", "80,90"],
        cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert " 0 failures" in out, out[-8000:]
    for kernel in (
        "_whiten_gram_kernel",
        "_whiten_apply_kernel",
        "_whiten_mm_kernel",
        "_whiten_newton_bwd_kernel",
    ):
        assert f"{kernel:34s} sm_80" in out and f"{kernel:34s} sm_90" in out, kernel
