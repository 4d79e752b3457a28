"""Anytime-valid tests on counts: errors, and requests slower than a latency threshold.

The test (Lindon & Malek's conditional count test, as Netflix uses it for canaries). Within one
observation interval the canary served dn_c requests and the primary dn_p; k = de_c + de_p
events (errors, or slow requests) happened. If each arm's events are Poisson with rates
proportional to the requests it served, with theta = canary rate / primary rate, then

    de_c | k  ~  Binomial(k, q),   q = rho*theta / (1 + rho*theta),   rho = dn_c / dn_p.

Conditioning on k and on the split that was *observed* is what makes the test robust: a burst
of traffic or an incident that raises both arms' rates changes k and rho but not how q depends
on theta, so it cancels. The log-likelihood of theta is kept on a fixed grid (a numpy vector),
so each observation costs O(grid) whatever its length; aggregating intervals (a slower
cadence) sums the same sufficient statistics, so the decisions barely depend on cadence.
The one limit: within one interval the split is taken as constant. If the split swings a lot
*and* an incident hits only part of a long interval, the interval's average split misattributes
the incident's events; short intervals (the controller's ticks) keep this small.

Fail e-process: a mixture, over a few thetas above `fail_theta`, of likelihood ratios against
`fail_theta`. The binomial family has a monotone likelihood ratio, so each ratio is a
nonnegative supermartingale under every theta <= fail_theta, and so is the mixture; by Ville's
inequality P(it ever reaches 1/alpha) <= alpha, at any cadence and any number of looks.

Pass e-process: the mirror image, a mixture over thetas below `pass_theta` against
`pass_theta`: evidence that the canary is within tolerance. Its running maximum is kept: the
first crossing of 2/pass_alpha is a stopping event of a valid test, so a pass stays reached.

Bounds for reports. The fail mixture, moved from fail_theta to any theta0 on the grid, tests
"ratio <= theta0"; the thetas it rejects are the lower confidence bound, and the mirrored
mixture gives the upper one. At theta0 = fail_theta this is the fail test itself, so the
bounds and the decision never disagree. The grid and the prior points are in twelfths of an
octave, so moving the mixture is an index shift (O(grid) numpy work per look).

Not rare events. For p50 latency half the requests are "events"; then the exact conditional
law of de_c given k is (noncentral) hypergeometric, not binomial. At theta = 1 the central
hypergeometric is dominated in convex order by the binomial with the same mean (Hoeffding,
1963), and every likelihood ratio here is a convex function of de_c, so the fail e-process stays
a (conservative) supermartingale; below theta = 1 the noncentral law is stochastically smaller
and the ratios are increasing in de_c, so the same holds. The pass e-process is exact in the rare-event (Poisson) limit
and approximately valid otherwise; a false pass is the cheaper error (see config.py).

Absolute tolerance. For rare events (errors near 0%, the slowest 1%) a ratio bound needs more
events than a canary ever sees, so a metric also passes when the canary's rate minus the
primary's is bounded below `abs_tolerance`: each arm gets an anytime-valid confidence sequence
for its own rate (a Beta(1/2, 1/2) mixture, Krichevsky-Trofimov, inverted by Newton's method)
and the difference of the bounds is compared. The pass alpha is split: half to the ratio route, a
quarter to each arm's bound.

Counter resets. Counts arrive cumulative. If any of the four counters goes backwards (a pod
restart, or extrapolation jitter in Prometheus' increase()), that interval is skipped: the test
re-bases on the new values and says so. It never sees a negative increment. An interval in
which an arm served no requests carries no information about theta; it is held back and merged
into the next one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "FAIL_PRIOR",
    "THETA_GRID",
    "CountState",
    "CountTest",
    "Judged",
    "fail_points",
    "pass_points",
    "rate_bounds",
    "rate_lower",
    "rate_upper",
]

FloatArray = npt.NDArray[np.float64]

# Grid for the confidence sequence: 1/64 .. 64 in twelfths of an octave (2^(k/12), ~6% steps).
# The prior multipliers below are whole steps too, so the grid can evaluate the fail mixture
# against *every* grid theta by shifting indices, which is how the bounds are computed.
_STEPS = 72
THETA_GRID: FloatArray = 2.0 ** (np.arange(-_STEPS, _STEPS + 1) / 12.0)

# Fail prior: multiples of fail_theta (in grid steps, so the bounds can shift by whole steps)
# and their weights. Most of the weight sits on the two regressions an SRE must catch quickly:
# 1.5x and 2x. The mixture's cost for a regression is log(1/w) of the point nearest to it, so
# weight on 1.5x is what makes a 50% rise in errors fail within minutes at 20 canary req/s,
# and 0.55 on 2x keeps the doubling within 1.4x of Wald's SPRT (benchmarks/RESULTS.md has the
# curve these were chosen from). A little weight reaches out to a crash, where evidence is
# overwhelming anyway.
_FAIL_STEPS: tuple[tuple[int, float], ...] = (
    (7, 0.35),  # 1.50
    (12, 0.55),  # 2.00
    (31, 0.05),  # 5.99
    (59, 0.05),  # 30.2
)
FAIL_PRIOR: tuple[tuple[float, float], ...] = tuple((2.0 ** (k / 12.0), w) for k, w in _FAIL_STEPS)
_SHIFTS = np.array([k for k, _ in _FAIL_STEPS])  # the same multipliers, in grid steps
_EXT = int(_SHIFTS.max())  # the likelihood grid extends this far beyond the CS grid
# Sums the fail-side rows and the mirrored rows of the bounds' matrix separately.
_ROW_SUMS = np.kron(np.eye(2), np.ones(len(_SHIFTS)))


def fail_points(fail_theta: float) -> list[tuple[float, float]]:
    """The fail mixture: (theta, weight) pairs, all above fail_theta."""
    return [(fail_theta * m, w) for m, w in FAIL_PRIOR]


def pass_points(pass_theta: float) -> list[tuple[float, float]]:
    """The pass mixture: (theta, weight) pairs, all below pass_theta (> 1).

    Most of the weight on theta = 1, the arms equal: what a good canary looks like, and the
    point whose evidence grows fastest when it is true (every 0.1 of weight moved elsewhere
    costs a good canary time to pass; benchmarks/RESULTS.md, the pass-prior rows). The rest on
    a canary a little worse (halfway to the tolerance), which would otherwise pass slowly, and
    on a better one.
    """
    return [(1.0, 0.8), ((1.0 + pass_theta) / 2.0, 0.1), (0.6, 0.1)]


def _betaln(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


_KT_PRIOR = _betaln(0.5, 0.5)


def _kt_h(events: float, n: float, p: float, log_mix: float) -> tuple[float, float]:
    """log(KT mixture / likelihood at p) and its derivative in p; convex in p."""
    f = log_mix
    d = 0.0
    if events > 0:
        f -= events * math.log(p)
        d -= events / p
    if n - events > 0:
        f -= (n - events) * math.log1p(-p)
        d += (n - events) / (1.0 - p)
    return f, d


def rate_bounds(events: float, n: float, alpha: float) -> tuple[float, float]:
    """Anytime-valid (lower, upper) bounds on one arm's event rate from events out of n.

    The Krichevsky-Trofimov mixture (a Beta(1/2, 1/2) prior over Bernoulli rates) divided by
    the likelihood at p is a nonnegative martingale under p; the rates where it stays below
    1/alpha form a confidence sequence (Robbins' method of mixtures). Its log is convex in p,
    so the set is an interval around the observed rate, and Newton's method started outside
    it converges monotonically to each end from outside: the bounds err on the wide side.
    """
    return rate_lower(events, n, alpha), rate_upper(events, n, alpha)


def _prepare(events: float, n: float, alpha: float) -> tuple[float, float, float, float]:
    events = min(max(events, 0.0), n)
    log_mix = _betaln(0.5 + events, 0.5 + n - events) - _KT_PRIOR - math.log(1.0 / alpha)
    p_hat = events / n
    # A generous normal-approximation half-width to start Newton from outside the set.
    width = math.sqrt(p_hat * (1 - p_hat) / n) * (2.0 + math.sqrt(-2 * log_mix + 2)) + 2.0 / n
    return events, log_mix, p_hat, width


def rate_upper(events: float, n: float, alpha: float, *, start: float | None = None) -> float:
    """The upper end of rate_bounds. `start`: a guess (the previous bound) to warm-start from."""
    if n <= 0 or events >= n:
        return 1.0
    events, log_mix, p_hat, width = _prepare(events, n, alpha)
    f = -1.0
    if start is not None and p_hat < start < 1.0:
        p = start  # usually still outside the set: Newton from there is monotone too
        f, d = _kt_h(events, n, p, log_mix)
    if f < 0:
        p = min(p_hat + width, (1.0 + p_hat) / 2.0)
        f, d = _kt_h(events, n, p, log_mix)
    while f < 0:  # still inside: move right
        if p >= 1.0 - 1e-12:
            return 1.0
        p = 1.0 - (1.0 - p) / 4.0
        f, d = _kt_h(events, n, p, log_mix)
    for _ in range(60):
        if f < 1e-6:  # the log e-value is within 1e-6 of the edge
            break
        p -= f / d  # d > 0 right of the minimum
        f, d = _kt_h(events, n, p, log_mix)
    return p


def rate_lower(events: float, n: float, alpha: float, *, start: float | None = None) -> float:
    """The lower end of rate_bounds. `start`: a guess (the previous bound) to warm-start from."""
    if n <= 0 or events <= 0:
        return 0.0
    events, log_mix, p_hat, width = _prepare(events, n, alpha)
    f = -1.0
    if start is not None and 0.0 < start < p_hat:
        p = start
        f, d = _kt_h(events, n, p, log_mix)
    if f < 0:
        p = p_hat - width if p_hat - width > 0 else p_hat / 4.0
        f, d = _kt_h(events, n, p, log_mix)
    while f < 0:  # still inside: move left
        p /= 4.0
        if p < 1e-15:
            return 0.0
        f, d = _kt_h(events, n, p, log_mix)
    for _ in range(60):
        if f < 1e-6:
            break
        p -= f / d  # d < 0 left of the minimum
        f, d = _kt_h(events, n, p, log_mix)
    return p


@dataclass(frozen=True, slots=True)
class Judged:
    """What one count test's decision needs after an update (CountTest.judged)."""

    log_e_fail: float
    e_fail: float
    samples_primary: float
    samples_canary: float
    abs_excess_upper: float | None  # anytime-valid upper bound on canary rate - primary rate
    passed_abs: bool


@dataclass(frozen=True, slots=True)
class CountState:
    """What one count test knows after an update: the numbers a MetricResult carries."""

    e_fail: float
    e_pass_ratio: float
    samples_primary: float
    samples_canary: float
    events_primary: float
    events_canary: float
    estimate: float | None  # canary rate / primary rate since the test began
    lower: float | None  # confidence sequence on the ratio, at the test's alpha
    upper: float | None
    rate_primary: float | None
    rate_canary: float | None
    abs_excess_upper: float | None  # anytime-valid upper bound on canary rate - primary rate
    passed_abs: bool


_Layout = tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    int,
    slice,
    slice,
    list[float],
    list[float],
]


