"""Per-second traffic of a primary and a canary arm, as Prometheus would count it.

Every decider in the benchmark must see exactly the same traffic, so a run's stream is
generated once from its own seed (scenario index, run index) and then handed to each of
them. Generation is vectorised: one Poisson draw per second and arm for arrivals, one
binomial draw for errors, and one log-normal latency per request binned with
`np.searchsorted` into Prometheus' default histogram buckets.

What the streams model, and why:
- Poisson arrivals at a total rate split by the canary weight: the split that is actually
  observed wobbles around the configured weight, which a test must not mistake for a signal.
- Low traffic (0.4 canary requests/s): most seconds have no canary request at all.
- Bursts (rate x5 for a while): counts jump for both arms; a test that compares the arms over
  the same window must not care.
- Incidents that hit both arms at once (errors x10, latency up, for a minute): the classic
  source of false rollbacks for deciders that look at the canary alone.
- The split drawn per second (`split="binomial"`): Poisson arrivals at the total rate, then
  each second's canary requests ~ Binomial(arrivals, weight), as a router that flips a coin
  per request does it. By Poisson thinning this has the same law as two independent Poisson
  arms; it is simulated literally all the same, since that is how an outside check (issue 12)
  drew it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
    "BUCKET_BOUNDS",
    "ArmProfile",
    "ArmStream",
    "RunStream",
    "Scenario",
    "histogram_quantile",
    "simulate",
]

# Prometheus client libraries' default buckets (seconds); the last one is +Inf.
BUCKET_BOUNDS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    float("inf"),
)
_FINITE_BOUNDS = np.array(BUCKET_BOUNDS[:-1])

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ArmProfile:
    """What one arm serves: its error rate and its latency distribution.

    Latency is log-normal with the given median and log-space sigma; a `slow_fraction` of
    requests is `slow_factor` times slower (a tail-only regression).
    """

    error_rate: float = 0.01
    latency_median_s: float = 0.05
    latency_sigma: float = 0.6
    slow_fraction: float = 0.0
    slow_factor: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")
        if self.latency_median_s <= 0 or self.latency_sigma < 0:
            raise ValueError("latency_median_s must be > 0 and latency_sigma >= 0")
        if not 0.0 <= self.slow_fraction <= 1.0 or self.slow_factor <= 0:
            raise ValueError("slow_fraction must be in [0, 1] and slow_factor > 0")


@dataclass(frozen=True)
class Scenario:
    """One benchmark situation: traffic shape, both arms, and whether the canary is worse."""

    name: str
    description: str
    total_rps: float
    canary_weight: float  # share of requests sent to the canary, 0..1
    primary: ArmProfile = field(default_factory=ArmProfile)
    canary: ArmProfile = field(default_factory=ArmProfile)
    regression: bool = False  # True: the canary is worse and should be rolled back
    duration_s: int = 900
    # Bursts: start as a Poisson process with this mean gap; 0 disables them.
    burst_every_s: float = 0.0
    burst_len_s: int = 45
    burst_factor: float = 5.0
    # Shared incident: both arms, one window starting at a random time.
    incident: bool = False
    incident_len_s: int = 60
    incident_error_factor: float = 10.0
    incident_latency_factor: float = 3.0
    # "poisson": independent Poisson arrivals per arm; "binomial": Poisson total, split per
    # second by a Binomial(arrivals, canary_weight) draw.
    split: str = "poisson"

    def __post_init__(self) -> None:
        if self.split not in ("poisson", "binomial"):
            raise ValueError(f"scenario {self.name}: split must be 'poisson' or 'binomial'")
        if self.total_rps <= 0:
            raise ValueError(f"scenario {self.name}: total_rps must be > 0")
        if not 0.0 < self.canary_weight < 1.0:
            raise ValueError(f"scenario {self.name}: canary_weight must be in (0, 1)")
        if self.duration_s < 60:
            raise ValueError(f"scenario {self.name}: duration_s must be >= 60")

    @property
    def canary_rps(self) -> float:
        return self.total_rps * self.canary_weight

    @property
    def primary_rps(self) -> float:
        return self.total_rps * (1.0 - self.canary_weight)


@dataclass(frozen=True)
class ArmStream:
    """Per-second increments of one arm (index t covers the second (t, t+1])."""

    requests: IntArray  # (T,)
    errors: IntArray  # (T,)
    buckets: IntArray  # (T, len(BUCKET_BOUNDS)): requests per bucket, not cumulative
    latency_sum_s: FloatArray  # (T,): what a histogram's _sum counter adds each second


@dataclass(frozen=True)
class RunStream:
    primary: ArmStream
    canary: ArmStream

    @property
    def seconds(self) -> int:
        return int(self.primary.requests.shape[0])


def _arm(
    rng: np.random.Generator,
    requests: IntArray,
    profile: ArmProfile,
    error_factor: FloatArray,
    latency_factor: FloatArray,
) -> ArmStream:
    seconds = requests.shape[0]
    p_error = np.minimum(1.0, profile.error_rate * error_factor)
    errors = rng.binomial(requests, p_error).astype(np.int64)
    total = int(requests.sum())
    second_of = np.repeat(np.arange(seconds), requests)
    latency = (
        profile.latency_median_s
        * latency_factor[second_of]
        * np.exp(profile.latency_sigma * rng.standard_normal(total))
    )
    if profile.slow_fraction > 0:
        slow = rng.random(total) < profile.slow_fraction
        latency = np.where(slow, latency * profile.slow_factor, latency)
    # `le` semantics: a request counts in the first bucket whose bound is >= its latency.
    bucket_of = np.searchsorted(_FINITE_BOUNDS, latency, side="left")
    nb = len(BUCKET_BOUNDS)
    buckets = np.bincount(second_of * nb + bucket_of, minlength=seconds * nb).reshape(seconds, nb)
    latency_sum = np.bincount(second_of, weights=latency, minlength=seconds).astype(np.float64)
    return ArmStream(requests, errors, buckets.astype(np.int64), latency_sum)


def simulate(scenario: Scenario, rng: np.random.Generator) -> RunStream:
    """One run's traffic for both arms; deterministic for a given generator state."""
    seconds = scenario.duration_s
    multiplier = np.ones(seconds)
    if scenario.burst_every_s > 0:
        starts = (rng.random(seconds) < 1.0 / scenario.burst_every_s).astype(np.float64)
        active = np.convolve(starts, np.ones(scenario.burst_len_s))[:seconds] > 0
        multiplier[active] = scenario.burst_factor
    error_factor = np.ones(seconds)
    latency_factor = np.ones(seconds)
    if scenario.incident:
        # Anywhere after the first minute, ending before the last one.
        start = int(rng.integers(60, max(61, seconds - scenario.incident_len_s - 60)))
        window = slice(start, start + scenario.incident_len_s)
        error_factor[window] = scenario.incident_error_factor
        latency_factor[window] = scenario.incident_latency_factor
    rate = scenario.total_rps * multiplier
    w = scenario.canary_weight
    if scenario.split == "binomial":
        arrivals = rng.poisson(rate).astype(np.int64)
        n_canary = rng.binomial(arrivals, w).astype(np.int64)
        n_primary = arrivals - n_canary
        primary = _arm(rng, n_primary, scenario.primary, error_factor, latency_factor)
        canary = _arm(rng, n_canary, scenario.canary, error_factor, latency_factor)
    else:
        # Drawn in this order (primary arrivals, primary, canary arrivals, canary) so that the
        # streams of the Poisson scenarios are those of earlier benchmark runs.
        primary = _arm(
            rng,
            rng.poisson(rate * (1.0 - w)).astype(np.int64),
            scenario.primary,
            error_factor,
            latency_factor,
        )
        canary = _arm(
            rng,
            rng.poisson(rate * w).astype(np.int64),
            scenario.canary,
            error_factor,
            latency_factor,
        )
    return RunStream(primary=primary, canary=canary)


def histogram_quantile(q: float, bucket_counts: npt.ArrayLike) -> float:
    """Prometheus' histogram_quantile over non-cumulative counts in BUCKET_BOUNDS order.

    Linear interpolation inside the bucket holding the rank; a rank in +Inf returns the
    highest finite bound; NaN when there are no observations (as Prometheus returns).
    """
    counts = np.asarray(bucket_counts, dtype=np.float64)
    cumulative = np.cumsum(counts)
    total = float(cumulative[-1])
    if total <= 0:
        return float("nan")
    rank = q * total
    index = int(np.searchsorted(cumulative, rank, side="left"))
    if index >= len(BUCKET_BOUNDS) - 1:
        return float(BUCKET_BOUNDS[-2])
    upper = BUCKET_BOUNDS[index]
    lower = 0.0 if index == 0 else BUCKET_BOUNDS[index - 1]
    below = 0.0 if index == 0 else float(cumulative[index - 1])
    in_bucket = float(counts[index])
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket
