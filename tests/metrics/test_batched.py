"""The batched Prometheus source against a real Prometheus (1 s scrapes) and real exporters
(tests/support/prom.py): the same counts as the per-rollout PrometheusMetrics, one query per
metric family per batch whatever the number of rollouts, resets and late registrations.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import math
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from support.pool import ProcessPool
from support.prom import Env, inc, scraped, scraped_raw, start_env

from canary.demo.procs import free_port
from canary.metrics.base import ArmsCounts, MetricsProvider, MetricsResult, NoData
from canary.metrics.batched import (
    BatchedMetrics,
    PrometheusBatcher,
    _ms_text,
    _parse,
    _Registration,
    _Selector,
    _summary_plan,
)
from canary.metrics.prometheus import PrometheusMetrics, PromQueries

INF = math.inf


@pytest.fixture(scope="module")
def env(
    module_procs: ProcessPool,
    tmp_path_factory: pytest.TempPathFactory,
    prometheus_binary: str,
) -> Iterator[Env]:
    yield start_env(module_procs, tmp_path_factory.mktemp("prometheus"), prometheus_binary)


@pytest.fixture(params=[INF, 0.0], ids=["range-first-reads", "summary-first-reads"])
async def batcher(env: Env, request: pytest.FixtureRequest) -> AsyncIterator[PrometheusBatcher]:
    """Every test of counts runs with each kind of first read: the range read, and the
    summary (which falls back to the range read where a series reset or is not finite)."""
    # period_s small: a fetch after a short wait starts a fresh batch, so reads are current.
    batcher = PrometheusBatcher(
        env.prometheus.url, period_s=0.05, max_age_s=0.05, summary_after_s=request.param
    )
    yield batcher
    await batcher.aclose()


@pytest.fixture
def sfx(batcher: PrometheusBatcher) -> str:
    """A suffix for the versions a test counts: each kind of first read counts its own (the
    exporter and Prometheus are the module's)."""
    return "" if batcher.summary_after_s == INF else "-s"


def state(provider: BatchedMetrics) -> list[dict[bytes, tuple[object, ...]]]:
    """Each selector's series state, without the cursor (reads made a scrape apart differ
    only in that)."""
    assert provider._reg is not None
    return [
        {key: (*series[:4], series[5]) for key, series in sel.counted().items()}
        for sel in provider._reg.selectors
    ]


async def old_counts(env: Env, q: PromQueries, since: float) -> MetricsResult:
    provider = PrometheusMetrics(env.prometheus.url, queries=q)
    try:
        return await provider.fetch(since=since, now=time.time())
    finally:
        provider.close()


async def fresh(provider: BatchedMetrics, since: float) -> MetricsResult:
    await asyncio.sleep(0.1)  # older than period_s: this fetch reads Prometheus again
    return await provider.fetch(since=since, now=time.time())


async def query_requests(env: Env) -> float:
    """Prometheus' own count of the queries it answered, from its /metrics page."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{env.prometheus.url}/metrics") as resp:
            text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("prometheus_http_requests_total{") and 'handler="/api/v1/query"' in line
    )


# --- the same counts as the per-rollout provider -------------------------------------------------


async def test_counts_equal_the_per_rollout_provider(
    env: Env, batcher: PrometheusBatcher, sfx: str
) -> None:
    """Several rollouts on one batcher count exactly what PrometheusMetrics counts for each, at
    the first read and after more traffic (incremental reads), latency buckets included."""
    port = env.exporter_port
    names = tuple(f"same-{x}{sfx}" for x in "abc")
    for name in names:
        await inc(port, f"{name}-p", n=10)  # before `since`: must not count
        await inc(port, f"{name}-c", n=4)
        await scraped(env, f"{name}-p", 10)
        await scraped(env, f"{name}-c", 4)
    since = time.time()
    regex = {
        "errors": 'http_requests_total{version="{arm}",code=~"5[0-9]{2}|(599)",{selector}}',
        "selector": 'job=~"(canary|other)"',
    }
    queries = {
        names[0]: env.queries(names[0]),
        names[1]: env.queries(names[1]),
        names[2]: env.queries(names[2], **regex),  # a family of its own for errors
    }
    providers = {name: batcher.provider(q) for name, q in queries.items()}
    assert all(isinstance(p, MetricsProvider) for p in providers.values())

    async def traffic(scale: int) -> None:
        for i, name in enumerate(names, start=1):
            await inc(port, f"{name}-p", n=5 * scale * i, seconds=0.03)
            await inc(port, f"{name}-p", n=2 * i, code=503, seconds=0.3)  # born after since
            await inc(port, f"{name}-p", n=1, code=404, seconds=0.7)
            await inc(port, f"{name}-c", n=3 * scale, seconds=0.08)

    expected_p = {name: 10 for name in names}
    expected_c = {name: 4 for name in names}
    for scale in (1, 2):
        await traffic(scale)
        for i, name in enumerate(names, start=1):
            expected_p[name] += 5 * scale * i + 2 * i + 1
            expected_c[name] += 3 * scale
            await scraped(env, f"{name}-p", expected_p[name])
            await scraped(env, f"{name}-c", expected_c[name])
        for name, q in queries.items():
            batched = await fresh(providers[name], since)
            assert isinstance(batched, ArmsCounts), batched
            assert batched == await old_counts(env, q, since), name
        first = await providers[names[0]].fetch(since=since, now=time.time())
        assert isinstance(first, ArmsCounts)
        assert first.primary.requests == expected_p[names[0]] - 10
        assert first.primary.errors == 2 * scale
        assert first.canary.latency_buckets[0.1] == expected_c[names[0]] - 4

    for provider in providers.values():
        provider.close()
    assert batcher.registered == 0
    # Prometheus' own answers take the fast path (tests/metrics/test_batched_scan.py checks
    # that it counts what json.loads would)
    assert batcher._series.scanned > 0
    assert batcher._series.decoded == 0


async def test_counter_reset_is_counted_as_the_per_rollout_provider_counts_it(
    env: Env, batcher: PrometheusBatcher, sfx: str, tmp_path: Path
) -> None:
    """A restarted exporter (counters back to 0) is a reset, by the drop or by the changed
    `_created` time: the batched counts equal PrometheusMetrics', with and without `_created`."""
    port = env.spare_port
    pool = ProcessPool(tmp_path)
    try:
        exporter = pool.support_server("exporter", port)
        q = env.queries(f"breset{sfx}")
        blind_q = q.model_copy(update={"use_created": False})
        await inc(port, f"breset{sfx}-p", n=5)
        await inc(port, f"breset{sfx}-c", n=2)
        await scraped(env, f"breset{sfx}-p", 5)
        await scraped(env, f"breset{sfx}-c", 2)
        since = time.time()
        await inc(port, f"breset{sfx}-p", n=6)
        await inc(port, f"breset{sfx}-c", n=5)
        await scraped(env, f"breset{sfx}-p", 11)
        await scraped(env, f"breset{sfx}-c", 7)
        provider, blind = batcher.provider(q), batcher.provider(blind_q)
        before = await fresh(provider, since)
        assert isinstance(before, ArmsCounts), before
        assert (before.primary.requests, before.canary.requests) == (6, 5)
        assert isinstance(await blind.fetch(since=since, now=time.time()), ArmsCounts)

        # The primary's new total stays below its old one (a drop); the canary's climbs past
        # it (10 > 7) before a batch reads it, which only the changed `_created` reveals.
        pool.stop(exporter)
        pool.support_server("exporter", port)
        await inc(port, f"breset{sfx}-p", n=4)
        await inc(port, f"breset{sfx}-c", n=10)
        await scraped(env, f"breset{sfx}-p", 4)
        await scraped(env, f"breset{sfx}-c", 10)
        after = await fresh(provider, since)
        assert isinstance(after, ArmsCounts), after
        assert (after.primary.requests, after.canary.requests) == (6 + 4, 5 + 10)
        assert after.canary.latency_buckets[INF] == 15
        assert after == await old_counts(env, q, since)

        drops_only = await fresh(blind, since)
        assert isinstance(drops_only, ArmsCounts), drops_only
        assert (drops_only.primary.requests, drops_only.canary.requests) == (6 + 4, 5 + 3)
        assert drops_only == await old_counts(env, blind_q, since)

        # Rollouts resumed now read back across the restart: the summary sees the resets
        # (the drop, and the canary's new `_created`) and leaves them to the range read.
        fallbacks = batcher.summary_fallbacks
        for queries, counted in ((q, after), (blind_q, drops_only)):
            resumed = batcher.provider(queries)
            assert await resumed.fetch(since=since, now=time.time()) == counted
        if batcher.summary_after_s == 0:
            assert batcher.summary_fallbacks == fallbacks + 2
    finally:
        pool.stop_all()


async def test_a_carried_state_counts_on_as_the_replica_that_read_it_would(
    env: Env, tmp_path: Path
) -> None:
    """A rollout moved to another replica takes up the counting state its record carries
    (`carry` -> `carry_on`): no read back to its `since`, its first batch reads from where
    the state was read through, and it counts what the replica that read it counts: on from
    the carried values (the primary's exporter runs on), across a restart after the state
    was taken (the canary's: its drop is only seen from the carried value) and a series born
    meanwhile."""
    main, spare = env.exporter_port, env.spare_port
    pool = ProcessPool(tmp_path)
    old = PrometheusBatcher(env.prometheus.url, period_s=0.05, max_age_s=0.05)
    new = PrometheusBatcher(env.prometheus.url, period_s=0.05, max_age_s=0.05)
    try:
        exporter = pool.support_server("exporter", spare)
        q = env.queries("carry")
        await inc(main, "carry-p", n=5)
        await inc(spare, "carry-c", n=2)
        await scraped(env, "carry-p", 5)
        await scraped(env, "carry-c", 2)
        since = time.time()
        await inc(main, "carry-p", n=6)
        await inc(spare, "carry-c", n=5, code=500)
        await scraped(env, "carry-p", 11)
        await scraped(env, "carry-c", 7)
        before = old.provider(q)
        counted = await fresh(before, since)
        assert isinstance(counted, ArmsCounts), counted
        assert (counted.primary.requests, counted.canary.errors) == (6, 5)
        text = before.carry()
        assert text is not None and len(text) < 4096, text

        # After the state was taken: the canary's exporter restarts (its counters back to
        # 0), and traffic goes on.
        pool.stop(exporter)
        pool.support_server("exporter", spare)
        await inc(main, "carry-p", n=4)
        await inc(spare, "carry-c", n=3)
        await inc(spare, "carry-c", n=1, code=503)  # a series born after the state
        await scraped(env, "carry-p", 15)
        await scraped(env, "carry-c", 4)

        moved = new.provider(q)
        assert moved.carry_on(text, since=since, now=time.time()) is None
        assert (new.carried, new.carry_refused) == (1, 0)
        # Answered from the carried counts until a batch reads (none is due within the
        # state's age here: the fetch waits for one).
        result = await moved.fetch(since=since, now=time.time())
        assert isinstance(result, ArmsCounts), result
        # a catch-up read from where the state was read through, not a read back
        assert new.queries_sent == 3 and (new.catch_ups, new.batches) == (1, 0)
        assert (result.primary.requests, result.canary.requests) == (6 + 4, 5 + 4)
        assert (result.canary.errors, result.canary.latency_buckets[INF]) == (5 + 1, 9)
        assert result == await fresh(before, since) == await old_counts(env, q, since)
        assert state(moved) == state(before)
        assert moved.carry_on(text, since=since, now=time.time()) == "already counting"
    finally:
        await old.aclose()
        await new.aclose()
        pool.stop_all()


async def test_carried_rollouts_catch_up_together_without_the_batch_of_the_others(
    env: Env,
) -> None:
    """Rollouts that carried their state on (a shard taken over) are caught up by reads of
    their own series, `rollouts_per_read` at a time (2 here), from where their states were
    read through: not by the next batch of every rollout the replica already had (which a
    moved rollout waited for, twice, before its first tick). Then they join the batches.
    Counts as the per-rollout provider's."""
    port = env.exporter_port
    names = [f"catch{i}" for i in range(3)]
    everyone = [*names, "resident"]
    for name in everyone:
        await inc(port, f"{name}-p", n=2)
        await inc(port, f"{name}-c", n=1)
    for name in everyone:  # one scrape sees them all: waits only for the first
        await scraped(env, f"{name}-c", 1)
    since = time.time()
    for name in everyone:
        await inc(port, f"{name}-p", n=3)
    for name in everyone:
        await scraped(env, f"{name}-p", 5)
    old = PrometheusBatcher(env.prometheus.url, period_s=0.05, max_age_s=0.05)
    new = PrometheusBatcher(env.prometheus.url, period_s=0.05, max_age_s=0.05, rollouts_per_read=2)
    sent: list[str] = []
    post = new._post

    async def spy(query: str, at: float) -> bytes | object:
        sent.append(query)
        return await post(query, at)

    new._post = spy  # type: ignore[method-assign,assignment]
    try:
        texts = []
        for name in names:
            before = old.provider(env.queries(name))
            assert isinstance(await before.fetch(since=since, now=time.time()), ArmsCounts)
            text = before.carry()
            assert text is not None
            texts.append(text)
        resident = new.provider(env.queries("resident"))
        assert isinstance(await resident.fetch(since=since, now=time.time()), ArmsCounts)
        batches, queries = new.batches, new.queries_sent
        sent.clear()
        for name in names:  # traffic after the states were read through
            await inc(port, f"{name}-p", n=4)
            await inc(port, f"{name}-c", n=2, code=500)
        for name in names:
            await scraped(env, f"{name}-p", 9)
            await scraped(env, f"{name}-c", 3)
        moved = [new.provider(env.queries(name)) for name in names]
        for provider, text in zip(moved, texts, strict=True):
            assert provider.carry_on(text, since=since, now=time.time()) is None
            assert provider.carry() == text  # carried on again before its first read
        results = await asyncio.gather(*(m.fetch(since=since, now=time.time()) for m in moved))
        # two group reads (a query per family each), no batch, the resident unread
        assert new.catch_ups == 2 and new.batches == batches
        assert new.queries_sent - queries == 6 == len(sent)
        named = [{n for n in names if f"{n}-c" in q} for q in sent]
        assert all(1 <= len(group) <= 2 for group in named), sent
        assert set().union(*named) == set(names), sent
        assert not any("resident" in q for q in sent), sent
        for name, result in zip(names, results, strict=True):
            assert isinstance(result, ArmsCounts), result
            assert (result.primary.requests, result.canary.requests) == (3 + 4, 2)
            assert result.canary.errors == 2
            assert result == await old_counts(env, env.queries(name), since)
        # then they are read with the others, by the batches
        assert new.registered == 4
        await asyncio.sleep(0.1)
        await moved[0].fetch(since=since, now=time.time())
        assert new.batches == batches + 1
        together = [q for q in sent[6:] if "resident-p" in q]
        assert any(f"{n}-p" in q for q in together for n in names), sent
    finally:
        await old.aclose()
        await new.aclose()


async def test_a_carried_state_that_does_not_fit_is_refused_by_name(env: Env) -> None:
    """Another since, other selectors, another Prometheus, too old, tampered or garbage:
    refused with the reason, and the rollout then reads back to its since as any new one
    (same counts)."""
    port = env.exporter_port
    q = env.queries("refuse")
    await inc(port, "refuse-p", n=3)
    await inc(port, "refuse-c", n=2)
    await scraped(env, "refuse-c", 2)
    since = time.time() - 30
    batcher = PrometheusBatcher(env.prometheus.url, period_s=0.05, max_age_s=0.05)
    try:
        provider = batcher.provider(q)
        counted = await provider.fetch(since=since, now=time.time())
        assert isinstance(counted, ArmsCounts), counted
        text = provider.carry()
        assert text is not None
        now = time.time()
        payload = json.loads(gzip.decompress(base64.b64decode(text)))

        def packed(change: dict[str, object]) -> str:
            return base64.b64encode(
                gzip.compress(json.dumps({**payload, **change}).encode())
            ).decode()

        nan_numbers = [list(s) for s in payload["sels"]]
        numbers = base64.b64decode(nan_numbers[0][2])  # little-endian float64s
        nan_numbers[0][2] = base64.b64encode(struct.pack("<d", math.nan) + numbers[8:]).decode()
        cases = {
            "counted since": (text, since + 5, now, q),
            "other selectors": (text, since, now, env.queries("refuse-other")),
            "before now": (text, since, now + 3600, q),
            "unreadable": ("not base64 at all!", since, now, q),
            "version": (packed({"v": 1}), since, now, q),  # v1: numbers as JSON floats
            "malformed": (packed({"sels": nan_numbers}), since, now, q),
            "not one state per selector": (packed({"sels": payload["sels"][:1]}), since, now, q),
        }
        for why, (state_text, at_since, at_now, queries) in cases.items():
            other = batcher.provider(queries)
            reason = other.carry_on(state_text, since=at_since, now=at_now)
            assert reason is not None and why in reason, (why, reason)
            assert other._reg is None
        assert batcher.carried == 0 and batcher.carry_refused == len(cases)
        elsewhere = PrometheusBatcher("http://127.0.0.1:9")  # no I/O: refused before any read
        try:
            reason = elsewhere.provider(q).carry_on(text, since=since, now=now)
            assert reason is not None and "another Prometheus" in reason, reason
        finally:
            await elsewhere.aclose()
        # refused, it reads back to its since as a new rollout does
        again = batcher.provider(q)
        assert again.carry_on("garbage", since=since, now=now) is not None
        assert await again.fetch(since=since, now=time.time()) == await fresh(provider, since)
    finally:
        await batcher.aclose()


async def test_a_late_registration_counts_from_its_own_since(
    env: Env, batcher: PrometheusBatcher, sfx: str
) -> None:
    """A rollout that registers (or resumes) mid-way counts everything since its `since` from
    one read back to it, then follows the batches; an earlier rollout is unaffected."""
    port = env.exporter_port
    early_q, late_q = env.queries(f"early{sfx}"), env.queries(f"late{sfx}")
    for version in (f"early{sfx}-p", f"early{sfx}-c", f"late{sfx}-p", f"late{sfx}-c"):
        await inc(port, version, n=3)
    await scraped(env, f"late{sfx}-c", 3)
    await scraped(env, f"early{sfx}-c", 3)
    since = time.time()
    early = batcher.provider(early_q)
    assert isinstance(await early.fetch(since=since, now=time.time()), ArmsCounts)

    for version in (f"early{sfx}-p", f"early{sfx}-c", f"late{sfx}-p", f"late{sfx}-c"):
        await inc(port, version, n=7)
    await inc(port, f"late{sfx}-c", n=2, code=500)
    await scraped(env, f"late{sfx}-c", 12)
    await scraped(env, f"early{sfx}-c", 10)
    # The late rollout registers now, with a `since` from before this traffic (a resume).
    await fresh(early, since)
    queries_before = batcher.queries_sent
    late = batcher.provider(late_q)
    first = await late.fetch(since=since, now=time.time())
    assert batcher.queries_sent - queries_before == 3  # its own read back: one per family
    assert isinstance(first, ArmsCounts), first
    assert (first.primary.requests, first.canary.requests, first.canary.errors) == (7, 9, 2)
    assert first == await old_counts(env, late_q, since)
    # the summary served it (nothing reset), and left each series as the range read does
    summary = batcher.summary_after_s == 0
    assert (batcher.summary_reads, batcher.summary_fallbacks) == ((2, 0) if summary else (0, 0))
    reference = PrometheusBatcher(env.prometheus.url, summary_after_s=INF)
    try:
        ranged = reference.provider(late_q)
        assert await ranged.fetch(since=since, now=time.time()) == first
        assert state(ranged) == state(late)
        assert reference.summary_reads == 0
    finally:
        await reference.aclose()

    await inc(port, f"late{sfx}-p", n=4)
    await inc(port, f"early{sfx}-p", n=1)
    await scraped(env, f"late{sfx}-p", 14)
    await scraped(env, f"early{sfx}-p", 11)
    late_now, early_now = await fresh(late, since), await early.fetch(since=since, now=time.time())
    assert isinstance(late_now, ArmsCounts) and isinstance(early_now, ArmsCounts)
    assert late_now.primary.requests == 11 and early_now.primary.requests == 8
    assert late_now == await old_counts(env, late_q, since)
    assert early_now == await old_counts(env, early_q, since)

    # A new `since` (a new analysis) is a new registration with its own baseline.
    again = time.time()
    await asyncio.sleep(1.5)
    restarted = await late.fetch(since=again, now=time.time())
    assert isinstance(restarted, ArmsCounts), restarted
    assert restarted.primary.requests == 0


# --- one query per family per batch --------------------------------------------------------------


@pytest.mark.parametrize("per_read", [200, 8])
async def test_n_rollouts_cost_one_query_per_family_per_batch(env: Env, per_read: int) -> None:
    """Twenty rollouts on one template: after their first reads, a batch is three queries
    (requests, errors, latency buckets) as Prometheus itself counts them, not 6 x 20; read
    `per_read` rollouts at a time (to bound the decoded answers' memory), three per group,
    with the same counts."""
    port = env.exporter_port
    names = [f"many{i}" for i in range(20)]
    for name in names:
        await inc(port, f"{name}-p", n=1)
        await inc(port, f"{name}-c", n=1)
    await scraped(env, f"{names[-1]}-c", 1)
    batcher = PrometheusBatcher(
        env.prometheus.url, period_s=1.0, max_age_s=1.0, rollouts_per_read=per_read
    )
    groups = -(-len(names) // per_read)
    try:
        since = time.time() - 5
        providers = [batcher.provider(env.queries(name)) for name in names]
        first = await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))
        assert all(isinstance(r, ArmsCounts) for r in first), first
        assert batcher.queries_sent == 3 * len(names)  # each registration's own read back

        await asyncio.sleep(1.2)  # every result is now older than the period
        before = await query_requests(env)
        sent = batcher.queries_sent
        results = await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))
        after = await query_requests(env)
        assert all(isinstance(r, ArmsCounts) for r in results), results
        assert batcher.queries_sent - sent == 3 * groups
        assert after - before == 3 * groups
        assert batcher.batches == 1

        # Within the period, fetches are answered from that batch: no query at all.
        again = await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))
        assert again == results and batcher.queries_sent - sent == 3 * groups
    finally:
        await batcher.aclose()


