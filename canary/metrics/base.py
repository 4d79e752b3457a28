"""The metric-source seam: both arms' cumulative counts, or why there are none.

As in Flagger's metric providers, an unreachable server, an empty result or NaN is not an
exception: it is `NoData` with a reason, and the pure rollout machine decides what to do with
it (hold, then roll back at a deadline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from analysis import ArmCounts

__all__ = [
    "ArmsCounts",
    "MetricSource",
    "MetricsProvider",
    "MetricsResult",
    "MetricsTimings",
    "NoData",
]


@dataclass(frozen=True, slots=True)
class ArmsCounts:
    """Both arms' cumulative counts since `since` (unix seconds)."""

    primary: ArmCounts
    canary: ArmCounts


@dataclass(frozen=True, slots=True)
class NoData:
    """Why there are no numbers this time: "prometheus unreachable: ...", "empty result: ..."."""

    reason: str


MetricsResult = ArmsCounts | NoData


@runtime_checkable
class MetricsProvider(Protocol):
    async def fetch(self, *, since: float, now: float) -> MetricsResult:
        """Counts of each arm over [since, now], cumulative from `since`. Never raises for
        an unreachable backend or a missing series: returns NoData instead."""


@runtime_checkable
class CarriedCounts(Protocol):
    """A MetricsProvider whose counting state can be saved with the rollout's record and
    carried on by the next replica (canary.metrics.batched.BatchedMetrics): a moved rollout
    then need not read its series back to its analysis' start."""

    def carry(self) -> str | None:
        """The state as text, or None when there is none to save now."""

    def carry_on(self, state: str, *, since: float, now: float) -> str | None:
        """Count on from `state`: None when taken, else why not (a fetch then reads back)."""


class MetricsTimings(Protocol):
    """Where a shared metric source reports how long its reads take (the controller's
    Telemetry: /metrics). Called on the event loop; each call must be cheap."""

    def metrics_query(self, seconds: float) -> None:
        """One HTTP query to the metrics backend, answered or not (a timeout counts)."""

    def metrics_batch(self, seconds: float) -> None:
        """One batch: every rollout's counts read and counted."""

    def metrics_wait(self, seconds: float) -> None:
        """How long one rollout's fetch waited for its counts (0: the last batch's served)."""


# The architecture's name for the seam; MetricsProvider is the name the code grew up with.
MetricSource = MetricsProvider
