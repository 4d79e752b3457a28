"""PrometheusMetrics against a real Prometheus (1 s scrapes) and a real exporter we drive
(tests/support/prom.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.pool import ProcessPool
from support.prom import Env, inc, scraped, scraped_raw, start_env

from canary.demo.procs import free_port
from canary.metrics.prometheus import (
    ArmsCounts,
    MetricsProvider,
    NoData,
    PrometheusMetrics,
    PromQueries,
)

INF = math.inf


@pytest.fixture(scope="module")
def env(
    module_procs: ProcessPool,
    tmp_path_factory: pytest.TempPathFactory,
    prometheus_binary: str,
) -> Iterator[Env]:
    yield start_env(module_procs, tmp_path_factory.mktemp("prometheus"), prometheus_binary)


# --- exact counts -----------------------------------------------------------------------------


async def test_counts_since_are_exact(env: Env) -> None:
    """Requests, 5xx errors and le buckets since `since` are the exact increments made."""
    port, q = env.exporter_port, env.queries("exact")
    await inc(port, "exact-p", n=10)  # before `since`: must not count
    await inc(port, "exact-c", n=4)
    await scraped(env, "exact-p", 10)
    await scraped(env, "exact-c", 4)
    since = time.time()

    await inc(port, "exact-p", n=5, seconds=0.03)
    await inc(port, "exact-p", n=2, code=503, seconds=0.3)  # a series born after `since`
    await inc(port, "exact-p", n=1, code=404, seconds=0.7)  # 4xx is not an error
    await inc(port, "exact-c", n=3, seconds=0.08)
    await scraped(env, "exact-p", 18)
    await scraped(env, "exact-c", 7)

    provider = PrometheusMetrics(env.prometheus.url, queries=q)
    assert isinstance(provider, MetricsProvider)
    result = await provider.fetch(since=since, now=time.time())
    assert isinstance(result, ArmsCounts), result
    assert result.primary.requests == 8
    assert result.primary.errors == 2
    assert result.primary.latency_buckets == {0.05: 5, 0.1: 5, 0.5: 7, 1.0: 8, INF: 8}
    assert result.canary.requests == 3
    assert result.canary.errors == 0  # no 5xx series at all is zero errors, not "no data"
    assert result.canary.latency_buckets == {0.05: 0, 0.1: 3, 0.5: 3, 1.0: 3, INF: 3}

    # Regex matchers may hold brackets and braces; the selector adds matchers.
    regex = env.queries(
        "exact",
        errors='http_requests_total{version="{arm}",code=~"5[0-9]{2}|(599)",{selector}}',
        selector='job=~"(canary|other)"',
    )
    again = await PrometheusMetrics(env.prometheus.url, queries=regex).fetch(
        since=since, now=time.time()
    )
    assert isinstance(again, ArmsCounts), again
    assert (again.primary.requests, again.primary.errors) == (8, 2)


async def test_counts_grow_from_tick_to_tick(env: Env) -> None:
    """With `since` fixed, each later fetch counts at least as much, and exactly the new total."""
    port, q = env.exporter_port, env.queries("grow", latency_buckets=None)
    await inc(port, "grow-p", n=1)
    await inc(port, "grow-c", n=1)
    await scraped(env, "grow-c", 1)
    await scraped(env, "grow-p", 1)
    since = time.time()
    provider = PrometheusMetrics(env.prometheus.url, queries=q)
    counted = 0
    for step in (3, 4):
        await inc(port, "grow-p", n=step)
        counted += step
        await scraped(env, "grow-p", 1 + counted)
        result = await provider.fetch(since=since, now=time.time())
        assert isinstance(result, ArmsCounts), result
        assert result.primary.requests == counted
        assert result.canary.requests == 0  # its series exists, and nothing happened since
        assert result.primary.latency_buckets == {}  # latency disabled


async def test_counter_reset_is_counted_not_subtracted(env: Env, tmp_path: Path) -> None:
    """Restarting the exporter drops its counters to 0; counts keep growing and stay exact."""
    port = env.spare_port
    pool = ProcessPool(tmp_path)
    try:
        exporter = pool.support_server("exporter", port)
        q = env.queries("reset")
        await inc(port, "reset-p", n=5)
        await inc(port, "reset-c", n=2)
        await scraped(env, "reset-p", 5)
        await scraped(env, "reset-c", 2)
        since = time.time()
        await inc(port, "reset-p", n=6)
        await inc(port, "reset-c", n=5)
        await scraped(env, "reset-p", 11)
        await scraped(env, "reset-c", 7)
        provider = PrometheusMetrics(env.prometheus.url, queries=q)
        before = await provider.fetch(since=since, now=time.time())
        assert isinstance(before, ArmsCounts), before
        assert (before.primary.requests, before.canary.requests) == (6, 5)

        # A redeploy: the new process starts from zero. The primary's new total stays below
        # its old one (a visible drop); the canary's climbs past it before the next scrape
        # (10 > 7), which only the changed `_created` time reveals.
        pool.stop(exporter)
        pool.support_server("exporter", port)
        await inc(port, "reset-p", n=4)
        await inc(port, "reset-c", n=10)
        await scraped(env, "reset-p", 4)
        await scraped(env, "reset-c", 10)
        now = time.time()
        after = await provider.fetch(since=since, now=now)
        assert isinstance(after, ArmsCounts), after
        assert (after.primary.requests, after.canary.requests) == (6 + 4, 5 + 10)
        assert after.primary.latency_buckets[INF] == 10
        assert after.canary.latency_buckets[INF] == 15

        # Without `_created`, only drops are resets: the canary's reset is missed, as it
        # would be by Prometheus' increase().
        drops_only = PrometheusMetrics(
            env.prometheus.url, queries=q.model_copy(update={"use_created": False})
        )
        blind = await drops_only.fetch(since=since, now=now)
        assert isinstance(blind, ArmsCounts), blind
        assert (blind.primary.requests, blind.canary.requests) == (6 + 4, 5 + (10 - 7))
    finally:
        pool.stop_all()


# --- no data -------------------------------------------------------------------------------------


async def test_series_that_do_not_exist_are_no_data(env: Env) -> None:
    """An empty result (no such series) is NoData naming the selector, not zero traffic."""
    provider = PrometheusMetrics(env.prometheus.url, queries=env.queries("nobody"))
    now = time.time()
    result = await provider.fetch(since=now - 30, now=now)
    assert isinstance(result, NoData)
    assert "empty result" in result.reason
    assert 'version="nobody-p"' in result.reason


async def test_unreachable_prometheus_is_no_data() -> None:
    """Nothing listening at the URL: NoData saying Prometheus is unreachable, no exception."""
    url = f"http://127.0.0.1:{free_port()}"
    provider = PrometheusMetrics(url, timeout_s=2)
    now = time.time()
    result = await provider.fetch(since=now - 10, now=now)
    assert isinstance(result, NoData)
    assert result.reason.startswith(f"prometheus unreachable at {url}")


async def test_http_error_is_no_data_with_prometheus_words(env: Env) -> None:
    """A query Prometheus refuses (HTTP 400) is NoData carrying its error text."""
    q = PromQueries(requests='http_requests_total{version="{arm}",=oops}')
    result = await PrometheusMetrics(env.prometheus.url, queries=q).fetch(
        since=time.time() - 10, now=time.time()
    )
    assert isinstance(result, NoData)
    assert "prometheus error" in result.reason
    assert "400" in result.reason and "parse error" in result.reason


async def test_nan_samples_are_no_data(env: Env) -> None:
    """A series whose samples are NaN gives NoData saying so, never a NaN count."""
    q = PromQueries(
        requests='broken_requests_total{version="{arm}"}',
        errors='broken_requests_total{version="{arm}",code=~"5.."}',
        latency_buckets=None,
    )
    await scraped_raw(env, 'broken_requests_total{version="primary"}')
    now = time.time()
    result = await PrometheusMetrics(env.prometheus.url, queries=q).fetch(since=now - 5, now=now)
    assert isinstance(result, NoData)
    assert "NaN" in result.reason and "broken_requests_total" in result.reason


# --- configuration -------------------------------------------------------------------------------


def test_templates_render_per_arm_with_the_selector() -> None:
    """{arm} and {selector} are substituted; an empty selector leaves a trailing comma PromQL accepts."""
    q = PromQueries(selector='job="demo"')
    assert q.render(q.requests, "canary") == 'http_requests_total{version="canary",job="demo"}'
    assert PromQueries().render(PromQueries().errors, "primary") == (
        'http_requests_total{version="primary",code=~"5..",}'
    )


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"requests": "http_requests_total"}, "requests must contain {arm}"),
        ({"errors": 'rate(x{v="{arm}"}[1m])'}, "errors must be a series selector"),
        ({"latency_buckets": 'x{v="{arm}"}[5m]'}, "latency_buckets must be a series selector"),
        ({"canary_arm": 'a"b'}, "canary_arm must be a non-empty label value"),
        ({"selector": '{job="x"}'}, "selector must be label matchers only"),
        ({"lookback_s": 0}, "lookback_s"),
        ({"request": "x"}, "request"),
    ],
)
def test_bad_queries_are_refused_naming_the_field(kwargs: dict[str, object], names: str) -> None:
    """Invalid PromQueries raise a validation error that names the field and the rule."""
    with pytest.raises(ValueError, match=names.replace("{", r"\{").replace("}", r"\}")):
        PromQueries(**kwargs)  # type: ignore[arg-type]


async def test_bad_arguments_raise(env: Env) -> None:
    """A URL without a scheme, or now before since, is a caller's bug: ValueError naming it."""
    with pytest.raises(ValueError, match="must start with http"):
        PrometheusMetrics("127.0.0.1:9090")
    with pytest.raises(ValueError, match="before since"):
        await PrometheusMetrics(env.prometheus.url).fetch(since=10.0, now=5.0)


