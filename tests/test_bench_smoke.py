"""The benchmark suite (bench/): providers compute what they claim, the harness writes what it
promises, on tiny CPU inputs. No timing is judged here."""

from __future__ import annotations

import collections
import csv
import json
import mmap
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import intl_kernels as ik
from bench import goals, harness, plot, providers
from python_ref import IterNormRef, intl_loss_ref, iter_norm_ref

HAS_CPU = "cpu" in ik.available_backends()
HAS_TRITON = "triton" in ik.available_backends()


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.CSV_COLUMNS
        return list(reader)


def test_run_cpu_quick_writes_csv_goals_table_and_plots(tmp_path, capsys):
    from bench import run_cpu

    ours = ["torch"] + (["cpu"] if HAS_CPU else [])
    names = ["official", "eigh_zca", "cholesky", "iternorm_pytorch", "batchnorm", "products", *ours]
    argv = ["--grid", "quick", "--out", str(tmp_path), "--providers", ",".join(names), "--note", "shared"]
    path = run_cpu.main(argv)
    assert path.parent == tmp_path and re.fullmatch(rf"{harness.device_label('cpu')}-\d{{8}}\.csv", path.name)
    rows = read_rows(path)
    got = sorted((r["op"], r["shape"], r["mode"], r["provider"]) for r in rows)
    channel = ["official", "eigh_zca", "cholesky", *ours]
    expected = [("channel", "32x64", m, p) for m in ("fwd", "bwd", "full") for p in channel]
    expected += [("crops", "6x16x64", m, p) for m in ("fwd", "bwd", "full") for p in channel]
    layer = ["iternorm_pytorch", "batchnorm", "products", *ours]
    expected += [("layer", "4x128x3x3", m, p) for m in ("fwd", "bwd", "full") for p in layer]
    assert got == sorted(expected)
    for r in rows:
        assert r["dtype"] == "float32" and r["unit"] == "ms" and r["peak_mem_mb"] == "", r
        assert float(r["faults_per_call"]) >= 0, r
        assert 0 < float(r["p20"]) <= float(r["median"]) <= float(r["p80"]), r
        assert r["device"] == harness.device_name("cpu") and r["torch"] == torch.__version__
    meta = json.loads(harness.goals_path(path).read_text())
    assert meta["note"] == "shared" and meta["skipped"] == {} and meta["device"] == harness.device_name("cpu")
    assert set(meta["goals"]) == set(goals.GOALS)
    assert all(g["met"] is None for g in meta["goals"].values())  # no goal shape in the quick grid
    md = path.with_suffix(".md").read_text()
    assert (
        "Note: shared" in md and f"**layer**, float32, baseline iternorm_pytorch; {rows[0]['device']}" in md
    )
    assert md.count("| 4x128x3x3 |") == 6  # the times and the page faults, each in 3 modes
    assert "Minor page faults per call (fresh 4 KiB pages of temporaries)" in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    try:
        import matplotlib  # noqa: F401

        assert pngs == [f"{path.stem}-{op}.png" for op in ("channel", "crops", "layer")]
    except ImportError:
        assert pngs == []
    assert f"wrote {path}" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable here")
def test_run_gpu_harness_on_cpu(tmp_path):
    """The GPU entry point's code paths (triton provider, Newton workload) on tiny CPU inputs
    under the interpreter; its numbers mean nothing here."""
    from bench import run_gpu

    argv = ["--device", "cpu", "--grid", "quick", "--ops", "channel,newton", "--modes", "fwd,full"]
    path = run_gpu.main([*argv, "--providers", "official,triton,cublas", "--out", str(tmp_path)])
    got = sorted((r["op"], r["shape"], r["mode"], r["provider"]) for r in read_rows(path))
    expected = [("channel", "32x64", m, p) for m in ("fwd", "full") for p in ("official", "triton")]
    expected += [("newton", r, "fwd", p) for r in ("16", "160") for p in ("cublas", "triton")]
    assert got == sorted(expected)
    assert "| 160 | fwd |" in path.with_suffix(".md").read_text()


def test_run_gpu_without_cuda_says_how_to_smoke_test(capsys):
    from bench import run_gpu

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        run_gpu.main([])
    assert "--device cuda: no CUDA device here (--device cpu" in capsys.readouterr().err


