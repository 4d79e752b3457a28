"""Quantiles of the inverse Gaussian law IG(mean, shape), in pure Python. Pure.

The planner's only use of scipy was `scipy.stats.invgauss.ppf`, and importing scipy.stats
costs the controller ~70 MiB of memory (issue 13); this is that one function, math module only.

Method. In units of the mean (x = mean * t, phi = shape / mean) the CDF is

    F(t) = Phi(z1) + exp(2 phi) Phi(-z2),  z1 = sqrt(phi/t) (t - 1),  z2 = sqrt(phi/t) (t + 1).

As z2^2 - z1^2 = 4 phi, exp(2 phi) Phi(-z2) = exp(-z1^2/2) erfcx(z2/sqrt2) / 2 with
erfcx(u) = exp(u^2) erfc(u), and Phi(-|z1|) = exp(-z1^2/2) erfcx(|z1|/sqrt2) / 2 too, so

    t <= 1:  F = exp(-z1^2/2) (erfcx(-z1/sqrt2) + erfcx(z2/sqrt2)) / 2
    t >= 1:  1 - F = exp(-z1^2/2) (erfcx(z1/sqrt2) - erfcx(z2/sqrt2)) / 2

whose logarithms neither overflow nor underflow for any phi (the naive exp(2 phi) overflows
past phi ~ 355). d log F / d log t = t f(t) / F(t), and the exp(-z1^2/2) of the density
t f(t) = sqrt(phi / (2 pi t)) exp(-z1^2/2) cancels against F's. p <= 1/2 solves
log F(t) = log p, p > 1/2 solves log(1 - F(t)) = log(1 - p) (the tail the answer lives in):
a bracket in s = log t found by doubling steps from s = 0, then Newton in s, falling back to
bisection whenever a step would leave the bracket. Both functions are monotone in s and
smooth, so this converges in a handful of steps to ~1e-15 relative in t.
"""

from __future__ import annotations

import math

__all__ = ["invgauss_log_cdf", "invgauss_log_sf", "invgauss_ppf"]

_SQRT2 = math.sqrt(2.0)
_SQRT_PI = math.sqrt(math.pi)
_LOG_HALF = math.log(0.5)
# erfcx by its asymptotic series from here on: its smallest term is ~exp(-u^2) < 1e-21, and
# below it exp(u^2) * erfc(u) is still finite with a relative error of ~u^2 * 2^-53.
_ASYMPTOTIC_FROM = 7.0
_S_MIN, _S_MAX = -745.0, 709.0  # log t: exp() of these is still a (subnormal) double


def _erfcx(u: float) -> float:
    """exp(u^2) erfc(u) for u >= 0."""
    if u < _ASYMPTOTIC_FROM:
        return math.exp(u * u) * math.erfc(u)
    # 1/(u sqrt(pi)) * sum_n (-1)^n (2n-1)!! / (2u^2)^n; terms shrink until n ~ u^2.
    x = 0.5 / (u * u)
    total = term = 1.0
    for n in range(1, 40):  # 13 terms at u = 7, fewer beyond
        term *= -(2 * n - 1) * x
        total += term
        if abs(term) < 1e-17 * total:
            break
    return total / (u * _SQRT_PI)


def _erfcx_slope(u: float) -> float:
    """d/du erfcx(u) = 2u erfcx(u) - 2/sqrt(pi), for u >= 0 (the series past _ASYMPTOTIC_FROM,
    where the difference would lose ~2u^2 ulps)."""
    if u < _ASYMPTOTIC_FROM:
        return 2.0 * u * _erfcx(u) - 2.0 / _SQRT_PI
    x = 0.5 / (u * u)
    total = term = 1.0
    for n in range(1, 40):
        term *= -(2 * n - 1) * x
        total += (2 * n + 1) * term
        if abs(term) < 1e-17 * total:
            break
    return -total / (u * u * _SQRT_PI)


def _gauss_legendre(n: int) -> tuple[tuple[float, float], ...]:
    """Nodes on [0, 1] and weights of n-point Gauss-Legendre quadrature (Newton on P_n)."""
    rule = []
    for i in range(n):
        x = math.cos(math.pi * (i + 0.75) / (n + 0.5))
        for _ in range(100):
            p0, p1 = 1.0, x
            for k in range(2, n + 1):
                p0, p1 = p1, ((2 * k - 1) * x * p1 - (k - 1) * p0) / k
            slope = n * (x * p1 - p0) / (x * x - 1.0)
            dx = p1 / slope
            x -= dx
            if abs(dx) < 1e-16:
                break
        rule.append((0.5 * (1.0 - x), 1.0 / ((1.0 - x * x) * slope * slope)))
    return tuple(rule)


_GL10 = _gauss_legendre(10)


def _erfcx_drop(a: float, d: float) -> float:
    """erfcx(a) - erfcx(a + d) for a, d >= 0. When d is small next to max(1, a) the two
    values nearly cancel; then it is minus the integral of erfcx' over [a, a + d] (10-point
    Gauss-Legendre: erfcx' varies on a scale of max(1, u), so that is exact to rounding).
    d comes in on its own, as a + d - a would have lost the digits already."""
    if d >= 0.5 * max(1.0, a):
        return _erfcx(a) - _erfcx(a + d)
    return -d * math.fsum(w * _erfcx_slope(a + x * d) for x, w in _GL10)


def _z(t: float, phi: float) -> tuple[float, float]:
    r = math.sqrt(phi / t)
    return r * (t - 1.0), r * (t + 1.0)