# --- the counting rule, sample by sample ------------------------------------------------------


def _counter(values: list[tuple[float, float]], births: dict[float, float] | None = None) -> Any:
    from canary.metrics.prometheus import _Counter

    return _Counter({"metric": {}, "values": [[t, str(v)] for t, v in values]}, births)


@pytest.mark.parametrize(
    ("values", "births", "expected"),
    [
        ([(1, 5), (2, 5)], None, 0),  # nothing after since=2
        ([(1, 5), (2, 7), (3, 9)], None, 2),  # the sample at since is the baseline
        ([(3, 4), (4, 6)], None, 6),  # born after since: counted from 0
        ([(1, 10), (3, 12), (4, 2), (5, 5)], None, 2 + 2 + 3),  # drop = reset
        ([(1, 10), (3, 12), (4, 20)], {1: 100, 3: 100, 4: 200}, 2 + 20),  # reborn, no drop
        ([(1, 10), (3, 12), (4, 20)], {1: 100, 4: 200}, 2 + 20),  # a missing birth is skipped
        ([(1, 10), (3, 12), (4, 20)], {4: 200}, 2 + 8),  # nothing to compare with: a rise
        ([(1, 10), (3, 12), (4, 20)], {1: 100, 3: 100, 4: 100}, 10),  # same birth: a rise
    ],
)
def test_increase_since_table(
    values: list[tuple[float, float]], births: dict[float, float] | None, expected: float
) -> None:
    """Increases after since=2: baseline, late birth, drops and changed _created are resets."""
    from canary.metrics.prometheus import _increase_since

    assert _increase_since(_counter(values, births), 2.0, "x") == expected