def test_full_grid_points():
    """The GPU grid: every provider at its workloads and dtypes, compiled at the P1 shape only,
    cuda within its 128-row limit, the Newton part in float32 forward only."""
    names = ["official", "official_amp", "compiled", "eigh_zca", "cholesky", "iternorm_pytorch", "batchnorm"]
    names += ["cublas", "torch", "triton", "cuda"]
    pts = harness.points(
        harness.GRIDS["full"], providers.OPS, ("float32", "bfloat16"), providers.MODES, names
    )
    count = collections.Counter((pt[0], pt[4]) for pt in pts)
    # channel: 14 shapes x 3 modes, x 2 dtypes where bf16 runs; cuda: N in {64, 128}
    assert count["channel", "official"] == count["channel", "triton"] == 84
    assert count["channel", "official_amp"] == count["channel", "eigh_zca"] == 42
    assert count["channel", "compiled"] == 3 and count["channel", "cuda"] == 24
    assert {s[:1] for op, _, s, _, p in pts if (op, p) == ("channel", "cuda")} == {(64,), (128,)}
    assert (
        count["crops", "official"] == 6 and count["crops", "cholesky"] == 3 and ("crops", "cuda") not in count
    )
    assert count["layer", "iternorm_pytorch"] == count["layer", "cuda"] == 30  # 5 shapes x 2 dtypes x 3 modes
    assert sorted((s, p) for op, d, s, m, p in pts if op == "newton") == [
        ((256,), "cublas"),
        ((256,), "triton"),
        ((4096,), "cublas"),
        ((4096,), "triton"),
    ]
    assert {(d, m) for op, d, _, m, _ in pts if op == "newton"} == {("float32", "fwd")}


def _channel_outputs(provider, x, dy):
    y = providers.channel_op(provider, x)(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


@pytest.mark.parametrize("shape", [(16, 48), (3, 16, 48)], ids=["channel", "crops"])
def test_newton_providers_agree_with_the_paper_reference(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x64 = x.detach().double().requires_grad_(True)
    ref_y = iter_norm_ref(x64)
    (ref_dx,) = torch.autograd.grad(ref_y, x64, dy.double())
    names = ["official", "torch"] + (["cpu"] if HAS_CPU else []) + (["triton"] if HAS_TRITON else [])
    for name in names:
        y, dx = _channel_outputs(name, x, dy)
        # float32 against float64, different product orders: agreement to ~1e-5, not bits.
        torch.testing.assert_close(y.double(), ref_y, rtol=1e-4, atol=1e-4, msg=f"{name} y")
        torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-3, atol=1e-4, msg=f"{name} dx")
    y, dx = _channel_outputs("official_amp", x, dy)  # fp16 products: ~1e-3 relative
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref_y, rtol=2e-2, atol=2e-2)


def test_official_formulation_is_the_paper_code():
    x = torch.randn(24, 40, dtype=torch.float64)
    torch.testing.assert_close(providers.official_iter_norm(x), iter_norm_ref(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["eigh_zca", "cholesky"])
def test_eigh_and_cholesky_whiten(name):
    """Both whiten (covariance I up to the ridge); ZCA's map W = S^-1/2 is symmetric, so
    Y Zcᵀ = W·(D−1)S is symmetric; Cholesky's W = L⁻¹ is lower triangular, so row 0 of Y is
    a multiple of row 0 of Zc."""
    x = torch.randn(2, 12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    y = providers.channel_op(name, x)(x)
    cov = y @ y.mT / 39
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64).expand_as(cov), rtol=0, atol=1e-3)
    zc = x - x.mean(-1, keepdim=True)
    m = y @ zc.mT
    if name == "eigh_zca":
        torch.testing.assert_close(m, m.mT, rtol=1e-9, atol=1e-9)
    else:
        cos = torch.nn.functional.cosine_similarity(y[:, 0], zc[:, 0], dim=-1)
        torch.testing.assert_close(cos, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
        assert not torch.allclose(m, m.mT, atol=1e-3)  # not the symmetric (ZCA) map


def test_iternorm_pytorch_matches_the_reference_layer():
    """The hand-written backward of the authors' layer formulation equals autograd through
    python_ref.IterNormRef: outputs, gradients of input and affine, running statistics."""
    torch.manual_seed(0)
    ours, ref = (
        providers.IterNormPytorch(24, num_channels=8).double(),
        IterNormRef(24, num_channels=8).double(),
    )
    for layer in (ours, ref):
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 2.0, 24).view(1, 24, 1, 1))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 24).view(1, 24, 1, 1))
    for step in range(2):
        x = (torch.randn(4, 24, 3, 5, dtype=torch.float64) * (1 + step)).requires_grad_(True)
        dy = torch.randn(4, 24, 3, 5, dtype=torch.float64)
        grads = {}
        for name, layer in (("ours", ours), ("ref", ref)):
            y = layer(x)
            grads[name] = (y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), dy))
        for a, b, what in zip(grads["ours"], grads["ref"], ("y", "dx", "dweight", "dbias"), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {step} {what}")
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_wm, ref.running_wm, rtol=1e-10, atol=1e-12)


