"""analysis/invgauss.py against scipy and 60-digit references; the controller never imports scipy.

scipy.stats.invgauss.ppf is itself only good to ~1e-14 absolute in x / shape for large
shape/mean (its generic root finder's tolerance): ~1e-6 relative at shape/mean = 1e8 and
~1e-4 at 1e10; and for small shape/mean its far upper tail loses digits to a cancellation
(~1e-8 relative at p = 1 - 1e-10, shape/mean = 1e-8). The comparisons with it allow for the
first and stay within 1e-7 < p < 1 - 1e-7; two other checks do not lean on its ppf: scipy's
CDF must bracket p within 1e-8 of our quantile, and a table of quantiles computed with mpmath
at 60 digits (not a dependency; values pasted) must match to 1e-12, out to p = 1 - 1e-10.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import invgauss

from analysis import planner
from analysis.invgauss import invgauss_log_cdf, invgauss_log_sf, invgauss_ppf

ROOT = Path(__file__).resolve().parents[2]


def _scipy_ppf(p: float, mean: float, shape: float) -> float:
    with warnings.catch_warnings():
        # Boost gives up for extreme ratios and scipy falls back to its own root finder.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(invgauss.ppf(p, mean / shape, scale=shape))


def _tolerance(phi: float) -> float:
    """Our 1e-9 goal plus scipy's own error, ~1e-14 absolute in x / shape = t / phi."""
    return 1e-9 + 2e-14 * phi


RATIOS = [1e-8, 1e-6, 1e-4, 1e-2, 0.3, 1.0, 7.0, 100.0, 1e4, 1e6, 1e8]  # shape / mean
PS = [1e-7, 0.001, 0.05, 0.5, 0.95, 0.999, 1 - 1e-7]


@pytest.mark.parametrize("phi", RATIOS)
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("mean", [1e-3, 2.5, 4e5])
def test_matches_scipy_on_a_grid(p: float, phi: float, mean: float) -> None:
    ours = invgauss_ppf(p, mean, mean * phi)
    ref = _scipy_ppf(p, mean, mean * phi)
    assert ours == pytest.approx(ref, rel=_tolerance(phi), abs=0.0)


@settings(max_examples=400, deadline=None)
@given(
    log_phi=st.floats(-8.0, 10.0),
    logit_p=st.floats(-16.0, 16.0),  # p from 1.1e-7 to 1 - 1.1e-7
    log_mean=st.floats(-4.0, 6.0),
)
def test_scipy_cdf_brackets_p(log_phi: float, logit_p: float, log_mean: float) -> None:
    """F(x (1 - 1e-8)) <= p <= F(x (1 + 1e-8)) by scipy's CDF (its survival function above
    the median, where 1 - p is the accurate number), and the ppf agrees with scipy's. (1e-8:
    scipy's sf is only good to ~1e-9 relative at 1 - p ~ 1e-7 for small shape/mean, where our
    quantile agrees with mpmath's to 1e-15.)"""
    phi, mean = 10.0**log_phi, 10.0**log_mean
    p = 1.0 / (1.0 + math.exp(-logit_p))
    x = invgauss_ppf(p, mean, mean * phi)
    lo, hi = x * (1 - 1e-8), x * (1 + 1e-8)
    law = invgauss(1.0 / phi, scale=mean * phi)
    if p <= 0.5:
        assert law.cdf(lo) <= p <= law.cdf(hi)
    else:
        assert law.sf(lo) >= 1.0 - p >= law.sf(hi)
    assert x == pytest.approx(_scipy_ppf(p, mean, mean * phi), rel=_tolerance(phi), abs=0.0)


