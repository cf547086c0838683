"""pytest-benchmark regression points on the CPU: ``pytest -m bench bench/`` (not part of ``make test``).

Forward + backward, float32, at the goal shapes of C1 (channel whitening, (512, 2048)) and
C2 (IterNorm layer, (32, 64, 56, 56)): the baseline and ours. Inputs are built by
``bench.providers.make_case`` outside the timed call; ``.grad`` is reset before each call.
"""

from __future__ import annotations

import pytest

from bench.harness import clear_grads
from bench.providers import BASELINE, available, make_case

POINTS = [("channel", (512, 2048)), ("layer", (32, 64, 56, 56))]
CASES = [
    pytest.param(op, shape, provider, id=f"{op}-{'x'.join(map(str, shape))}-{provider}")
    for op, shape in POINTS
    for provider in (BASELINE[op], "torch", "cpu")
    if provider in available("cpu")
]


@pytest.mark.bench
@pytest.mark.parametrize("op, shape, provider", CASES)
def test_cpu_full(benchmark, op, shape, provider):
    benchmark.group = f"{op} full {'x'.join(map(str, shape))} float32"
    benchmark.extra_info.update(op=op, provider=provider, mode="full", shape=list(shape))
    case = make_case(op, provider, shape, "float32", "full", "cpu")

    def call():
        clear_grads(case)
        case.fn()

    benchmark.pedantic(call, rounds=10, warmup_rounds=2)
