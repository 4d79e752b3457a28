"""The Prometheus metric source (the seam itself is in canary.metrics.base).

As in Flagger's metric providers, an unreachable server, an empty result or NaN is not an
exception here: it is `NoData` with a reason, and the pure rollout machine decides what to
do with it (hold, then roll back at a deadline).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from analysis import ArmCounts
from canary.core.inputs import MAX_DURATION_S
from canary.core.redact import redact_text, redact_url
from canary.executors import run_blocking
from canary.metrics.base import ArmsCounts, MetricsProvider, MetricsResult, NoData

__all__ = [
    "ARM_LABEL",
    "LATENCY_BUCKET_METRIC",
    "REQUESTS_METRIC",
    "ArmsCounts",
    "MetricsProvider",
    "MetricsResult",
    "NoData",
    "PromQueries",
    "PrometheusMetrics",
]


# --- Prometheus ----------------------------------------------------------------------------
#
# Why counts are computed here rather than with PromQL's increase(): increase() extrapolates
# to the window's edges and returns non-integers that can shrink from one tick to the next.
# The analysis wants exact cumulative counts that only grow, so the provider asks for the raw
# samples (a range vector `selector[Ns]` evaluated at `now`) and adds, per series, the
# non-negative steps after `since`; a drop is a counter reset, where the new value is the
# increase. The baseline is the series' last sample at or before `since`; a series born after
# `since` starts from 0. Then series are summed (and, for histograms, grouped by `le`).
# Prometheus' own increase() sees a reset only as a drop between two scraped samples, so a
# counter that restarts and climbs past its old value before the next scrape looks like a
# smaller increase: a crash-looping canary would hide errors exactly when it matters. So
# where the exporter publishes `<name>_created` (the counter's birth time), a change of it
# between two samples is a reset too (PromQueries.use_created).

# The demo service's metrics (canary/demo/service.py exports them with prometheus-client).
REQUESTS_METRIC = "http_requests_total"
LATENCY_BUCKET_METRIC = "http_request_duration_seconds_bucket"
ARM_LABEL = "version"


class PromQueries(BaseModel):
    """Which series count what, for each arm. Templates are PromQL series selectors.

    `{arm}` becomes the arm's label value (primary_arm / canary_arm) and `{selector}` the
    extra matchers in `selector` (e.g. `job="demo"`, may be empty; PromQL accepts the
    trailing comma that leaves). Selectors only, no functions: the provider reads raw
    samples and computes the increases itself (see above).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    requests: str = REQUESTS_METRIC + "{" + ARM_LABEL + '="{arm}",{selector}}'
    errors: str = REQUESTS_METRIC + "{" + ARM_LABEL + '="{arm}",code=~"5..",{selector}}'
    # None: no latency metrics (latency_buckets stay empty).
    latency_buckets: str | None = LATENCY_BUCKET_METRIC + "{" + ARM_LABEL + '="{arm}",{selector}}'
    selector: str = ""
    primary_arm: str = "primary"
    canary_arm: str = "canary"
    # Also read each counter's `<name>_created` series (prometheus-client and OpenMetrics
    # export it): a changed creation time marks a reset even when the restarted counter
    # climbed past its old value before the next scrape, which a drop alone cannot show.
    # Fetched in the same query; where no such series exists, drops alone count.
    use_created: bool = True
    # How far before `since` to look for each series' baseline sample. Longer than a few
    # scrape intervals, or a series that existed before `since` would be counted from 0.
    lookback_s: float = Field(default=300.0, gt=0, le=MAX_DURATION_S)

    @field_validator("requests", "errors", "latency_buckets")
    @classmethod
    def _selector_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if "{arm}" not in value:
            raise ValueError(f"{info.field_name} must contain {{arm}}, got {value!r}")
        if any(c in _unquoted(value) for c in "[]()"):
            raise ValueError(
                f"{info.field_name} must be a series selector like "
                f"'metric{{version=\"{{arm}}\"}}', without functions or ranges, got {value!r}"
            )
        return value

    @field_validator("primary_arm", "canary_arm")
    @classmethod
    def _label_value(cls, value: str, info: ValidationInfo) -> str:
        if not value or any(c in value for c in '"\\\n'):
            raise ValueError(
                f"{info.field_name} must be a non-empty label value without quotes, "
                f"backslashes or newlines, got {value!r}"
            )
        return value

    @field_validator("selector")
    @classmethod
    def _matchers(cls, value: str) -> str:
        if any(c in _unquoted(value) for c in "{}[]()"):
            raise ValueError(
                f"selector must be label matchers only, like 'job=\"demo\"', got {value!r}"
            )
        return value.strip().strip(",")

    def render(self, template: str, arm: str) -> str:
        """The selector for one arm."""
        return template.replace("{arm}", arm).replace("{selector}", self.selector)


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _unquoted(text: str) -> str:
    """`text` without its double-quoted strings (label values and regexes may hold anything)."""
    return _QUOTED.sub('""', text)


