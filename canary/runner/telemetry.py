"""The controller's own Prometheus metrics (served on /metrics).

Every per-rollout metric has the labels `rollout` (the runner's name: `app` for a config file
or a two-cluster service, `shop/app` for a Deployment), `namespace` (the Deployment's
namespace; empty outside Kubernetes) and `name` (the target's name: `app`), so a dashboard
can select by namespace as with Flagger's `flagger_canary_*{name,namespace}`. The
per-metric analysis gauges add `metric` (`errors`, `latency_p50`, ...), with the numbers
behind each decision: the estimate (canary/primary ratio), the confidence sequence's bounds
and the two e-values with the thresholds they are compared with. `canary_info{version,mode}`
says which controller serves them. The README's "Metrics" table lists every name and label.

The per-rollout series are not prometheus_client children (a whole metric object each, with a
lock: ~46 KB per rollout of ~50 series, issue 13) but slots in one array of floats per
rollout, rendered by one registered Collector at scrape time (~0.9 KB per rollout; the text is
the same, counters with `_total` and `_created`; within a family the series come rollout by
rollout). `forget(name)` drops a rollout's series when the controller forgets it for good
(`benchmarks/telemetry_memory.py` measures both).
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable, Iterator
from importlib import metadata

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from analysis import Verdict
from canary.core.rollout import Phase, RolloutStatus
from canary.runtime import gc_collections, gc_seconds

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


class _Rollout:
    """One rollout's values: a flat array of floats, one slot per series (slots from the
    Telemetry's table, the same for every rollout), and a bit mask of the series that exist."""

    __slots__ = ("labels", "mask", "values")

    def __init__(self, rollout: str) -> None:
        self.labels = (rollout, *identity(rollout))
        self.mask = 0
        self.values = array("d")

    def fill(self, slot: int) -> None:
        """Grow the array to hold `slot`."""
        missing = slot + 1 - len(self.values)
        if missing > 0:
            self.values.frombytes(bytes(8 * missing))


class _Child:
    """What `.labels(rollout, ...)` returns: `.set(v)` for a gauge, `.inc(n)` for a counter.
    Made at each call and not kept: it holds no value of its own."""

    __slots__ = ("_record", "_slot")

    def __init__(self, record: _Rollout, slot: int) -> None:
        self._record = record
        self._slot = slot

    def set(self, value: float) -> None:
        self._record.values[self._slot] = float(value)

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._record.values[self._slot] += amount

    def get(self) -> float:
        return self._record.values[self._slot]


class _PerRollout:
    """A metric family whose first labels are ROLLOUT_LABELS: `.labels(rollout, *others)`
    fills in the namespace and name from the rollout, so callers name the rollout only.

    It keeps no children (issue 13: a prometheus_client child is a whole metric object with a
    lock and a value object, ~850 bytes, and a rollout had 50 to 80 of them): each series is a slot in its rollout's
    array of floats, and the family is rendered from those at scrape time."""

    def __init__(
        self, store: _Store, name: str, documentation: str, kind: str, others: tuple[str, ...]
    ) -> None:
        self.store = store
        self.name = name
        self.documentation = documentation
        self.counter = kind == "counter"
        self.kind = "counter" if self.counter else "gauge"
        self.labelnames = (*ROLLOUT_LABELS, *others)
        # (slot, other label values) of every series this family has had, in first-use order
        self.slots: list[tuple[int, tuple[str, ...]]] = []

    def labels(self, rollout: str, *others: str) -> _Child:
        # The runner's hot path: two dict lookups and a small object, no lock, no validation
        # beyond the label count (prometheus_client's labels() was a third of a tick's CPU).
        slot = self.store.slot(self, others)
        return _Child(self.store.present(rollout, slot, self.counter), slot)

    def family(self, records: list[_Rollout], use_created: bool) -> Metric:
        if self.counter:
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for record in records:
                mask, values = record.mask, record.values
                for slot, others in self.slots:
                    if mask >> slot & 1:
                        created = values[slot + 1] if use_created else None
                        counter.add_metric((*record.labels, *others), values[slot], created)
            return counter
        gauge = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for record in records:
            mask, values = record.mask, record.values
            for slot, others in self.slots:
                if mask >> slot & 1:
                    gauge.add_metric((*record.labels, *others), values[slot])
        return gauge


