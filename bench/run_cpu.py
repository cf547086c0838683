"""CPU benchmark: every provider that runs on the CPU, the small grid (goals C1, C2).

    python -m bench.run_cpu [--grid quick|small|full] [--ops channel,crops,layer] [--providers ...]
                            [--dtypes float32,bfloat16] [--modes fwd,bwd,full] [--rounds 3]
                            [--min-run-time 0.3] [--threads N] [--note TEXT] [--out DIR]

Small grid: channel (N, D) ∈ {(256, 2048), (512, 2048)}, six crops of (256, 2048), the
IterNorm layer at (32, 256, 14, 14) and (32, 64, 56, 56); float32; modes fwd, bwd, full;
providers official, eigh_zca, cholesky, iternorm_pytorch, batchnorm and ours (torch, cpu).
Timed with torch.utils.benchmark in interleaved rounds (bench.harness); about 3 minutes on
2 cores. Writes ``bench/results/cpu-<threads>threads-<yyyymmdd>.csv``, its goals JSON,
markdown table and plots.
"""

from __future__ import annotations

from pathlib import Path

from bench.harness import main as _main


def main(argv: list[str] | None = None) -> Path:
    return _main(
        argv, prog="python -m bench.run_cpu", description=__doc__.splitlines()[0], device="cpu", grid="small"
    )


if __name__ == "__main__":
    main()
