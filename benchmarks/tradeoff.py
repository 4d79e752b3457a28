"""The error test's trade-off curve: tolerance, absolute tolerance and priors against speed.

Choosing the error defaults means trading a good canary's time to pass against how often a
bad one is caught, at the traffic real services have. Sweeping that with the full Analyzer
(latency metrics and all) would cost minutes per point, so this module runs the *errors*
metric alone, vectorised over runs: the same conditional binomial likelihood on the same
prior points (`analysis.counts.fail_points`/`pass_points` unless a variant is named), the same
levels (fail at 1/alpha_errors, pass at 2/pass_alpha with the running maximum, or the absolute
route with the Krichevsky-Trofimov bounds at pass_alpha/4 per arm), the same hold-back of
intervals in which an arm served nothing, and the same min_samples. `check_against_engine`
replays streams through `analysis.counts.CountTest` and reports how many decisions agree.

What this leaves out: the latency metrics, which in A/A can only delay a pass (the Analyzer
passes when every metric has passed), and which the main tables measure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.special import betaln

from analysis import AnalysisConfig
from analysis.counts import CountTest, fail_points, pass_points

__all__ = [
    "Curve",
    "ErrorsConfig",
    "Traffic",
    "check_against_engine",
    "simulate_errors",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Points = list[tuple[float, float]]


@dataclass(frozen=True)
class Traffic:
    """Per-second Poisson arrivals per arm and the primary's error rate."""

    name: str
    canary_rps: float
    primary_rps: float
    base_error_rate: float = 0.01


@dataclass(frozen=True)
class ErrorsConfig:
    """One point of the sweep: the errors metric's settings and priors."""

    label: str
    tolerance: float
    abs_tolerance: float
    alpha: float  # the errors metric's share of alpha
    pass_alpha: float = 0.05
    min_samples: float = 200.0
    fail_prior: Callable[[float], Points] = fail_points
    pass_prior: Callable[[float], Points] = pass_points


@dataclass(frozen=True)
class Curve:
    """Outcomes of `runs` runs: decision codes (0 none, 1 fail, 2 pass) and times."""

    decision: IntArray
    time_s: FloatArray
    canary_requests: FloatArray  # served up to the decision (or the whole run)

    @property
    def runs(self) -> int:
        return int(self.decision.size)

    def share(self, code: int, within_s: float = math.inf) -> float:
        return float(np.mean((self.decision == code) & (self.time_s <= within_s)))

    def count(self, code: int) -> int:
        return int(np.sum(self.decision == code))

    def median(self, code: int, values: FloatArray | None = None) -> float:
        """Median over all runs, those without the decision counting as +inf."""
        v = self.time_s if values is None else values
        arr = np.sort(np.where(self.decision == code, v, np.inf))
        return float(arr[math.ceil(0.5 * arr.size) - 1])


def _lse(x: FloatArray) -> FloatArray:
    m = x.max(axis=1, keepdims=True)
    out: FloatArray = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    return out