def test_layer_providers_agree():
    x = torch.randn(4, 128, 3, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    dy = torch.randn(4, 128, 3, 3, generator=torch.Generator().manual_seed(1))
    out = {}
    for name in ["iternorm_pytorch", "torch"] + (["cpu"] if HAS_CPU else []):
        y = providers.layer_module(name, 128)(x)
        out[name] = (y, *torch.autograd.grad(y, x, dy))
    for name, (y, dx) in out.items():
        # float32, c = 64 over n = 36 columns (rank deficient) and T = 5: ~1e-4 relative.
        torch.testing.assert_close(y, out["iternorm_pytorch"][0], rtol=1e-3, atol=1e-3, msg=name)
        torch.testing.assert_close(dx, out["iternorm_pytorch"][1], rtol=1e-3, atol=1e-3, msg=name)


def test_layer_products_are_the_five_products_per_group():
    """fwd: S (c×c) and Y (c×n); bwd: Ȳ Zcᵀ (c×c) and Z̄ (c×n); for G = C/64 groups, n = N·H·W."""
    shapes = {}
    for mode in ("fwd", "bwd"):
        out = providers.make_case("layer", "products", (4, 128, 3, 3), "bfloat16", mode, "cpu").fn()
        shapes[mode] = [(tuple(t.shape), t.dtype) for t in out]
    f32 = torch.float32
    assert shapes["fwd"] == [((2, 64, 64), f32), ((2, 64, 36), f32)]
    assert shapes["bwd"] == [((2, 64, 64), f32), ((2, 64, 36), f32)]
    assert providers.runs("products", "layer", "float32", (32, 64, 56, 56))
    assert not providers.runs("products", "channel", "float32", (256, 2048))


def test_cases_run_each_mode_without_accumulating():
    for mode in ("fwd", "bwd", "full"):
        case = providers.make_case("layer", "torch", (2, 64, 2, 2), "float32", mode, "cpu")
        assert [tuple(t.shape) for t in case.grads] == [(2, 64, 2, 2), (1, 64, 1, 1), (1, 64, 1, 1)]
        out = case.fn()
        if mode == "fwd":
            assert out.shape == (2, 64, 2, 2) and all(t.grad is None for t in case.grads)
        else:
            first = case.grads[0].grad.clone()
            harness.clear_grads(case)
            case.fn()
            torch.testing.assert_close(case.grads[0].grad, first, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(op="conv"), "op must be one of"),
        (dict(provider="fast"), r"provider must be one of the channel providers \['official'"),
        (dict(provider="batchnorm"), "provider must be one of the channel providers"),
        (dict(mode="both"), r"mode must be one of \['fwd', 'bwd', 'full'\]"),
        (dict(dtype="float16"), r"dtype must be one of \['float32', 'bfloat16'\]"),
        (dict(shape=(8, 8, 8)), r"shape must have 2 positive sizes for op 'channel'"),
        (dict(op="newton", provider="cublas", shape=(8,), mode="full"), "op 'newton' runs mode 'fwd'"),
    ],
)
def test_make_case_rejects_bad_arguments(kwargs, match):
    args = dict(op="channel", provider="official", shape=(8, 16), dtype="float32", mode="fwd", device="cpu")
    with pytest.raises(ValueError, match=match):
        providers.make_case(**{**args, **kwargs})


