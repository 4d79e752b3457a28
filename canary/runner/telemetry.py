"""The controller's own Prometheus metrics (served on /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from canary.core.rollout import Phase, RolloutStatus

__all__ = ["Telemetry"]


class Telemetry:
    """The controller's own Prometheus metrics, on a dedicated registry for /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phase = Gauge(
            "canary_rollout_phase",
            "1 for the phase each rollout is in, 0 for the others",
            ["rollout", "phase"],
            registry=self.registry,
        )
        self.weight = Gauge(
            "canary_rollout_weight_percent",
            "Canary traffic share wanted, in percent",
            ["rollout"],
            registry=self.registry,
        )
        self.weight_read = Gauge(
            "canary_rollout_weight_read_percent",
            "Canary traffic share last read back from the router, in percent",
            ["rollout"],
            registry=self.registry,
        )
        self.step = Gauge(
            "canary_rollout_step", "Index of the current step", ["rollout"], registry=self.registry
        )
        self.decisions = Counter(
            "canary_analysis_decisions",
            "Analysis verdicts by decision (no_data when there were no metrics)",
            ["rollout", "decision"],
            registry=self.registry,
        )
        self.errors = Counter(
            "canary_errors",
            "Errors at the edges, by kind (router, metrics, analysis, promote, scale, record)",
            ["rollout", "kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "canary_rollout_duration_seconds",
            "Duration of finished rollouts by outcome",
            ["outcome"],
            buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")),
            registry=self.registry,
        )

    def show(self, name: str, status: RolloutStatus) -> None:
        for phase in Phase:
            self.phase.labels(name, phase.value).set(1.0 if status.phase is phase else 0.0)
        self.weight.labels(name).set(status.weight)
        self.step.labels(name).set(status.step)
