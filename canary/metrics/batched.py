"""Batched Prometheus reads: one query per metric family per batch, for every rollout.

Issue 13, point 1.
Why: with one `PrometheusMetrics` per rollout, every tick of every rollout re-reads the whole
history since its analysis began (six range queries), so the cost grows with the number of
rollouts *and* with their age, and a thousand rollouts open a thousand connections. Here one
`PrometheusBatcher` per Prometheus URL serves every rollout through one HTTP session:

- **Families.** Each rollout's selectors (canary.metrics.prometheus.PromQueries, rendered per
  arm) are parsed into a metric name, its equality matchers (`namespace="shop"`,
  `service="web-canary"`: what tells rollouts and arms apart) and its other matchers
  (`code=~"5.."`). Selectors with the same name, the same other matchers and the same
  equality label *names* form a family. A batch sends one query per family,
  `{__name__=~"name|name_created", code=~"5..", namespace=~"a|b", service=~"x|y|z"}[Ws]`, and
  splits the series it gets back by the equality labels' values. A selector this module cannot
  parse is a family of its own, queried as written (so Prometheus' error reaches its rollout
  alone).
- **Incremental counts.** Per rollout and series, the controller keeps the counting state of
  `canary.metrics.prometheus._increase_since` (baseline, previous value, `_created` birth,
  running total) and applies each sample once, in order, by its timestamp: exact integer
  counts that only grow, per-series baselines, resets seen as drops and as `_created` changes,
  NaN as no data. Nothing is re-read: each batch reads only what is new since the family's
  last good read (plus `overlap_s` for scrapes committed late), whatever the rollout's age.
- **Why a short range, not an instant vector.** An instant read sees one value per batch; a
  counter that resets between two batches would lose what it counted between the last batch
  and the crash (a crash-looping canary hides its errors). Reading the samples since the last
  batch sees every scrape, exactly as the per-rollout provider does, at the cost of the samples
  scraped in one period: with scrape intervals at or above the batch period that is one sample
  per series, as an instant read would be.
- **Registration.** A rollout registers on its first fetch (or again when its `since`
  moves, e.g. a new analysis): one range read of its own series back to `since - lookback_s`
  gives its baselines and the counts so far, then it joins the batches. A resumed rollout
  thus counts everything since its analysis began, once.
- **Carried state.** A rollout that moves to another replica (or a restarted one) need not
  read back at all: `BatchedMetrics.carry` gives its counting state as text, which its
  record's head saves with each write, and `carry_on` takes it up on the next replica (same
  since, same selectors, read through at most `carry_max_age_s` before). Its first read then
  reads from that time, as any batch reads from its last: the same samples, applied once by
  the same rule, so it counts what the lost replica would have counted. That first read is a
  *catch-up* of the carried rollouts alone, group after group (each takes the oldest of those
  waiting when it starts, `rollouts_per_read` at most), not the next batch of all: a survivor
  that takes a thousand rollouts over has its own thousand in its batches, and a moved
  rollout waited for the batch in flight and then a whole one of two thousand before its
  first tick (issue 13).
- **Summary first reads.** A rollout resumed an hour into its analysis (a shard taken over,
  a restart) would read ~700 samples per series to learn what a handful of numbers say. So
  when its `since` is more than `summary_after_s` old, the first read asks Prometheus for
  each series' summary instead (_summary_query, one instant query per family): its last
  sample and that sample's time, its last sample at or before `since` and that one's time,
  its resets and its `_created` changes over the window, and whether any sample in it is
  not finite. A series that did not reset, was not reborn and has only finite samples
  counts exactly `last - baseline` (or `last` when born after `since`), which is what the
  sample-by-sample rule gives. If any series of the rollout is not such a series, or the
  summary cannot be read, the rollout takes the range read above: the summary never
  decides a count the range read would count differently.
- **Freshness.** A fetch is answered from the last batch if it read at most `period_s`
  before the fetch's `now`. Older than that, the fetch starts a batch (unless one is in
  flight) and, if its counts are still within `max_age_s` (two periods by default), returns
  them without waiting: a batch for a thousand rollouts takes seconds, and no rollout's tick
  should wait for it. Past `max_age_s` the fetch waits for the batch. So with every rollout
  ticking once per period there is about one batch per period, and a rollout's counts are at
  most `max_age_s` old.

HTTP is aiohttp, not prometheus-api-client (see pyproject.toml): one session and connection
pool, the query in a POST body (a union of 2,000 label values does not belong in a URL), no
redirects followed, a timeout per query, a bounded response size. URL credentials become basic
auth and never reach a reason or a log (canary.core.redact). JSON decoding and counting run in
the bounded `prometheus` pool (canary.executors), never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import gc
import json
import logging
import math
import re
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b as _blake2b
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from analysis import ArmCounts
from canary.core.inputs import InputError, pack_state, unpack_state
from canary.core.redact import redact_text, redact_url
from canary.executors import run_blocking
from canary.httpio import AnswerTooLarge, read_bounded
from canary.metrics.base import ArmsCounts, MetricsResult, MetricsTimings, NoData
from canary.metrics.prometheus import PromQueries

__all__ = ["BatchedMetrics", "PrometheusBatcher"]

log = logging.getLogger(__name__)

_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_METRIC = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{(.*)\}\s*$", re.DOTALL)
_MATCHER = re.compile(r"\s*(" + _LABEL + r')\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*(,|$)')
_PLAIN_VALUE = re.compile(r'"[^"\\]*"')  # equality values without escapes split exactly
_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


@dataclass(frozen=True, slots=True)
class _Family:
    """Selectors that one query serves: same name, same other matchers, same equality labels.

    `name` None: a selector this module could not parse, queried verbatim (`raw`)."""

    name: str | None
    raw: str  # the other matchers, joined; or the whole selector when name is None
    eq_labels: tuple[str, ...]
    created: bool

    @property
    def created_name(self) -> str | None:
        if self.name is None or not self.created:
            return None
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            if self.name.endswith(suffix):
                return self.name[: -len(suffix)] + "_created"
        return self.name + "_created"

    def _matchers(self, values: Iterable[tuple[str, ...]]) -> list[str]:
        columns: list[set[str]] = [set() for _ in self.eq_labels]
        for row in values:
            for column, value in zip(columns, row, strict=True):
                column.add(value)
        matchers = [self.raw] if self.raw else []
        for label, column in zip(self.eq_labels, columns, strict=True):
            if len(column) == 1:
                matchers.append(f"{label}={_quote(next(iter(column)))}")
            else:
                alternatives = "|".join(_re2_literal(v) for v in sorted(column))
                matchers.append(f"{label}=~{_quote(alternatives)}")
        return matchers

    def selector(self, values: Iterable[tuple[str, ...]], *, created: bool = False) -> str:
        """The instant selector of these values' counters (or of their `_created` series)."""
        name = self.created_name if created else self.name
        assert name is not None
        return f"{name}{{{','.join(self._matchers(values))}}}"

    def query(self, values: Iterable[tuple[str, ...]], window_s: int) -> str:
        """The range-vector query for these equality values (one tuple per member selector)."""
        if self.name is None:
            return f"{self.raw}[{window_s}s]"
        matchers = self._matchers(values)
        created = self.created_name
        if created is None:
            return f"{self.name}{{{','.join(matchers)}}}[{window_s}s]"
        both = f"__name__=~{_quote(_re2_literal(self.name) + '|' + _re2_literal(created))}"
        return "{" + ",".join([both, *matchers]) + f"}}[{window_s}s]"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _re2_literal(text: str) -> str:
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in text)


def _parse(selector: str, *, created: bool) -> tuple[_Family, tuple[str, ...]]:
    """A rendered selector -> its family and its equality values (in the family's label order)."""
    raw = _Family(None, selector.strip(), (), False)
    match = _METRIC.match(selector)
    if match is None:
        return raw, ()
    name, body = match.group(1), match.group(2)
    position, others, equal = 0, [], {}
    while position < len(body) and body[position:].strip():
        m = _MATCHER.match(body, position)
        if m is None:
            return raw, ()
        label, op, quoted, _ = m.groups()
        if op == "=" and _PLAIN_VALUE.fullmatch(quoted) and label not in equal:
            # interned: a rollout's selectors (and rollouts in one namespace) share them
            equal[sys.intern(label)] = sys.intern(quoted[1:-1])
        else:
            others.append(f"{label}{op}{quoted}")
        position = m.end()
    labels = tuple(sorted(equal))
    family = _Family(name, ",".join(sorted(others)), labels, created)
    return family, tuple(equal[label] for label in labels)


# --- per-series counting state ------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Selector:
    """A rendered selector and the counting state of each of its series, as _increase_since
    keeps it while it walks (baseline, previous value, `_created` birth, running total).

    The state is columns, one entry per series in the order they were first counted: ~90,000
    series at 1,000 rollouts, whose objects (a slotted track, four boxed floats, a key of
    their labels) were most of the batcher's memory (issue 13)."""

    text: str  # the rendered selector, as reasons show it
    family: _Family
    values: tuple[str, ...]
    buckets: bool = False  # latency buckets: a series without `le` is a reason for no data
    # series key (a digest of its labels, _key) -> its column
    slots: dict[bytes, int] = field(default_factory=dict)
    # 4 per series: previous value, birth, total, cursor (timestamp of the last sample applied)
    numbers: array[float] = field(default_factory=lambda: array("d"))
    born: bytearray = field(default_factory=bytearray)  # 1 where the birth is known
    les: list[str | None] = field(default_factory=list)  # each series' `le` (None: it has none)
    # a NaN/Inf sample: that series gives no data from then on, as before (by column)
    broken: dict[int, str] | None = None
    unlabelled: dict[int, dict[str, str]] | None = None  # bucket series without `le`: labels
    malformed: str | None = None  # this read's malformed samples, if any
    # bumped when its columns are replaced or emptied: a _Plan's slots are then not its own
    epoch: int = 0

    def clear(self) -> None:
        self.epoch += 1
        self.slots.clear()
        del self.numbers[:]
        self.born.clear()
        self.les.clear()
        self.broken = self.unlabelled = self.malformed = None

    def counted(self) -> dict[bytes, tuple[object, ...]]:
        """Each series' state by its key (tests compare the two reading paths with it)."""
        broken, nums = self.broken or {}, self.numbers
        return {
            key: (
                self.les[i],
                nums[4 * i],
                nums[4 * i + 1] if self.born[i] else None,
                nums[4 * i + 2],
                nums[4 * i + 3],
                broken.get(i),
            )
            for key, i in self.slots.items()
        }


