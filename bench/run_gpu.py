"""GPU benchmark: every provider, the full grid (goals P1-P4).

    python -m bench.run_gpu [--grid quick|small|full] [--device cuda|cpu] [--ops ...] [--providers ...]
                            [--dtypes float32,bfloat16] [--modes fwd,bwd,full] [--note TEXT] [--out DIR]

Full grid, float32 and bfloat16, modes fwd, bwd, full: channel whitening N ∈ {64, …, 4096}
× D ∈ {2048, 8192}; six crops of (256, 8192); the IterNorm layer on the ResNet-50 stage
shapes with N = 256; the Newton part at r ∈ {256, 4096}. Providers: official,
official_amp, compiled (at 256x8192 only), eigh_zca, cholesky, iternorm_pytorch,
batchnorm, cublas and ours (torch, triton, cuda where built). Timed with
triton.testing.do_bench, peak memory per point (bench.harness). Writes
``bench/results/<gpu>-<yyyymmdd>.csv``, its goals JSON, markdown table and plots.

``--device cpu`` runs the same code on the CPU (with TRITON_INTERPRET=1 the triton
provider too, slowly): a smoke test of this harness, not a measurement.
"""

from __future__ import annotations

from pathlib import Path

from bench.harness import main as _main


def main(argv: list[str] | None = None) -> Path:
    return _main(
        argv, prog="python -m bench.run_gpu", description=__doc__.splitlines()[0], device="cuda", grid="full"
    )


if __name__ == "__main__":
    main()