class Timings:
    """canary.metrics.base.MetricsTimings, recorded."""

    def __init__(self) -> None:
        self.queries: list[float] = []
        self.batches: list[float] = []
        self.waits: list[float] = []

    def metrics_query(self, seconds: float) -> None:
        self.queries.append(seconds)

    def metrics_batch(self, seconds: float) -> None:
        self.batches.append(seconds)

    def metrics_wait(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_a_batch_asks_for_the_next_group_while_it_counts_one(env: Env) -> None:
    """Three groups of four rollouts, each group's counting made slow (0.3 s): the next
    group's queries go out while a group is counted, so the batch takes about the three
    countings, not the three countings plus three reads; the counts are those of one read
    of all twelve, each group's as of its own read. The timings (/metrics) see every query,
    the batch and every fetch."""
    port = env.exporter_port
    names = [f"pipe{i}" for i in range(12)]
    for i, name in enumerate(names):
        await inc(port, f"{name}-p", n=1 + i)
        await inc(port, f"{name}-c", n=1)
    await scraped(env, f"{names[-1]}-c", 1)
    timings = Timings()
    batcher = PrometheusBatcher(
        env.prometheus.url, period_s=1.0, max_age_s=1.0, rollouts_per_read=4, timings=timings
    )
    whole = PrometheusBatcher(env.prometheus.url, period_s=1.0, max_age_s=1.0)
    events: list[tuple[str, float]] = []
    count, post = batcher._count, batcher._post

    async def slow_count(*args: object) -> object:
        events.append(("count", time.monotonic()))
        await asyncio.sleep(0.3)
        try:
            return await count(*args)  # type: ignore[arg-type]
        finally:
            events.append(("counted", time.monotonic()))

    async def posted(query: str, at: float) -> object:
        events.append(("post", time.monotonic()))
        return await post(query, at)

    try:
        since = time.time() - 5
        providers = [batcher.provider(env.queries(name)) for name in names]
        first = await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))
        assert all(isinstance(r, ArmsCounts) for r in first), first
        assert len(timings.waits) == 12 and len(timings.queries) == batcher.queries_sent
        assert timings.batches == []  # first reads are not batches

        batcher._count = slow_count  # type: ignore[assignment,method-assign]
        batcher._post = posted  # type: ignore[assignment,method-assign]
        await asyncio.sleep(1.2)  # every result is now older than the period
        began = time.monotonic()
        results = await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))
        took = time.monotonic() - began
        assert all(isinstance(r, ArmsCounts) for r in results), results
        assert batcher.batches == 1 and len(timings.batches) == 1
        assert timings.batches[0] <= took + 0.01
        assert len(timings.queries) == batcher.queries_sent
        assert len(timings.waits) == 24 and max(timings.waits) >= 0.9  # they waited for it

        # each group after the first was asked for before the group before it was counted
        kinds = [kind for kind, _ in events]
        assert kinds.count("count") == 3 and kinds.count("post") == 9, kinds
        count_at = [t for kind, t in events if kind == "count"]
        counted_at = [t for kind, t in events if kind == "counted"]
        posts = [t for kind, t in events if kind == "post"]
        assert posts[3] < counted_at[0] and posts[6] < counted_at[1], events
        # ... and not before it had the group before's answers (one group's answers wait)
        assert posts[3] > count_at[0] and posts[6] > count_at[1], events
        # each group's counts are as of when its queries went out, not the batch's start
        read_at = sorted({p._reg.at for p in providers if p._reg is not None})
        assert len(read_at) == 3 and read_at[2] - read_at[0] >= 0.3, read_at

        others = [whole.provider(env.queries(name)) for name in names]
        now = time.time()
        expected = await asyncio.gather(*(p.fetch(since=since, now=now) for p in others))
        assert (
            [r.primary.requests for r in results]
            == [  # type: ignore[union-attr]
                r.primary.requests
                for r in expected  # type: ignore[union-attr]
            ]
            == [float(1 + i) for i in range(12)]
        )
    finally:
        await batcher.aclose()
        await whole.aclose()


