"""The yardsticks: two reference deciders written from their anchors' documented rules, and Wald's limit.

The analysis engine is only interesting relative to what people run today and to what no
test can beat, so this module holds three things:

- `flagger_decide`: Flagger's threshold analysis (canary alone, absolute thresholds, once
  per interval, rollback after `threshold` failed checks).
- `kayenta_decide`: Kayenta's NetflixACAJudge (Mann-Whitney at 98% on per-interval values of
  canary vs baseline, re-run over the growing window every interval, scored as the share of
  metrics that pass).
- `sprt_*`: Wald's sequential probability ratio test for the error regression, the optimal
  test for two simple hypotheses (Wald & Wolfowitz 1948), by Wald's approximation and by
  simulation.

All three read the same `RunStream` the engine reads. Nothing here is tuned to the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import norm, rankdata

from benchmarks.simulate import RunStream, histogram_quantile

__all__ = [
    "FlaggerConfig",
    "KayentaConfig",
    "Outcome",
    "SprtLimit",
    "flagger_decide",
    "kayenta_decide",
    "mann_whitney_classify",
    "sprt_one_sample",
    "sprt_two_sample",
]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Outcome:
    """What a decider did in one run: its decision and the cost at that moment."""

    decision: str  # "fail" | "pass" | "none" (no decision within the run)
    time_s: float  # elapsed seconds at the decision (the run's length when "none")
    canary_requests: int  # canary requests served up to the decision
    canary_errors: int  # failed canary requests served to users up to the decision


def _outcome(stream: RunStream, decision: str, seconds: int) -> Outcome:
    seconds = min(seconds, stream.seconds)
    return Outcome(
        decision=decision,
        time_s=float(seconds),
        canary_requests=int(stream.canary.requests[:seconds].sum()),
        canary_errors=int(stream.canary.errors[:seconds].sum()),
    )


# --------------------------------------------------------------------------------------
# Flagger


@dataclass(frozen=True)
class FlaggerConfig:
    """Flagger's `analysis` block with its built-in metrics.

    Defaults are the documented example: interval 1m, threshold 5,
    `request-success-rate` thresholdRange.min 99 (percent, over 1m) and
    `request-duration` thresholdRange.max 500 (P99 milliseconds, over 1m).
    `iterations` is the number of successful checks before promotion (the A/B and
    blue/green form; with a fixed canary weight it is what `maxWeight/stepWeight` amounts to).
    """

    interval_s: int = 60
    threshold: int = 5
    iterations: int = 10
    min_success_rate_pct: float = 99.0
    max_p99_ms: float = 500.0


def flagger_decide(stream: RunStream, config: FlaggerConfig = FlaggerConfig()) -> Outcome:
    """Flagger's analysis loop over one run.

    Sources: https://docs.flagger.app/usage/metrics (built-in checks, `thresholdRange`,
    metric `interval`), https://docs.flagger.app/usage/deployment-strategies (`interval`,
    `threshold` = "max number of failed metric checks before rollback", `iterations`), and
    fluxcd/flagger pkg/controller/scheduler.go (failed checks accumulate over the analysis and
    are not reset by a successful check; a query with no value counts as a failed check).

    Every `interval_s` the canary alone is checked over the last interval: success rate
    >= min and histogram_quantile(0.99) <= max. A failed check increments the counter; at
    `threshold` failures the canary is rolled back. Flagger itself rolls back at the start of
    the *next* tick; deciding at the failing tick is one interval generous to Flagger.
    After `iterations` passing checks the canary is promoted.
    """
    failed = 0
    passed = 0
    step = config.interval_s
    canary = stream.canary
    for end in range(step, stream.seconds + 1, step):
        window = slice(end - step, end)
        requests = int(canary.requests[window].sum())
        ok = False
        if requests > 0:  # 0/0 is NaN in PromQL: Flagger reports "no values found", a failure
            success_pct = 100.0 * (1.0 - canary.errors[window].sum() / requests)
            p99_ms = 1000.0 * histogram_quantile(0.99, canary.buckets[window].sum(axis=0))
            ok = success_pct >= config.min_success_rate_pct and p99_ms <= config.max_p99_ms
        if ok:
            passed += 1
            if passed >= config.iterations:
                return _outcome(stream, "pass", end)
        else:
            failed += 1
            if failed >= config.threshold:
                return _outcome(stream, "fail", end)
    return _outcome(stream, "none", stream.seconds)


# --------------------------------------------------------------------------------------
# Kayenta


@dataclass(frozen=True)
class KayentaConfig:
    """NetflixACAJudge settings and the Spinnaker canary stage around it.

    confidence 0.98 and tolerance 0.25 are hard-coded in NetflixACAJudge.classifyMetric; the
    score thresholds are the usual Spinnaker stage values (marginal 75, pass 95);
    `lifetime_s` is the stage length after which the last score decides the pass.
    `step_s` is the resolution of the metric series the judge compares (Kayenta's `step`):
    per minute by default; a finer step gives the judge more points per arm.
    """

    def __post_init__(self) -> None:
        if self.step_s <= 0 or self.interval_s % self.step_s:
            raise ValueError(
                f"interval_s ({self.interval_s}) must be a multiple of step_s ({self.step_s})"
            )

    interval_s: int = 60
    step_s: int = 60  # one metric value per step; 60 = the per-minute values of the issue
    lifetime_s: int = 600
    confidence: float = 0.98
    tolerance: float = 0.25
    marginal_score: float = 75.0
    pass_score: float = 95.0
    iqr_factor: float = 3.0


def _percentile_legacy(values: FloatArray, p: float) -> float:
    """Apache Commons Math `StatUtils.percentile` (EstimationType.LEGACY), p in (0, 100]."""
    v = np.sort(values)
    n = v.size
    pos = p * (n + 1) / 100.0
    if pos < 1:
        return float(v[0])
    if pos >= n:
        return float(v[-1])
    k = math.floor(pos)
    return float(v[k - 1] + (pos - k) * (v[k] - v[k - 1]))


def _remove_outliers(values: FloatArray, factor: float) -> FloatArray:
    """NetflixACAJudge.transformMetric: IQRDetector(factor = 3.0, reduceSensitivity = true).

    Source: spinnaker kayenta-judge .../detectors/IQRDetector.scala. With reduceSensitivity
    the fences widen to the 1st and 99th percentiles; with the LEGACY estimator those are the
    minimum and maximum below 99 values, so short series lose nothing.
    """
    if values.size == 0:
        return values
    q1, q3 = _percentile_legacy(values, 25.0), _percentile_legacy(values, 75.0)
    iqr = q3 - q1
    lower = min(_percentile_legacy(values, 1.0), q1 - factor * iqr)
    upper = max(_percentile_legacy(values, 99.0), q3 + factor * iqr)
    kept: FloatArray = values[(values >= lower) & (values <= upper)]
    return kept


def _wilcoxon_z_exact(x: FloatArray, y: FloatArray, mu: float) -> float:
    """R's asymptotic statistic (ties and continuity corrected) at one shift mu, ties included."""
    nx, ny = float(x.size), float(y.size)
    ranks = rankdata(np.concatenate([x - mu, y]))
    dz = float(ranks[: x.size].sum()) - nx * (nx + 1) / 2 - nx * ny / 2
    _, ties = np.unique(ranks, return_counts=True)
    sigma = math.sqrt(
        (nx * ny / 12)
        * ((nx + ny + 1) - float((ties**3 - ties).sum()) / ((nx + ny) * (nx + ny - 1)))
    )
    if sigma == 0:
        raise ArithmeticError("cannot compute confidence interval when all observations are tied")
    return (dz - math.copysign(0.5, dz) * (dz != 0)) / sigma


def _mann_whitney_interval(
    x: FloatArray, y: FloatArray, confidence: float
) -> tuple[float, float, float]:
    """Kayenta's MannWhitney.calculateConfidenceInterval: (lower, upper, estimate) of x - y.

    Kayenta (after R's wilcox.test, asymptotic, correct=TRUE) finds with Brent's method the
    shifts mu where the standardized rank statistic of (x - mu, y) equals -/+ z and 0. That
    statistic is a non-increasing step function of mu that jumps only at the pairwise
    differences x_i - y_j, so its roots are found exactly from those differences here.
    """
    diffs = np.sort(np.subtract.outer(x, y).ravel())
    unique = np.unique(diffs)
    nx, ny = float(x.size), float(y.size)
    # Between two differences no x - mu ties a y: only within-arm ties enter sigma.
    _, tx = np.unique(x, return_counts=True)
    _, ty = np.unique(y, return_counts=True)
    tie_sum = float((tx**3 - tx).sum() + (ty**3 - ty).sum())
    sigma = math.sqrt((nx * ny / 12) * ((nx + ny + 1) - tie_sum / ((nx + ny) * (nx + ny - 1))))
    if sigma == 0:
        raise ArithmeticError("cannot compute confidence interval when all observations are tied")
    above = diffs.size - np.searchsorted(diffs, unique, side="right")  # U just right of u_k
    dz = above - nx * ny / 2
    g_open = (dz - np.sign(dz) * 0.5) / sigma  # value on (u_k, u_k+1)
    g_low = _wilcoxon_z_exact(x, y, float(unique[0]))
    g_high = _wilcoxon_z_exact(x, y, float(unique[-1]))

    def root(q: float, bracket_check: bool) -> float:
        if bracket_check:
            if g_low - q <= 0:
                return float(unique[0])
            if g_high - q >= 0:
                return float(unique[-1])
        # Sequence of values left to right: the open intervals between the differences.
        inner = g_open[:-1]
        below = np.nonzero(inner < q)[0]
        if below.size == 0:
            return float(unique[-1])
        k = int(below[0])
        if k > 0 and inner[k - 1] == q:  # flat at the root: Brent lands inside; take the middle
            return float((unique[k - 1] + unique[k]) / 2)
        return float(unique[k])

    z = float(norm.ppf(1 - (1 - confidence) / 2))
    return root(z, True), root(-z, True), root(0.0, False)


def mann_whitney_classify(
    canary: FloatArray, baseline: FloatArray, *, confidence: float, tolerance: float
) -> str:
    """MannWhitneyClassifier.classify with direction "increase": "High", "Pass", "Nodata" or "Error".

    Source: spinnaker/kayenta kayenta-judge .../classifiers/metric/MannWhitneyClassifier.scala
    and kayenta-mannwhitney .../MannWhitney.scala. High when the lower confidence bound of
    the Hodges-Lehmann shift exceeds tolerance * |estimate| and the mean ratio canary/baseline
    is >= 1 (the default effect size threshold).
    """
    if canary.size == 0 or baseline.size == 0:
        return "Nodata"
    if np.array_equal(np.sort(canary), np.sort(baseline)):
        return "Pass"
    if np.unique(np.concatenate([canary, baseline])).size == 1:
        return "Pass"
    x, y = canary, baseline
    if np.unique(x).size == 1 and np.unique(y).size == 1:
        # Kayenta adds Gaussian noise (scale 1e-5 x value) to a degenerate pair; seeded here.
        noise = np.random.default_rng(0)
        x = x + noise.normal(0.0, abs(float(x[0])) * 1e-5, x.size)
        y = y + noise.normal(0.0, abs(float(y[0])) * 1e-5, y.size)
    try:
        lower, _upper, estimate = _mann_whitney_interval(x, y, confidence)
    except ArithmeticError:
        return "Error"  # Kayenta catches the exception and classifies the metric as Error
    mean_baseline = float(np.mean(baseline))
    ratio = 1.0 if mean_baseline == 0.0 else float(np.mean(canary)) / mean_baseline
    if lower > tolerance * abs(estimate) and ratio >= 1.0:
        return "High"
    return "Pass"


def _per_step_values(
    stream: RunStream, step_s: int, steps: int
) -> dict[str, tuple[FloatArray, FloatArray]]:
    """Per-step error rate, mean latency and p99 latency for (canary, baseline)."""
    out: dict[str, list[FloatArray]] = {"error_rate": [], "latency_mean": [], "latency_p99": []}
    for arm in (stream.canary, stream.primary):
        span = steps * step_s
        req = arm.requests[:span].reshape(steps, step_s).sum(axis=1).astype(np.float64)
        err = arm.errors[:span].reshape(steps, step_s).sum(axis=1).astype(np.float64)
        lat = arm.latency_sum_s[:span].reshape(steps, step_s).sum(axis=1)
        buckets = arm.buckets[:span].reshape(steps, step_s, -1).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = err / req
            mean = lat / req
        p99 = np.array([histogram_quantile(0.99, b) for b in buckets])
        # NaN strategy "none" (the default): NaNs are replaced by 0 (Transforms.replaceNaNs).
        out["error_rate"].append(np.nan_to_num(rate, nan=0.0))
        out["latency_mean"].append(np.nan_to_num(mean, nan=0.0))
        out["latency_p99"].append(np.nan_to_num(p99, nan=0.0))
    return {name: (pair[0], pair[1]) for name, pair in out.items()}


def kayenta_decide(stream: RunStream, config: KayentaConfig = KayentaConfig()) -> Outcome:
    """A Spinnaker canary stage judged by NetflixACAJudge over growing windows.

    Sources: spinnaker/kayenta NetflixACAJudge.scala (IQR outlier removal, Mann-Whitney at
    confLevel 0.98, tolerance 0.25, direction per metric), scorers/WeightedSumScorer.scala
    (score = 100 * Pass / (Pass + High + Low), Nodata and Error left out),
    classifiers/score/ThresholdScoreClassifier.scala, and https://spinnaker.io/guides/user/canary/
    (a run scoring below the marginal threshold fails the stage; the last run must reach the
    pass threshold). Every interval the judge re-runs over all intervals so far; the metrics
    are per-interval error rate, mean latency and p99 latency, direction "increase".
    """
    intervals = stream.seconds // config.interval_s
    per_interval = config.interval_s // config.step_s
    values = _per_step_values(stream, config.step_s, intervals * per_interval)
    last = min(intervals, config.lifetime_s // config.interval_s)
    for k in range(1, last + 1):
        labels = []
        n = k * per_interval
        for canary_values, baseline_values in values.values():
            labels.append(
                mann_whitney_classify(
                    _remove_outliers(canary_values[:n], config.iqr_factor),
                    _remove_outliers(baseline_values[:n], config.iqr_factor),
                    confidence=config.confidence,
                    tolerance=config.tolerance,
                )
            )
        scored = [label for label in labels if label in ("Pass", "High", "Low")]
        score = 100.0 * sum(label == "Pass" for label in scored) / len(scored) if scored else 0.0
        end = k * config.interval_s
        if scored and score < config.marginal_score:
            return _outcome(stream, "fail", end)
        if k == last and last * config.interval_s >= config.lifetime_s:
            return _outcome(stream, "pass" if score >= config.pass_score else "fail", end)
    return _outcome(stream, "none", stream.seconds)


# --------------------------------------------------------------------------------------
# Wald's SPRT: the limit


@dataclass(frozen=True)
class SprtLimit:
    """Average sample number of Wald's SPRT under the alternative, in the test's own units."""

    name: str
    unit: str  # what one sample is: "canary request" or "error event"
    asn_wald: float  # Wald's approximation (no overshoot)
    asn_simulated: float  # mean over simulated runs
    median_simulated: float
    power_simulated: float  # share of simulated runs ending in rejection of H0
    canary_requests_per_sample: float
    seconds_per_sample: float

    def in_canary_requests(self, asn: float) -> float:
        return asn * self.canary_requests_per_sample

    def in_seconds(self, asn: float) -> float:
        return asn * self.seconds_per_sample


def _wald_asn(q0: float, q1: float, alpha: float, beta: float) -> float:
    """Wald's ASN under H1 for Bernoulli(q0) vs Bernoulli(q1): E[LLR at stop] / KL(q1||q0)."""
    log_a = math.log((1 - beta) / alpha)
    log_b = math.log(beta / (1 - alpha))
    kl = q1 * math.log(q1 / q0) + (1 - q1) * math.log((1 - q1) / (1 - q0))
    return ((1 - beta) * log_a + beta * log_b) / kl


def _simulate_bernoulli_sprt(
    q0: float, q1: float, alpha: float, beta: float, *, runs: int, seed: int
) -> tuple[FloatArray, FloatArray]:
    """Stopping sample counts and rejections of H0 for `runs` SPRTs on Bernoulli(q1) data."""
    rng = np.random.default_rng(seed)
    log_a = math.log((1 - beta) / alpha)
    log_b = math.log(beta / (1 - alpha))
    up, down = math.log(q1 / q0), math.log((1 - q1) / (1 - q0))
    llr = np.zeros(runs)
    stop = np.full(runs, -1.0)
    reject = np.zeros(runs, dtype=bool)
    done = 0
    block = 512
    active = np.arange(runs)
    while active.size:
        events = rng.random((active.size, block)) < q1
        path = llr[active, None] + np.cumsum(np.where(events, up, down), axis=1)
        crossed = (path >= log_a) | (path <= log_b)
        any_cross = crossed.any(axis=1)
        first = np.argmax(crossed, axis=1)
        hit = active[any_cross]
        stop[hit] = done + first[any_cross] + 1
        reject[hit] = path[any_cross, first[any_cross]] >= log_a
        llr[active] = path[:, -1]
        active = active[~any_cross]
        done += block
    return stop, reject.astype(np.float64)


def sprt_one_sample(
    *,
    p0: float,
    p1: float,
    alpha: float,
    beta: float,
    canary_rps: float,
    runs: int = 20000,
    seed: int = 20221,
) -> SprtLimit:
    """Baseline rate known: SPRT on the canary's own Bernoulli errors, p0 vs p1."""
    stop, reject = _simulate_bernoulli_sprt(p0, p1, alpha, beta, runs=runs, seed=seed)
    return SprtLimit(
        name=f"SPRT, baseline known (p0={p0:g} vs p1={p1:g})",
        unit="canary request",
        asn_wald=_wald_asn(p0, p1, alpha, beta),
        asn_simulated=float(stop.mean()),
        median_simulated=float(np.median(stop)),
        power_simulated=float(reject.mean()),
        canary_requests_per_sample=1.0,
        seconds_per_sample=1.0 / canary_rps,
    )


def sprt_two_sample(
    *,
    p0: float,
    ratio: float,
    alpha: float,
    beta: float,
    canary_rps: float,
    primary_rps: float,
    runs: int = 20000,
    seed: int = 20222,
) -> SprtLimit:
    """Two-sample: condition on error events; each is the canary's with q0 or q1.

    With rho = canary requests / primary requests, an error event belongs to the canary with
    probability q0 = rho/(1+rho) when both arms fail alike, q1 = ratio*rho/(1+ratio*rho)
    when the canary fails `ratio` times as often. Under H1, error events arrive at
    canary_rps*ratio*p0 + primary_rps*p0 per second.
    """
    rho = canary_rps / primary_rps
    q0 = rho / (1 + rho)
    q1 = ratio * rho / (1 + ratio * rho)
    stop, reject = _simulate_bernoulli_sprt(q0, q1, alpha, beta, runs=runs, seed=seed)
    events_per_s = canary_rps * ratio * p0 + primary_rps * p0
    return SprtLimit(
        name=f"SPRT, two-sample on error events (q0={q0:.4f} vs q1={q1:.4f})",
        unit="error event",
        asn_wald=_wald_asn(q0, q1, alpha, beta),
        asn_simulated=float(stop.mean()),
        median_simulated=float(np.median(stop)),
        power_simulated=float(reject.mean()),
        canary_requests_per_sample=canary_rps / events_per_s,
        seconds_per_sample=1.0 / events_per_s,
    )
