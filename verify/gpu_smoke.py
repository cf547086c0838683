"""Smoke tier of ``make gpu-check``: every GPU backend, forward and backward, in every precision
mode, at small r and at the goal shapes, against the float64 reference under the tolerance rule
(docs/design.md §4).

    python -m verify.gpu_smoke --out DIR [--deadline T] [--dry-run]

Cases (GPU), cheapest and never-run paths first:

- small r: ``whiten`` of (4, r, 1000) for r = 8, 16, 32, 64 (the one-program Newton kernels:
  4 warps for r <= 32, 8 for r = 64), float32 in each precision mode (ieee, tf32x3, tf32),
  bfloat16 and float16;
- INTL channel whitening of (256, 8192) and six crops of it: float32 in each precision mode
  and bfloat16, (256, 8192) also float16;
- the IterNorm layer (64 channels per group, T = 5, affine) at the ResNet-50 stage shapes with
  N = 256, NCHW and channels_last, float32 and bfloat16, the first stage also float16;
- the Newton part at r = 4096 (whiten of (1, 4096, 8192), the tiled path), float32 in each
  precision mode.

Backends: ``triton`` and ``cuda`` (r <= 128 and precision ieee only: the others are recorded
as not applicable). Each check compares the output and every gradient (input, and the layer's
weight and bias) with ``python_ref`` run at the input precision and upcast to float64:
max|ours − ref64| <= 2·max|ref_lowp − ref64| + atol, atol 1e-5 for float32 (ieee, tf32x3),
1e-3 for tf32, whose reference runs PyTorch's own TF32 matmuls, and 0 for bfloat16 and float16.

Outputs are poisoned: while a backend runs, ``torch.use_deterministic_algorithms`` fills every
new allocation with NaN (``torch.utils.deterministic.fill_uninitialized_memory``), so an
element a kernel never writes fails the check instead of passing by luck.

``--dry-run``: the same code on the CPU at tiny shapes, ``triton`` under the interpreter (whose
dot ignores the precision mode: tf32 runs at full precision there) and ``cuda`` through the
host emulator (``torch.ops.intl_kernels.emulate_small_whiten_*``).

Writes ``DIR/smoke.jsonl`` (one line per backend and case, as they finish) and
``DIR/smoke.md``; exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.goals import RESNET50_STAGES

T_CHANNEL, T_LAYER, GROUP = 4, 5, 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = ("ieee", "tf32x3", "tf32")  # the triton backend's float32 modes
SMALL_R = (8, 16, 32, 64)
BACKENDS = ("triton", "cuda")
CUDA_MAX_ROWS = 128


def atol(dtype: str, precision: str) -> float:
    """The tolerance rule's atol (docs/design.md §4): a few float32 ulps of O(1) values; tf32
    against PyTorch's TF32 matmuls 1e-3; bf16/fp16 0 (both sides rounded to the dtype)."""
    if dtype != "float32":
        return 0.0
    return 1e-3 if precision == "tf32" else 1e-5


@dataclass(frozen=True)
class Case:
    op: str  # "channel" (covers crops: a leading B), "layer" or "whiten"
    shape: tuple[int, ...]
    dtype: str
    layout: str = "contiguous"  # the layer: "nchw" or "channels_last"
    precision: str = "ieee"  # float32 product precision ("ieee", "tf32x3", "tf32"); the layer: ieee

    @property
    def name(self) -> str:
        tail = "" if self.layout == "contiguous" else f"-{self.layout}"
        prec = "" if self.precision == "ieee" else f"-{self.precision}"
        return f"{self.op}-{'x'.join(map(str, self.shape))}-{self.dtype}{prec}{tail}"

    @property
    def rows(self) -> int:
        """Rows of one whitened matrix (what limits the cuda backend)."""
        return GROUP if self.op == "layer" else self.shape[-2]

    @property
    def inputs_key(self) -> tuple:
        """Cases with the same key share inputs and the float64 reference."""
        return (self.op, self.shape, self.dtype, self.layout)


def _modes(op: str, shape: tuple[int, ...], dtypes=("float32", "bfloat16")) -> list[Case]:
    """float32 in every precision mode, then the other dtypes (ieee)."""
    out = []
    for dtype in dtypes:
        precisions = PRECISIONS if dtype == "float32" else ("ieee",)
        out += [Case(op, shape, dtype, precision=p) for p in precisions]
    return out