def _log_head(t: float, phi: float) -> float:
    """log F(t) for t <= 1 (no cancellation there)."""
    z1, z2 = _z(t, phi)
    return -0.5 * z1 * z1 + _LOG_HALF + math.log(_erfcx(-z1 / _SQRT2) + _erfcx(z2 / _SQRT2))


def _log_tail(t: float, phi: float) -> float:
    """log(1 - F(t)) for t >= 1; -inf where the difference is lost to rounding."""
    z1, _ = _z(t, phi)
    diff = _erfcx_drop(z1 / _SQRT2, _SQRT2 * math.sqrt(phi / t))  # (z2 - z1) / sqrt2
    if diff <= 0.0:
        return -math.inf
    return -0.5 * z1 * z1 + _LOG_HALF + math.log(diff)


def _log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x <= 0 (Maechler's split)."""
    if x > -math.log(2.0):
        return math.log(-math.expm1(x)) if x < 0.0 else -math.inf
    return math.log1p(-math.exp(x))


def invgauss_log_cdf(t: float, phi: float) -> float:
    """log F(t) of IG(1, phi), i.e. of IG(mean, shape) at x = mean * t with phi = shape/mean."""
    if t <= 0.0:
        return -math.inf
    return _log_head(t, phi) if t <= 1.0 else _log1mexp(_log_tail(t, phi))


def invgauss_log_sf(t: float, phi: float) -> float:
    """log(1 - F(t)) of IG(1, phi)."""
    if t <= 0.0:
        return 0.0
    if t >= 1.0:
        return _log_tail(t, phi)
    if phi <= 1.0:
        # 1 - F is small below the mean only for small phi (it is >= 1 - F(1) ~ 0.8 sqrt(phi)),
        # where 1 - F loses its digits; Phi(-z1) - exp(2 phi) Phi(-z2) rearranged does not:
        # the one difference left is against expm1(2 phi) ~ 2 phi << 1 - F.
        z1, z2 = _z(t, phi)
        sf = 0.5 * (
            math.erf(-z1 / _SQRT2)
            + math.exp(2.0 * phi) * math.erf(z2 / _SQRT2)
            - math.expm1(2.0 * phi)
        )
        return math.log(sf) if sf > 0.0 else -math.inf
    return _log1mexp(_log_head(t, phi))


def _log_t_density(t: float, phi: float) -> float:
    """log(t f(t)) of IG(1, phi)."""
    z1 = math.sqrt(phi / t) * (t - 1.0)
    return 0.5 * math.log(phi / (2.0 * math.pi * t)) - 0.5 * z1 * z1


def invgauss_ppf(p: float, mean: float, shape: float) -> float:
    """The p-quantile of the inverse Gaussian law with this mean and shape (lambda).

    scipy.stats.invgauss.ppf(p, mean / shape, scale=shape) to ~1e-13 relative (see the module
    docstring for how); 0 for p <= 0, inf for p >= 1, nan for nan or non-positive parameters.
    """
    if math.isnan(p) or not (mean > 0.0 and shape > 0.0):
        return math.nan
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return math.inf
    if math.isinf(mean):
        return math.inf
    phi = shape / mean
    if math.isinf(phi):  # no spread: the law is a point mass at the mean
        return mean
    if phi == 0.0:  # all of the mass below any fraction of the mean
        return 0.0
    lower = p <= 0.5
    target = math.log(p) if lower else math.log1p(-p)
    sign = 1.0 if lower else -1.0  # g(s) below increases with s either way

    def g(s: float) -> float:
        t = math.exp(s)
        value = invgauss_log_cdf(t, phi) if lower else invgauss_log_sf(t, phi)
        return sign * (value - target)

    # Bracket [lo, hi] with g(lo) < 0 <= g(hi), by steps doubling away from s = 0 (t = mean),
    # within the range of exp (a quantile past it is 0 or inf in floating point).
    s, step = 0.0, 1.0
    g_s = g(s)
    if g_s >= 0.0:
        hi, g_hi = s, g_s
        while True:
            if s == _S_MIN:
                return 0.0
            s = max(s - step, _S_MIN)
            step *= 2.0
            g_s = g(s)
            if g_s < 0.0:
                lo, g_lo = s, g_s
                break
            hi, g_hi = s, g_s
    else:
        lo, g_lo = s, g_s
        while True:
            if s == _S_MAX:
                return math.inf
            s = min(s + step, _S_MAX)
            step *= 2.0
            g_s = g(s)
            if g_s >= 0.0:
                hi, g_hi = s, g_s
                break
            lo, g_lo = s, g_s

    # Newton in s, kept inside the bracket by bisection; g' = +-t f / F (or / (1 - F)).
    s = lo if -g_lo < g_hi else hi
    g_s = g_lo if s == lo else g_hi
    for _ in range(200):
        t = math.exp(s)
        value = g_s * sign + target
        log_slope = _log_t_density(t, phi) - value
        slope = math.exp(log_slope) if log_slope < 700.0 else math.inf
        nxt = s - g_s / slope if 0.0 < slope < math.inf else math.nan
        if not (lo < nxt < hi):
            nxt = 0.5 * (lo + hi)
        if abs(nxt - s) <= 4e-16 * max(1.0, abs(s)) or hi - lo <= 4e-16 * max(1.0, abs(lo)):
            s = nxt
            break
        s = nxt
        g_s = g(s)
        if g_s < 0.0:
            lo = s
        elif g_s > 0.0:
            hi = s
        else:
            break
    return mean * math.exp(s)