def _apply(
    sel: _Selector,
    key: bytes,
    le: str | None,
    labels: bytes | Mapping[str, str],
    samples: Sequence[tuple[float, float]],
    births: Mapping[float, float],
    *,
    since: float,
    floor: float,
) -> None:
    """Apply one series' samples newer than its cursor (the rule of _increase_since), a
    new series' included; a NaN or infinite sample makes the series broken (no data).
    `key`: the series' key (_key); `labels`: its labels, or their JSON text, for reasons."""
    slot = sel.slots.get(key)
    if slot is None:
        if not any(t > floor for t, _ in samples):
            return  # nothing in the lookback: not a series of the count (yet)
        slot = _add_series(sel, key, le, labels)
    nonfinite: list[tuple[float, float]] = []
    _count_series(sel, slot, samples, births, since, floor, nonfinite)
    if nonfinite:
        if sel.broken is None:
            sel.broken = {}
        if slot not in sel.broken:
            t, v = nonfinite[0]
            shown = "NaN" if math.isnan(v) else str(v)
            sel.broken[slot] = (
                f"{shown} sample in {sel.text} (series {_labels(labels)}) at {t:.3f}: "
                "not a count, no data"
            )


def _count_series(
    sel: _Selector,
    slot: int,
    samples: Iterable[tuple[float | bytes, float | bytes]],
    births: Mapping[float, float],
    since: float,
    floor: float,
    nonfinite: list[tuple[float, float]] | None,
) -> bool:
    """Count one series' samples newer than its cursor into its column (the rule of
    _increase_since), the samples as numbers or as their text, read straight from the answer
    (_apply_family: half of a batch's counting was building each series' list of sample
    tuples, issue 13). A sample that is not a finite number is appended to `nonfinite` and
    skipped; with `nonfinite` None, it (or a text that is not a number) makes this False with
    nothing changed, for _apply to take with its reasons."""
    nums = sel.numbers
    i = 4 * slot
    previous, total, cursor = nums[i], nums[i + 2], nums[i + 3]
    born = nums[i + 1] if sel.born[slot] else None
    try:
        for t_given, v_given in samples:
            t, v = float(t_given), float(v_given)  # both, as _samples: any not a number declines
            if t <= floor or t <= cursor:
                continue  # before the lookback, or applied already (the windows overlap)
            cursor = t
            if v - v != 0.0:  # NaN or an infinity
                if nonfinite is None:
                    return False
                nonfinite.append((t, v))
                continue
            birth = births.get(t)
            if t <= since:
                previous, born = v, birth  # the baseline: last sample at or before since
                continue
            reborn = birth is not None and born is not None and birth != born
            total += v if reborn or v < previous else v - previous
            previous = v
            if birth is not None:
                born = birth
    except ValueError:
        return False
    nums[i], nums[i + 2], nums[i + 3] = previous, total, cursor
    if born is None:
        sel.born[slot] = 0
    else:
        nums[i + 1], sel.born[slot] = born, 1
    return True


def _add_series(
    sel: _Selector, key: bytes, le: str | None, labels: bytes | Mapping[str, str]
) -> int:
    slot = sel.slots[key] = len(sel.les)
    sel.numbers.extend((0.0, 0.0, 0.0, -math.inf))
    sel.born.append(0)
    sel.les.append(le)
    if le is None and sel.buckets:
        sel.unlabelled = sel.unlabelled or {}
        sel.unlabelled[slot] = _labels(labels)
    return slot


def _labels(labels: bytes | Mapping[str, str]) -> dict[str, str]:
    decoded = json.loads(labels) if isinstance(labels, bytes) else labels
    return dict(decoded)


def _key(labels: Mapping[str, str]) -> bytes:
    """A series' key: a 120-bit BLAKE2b digest of its labels as compact JSON, in the answer's
    order (Prometheus sorts them). Both reading paths key a series by its decoded labels, so a
    series' counts do not depend on which path read it; and as Prometheus writes most labels
    exactly so, the fast path's cache shares the digest (_SeriesCache.lookup). Two label sets
    sharing a digest is not a practical possibility."""
    return _digest(_compact(labels))


_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _digest(text: str) -> bytes:
    return _blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_DIGEST).digest()


_DIGEST = 15  # 120 bits: the bytes object fits pymalloc's 48-byte blocks (16 would take 64)


def _identity(labels: Mapping[str, str]) -> tuple[str, ...]:
    # A histogram's buckets share one _created series, which has no `le`. Prometheus sends
    # labels sorted by name, so the same labels always make the same tuple.
    return tuple([x for k, v in labels.items() if k != "__name__" and k != "le" for x in (k, v)])


# --- one rollout's registration -------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Registration:
    queries: PromQueries
    since: float
    arms: tuple[tuple[str, str, tuple[_Selector, _Selector, _Selector | None]], ...]
    active: bool = False
    closed: bool = False
    last_ok: dict[_Family, float] = field(default_factory=dict)
    result: MetricsResult | None = None
    at: float = -math.inf  # when `result` was read (unix seconds)
    fetched: float = 0.0  # when its rollout last asked (monotonic): idle ones leave the batches
    first_read: asyncio.Lock = field(default_factory=asyncio.Lock)
    reading: int = 0  # reads in flight that apply to its series (off the loop): no carry then
    # Filled from a carried state and not yet caught up: its first read is a catch-up
    # (PrometheusBatcher._catch_up), after which it joins the batches.
    carried: bool = False

    @classmethod
    def build(
        cls, queries: PromQueries, since: float, families: dict[_Family, _Family] | None = None
    ) -> _Registration:
        """`families`: the batcher's, so that rollouts share their selectors' families (and
        a rollout's selectors their arm's values): ~2 KiB per rollout (issue 13)."""
        q = queries
        families = {} if families is None else families
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}

        def selector(template: str, arm: str, buckets: bool = False) -> _Selector:
            text = q.render(template, arm)
            family, values = _parse(text, created=q.use_created)
            family = families.setdefault(family, family)
            return _Selector(text, family, shared.setdefault(values, values), buckets)

        arms = tuple(
            (
                role,
                arm,
                (
                    selector(q.requests, arm),
                    selector(q.errors, arm),
                    None
                    if q.latency_buckets is None
                    else selector(q.latency_buckets, arm, buckets=True),
                ),
            )
            for role, arm in (("primary", q.primary_arm), ("canary", q.canary_arm))
        )
        return cls(queries, since, arms)

    @property
    def selectors(self) -> list[_Selector]:
        return [s for _, _, sels in self.arms for s in sels if s is not None]

    @property
    def floor(self) -> float:
        return self.since - self.queries.lookback_s

    def members(self) -> dict[_Family, list[tuple[_Registration, _Selector]]]:
        """Its selectors by family: what one query per family reads for it alone."""
        members: dict[_Family, list[tuple[_Registration, _Selector]]] = {}
        for sel in self.selectors:
            members.setdefault(sel.family, []).append((self, sel))
        return members

    def reset(self) -> None:
        for sel in self.selectors:
            sel.clear()


@dataclass(frozen=True, slots=True)
class _Failure:
    """A query that gave no answer: unreachable, or what Prometheus (or its answer) said."""

    unreachable: bool
    detail: str

    def reason(self, shown_url: str, selector: str) -> str:
        if self.unreachable:
            return f"prometheus unreachable at {shown_url}: {self.detail}"
        return f"prometheus error for {selector}: {self.detail}"


def _counts(
    reg: _Registration, failures: Mapping[_Family, _Failure], shown_url: str
) -> MetricsResult:
    """The registration's counts from its series' state, or the first reason there are none
    (in the order the per-rollout provider checks: per arm, requests, errors, buckets)."""
    arms: dict[str, ArmCounts] = {}
    for role, arm, (requests_sel, errors_sel, buckets_sel) in reg.arms:
        totals: list[float] = []
        for sel, empty_ok in ((requests_sel, False), (errors_sel, True)):
            problem = _problem(sel, failures, shown_url)
            if problem is not None:
                return NoData(redact_text(problem))
            if not sel.slots and not empty_ok:
                return NoData(f"empty result: no series match {sel.text} in Prometheus")
            totals.append(sum(sel.numbers[2::4]))  # in the order the series came, as before
        buckets: dict[float, float] = {}
        if buckets_sel is not None:
            problem = _problem(buckets_sel, failures, shown_url)
            if problem is not None:
                return NoData(redact_text(problem))
            if not buckets_sel.slots:
                return NoData(f"empty result: no series match {buckets_sel.text} in Prometheus")
            totals_by_slot = buckets_sel.numbers[2::4]
            for slot, le in enumerate(buckets_sel.les):
                if le is None:
                    shown = (buckets_sel.unlabelled or {}).get(slot)
                    return NoData(f"series without an 'le' label for {buckets_sel.text}: {shown}")
                try:
                    bound = float(le)
                except ValueError:
                    return NoData(f"bad le={le!r} in {buckets_sel.text}")
                buckets[bound] = buckets.get(bound, 0.0) + totals_by_slot[slot]
        try:
            arms[role] = ArmCounts(requests=totals[0], errors=totals[1], latency_buckets=buckets)
        except ValidationError as exc:
            return NoData(redact_text(f"inconsistent counts for {role} ({arm}): {exc}"))
    return ArmsCounts(primary=arms["primary"], canary=arms["canary"])


def _problem(sel: _Selector, failures: Mapping[_Family, _Failure], shown_url: str) -> str | None:
    failure = failures.get(sel.family)
    if failure is not None:
        return failure.reason(shown_url, sel.text)
    if sel.malformed is not None:
        return sel.malformed
    if sel.broken:
        return sel.broken[min(sel.broken)]  # the first series' reason, as before
    return None


# --- the batcher ---------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Read:
    """One read: which selectors each family's query serves, and over what window."""

    at: float
    members: dict[_Family, list[tuple[_Registration, _Selector]]]
    windows: dict[_Family, int]

    def query(self, family: _Family) -> str:
        return family.query((sel.values for _, sel in self.members[family]), self.windows[family])


