"""`make demo`: whiten digits with iter_norm, spectra against Theorem 1, PNG written."""

from __future__ import annotations

import numpy as np
import pytest

import intl_kernels as ik
from intl_kernels.demo import h_T, main


@pytest.mark.parametrize("backend", ik.available_backends())
def test_demo_matches_theorem_1_and_writes_plot(tmp_path, capsys, backend):
    res = main(["--out", str(tmp_path), "--T", "4", "--backend", backend])
    out = capsys.readouterr().out
    assert res["backend"] == backend
    assert f"ran: {backend}" in out
    assert f"max |measured − predicted| (T = 4): {res['max_dev']:.3e}" in out
    assert set(res["max_dev_by_T"]) == {2, 4, 6}
    # float32 Y, eigenvalues of its covariance in [0, 1]: 1e-5 is ~100 float32 ulps of the
    # largest one (measured: ~1e-7 for T <= 6).
    assert max(res["max_dev_by_T"].values()) < 1e-5, res["max_dev_by_T"]
    # digits: 13 pixels are 0 in all of the first 64 images, so S has rank 51; the null
    # directions stay at rounding level after whitening, as Theorem 1 predicts (h_T(0) = 0).
    assert res["rank"] == 51
    assert np.abs(res["measured"][: 64 - res["rank"]]).max() < 1e-6
    png = res["png"]
    assert png == tmp_path / "spectrum.png"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in out


def test_h_T_closed_forms():
    u = np.array([0.0, 0.25, 1.0])
    # T = 1: f_1 = 1.5 − 0.5u, so λ̂ = u(1.5 − 0.5u)².
    np.testing.assert_allclose(h_T(u, 1), u * (1.5 - 0.5 * u) ** 2, rtol=1e-15)
    # u = 1 is a fixed point (f = 1 for every T); u = 0 stays 0; h_T increases with T below 1.
    np.testing.assert_allclose(h_T(u, 5)[[0, 2]], [0.0, 1.0], rtol=0, atol=0)
    assert h_T(u, 1)[1] < h_T(u, 2)[1] < h_T(u, 4)[1] < 1.0
