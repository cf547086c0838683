"""GPU benchmark of the triton backend against the INTL authors' formulation (issue goals P1, P2, P4).

    python -m bench.run_gpu [--quick] [--out DIR] [--workloads channel,crops,newton] [--device cuda]

Workloads (float32, T = 4, every provider built outside the timed region):

- ``channel`` (P1): iter_norm of (N, D) = (256, 8192), modes ``fwd`` and ``full``
  (forward + ``autograd.grad`` against a fixed upstream gradient). Providers: ``official``
  (the authors' eager formulation: ``torch.matrix_power(P, 3)`` and ``addmm`` per step,
  autograd backward), ``official_amp`` (the same under fp16 autocast, as they train),
  ``compiled`` (``torch.compile(iter_norm_ref, mode="max-autotune-no-cudagraphs")``),
  ``torch`` and ``triton`` (``intl_kernels.iter_norm`` with that backend).
- ``crops`` (P2): six views of (256, 8192): ``official`` loops over the crops, ours
  whitens the (6, 256, 8192) stack in one call.
- ``newton`` (P4 and the saved-vs-recomputed trade-off): the Newton part alone at
  r = 256 and r = 4096 from a given covariance: ``cublas`` (the same iteration with
  ``torch.matmul``, TF32 off) against ``triton`` (triangle-only products, or the
  one-program kernel for r <= 128). Its time is what recomputing P_k and P_k² in the
  backward would add; the memory the forward saves instead is printed beside it.

Timing: ``triton.testing.do_bench`` (median, p20, p80 of per-call ms) on CUDA; a
``time.perf_counter`` loop on CPU (``--device cpu``: a smoke test of this harness under
``TRITON_INTERPRET=1`` with tiny shapes, not a measurement). Writes the long-format CSV
``<out>/<device>-<yyyymmdd>.csv`` (columns as bench.run_cpu), a markdown table and a
JSON summary of the goals (ratio, goal, met), all measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import intl_kernels
from bench.run_cpu import triton_version, write_report
from python_ref import iter_norm_ref

T = 4
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fwd", "full")
# goal: (workload, shape, mode, baseline, provider, minimum ratio baseline/provider)
GOALS = {
    "P1-official": ("channel", "256x8192", "full", "official", "triton", 4.0),
    "P1-compiled": ("channel", "256x8192", "full", "compiled", "triton", 2.0),
    "P2-crops": ("crops", "6x256x8192", "full", "official", "triton", 6.0),
    "P4-newton": ("newton", "4096", "fwd", "cublas", "triton", 1.6),
}


def official_iter_norm(x: torch.Tensor, T: int = T) -> torch.Tensor:
    """The INTL authors' channel whitening of one (N, D) batch, eager, autograd backward."""
    N, D = x.shape
    x = x - x.mean(dim=1, keepdim=True)
    sigma = x @ x.T / (D - 1)
    trace = sigma.diagonal().sum()
    sigma_norm = sigma / trace
    P = torch.eye(N, dtype=x.dtype, device=x.device)
    for _ in range(T):
        P = torch.addmm(P, torch.matrix_power(P, 3), sigma_norm, beta=1.5, alpha=-0.5)
    return P / trace.sqrt() @ x