class PrometheusBatcher:
    """Reads the counts of every registered rollout that shares one Prometheus, in batches.

    `provider(queries)` gives a rollout its MetricsProvider (BatchedMetrics). `queries_sent`
    counts the HTTP queries made (tests and benchmarks read it). Close with `aclose()`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        period_s: float = 10.0,
        overlap_s: float = 5.0,
        connections: int = 8,
        max_response_bytes: int = 256 * 1024 * 1024,
        since_tolerance_s: float = 1.0,
        idle_s: float | None = None,
        max_age_s: float | None = None,
        rollouts_per_read: int = 200,
        summary_after_s: float = 300.0,
        carry_max_age_s: float = 300.0,
        timings: MetricsTimings | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"Prometheus url must start with http:// or https://, got {redact_url(url)!r}"
            )
        for name, value in (("timeout_s", timeout_s), ("period_s", period_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive, got {value}")
        if not (math.isfinite(overlap_s) and overlap_s >= 0):
            raise ValueError(f"overlap_s must be >= 0, got {overlap_s}")
        if connections < 1 or max_response_bytes < 1 or rollouts_per_read < 1:
            raise ValueError(
                "connections, max_response_bytes and rollouts_per_read must be positive"
            )
        import yarl

        parsed = yarl.URL(url.rstrip("/"))
        self._headers: dict[str, str] = {}
        if parsed.user is not None:  # basic auth, as requests (and so PrometheusMetrics) does
            pair = f"{parsed.user}:{parsed.password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self._query_url = str(parsed.with_user(None).with_password(None)) + "/api/v1/query"
        self.shown_url = redact_url(url.rstrip("/"))
        self.timeout_s = timeout_s
        self.period_s = period_s
        self.overlap_s = overlap_s
        self.connections = connections
        self.max_response_bytes = max_response_bytes
        # A batch reads its rollouts this many at a time, one read after another: a family's
        # answer for a thousand rollouts decodes to ~100 MiB of Python objects at once, and
        # the process kept that peak as RSS (issue 13); 200 at a time is still one query per
        # family per 200 rollouts.
        self.rollouts_per_read = rollouts_per_read
        self.since_tolerance_s = since_tolerance_s
        # A first read back further than this asks for each series' summary (module doc).
        self.summary_after_s = summary_after_s
        self.summary_reads = 0  # first reads the summary served (tests, benchmarks)
        self.summary_fallbacks = 0  # summaries that sent their rollout to the range read
        # A carried state read through longer ago than this is not taken: its first batch
        # would read that far back for a whole group (a first read is cheaper then).
        self.carry_max_age_s = carry_max_age_s
        self.carried = 0  # rollouts that took up a carried state (tests, benchmarks)
        self.carry_refused = 0
        self.catch_ups = 0  # catch-up reads of carried rollouts (tests, benchmarks)
        self.idle_s = max(60.0, 6 * period_s) if idle_s is None else idle_s
        self.max_age_s = 2 * period_s if max_age_s is None else max(period_s, max_age_s)
        self.queries_sent = 0
        self.batches = 0
        self.timings = timings  # how long queries, batches and fetches' waits take (/metrics)
        self._registrations: set[_Registration] = set()
        self._session: Any = None  # aiohttp.ClientSession, made on first use (needs the loop)
        self._slots: asyncio.Semaphore | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._inflight_members: set[_Registration] = set()
        # Carried registrations whose first fetch waits for a catch-up read, each with what
        # tells it that its read is done; and the task that reads them, group after group.
        self._catching_up: dict[_Registration, asyncio.Event] = {}
        self._catch_up_task: asyncio.Task[None] | None = None
        # Range first reads at once: each holds its answers (~70,000 samples a rollout an
        # hour into its analysis) until they are applied; a shard's thousand rollouts
        # resumed at once took a survivor to 3.9 GB when they all waited together.
        self._range_reads = asyncio.Semaphore(max(1, connections // 2))
        self._series = _SeriesCache()
        self._families: dict[_Family, _Family] = {}  # shared by registrations; see _batch

    def __repr__(self) -> str:
        return f"PrometheusBatcher({self.shown_url!r}, {len(self._registrations)} rollouts)"

    def provider(self, queries: PromQueries | None = None) -> BatchedMetrics:
        """One rollout's MetricsProvider, reading through this batcher."""
        return BatchedMetrics(self, queries or PromQueries())

    @property
    def registered(self) -> int:
        return len(self._registrations)

    async def aclose(self) -> None:
        """Close the HTTP session (a later read opens a new one)."""
        for task in (self._inflight, self._catch_up_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._inflight = self._catch_up_task = None
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ---- registrations ------------------------------------------------------------------

    def _register(self, queries: PromQueries, since: float) -> _Registration:
        return _Registration.build(queries, since, self._families)

    def _carry_on(
        self, queries: PromQueries, text: str, *, since: float, now: float
    ) -> _Registration | str:
        """A registration that counts on from a carried state (_carry_text), or why not."""
        reg = self._register(queries, since)
        at = _carried(
            reg,
            text,
            url=self.shown_url,
            now=now,
            tolerance_s=self.since_tolerance_s,
            max_age_s=self.carry_max_age_s,
        )
        if isinstance(at, str):
            self.carry_refused += 1
            return at
        result = _counts(reg, {}, self.shown_url)
        if not isinstance(result, ArmsCounts):
            self.carry_refused += 1
            reg.reset()
            return f"it counts nothing: {result}"
        self.carried += 1
        # Not in the batches yet: its first fetch catches it up (_catch_up), then it joins.
        reg.result, reg.at, reg.carried = result, at, True
        reg.last_ok = dict.fromkeys(reg.members(), at)
        reg.fetched = time.monotonic()
        return reg

    def _drop(self, reg: _Registration) -> None:
        reg.closed = True
        self._registrations.discard(reg)

    async def _answer(self, reg: _Registration, now: float) -> MetricsResult:
        reg.fetched = asked = time.monotonic()
        try:
            return await self._answer_from_batches(reg, now)
        finally:
            if self.timings is not None:
                self.timings.metrics_wait(time.monotonic() - asked)

    async def _answer_from_batches(self, reg: _Registration, now: float) -> MetricsResult:
        if not reg.active:
            async with reg.first_read:  # two fetches at once must not read back twice
                if not reg.active:
                    await self._baseline(reg)
        elif reg.at < now - self.period_s and not reg.closed:
            if reg.at >= now - self.max_age_s:
                self._start_batch()  # for the next ticks; this one goes on with what it has
            else:
                for _ in range(2):  # bounded: a clock far ahead of ours cannot loop us
                    await self._join_batch(reg)
                    if reg.at >= now - self.max_age_s or reg.closed:
                        break
        assert reg.result is not None
        return reg.result

    def _start_batch(self) -> asyncio.Task[None]:
        """The batch in flight, or a new one for every active registration."""
        task = self._inflight
        if task is None or task.done():
            self._expire_idle()
            members = {r for r in self._registrations if r.active}
            task = asyncio.create_task(self._batch(members), name="prometheus batch")
            self._inflight, self._inflight_members = task, members
        return task

    async def _join_batch(self, reg: _Registration) -> None:
        """Wait for a batch that reads `reg`: the one in flight if it does, else a new one."""
        while reg in self._registrations:
            task = self._start_batch()
            reads_it = reg in self._inflight_members
            await asyncio.shield(task)  # one rollout cancelled does not cancel the others' batch
            if reads_it:
                return

    def _expire_idle(self) -> None:
        """Rollouts that stopped asking (ended, or their provider was never closed) leave the
        batches; if one asks again, it registers again (a read back to its `since`)."""
        idle = time.monotonic() - self.idle_s
        for reg in [r for r in self._registrations if r.fetched < idle]:
            reg.active = False
            reg.reset()
            self._registrations.discard(reg)

    # ---- reads ----------------------------------------------------------------------------

    async def _baseline(self, reg: _Registration) -> None:
        """A registration's first read: its own series back to since - lookback (or their
        summaries, when that is far back and they allow it: _summary_read); for one filled
        from a carried state, the catch-up read from where that state was read through."""
        if reg.carried:
            await self._catch_up(reg)
            return
        at = time.time()
        if at - reg.since > self.summary_after_s and await self._summary_read(reg, at):
            return
        async with self._range_reads:
            at = time.time()
            window = math.ceil(max(0.0, at - reg.since) + reg.queries.lookback_s)
            members = reg.members()
            read = _Read(at, members, dict.fromkeys(members, window))
            reg.reset()
            failures, results = await self._read(read, [reg])
        reg.result = results[reg]
        reg.at = at
        if failures or reg.closed:
            reg.reset()  # retried whole at the next fetch
            return
        reg.active = True
        reg.last_ok = dict.fromkeys(members, at)
        self._registrations.add(reg)

    async def _catch_up(self, reg: _Registration) -> None:
        """Wait for the catch-up read of `reg`: the next group read takes it with the others
        waiting then (up to `rollouts_per_read`). So a moved rollout waits for the group in
        flight and its own, not for every rollout that moved with it."""
        done = self._catching_up.setdefault(reg, asyncio.Event())
        task = self._catch_up_task
        if task is None or task.done():
            self._catch_up_task = asyncio.create_task(self._catch_up_groups(), name="catch-up")
        await done.wait()

    async def _catch_up_groups(self) -> None:
        """Catch-up reads while carried registrations wait: the oldest first, each group read
        as a batch reads one (each family from its oldest read), then joining the batches. A
        family that failed is read again from the same place by the next batch, as in any
        batch; a registration that joined the batches unread would be too (the catch-up is
        only sooner)."""
        try:
            while self._catching_up:
                ordered = sorted(self._catching_up, key=_oldest_read)
                taken = ordered[: self.rollouts_per_read]
                told = [self._catching_up.pop(reg) for reg in taken]
                group = [reg for reg in taken if not reg.closed]
                try:
                    if group:
                        self.catch_ups += 1
                        await self._batch_group(group)
                        for reg in group:
                            reg.carried = False
                            if not reg.closed:
                                reg.active = True
                                self._registrations.add(reg)
                finally:
                    for event in told:
                        event.set()
        finally:  # cancelled (aclose): every waiter is let go; a fetch asks again
            for event in self._catching_up.values():
                event.set()
            self._catching_up.clear()

    async def _summary_read(self, reg: _Registration, at: float) -> bool:
        """A first read from each series' summary; False if it must be the range read."""
        members = reg.members()
        if any(family.name is None for family in members):
            return False  # a selector we cannot parse is queried as written, by the range read
        queries = [
            _summary_query(
                family, (sel.values for _, sel in found), since=reg.since, floor=reg.floor, at=at
            )
            for family, found in members.items()
        ]
        answers = await asyncio.gather(*(self._post(query, at) for query in queries))
        result = None
        if not any(isinstance(answer, _Failure) for answer in answers):
            result = await run_blocking(
                "prometheus",
                _summary_apply,
                reg,
                {f: a for f, a in zip(members, answers, strict=True) if isinstance(a, bytes)},
                members,
                self.shown_url,
            )
        if result is None:
            self.summary_fallbacks += 1
            return False
        self.summary_reads += 1
        reg.result, reg.at = result, at
        if reg.closed:
            reg.reset()
            return True
        reg.active = True
        reg.last_ok = dict.fromkeys(members, at)
        self._registrations.add(reg)
        return True

    async def _batch(self, regs: set[_Registration]) -> None:
        """One batch: one query per family for every active registration, in groups of
        `rollouts_per_read` registrations read one after another.

        Each group's queries go out while the group before it is counted in the prometheus
        pool, so a batch takes about the longer of the two rather than their sum: at 2,000
        rollouts over 2 shards on a saturated machine, batches outlasted the period and ticks
        waited for them (issue 13). One group's answers wait at most, as one group's read.

        Each group reads up to when its queries go out, not to when the batch began: a
        rollout counted late in a long batch has counts that fresh, so it does not find them
        older than `max_age_s` (and wait) before the next batch reaches it again."""
        began = time.monotonic()
        try:
            await self._batch_groups(regs)
        finally:
            if self.timings is not None:
                self.timings.metrics_batch(time.monotonic() - began)

    async def _batch_groups(self, regs: set[_Registration]) -> None:
        self.batches += 1
        try:
            self._series.next_generation()
        except Exception:  # a bug must not kill the batch: the cache is only a cache
            log.exception("prometheus batch: the series cache could not be renewed")
            self._series = _SeriesCache()
        # the families of rollouts gone are forgotten (a first read's are made again)
        self._families = {s.family: s.family for r in regs for s in r.selectors}
        # Oldest reads first, together: a carried rollout's first batch reads back to where
        # its last replica stopped, and only its group pays for that window.
        ordered = sorted(regs, key=_oldest_read)
        step = self.rollouts_per_read
        groups = [ordered[start : start + step] for start in range(0, len(ordered), step)]
        asked = self._ask_group(groups[0]) if groups else None
        try:
            for i, group in enumerate(groups):
                assert asked is not None
                current = asked
                await asyncio.wait([current])  # its failure is the group's, in _count_group
                asked = self._ask_group(groups[i + 1]) if i + 1 < len(groups) else None
                await self._count_group(group, current)
        finally:
            if asked is not None:  # cancelled (aclose) while a group was counted
                asked.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asked

    async def _batch_group(self, regs: list[_Registration]) -> None:
        """One group's read, on its own (a catch-up)."""
        await self._count_group(regs, self._ask_group(regs))

    def _ask_group(
        self, regs: list[_Registration]
    ) -> asyncio.Task[tuple[_Read, list[bytes | _Failure]]]:
        """Send a group's queries, up to now (each family from its oldest good read); the
        task's result is the read and its answers, for _count_group."""

        async def ask() -> tuple[_Read, list[bytes | _Failure]]:
            at = time.time()
            members: dict[_Family, list[tuple[_Registration, _Selector]]] = {}
            oldest: dict[_Family, float] = {}
            for reg in regs:
                for sel in reg.selectors:
                    members.setdefault(sel.family, []).append((reg, sel))
                    last = reg.last_ok.get(sel.family, reg.at)
                    oldest[sel.family] = min(oldest.get(sel.family, last), last)
            windows = {
                family: max(1, math.ceil(at - oldest[family] + self.overlap_s))
                for family in members
            }
            read = _Read(at, members, windows)
            return read, await self._ask(read)

        return asyncio.create_task(ask(), name="prometheus group read")

    async def _count_group(
        self,
        regs: list[_Registration],
        asked: asyncio.Task[tuple[_Read, list[bytes | _Failure]]],
    ) -> None:
        try:
            read, answers = await asked
            failures, results = await self._count(read, answers, regs)
            at = read.at
            for reg in regs:
                reg.result = results[reg]
                reg.at = at
                for sel in reg.selectors:
                    if sel.family not in failures:
                        reg.last_ok[sel.family] = at
        except Exception as exc:  # a bug must become no data, not a dead batch
            log.exception("prometheus batch failed")
            for reg in regs:
                reg.result = NoData(redact_text(f"metrics batch error: {exc!r}"))
                reg.at = time.time()

    async def _read(
        self, read: _Read, regs: Iterable[_Registration]
    ) -> tuple[dict[_Family, _Failure], dict[_Registration, MetricsResult]]:
        """Send each family's query, then apply the answers and count (off the loop)."""
        return await self._count(read, await self._ask(read), regs)

    async def _ask(self, read: _Read) -> list[bytes | _Failure]:
        """Each family's answer, in the order of read.members."""
        return list(
            await asyncio.gather(*(self._post(read.query(f), read.at) for f in read.members))
        )

    async def _count(
        self, read: _Read, answers: list[bytes | _Failure], regs: Iterable[_Registration]
    ) -> tuple[dict[_Family, _Failure], dict[_Registration, MetricsResult]]:
        """Apply a read's answers and count, in the prometheus pool (off the loop)."""
        families = list(read.members)
        regs = list(regs)
        for reg in regs:
            reg.reading += 1  # its series change off the loop meanwhile: no carry of them
        try:
            return await run_blocking(
                "prometheus",
                _apply_without_gc,
                read,
                dict(zip(families, answers, strict=True)),
                regs,
                self.shown_url,
                self._series,
            )
        finally:
            for reg in regs:
                reg.reading -= 1

    async def _post(self, query: str, at: float) -> bytes | _Failure:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                trust_env=False,  # no proxy variables, no netrc lookup per request
            )
            self._slots = asyncio.Semaphore(self.connections)
        assert self._slots is not None
        async with self._slots:  # the timeout starts once a connection is ours
            self.queries_sent += 1
            sent = time.monotonic()
            failure: _Failure | None = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    async with self._session.post(
                        self._query_url,
                        data={"query": query, "time": f"{at:.3f}"},
                        allow_redirects=False,
                        headers=self._headers,
                    ) as resp:
                        body = await read_bounded(resp, self.max_response_bytes)
                        status = resp.status
            except TimeoutError:
                failure = _Failure(True, f"TimeoutError: no answer within {self.timeout_s:g}s")
            except aiohttp.ClientError as exc:
                failure = _Failure(True, f"{type(exc).__name__}: {exc}")
            except AnswerTooLarge as exc:
                failure = _Failure(False, str(exc))
            # answered or not (a query cancelled by aclose is not timed); this includes any
            # wait for the GIL while another group is counted in the prometheus pool
            if self.timings is not None:
                self.timings.metrics_query(time.monotonic() - sent)
        if failure is not None:
            return failure
        if 300 <= status < 400:
            return _Failure(False, f"HTTP {status}: redirects are not followed")
        if status != 200:
            return _Failure(False, f"HTTP {status}: {body[:500].decode(errors='replace')}")
        return body