# --- no data -------------------------------------------------------------------------------------


async def test_no_data_reasons_are_those_of_the_per_rollout_provider(
    env: Env, batcher: PrometheusBatcher, sfx: str
) -> None:
    """No such series, a query Prometheus refuses, NaN samples: NoData with the same reasons,
    and a broken rollout does not break the others in its batch."""
    now = time.time()
    nobody = await batcher.provider(env.queries(f"nobody{sfx}")).fetch(since=now - 30, now=now)
    assert isinstance(nobody, NoData)
    assert nobody.reason.startswith("empty result") and f'version="nobody{sfx}-p"' in nobody.reason

    bad = PromQueries(requests='http_requests_total{version="{arm}",=oops}')
    refused = await batcher.provider(bad).fetch(since=now - 10, now=now)
    assert isinstance(refused, NoData)
    assert "prometheus error" in refused.reason
    assert "400" in refused.reason and "parse error" in refused.reason

    nan_q = PromQueries(
        requests='broken_requests_total{version="{arm}"}',
        errors='broken_requests_total{version="{arm}",code=~"5.."}',
        latency_buckets=None,
    )
    await scraped_raw(env, 'broken_requests_total{version="primary"}')
    nan = await batcher.provider(nan_q).fetch(since=now - 5, now=time.time())
    assert isinstance(nan, NoData)
    assert "NaN" in nan.reason and "broken_requests_total" in nan.reason

    await inc(env.exporter_port, f"fine{sfx}-p", n=2)
    await inc(env.exporter_port, f"fine{sfx}-c", n=2)
    await scraped(env, f"fine{sfx}-c", 2)
    fine = batcher.provider(env.queries(f"fine{sfx}"))
    assert isinstance(await fresh(fine, now - 60), ArmsCounts)


