"""The CPU benchmark runs end to end on a tiny grid and writes the promised CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

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