def test_bad_provider_and_list_arguments():
    with pytest.raises(ValueError, match=r"provider must be one of \['official'"):
        providers.check_provider("offical", "cpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        providers.available("tpu")
    with pytest.raises(ValueError, match=r"--ops: expected a comma-separated subset of \['channel'"):
        harness.parse_subset("channel,conv", providers.OPS, "--ops")
    with pytest.raises(SystemExit):
        harness.main(["--dtypes", "fp8"], prog="p", description="d", device="cpu", grid="quick")


def _row(op, shape, mode, provider, median, dtype="float32", peak="", faults=""):
    return {
        "op": op, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype, "median": str(median),
        "p20": str(median), "p80": str(median), "unit": "ms", "peak_mem_mb": peak, "faults_per_call": faults,
        "device": "Test CPU", "torch": "2.0", "triton": "", "timestamp": "2026-01-02T03:04:05+00:00",
    }  # fmt: skip


ROWS = [
    _row("channel", "512x2048", "full", "official", 6.0),
    _row("channel", "512x2048", "full", "cpu", 2.0),
    _row("channel", "512x2048", "full", "torch", 4.0),
    _row("layer", "32x64x56x56", "full", "iternorm_pytorch", 3.0, faults="12800"),
    _row("layer", "32x64x56x56", "full", "cpu", 2.0, peak="12.5"),
]


def test_goals_from_rows():
    g = goals.summarize_goals(ROWS)
    assert g["C1"] == {
        "op": "channel", "shape": "512x2048", "dtype": "float32", "mode": "full", "baseline": "official",
        "provider": "cpu", "what": "cpu >= 1.5x official (CPU)", "ratio": 3.0, "goal": 1.5, "met": True,
        "ratio_rounds": None,
    }  # fmt: skip
    assert (g["C2-32x64x56x56"]["ratio"], g["C2-32x64x56x56"]["met"]) == (1.5, False)
    assert g["C2-32x256x14x14"]["ratio"] is None and g["C2-32x256x14x14"]["met"] is None
    assert goals.verdict(g["C1"]) == "met" and goals.verdict(g["C2-32x64x56x56"]) == "NOT met"
    assert g["P3-bn-cuda-256x64x56x56"]["goal"] == 0.667


def test_goals_keep_the_ratio_of_each_round():
    """Per-round ratios pair each round's baseline with the same round's provider; the verdict
    stays on the ratio of the overall medians."""
    rounds = {
        ("layer", "32x64x56x56", "float32", "full", "iternorm_pytorch"): [3.0, 4.0, 2.0],
        ("layer", "32x64x56x56", "float32", "full", "cpu"): [2.0, 1.6, 2.0],
        ("channel", "512x2048", "float32", "full", "official"): [6.0],  # one round: no spread
        ("channel", "512x2048", "float32", "full", "cpu"): [2.0],
    }
    g = goals.summarize_goals(ROWS, rounds)
    c2 = g["C2-32x64x56x56"]
    assert c2["ratio_rounds"] == [1.5, 2.5, 1.0]
    assert (c2["ratio"], c2["met"]) == (1.5, False)
    assert g["C1"]["ratio_rounds"] is None
    assert goals.ratio_text(c2) == "1.50x (rounds 1.00-2.50x)"
    assert goals.ratio_text(g["C1"]) == "3.00x"
    md = plot.markdown(ROWS, g)
    assert "| C2-32x64x56x56 | cpu >= 2x iternorm_pytorch (CPU) | layer | 32x64x56x56 | float32 | full | " \
        "1.50x (rounds 1.00-2.50x) | 2.00x | NOT met |" in md.splitlines()  # fmt: skip


def test_report_takes_round_ratios_from_the_goals_json(tmp_path):
    """bench.plot recomputes goals from the CSV, which has no rounds: the per-round ratios come
    from the goals JSON written beside it."""
    csv_path = harness.write_csv(tmp_path / "cpu-20260102.csv", ROWS)
    saved = goals.summarize_goals(
        ROWS,
        {
            ("layer", "32x64x56x56", "float32", "full", "iternorm_pytorch"): [3.0, 3.3],
            ("layer", "32x64x56x56", "float32", "full", "cpu"): [2.0, 1.5],
        },
    )
    harness.goals_path(csv_path).write_text(json.dumps({"note": "n", "goals": saved}))
    md_path = plot.report(csv_path)[0]
    assert "| 1.50x (rounds 1.50-2.20x) | 2.00x | NOT met |" in md_path.read_text()


def test_markdown_table_ratios_devices_and_goals():
    md = plot.markdown(ROWS, goals.summarize_goals(ROWS), note="shared machine")
    lines = md.splitlines()
    assert "Note: shared machine" in lines
    assert "**channel**, float32, baseline official; Test CPU (torch 2.0):" in lines
    assert "| 512x2048 | full | 6 (1.00x) | 4 (1.50x) | 2 (3.00x) |" in lines  # official, torch, cpu
    assert "| 32x64x56x56 | full | 3 (1.00x) | 2 (1.50x) |" in lines
    assert "Peak memory above the inputs, MB (Test CPU (torch 2.0)):" in lines
    assert "| 32x64x56x56 | full |  | 12.5 |" in lines
    assert "Minor page faults per call (fresh 4 KiB pages of temporaries) (Test CPU (torch 2.0)):" in lines
    assert "| 32x64x56x56 | full | 12800 |  |" in lines
    old = [{k: v for k, v in r.items() if k != "faults_per_call"} for r in ROWS]  # a CSV before the column
    assert "Minor page faults" not in plot.markdown(old, goals.summarize_goals(old))
    assert (
        "| C1 | cpu >= 1.5x official (CPU) | channel | 512x2048 | float32 | full | 3.00x | 1.50x | met |"
        in lines
    )
    assert (
        "| C2-32x64x56x56 | cpu >= 2x iternorm_pytorch (CPU) | layer | 32x64x56x56 | float32 | full | 1.50x |"
        in md
    )


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def _touch_fresh_mapping(nbytes: int) -> None:
    """Maps nbytes of fresh anonymous memory, writes every page and unmaps it."""
    with mmap.mmap(-1, nbytes) as m:
        np.frombuffer(m, dtype=np.uint8)[:] = 1  # the view is gone before the mapping closes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux minor fault counts")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages fault 2 MiB at a time")
def test_cpu_timer_counts_page_faults_per_call():
    """A fresh 64 MiB anonymous mapping written on every call faults in its 16384 pages each
    time; refilling a kept buffer does not. (The fresh buffer is mapped explicitly: a 64 MiB
    torch.empty is not always fresh memory, since glibc serves it from a heap that earlier work
    in the process grew and did not trim.)"""
    nbytes = 64 * 2**20
    kept = torch.empty(nbytes // 4)
    kept.fill_(0)
    _, fresh = harness.measure_cpu(providers.Case(lambda: _touch_fresh_mapping(nbytes)), 0.05, 0.0)
    _, reused = harness.measure_cpu(providers.Case(lambda: kept.fill_(1)), 0.05, 0.0)
    assert 0.9 * 16384 <= fresh <= 1.2 * 16384, fresh
    assert reused < 100, reused


def test_plot_without_matplotlib_writes_the_table(tmp_path, monkeypatch, capsys):
    path = harness.write_csv(tmp_path / "dev-20260102.csv", ROWS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    written = plot.main([str(path)])
    assert written == [tmp_path / "dev-20260102.md"]
    assert plot.NO_MATPLOTLIB in capsys.readouterr().err
    assert "| 512x2048 | full | 6 (1.00x) | 4 (1.50x) | 2 (3.00x) |" in written[0].read_text()


def test_gpu_timer_asks_do_bench_for_quantiles_and_clears_grads(monkeypatch):
    testing = pytest.importorskip("triton.testing")
    seen = {}

    def fake_do_bench(fn, warmup, rep, grad_to_none, quantiles):
        seen.update(fn=fn, grad_to_none=grad_to_none, quantiles=quantiles)
        return [2.0, 1.5, 3.0]

    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    case = providers.make_case("channel", "official", (8, 16), "float32", "full", "cpu")
    assert harness.measure_gpu(case, 25, 100) == (2.0, 1.5, 3.0)
    assert seen == {"fn": case.fn, "grad_to_none": case.grads, "quantiles": [0.5, 0.2, 0.8]}


def test_train_step_smoke_on_cpu(tmp_path):
    from bench import train_step

    ours = "cpu" if HAS_CPU else "torch"
    path = train_step.main(
        ["--device", "cpu", "--smoke", "--providers", f"official,{ours}", "--out", str(tmp_path)]
    )
    rows = read_rows(path)
    assert sorted((r["op"], r["provider"]) for r in rows) == sorted(
        (op, p) for op in ("train_step", "train_loss") for p in ("official", ours)
    )
    assert {r["shape"] for r in rows} == {"8x3x32x32"} and {r["dtype"] for r in rows} == {"bfloat16"}
    p5 = json.loads(path.with_suffix(".json").read_text())["P5"]
    assert p5["official"]["step_speedup_vs_official"] == 1.0 and set(p5) == {"official", ours}
    assert all(res["step_ms"] > 0 and res["loss_ms"] > 0 and res["share"] > 0 for res in p5.values())
    md = path.with_suffix(".md").read_text()
    assert f"**train_loss**, bfloat16, baseline official; {rows[0]['device']}" in md
    assert md.count("| 8x3x32x32 | full |") == 4 and "Not measured" not in md  # times, page faults
    assert all(float(r["faults_per_call"]) >= 0 for r in rows)


def test_official_intl_loss_is_the_paper_loss():
    from bench.train_step import official_intl_loss

    z1, z2 = torch.randn(2, 16, 24, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(official_intl_loss(z1, z2), intl_loss_ref(z1, z2), rtol=1e-10, atol=1e-12)