# (shape / mean, p, quantile / mean) from mpmath at 60 digits, bisecting the CDF in log x.
MPMATH = [
    # Below the mean, 1 - F computed as 1 - F would lose ~1e-8 here (1 - F is small there only
    # for tiny shape/mean, far below what the planner makes).
    (1e-20, 0.999999999, 0.0063661980836452398),
    (1e-16, 0.999999, 6.3661977220331132e-5),
    (1e-8, 1e-10, 2.3911171117777582e-10),
    (1e-8, 0.05, 2.6031777049074534e-9),
    (1e-8, 0.95, 2.5431434778433734e-6),
    (1e-8, 0.9999999999, 379588243.85273407),
    (1e-3, 1e-10, 2.3910053288012077e-5),
    (1e-3, 0.05, 0.00026020420289365475),
    (1e-3, 0.95, 0.24496677788331145),
    (1e-3, 0.9999999999, 22244.033535260389),
    (1.0, 1e-10, 0.022853892218458091),
    (1.0, 0.05, 0.18411327721423011),
    (1.0, 0.95, 2.9220759772692242),
    (1.0, 0.9999999999, 36.621706132353423),
    (1e3, 1e-10, 0.81766937312942566),
    (1e3, 0.05, 0.94885233968305234),
    (1e3, 0.95, 1.052852209544652),
    (1e3, 0.9999999999, 1.2217744014164687),
    (1e8, 1e-10, 0.99936406321484689),
    (1e8, 0.05, 0.99983552316549383),
    (1e8, 0.95, 1.0001644938899406),
    (1e8, 0.9999999999, 1.0006363314504601),
    # scipy is off by 1e-5 and more here; the normal limit alone would be off by ~1e-9.
    (1e10, 1e-10, 0.99993638856428066),
    (1e10, 0.05, 0.99998355154900813),
    (1e10, 0.95, 1.0000164486215462),
    (1e10, 0.9999999999, 1.0000636153822581),
]


@pytest.mark.parametrize(("phi", "p", "expected"), MPMATH)
def test_matches_high_precision_references(phi: float, p: float, expected: float) -> None:
    assert invgauss_ppf(p, 1.0, phi) == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert invgauss_ppf(p, 300.0, 300.0 * phi) == pytest.approx(300.0 * expected, rel=1e-12)


def test_log_cdf_and_log_sf_agree_with_scipy_where_the_naive_formula_overflows() -> None:
    """exp(2 shape/mean) overflows past shape/mean ~ 355; the erfcx form must not."""
    for phi in (1.0, 400.0, 1e6):
        law = invgauss(1.0 / phi, scale=phi)
        for t in (0.99, 1.0, 1.001, 1.5):
            assert math.isfinite(invgauss_log_cdf(t, phi))
            assert invgauss_log_cdf(t, phi) == pytest.approx(law.logcdf(t), rel=1e-9, abs=1e-12)
            assert invgauss_log_sf(t, phi) == pytest.approx(law.logsf(t), rel=1e-9, abs=1e-12)


def test_edges_and_monotone_in_p() -> None:
    assert invgauss_ppf(0.0, 2.0, 3.0) == 0.0
    assert invgauss_ppf(1.0, 2.0, 3.0) == math.inf
    assert math.isnan(invgauss_ppf(math.nan, 2.0, 3.0))
    assert math.isnan(invgauss_ppf(0.5, -1.0, 3.0))
    assert invgauss_ppf(0.5, 2.0, math.inf) == 2.0  # no spread: the mean
    for phi in (1e-6, 1.0, 1e8):
        qs = [invgauss_ppf(p, 1.0, phi) for p in (1e-12, 0.001, 0.3, 0.5, 0.7, 0.999, 1 - 1e-12)]
        assert all(a < b for a, b in itertools.pairwise(qs)), (phi, qs)


@pytest.mark.parametrize("likely", [0.001, 0.5, 0.95, 0.999])
@pytest.mark.parametrize(
    ("events", "drift", "var", "events_per_s"),
    [
        (3.0, 0.05, 0.2, 1.5),
        (40.0, 0.001, 1e-4, 200.0),
        (1e4, 0.3, 5.0, 0.01),
        (0.7, 2.0, 1e-3, 9.0),
    ],
)
def test_passage_quantile_is_scipys(
    likely: float, events: float, drift: float, var: float, events_per_s: float
) -> None:
    """The planner passes (mean, shape) in the order scipy's (mean/shape, scale=shape) meant."""
    level = events * drift
    mean = level / (events_per_s * drift)
    shape = level * level / (events_per_s * (var + drift * drift))
    got = planner._passage_quantile(
        events=events, drift=drift, var=var, events_per_s=events_per_s, likely=likely
    )
    assert got == pytest.approx(_scipy_ppf(likely, mean, shape), rel=_tolerance(shape / mean))


def _imports_scipy(module: str) -> subprocess.CompletedProcess[str]:
    code = (
        f"import {module}, sys; "
        "bad = sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')); "
        "assert not bad, bad[:5]"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize("module", ["analysis", "canary.kubernetes.operator", "canary.cli.main"])
def test_the_controller_does_not_import_scipy(module: str) -> None:
    """`import scipy.stats` alone is ~70 MiB of RSS per controller (issue 13)."""
    result = _imports_scipy(module)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_scipy_import_check_can_fail() -> None:
    result = _imports_scipy("scipy.special")
    assert result.returncode != 0 and "AssertionError" in result.stderr