_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


def _apply_without_gc(
    read: _Read,
    answers: Mapping[_Family, bytes | _Failure],
    regs: Sequence[_Registration],
    shown_url: str,
    cache: _SeriesCache,
) -> tuple[dict[_Family, _Failure], dict[_Registration, MetricsResult]]:
    """_apply_answers with Python's cyclic GC paused: decoding a batch makes ~10 objects per
    series, and the collections they trigger walk every live object (a thousand rollouts'
    state included): about half of a batch's CPU at 500 rollouts. Nothing here makes cycles."""
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        failures = _apply_answers(read, answers, cache)
        return failures, {reg: _counts(reg, failures, shown_url) for reg in regs}
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()


def _apply_answers(
    read: _Read, answers: Mapping[_Family, bytes | _Failure], cache: _SeriesCache
) -> dict[_Family, _Failure]:
    """Decode each family's answer and apply its samples to the member selectors' series,
    one family at a time (each decoded answer is gone before the next is decoded)."""
    failures: dict[_Family, _Failure] = {}
    for family, answer in answers.items():
        members = read.members[family]
        for _, sel in members:
            sel.malformed = None
        if isinstance(answer, _Failure):
            failure: _Failure | None = answer
        else:
            failure = _apply_family(family, answer, members, cache)
        if failure is not None:
            failures[family] = failure
    return failures


# --- reading an answer ---------------------------------------------------------------------------
#
# A family's answer for 200 rollouts is ~19,000 series. Decoding it with json.loads and walking
# the dicts was the batcher's main cost (issue 13: ~30% of the controller's CPU at 1,000
# rollouts, and ~100 MiB of short-lived objects per answer). Prometheus writes its answers
# compactly and always the same way (Go's encoder, labels sorted by name), so the fast path
# splits the answer with one regular expression into each series' labels (kept as the raw
# JSON text) and its samples' text, and decodes a series' labels once, the first time that
# text is seen (`_SeriesCache`). An answer that does not match that exact shape (another
# backend's formatting, native histograms, anything unusual) takes the json.loads path: both
# give a series the same key (_key: a digest of its labels as decoded), so a rollout's counts
# do not depend on which path read them.

_SAMPLE = re.compile(rb'\[([0-9.eE+-]+),"([^"\\]*)"\]')
_HEAD = b'{"status":"success","data":{"resultType":"matrix","result":['
_OPEN = b'{"metric":'
_VALUES = b'},"values":['
_NEXT = b',{"metric":'


# _scan indexes at most one `{` and one `}` in this many bytes of an answer, and this many
# more: its index then takes at most ~1.6 times the answer, however its labels read.
_BYTES_A_BRACE = 16
_SPARE_BRACES = 4096
_OPEN_REST = np.frombuffer(_OPEN[1:], np.uint8)  # the tokens after their first byte
_VALUES_REST = np.frombuffer(_VALUES[1:], np.uint8)


def _followed(
    view: npt.NDArray[np.uint8], at: npt.NDArray[np.intp], rest: npt.NDArray[np.uint8]
) -> npt.NDArray[np.intp]:
    """The positions in `at` (each a token's first byte) that `rest` follows in `view`."""
    at = at[at + len(rest) < len(view)]
    keep = np.ones(len(at), bool)
    for offset, byte in enumerate(rest.tolist(), start=1):
        keep &= view[at + offset] == byte
    return at[keep]


def _scan(answer: bytes) -> array[int] | None:
    """Where each series' labels JSON and samples text are in a compact Prometheus matrix
    answer: 4 offsets per series (labels start and end, samples start and end); None if the
    answer is not exactly that shape (the caller decodes it whole).

    Splitting on the structure's own tokens is exact: each contains a quote, and a quote
    inside a JSON string is always escaped, so no label name or value can contain one.
    Offsets, not slices: an answer's copies were most of a batch's peak memory (issue 13).

    In numpy, over the whole answer at once: walking it series by series in Python was ~2.5 us
    a series, a quarter of the batcher's counting (issue 13; ~0.45 us here). It gives what
    that walk gave, answer for answer (tests/metrics/test_batched_scan.py holds the walk):
    the series begin at every `{"metric":` (all of them: the walk checked there were no
    others), each series' labels end at the first `},"values":[` after its start, its
    samples at the first `}` after that, which follows a `]`, and then comes `,` and the
    next series, or `]}` after the last."""
    if not answer.startswith(_HEAD):
        return None
    spans: array[int] = array("q")
    if answer.startswith(b"]}", len(_HEAD)):
        return spans
    view = np.frombuffer(answer, np.uint8)
    # Each brace costs ~26 bytes of index arrays here, and a label value may hold any number
    # of them (a tenant's exporter): past one in _BYTES_A_BRACE bytes (a real series, ~150
    # bytes, has four) and a margin, the answer is decoded whole instead, json.loads holding
    # such a value as one string. Counted from the comparison the index is made from.
    most = len(answer) // _BYTES_A_BRACE + _SPARE_BRACES
    found = view == 0x7B  # {
    if np.count_nonzero(found) > most:
        return None
    opens = _followed(view, np.flatnonzero(found), _OPEN_REST)
    found = view == 0x7D  # }
    if np.count_nonzero(found) > most:
        return None
    braces = np.flatnonzero(found)
    del found
    values = _followed(view, braces, _VALUES_REST)
    n = len(opens)
    if n == 0 or opens[0] != len(_HEAD):
        return None
    start = opens + len(_OPEN)
    at = np.searchsorted(values, start)
    if at[-1] >= len(values):  # a series without its samples
        return None
    middle = values[at]
    samples = middle + len(_VALUES)
    at = np.searchsorted(braces, samples)
    if at[-1] >= len(braces):
        return None
    end = braces[at]
    if not (view[end - 1] == 0x5D).all():  # "]": the samples' list ends there
        return None
    # each series is followed by a comma and the next one's `{"metric":`, the last by "]}"
    if n > 1 and not ((opens[1:] == end[:-1] + 2).all() and (view[end[:-1] + 1] == 0x2C).all()):
        return None
    if not answer.startswith(b"]}", int(end[-1]) + 1):
        return None
    table = np.empty((n, 4), np.int64)
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = start, middle + 1, samples, end - 1
    spans.frombytes(table.tobytes())
    return spans


