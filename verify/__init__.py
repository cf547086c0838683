"""Checks of the GPU code: the one GPU run (``gpu_check`` and its tiers), and the static analysis
that needs no GPU (SASS report, compile budget). ``bench/`` holds the throughput benchmarks."""