def cases(dry_run: bool) -> list[Case]:
    """The smoke cases, small r and never-run modes first. For the dry run one tiny case of each
    kind (small r in each mode and half dtype, channel, crops, the layer in each layout, the
    tiled Newton part)."""
    if dry_run:  # a float32 ieee case first: the dry run's warm-up compiles the first two variants
        return [
            Case("channel", (16, 48), "float32"),
            Case("whiten", (2, 8, 40), "float32", precision="tf32"),
            Case("whiten", (2, 16, 40), "float16"),
            Case("whiten", (2, 32, 40), "float32", precision="tf32x3"),
            Case("channel", (6, 8, 32), "bfloat16"),
            Case("layer", (4, 64, 3, 3), "float32", "nchw"),
            Case("layer", (2, 128, 2, 2), "bfloat16", "channels_last"),
            Case("whiten", (1, 80, 96), "float32"),
        ]
    out = []
    for r in SMALL_R:
        out += _modes("whiten", (4, r, 1000), ("float32", "bfloat16", "float16"))
    out += _modes("channel", (256, 8192), ("float32", "bfloat16", "float16"))
    out += _modes("channel", (6, 256, 8192))
    for dtype in ("float32", "bfloat16"):
        out += [
            Case("layer", s, dtype, layout) for s in RESNET50_STAGES for layout in ("nchw", "channels_last")
        ]
    out.append(Case("layer", RESNET50_STAGES[0], "float16", "nchw"))
    out += _modes("whiten", (1, 4096, 8192), ("float32",))
    return out


# ---------------------------------------------------------------------------- running


def inputs(case: Case, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) of the case on ``device`` (``meta``: shapes only), in the case's dtype and layout."""
    dtype = DTYPES[case.dtype]
    if device == "meta":
        x, dy = (torch.empty(case.shape, dtype=dtype, device="meta") for _ in range(2))
    else:
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(case.shape, generator=g, device=device)
        # rows with different means and scales, as activations have
        x = x * torch.rand(case.shape[:2] + (1,) * (len(case.shape) - 2), generator=g, device=device).add(0.5)
        x = (x + 0.3).to(dtype)
        dy = torch.randn(case.shape, generator=g, device=device).to(dtype)
    if case.layout == "channels_last":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    return x, dy


class _EmulatedLayerFn(torch.autograd.Function):
    """The IterNorm layer's training path on the cuda backend's kernels in the host emulator."""

    @staticmethod
    def forward(ctx, x, weight, bias, c, T, eps, reverse_threads):
        from intl_kernels.layers import _columns

        G, n = x.shape[1] // c, x.shape[0] * math.prod(x.shape[2:])
        z4 = _columns(x, G, c)
        y4, *stats = torch.ops.intl_kernels.emulate_small_whiten_fwd(
            z4, weight.view(G, c), bias.view(G, c), T, eps, float(n), 64, reverse_threads
        )
        ctx.save_for_backward(x, weight, *stats)
        ctx.meta = (c, n, reverse_threads)
        return y4.permute(2, 0, 1, 3).reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from intl_kernels.layers import _columns

        x, weight, *stats = ctx.saved_tensors
        c, n, reverse_threads = ctx.meta
        G = x.shape[1] // c
        dz4, dw, db = torch.ops.intl_kernels.emulate_small_whiten_bwd(
            _columns(dy, G, c), _columns(x, G, c), weight.view(G, c), *stats, float(n), 64, reverse_threads
        )
        return (
            dz4.permute(2, 0, 1, 3).reshape(x.shape),
            dw.view_as(weight),
            db.view_as(weight),
            None,
            None,
            None,
            None,
        )


def _layer(case: Case, backend: str, device: str, reverse_threads: bool = False):
    """(module, forward) of the case's IterNorm layer on ``backend`` (``emulated``: the host emulator)."""
    import intl_kernels as ik

    C = case.shape[1]
    layer = ik.IterNorm(
        C, num_channels=GROUP, T=T_LAYER, backend="torch" if backend == "emulated" else backend
    )
    layer = layer.to(device).train()
    if backend == "emulated":
        return layer, lambda x: _EmulatedLayerFn.apply(
            x, layer.weight, layer.bias, GROUP, T_LAYER, layer.eps, reverse_threads
        )
    return layer, layer