def _samples(text: bytes) -> list[tuple[float, float]]:
    """`[t,"v"],[t,"v"]` -> [(t, v), ...]; ValueError if any sample is not that."""
    pairs = _SAMPLE.findall(text)
    if len(pairs) != text.count(b"["):
        raise ValueError(f"unexpected sample in {text[:200]!r}")
    return [(float(t), float(v)) for t, v in pairs]


@dataclass(slots=True)
class _Series:
    """What a series' labels say, decoded once."""

    key: bytes  # _key(its labels): the digest it is cached by, unless its JSON text is unusual
    target: tuple[str, ...]  # the family's equality labels' values: which selectors it serves
    le: str | None
    birth: bytes  # a digest of the labels of its `_created` series (no __name__, no le)
    created: bool  # it is the family's `_created` series
    seen: int = 0  # the cache's generation that last saw it


class _SeriesCache:
    """Decoded labels by a digest of their JSON text, per family. A series not seen in a
    whole batch (its rollout ended, its pod went away) is forgotten at the next.

    A 120-bit BLAKE2b digest, not the text: ~90,000 series' texts were ~15 MiB at 1,000
    rollouts; two different label sets sharing a digest is not a practical possibility."""

    def __init__(self) -> None:
        self._by_family: dict[_Family, dict[bytes, _Series]] = {}
        self._interned: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._births: dict[tuple[str, ...], bytes] = {}
        self._plans: dict[_Family, dict[bytes, _Plan]] = {}
        self._generation = 0
        self.planned = 0  # answers read by their plan (_labels_digest)
        self.scanned = 0  # answers read by the fast path
        self.decoded = 0  # answers read by json.loads (tests check real Prometheus' are not)

    def next_generation(self) -> None:
        """Forget what the last batch did not see (one table per family, rebuilt compact)."""
        keep = self._generation
        # Copies first: a first or catch-up read looks series up in the prometheus pool
        # meanwhile, and iterating a dict another thread adds to raised "dictionary changed
        # size during iteration", which killed the batch (the scale run, twice in 10 minutes).
        # dict.copy() is one step under the GIL (bytes keys: no Python code runs). Not
        # list(items()): its 90,000 tuples at 1,000 rollouts set off the garbage collector's
        # generations over the whole heap (2.5-3.7x the time, in the profile's top entries).
        self._by_family = {
            family: {d: s for d, s in table.copy().items() if s.seen >= keep}
            for family, table in self._by_family.copy().items()
        }
        self._plans = {
            family: {d: p for d, p in plans.copy().items() if p.seen >= keep}
            for family, plans in self._plans.copy().items()
        }
        self._generation += 1
        self._interned, self._births = {}, {}

    @property
    def generation(self) -> int:
        return self._generation

    def plan(self, family: _Family, digest: bytes) -> _Plan | None:
        """The plan made from the last answer of the family with these labels, if any."""
        plan = self._plans.get(family, {}).get(digest)
        if plan is not None:
            plan.seen = self._generation
        return plan

    def keep_plan(self, family: _Family, digest: bytes, plan: _Plan) -> None:
        plan.seen = self._generation
        self._plans.setdefault(family, {})[digest] = plan

    def __len__(self) -> int:
        return sum(len(table) for table in self._by_family.values())

    def table(self, family: _Family) -> dict[bytes, _Series]:
        """The family's series, for lookup (taken once per answer, not once per series)."""
        table = self._by_family.get(family)
        if table is None:
            table = self._by_family[family] = {}
        return table

    def lookup(self, table: dict[bytes, _Series], family: _Family, text: bytes) -> _Series:
        digest = _blake2b(text, digest_size=_DIGEST).digest()
        series = table.get(digest)
        if series is None:
            series = table[digest] = self._describe(family, json.loads(text))
            if series.key == digest:
                series.key = digest  # one bytes object for both: Prometheus' text is compact
        series.seen = self._generation
        return series

    def _describe(self, family: _Family, labels: Mapping[str, str]) -> _Series:
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValueError(f"labels are not a map of strings: {labels!r}"[:200])
        created = family.created_name is not None and labels.get("__name__") == family.created_name
        key = b"" if created else _key(labels)  # a _created series has no state
        target = self._intern(tuple([labels.get(label, "") for label in family.eq_labels]))
        # a digest, not the labels: their strings were ~4 KiB per rollout (issue 13)
        identity = _identity(labels)
        birth = self._births.get(identity)
        if birth is None:
            birth = self._births[identity] = _digest(json.dumps(identity, ensure_ascii=False))
        le = labels.get("le")
        return _Series(key, target, None if le is None else sys.intern(le), birth, created)

    def _intern(self, values: tuple[str, ...]) -> tuple[str, ...]:
        # a histogram's 12 buckets, its count and its _created share these: one tuple for all
        return self._interned.setdefault(values, values)


def _apply_family(
    family: _Family,
    answer: bytes,
    members: list[tuple[_Registration, _Selector]],
    cache: _SeriesCache,
) -> _Failure | None:
    spans = _scan(answer)
    if spans is None:
        cache.decoded += 1
        return _apply_family_decoded(family, answer, members)
    digest = _labels_digest(answer, spans)
    plan = cache.plan(family, digest)
    if plan is not None and plan.serves(members):
        cache.planned += 1
        _apply_planned(plan, answer, spans, cache.generation)
        return None
    cache.scanned += 1
    targets = _targets(members)
    created: list[tuple[int, _Series]] = []
    # the counter series this read serves, in the answer's order: (its position, the series,
    # its selectors)
    counters: list[tuple[int, _Series, list[tuple[_Registration, _Selector]]]] = []
    table, lookup = cache.table(family), cache.lookup
    it = iter(spans)
    try:
        for position, (a, b, _, _) in enumerate(zip(it, it, it, it, strict=True)):
            series = lookup(table, family, answer[a:b])
            if series.created:
                created.append((position, series))
            else:
                found = targets.get(series.target)
                if found is not None:
                    counters.append((position, series, found))
    except ValueError as exc:  # labels that are not JSON, or not strings
        return _Failure(False, f"prometheus answered garbage: {exc}"[:500])
    # One way of counting: this answer through its plan, then the plan made again, since the
    # series counted for the first time now have their columns.
    _apply_planned(_Plan.of(members, created, counters), answer, spans, cache.generation)
    cache.keep_plan(family, digest, _Plan.of(members, created, counters))
    return None


def _apply_series(
    series: _Series,
    found: list[tuple[_Registration, _Selector]],
    labels: bytes,
    text: bytes,
    born: Mapping[float, float],
) -> None:
    """A series' samples applied the general way (new, broken or malformed series, or one
    that serves more than one selector); `labels`: its labels' JSON text, for reasons."""
    try:
        samples = _samples(text)
    except ValueError as exc:
        for _, sel in found:
            sel.malformed = f"malformed samples for {sel.text}: {exc}"
        return
    for reg, sel in found:
        _apply(sel, series.key, series.le, labels, samples, born, since=reg.since, floor=reg.floor)


# --- reading an answer whose series were all read before ---------------------------------------
#
# In a steady batch a group's answer lists the same series, in the same order, as its last one
# (Prometheus sorts them by their labels), and only their samples differ. So a digest of all
# the series' labels texts, in order, finds the _Plan made from the last such answer: which
# series, at which position, counts into which selector's column. Then no series' labels are
# looked up or decoded, and the counting is each series' samples alone (issue 13: the lookups
# were about a third of the counting). Any other answer takes the path above, which makes the
# plan. The digest reads the answer where _scan found the labels (no copies: an answer's
# copies were most of a batch's peak memory).


def _labels_digest(answer: bytes, spans: array[int]) -> bytes:
    """A digest of the answer's series' labels texts, in order (each a whole JSON object, so
    their concatenation tells where each begins and ends)."""
    digest = _blake2b(digest_size=16)
    update, view = digest.update, memoryview(answer)
    it = iter(spans)
    for a, b, _, _ in zip(it, it, it, it, strict=True):
        update(view[a:b])
    return digest.digest()


@dataclass(eq=False, slots=True)
class _Plan:
    """Where each series of an answer counts, by its position in the answer, for the members
    (registrations and selectors) it was made with: valid while they are the same selectors,
    none of whose columns was emptied or replaced since (their epochs).

    The counted series are columns, not a tuple each: plans add ~5 KiB a rollout to the
    batcher's heap (benchmarks/RESULTS.md, fifteenth session)."""

    members: list[tuple[_Registration, _Selector]]  # held: their ids stay theirs
    epochs: dict[int, int]  # id(selector) -> its epoch when the plan was made
    created: list[tuple[int, _Series]]  # _created series: (position, series)
    # the series counted before into one selector: positions, series, registrations,
    # selectors and slots, one entry each
    positions: array[int]
    series: list[_Series]
    regs: list[_Registration]
    sels: list[_Selector]
    slots: array[int]
    others: list[tuple[int, _Series, list[tuple[_Registration, _Selector]]]]  # the general way
    columns: _Columns | None = None  # the same rows as arrays (_count_planned)
    seen: int = 0

    @classmethod
    def of(
        cls,
        members: list[tuple[_Registration, _Selector]],
        created: list[tuple[int, _Series]],
        counters: Iterable[tuple[int, _Series, list[tuple[_Registration, _Selector]]]],
    ) -> _Plan:
        plan = cls(
            list(members),
            {id(sel): sel.epoch for _, sel in members},
            created,
            array("q"),
            [],
            [],
            [],
            array("q"),
            [],
        )
        for position, series, found in counters:
            if len(found) == 1:
                reg, sel = found[0]
                slot = sel.slots.get(series.key)
                if slot is not None:
                    plan.positions.append(position)
                    plan.series.append(series)
                    plan.regs.append(reg)
                    plan.sels.append(sel)
                    plan.slots.append(slot)
                    continue
            plan.others.append((position, series, found))
        plan.columns = _Columns.of(plan)
        return plan

    def serves(self, members: list[tuple[_Registration, _Selector]]) -> bool:
        epochs = self.epochs
        if len(members) != len(self.members):
            return False
        for _, sel in members:
            if epochs.get(id(sel), -1) != sel.epoch:
                return False
        return True


