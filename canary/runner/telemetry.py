"""The controller's own Prometheus metrics (served on /metrics).

Every per-rollout metric has the labels `rollout` (the runner's name: `app` for a config file
or a two-cluster service, `shop/app` for a Deployment), `namespace` (the Deployment's
namespace; empty outside Kubernetes) and `name` (the target's name: `app`), so a dashboard
can select by namespace as with Flagger's `flagger_canary_*{name,namespace}`. The
per-metric analysis gauges add `metric` (`errors`, `latency_p50`, ...), with the numbers
behind each decision: the estimate (canary/primary ratio), the confidence sequence's bounds
and the two e-values with the thresholds they are compared with. `canary_info{version,mode}`
says which controller serves them. The README's "Metrics" table lists every name and label.
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from analysis import Verdict
from canary.core.rollout import Phase, RolloutStatus

__all__ = ["ROLLOUT_LABELS", "Telemetry"]

ROLLOUT_LABELS = ("rollout", "namespace", "name")


def _version() -> str:
    try:
        return metadata.version("canary")
    except metadata.PackageNotFoundError:
        return "unknown"


def identity(rollout: str) -> tuple[str, str]:
    """(namespace, name) of a rollout: `shop/app` -> ("shop", "app"), `app` -> ("", "app")."""
    namespace, _, name = rollout.rpartition("/")
    return namespace, name


class _PerRollout:
    """A metric whose first labels are ROLLOUT_LABELS: `.labels(rollout, *others)` fills in
    the namespace and name from the rollout, so callers name the rollout only."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        # The children, by labels: prometheus_client's labels() validates and locks on every
        # call, and with ~40 calls a tick it was a third of a tick's own CPU (issue 13).
        # Series are never removed, so a cached child stays the registered one.
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, rollout: str, *others: str) -> Any:
        key = (rollout, *others)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metric.labels(rollout, *identity(rollout), *others)
        return child


def _number(value: float | None, *, missing: float = math.nan) -> float:
    return missing if value is None else float(value)