class _NoDataError(Exception):
    """Internal: becomes NoData(reason) at the provider's edge."""


class PrometheusMetrics:
    """MetricsProvider over Prometheus' HTTP API, through prometheus-api-client.

    The client is synchronous (requests), so every query runs in the bounded `prometheus`
    pool of canary.executors (never asyncio's shared default pool). An unreachable server, an HTTP error, an empty result or a NaN
    becomes NoData with a reason; fetch() does not raise for them.
    """

    def __init__(
        self,
        url: str,
        *,
        queries: PromQueries | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"Prometheus url must start with http:// or https://, got {redact_url(url)!r}"
            )
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        # Imported here, not at the top: the pure core imports this module for NoData and
        # ArmsCounts and must not pull in the HTTP client with them.
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        self.url = url.rstrip("/")
        # What messages, reprs and reasons show: never the URL's credentials.
        self.shown_url = redact_url(self.url)
        self.queries = queries or PromQueries()
        self.timeout_s = timeout_s
        # No retries: the controller's next tick is the retry, and a tick must stay short.
        self._client = PrometheusConnect(
            url=self.url, retry=Retry(total=0), timeout=timeout_s, disable_ssl=False
        )

    def __repr__(self) -> str:
        return f"PrometheusMetrics({self.shown_url!r})"

    def close(self) -> None:
        """Close the HTTP connection pool (idempotent)."""
        self._client._session.close()

    async def fetch(self, *, since: float, now: float) -> MetricsResult:
        """Both arms' counts over (since, now]; NoData(reason) when they cannot be had."""
        if not (math.isfinite(since) and math.isfinite(now)):
            raise ValueError(f"since and now must be finite unix times, got {since}, {now}")
        if now < since:
            raise ValueError(f"now ({now}) is before since ({since})")
        try:
            return await run_blocking("prometheus", self._fetch_blocking, since, now)
        except _NoDataError as exc:
            # A reason is recorded, shown and logged: no credentials, whatever the client said.
            return NoData(redact_text(str(exc)))

    def _fetch_blocking(self, since: float, now: float) -> ArmsCounts:
        q = self.queries
        arms = {}
        for role, arm in (("primary", q.primary_arm), ("canary", q.canary_arm)):
            requests = self._total(q.render(q.requests, arm), since, now, empty_ok=False)
            errors = self._total(q.render(q.errors, arm), since, now, empty_ok=True)
            buckets: dict[float, float] = {}
            if q.latency_buckets is not None:
                buckets = self._buckets(q.render(q.latency_buckets, arm), since, now)
            try:
                arms[role] = ArmCounts(requests=requests, errors=errors, latency_buckets=buckets)
            except ValidationError as exc:
                raise _NoDataError(f"inconsistent counts for {role} ({arm}): {exc}") from exc
        return ArmsCounts(primary=arms["primary"], canary=arms["canary"])

    def _query(self, query: str, now: float) -> list[dict[str, Any]]:
        from prometheus_api_client.exceptions import PrometheusApiClientException
        from requests import RequestException

        try:
            result = self._client.custom_query(query, params={"time": f"{now:.3f}"})
        except RequestException as exc:
            raise _NoDataError(
                f"prometheus unreachable at {self.shown_url}: {type(exc).__name__}: {exc}"
            ) from exc
        except PrometheusApiClientException as exc:
            raise _NoDataError(f"prometheus error for {query}: {exc}") from exc
        except ValueError as exc:  # a body that is not the API's JSON
            raise _NoDataError(f"prometheus answered garbage for {query}: {exc}") from exc
        if not isinstance(result, list):
            raise _NoDataError(f"prometheus returned no range vector for {query}: {result!r:.200}")
        return result

    def _series(self, selector: str, since: float, now: float) -> list[_Counter]:
        """Raw samples of every series matching `selector` over (since - lookback, now]."""
        window = math.ceil(now - since + self.queries.lookback_s)
        split = _split_selector(selector) if self.queries.use_created else None
        if split is None:
            return [_Counter(s, None) for s in self._query(f"{selector}[{window}s]", now)]
        name, matchers = split
        created = _created_name(name)
        both = "{" + f'__name__=~"{name}|{created}",' + matchers + "}"
        result = self._query(f"{both}[{window}s]", now)
        births: dict[frozenset[tuple[str, str]], dict[float, float]] = {}
        counters = []
        for s in result:
            labels = s.get("metric", {})
            if labels.get("__name__") == created:
                try:
                    births[_identity(labels)] = {float(t): float(v) for t, v in s["values"]}
                except (KeyError, TypeError, ValueError):
                    continue  # a broken _created series only costs the extra reset check
            else:
                counters.append(s)
        return [_Counter(s, births.get(_identity(s.get("metric", {})))) for s in counters]

    def _total(self, selector: str, since: float, now: float, *, empty_ok: bool) -> float:
        series = self._series(selector, since, now)
        if not series:
            if empty_ok:
                return 0.0  # e.g. no 5xx series yet: prometheus-client creates it on first use
            raise _NoDataError(f"empty result: no series match {selector} in Prometheus")
        return sum(_increase_since(s, since, selector) for s in series)

    def _buckets(self, selector: str, since: float, now: float) -> dict[float, float]:
        series = self._series(selector, since, now)
        if not series:
            raise _NoDataError(f"empty result: no series match {selector} in Prometheus")
        out: dict[float, float] = {}
        for s in series:
            le = s.series.get("metric", {}).get("le")
            if le is None:
                raise _NoDataError(
                    f"series without an 'le' label for {selector}: {s.series.get('metric')}"
                )
            try:
                bound = float(le)
            except ValueError as exc:
                raise _NoDataError(f"bad le={le!r} in {selector}") from exc
            out[bound] = out.get(bound, 0.0) + _increase_since(s, since, selector)
        return out