@dataclass(eq=False, slots=True)
class _Columns:
    """A plan's rows (the series counted before into one selector) as index arrays, so that
    _count_planned counts them all together: their selectors and registrations once each,
    and each row's selector, registration and `_created` series (its births) by index (its
    position and column are the plan's own arrays). int32: ~13 bytes a row in all."""

    sels: list[_Selector]  # distinct, in the order of their first row
    regs: list[_Registration]  # distinct
    created: npt.NDArray[np.int32]  # the `_created` series' positions, as plan.created
    sel: npt.NDArray[np.int32]  # each row's: index in sels
    reg: npt.NDArray[np.int32]  # index in regs
    birth: npt.NDArray[np.int32]  # index in created of its births' series; -1: none
    # False where another row counts into the same column (an answer listing a series
    # twice): those are counted one after the other, by _count_series
    alone: npt.NDArray[np.bool_]

    @classmethod
    def of(cls, plan: _Plan) -> _Columns:
        sels: dict[int, int] = {}
        regs: dict[int, int] = {}
        # the last `_created` series of a birth digest: as the births' dict of _apply_planned
        births = {series.birth: i for i, (_, series) in enumerate(plan.created)}
        sel_ix = [sels.setdefault(id(sel), len(sels)) for sel in plan.sels]
        reg_ix = [regs.setdefault(id(reg), len(regs)) for reg in plan.regs]
        by_sel = {id(sel): sel for sel in plan.sels}
        by_reg = {id(reg): reg for reg in plan.regs}
        columns = collections.Counter(zip(sel_ix, plan.slots, strict=True))
        return cls(
            [by_sel[i] for i in sels],
            [by_reg[i] for i in regs],
            np.array([position for position, _ in plan.created], np.int32),
            np.array(sel_ix, np.int32),
            np.array(reg_ix, np.int32),
            np.array([births.get(series.birth, -1) for series in plan.series], np.int32),
            np.array([columns[c] == 1 for c in zip(sel_ix, plan.slots, strict=True)], bool),
        )


def _apply_planned(plan: _Plan, answer: bytes, spans: array[int], generation: int) -> None:
    """Count an answer by its plan (_labels_digest), without reading any series' labels:
    the series counted before into one selector all together (_count_planned), or, where
    that declines, each from its samples' text (_count_series); any other series the
    general way (_apply_series)."""
    done = _count_planned(plan, answer, spans)
    for series in plan.series:
        series.seen = generation
    rest = range(len(plan.series)) if done is None else np.flatnonzero(~done).tolist()
    if not rest and not plan.others:
        for _, series in plan.created:
            series.seen = generation
        return
    births: dict[bytes, dict[float, float]] = {}
    for position, series in plan.created:
        series.seen = generation
        k = 4 * position
        try:
            births[series.birth] = dict(_samples(answer[spans[k + 2] : spans[k + 3]]))
        except ValueError:
            continue  # a broken _created series only costs the extra reset check
    bounds = {reg: (reg.since, reg.floor) for reg, _ in plan.members}
    no_births: dict[float, float] = {}
    findall, brackets = _SAMPLE.findall, answer.count
    positions, all_series, regs, sels, slots = (
        plan.positions,
        plan.series,
        plan.regs,
        plan.sels,
        plan.slots,
    )
    for row in rest:
        series, reg, sel, slot = all_series[row], regs[row], sels[row], slots[row]
        k = 4 * positions[row]
        c, d = spans[k + 2], spans[k + 3]
        pairs = findall(answer, c, d)
        born = births.get(series.birth, no_births)
        since, floor = bounds[reg]
        if len(pairs) != brackets(b"[", c, d) or not _count_series(
            sel, slot, pairs, born, since, floor, None
        ):
            labels = answer[spans[k] : spans[k + 1]]
            _apply_series(series, [(reg, sel)], labels, answer[c:d], born)
    for position, series, found in plan.others:
        series.seen = generation
        k = 4 * position
        born = births.get(series.birth, no_births)
        labels, text = answer[spans[k] : spans[k + 1]], answer[spans[k + 2] : spans[k + 3]]
        _apply_series(series, found, labels, text, born)


# Counting a plan's rows together. Per series, _count_series' loop (the samples' regular
# expression, their floats, the rule in Python) was ~8 us: at 1,000 rollouts a fifth of the
# controller's CPU (issue 13). Here the whole answer's samples are found and parsed at once,
# the rows' columns gathered from their selectors once per selector, and the rule applied to
# every row's j-th sample together, j = 0, 1, ... (a series' samples are applied in order, so
# its j-th sample sees the state its earlier ones left): numpy, in whole arrays.
# Exactness: the same float operations in the same order per series, so the same columns,
# bit for bit (tests/metrics/test_batched_scan.py compares it with the series-by-series way).

# A plan's births are matched to its rows' samples by a key of (`_created` series, time):
# index * span + (t - the answer's first t). Exact while the keys stay this far below 2**53.
_KEY_LIMIT = 2.0**40


