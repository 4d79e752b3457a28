"""Latency from Prometheus histogram buckets, compared with the count machinery.

A histogram cannot give a quantile's value with a confidence bound (the value is somewhere
inside a bucket), but it counts exactly how many requests were slower than each bucket bound.
So each compared quantile q becomes a count metric: once the primary has enough requests, the
threshold is the smallest bucket bound, shared by both arms, where the primary's cumulative
fraction reaches q; from then on a request above the threshold is a "slow event", tested with
the conditional count test of counts.py (canary slow rate / primary slow rate). A median shift
moves many requests over the p50 threshold; a tail-only regression moves a few over the p99
threshold, where the primary has almost none, so the ratio is large and the test fast.

The threshold is frozen once chosen. Choosing it again from later data would let the data pick
the hypothesis and break the e-process' validity; and the requests that chose it are not tested
(the test's origin is the snapshot that froze it), since the choice biases the primary's slow
fraction low over exactly those requests.

Buckets. Bounds present in only one arm are ignored (the intersection is used, and the reasons
say so); a metric without a usable shared bound is "no data" and never passes. The total per arm
is the `+Inf` bucket when it is present (it counts the same requests as the other buckets, even
when the `requests` counter was scraped at another instant), else `requests`.
"""

from __future__ import annotations

import math

from analysis.counts import CountTest
from analysis.types import ArmCounts

__all__ = ["LatencyTest", "arm_total", "shared_bounds"]


def arm_total(arm: ArmCounts) -> float:
    """Requests the arm's histogram counted: the +Inf bucket, else the requests counter."""
    inf = arm.latency_buckets.get(math.inf)
    return arm.requests if inf is None else inf


def shared_bounds(primary: ArmCounts, canary: ArmCounts) -> list[float]:
    """Finite bucket bounds both arms report, ascending."""
    return sorted(
        b for b in primary.latency_buckets if math.isfinite(b) and b in canary.latency_buckets
    )


class LatencyTest:
    """One quantile's comparison: a frozen threshold and a CountTest of the slow events."""

    __slots__ = ("_min_primary", "count", "quantile", "threshold_s")

    def __init__(self, *, quantile: float, count: CountTest, min_tail: float) -> None:
        self.quantile = quantile
        self.count = count
        self.threshold_s: float | None = None
        # Enough primary requests that the quantile's bucket is a stable choice.
        self._min_primary = min_tail / (1.0 - quantile)

    def update(self, primary: ArmCounts, canary: ArmCounts) -> tuple[list[str], str | None]:
        """Feed one snapshot. Returns (notes, why there is no data yet or None)."""
        notes: list[str] = []
        if self.threshold_s is None:
            bounds = shared_bounds(primary, canary)
            if not bounds:
                return notes, "no latency bucket bound shared by both arms"
            total_p = arm_total(primary)
            if total_p < self._min_primary:
                return notes, (
                    f"waiting for {self._min_primary:.0f} primary requests to choose the "
                    f"p{self.quantile * 100:g} threshold (have {total_p:.0f})"
                )
            p_only = {b for b in primary.latency_buckets if math.isfinite(b)} - set(bounds)
            c_only = {b for b in canary.latency_buckets if math.isfinite(b)} - set(bounds)
            if p_only or c_only:
                notes.append(
                    f"bucket bounds differ between arms; using the {len(bounds)} shared ones "
                    f"(primary only: {sorted(p_only)[:5]}, canary only: {sorted(c_only)[:5]})"
                )
            threshold = None
            for b in bounds:
                if primary.latency_buckets[b] >= self.quantile * total_p:
                    threshold = b
                    break
            if threshold is None:
                return notes, (
                    f"no shared bucket bound reaches the primary's p{self.quantile * 100:g} "
                    f"(largest shared bound {bounds[-1]:g} s)"
                )
            self.threshold_s = threshold
            notes.append(
                f"p{self.quantile * 100:g} threshold frozen at {threshold:g} s "
                f"(primary's cumulative share {primary.latency_buckets[threshold] / total_p:.3f})"
            )
        thr = self.threshold_s
        below_p = primary.latency_buckets.get(thr)
        below_c = canary.latency_buckets.get(thr)
        if below_p is None or below_c is None:
            notes.append(f"bucket le={thr:g} missing from an arm: snapshot skipped for this metric")
            return notes, None
        n_p, n_c = arm_total(primary), arm_total(canary)
        slow_p = max(n_p - below_p, 0.0)
        slow_c = max(n_c - below_c, 0.0)
        notes.extend(self.count.update(n_c, slow_c, n_p, slow_p))
        return notes, None