@functools.lru_cache(maxsize=64)
def _layout(fail_theta: float, pass_theta: float, alpha: float) -> _Layout:
    """The arrays a CountTest reads but never writes, shared by every test with the same
    settings (each rollout has several tests: ~13 KiB each when they were per test, issue 13).
    Layout: the extended grid 2^(k/12), |k| <= 72 + _EXT, then the two nulls and the prior
    points (so one vector update serves the decisions and the bounds)."""
    fails, passes = fail_points(fail_theta), pass_points(pass_theta)
    fail_pts = [t for t, _ in fails]
    pass_pts = [t for t, _ in passes]
    ext = 2.0 ** (np.arange(-_STEPS - _EXT, _STEPS + _EXT + 1) / 12.0)
    n = ext.size
    grid = np.concatenate([ext, [fail_theta, pass_theta], fail_pts, pass_pts])
    w_fail = np.log(np.array([w for _, w in fails]))
    w_pass = np.log(np.array([w for _, w in passes]))
    # Bounds: for CS grid index i (position _EXT + i), the fail mixture against theta_i
    # reads positions + shift; the mirrored mixture (for the upper bound) - shift.
    base = np.arange(THETA_GRID.size) + _EXT
    idx = np.concatenate([base[None, :] + _SHIFTS[:, None], base[None, :] - _SHIFTS[:, None]])
    # log w - log(1/alpha): "reject theta0" is then sum(exp(...)) >= 1
    w_level = np.tile(w_fail - math.log(1.0 / alpha), 2)[:, None]
    arrays = (grid, np.log(grid), idx, w_level)
    for a in arrays:
        a.setflags(write=False)  # shared: a test that wrote one would change the others
    return (
        *arrays,
        n,
        slice(n + 2, n + 2 + len(fail_pts)),
        slice(n + 2 + len(fail_pts), grid.size),
        w_fail.tolist(),
        w_pass.tolist(),
    )