class Telemetry:
    """The controller's own Prometheus metrics, on a dedicated registry for /metrics.
    `mode`: static, kubernetes or clusters (the `canary_info` metric)."""

    def __init__(self, mode: str = "static") -> None:
        self.registry = CollectorRegistry()
        labels = list(ROLLOUT_LABELS)
        self.info = Gauge(
            "canary_info",
            "Always 1: the controller's version and mode (static, kubernetes, clusters)",
            ["version", "mode"],
            registry=self.registry,
        )
        self.info.labels(_version(), mode).set(1.0)
        self.phase = _PerRollout(
            Gauge(
                "canary_rollout_phase",
                "1 for the phase each rollout is in, 0 for the others",
                [*labels, "phase"],
                registry=self.registry,
            )
        )
        self.weight = _PerRollout(
            Gauge(
                "canary_rollout_weight_percent",
                "Canary traffic share wanted, in percent",
                labels,
                registry=self.registry,
            )
        )
        self.weight_read = _PerRollout(
            Gauge(
                "canary_rollout_weight_read_percent",
                "Canary traffic share last read back from the router, in percent",
                labels,
                registry=self.registry,
            )
        )
        self.step = _PerRollout(
            Gauge(
                "canary_rollout_step",
                "Index of the current step (0 is the first)",
                labels,
                registry=self.registry,
            )
        )
        self.decisions = _PerRollout(
            Counter(
                "canary_analysis_decisions",
                "Analysis verdicts by decision (no_data when there were no metrics)",
                [*labels, "decision"],
                registry=self.registry,
            )
        )
        self.errors = _PerRollout(
            Counter(
                "canary_errors",
                "Errors at the edges, by kind (router, metrics, analysis, promote, scale, record, "
                "status)",
                [*labels, "kind"],
                registry=self.registry,
            )
        )
        per_metric = [*labels, "metric"]
        self.metric_estimate = _PerRollout(
            Gauge(
                "canary_analysis_metric_estimate",
                "The metric's estimate at the last look: canary/primary ratio (1 is equal); "
                "NaN before there is data",
                per_metric,
                registry=self.registry,
            )
        )
        self.metric_lower = _PerRollout(
            Gauge(
                "canary_analysis_metric_lower_bound",
                "Lower bound of the anytime-valid confidence sequence of the ratio (a fail "
                "needs it above the fail ratio); NaN before there is data",
                per_metric,
                registry=self.registry,
            )
        )
        self.metric_upper = _PerRollout(
            Gauge(
                "canary_analysis_metric_upper_bound",
                "Upper bound of the ratio's confidence sequence (a pass needs it below 1 + "
                "tolerance); +Inf while unbounded, NaN before there is data",
                per_metric,
                registry=self.registry,
            )
        )
        self.metric_e_fail = _PerRollout(
            Gauge(
                "canary_analysis_metric_e_value_fail",
                "Evidence that the canary is worse (the metric fails at 1/alpha)",
                per_metric,
                registry=self.registry,
            )
        )
        self.metric_e_pass = _PerRollout(
            Gauge(
                "canary_analysis_metric_e_value_pass",
                "Evidence that the canary is within tolerance (passes at 1/pass_alpha)",
                per_metric,
                registry=self.registry,
            )
        )
        self.metric_fail_threshold = _PerRollout(
            Gauge(
                "canary_analysis_metric_e_value_fail_threshold",
                "1/alpha: the e-value at which the metric fails",
                per_metric,
                registry=self.registry,
            )
        )
        self.metric_pass_threshold = _PerRollout(
            Gauge(
                "canary_analysis_metric_e_value_pass_threshold",
                "1/pass_alpha: the e-value at which the metric passes",
                per_metric,
                registry=self.registry,
            )
        )
        self.metric_decision = _PerRollout(
            Gauge(
                "canary_analysis_metric_decision",
                "1 for the metric's decision at the last look (pass, fail, continue), 0 for "
                "the others",
                [*per_metric, "decision"],
                registry=self.registry,
            )
        )
        self.leader = Gauge(
            "canary_leader",
            "1 while this controller may act (holds the Lease, or runs without leader "
            "election), 0 while it stands by",
            registry=self.registry,
        )
        self.leader.set(1.0)
        self.shard_held = Gauge(
            "canary_shard_held",
            "Kubernetes with --shards: 1 while this replica holds the shard's Lease",
            ["shard"],
            registry=self.registry,
        )
        self.failover_active = Gauge(
            "canary_failover_active",
            "Two clusters: 1 while the service's traffic is failed over to the standby",
            ["service"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "canary_rollout_duration_seconds",
            "Duration of finished rollouts by outcome",
            ["outcome"],
            buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")),
            registry=self.registry,
        )

        # Not per rollout: at a thousand rollouts per-rollout buckets would dwarf the rest, and
        # what an operator asks is whether the controller keeps up, not which rollout lags.
        self.tick_lateness = Histogram(
            "canary_tick_lateness_seconds",
            "How late each analysis tick started after its fixed-rate schedule",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")),
            registry=self.registry,
        )
        self.tick_seconds = Histogram(
            "canary_tick_seconds",
            "Time one analysis tick took (metrics fetch, analysis, router, record)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")),
            registry=self.registry,
        )

    def show(self, name: str, status: RolloutStatus) -> None:
        for phase in Phase:
            self.phase.labels(name, phase.value).set(1.0 if status.phase is phase else 0.0)
        self.weight.labels(name).set(status.weight)
        self.step.labels(name).set(status.step)

    def analysis(self, name: str, verdict: Verdict | None) -> None:
        """Each metric's numbers from the last verdict (nothing when there was none)."""
        if verdict is None:
            return
        for metric, result in verdict.metrics.items():
            self.metric_estimate.labels(name, metric).set(_number(result.estimate))
            self.metric_lower.labels(name, metric).set(_number(result.lower))
            upper = math.inf if result.upper is None and result.estimate is not None else None
            self.metric_upper.labels(name, metric).set(
                _number(result.upper, missing=upper or math.nan)
            )
            self.metric_e_fail.labels(name, metric).set(result.e_value_fail)
            self.metric_e_pass.labels(name, metric).set(result.e_value_pass)
            if result.alpha > 0:
                self.metric_fail_threshold.labels(name, metric).set(1.0 / result.alpha)
            if result.pass_alpha > 0:
                self.metric_pass_threshold.labels(name, metric).set(1.0 / result.pass_alpha)
            for decision in ("pass", "fail", "continue"):
                self.metric_decision.labels(name, metric, decision).set(
                    1.0 if result.decision.value == decision else 0.0
                )