async def test_unreachable_prometheus_is_no_data_without_credentials() -> None:
    """Nothing listening: NoData saying Prometheus is unreachable, the URL's password hidden."""
    port = free_port()
    batcher = PrometheusBatcher(f"http://alice:s3cret@127.0.0.1:{port}", timeout_s=2)
    try:
        now = time.time()
        result = await batcher.provider().fetch(since=now - 10, now=now)
        assert isinstance(result, NoData)
        assert result.reason.startswith(f"prometheus unreachable at http://***@127.0.0.1:{port}")
        assert "s3cret" not in result.reason and "s3cret" not in repr(batcher)
    finally:
        await batcher.aclose()


# --- families ------------------------------------------------------------------------------------


def test_selectors_of_one_template_share_a_family() -> None:
    """Rollouts and arms differ only by equality values; other matchers make another family;
    a selector that does not parse is queried as written, alone."""
    a, a_values = _parse('m_total{namespace="x",service="web-primary",}', created=True)
    b, b_values = _parse('m_total{service="api-canary", namespace="y"}', created=True)
    errors, _ = _parse('m_total{namespace="x",service="web-primary",code=~"5.."}', created=True)
    odd, _ = _parse('m_total{service="web",=oops}', created=True)
    assert a == b and (a_values, b_values) == (("x", "web-primary"), ("y", "api-canary"))
    assert errors != a and odd.name is None
    query = a.query([a_values, b_values, ("x", "web-canary")], 12)
    assert query == (
        '{__name__=~"m_total|m_created",namespace=~"x|y",'
        'service=~"api-canary|web-canary|web-primary"}[12s]'
    )
    dotted, values = _parse('m{service="a.b"}', created=False)
    assert dotted.query([values, ("c",)], 5) == 'm{service=~"a\\\\.b|c"}[5s]'
    assert odd.query([()], 3) == 'm_total{service="web",=oops}[3s]'