class CountTest:
    """One metric's conditional count test; feed it cumulative counts, it never awaits.

    `update` takes the cumulative (requests, events) of both arms since some fixed origin; only
    increments between consecutive updates are used, so the origin does not matter.
    """

    __slots__ = (
        "_abs_tolerance",
        "_alpha",
        "_cached",
        "_cs",
        "_e_pass_ratio",
        "_grid",
        "_hint",
        "_idx",
        "_judged",
        "_log_grid",
        "_loglik",
        "_n_cs",
        "_pass_alpha",
        "_pass_seen",
        "_prev",
        "_sl_fail",
        "_sl_pass",
        "_totals",
        "_w_fail_list",
        "_w_level",
        "_w_pass_list",
        "fail_theta",
        "pass_theta",
    )

    def __init__(
        self,
        *,
        alpha: float,
        pass_alpha: float,
        fail_theta: float = 1.0,
        pass_theta: float = 1.5,
        abs_tolerance: float = 0.0,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not 0.0 < pass_alpha < 1.0:
            raise ValueError(f"pass_alpha must be in (0, 1), got {pass_alpha}")
        if not 0.0 < fail_theta < pass_theta:
            raise ValueError(f"need 0 < fail_theta ({fail_theta}) < pass_theta ({pass_theta})")
        if pass_theta <= 1.0:
            raise ValueError(f"pass_theta must be above 1, got {pass_theta}")
        self.fail_theta = fail_theta
        self.pass_theta = pass_theta
        self._alpha = alpha
        self._pass_alpha = pass_alpha
        self._abs_tolerance = abs_tolerance
        layout = _layout(fail_theta, pass_theta, alpha)
        self._grid, self._log_grid, self._idx, self._w_level = layout[:4]
        self._n_cs, self._sl_fail, self._sl_pass = layout[4:7]
        self._w_fail_list, self._w_pass_list = layout[7:]
        grid = self._grid
        self._loglik = np.zeros(grid.size)
        self._prev: tuple[float, float, float, float] | None = None
        self._totals = [0.0, 0.0, 0.0, 0.0]  # n_c, e_c, n_p, e_p since the test began
        self._e_pass_ratio = 0.0  # running max of log e_pass (a pass is a stopping event)
        self._pass_seen = False  # e_pass of the current log-likelihood is in the max already
        self._cached: CountState | None = None  # state() until the next consumed increment
        # What a decision needs (judged()), until the next consumed increment: computed once
        # per increment whether state() or judged() asks first, so the rate bounds' warm
        # starts (_hint) follow the same chain either way (a replay stays exact).
        self._judged: Judged | None = None
        self._hint: tuple[float | None, float | None] = (None, None)  # last rate bounds
        # (log e_fail, ratio bounds) of the current log-likelihood; None once it moves
        self._cs: tuple[float, tuple[float, float] | None] | None = None

    @property
    def alpha(self) -> float:
        return self._alpha

    def update(self, n_c: float, e_c: float, n_p: float, e_p: float) -> list[str]:
        """Consume cumulative counts; returns notes (counter resets, clamped increments)."""
        notes: list[str] = []
        prev = self._prev
        if prev is None:
            # The first look is the origin. Counts before it are not tested: for latency, they
            # chose the threshold and would bias the test.
            self._prev = (n_c, e_c, n_p, e_p)
            return notes
        dn_c, de_c, dn_p, de_p = n_c - prev[0], e_c - prev[1], n_p - prev[2], e_p - prev[3]
        if dn_c < 0 or de_c < 0 or dn_p < 0 or de_p < 0:
            self._prev = (n_c, e_c, n_p, e_p)
            notes.append("a counter went backwards (restart?): that interval was skipped")
            return notes
        if dn_c <= 0 or dn_p <= 0:
            return notes  # no split to condition on yet: merged into the next interval
        if de_c > dn_c or de_p > dn_p:
            de_c, de_p = min(de_c, dn_c), min(de_p, dn_p)
            notes.append("more events than requests in an interval: events clamped")
        self._prev = (n_c, e_c, n_p, e_p)
        self._cached = self._judged = None
        t = self._totals
        t[0] += dn_c
        t[1] += de_c
        t[2] += dn_p
        t[3] += de_p
        k = de_c + de_p
        if k > 0:
            # log q = log(rho theta) - log1p(rho theta); log(1 - q) = -log1p(rho theta); the
            # de_c*log(rho) term is the same for every theta and cancels in every ratio.
            slow_side = k * np.log1p((dn_c / dn_p) * self._grid)
            if de_c > 0:
                self._loglik += de_c * self._log_grid - slow_side
            else:
                # No canary events (most seconds of a rare event): 0 * log theta is +-0 and
                # x + (+-0 - y) == x - y exactly, so this is the line above with two fewer
                # passes over the grid.
                self._loglik -= slow_side
            self._cs = None
        if k > 0 or not self._pass_seen:
            # (otherwise the log-likelihood, hence this e-value, is the one already seen)
            self._pass_seen = True
            lp = self._log_e_pass_now()
            if lp > self._e_pass_ratio:
                self._e_pass_ratio = lp
        return notes

    # Five-term sums in plain floats: the same IEEE operations, in the same order, as
    # (w + ll[slice]) - ll[null] in numpy, without three small-array round trips.
    def _log_e_fail(self) -> float:
        ll = self._loglik
        null = ll.item(self._n_cs)
        return _small_logsumexp(
            [
                w + x - null
                for w, x in zip(self._w_fail_list, ll[self._sl_fail].tolist(), strict=True)
            ]
        )

    def _log_e_pass_now(self) -> float:
        ll = self._loglik
        null = ll.item(self._n_cs + 1)
        return _small_logsumexp(
            [
                w + x - null
                for w, x in zip(self._w_pass_list, ll[self._sl_pass].tolist(), strict=True)
            ]
        )

    def judged(self) -> Judged:
        """What a decision needs now (the fail e-value, the absolute pass route), without the
        ratio bounds that state() adds for reports: a replay judges every look with this
        alone. Cached until the next consumed increment, shared with state()."""
        judged = self._judged
        if judged is not None:
            return judged
        n_c, e_c, n_p, e_p = self._totals
        cs = self._cs
        log_e_fail = cs[0] if cs is not None else self._log_e_fail()
        abs_upper: float | None = None
        passed_abs = False
        if n_c > 0 and n_p > 0:
            quarter = self._pass_alpha / 4.0
            c_hi = rate_upper(e_c, n_c, quarter, start=self._hint[0])
            p_lo = rate_lower(e_p, n_p, quarter, start=self._hint[1])
            self._hint = (c_hi, p_lo)
            abs_upper = c_hi - p_lo
            passed_abs = abs_upper < self._abs_tolerance
        judged = self._judged = Judged(
            log_e_fail=log_e_fail,
            e_fail=_exp(log_e_fail),
            samples_primary=n_p,
            samples_canary=n_c,
            abs_excess_upper=abs_upper,
            passed_abs=passed_abs,
        )
        return judged

    def state(self) -> CountState:
        """The test's numbers now; cheap (O(grid)), and cached until the next increment."""
        if self._cached is not None:
            return self._cached
        judged = self.judged()
        n_c, e_c, n_p, e_p = self._totals
        rate_c = e_c / n_c if n_c > 0 else None
        rate_p = e_p / n_p if n_p > 0 else None
        estimate: float | None = None
        if rate_c is not None and rate_p is not None:
            if rate_p > 0:
                estimate = rate_c / rate_p
            elif rate_c == 0:
                estimate = 1.0 if e_c + e_p > 0 else None
            else:
                estimate = math.inf
        cs = self._cs
        if cs is None:
            # Recomputed only when the log-likelihood moved (an interval without events,
            # e.g. no slow request this second, leaves both as they were).
            cs = self._cs = (judged.log_e_fail, self._ratio_cs() if e_c + e_p > 0 else None)
        bounds = cs[1]
        lower, upper = bounds if bounds is not None else (None, None)
        self._cached = CountState(
            e_fail=judged.e_fail,
            e_pass_ratio=_exp(self._e_pass_ratio),
            samples_primary=n_p,
            samples_canary=n_c,
            events_primary=e_p,
            events_canary=e_c,
            estimate=estimate,
            lower=lower,
            upper=upper,
            rate_primary=rate_p,
            rate_canary=rate_c,
            abs_excess_upper=judged.abs_excess_upper,
            passed_abs=judged.passed_abs,
        )
        return self._cached

    def carry(self) -> dict[str, Any]:
        """The test's state, exactly, as JSON values (floats round-trip through their repr; the
        log-likelihood goes as its float64 bytes): a test of the same settings given it by
        carry_on judges every later update as this one would. The caches that follow from
        it are not carried, except `judged` (its rate bounds warm-start the next ones)."""
        j = self._judged
        return {
            "loglik": base64.b64encode(self._loglik.astype("<f8").tobytes()).decode("ascii"),
            "prev": None if self._prev is None else list(self._prev),
            "totals": list(self._totals),
            "e_pass": self._e_pass_ratio,
            "pass_seen": self._pass_seen,
            "hint": list(self._hint),
            "judged": None
            if j is None
            else [
                j.log_e_fail,
                j.e_fail,
                j.samples_primary,
                j.samples_canary,
                j.abs_excess_upper,
                j.passed_abs,
            ],
        }

    def carry_on(self, state: object) -> None:
        """Take up a state carry() gave, from a test of the same settings. Raises ValueError
        naming what is wrong; the test is then unchanged."""
        if not isinstance(state, dict):
            raise ValueError("a count test's state is not an object")
        try:
            raw = base64.b64decode(str(state.get("loglik")), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"loglik is not base64: {exc}") from None
        if len(raw) != 8 * self._loglik.size:
            raise ValueError(f"loglik holds {len(raw)} bytes, not {8 * self._loglik.size}")
        loglik = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        if not np.isfinite(loglik).all():
            raise ValueError("loglik is not finite")
        prev = state.get("prev")
        p = None if prev is None else _numbers(prev, 4, "prev")
        totals = _numbers(state.get("totals"), 4, "totals")
        e_pass = _number(state.get("e_pass"), "e_pass")
        pass_seen = state.get("pass_seen")
        if not isinstance(pass_seen, bool):
            raise ValueError("pass_seen is not a bool")
        hint = state.get("hint")
        if not isinstance(hint, list) or len(hint) != 2:
            raise ValueError("hint is not a pair")
        hints = tuple(None if h is None else _number(h, "hint") for h in hint)
        judged = state.get("judged")
        if judged is not None:
            if not isinstance(judged, list) or len(judged) != 6:
                raise ValueError("judged is not six values")
            log_e_fail, e_fail, n_p, n_c, abs_upper, passed_abs = judged
            if not isinstance(passed_abs, bool):
                raise ValueError("judged's passed_abs is not a bool")
            judged = Judged(
                log_e_fail=_number(log_e_fail, "log_e_fail", finite=False),
                e_fail=_number(e_fail, "e_fail", finite=False),
                samples_primary=_number(n_p, "judged samples"),
                samples_canary=_number(n_c, "judged samples"),
                abs_excess_upper=None if abs_upper is None else _number(abs_upper, "abs"),
                passed_abs=passed_abs,
            )
        self._prev = None if p is None else (p[0], p[1], p[2], p[3])
        self._loglik = loglik
        self._totals = totals
        self._e_pass_ratio = e_pass
        self._pass_seen = pass_seen
        self._hint = (hints[0], hints[1])
        self._judged = judged
        self._cached = None
        self._cs = None

    def pass_ratio_reached(self) -> bool:
        return self._e_pass_ratio >= math.log(2.0 / self._pass_alpha)

    def fail_reached(self) -> bool:
        return self._log_e_fail() >= math.log(1.0 / self._alpha)

    def _ratio_cs(self) -> tuple[float, float]:
        """One-sided anytime-valid bounds on theta, each at level alpha.

        lower: the smallest grid theta0 that the fail mixture (the fail test's prior, moved to
        theta0) has not rejected; at theta0 = fail_ratio this *is* the fail test, so a FAIL
        always comes with lower >= fail_ratio (every ratio <= lower is rejected). upper: the mirror image (multipliers below
        theta0). The log-likelihood is concave in log theta, so L(theta0*m) - L(theta0) falls
        as theta0 grows: the rejected thetas are a prefix (lower) and a suffix (upper) of the
        grid, and counting them finds the bounds. Bounds snap outward by one grid step.
        """
        ll = self._loglik
        n = THETA_GRID.size
        x = ll[self._idx]
        x -= ll[_EXT : _EXT + n]  # the grid theta0 of each column (a view)
        x += self._w_level
        np.minimum(x, 50.0, out=x)  # exp stays finite; the sum only needs to reach 1
        np.exp(x, out=x)
        rejected = (_ROW_SUMS @ x) >= 1.0  # mixture over the 5 prior points, per side
        below = int(np.count_nonzero(rejected[0]))
        above = int(np.count_nonzero(rejected[1]))
        lower = 0.0 if below == 0 else float(THETA_GRID[below - 1])
        upper = math.inf if above == 0 else float(THETA_GRID[min(n - above, n - 1)])
        return lower, upper


def _number(value: object, what: str, *, finite: bool = True) -> float:
    """A carried number: an int or a float (not a bool), finite unless `finite` is False
    (never NaN)."""
    if type(value) not in (int, float):
        raise ValueError(f"{what} is not a number")
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{what} is not finite")
    return number


def _numbers(value: object, count: int, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != count:
        raise ValueError(f"{what} is not {count} numbers")
    return [_number(v, what) for v in value]


def _small_logsumexp(x: list[float]) -> float:
    # A handful of terms: plain floats beat numpy's per-call overhead.
    m = max(x)
    if not math.isfinite(m):
        return m
    return m + math.log(sum(math.exp(v - m) for v in x))


def _exp(x: float) -> float:
    return math.exp(x) if x < 700.0 else math.inf