_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _split_selector(selector: str) -> tuple[str, str] | None:
    """'name{matchers}' -> (name, matchers); None for any other shape."""
    name, brace, rest = selector.strip().partition("{")
    name = name.strip()
    if not brace or not rest.endswith("}") or not _METRIC_NAME.match(name):
        return None
    return name, rest[:-1]


def _created_name(name: str) -> str:
    """http_requests_total -> http_requests_created; x_seconds_bucket -> x_seconds_created."""
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + "_created"
    return name + "_created"


def _identity(labels: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    # A histogram's buckets share one _created series, which has no `le`.
    return frozenset((k, v) for k, v in labels.items() if k not in ("__name__", "le"))


@dataclass(frozen=True, slots=True)
class _Counter:
    series: Mapping[str, Any]  # one series of a range-vector result: {"metric", "values"}
    births: Mapping[float, float] | None  # its _created samples by timestamp, if any


def _increase_since(counter: _Counter, since: float, selector: str) -> float:
    """Sum of one counter's increases after `since`, resets included (see above)."""
    series, births = counter.series, counter.births or {}
    try:
        samples = [(float(t), float(v)) for t, v in series["values"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise _NoDataError(f"malformed samples for {selector}: {series!r:.200}") from exc
    previous = 0.0
    born: float | None = None
    total = 0.0
    for t, v in samples:
        if not math.isfinite(v):
            shown = "NaN" if math.isnan(v) else str(v)
            raise _NoDataError(
                f"{shown} sample in {selector} (series {series.get('metric')}) at {t:.3f}: "
                "not a count, no data"
            )
        birth = births.get(t)
        if t <= since:
            previous, born = v, birth  # the baseline: last sample at or before `since`
            continue
        reborn = birth is not None and born is not None and birth != born
        total += v if reborn or v < previous else v - previous
        previous = v
        if birth is not None:
            born = birth
    return total
