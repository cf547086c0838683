"""The CPU benchmark runs end to end on a tiny grid and writes the promised CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import intl_kernels as ik
from bench.providers import MODES, make_iter_norm, providers
from bench.run_cpu import CSV_COLUMNS, device_label, main


def test_run_cpu_quick_writes_csv_and_table(tmp_path, capsys):
    path = Path(main(["--quick", "--out", str(tmp_path)]))
    assert path.parent == tmp_path and path.name.startswith(device_label() + "-") and path.suffix == ".csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    got = sorted((r["provider"], r["mode"], r["shape"]) for r in rows)
    assert got == sorted((p, m, "32x64") for p in providers() for m in MODES)
    for r in rows:
        assert r["op"] == "iter_norm" and r["dtype"] == "float32" and r["unit"] == "ms"
        assert 0 < float(r["p20"]) <= float(r["median"]) <= float(r["p80"]), r
        assert r["peak_mem_mb"] == "" and r["device"] and r["torch"] == torch.__version__
    out = capsys.readouterr().out
    assert "speed-up" in out and f"wrote {path}" in out
    assert path.with_suffix(".md").read_text().count("| 32x64 |") == len(MODES)


def test_providers_compute_the_same_thing():
    """Every provider's closure whitens the same batch: outputs and gradients agree."""
    for mode in MODES:
        results = {name: make_iter_norm(name, 16, 64, torch.float32, mode, seed=3)() for name in providers()}
        ref = results.pop("python_ref")
        for name, out in results.items():
            # float32 on both sides with different product orders: agreement to ~1e-4, not bits.
            torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4, msg=f"{name} {mode}")


@pytest.mark.skipif("triton" not in ik.available_backends(), reason="triton backend unavailable here")
def test_run_gpu_harness_smoke_on_cpu(tmp_path, capsys):
    """The GPU harness's code paths (providers, CSV, table, goals JSON) on tiny CPU inputs
    under the interpreter; its numbers mean nothing here."""
    from bench import run_gpu

    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--workloads", "channel,newton"]
    path = Path(run_gpu.main(argv + ["--providers", "official,triton"]))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    got = sorted((r["op"], r["provider"], r["mode"], r["shape"]) for r in rows)
    expected = [("channel", p, m, "32x64") for p in ("official", "triton") for m in MODES]
    expected += [("newton", p, "fwd", r) for p in ("cublas", "triton") for r in ("16", "160")]
    assert got == sorted(expected)
    goals = json.loads(path.with_name(path.stem + "-goals.json").read_text())["goals"]
    assert set(goals) == set(run_gpu.GOALS) and goals["P1-official"]["met"] is None  # no 256x8192 row
    assert "| channel | 32x64 | full | triton |" in path.with_suffix(".md").read_text()
    assert "P4-newton: ratio None (goal >= 1.6): not measured" in capsys.readouterr().out


def test_official_formulation_matches_paper_reference():
    from bench.run_gpu import official_iter_norm
    from python_ref import iter_norm_ref

    x = torch.randn(24, 40, dtype=torch.float64)
    torch.testing.assert_close(official_iter_norm(x), iter_norm_ref(x), rtol=1e-10, atol=1e-12)


def test_run_layer_cpu_quick_writes_csv_and_goals(tmp_path):
    from bench import run_layer_cpu

    path = Path(run_layer_cpu.main(["--quick", "--out", str(tmp_path)]))
    assert path.name.endswith("-layer.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = run_layer_cpu.providers()
    assert sorted((r["provider"], r["mode"]) for r in rows) == sorted((p, m) for p in names for m in MODES)
    goals = json.loads(path.with_name(path.stem + "-goals.json").read_text())["goals"]
    assert list(goals) == [f"C2-{names[1]}-4x16x6x6"] and goals[f"C2-{names[1]}-4x16x6x6"]["goal"] == 2.0