def _escape(value: str) -> str:
    """A label value as the text format writes it (prometheus_client's escaping)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _help(documentation: str) -> str:
    return documentation.replace("\\", r"\\").replace("\n", r"\n")


class _Store:
    """Every rollout's values, and the slot table they share: a registered Collector that
    renders the per-rollout families from them at each scrape, in registration order. Slots
    are never freed: there is one per family and label values other than the rollout's
    (phases, decisions, error kinds, analysis metric names), a few dozen, not per rollout."""

    def __init__(self) -> None:
        self.families: list[_PerRollout] = []
        self.rollouts: dict[str, _Rollout] = {}
        self._slots: dict[tuple[str, tuple[str, ...]], int] = {}
        self._size = 0

    def add(self, name: str, documentation: str, kind: str, *others: str) -> _PerRollout:
        family = _PerRollout(self, name, documentation, kind, others)
        self.families.append(family)
        return family

    def slot(self, family: _PerRollout, others: tuple[str, ...]) -> int:
        key = (family.name, others)
        slot = self._slots.get(key)
        if slot is None:
            if len(others) != len(family.labelnames) - len(ROLLOUT_LABELS):
                raise ValueError(f"{family.name}: labels {family.labelnames}, got {others}")
            slot = self._slots[key] = self._size
            # A counter's slot + 1 holds its _created time, as prometheus_client's Counter has.
            self._size += 2 if family.counter else 1
            family.slots.append((slot, others))
        return slot

    def present(self, rollout: str, slot: int, counter: bool = False) -> _Rollout:
        """The rollout's record, with the series at `slot` existing (0 when it is new, as a
        prometheus_client child starts)."""
        record = self.rollouts.get(rollout)
        if record is None:
            record = self.rollouts[rollout] = _Rollout(rollout)
        if not record.mask >> slot & 1:
            record.fill(slot + 1 if counter else slot)
            record.mask |= 1 << slot
            if counter:
                record.values[slot + 1] = time.time()
        return record

    def record(self, rollout: str, mask: int) -> _Rollout:
        """The rollout's record, with the series in `mask` existing."""
        record = self.rollouts.get(rollout)
        if record is None:
            record = self.rollouts[rollout] = _Rollout(rollout)
        if record.mask & mask != mask:
            record.fill(mask.bit_length() - 1)
            record.mask |= mask
        return record

    def collect(self) -> Iterator[Metric]:
        records = list(self.rollouts.values())  # a scrape from another thread sees a snapshot
        use_created = getattr(prometheus_metrics, "_use_created", True)
        for family in self.families:
            yield family.family(records, use_created)

    def render(self) -> str:
        """The text generate_latest writes for collect()'s families, straight from the
        arrays: generate_latest built a Sample and a labels dict, then sorted and escaped
        them, for every series: ~0.6 s of a scrape at 2,000 rollouts (issue 13), while
        this holds the GIL the controller's rollouts need. tests/runner/test_telemetry.py
        checks the two texts are the same."""
        records = list(self.rollouts.values())  # a scrape from another thread sees a snapshot
        use_created = getattr(prometheus_metrics, "_use_created", True)
        escaped = [(record, [_escape(v) for v in record.labels]) for record in records]
        out: list[str] = []
        fmt: Callable[[float], str] = floatToGoString  # untyped in prometheus_client
        for family in self.families:
            names = family.labelnames
            order = sorted(range(len(names)), key=names.__getitem__)
            shown = family.name + "_total" if family.counter else family.name
            doc = _help(family.documentation)
            out.append(f"# HELP {shown} {doc}\n# TYPE {shown} {family.kind}\n")
            slots = [(slot, [_escape(v) for v in others]) for slot, others in family.slots]
            created: list[str] = []
            for record, values_text in escaped:
                mask, values = record.mask, record.values
                for slot, others in slots:
                    if not mask >> slot & 1:
                        continue
                    texts = values_text + others
                    labels = ",".join([f'{names[i]}="{texts[i]}"' for i in order])
                    out.append(f"{shown}{{{labels}}} {fmt(values[slot])}\n")
                    if family.counter and use_created:
                        created.append(
                            f"{family.name}_created{{{labels}}} {fmt(values[slot + 1])}\n"
                        )
            if created:
                name = family.name + "_created"
                out.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
                out.extend(created)
        return "".join(out)

    def describe(self) -> Iterator[Metric]:
        # The names, for the registry's duplicate check (empty families, not a scrape).
        for family in self.families:
            kind = CounterMetricFamily if family.counter else GaugeMetricFamily
            yield kind(family.name, family.documentation, labels=family.labelnames)


def _number(value: float | None, *, missing: float = math.nan) -> float:
    return missing if value is None else float(value)


class _GcCollector(Collector):
    """Python's garbage collections, timed (canary.runtime; zero until it watches them)."""

    def collect(self) -> Iterator[Metric]:
        seconds = CounterMetricFamily(
            "canary_gc_seconds",
            "Time spent in Python's cyclic garbage collections, by generation",
            labels=["generation"],
        )
        collections = CounterMetricFamily(
            "canary_gc_collections",
            "Python's cyclic garbage collections, by generation",
            labels=["generation"],
        )
        for generation, (took, count) in enumerate(
            zip(gc_seconds(), gc_collections(), strict=True)
        ):
            seconds.add_metric([str(generation)], took)
            collections.add_metric([str(generation)], count)
        yield seconds
        yield collections


