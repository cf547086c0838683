"""`make demo`: whiten digits with iter_norm, spectra against Theorem 1, PNG written."""

from __future__ import annotations

import os

import torch

from intl_kernels.demo import main, predicted_spectrum


def test_demo_matches_theorem_1_and_writes_plot(tmp_path, capsys):
    deviation = main(["--out", str(tmp_path), "--T", "4"])
    out = capsys.readouterr().out
    assert "max |measured − predicted|" in out
    assert set(deviation) == {1, 2, 4, 6}
    # float32 whitening of an ill-conditioned (cond ~ 1e7) 48×48 S: eigenvalues of Y's
    # covariance lie in [0, 1]; 1e-5 is ~100 float32 ulps of the largest one.
    assert max(deviation.values()) < 1e-5, deviation
    png = tmp_path / "spectrum.png"
    assert png.exists() and os.path.getsize(png) > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predicted_spectrum_closed_forms():
    u = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    # T = 1: f_1 = 1.5 − 0.5u, so λ̂ = u(1.5 − 0.5u)².
    torch.testing.assert_close(predicted_spectrum(u, 1), u * (1.5 - 0.5 * u) ** 2)
    # u = 1 is a fixed point (f = 1 for every T); u = 0 stays 0.
    torch.testing.assert_close(
        predicted_spectrum(u, 5)[[0, 2]], torch.tensor([0.0, 1.0], dtype=torch.float64)
    )