def run(
    case: Case, backend: str, x: torch.Tensor, dy: torch.Tensor, reverse_threads: bool = False
) -> dict[str, torch.Tensor]:
    """Forward and backward of the case on ``backend``: {"y", "dx"[, "dweight", "dbias"]}, detached.
    ``backend`` may also be "reference" / "reference64" (python_ref at the input precision /
    upcast to float64) or "emulated" (the cuda kernels in the host emulator, each phase's threads
    in decreasing order with ``reverse_threads``). The precision mode applies to ``triton``."""
    import intl_kernels as ik
    from python_ref import IterNormRef, iter_norm_ref, whiten_ref

    x = x.detach().requires_grad_(True)
    upcast = backend == "reference64"
    params: list[torch.Tensor] = []
    if case.op == "layer":
        if backend.startswith("reference"):
            layer = (
                IterNormRef(case.shape[1], num_channels=GROUP, T=T_LAYER, upcast=upcast).to(x.device).train()
            )
            forward = layer
        else:
            layer, forward = _layer(case, backend, x.device.type, reverse_threads)
        params = [layer.weight, layer.bias]
        y = forward(x)
    elif case.op == "channel":
        if backend.startswith("reference"):
            y = iter_norm_ref(x, T_CHANNEL, upcast=upcast)
        elif backend == "emulated":
            y = _emulated_whiten(
                x if x.dim() == 3 else x.unsqueeze(0), T_CHANNEL, 0.0, x.shape[-1] - 1.0, reverse_threads
            ).view_as(x)
        else:
            y = ik.iter_norm(x, T_CHANNEL, backend=backend, precision=_precision(case, backend))
    else:  # whiten: the Newton part, at small r (one program per group) and large r (tiled)
        if backend.startswith("reference"):
            y = whiten_ref(x, T_CHANNEL, upcast=upcast)
        elif backend == "emulated":
            y = _emulated_whiten(x, T_CHANNEL, 0.0, x.shape[-1] - 1.0, reverse_threads)
        else:
            y = ik.whiten(x, T_CHANNEL, backend=backend, precision=_precision(case, backend))
    grads = torch.autograd.grad(y, [x, *params], dy)
    out = {"y": y.detach(), "dx": grads[0]}
    if params:
        out["dweight"], out["dbias"] = grads[1], grads[2]
    return out


def _precision(case: Case, backend: str) -> str | None:
    """The precision argument of the case for ``backend`` (None: the backend's default)."""
    return case.precision if backend == "triton" else None


def _emulated_whiten(z, T, eps, divisor, reverse_threads=False):
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            y, *stats = torch.ops.intl_kernels.emulate_small_whiten_fwd(
                z, None, None, T, eps, divisor, 64, reverse_threads
            )
            ctx.save_for_backward(z, *stats)
            return y

        @staticmethod
        def backward(ctx, dy):
            z, *stats = ctx.saved_tensors
            return torch.ops.intl_kernels.emulate_small_whiten_bwd(
                dy, z, None, *stats, divisor, 64, reverse_threads
            )[0]

    return Fn.apply(z)


@contextlib.contextmanager
def matmul_tf32(on: bool):
    """PyTorch's float32 matmuls on TF32 tensor cores (the tf32 mode's input-precision reference)."""
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


