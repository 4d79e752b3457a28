"""Per-second traffic of both arms for the analysis tests: small, seeded, vectorised.

Poisson arrivals, binomial errors, log-normal latencies binned into Prometheus' default
buckets (multinomial per second). Kept apart from benchmarks/ so the tests do not depend on
another component's internals.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from analysis import Analyzer, ArmCounts, Snapshot, Verdict

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Arm:
    rps: float
    error_rate: float = 0.01
    median_s: float = 0.05
    sigma: float = 0.6
    slow_fraction: float = 0.0
    slow_factor: float = 8.0

    def bucket_probs(self) -> np.ndarray:
        """Probability of each bucket (the last is > 10 s)."""
        edges = np.log(np.array(BOUNDS))

        def cdf(median: float) -> np.ndarray:
            return np.asarray(norm.cdf((edges - math.log(median)) / self.sigma))

        c = (1 - self.slow_fraction) * cdf(self.median_s) + self.slow_fraction * cdf(
            self.median_s * self.slow_factor
        )
        return np.diff(np.concatenate([[0.0], c, [1.0]]))


def stream(
    primary: Arm,
    canary: Arm,
    seconds: int,
    seed: int,
    *,
    rate_factor: np.ndarray | None = None,
    error_factor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative per-second counts, shape (seconds, 2 + len(BOUNDS) + 1) per arm:
    requests, errors, cumulative bucket counts (le = BOUNDS..., +Inf)."""
    rng = np.random.default_rng(seed)
    out = []
    for arm in (primary, canary):
        rate = np.full(seconds, arm.rps) * (1 if rate_factor is None else rate_factor)
        n = rng.poisson(rate)
        err = np.minimum(arm.error_rate * (1 if error_factor is None else error_factor), 1.0)
        e = rng.binomial(n, err)
        b = rng.multinomial(n, arm.bucket_probs())
        per_s = np.column_stack([n, e, np.cumsum(b, axis=1)])
        out.append(np.cumsum(per_s, axis=0).astype(float))
    return out[0], out[1]


def split_stream(
    *, total_rps: float, weight: float, primary: Arm, canary: Arm, seconds: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """As stream(), but the split is drawn per second: Poisson(total_rps) arrivals, of which
    Binomial(arrivals, weight) go to the canary (the arms' `rps` are ignored)."""
    rng = np.random.default_rng(seed)
    total = rng.poisson(total_rps, seconds)
    n_c = rng.binomial(total, weight)
    out = []
    for arm, n in ((primary, total - n_c), (canary, n_c)):
        e = rng.binomial(n, arm.error_rate)
        b = rng.multinomial(n, arm.bucket_probs())
        per_s = np.column_stack([n, e, np.cumsum(b, axis=1)])
        out.append(np.cumsum(per_s, axis=0).astype(float))
    return out[0], out[1]


def arm_counts(row: np.ndarray, *, buckets: bool = True) -> ArmCounts:
    lat = {}
    if buckets:
        lat = {le: float(v) for le, v in zip((*BOUNDS, math.inf), row[2:], strict=True)}
    return ArmCounts(requests=float(row[0]), errors=float(row[1]), latency_buckets=lat)


def snapshots(
    p: np.ndarray, c: np.ndarray, *, every: int = 1, buckets: bool = True
) -> Iterator[Snapshot]:
    for t in range(every, p.shape[0] + 1, every):
        yield Snapshot(
            elapsed_s=float(t),
            primary=arm_counts(p[t - 1], buckets=buckets),
            canary=arm_counts(c[t - 1], buckets=buckets),
        )


def run_until(analyzer: Analyzer, snaps: Iterator[Snapshot]) -> tuple[str, float, Verdict]:
    """Observe until a decision; returns (decision, elapsed_s, last verdict)."""
    verdict: Verdict | None = None
    t = 0.0
    for snap in snaps:
        verdict = analyzer.observe(snap)
        t = snap.elapsed_s
        if verdict.decision != "continue":
            return str(verdict.decision.value), t, verdict
    assert verdict is not None, "no snapshots"
    return "continue", t, verdict
