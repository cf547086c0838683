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


def test_newton_adjoint_on_sm80_takes_the_tiled_products_where_one_program_spills():
    """sm_80: the one-program adjoint at BLOCK 64 spills unless r is a multiple of 16, so those r
    take the tiled products there; sm_90 keeps one program per group at every r <= 64."""
    proc = _python(
        """
        import torch
        from intl_kernels.triton import launches, whiten as W
        for arch in (80, 90):
            for r in (32, 40, 48, 63, 64):
                z = torch.empty(2, r, 4, 49, device="meta")
                with launches.record(arch) as rec:
                    y, *stats = W._whiten_fwd(z, 3, 1e-5, 196.0, "ieee", out=torch.empty_like(z))
                    W._whiten_bwd(torch.empty_like(z), z, *stats, 196.0, "ieee", out=torch.empty_like(z))
                names = {v.kernel for v in rec.variants}
                print(arch, r, "_whiten_newton_fwd_kernel" in names, "_whiten_newton_bwd_kernel" in names,
                      "_whiten_mm_kernel" in names)
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {tuple(map(int, line.split()[:2])): line.split()[2:] for line in proc.stdout.strip().splitlines()}
    for (arch, r), (fwd, bwd, mm) in rows.items():
        one = arch == 90 or r % 16 == 0 or r <= 32
        assert fwd == "True" and bwd == str(one) and mm == str(not one), (arch, r, fwd, bwd, mm)
    assert len(rows) == 10


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
        f"from verify import compile_budget; raise SystemExit(compile_budget.main(['--out', {str(out)!r}]))"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    goals = rep["goals"]
    assert goals["compiles"] <= 120 and goals["benchmarks"] <= 200, goals
    # every kernel of the forward and backward is launched at the goal points
    assert len(goals["per_kernel"]) == 8 and all(c["compiles"] >= 1 for c in goals["per_kernel"].values())
    committed = json.loads((ROOT / "bench" / "results" / "compile-budget-sm90.json").read_text())
    assert committed["goals"]["per_kernel"] == goals["per_kernel"], (
        "bench/results/compile-budget-sm90.json is stale: rerun python -m verify.compile_budget --compile"
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
    slack = dict(fits, stack=16, spill_stores=16, spill_loads=16)  # one to four registers: passes
    assert problems(slack, 80) == []
    assert problems(dict(slack, spill_loads=20), 80) == [
        "spills (16 B stores, 20 B loads, 16 B stack, 128 registers)"
    ]


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
def test_resource_gate_every_kept_config_fits_sm80_and_sm90(tmp_path):
    """The default gate: one variant of every config, every kernel of the forward and the
    backward, both architectures, no failure."""
    proc = subprocess.run(
        [sys.executable, "-m", "intl_kernels.triton.compile_check", "--arch", "80,90",
         "--report", str(tmp_path)],
        cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert " 0 failures" in out, out[-8000:]
    (path,) = tmp_path.glob("compile-check-triton*.json")
    rep = json.loads(path.read_text())
    assert rep["failures"] == [] and rep["archs"] == [80, 90]
    kernels = {(k["kernel"], k["arch"]) for k in rep["per_kernel"]}
    names = ("rowstats", "gram", "gram_reduce", "newton_fwd", "newton_bwd", "newton_prep", "mm", "apply")
    assert kernels == {(f"_whiten_{k}_kernel", a) for k in names for a in (80, 90)}, kernels
    # every config compiled, once or twice (its least aligned variant with and without a unit row stride)
    assert len(rep["per_config"]) == rep["configs"]
    assert all(1 <= c["variants"] <= 2 for c in rep["per_config"])
    print(f"resource gate: {rep['configs']} configs, {rep['variants']} variants, {rep['seconds']}")


def test_every_config_records_each_autotuned_config_at_each_launch():
    """A GPU keeps one config per autotune key and runs it at every shape of the key's size class,
    in that shape's specialization: the gate's recording (every_config) compiles each config at
    each shape; the plain recording follows one autotuning per key, and both restore the tuners."""
    proc = _python(
        """
        import torch
        from intl_kernels.triton import launches, whiten as W
        z = lambda *s: torch.empty(*s, device="meta")
        counts = []
        for every in (False, True):
            before = dict(W._apply.cache)
            with launches.record(every_config=every) as rec:
                S = z(1, 300, 300)
                for n in (4000, 4095):  # one size class; n divisible by 16 or not
                    W._whiten_apply(S, W._as4d(z(1, 300, n)), z(1, 300, 1), z(1, 1, 1), z(1, 1, 1),
                                    W._as4d(z(1, 300, n)), prec="ieee")
            counts.append(sum(v.kernel == "_whiten_apply_kernel" for v in rec.variants))
            assert W._apply.cache == before
        print(*counts)
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["3", "4"]


@pytest.mark.slow
def test_sweep_has_every_config_the_launchers_pick():
    """The default gate's configs (one variant per kernel, dtypes, constexprs, warps and stages)
    include every config the launchers pick beyond the sweep: r of several residues mod 16 in
    each tile bucket and on the tiled path, T = 1 and 3, ResNet-50-like group views (NCHW and
    channels_last) and blocks of other sizes and group counts; every mode, both directions."""
    proc = _python(
        """
        import torch
        from intl_kernels.layers import _columns
        from intl_kernels.triton import compile_check as C, launches

        variants, _ = C.sweep((90,), full=False, log=lambda m: None)
        swept = {C.config_key(v) for v in variants}

        def extra(r, dtype):
            x = torch.empty(256, 8 * r, 7, 7, dtype=dtype, device="meta")
            yield _columns(x, 8, r)
            yield _columns(x.contiguous(memory_format=torch.channels_last), 8, r)
            for G, n in ((1, 2), (5, 17), (1, 129), (7, 1000), (2, 5000), (1, 100000), (70, 5000)):
                yield torch.empty(G, r, n, dtype=dtype, device="meta")

        with launches.record(90, every_config=True) as rec:
            for dname, prec in C.MODES:
                dtype = getattr(torch, dname)
                for r in (1, 5, 13, 23, 30, 47, 60, 66, 99, 127, 150, 333):
                    cases = [(z, dy) for _, z, dy in C.inputs(r, dtype)]
                    for z, dy in cases + [(z, None) for z in extra(r, dtype)]:
                        for T in (1, 3):
                            C.run_case(z, dy, T, prec)
        launched = {C.config_key(v) for v in rec.variants}
        print(len(launched), len({k[0] for k in launched}))
        for k in sorted(launched - swept, key=str):
            print("MISSING", k)
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert not [line for line in lines if line.startswith("MISSING")], proc.stdout[-4000:]
    configs, kernels = map(int, lines[0].split())
    assert kernels == 8 and configs > 100, lines[0]


@pytest.mark.slow
def test_r_of_one_class_make_the_same_variants():
    """r's that differ only where Triton does not specialize (not 1, same power-of-two tile bucket
    or both on the tiled path, same gcd with 16) make the same variants; an r beyond the full
    gate's 1..144 makes none that the r of its class up to 144 does not (it may make fewer: with
    many tiles the reduction takes whole tiles only). r's that differ in divisibility or bucket
    make different variants (the comparison can tell them apart)."""
    proc = _python(
        """
        from intl_kernels.triton import compile_check as C
        modes = (("float32", "ieee"), ("bfloat16", "ieee"))
        same = [(3, 13), (6, 10), (4, 12), (17, 31), (18, 26), (20, 28), (33, 63), (40, 56), (48, 64),
                (65, 127), (66, 126), (68, 124), (72, 120), (80, 128), (129, 141), (130, 142), (132, 140)]
        beyond = [(129, 333), (130, 1026), (136, 200), (144, 256), (143, 4095)]
        differ = [(48, 56), (64, 65), (16, 32), (1, 17)]
        for a, b in same + beyond + differ:
            va, vb = (set(C.record_r(90, r, modes=modes)) for r in (a, b))
            print(a, b, C.r_class(a) == C.r_class(b), va == vb, vb <= va, len(vb))
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split() for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 17 + 5 + 4
    for a, b, same_class, equal, _, n in rows[:17]:
        assert same_class == "True" and equal == "True" and int(n) > 0, (a, b)
    for a, b, same_class, _, subset, n in rows[17:22]:
        assert same_class == "True" and subset == "True" and int(n) > 0, (a, b)
    for a, b, same_class, equal, _, _ in rows[22:]:
        assert same_class == "False" and equal == "False", (a, b)