@contextlib.contextmanager
def poisoned():
    """Every new allocation NaN-filled (integers: their maximum) while the block runs."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def check(case: Case, backend: str, device: str, refs: dict, x, dy) -> dict:
    """One backend on one case: {"case", "backend", "status", "seconds", "tensors": {...}}."""
    from intl_kernels.testing import tolerance_rule

    run_as = "emulated" if backend == "cuda" and device == "cpu" else backend
    start = time.perf_counter()
    record = {
        "case": case.name,
        "backend": backend,
        "dtype": case.dtype,
        "precision": case.precision,
        "layout": case.layout,
    }
    if backend == "cuda" and case.rows > CUDA_MAX_ROWS:
        return {**record, "status": "n/a", "seconds": 0.0, "detail": f"r = {case.rows} > {CUDA_MAX_ROWS}"}
    if backend == "cuda" and case.precision != "ieee":
        return {**record, "status": "n/a", "seconds": 0.0, "detail": "full float32 products only"}
    try:
        with poisoned():
            ours = run(case, run_as, x, dy)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # recorded; the next case still runs
        text = str(exc).strip().splitlines()
        return {
            **record,
            "status": "error",
            "seconds": round(time.perf_counter() - start, 3),
            "detail": f"{type(exc).__name__}: {text[0] if text else ''}",
        }
    lowp, ref64 = refs["lowp"], refs["ref64"]
    tol = atol(case.dtype, case.precision)
    tensors = {}
    for name, value in ours.items():
        res = tolerance_rule(value, lowp[name], ref64[name].to(value.dtype), tol)
        tensors[name] = {k: (round(v, 9) if isinstance(v, float) else v) for k, v in res.items()}
    ok = all(t["passed"] for t in tensors.values())
    return {
        **record,
        "status": "passed" if ok else "failed",
        "seconds": round(time.perf_counter() - start, 3),
        "tensors": tensors,
    }


def record_launches(dry_run: bool) -> None:
    """The triton launches of every smoke case, on meta tensors (inside ``launches.record``)."""
    for case in cases(dry_run):
        x, dy = inputs(case, "meta")
        run(case, "triton", x, dy)


def markdown(results: list[dict]) -> str:
    lines = [
        "| case | backend | status | y err / bound | dx err / bound | seconds |",
        "|---|---|---|---:|---:|---:|",
    ]

    def cell(t, name):
        return f"{t[name]['error']:.2e} / {t[name]['bound']:.2e}" if name in t else ""

    for r in results:
        t = r.get("tensors", {})
        status = r["status"] + (f" ({r['detail']})" if r.get("detail") else "")
        lines.append(
            f"| {r['case']} | {r['backend']} | {status} | {cell(t, 'y')} | {cell(t, 'dx')} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verify.gpu_smoke", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for smoke.jsonl and smoke.md")
    ap.add_argument("--deadline", type=float, default=None, help="skip cases not started by this time.time()")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter and host emulator")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here (--dry-run runs the same code on the CPU)")
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0").strip() != "1":
        ap.error("--dry-run runs triton under the interpreter: set TRITON_INTERPRET=1")
    import intl_kernels as ik

    backends = [b for b in BACKENDS if b in ik.available_backends() or (args.dry_run and b == "cuda")]
    if args.dry_run and not hasattr(torch.ops.intl_kernels, "emulate_small_whiten_fwd"):
        backends = [b for b in backends if b != "cuda"]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference at full precision
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "smoke.jsonl"
    log_path.write_text("")
    results = []

    def emit(res: dict) -> None:
        results.append(res)
        with open(log_path, "a") as f:
            f.write(json.dumps(res) + "\n")

    # cases that share inputs follow each other: inputs and the float64 reference made once,
    # the input-precision reference once with and once without TF32 matmuls
    key, shared = None, {}
    for case in cases(args.dry_run):
        if args.deadline is not None and time.time() >= args.deadline:
            for backend in backends:
                emit(
                    {
                        "case": case.name,
                        "backend": backend,
                        "status": "skipped",
                        "seconds": 0.0,
                        "detail": "deadline",
                    }
                )
            continue
        if case.inputs_key != key:
            key, shared = case.inputs_key, {}
            if device == "cuda":
                torch.cuda.empty_cache()
            x, dy = inputs(case, device)
            shared = {"x": x, "dy": dy, "ref64": run(case, "reference64", x, dy)}
            del x, dy
        tf32 = case.precision == "tf32"
        if ("lowp", tf32) not in shared:
            with matmul_tf32(tf32):
                shared["lowp", tf32] = run(case, "reference", shared["x"], shared["dy"])
        refs = {"lowp": shared["lowp", tf32], "ref64": shared["ref64"]}
        for backend in backends:
            res = check(case, backend, device, refs, shared["x"], shared["dy"])
            emit(res)
            print(f"{case.name:48s} {backend:7s} {res['status']:7s} {res['seconds']:8.2f} s", flush=True)
        del refs
    (args.out / "smoke.md").write_text(markdown(results))
    bad = [r for r in results if r["status"] in ("failed", "error")]
    print(
        f"smoke: {sum(r['status'] == 'passed' for r in results)} passed, {len(bad)} failed or errored, "
        f"{sum(r['status'] == 'n/a' for r in results)} not applicable, "
        f"{sum(r['status'] == 'skipped' for r in results)} skipped"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