def _channel_op(provider: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """x: (N, D) or (B, N, D) → whitened, per provider; (B, N, D) loops for the authors' code."""

    def per_crop(fn):
        return lambda x: fn(x) if x.dim() == 2 else torch.stack([fn(v) for v in x.unbind(0)])

    if provider == "official":
        return per_crop(official_iter_norm)
    if provider == "official_amp":

        def amp(x):
            with torch.autocast(device, dtype=torch.float16):
                return per_crop(official_iter_norm)(x).float()

        return amp
    if provider == "compiled":
        return torch.compile(lambda x: iter_norm_ref(x, T), mode="max-autotune-no-cudagraphs")
    return lambda x: intl_kernels.iter_norm(x, T, backend=provider)


def _newton_op(provider: str, r: int, device: str) -> Callable[[], object]:
    """Newton part from a fixed covariance S (one group): (τ, A, P_1..P_T, P_1²..P_{T-1}²)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(1, r, 2 * r, generator=g).to(device)
    zc = z - z.mean(-1, keepdim=True)
    S = (zc @ zc.mT / (2 * r - 1)).contiguous()
    if provider == "triton":
        from intl_kernels.triton.whiten import _whiten_newton_fwd

        nb = max(1, -(-r // 64))
        trp = torch.zeros(1, nb, device=device)
        trp[0, 0] = S.diagonal(dim1=1, dim2=2).sum()  # the trace partials the gram kernel leaves
        return lambda: _whiten_newton_fwd(S, trp, T, "ieee")
    eye = torch.eye(r, device=device)

    def cublas():
        tau = S.diagonal(dim1=1, dim2=2).sum(-1).view(1, 1, 1)
        A = S / tau
        P = 1.5 * eye - 0.5 * A
        Ps, Xs = [P], []
        for _ in range(1, T):
            X = P @ P
            Xs.append(X)
            P = 1.5 * P - 0.5 * P @ (X @ A)
            Ps.append(P)
        return tau, A, Ps, Xs

    return cublas


def _timer(device: str, quick: bool):
    if device == "cuda":
        from triton.testing import do_bench

        def run(fn):
            t = do_bench(fn, warmup=25 if quick else 200, rep=20 if quick else 200, quantiles=[0.5, 0.2, 0.8])
            return tuple(float(v) for v in t)

        return run

    def run_cpu(fn):
        fn()
        ts = []
        for _ in range(3 if quick else 20):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        q = statistics.quantiles(ts, n=10, method="inclusive")
        return statistics.median(ts), q[1], q[7]

    return run_cpu


def _peak_mb(fn, device: str) -> str:
    if device != "cuda":
        return ""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"


def _cases(workloads, quick: bool, device: str, providers: list[str]):
    """(workload, shape label, mode, provider, closure) for every point of the grid."""
    n, d, big_r = (32, 64, 160) if quick else (256, 8192, 4096)
    small_r = 16 if quick else 256
    g = torch.Generator(device="cpu").manual_seed(0)
    for workload in workloads:
        if workload in ("channel", "crops"):
            shape = (n, d) if workload == "channel" else (6, n, d)
            label = "x".join(map(str, shape))
            x = torch.randn(shape, generator=g).to(device).requires_grad_(True)
            dy = torch.randn(shape, generator=g).to(device)
            names = (
                providers if workload == "channel" else [p for p in providers if p in ("official", "triton")]
            )
            for provider in names:
                op = _channel_op(provider, device)
                for mode in MODES:
                    if mode == "fwd":
                        yield workload, label, mode, provider, lambda op=op, x=x: op(x)
                    else:
                        yield (
                            workload,
                            label,
                            mode,
                            provider,
                            lambda op=op, x=x, dy=dy: torch.autograd.grad(op(x), x, dy),
                        )
        elif workload == "newton":
            for r in (small_r, big_r):
                for provider in ("cublas", "triton"):
                    yield workload, str(r), "fwd", provider, _newton_op(provider, r, device)
        else:
            raise ValueError(f"--workloads: unknown workload {workload!r} (channel, crops, newton)")


def device_label(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return "cpu-interpreter"


def goals_summary(rows: list[dict]) -> dict:
    med = {(r["op"], r["shape"], r["mode"], r["provider"]): float(r["median"]) for r in rows}
    out = {}
    for name, (workload, shape, mode, base, prov, goal) in GOALS.items():
        b, p = med.get((workload, shape, mode, base)), med.get((workload, shape, mode, prov))
        ratio = None if b is None or p is None else b / p
        out[name] = {
            "workload": workload,
            "shape": shape,
            "mode": mode,
            "baseline": base,
            "provider": prov,
            "ratio": None if ratio is None else round(ratio, 3),
            "goal": goal,
            "met": None if ratio is None else ratio >= goal,
        }
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one line per point, with the ratio against the workload's baseline."""
    base_of = {"channel": "official", "crops": "official", "newton": "cublas"}
    med = {(r["op"], r["shape"], r["mode"], r["provider"]): float(r["median"]) for r in rows}
    lines = [
        "| workload | shape | mode | provider | median ms | p20 | p80 | peak MB | speed-up vs baseline |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = med.get((r["op"], r["shape"], r["mode"], base_of[r["op"]]))
        ratio = f"{base / float(r['median']):.2f}x" if base else ""
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | {float(r['median']):.4f} | "
            f"{float(r['p20']):.4f} | {float(r['p80']):.4f} | {r['peak_mem_mb']} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the grid; returns the path of the CSV written."""
    ap = argparse.ArgumentParser(prog="python -m bench.run_gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"result directory (default: {RESULTS})")
    ap.add_argument("--workloads", default="channel,crops,newton", help="subset of channel,crops,newton")
    ap.add_argument("--providers", default=None, help="channel providers (default: all that run here)")
    ap.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: a smoke test")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if "triton" not in intl_kernels.available_backends():
        ap.error("the triton backend is not available here (on CPU set TRITON_INTERPRET=1)")
    every = ["official", "official_amp", "compiled", "torch", "triton"]
    if device == "cpu":  # fp16 autocast and inductor's autotuning are GPU matters
        every = ["official", "torch", "triton"]
    providers = every if args.providers is None else [p.strip() for p in args.providers.split(",")]
    unknown = [p for p in providers if p not in every]
    if unknown:
        ap.error(f"--providers {unknown} not available on {device} (choose from {every})")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    torch.backends.cuda.matmul.allow_tf32 = False  # every float32 provider at full precision
    label = device_label(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    torch_v, triton_v = torch.__version__, triton_version()
    start = dt.datetime.now(dt.timezone.utc)
    print(f"device: {name}; torch {torch_v}; triton {triton_v}; {start:%Y-%m-%d %H:%M} UTC", flush=True)
    timer = _timer(device, args.quick)
    rows = []
    cases = list(_cases(workloads, args.quick, device, providers))
    for i, (workload, shape, mode, provider, fn) in enumerate(cases, 1):
        t0 = time.perf_counter()
        median, p20, p80 = timer(fn)
        peak = _peak_mb(fn, device)
        rows.append(
            {
                "op": workload,
                "provider": provider,
                "mode": mode,
                "shape": shape,
                "dtype": "float32",
                "median": f"{median:.4f}",
                "p20": f"{p20:.4f}",
                "p80": f"{p80:.4f}",
                "unit": "ms",
                "peak_mem_mb": peak,
                "device": name,
                "torch": torch_v,
                "triton": triton_v,
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )
        took = time.perf_counter() - t0
        print(f"[{i:2d}/{len(cases)}] {workload:>7s} {shape:>11s} {mode:>4s} {provider:>12s}: "
              f"median {median:9.4f} ms ({took:.0f} s)", flush=True)  # fmt: skip
    if "newton" in workloads:
        for r in sorted({int(row["shape"]) for row in rows if row["op"] == "newton"}):
            saved = (2 * T - 1) * r * r * 4 / 2**20
            print(f"newton r={r}: the forward saves P_1..P_T and P_1²..P_(T-1)²: {saved:.1f} MB per group")
    goals = goals_summary(rows)
    md = table(rows)
    print("\n" + md + "\n")
    for gname, g in goals.items():
        verdict = "not measured" if g["met"] is None else "met" if g["met"] else "NOT met"
        print(f"{gname}: ratio {g['ratio']} (goal >= {g['goal']}): {verdict}")
    header = f"{name}, torch {torch_v}, triton {triton_v}, {start:%Y-%m-%d}; float32, T = {T}"
    meta = {"device": name, "torch": torch_v, "triton": triton_v, "date": start.isoformat(timespec="seconds")}
    path = write_report(args.out / f"{label}-{start:%Y%m%d}.csv", rows, f"{header}\n\n{md}", goals, meta)
    print(f"wrote {path}, {path.with_suffix('.md').name} and {path.stem}-goals.json")
    return str(path)


if __name__ == "__main__":
    main()