def _kt_h(
    e: FloatArray, n: FloatArray, p: FloatArray, log_mix: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """counts._kt_h over arrays: the log e-value at p and its derivative."""
    with np.errstate(divide="ignore", invalid="ignore"):
        f: FloatArray = (
            log_mix
            - np.where(e > 0, e * np.log(p), 0.0)
            - np.where(n - e > 0, (n - e) * np.log1p(-p), 0.0)
        )
        d: FloatArray = np.where(e > 0, -e / p, 0.0) + np.where(n - e > 0, (n - e) / (1 - p), 0.0)
    return f, d


def _kt_bound(e: FloatArray, n: FloatArray, alpha: float, *, upper: bool) -> FloatArray:
    """counts.rate_upper / rate_lower over arrays: Newton from outside, as the engine does."""
    log_mix = betaln(0.5 + e, 0.5 + n - e) - betaln(0.5, 0.5) - math.log(1.0 / alpha)
    p_hat = e / n
    width = np.sqrt(p_hat * (1 - p_hat) / n) * (2.0 + np.sqrt(-2 * log_mix + 2)) + 2.0 / n
    if upper:
        p = np.minimum(p_hat + width, (1.0 + p_hat) / 2.0)
    else:
        p = np.where(p_hat - width > 0, p_hat - width, p_hat / 4.0)
    p = np.where((p > 0) & (p < 1), p, 0.5)  # degenerate rows are overwritten below
    f, d = _kt_h(e, n, p, log_mix)
    for _ in range(40):  # still inside: step outward
        inside = f < 0
        if not inside.any():
            break
        p = np.where(inside, 1.0 - (1.0 - p) / 4.0 if upper else p / 4.0, p)
        f, d = _kt_h(e, n, p, log_mix)
    for _ in range(60):
        todo = f >= 1e-6
        if not todo.any():
            break
        p = np.where(todo, p - f / d, p)
        f, d = _kt_h(e, n, p, log_mix)
    if upper:
        return np.where(e >= n, 1.0, p)
    return np.where(e <= 0, 0.0, p)


def simulate_errors(
    traffic: Traffic,
    config: ErrorsConfig,
    *,
    ratio: float,
    runs: int,
    seed: int,
    seconds: int = 900,
    every_s: int = 1,
) -> Curve:
    """`runs` runs of the errors test, looking every `every_s` s; canary rate = ratio * base."""
    rng = np.random.default_rng(seed)
    pass_theta = 1.0 + config.tolerance
    fails, passes = config.fail_prior(1.0), config.pass_prior(pass_theta)
    f_theta = np.array([t for t, _ in fails])
    p_theta = np.array([t for t, _ in passes])
    f_w = np.log(np.array([w for _, w in fails]))
    p_w = np.log(np.array([w for _, w in passes]))
    grid = np.concatenate([[1.0, pass_theta], f_theta, p_theta])
    log_grid = np.log(grid)
    nf = f_theta.size
    ll = np.zeros((runs, grid.size))
    pending = np.zeros((runs, 4))  # n_c, e_c, n_p, e_p not yet consumed
    totals = np.zeros((runs, 4))
    served = np.zeros(runs)
    log_pass = np.full(runs, -np.inf)
    decision = np.zeros(runs, dtype=np.int64)
    time_s = np.full(runs, float(seconds))
    at_decision = np.zeros(runs)
    level_fail = math.log(1.0 / config.alpha)
    level_pass = math.log(2.0 / config.pass_alpha)
    p_c = min(1.0, traffic.base_error_rate * ratio)
    for s in range(1, seconds + 1):
        n_c = rng.poisson(traffic.canary_rps, runs)
        n_p = rng.poisson(traffic.primary_rps, runs)
        e_c = rng.binomial(n_c, p_c)
        e_p = rng.binomial(n_p, traffic.base_error_rate)
        pending += np.column_stack([n_c, e_c, n_p, e_p])
        served += n_c
        if s % every_s:
            continue
        active = decision == 0
        use = active & (pending[:, 0] > 0) & (pending[:, 2] > 0)
        if use.any():
            d = pending[use]
            k = d[:, 1] + d[:, 3]
            rho = d[:, 0] / d[:, 2]
            ll[use] += d[:, 1:2] * log_grid[None, :] - k[:, None] * np.log1p(
                rho[:, None] * grid[None, :]
            )
            totals[use] += d
            pending[use] = 0.0
            lp = _lse(p_w[None, :] + ll[use][:, 2 + nf :] - ll[use][:, 1:2])
            log_pass[use] = np.maximum(log_pass[use], lp)
        log_fail = _lse(f_w[None, :] + ll[:, 2 : 2 + nf] - ll[:, 0:1])
        failed = active & (totals[:, 0] > 0) & (totals[:, 2] > 0) & (log_fail >= level_fail)
        decision[failed] = 1
        time_s[failed] = s
        at_decision[failed] = served[failed]
        active = decision == 0
        enough = (
            active & (totals[:, 0] >= config.min_samples) & (totals[:, 2] >= config.min_samples)
        )
        passed = enough & (log_pass >= level_pass)
        if config.abs_tolerance > 0:
            idx = np.flatnonzero(enough & ~passed)
            if idx.size:
                t = totals[idx]
                quarter = config.pass_alpha / 4.0
                c_hi = _kt_bound(t[:, 1], t[:, 0], quarter, upper=True)
                p_lo = _kt_bound(t[:, 3], t[:, 2], quarter, upper=False)
                passed[idx] |= (c_hi - p_lo) < config.abs_tolerance
        decision[passed] = 2
        time_s[passed] = s
        at_decision[passed] = served[passed]
        if not (decision == 0).any():
            break
    at_decision = np.where(decision == 0, served, at_decision)
    return Curve(decision, time_s, at_decision)


def check_against_engine(
    traffic: Traffic, *, ratio: float, runs: int, seed: int, seconds: int = 900
) -> tuple[int, int]:
    """(agreeing, runs): decisions and times of this emulation vs analysis' CountTest.

    Both see the same per-second counts (drawn here); the engine's test is driven the way the
    Analyzer drives it with the default config (errors metric only).
    """
    cfg = AnalysisConfig()
    alpha = cfg.metric_alphas()["errors"]
    emulated = ErrorsConfig(
        "default",
        cfg.errors.tolerance,
        cfg.errors.abs_tolerance,
        alpha,
        pass_alpha=cfg.pass_alpha,
        min_samples=cfg.min_samples,
    )
    agree = 0
    for run in range(runs):
        curve = simulate_errors(
            traffic, emulated, ratio=ratio, runs=1, seed=seed + run, seconds=seconds
        )
        # Replay the same draws through the engine.
        rng = np.random.default_rng(seed + run)
        test = CountTest(
            alpha=alpha,
            pass_alpha=cfg.pass_alpha,
            fail_theta=cfg.errors.fail_ratio,
            pass_theta=1.0 + cfg.errors.tolerance,
            abs_tolerance=cfg.errors.abs_tolerance,
        )
        test.update(0.0, 0.0, 0.0, 0.0)
        cum = np.zeros(4)
        decision, when = 0, float(seconds)
        p_c = min(1.0, traffic.base_error_rate * ratio)
        for s in range(1, seconds + 1):
            n_c = rng.poisson(traffic.canary_rps, 1)
            n_p = rng.poisson(traffic.primary_rps, 1)
            e_c = rng.binomial(n_c, p_c)
            e_p = rng.binomial(n_p, traffic.base_error_rate)
            cum += np.array([n_c[0], e_c[0], n_p[0], e_p[0]], dtype=np.float64)
            test.update(float(cum[0]), float(cum[1]), float(cum[2]), float(cum[3]))
            st = test.state()
            if st.samples_canary > 0 and st.samples_primary > 0 and test.fail_reached():
                decision, when = 1, float(s)
                break
            enough = min(st.samples_canary, st.samples_primary) >= cfg.min_samples
            if enough and (test.pass_ratio_reached() or st.passed_abs):
                decision, when = 2, float(s)
                break
        agree += int(curve.decision[0] == decision and curve.time_s[0] == when)
    return agree, runs


def _previous_fail_prior(fail_theta: float) -> Points:
    """The fail prior before issue 12: 0.6 on 2x, 0.1 each on 1.5x, 3x, 6x and 30x."""
    steps = ((7, 0.1), (12, 0.6), (19, 0.1), (31, 0.1), (59, 0.1))
    return [(fail_theta * 2.0 ** (k / 12.0), w) for k, w in steps]


def _previous_pass_prior(pass_theta: float) -> Points:
    """The pass prior before issue 12: 0.5 on equal arms."""
    return [(1.0, 0.5), ((1.0 + pass_theta) / 2.0, 0.2), (0.6, 0.2), (0.3, 0.1)]


def _all_on_one(pass_theta: float) -> Points:
    return [(1.0, 1.0)]


T20 = Traffic("20 canary req/s at 10% (200 req/s)", 20.0, 180.0)
T20_EVEN = Traffic("20 canary req/s at 50% (40 req/s)", 20.0, 20.0)
T2 = Traffic("2 canary req/s at 10% (20 req/s)", 2.0, 18.0)
T20_RARE = Traffic("20 canary req/s at 10%, 0.1% errors", 20.0, 180.0, base_error_rate=0.001)
RATIOS = (1.0, 1.5, 2.0)


@dataclass(frozen=True)
class Row:
    traffic: Traffic
    config: ErrorsConfig
    ratios: tuple[float, ...] = RATIOS


def rows() -> list[tuple[str, list[Row]]]:
    """The sweep, in groups: (title, rows)."""
    cfg = AnalysisConfig()
    alpha = cfg.metric_alphas()["errors"]
    previous_alpha = AnalysisConfig(errors_alpha_share=0.8).metric_alphas()["errors"]

    def c(label: str, tol: float, abs_tol: float = 0.002, **kw: object) -> ErrorsConfig:
        return ErrorsConfig(label, tol, abs_tol, kw.pop("alpha", alpha), **kw)  # type: ignore[arg-type]

    previous = c(
        "previous defaults: tol 1.0, abs 0.005, old priors, alpha_err 0.8%",
        1.0,
        0.005,
        alpha=previous_alpha,
        fail_prior=_previous_fail_prior,
        pass_prior=_previous_pass_prior,
    )
    groups: list[tuple[str, list[Row]]] = []
    tol_rows = []
    for traffic in (T20, T20_EVEN, T2):
        tol_rows.append(Row(traffic, previous))
        for tol in (0.3, 0.4, 0.5, 0.6, 0.75, 1.0):
            label = f"tolerance {tol:g}, abs 0.002" + (" (default)" if tol == 0.5 else "")
            tol_rows.append(Row(traffic, c(label, tol)))
    groups.append(("Relative tolerance (pass below 1 + tolerance), default priors", tol_rows))
    prior_rows = []
    for traffic in (T20, T20_EVEN):
        prior_rows.append(
            Row(
                traffic,
                c("pass prior: old (0.5 on equal arms)", 0.5, pass_prior=_previous_pass_prior),
            )
        )
        prior_rows.append(Row(traffic, c("pass prior: default (0.8 on equal arms)", 0.5)))
        prior_rows.append(
            Row(traffic, c("pass prior: all on equal arms", 0.5, pass_prior=_all_on_one))
        )
    groups.append(("Pass prior, tolerance 0.5, abs 0.002", prior_rows))
    abs_rows = []
    for traffic in (T20, T20_RARE):
        for abs_tol in (0.0, 0.001, 0.002, 0.005):
            abs_rows.append(
                Row(traffic, c(f"tolerance 0.5, abs {abs_tol:g}", 0.5, abs_tol), ratios=(1.0, 1.5))
            )
    groups.append(("Absolute tolerance (points of error rate), tolerance 0.5", abs_rows))
    fail_rows = [
        Row(
            T20,
            c(
                "fail prior: old, alpha_err 0.8%",
                0.5,
                alpha=previous_alpha,
                fail_prior=_previous_fail_prior,
            ),
        ),
        Row(T20, c("fail prior: old, alpha_err 0.9%", 0.5, fail_prior=_previous_fail_prior)),
        Row(T20, c("fail prior: default, alpha_err 0.8%", 0.5, alpha=previous_alpha)),
        Row(T20, c("fail prior: default, alpha_err 0.9% (default)", 0.5)),
    ]
    groups.append(("Fail prior and the errors' share of alpha, tolerance 0.5", fail_rows))
    return groups


def sweep(
    groups: Sequence[tuple[str, list[Row]]], *, runs_aa: int, runs_regression: int, seed: int
) -> dict[tuple[str, str, float], Curve]:
    """Every row's ratios. Seeds depend on (traffic, ratio) only: every configuration sees the
    same traffic (common random numbers), so differences between rows are the settings'."""
    out: dict[tuple[str, str, float], Curve] = {}
    traffic_index: dict[str, int] = {}
    done: dict[tuple[object, ...], Curve] = {}  # the same settings under another label
    for _, group in groups:
        for row in group:
            ti = traffic_index.setdefault(row.traffic.name, len(traffic_index))
            for ratio in row.ratios:
                key = (row.traffic.name, row.config.label, ratio)
                c = row.config
                same = (
                    row.traffic,
                    c.tolerance,
                    c.abs_tolerance,
                    c.alpha,
                    c.pass_alpha,
                    c.min_samples,
                    c.fail_prior,
                    c.pass_prior,
                    ratio,
                )
                if same not in done:
                    runs = runs_aa if ratio == 1.0 else runs_regression
                    done[same] = simulate_errors(
                        row.traffic,
                        c,
                        ratio=ratio,
                        runs=runs,
                        seed=seed + 1000 * ti + round(ratio * 10),
                    )
                out[key] = done[same]
    return out


def _cp(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return lo, hi


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return "not reached" if math.isinf(x) else f"{x:,.0f}"


def section(*, runs_aa: int, runs_regression: int, seed: int, budget_s: float = 900.0) -> list[str]:
    """The Markdown section: one table per group."""
    groups = rows()
    curves = sweep(groups, runs_aa=runs_aa, runs_regression=runs_regression, seed=seed)
    lines = []
    for title, group in groups:
        lines += [
            f"### {title}",
            "",
            "| traffic | settings | A/A false rollbacks (CP95) | A/A pass <= 15 min | A/A median s to pass "
            "| 1.5x rolled back <= 15 min | 1.5x promoted | 1.5x median canary req to rollback "
            "| 2x rolled back <= 15 min | 2x median canary req |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in group:
            cells = [row.traffic.name, row.config.label]
            aa = curves[(row.traffic.name, row.config.label, 1.0)]
            k = aa.count(1)
            lo, hi = _cp(k, aa.runs)
            cells += [
                f"{k}/{aa.runs} = {_pct(k / aa.runs)} [{_pct(lo)}, {_pct(hi)}]",
                _pct(aa.share(2, budget_s)),
                _num(aa.median(2)),
            ]
            for ratio in (1.5, 2.0):
                key = (row.traffic.name, row.config.label, ratio)
                if key not in curves:
                    cells += ["", "", ""] if ratio == 1.5 else ["", ""]
                    continue
                cv = curves[key]
                cells.append(_pct(cv.share(1, budget_s)))
                if ratio == 1.5:
                    cells.append(_pct(cv.share(2)))
                cells.append(_num(cv.median(1, cv.canary_requests)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """python -m benchmarks.tradeoff [--runs-aa N] [--runs-regression N] [--seed S]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.tradeoff", description=__doc__)
    parser.add_argument("--runs-aa", type=int, default=1000)
    parser.add_argument("--runs-regression", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(
        "\n".join(
            section(runs_aa=args.runs_aa, runs_regression=args.runs_regression, seed=args.seed)
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