def _count_planned(plan: _Plan, answer: bytes, spans: array[int]) -> npt.NDArray[np.bool_] | None:
    """Count the plan's rows all together: which rows it counted (a row with a sample that
    is not a finite number is left to _count_series and _apply, for their reasons), or None,
    with nothing changed, when the answer is not plain enough for that (a sample that is not
    a pair of numbers' text, a `_created` series not in time order, unusual times)."""
    cols = plan.columns
    if cols is None or not plan.positions:
        return None
    table = np.frombuffer(spans, np.int64).reshape(-1, 4)
    read = _sample_numbers(answer, table[:, 2], table[:, 3])
    if read is None:
        return None  # some sample is not plainly `[t,"v"]`: each series' own check finds which
    per, ts, vs = read
    if not len(ts):
        return None  # no samples: nothing to count
    first = np.zeros(len(per) + 1, np.intp)
    np.cumsum(per, out=first[1:])
    # the `_created` series' samples, by key: which of them, and when
    c_count = per[cols.created]
    c_which = np.repeat(np.arange(len(cols.created)), c_count)
    c_at = _ranges(first[cols.created], c_count)
    t0 = float(ts.min())
    span = float(ts.max()) - t0 + 1.0
    if not math.isfinite(span) or span * (len(cols.created) + 1) > _KEY_LIMIT:
        return None
    c_key = c_which * span + (ts[c_at] - t0)
    if len(c_key) > 1 and not bool((np.diff(c_key) > 0).all()):
        return None  # a `_created` series out of time order, or two samples at one time

    # the rows' columns, gathered from their selectors (one copy of each)
    sels = cols.sels
    offsets = np.zeros(len(sels) + 1, np.intp)
    np.cumsum([len(sel.born) for sel in sels], out=offsets[1:])
    numbers = np.frombuffer(b"".join([sel.numbers.tobytes() for sel in sels]), np.float64)
    numbers = numbers.reshape(-1, 4).copy()
    known = np.frombuffer(b"".join(sel.born for sel in sels), np.uint8).astype(bool)
    at = offsets[cols.sel] + np.frombuffer(plan.slots, np.int64)
    previous, birth_now, total, cursor = (numbers[at, k] for k in range(4))
    born = known[at]
    birth_before = birth_now.copy()
    since = np.array([reg.since for reg in cols.regs], np.float64)[cols.reg]
    floor = np.array([reg.floor for reg in cols.regs], np.float64)[cols.reg]

    positions = np.frombuffer(plan.positions, np.int64)
    r_first, r_count = first[positions], per[positions]
    finite = np.concatenate(([0], np.cumsum(~np.isfinite(vs))))
    done: npt.NDArray[np.bool_] = (finite[r_first + r_count] == finite[r_first]) & cols.alone
    for j in range(int(r_count[done].max(initial=0))):
        rows = np.flatnonzero(done & (r_count > j))
        at_j = r_first[rows] + j
        t, v = ts[at_j], vs[at_j]
        # its birth: the value of its `_created` series' sample at the same time, if any
        which = cols.birth[rows]
        has = np.zeros(len(rows), bool)
        b = np.zeros(len(rows), np.float64)
        asks = np.flatnonzero(which >= 0)
        if len(asks) and len(c_key):
            key = which[asks] * span + (t[asks] - t0)
            found = np.minimum(np.searchsorted(c_key, key), len(c_key) - 1)
            hit = (
                (c_key[found] == key)
                & (c_which[found] == which[asks])
                & (ts[c_at[found]] == t[asks])
            )
            has[asks[hit]] = True
            b[asks[hit]] = vs[c_at[found[hit]]]
        # the rule of _count_series, for these rows' j-th samples
        new = ~((t <= floor[rows]) | (t <= cursor[rows]))
        rows, t, v, b, has = rows[new], t[new], v[new], b[new], has[new]
        cursor[rows] = t
        base = t <= since[rows]
        r = rows[base]
        previous[r] = v[base]
        born[r] = has[base]
        birth_now[r[has[base]]] = b[base][has[base]]
        count = ~base
        r, v, b, has = rows[count], v[count], b[count], has[count]
        was = previous[r]
        reborn = has & born[r] & (b != birth_now[r])
        total[r] += np.where(reborn | (v < was), v, v - was)
        previous[r] = v
        birth_now[r[has]] = b[has]
        born[r[has]] = True

    # written back: each selector's columns whole (a row not counted here is as it was)
    keep = at[done]
    numbers[keep, 0] = previous[done]
    numbers[keep, 1] = np.where(born, birth_now, birth_before)[done]
    numbers[keep, 2] = total[done]
    numbers[keep, 3] = cursor[done]
    known[keep] = born[done]
    flat, flags = numbers.reshape(-1), known.astype(np.uint8)
    for sel, a, z in zip(sels, offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        sel.numbers[:] = array("d", flat[4 * a : 4 * z].tobytes())
        sel.born[:] = flags[a:z].tobytes()
    return done


def _sample_numbers(
    answer: bytes, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """Every series' samples in an answer (`starts`/`ends`: each series' samples text, as
    _scan found it): how many each series has, and all their times and values in order; None
    unless each text is exactly `[t,"v"]`, comma-separated, as _SAMPLE reads it, with times
    and values that float() takes (what is not, each series' own check reports).

    Found and parsed in numpy: _SAMPLE's matches and float() were ~0.9 us a sample, most of
    the counting (issue 13); ~0.2 us here."""
    view = np.frombuffer(answer, np.uint8)
    opens = np.flatnonzero(view == 0x5B)  # [
    owner = np.searchsorted(starts, opens, "right") - 1
    inside = owner >= 0
    inside[inside] = opens[inside] < ends[owner[inside]]
    at, owner = opens[inside], owner[inside]  # each sample's `[`, and its series
    per = np.bincount(owner, minlength=len(starts)).astype(np.intp)
    if not len(at):
        return (per, np.zeros(0), np.zeros(0)) if bool((starts == ends).all()) else None
    quotes = np.flatnonzero(view == 0x22)  # "
    k = np.searchsorted(quotes, at)
    if k[-1] + 1 >= len(quotes) or quotes[k[-1] + 1] + 1 >= len(view):
        return None  # no closing quote, or nothing after it: not a sample
    q1, q2 = quotes[k], quotes[k + 1]  # the value's quotes: a time holds no quote
    after = q2 + 2  # past the sample's `"]`
    last = np.ones(len(at), bool)
    last[:-1] = owner[1:] != owner[:-1]
    nonempty = per > 0
    if not (
        bool((view[q1 - 1] == 0x2C).all())  # `,` before the value
        and bool((view[q2 + 1] == 0x5D).all())  # `]` after it
        and bool((q1 - 1 > at + 1).all())  # a time
        and bool((after[last] == ends[owner[last]]).all())  # the last: its text's end
        and bool((at[1:][~last[:-1]] == after[:-1][~last[:-1]] + 1).all())  # `,[` the next
        and bool((view[after[:-1][~last[:-1]]] == 0x2C).all())
        and bool((at[np.r_[True, last[:-1]]] == starts[nonempty]).all())  # the first: its start
        and bool((starts[~nonempty] == ends[~nonempty]).all())  # no samples: no text
    ):
        return None
    ts = _decimals(answer, view, at + 1, q1 - 1 - (at + 1), times=True)
    vs = _decimals(answer, view, q1 + 1, q2 - q1 - 1, times=False)
    if ts is None or vs is None:
        return None
    return per, ts, vs


_POW10 = np.array([float(10**k) for k in range(16)])  # exact: 10**15 < 2**53
_TIME = re.compile(rb"[0-9.eE+-]+")  # what _SAMPLE takes as a time


def _decimals(
    answer: bytes,
    view: npt.NDArray[np.uint8],
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    *,
    times: bool,
) -> npt.NDArray[np.float64] | None:
    """float() of each text answer[start : start + length], or None where float() (or, for
    `times`, _SAMPLE) would refuse one. A plain decimal (a sign, at most 15 digits, at most
    one point) is its digits as an integer over a power of ten: both exact in a double, so
    the quotient is the decimal correctly rounded, which is float()'s value, bit for bit.
    Any other text (NaN, +Inf, an exponent, more digits) goes to float() itself."""
    n = len(starts)
    width = int(min(max(lengths.max(initial=0), 1), 16))
    cols = np.arange(width)[:, None]
    chars = view[np.minimum(starts[None, :] + cols, len(view) - 1)]  # one row per character
    pad = cols >= lengths[None, :]
    chars[pad] = 0x20  # past the text: ignored; a space inside the text is not
    digits = np.zeros(n, np.int64)
    mantissa = np.zeros(n, np.int64)
    decimals = np.zeros(n, np.int64)
    points = np.zeros(n, np.int64)
    odd = np.zeros(n, bool)
    for c in range(width):
        ch = chars[c]
        digit = ch - np.uint8(0x30)
        is_digit = digit < 10
        mantissa = np.where(is_digit, mantissa * 10 + digit, mantissa)
        digits += is_digit
        decimals += is_digit & (points > 0)
        point = ch == 0x2E
        points += point
        other = ~(is_digit | point | pad[c])
        if c == 0:
            other &= (ch != 0x2D) & (ch != 0x2B)  # a sign
        odd |= other
    plain = ~odd & (points <= 1) & (digits >= 1) & (digits <= 15) & (lengths <= width)
    out: npt.NDArray[np.float64] = mantissa / _POW10[np.minimum(decimals, 15)]
    out[chars[0] == 0x2D] *= -1.0
    for i in np.flatnonzero(~plain).tolist():
        text = answer[int(starts[i]) : int(starts[i] + lengths[i])]
        if (times and _TIME.fullmatch(text) is None) or (not times and b"\\" in text):
            return None
        try:
            out[i] = float(text)
        except ValueError:
            return None
    return out


def _ranges(starts: npt.NDArray[np.intp], counts: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """starts[0] .. starts[0] + counts[0] - 1, then the next range, ...: one array."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.intp)
    begins = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return begins + np.arange(total)


def _targets(
    members: list[tuple[_Registration, _Selector]],
) -> dict[tuple[str, ...], list[tuple[_Registration, _Selector]]]:
    targets: dict[tuple[str, ...], list[tuple[_Registration, _Selector]]] = {}
    for member in members:
        targets.setdefault(member[1].values, []).append(member)
    return targets


def _apply_family_decoded(
    family: _Family, answer: bytes, members: list[tuple[_Registration, _Selector]]
) -> _Failure | None:
    """The general path: any answer json.loads can read (other backends' formatting)."""
    try:
        decoded = json.loads(answer)
        result = decoded["data"]["result"]
        if decoded.get("status") != "success" or decoded["data"].get("resultType") != "matrix":
            raise ValueError(f"not a range vector: {answer[:200]!r}")
    except (ValueError, KeyError, TypeError) as exc:
        return _Failure(False, f"prometheus answered garbage: {exc}"[:500])
    targets = _targets(members)
    created = family.created_name
    births: dict[tuple[str, ...], dict[float, float]] = {}
    counters = []
    for series in result:
        labels = series.get("metric", {})
        if created is not None and labels.get("__name__") == created:
            try:
                births[_identity(labels)] = {float(t): float(v) for t, v in series["values"]}
            except (KeyError, TypeError, ValueError):
                continue  # a broken _created series only costs the extra reset check
        else:
            counters.append(series)
    eq_labels = family.eq_labels
    for series in counters:
        labels = series.get("metric", {})
        found = targets.get(tuple([labels.get(label, "") for label in eq_labels]))
        if not found:
            continue  # another family's combination of values
        try:
            samples = [(float(t), float(v)) for t, v in series.get("values", [])]
        except (TypeError, ValueError) as exc:
            for _, sel in found:
                sel.malformed = f"malformed samples for {sel.text}: {exc}"
            continue
        if not all(isinstance(v, str) for v in labels.values()):
            return _Failure(False, f"prometheus answered garbage: labels {labels!r}"[:500])
        born = births.get(_identity(labels), {}) if births else {}
        key = _key(labels)
        le = labels.get("le")
        for reg, sel in found:
            _apply(sel, key, le, labels, samples, born, since=reg.since, floor=reg.floor)
    return None


# --- a first read from each series' summary (module doc: Summary first reads) ------------------

_PART = "canary_summary_part"  # which part of the summary query a series answers


def _ms_text(t: float) -> str:
    """The latest millisecond at or before `t`, as `@` takes it: a sample at that millisecond
    parses to a float <= t (it is before `t` for the sample-by-sample rule too), one a
    millisecond later to a float > t."""
    ms = math.floor(t * 1000) + 1
    while True:
        text = f"{ms // 1000}.{ms % 1000:03d}"
        if float(text) <= t:
            return text
        ms -= 1


def _summary_query(
    family: _Family, values: Iterable[tuple[str, ...]], *, since: float, floor: float, at: float
) -> str:
    """One instant query (evaluated at `at`) for the summary of each series of `family` these
    values select. Each part is tagged with _PART; functions drop `__name__`, so the tag is
    what keeps the parts' series apart in the union.

    - r: resets over the window, + 0 * the sum of its samples (NaN if any is NaN or infinite)
    - t, v: the last sample's time and value (within Prometheus' lookback delta)
    - bt, bv: the same at `since` (the baseline); bc: how many samples the lookback before
      `since` holds (a baseline that bt cannot see, past the lookback delta or before a
      staleness marker, sends the rollout to the range read)
    - c, ct, cv: the `_created` series' changes, last time and last value

    The windows are whole seconds at least as long as (floor, at] and (floor, since]:
    Prometheus' ranges are closed, so they may hold a sample more than the rule would
    count, which can only make a clean series look unclean, never the other way."""
    values = list(values)  # read twice: the counters' selector and their `_created`'s
    window = math.ceil(at - floor) + 1
    lookback = math.ceil(since - floor) + 1
    at_since = _ms_text(since)
    c = family.selector(values)
    parts = [
        (f"resets({c}[{window}s]) + 0 * sum_over_time({c}[{window}s])", "r"),
        (f"timestamp({c})", "t"),
        (c, "v"),
        (f"timestamp({c} @ {at_since})", "bt"),
        (f"{c} @ {at_since}", "bv"),
        (f"count_over_time({c}[{lookback}s] @ {at_since})", "bc"),
    ]
    if family.created_name is not None:
        cc = family.selector(values, created=True)
        parts += [
            # changes() counts a NaN after a value as a change, and an all-NaN series
            # has a NaN last value (cv): neither needs the sum
            (f"changes({cc}[{window}s])", "c"),
            (f"timestamp({cc})", "ct"),
            (cc, "cv"),
        ]
    return " or ".join(f'label_replace({expr}, "{_PART}", "{tag}", "", "")' for expr, tag in parts)


_Identity = tuple[tuple[str, str], ...]
# a counter's summary: its selectors, labels, last time, last value, baseline (0: none), birth
_Planned = tuple[
    list[tuple[_Registration, _Selector]], dict[str, str], float, float, float, float | None
]


def _summary_parts(answer: bytes) -> dict[str, dict[_Identity, tuple[dict[str, str], float]]]:
    """The answer's series by part and by their labels without `__name__`; ValueError if
    it is not a vector of series with string labels, one per part and labels."""
    decoded = json.loads(answer)
    if decoded.get("status") != "success" or decoded["data"].get("resultType") != "vector":
        raise ValueError("not an instant vector")
    parts: dict[str, dict[_Identity, tuple[dict[str, str], float]]] = {}
    for item in decoded["data"]["result"]:
        labels = item["metric"]
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValueError("labels are not a map of strings")
        tag = labels.pop(_PART)
        identity = tuple([(k, v) for k, v in labels.items() if k != "__name__"])
        table = parts.setdefault(tag, {})
        if identity in table:
            raise ValueError("two series with the same labels in one part")
        table[identity] = (labels, float(item["value"][1]))
    return parts


def _summary_plan(
    family: _Family,
    answer: bytes,
    members: list[tuple[_Registration, _Selector]],
    *,
    floor: float,
) -> list[_Planned] | None:
    """What each counter of `family` counts for these members, from its summary; None if
    any of them needs the range read (a reset, a rebirth, a sample not finite, a part
    missing or unclear)."""
    try:
        parts = _summary_parts(answer)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
    empty: dict[_Identity, tuple[dict[str, str], float]] = {}
    r, t, v, bt, bv, bc, c, ct, cv = (
        parts.get(tag, empty) for tag in ("r", "t", "v", "bt", "bv", "bc", "c", "ct", "cv")
    )
    targets = _targets(members)
    planned: list[_Planned] = []
    for identity in {**r, **t, **v}:
        last_at = t.get(identity)
        if last_at is not None and last_at[1] <= floor:
            continue  # its last sample is before the floor: the rule counts none of it
        resets, last = r.get(identity), v.get(identity)
        if last_at is None or resets is None or last is None:
            return None  # samples in the window but no last one within the lookback delta
        if resets[1] != 0 or not math.isfinite(last[1]):
            return None  # reset, or NaN/Inf somewhere (also for NaN: NaN != 0)
        labels = last[0]
        found = targets.get(tuple([labels.get(label, "") for label in family.eq_labels]))
        if not found:
            continue  # another member's combination of values
        base_at = bt.get(identity)
        baseline = 0.0  # born after since: the rule counts its first value whole
        if base_at is not None and base_at[1] > floor:
            base = bv.get(identity)
            if base is None or not math.isfinite(base[1]):
                return None
            baseline = base[1]
        elif base_at is None and identity in bc:
            return None  # a sample before since that the instant read does not see
        born = None
        if family.created_name is not None:
            birth = tuple([pair for pair in identity if pair[0] != "le"])
            changes = c.get(birth)
            if changes is not None:
                birth_at, birth_value = ct.get(birth), cv.get(birth)
                if (
                    changes[1] != 0
                    or birth_at is None
                    or birth_value is None
                    or birth_at[1] != last_at[1]  # its birth is known at its last sample
                    or not math.isfinite(birth_value[1])
                ):
                    return None
                born = birth_value[1]
        planned.append((found, labels, last_at[1], last[1], baseline, born))
    # the order the range read's answer has them in (by labels), so totals add up alike
    planned.sort(key=lambda p: list(p[1].items()))
    return planned


def _summary_apply(
    reg: _Registration,
    answers: Mapping[_Family, bytes],
    members: Mapping[_Family, list[tuple[_Registration, _Selector]]],
    shown_url: str,
) -> MetricsResult | None:
    """The registration's state and counts from its summaries (in the `prometheus` pool);
    None, with its state untouched, if any family needs the range read."""
    plans = []
    for family, found in members.items():
        plan = _summary_plan(family, answers[family], found, floor=reg.floor)
        if plan is None:
            return None
        plans.append(plan)
    reg.reset()
    for plan in plans:
        for found, labels, last_at, last, baseline, born in plan:
            key, le = _key(labels), labels.get("le")
            for _, sel in found:
                slot = _add_series(sel, key, le, labels)
                i = 4 * slot
                nums = sel.numbers
                nums[i], nums[i + 2], nums[i + 3] = last, last - baseline, last_at
                if born is not None:
                    nums[i + 1], sel.born[slot] = born, 1
    return _counts(reg, {}, shown_url)


# --- carrying the counting state to the next replica ---------------------------------------------
#
# A rollout that moves (a shard taken over, a restart) would otherwise read its series back to
# its analysis' start: ~15 ms of Prometheus' CPU a rollout at 10 minutes, and a thousand of them
# at once when a replica dies. Its record's head keeps its counting state instead (what each
# `_Selector` holds, saved with the record: canary.kubernetes.record_store); the next replica
# takes it up, and its first batch reads from where that state was read through, as any batch
# reads from its last one: the same samples, applied once, by the same rule.

# 2: each selector's numbers as the bytes of little-endian float64s (exact, and packing a
# rollout's ~360 of them as JSON floats cost twice the rest of its carried state, with every
# record write: issue 13's profile)
_CARRY_VERSION = 2
# A rollout's ~90 series carry in ~5 KiB packed; thousands of series do not belong in a
# ConfigMap (such a rollout makes a first read, as before).
MAX_CARRY_CHARS = 128 * 1024


def _oldest_read(reg: _Registration) -> float:
    return min(reg.last_ok.values(), default=reg.at)


def _shape(reg: _Registration, url: str) -> str:
    """What must be the same for a carried state to count on: the Prometheus, the selectors
    as rendered and the settings that change how their series count."""
    q = reg.queries
    selectors = [[s.text, s.buckets] for s in reg.selectors]
    text = json.dumps([url, q.use_created, q.lookback_s, selectors])
    return _blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def _carry_text(reg: _Registration, url: str) -> str | None:
    """The registration's counting state as compact text, or None when it has none to carry
    (not counting yet, a read applying to it now, or a series only a read can explain)."""
    if not (reg.active or reg.carried) or reg.closed or reg.reading:
        return None
    if not isinstance(reg.result, ArmsCounts):
        return None
    sels: list[list[object]] = []
    for sel in reg.selectors:
        if sel.broken or sel.unlabelled or sel.malformed is not None:
            return None
        keys = b"".join(sel.slots)  # in column order: a slot is added with its key
        if len(keys) != _DIGEST * len(sel.les) or len(sel.numbers) != 4 * len(sel.les):
            return None
        if not all(map(math.isfinite, sel.numbers)):
            return None
        sels.append(
            [
                base64.b64encode(keys).decode("ascii"),
                list(sel.les),
                base64.b64encode(_le_bytes(sel.numbers)).decode("ascii"),
                base64.b64encode(bytes(sel.born)).decode("ascii"),
            ]
        )
    state = {
        "v": _CARRY_VERSION,
        "since": reg.since,
        "at": _oldest_read(reg),
        "shape": _shape(reg, url),
        "sels": sels,
    }
    return pack_state(state, max_chars=MAX_CARRY_CHARS)


def _le_bytes(numbers: array[float]) -> bytes:
    """float64s as little-endian bytes, whatever this machine's byte order (_le_numbers)."""
    if sys.byteorder == "little":
        return numbers.tobytes()
    swapped = array("d", numbers)
    swapped.byteswap()
    return swapped.tobytes()


def _le_numbers(raw: bytes) -> array[float]:
    """The float64s _le_bytes gave."""
    numbers = array("d", raw)
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers


def _carried(
    reg: _Registration,
    text: str,
    *,
    url: str,
    now: float,
    tolerance_s: float,
    max_age_s: float,
) -> float | str:
    """Fill `reg` (fresh from _Registration.build) with a carried state: the time its series
    were read through, or why the state cannot be used (`reg` is then left empty)."""
    try:
        state = _carried_state(text)
    except (ValueError, InputError, binascii.Error) as exc:
        return f"unreadable: {exc}"[:300]
    at, since = state.get("at"), state.get("since")
    if state.get("v") != _CARRY_VERSION:
        return f"version {state.get('v')!r}, not {_CARRY_VERSION}"[:300]
    if type(at) not in (int, float) or type(since) not in (int, float):
        return "no read time or no since"
    assert isinstance(at, (int, float)) and isinstance(since, (int, float))
    if not (math.isfinite(at) and math.isfinite(since)):
        return "a read time or since that is not finite"
    if abs(since - reg.since) > tolerance_s:
        return f"counted since {since:.3f}, not since {reg.since:.3f}"
    if state.get("shape") != _shape(reg, url):
        return "counted from another Prometheus, or for other selectors or settings"
    if not now - max_age_s <= at <= now + max_age_s:
        return f"read through {now - at:.0f}s before now (at most {max_age_s:g}s)"
    sels = state.get("sels")
    if not isinstance(sels, list) or len(sels) != len(reg.selectors):
        return "not one state per selector"
    try:
        for sel, saved in zip(reg.selectors, sels, strict=True):
            _fill(sel, saved)
    except (ValueError, TypeError, binascii.Error) as exc:
        reg.reset()
        return f"malformed: {exc}"[:300]
    return float(at)


def _carried_state(text: str) -> dict[str, Any]:
    return unpack_state(text, max_chars=MAX_CARRY_CHARS, source="carried state")


def _fill(sel: _Selector, saved: object) -> None:
    if not isinstance(saved, list) or len(saved) != 4:
        raise ValueError("a selector's state is not [keys, les, numbers, births]")
    keys_b64, les, numbers_b64, born_b64 = saved
    if not all(isinstance(text, str) for text in (keys_b64, numbers_b64, born_b64)):
        raise ValueError("keys, numbers and births must be base64 text")
    keys = base64.b64decode(keys_b64, validate=True)
    raw = base64.b64decode(numbers_b64, validate=True)
    born = base64.b64decode(born_b64, validate=True)
    count = len(born)
    if not isinstance(les, list):
        raise ValueError("les must be a list")
    if len(keys) != _DIGEST * count or len(les) != count or len(raw) != 32 * count:
        raise ValueError("keys, les, numbers and births disagree on the number of series")
    if any(b not in (0, 1) for b in born):
        raise ValueError("a birth flag that is not 0 or 1")
    if not all(le is None or isinstance(le, str) for le in les):
        raise ValueError("an le that is not text")
    numbers = _le_numbers(raw)
    if not all(map(math.isfinite, numbers)):
        raise ValueError("a number that is not finite")
    if sel.buckets and None in les:
        raise ValueError("a bucket series without le")
    slots = {keys[i : i + _DIGEST]: i // _DIGEST for i in range(0, len(keys), _DIGEST)}
    if len(slots) != count:
        raise ValueError("a series twice")
    sel.epoch += 1
    sel.slots = slots
    sel.numbers = numbers
    sel.born = bytearray(born)
    sel.les = [None if le is None else sys.intern(le) for le in les]


class BatchedMetrics:
    """One rollout's MetricsProvider, served by a shared PrometheusBatcher.

    The counts are those PrometheusMetrics would give for the same `since` (cumulative, exact,
    resets counted), as of the batcher's last read, at most `max_age_s` before `now`."""

    def __init__(self, batcher: PrometheusBatcher, queries: PromQueries) -> None:
        self.batcher = batcher
        self.queries = queries
        self._reg: _Registration | None = None

    def __repr__(self) -> str:
        return f"BatchedMetrics({self.batcher.shown_url!r})"

    def close(self) -> None:
        """Leave the batches (idempotent); the batcher's session stays for the others."""
        if self._reg is not None:
            self.batcher._drop(self._reg)
            self._reg = None

    def carry(self) -> str | None:
        """The counting state, as text for the next replica to carry on from (carry_on);
        None when there is none to carry now (a later call may have it)."""
        return None if self._reg is None else _carry_text(self._reg, self.batcher.shown_url)

    def carry_on(self, state: str, *, since: float, now: float) -> str | None:
        """Count on from a state `carry` gave (another replica's, or this process' before a
        restart), instead of reading back to `since`. None when taken, else why not: the
        first fetch then reads back as for any new rollout."""
        if self._reg is not None:
            return "already counting"
        taken = self.batcher._carry_on(self.queries, state, since=since, now=now)
        if isinstance(taken, str):
            return taken
        self._reg = taken
        return None

    async def fetch(self, *, since: float, now: float) -> MetricsResult:
        """Both arms' counts over (since, now]; NoData(reason) when they cannot be had."""
        if not (math.isfinite(since) and math.isfinite(now)):
            raise ValueError(f"since and now must be finite unix times, got {since}, {now}")
        if now < since:
            raise ValueError(f"now ({now}) is before since ({since})")
        reg = self._reg
        if reg is None or abs(reg.since - since) > self.batcher.since_tolerance_s:
            if reg is not None:
                self.batcher._drop(reg)
            reg = self._reg = self.batcher._register(self.queries, since)
        return await self.batcher._answer(reg, now)
