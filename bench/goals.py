"""The project's performance goals, as ratios measured in one run (baseline median / ours).

C1: channel whitening forward+backward at (N, D) = (512, 2048), float32, ``cpu`` ≥ 1.5× the
    paper's code on the CPU (``official`` is that code with ``addmm``).
C2: IterNorm layer forward+backward at (32, 256, 14, 14) and (32, 64, 56, 56), float32, ``cpu``
    ≥ 2× the IterNorm authors' layer (``iternorm_pytorch``).
P1: channel whitening forward+backward at (256, 8192), float32, ``triton`` ≥ 4× ``official``
    and ≥ 2× ``compiled``.
P2: six crops of (256, 8192) in one call ≥ 6× the authors' per-crop loop.
P3: IterNorm layer forward+backward on the ResNet-50 stage shapes (N = 256), ≥ 8×
    ``iternorm_pytorch`` and within 1.5× of ``batchnorm`` (batchnorm / ours ≥ 1/1.5), for
    ``cuda`` (the backend built for the layer) and ``triton`` (what ``auto`` picks).
P4: the Newton part at r = 4096 ≥ 1.6× the cuBLAS iteration (``cublas``).
"""

from __future__ import annotations

from dataclasses import dataclass

C2_SHAPES = ((32, 256, 14, 14), (32, 64, 56, 56))
RESNET50_STAGES = (
    (256, 64, 56, 56),
    (256, 256, 56, 56),
    (256, 512, 28, 28),
    (256, 1024, 14, 14),
    (256, 2048, 7, 7),
)


def shape_label(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@dataclass(frozen=True)
class Goal:
    op: str
    shape: str
    mode: str
    baseline: str
    provider: str
    goal: float
    what: str
    dtype: str = "float32"


def _p3(provider: str) -> dict[str, Goal]:
    out = {}
    for shape in map(shape_label, RESNET50_STAGES):
        out[f"P3-{provider}-{shape}"] = Goal(
            "layer", shape, "full", "iternorm_pytorch", provider, 8.0, f"{provider} >= 8x iternorm_pytorch"
        )
        out[f"P3-bn-{provider}-{shape}"] = Goal(
            "layer", shape, "full", "batchnorm", provider, 1 / 1.5, f"{provider} within 1.5x of batchnorm"
        )
    return out


GOALS: dict[str, Goal] = {
    "C1": Goal("channel", "512x2048", "full", "official", "cpu", 1.5, "cpu >= 1.5x official (CPU)"),
    **{
        f"C2-{shape_label(s)}": Goal(
            "layer",
            shape_label(s),
            "full",
            "iternorm_pytorch",
            "cpu",
            2.0,
            "cpu >= 2x iternorm_pytorch (CPU)",
        )
        for s in C2_SHAPES
    },
    "P1-official": Goal("channel", "256x8192", "full", "official", "triton", 4.0, "triton >= 4x official"),
    "P1-compiled": Goal("channel", "256x8192", "full", "compiled", "triton", 2.0, "triton >= 2x compiled"),
    "P2": Goal("crops", "6x256x8192", "full", "official", "triton", 6.0, "one call >= 6x per-crop official"),
    **_p3("cuda"),
    **_p3("triton"),
    "P4": Goal("newton", "4096", "fwd", "cublas", "triton", 1.6, "Newton part >= 1.6x cuBLAS"),
}


def summarize_goals(
    rows: list[dict], round_medians: dict[tuple, list[float]] | None = None
) -> dict[str, dict]:
    """{name: {op, shape, dtype, mode, baseline, provider, what, ratio, goal, met, ratio_rounds}}
    from result rows.

    ratio = baseline median / provider median from the same rows (None, and met None, when
    either was not measured). ``round_medians`` (CPU runs), {(op, shape label, dtype, mode,
    provider): [median ms of each round]}, gives ratio_rounds: the ratio within each
    interleaved round, the spread one run's ratio hides on a machine whose speed drifts
    (None without two or more rounds of both points). The verdict uses ``ratio``.
    """
    median = {(r["op"], r["shape"], r["dtype"], r["mode"], r["provider"]): float(r["median"]) for r in rows}
    rounds = round_medians or {}
    out = {}
    for name, g in GOALS.items():
        base_key = (g.op, g.shape, g.dtype, g.mode, g.baseline)
        ours_key = (g.op, g.shape, g.dtype, g.mode, g.provider)
        base, ours = median.get(base_key), median.get(ours_key)
        ratio = None if base is None or ours is None else base / ours
        b_rounds, o_rounds = rounds.get(base_key, []), rounds.get(ours_key, [])
        ratio_rounds = None
        if ratio is not None and len(b_rounds) == len(o_rounds) >= 2:
            ratio_rounds = [round(b / o, 3) for b, o in zip(b_rounds, o_rounds, strict=True)]
        out[name] = {
            "op": g.op,
            "shape": g.shape,
            "dtype": g.dtype,
            "mode": g.mode,
            "baseline": g.baseline,
            "provider": g.provider,
            "what": g.what,
            "ratio": None if ratio is None else round(ratio, 3),
            "goal": round(g.goal, 3),
            "met": None if ratio is None else ratio >= g.goal,
            "ratio_rounds": ratio_rounds,
        }
    return out


def ratio_text(result: dict) -> str:
    """'1.26x', or '1.26x (rounds 1.05-1.33x)' when per-round ratios are known."""
    text = f"{result['ratio']:.2f}x"
    rr = result.get("ratio_rounds")
    if rr:
        text += f" (rounds {min(rr):.2f}-{max(rr):.2f}x)"
    return text


def verdict(result: dict) -> str:
    if result["met"] is None:
        return "not measured"
    return "met" if result["met"] else "NOT met"