async def test_rollouts_that_stop_asking_leave_the_batches(env: Env) -> None:
    """A rollout that has not fetched for idle_s is not read by the next batch; when it asks
    again it registers again and still counts from its own `since`."""
    port = env.exporter_port
    for version in ("idle-p", "idle-c", "busy-p", "busy-c"):
        await inc(port, version, n=2)
    await scraped(env, "busy-c", 2)
    await scraped(env, "idle-c", 2)
    batcher = PrometheusBatcher(env.prometheus.url, period_s=0.05, max_age_s=0.05, idle_s=0.5)
    try:
        since = time.time() - 30
        idle, busy = batcher.provider(env.queries("idle")), batcher.provider(env.queries("busy"))
        assert isinstance(await idle.fetch(since=since, now=time.time()), ArmsCounts)
        assert isinstance(await busy.fetch(since=since, now=time.time()), ArmsCounts)
        assert batcher.registered == 2
        await asyncio.sleep(0.7)
        assert isinstance(await fresh(busy, since), ArmsCounts)  # a batch, without `idle`
        assert batcher.registered == 1
        await inc(port, "idle-p", n=5)
        await scraped(env, "idle-p", 7)
        back = await idle.fetch(since=since, now=time.time())
        assert isinstance(back, ArmsCounts), back
        assert back == await old_counts(env, env.queries("idle"), since)
        assert back.primary.requests == 7 and batcher.registered == 2
    finally:
        await batcher.aclose()


