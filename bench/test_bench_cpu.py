"""pytest-benchmark points of the CPU benchmark: ``pytest -m bench bench/`` (not in ``make test``).

providers × (N, D) ∈ {(256, 2048), (512, 2048)} × modes {fwd, full}, float32, T = 4;
inputs and the upstream gradient are built outside the timed closure (bench.providers).
"""

from __future__ import annotations

import pytest
import torch

from bench.providers import ALL_PROVIDERS, MODES, make_iter_norm, providers

PROVIDERS = [
    pytest.param(
        p,
        marks=pytest.mark.skipif(
            p not in providers(), reason=f"provider {p!r} unavailable (C++ extension not built)"
        ),
    )
    for p in ALL_PROVIDERS
]


@pytest.mark.bench
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(256, 2048), (512, 2048)], ids=lambda s: f"N{s[0]}-D{s[1]}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_iter_norm_cpu(benchmark, provider, shape, mode):
    N, D = shape
    benchmark.group = f"iter_norm {mode} {N}x{D} float32"
    benchmark.extra_info.update(op="iter_norm", provider=provider, mode=mode, shape=f"{N}x{D}", T=4)
    fn = make_iter_norm(provider, N, D, torch.float32, mode)
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2)