def _fake_ptxas(path: Path, registers: int) -> str:
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "Cuda compilation tools, release 12.9, V12.9.0"; exit 0; fi\n'
        f'echo "$@" >> "{path}.calls"\n'
        f'echo "ptxas info    : Used {registers} registers, 8 bytes stack frame, 4 bytes spill stores" >&2\n'
    )
    path.chmod(0o755)
    return str(path)


def test_ptxas_usage_runs_the_ptxas_triton_builds_the_arch_with(tmp_path, monkeypatch):
    """get_ptxas(arch) of Triton's NVIDIA backend where it exists (Triton 3.9 picks ptxas-blackwell
    for sm_90), else the ptxas knob; a report is reused only for the same ptxas and PTX."""
    from types import SimpleNamespace

    import triton.backends.nvidia.compiler as nvc

    from intl_kernels.triton import resources

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    older, newer = _fake_ptxas(tmp_path / "ptxas", 40), _fake_ptxas(tmp_path / "ptxas-blackwell", 90)
    monkeypatch.setattr(nvc, "get_ptxas", lambda arch: SimpleNamespace(path=newer if arch >= 90 else older))
    assert resources.ptxas_path(90) == newer and resources.ptxas_path(80) == older
    got = resources.ptxas_usage("// ptx", 90)
    assert got == {"registers": 90, "stack": 8, "spill_stores": 4, "spill_loads": 0}
    assert resources.ptxas_usage("// ptx", 80)["registers"] == 40
    calls = (tmp_path / "ptxas-blackwell.calls").read_text().splitlines()
    assert len(calls) == 1 and "--gpu-name=sm_90a" in calls[0]
    assert resources.ptxas_usage("// ptx", 90) == got  # kept: ptxas not run again
    resources.ptxas_usage("// other ptx", 90)
    resources.ptxas_usage("// ptx", 90, cache=False)
    assert len((tmp_path / "ptxas-blackwell.calls").read_text().splitlines()) == 3

    monkeypatch.delattr(nvc, "get_ptxas")  # a Triton without it: the knob (TRITON_PTXAS_PATH)
    knob = _fake_ptxas(tmp_path / "ptxas-knob", 64)
    monkeypatch.setenv("TRITON_PTXAS_PATH", knob)
    assert resources.ptxas_path(90) == knob
    assert resources.ptxas_usage("// ptx", 90)["registers"] == 64