class _Registry(CollectorRegistry):
    """A CollectorRegistry that keeps its collectors' order, for Telemetry.exposition."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self.order.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self.order.remove(collector)


class Telemetry:
    """The controller's own Prometheus metrics, on a dedicated registry for /metrics.
    `mode`: static, kubernetes or clusters (the `canary_info` metric)."""

    def __init__(self, mode: str = "static") -> None:
        self.registry = _Registry()
        self.info = Gauge(
            "canary_info",
            "Always 1: the controller's version and mode (static, kubernetes, clusters)",
            ["version", "mode"],
            registry=self.registry,
        )
        self.info.labels(_version(), mode).set(1.0)
        # The per-rollout families: one Collector over plain arrays (issue 13), registered
        # here so that /metrics lists the families in the same order as before.
        store = self._store = _Store()
        self.phase = store.add(
            "canary_rollout_phase",
            "1 for the phase each rollout is in, 0 for the others",
            "gauge",
            "phase",
        )
        self.weight = store.add(
            "canary_rollout_weight_percent",
            "Canary traffic share wanted, in percent",
            "gauge",
        )
        self.weight_read = store.add(
            "canary_rollout_weight_read_percent",
            "Canary traffic share last read back from the router, in percent",
            "gauge",
        )
        self.step = store.add(
            "canary_rollout_step",
            "Index of the current step (0 is the first)",
            "gauge",
        )
        self.decisions = store.add(
            "canary_analysis_decisions",
            "Analysis verdicts by decision (no_data when there were no metrics)",
            "counter",
            "decision",
        )
        self.errors = store.add(
            "canary_errors",
            "Errors at the edges, by kind (router, metrics, analysis, promote, scale, record, "
            "status)",
            "counter",
            "kind",
        )
        self.metric_estimate = store.add(
            "canary_analysis_metric_estimate",
            "The metric's estimate at the last look: canary/primary ratio (1 is equal); "
            "NaN before there is data",
            "gauge",
            "metric",
        )
        self.metric_lower = store.add(
            "canary_analysis_metric_lower_bound",
            "Lower bound of the anytime-valid confidence sequence of the ratio (a fail "
            "needs it above the fail ratio); NaN before there is data",
            "gauge",
            "metric",
        )
        self.metric_upper = store.add(
            "canary_analysis_metric_upper_bound",
            "Upper bound of the ratio's confidence sequence (a pass needs it below 1 + "
            "tolerance); +Inf while unbounded, NaN before there is data",
            "gauge",
            "metric",
        )
        self.metric_e_fail = store.add(
            "canary_analysis_metric_e_value_fail",
            "Evidence that the canary is worse (the metric fails at 1/alpha)",
            "gauge",
            "metric",
        )
        self.metric_e_pass = store.add(
            "canary_analysis_metric_e_value_pass",
            "Evidence that the canary is within tolerance (passes at 1/pass_alpha)",
            "gauge",
            "metric",
        )
        self.metric_fail_threshold = store.add(
            "canary_analysis_metric_e_value_fail_threshold",
            "1/alpha: the e-value at which the metric fails",
            "gauge",
            "metric",
        )
        self.metric_pass_threshold = store.add(
            "canary_analysis_metric_e_value_pass_threshold",
            "1/pass_alpha: the e-value at which the metric passes",
            "gauge",
            "metric",
        )
        self.metric_decision = store.add(
            "canary_analysis_metric_decision",
            "1 for the metric's decision at the last look (pass, fail, continue), 0 for the others",
            "gauge",
            "metric",
            "decision",
        )
        self.registry.register(store)
        # Slots known up front, so show() needs no lookup: each phase's, weight's, step's.
        self._phase_slots = [(phase, store.slot(self.phase, (phase.value,))) for phase in Phase]
        self._weight_slot = store.slot(self.weight, ())
        self._step_slot = store.slot(self.step, ())
        self._show_mask = sum(1 << s for _, s in self._phase_slots)
        self._show_mask |= 1 << self._weight_slot | 1 << self._step_slot
        store.slot(self.weight_read, ())  # its family's only slot, next to the others
        # Each analysis metric's slots, by metric name: estimate, lower, upper, e_fail, e_pass,
        # fail threshold, pass threshold, then its decision's pass, fail, continue.
        self._metric_slots: dict[str, tuple[int, ...]] = {}
        self._metric_masks: dict[str, int] = {}
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

        def seconds(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, documentation, buckets=buckets, registry=self.registry)

        quick = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))
        # Not per rollout: at a thousand rollouts per-rollout buckets would dwarf the rest, and
        # what an operator asks is whether the controller keeps up, not which rollout lags.
        self.tick_lateness = seconds(
            "canary_tick_lateness_seconds",
            "How late each analysis tick started after its fixed-rate schedule",
            quick,
        )
        self.tick_seconds = seconds(
            "canary_tick_seconds",
            "Time one analysis tick took (metrics fetch, analysis, router, record)",
            quick,
        )
        # The shared Prometheus reads (canary.metrics.batched): whether a tick that ran long
        # waited for its counts, and whether that was Prometheus or the counting.
        self.metrics_query_seconds = seconds(
            "canary_metrics_query_seconds",
            "Time one query to Prometheus took, answered or not (a timeout counts)",
            quick[1:],
        )
        self.metrics_batch_seconds = seconds(
            "canary_metrics_batch_seconds",
            "Time one batch took to read and count every rollout's metrics",
            (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, float("inf")),
        )
        self.metrics_wait_seconds = seconds(
            "canary_metrics_wait_seconds",
            "How long a tick's metrics fetch waited for its counts (0: the last batch's)",
            quick,
        )
        self.registry.register(_GcCollector())

    def exposition(self) -> bytes:
        """/metrics: the text generate_latest(self.registry) gives, with the per-rollout
        families rendered from their arrays (_Store.render), several times faster."""
        parts = [
            self._store.render().encode("utf-8")
            if collector is self._store
            else generate_latest(collector)
            for collector in list(self.registry.order)
        ]
        return b"".join(parts)

    # canary.metrics.base.MetricsTimings: the batcher reports through these
    def metrics_query(self, seconds: float) -> None:
        self.metrics_query_seconds.observe(seconds)

    def metrics_batch(self, seconds: float) -> None:
        self.metrics_batch_seconds.observe(seconds)

    def metrics_wait(self, seconds: float) -> None:
        self.metrics_wait_seconds.observe(seconds)

    def show(self, name: str, status: RolloutStatus) -> None:
        values = self._store.record(name, self._show_mask).values
        phase = status.phase
        for each, slot in self._phase_slots:
            values[slot] = 1.0 if phase is each else 0.0
        values[self._weight_slot] = status.weight
        values[self._step_slot] = status.step

    def analysis(self, name: str, verdict: Verdict | None) -> None:
        """Each metric's numbers from the last verdict (nothing when there was none)."""
        if verdict is None:
            return
        for metric, result in verdict.metrics.items():
            slots = self._metric_slots.get(metric) or self._slots_of(metric)
            estimate, lower, upper, e_fail, e_pass, fail_at, pass_at, passed, failed, going = slots
            mask = self._metric_masks[metric]
            if result.alpha > 0:
                mask |= 1 << fail_at
            if result.pass_alpha > 0:
                mask |= 1 << pass_at
            values = self._store.record(name, mask).values
            values[estimate] = _number(result.estimate)
            values[lower] = _number(result.lower)
            unbounded = math.inf if result.upper is None and result.estimate is not None else None
            values[upper] = _number(result.upper, missing=unbounded or math.nan)
            values[e_fail] = result.e_value_fail
            values[e_pass] = result.e_value_pass
            if result.alpha > 0:
                values[fail_at] = 1.0 / result.alpha
            if result.pass_alpha > 0:
                values[pass_at] = 1.0 / result.pass_alpha
            decision = result.decision.value
            values[passed] = 1.0 if decision == "pass" else 0.0
            values[failed] = 1.0 if decision == "fail" else 0.0
            values[going] = 1.0 if decision == "continue" else 0.0

    def _slots_of(self, metric: str) -> tuple[int, ...]:
        slot = self._store.slot
        singles = (
            self.metric_estimate,
            self.metric_lower,
            self.metric_upper,
            self.metric_e_fail,
            self.metric_e_pass,
            self.metric_fail_threshold,
            self.metric_pass_threshold,
        )
        slots = (
            *(slot(family, (metric,)) for family in singles),
            *(slot(self.metric_decision, (metric, d)) for d in ("pass", "fail", "continue")),
        )
        self._metric_slots[metric] = slots
        # Every series but the thresholds, which exist only for a positive alpha.
        self._metric_masks[metric] = sum(1 << s for i, s in enumerate(slots) if i not in (5, 6))
        return slots

    def forget(self, name: str) -> None:
        """Remove every series of the rollout `name`: the controller forgot it for good (its
        Deployment or its annotation is gone, or another replica took it over). A finished
        rollout that still exists keeps its series: dashboards show its last outcome."""
        self._store.rollouts.pop(name, None)

    def rollouts(self) -> int:
        """How many rollouts have series now."""
        return len(self._store.rollouts)