async def test_redirects_are_not_followed_and_answers_are_bounded() -> None:
    """A Prometheus URL that redirects, or answers more than max_response_bytes, is NoData
    saying so; the redirect's target is never asked."""
    from aiohttp import web

    asked: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        asked.append(request.path)
        raise web.HTTPFound("/elsewhere/api/v1/query")

    async def huge(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(body=b"x" * 300_000, content_type="application/json")

    app = web.Application()
    app.router.add_post("/moved/api/v1/query", redirect)
    app.router.add_post("/big/api/v1/query", huge)
    app.router.add_route("*", "/elsewhere/api/v1/query", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        now = time.time()
        moved = PrometheusBatcher(f"http://127.0.0.1:{port}/moved")
        big = PrometheusBatcher(f"http://127.0.0.1:{port}/big", max_response_bytes=100_000)
        try:
            result = await moved.provider().fetch(since=now - 10, now=now)
            assert isinstance(result, NoData) and "redirects are not followed" in result.reason
            assert "/elsewhere/api/v1/query" not in asked
            result = await big.provider().fetch(since=now - 10, now=now)
            assert isinstance(result, NoData)
            assert "answer larger than 100000 bytes" in result.reason
        finally:
            await moved.aclose()
            await big.aclose()
    finally:
        await runner.cleanup()


async def test_a_stale_tick_does_not_wait_for_the_batch_it_starts(env: Env) -> None:
    """Counts older than the period but within max_age_s are returned at once while a batch
    reads new ones in the background; the next fetch has them."""
    port = env.exporter_port
    await inc(port, "stale-p", n=1)
    await inc(port, "stale-c", n=1)
    await scraped(env, "stale-c", 1)
    batcher = PrometheusBatcher(env.prometheus.url, period_s=0.3, max_age_s=60)
    try:
        since = time.time() - 30
        provider = batcher.provider(env.queries("stale"))
        first = await provider.fetch(since=since, now=time.time())
        assert isinstance(first, ArmsCounts), first
        await inc(port, "stale-p", n=4)
        await scraped(env, "stale-p", 5)
        await asyncio.sleep(0.4)
        assert await provider.fetch(since=since, now=time.time()) is first  # no wait
        inflight = batcher._inflight
        assert inflight is not None and not inflight.done()
        await inflight
        assert batcher.batches == 1
        later = await provider.fetch(since=since, now=time.time())
        assert isinstance(later, ArmsCounts), later
        assert later.primary.requests == first.primary.requests + 4
    finally:
        await batcher.aclose()


async def test_range_first_reads_are_bounded(env: Env) -> None:
    """Rollouts registering at once (a shard's, resumed on another replica) read back at most
    connections // 2 at a time: each holds its answers until they are applied."""
    port = env.exporter_port
    await inc(port, "bound-p", n=1)
    await inc(port, "bound-c", n=1)
    await scraped(env, "bound-c", 1)
    batcher = PrometheusBatcher(env.prometheus.url, connections=4, summary_after_s=INF)
    reading, most = 0, 0
    read = batcher._read

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal reading, most
        reading += 1
        most = max(most, reading)
        try:
            await asyncio.sleep(0.05)  # long enough for every registration to be waiting
            return await read(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            reading -= 1

    batcher._read = counted  # type: ignore[assignment,method-assign]
    try:
        since = time.time() - 5
        providers = [batcher.provider(env.queries("bound")) for _ in range(10)]
        results = await asyncio.gather(*(p.fetch(since=since, now=time.time()) for p in providers))
        assert all(isinstance(r, ArmsCounts) for r in results), results[:2]
        assert most == 2, most
    finally:
        await batcher.aclose()


# --- summary first reads: the rules that send a rollout to the range read ------------------------


def test_ms_text_is_the_last_millisecond_at_or_before() -> None:
    for t in (1796123737.64, 1796123737.6405, 1796123737.6399999, 1.0, 1796123737.0):
        text = _ms_text(t)
        ms = round(float(text) * 1000)
        assert float(text) <= t < float(f"{(ms + 1) // 1000}.{(ms + 1) % 1000:03d}"), t


def summary_answer(*rows: tuple[str, dict[str, str], float]) -> bytes:
    result: list[dict[str, object]] = [
        {"metric": {"canary_summary_part": tag, **labels}, "value": [1000.0, repr(value)]}
        for tag, labels, value in rows
    ]
    return json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": result}}
    ).encode()


def test_summary_plan_counts_clean_series_and_refuses_unclear_ones() -> None:
    """From the summary alone: last - baseline for a clean series, last for one born after
    since, nothing for one gone before the floor; the range read (None) for a baseline the
    instant read cannot see, a birth not known at the last sample, a reset, a NaN."""
    family, values = _parse('m_total{service="a"}', created=True)
    sel = _Selector('m_total{service="a"}', family, values)
    members = [(_Registration.build(PromQueries(), 900.0), sel)]
    a, b = {"service": "a", "x": "1"}, {"service": "a", "x": "2"}
    name = {"__name__": "m_total"}
    clean = [
        ("r", a, 0),
        ("t", a, 999.5),
        ("v", {**name, **a}, 30),
        ("bt", a, 899.0),
        ("bv", {**name, **a}, 10),
        ("bc", a, 3),
        ("c", a, 0),
        ("ct", a, 999.5),
        ("cv", {"__name__": "m_created", **a}, 5.0),
        ("r", b, 0),
        ("t", b, 999.5),
        ("v", {**name, **b}, 7),  # born after since
    ]
    plan = _summary_plan(family, summary_answer(*clean), members, floor=600.0)
    assert plan is not None
    assert [(p[1]["x"], p[2], p[3] - p[4], p[5]) for p in plan] == [
        ("1", 999.5, 20, 5.0),
        ("2", 999.5, 7, None),
    ]
    gone = [("r", b, 0), ("t", b, 550.0), ("v", {**name, **b}, 7)]  # last sample <= floor
    assert _summary_plan(family, summary_answer(*gone), members, floor=600.0) == []

    def without(tag: str, labels: dict[str, str]) -> list[tuple[str, dict[str, str], float]]:
        return [row for row in clean if not (row[0] == tag and row[1] is labels)]

    def changed(tag: str, value: float) -> list[tuple[str, dict[str, str], float]]:
        return [
            (t, labels, value if t == tag and labels.get("x") == "1" else v)
            for t, labels, v in clean
        ]

    for unclear in (
        without("bt", a),  # samples before since, but no baseline the instant read sees
        without("t", a),  # samples in the window, none within the lookback delta
        changed("ct", 998.5),  # its birth is not known at its last sample
        changed("c", 1),  # reborn
        changed("r", 1),  # reset
        changed("r", math.nan),  # a NaN sample
        changed("bv", math.inf),
    ):
        assert _summary_plan(family, summary_answer(*unclear), members, floor=600.0) is None
    assert _summary_plan(family, b"not json", members, floor=600.0) is None
