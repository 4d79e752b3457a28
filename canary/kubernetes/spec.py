"""The annotation schema: how an application team opts a Deployment in, and tunes it.

Annotations are strings typed by hand into YAML, so every one is parsed here, once, into
a validated `CanarySpec`, and a bad one is reported with the annotation's own key and the
rule it broke (``canary.dev/steps: must be strictly increasing, got 10,5``). The controller
shows that text in a Warning Event and in the `canary.dev/spec-error` annotation and leaves
traffic alone; a typo in a key (``canary.dev/step``) is an error too, with a suggestion,
because an ignored annotation is a silent misconfiguration.

`ANNOTATIONS` is the single table of keys, defaults and rules: the parser, the error
messages and the README table (`markdown_table()`) all come from it.

The controller's own annotations (status, errors, manual commands) share the prefix and are
listed in `RESERVED`; they are never user input.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from analysis import AnalysisConfig, MetricConfig
from canary.core.inputs import MAX_ANNOTATION_BYTES, MAX_DURATION_S, clip, excerpt
from canary.core.rollout import (
    DEFAULT_GATE_FAILURE_THRESHOLD,
    GATE_KINDS,
    GateKind,
    RolloutSpec,
)
from canary.metrics.prometheus import PromQueries
from canary.notify.formats import FORMATS, METADATA_FORMATS, METADATA_RULE, Format
from canary.notify.gates import chat_service, generated_load, parse_metadata
from canary.notify.webhooks import WebhookConfig
from canary.routers.base import Match

__all__ = [
    "ANNOTATIONS",
    "ANNOTATION_COMMAND",
    "ANNOTATION_SPEC_ERROR",
    "ANNOTATION_STATUS",
    "PREFIX",
    "RESERVED",
    "AnalysisSpec",
    "CanaryReplicas",
    "CanarySpec",
    "MetricsSpec",
    "RouterSpec",
    "SpecError",
    "Webhook",
    "dump_problems",
    "markdown_table",
    "parse_annotations",
    "parse_duration",
]

PREFIX = "canary.dev/"
# Written by the controller (compact JSON status, the last spec error) and by the CLI (a
# manual command): kept apart from the spec so GitOps tools never revert them.
ANNOTATION_STATUS = PREFIX + "status"
ANNOTATION_SPEC_ERROR = PREFIX + "spec-error"
ANNOTATION_COMMAND = PREFIX + "command"
RESERVED = frozenset({ANNOTATION_STATUS, ANNOTATION_SPEC_ERROR, ANNOTATION_COMMAND})

RouterKind = Literal["ingress-nginx", "gateway-api"]
MetricsPreset = Literal["ingress-nginx", "envoy", "app-histogram", "custom"]
# Notification webhooks (chat formats) and Flagger's gate kinds (canary.notify.gates: a 2xx
# answer opens the gate; the rollout machine decides what that means). `rollback` is
# Flagger's gate (polled; 2xx rolls back): the notification told of rollbacks, which was
# called `rollback` before gates existed, is `rolled-back`.
NotificationType = Literal["post-rollout", "rolled-back", "event"]
NOTIFICATION_TYPES: tuple[str, ...] = typing.get_args(NotificationType)
WebhookType = Literal[
    "post-rollout",
    "rolled-back",
    "event",
    "confirm-rollout",
    "pre-rollout",
    "rollout",
    "confirm-traffic-increase",
    "confirm-promotion",
    "rollback",
]
WEBHOOK_TYPES: tuple[str, ...] = typing.get_args(WebhookType)
GATING_WEBHOOK_TYPES: tuple[str, ...] = GATE_KINDS
_WEBHOOK_RULES = {
    "post-rollout": "URL told of promotions, rollbacks and manual actions (see its `.format`)",
    "rolled-back": "URL told of rollbacks (see its `.format`; was `webhook.rollback` before gates)",
    "event": "URL told of every Kubernetes Event canary records for the app, as Flagger's "
    "`event` webhook is (its payload, unless `.format` names another)",
    "confirm-rollout": "gate asked before the canary gets any traffic; non-2xx holds, asked "
    "again each tick",
    "pre-rollout": "gate called before traffic shifts to the canary; a failure counts toward "
    "`webhook.failure-threshold`",
    "rollout": "hook called each tick while Progressing (e.g. a load tester, with its "
    "`.metadata`, whose `rps` and `at` the planner's advice counts); a failure counts toward "
    "`webhook.failure-threshold`",
    "confirm-traffic-increase": "gate asked before each weight increase once the step "
    "passed; non-2xx holds the weight",
    "confirm-promotion": "gate asked before promotion once the last step passed; non-2xx "
    "holds the weight while the analysis keeps running",
    "rollback": "gate polled each tick while waiting or Progressing: a 2xx rolls back now",
}
_GATE_OPTION = re.compile(
    r"^" + re.escape(PREFIX) + r"webhook\.(" + "|".join(map(re.escape, GATE_KINDS)) + r")\."
    r"(timeout|retries|metadata)$"
)
# Flagger's notification webhooks take a timeout and metadata too (not retries: canary tries a
# notification WEBHOOK_ATTEMPTS times whatever it says, and never holds the rollout for it).
_NOTIFY_OPTION = re.compile(
    r"^" + re.escape(PREFIX) + r"webhook\.(" + "|".join(map(re.escape, NOTIFICATION_TYPES)) + r")\."
    r"(timeout|metadata)$"
)
WEBHOOK_ATTEMPTS = WebhookConfig.model_fields["max_attempts"].default
_WEBHOOK_FORMAT_RULE = (
    "the payload's shape for `webhook.{kind}`: `slack` (the default), `teams`, `discord`, "
    "`google_chat`, `json` or `flagger`"
)
# Flagger's `event` webhook gets Flagger's payload unless it says otherwise.
_EVENT_FORMAT_RULE = (
    "the payload's shape for `webhook.event`: `flagger` (the default), `slack`, `teams`, "
    "`discord`, `google_chat` or `json`"
)
METRIC_NAMES = ("errors", "latency")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a DNS-1123 subdomain


# At most this many problems are shown (in the message, the Event and the spec-error
# annotation, which must stay well inside the API server's 256 KiB for all annotations).
MAX_PROBLEMS_SHOWN = 20


class SpecError(ValueError):
    """One or more bad annotations; `problems` maps each key to the rule it broke. Keys and
    rules are cut to a short excerpt: a rule may quote the value it refused."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = {clip(key, 120): clip(rule, 300) for key, rule in problems.items()}
        shown = list(self.problems.items())[:MAX_PROBLEMS_SHOWN]
        text = "; ".join(f"{key}: {rule}" for key, rule in shown)
        if len(self.problems) > len(shown):
            text += f"; and {len(self.problems) - len(shown)} more problems"
        super().__init__(text)


# -- value types -------------------------------------------------------------------------


class AnalysisSpec(BaseModel):
    """Analysis settings; None leaves the analysis' own default in place."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    alpha: float | None = Field(default=None, gt=0, lt=0.5)
    # Relative slack: the canary may be this much worse than the primary (0.1 = 10%).
    error_tolerance: float | None = Field(default=None, gt=0, le=100)
    latency_tolerance: float | None = Field(default=None, gt=0, le=100)
    quantiles: tuple[float, ...] | None = None
    # Metric kinds whose failure alone rolls back: "errors", "latency" (every quantile).
    critical: tuple[str, ...] | None = None

    def overrides(self) -> dict[str, Any]:
        """The settings given."""
        return self.model_dump(exclude_none=True)

    def analysis_config(self) -> AnalysisConfig:
        """The analysis' configuration: its defaults, with these settings applied.
        Raises ValueError (pydantic's) when the combination is invalid."""
        base = AnalysisConfig()
        errors = base.errors.model_dump()
        latency = base.latency.model_dump()
        if self.error_tolerance is not None:
            errors["tolerance"] = self.error_tolerance
        if self.latency_tolerance is not None:
            latency["tolerance"] = self.latency_tolerance
        if self.critical is not None:
            errors["critical"] = "errors" in self.critical
            latency["critical"] = "latency" in self.critical
        settings: dict[str, Any] = {
            "errors": MetricConfig.model_validate(errors),
            "latency": MetricConfig.model_validate(latency),
        }
        if self.alpha is not None:
            settings["alpha"] = self.alpha
        if self.quantiles is not None:
            settings["quantiles"] = self.quantiles
        return AnalysisConfig.model_validate({**base.model_dump(), **settings})


class RouterSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: RouterKind
    # The user's Ingress (ingress-nginx) or the HTTPRoute (gateway-api).
    target: str
    port: int = Field(default=80, ge=1, le=65535)


class MetricsSpec(BaseModel):
    """Where the two arms' counts come from: a preset, or custom series selectors.

    Arms are told apart by the Service that served the request (`app-primary` and
    `app-canary`). Custom selectors are what `canary.metrics.prometheus.PromQueries` takes: series
    selectors, no functions (the provider computes exact increases itself), with `{arm}`
    for the arm's Service name and `{namespace}` for the Deployment's namespace.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: MetricsPreset = "app-histogram"
    histogram: str = "http_request_duration_seconds"
    requests: str | None = None
    errors: str | None = None
    latency_buckets: str | None = None

    @property
    def has_latency(self) -> bool:
        """Whether these metrics include a latency histogram (not the envoy preset's, which
        is in milliseconds; for custom, only with a latency_buckets selector)."""
        if self.preset == "custom":
            return self.latency_buckets is not None
        return self.preset != "envoy"

    @model_validator(mode="after")
    def _custom_needs_selectors(self) -> MetricsSpec:
        if self.preset == "custom" and not (self.requests and self.errors):
            raise ValueError("the custom preset needs requests and errors selectors")
        return self

    def prom_queries(
        self, *, namespace: str, primary_service: str, canary_service: str
    ) -> PromQueries:
        """The Prometheus provider's queries for a Deployment in `namespace`."""
        ns = f'namespace="{namespace}"'
        if self.preset == "custom":
            assert self.requests is not None and self.errors is not None
            requests, errors = self.requests, self.errors
            latency = self.latency_buckets
        elif self.preset == "app-histogram":
            base = f'{{{ns},service="{{arm}}"'
            requests = f"{self.histogram}_count{base}}}"
            errors = f'{self.histogram}_count{base},code=~"5.."}}'
            latency = f"{self.histogram}_bucket{base}}}"
        elif self.preset == "ingress-nginx":
            # As ingress-nginx exports them (scraped with honorLabels: true).
            base = f'{{{ns},service="{{arm}}"'
            requests = f"nginx_ingress_controller_requests{base}}}"
            errors = f'nginx_ingress_controller_requests{base},status=~"5.."}}'
            latency = f"nginx_ingress_controller_request_duration_seconds_bucket{base}}}"
        else:  # envoy: upstream clusters named after the Service (Contour, Emissary, ...)
            cluster = f'envoy_cluster_name=~".*{namespace}.*{{arm}}.*"'
            requests = f"envoy_cluster_upstream_rq_xx{{{cluster}}}"
            errors = f'envoy_cluster_upstream_rq_xx{{{cluster},envoy_response_code_class="5"}}'
            # Envoy's request-time histogram is in milliseconds; the analysis wants seconds.
            latency = None
        fill = {"{namespace}": namespace}
        return PromQueries(
            requests=_fill(requests, fill),
            errors=_fill(errors, fill),
            latency_buckets=None if latency is None else _fill(latency, fill),
            primary_arm=primary_service,
            canary_arm=canary_service,
        )


def _fill(template: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(key, value)
    return template


class Webhook(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: WebhookType
    url: str
    format: Format = "slack"  # notifications
    # gates (canary.notify.gates.GateConfig)
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    retries: int = Field(default=0, ge=0, le=10)
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _event_format(cls, data: Any) -> Any:
        # Flagger's `event` webhook gets Flagger's payload unless it names another format.
        if isinstance(data, dict) and data.get("type") == "event" and "format" not in data:
            return {**data, "format": "flagger"}
        return data

    @property
    def is_gate(self) -> bool:
        return self.type in GATE_KINDS


MAX_CANARY_REPLICAS = 1000


class CanaryReplicas(BaseModel):
    """The canary's size: a count, or a percentage of app-primary's replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    count: int | None = Field(default=None, ge=1, le=MAX_CANARY_REPLICAS)
    percent: float | None = Field(default=None, gt=0, le=100)

    def of(self, primary_replicas: int) -> int:
        """Replicas for a primary of `primary_replicas`: a percentage is rounded up, and is
        at least 1 (a canary of no pods could never be judged)."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, math.ceil(max(0, primary_replicas) * self.percent / 100 - 1e-9))


class CanarySpec(BaseModel):
    """Everything the annotations say about one Deployment's rollouts."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    enabled: bool = False
    steps: tuple[int, ...] = (5, 10, 25, 50)
    # Finite and at most a week (max-step-duration `none` waits forever).
    min_step_s: float = Field(default=60.0, ge=0, le=MAX_DURATION_S)
    max_step_s: float | None = Field(default=900.0, gt=0, le=MAX_DURATION_S)
    no_data_deadline_s: float = Field(default=120.0, gt=0, le=MAX_DURATION_S)
    # Traffic the planner assumes at the start of a rollout (requests/s to app-primary and
    # app-canary together); None: its first estimate waits for observed traffic.
    expected_rps: float | None = Field(default=None, gt=0, le=1e7)
    analysis: AnalysisSpec = AnalysisSpec()
    router: RouterSpec | None = None
    metrics: MetricsSpec = MetricsSpec()
    webhooks: tuple[Webhook, ...] = ()
    gate_failure_threshold: int = Field(default=DEFAULT_GATE_FAILURE_THRESHOLD, ge=1, le=100)
    # None: the app's own replica count (or its HPA's minReplicas), as before.
    canary_replicas: CanaryReplicas | None = None
    # 0: off. Reverting to the template promoted before the current one, within this long
    # after that promotion, goes straight to app-primary without analysis.
    fast_rollback_window_s: float = Field(default=0.0, ge=0, le=MAX_DURATION_S)
    # A/B mode instead of weight steps: only matching requests reach the canary.
    match_header: str | None = None
    match_cookie: str | None = None
    ab_duration_s: float | None = Field(default=None, ge=0, le=MAX_DURATION_S)
    affinity: Literal["cookie"] | None = None

    @property
    def match(self) -> Match | None:
        """The A/B match, or None for weight steps."""
        if self.match_header is not None:
            return Match.header(self.match_header)
        if self.match_cookie is not None:
            return Match.cookie(self.match_cookie)
        return None

    def rollout_spec(self) -> RolloutSpec:
        """The rollout machine's spec; on Kubernetes the promotion copies the template to
        app-primary (Flagger's model)."""
        return RolloutSpec(
            steps=self.steps,
            min_step_s=self.min_step_s,
            max_step_s=self.max_step_s,
            no_data_deadline_s=self.no_data_deadline_s,
            promotion="copy",
            gates=tuple(
                typing.cast(GateKind, h.type) for h in self.webhooks if h.type in GATE_KINDS
            ),
            gate_failure_threshold=self.gate_failure_threshold,
            ab_duration_s=self.ab_duration_s,
        )

    def analysis_config(self) -> AnalysisConfig:
        """The analysis' configuration for these metrics. Without a latency histogram to read
        there are no latency metrics: they would never have data, and a metric without data
        never passes, so no canary could be promoted. Raises ValueError (pydantic's) when the
        combination is invalid."""
        config = self.analysis.analysis_config()
        if self.metrics.has_latency:
            return config
        return AnalysisConfig.model_validate({**config.model_dump(), "quantiles": ()})


# -- parsers: each raises ValueError with the rule, the key is added by the caller ------


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "5m", "1h30m" or "1m30s" (Go's common duration forms),
    at most a week (canary.core.inputs.MAX_DURATION_S)."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION.match(value)
        if not value or match is None or not any(match.groups()):
            raise ValueError(
                f"must be a duration like 90s, 5m or 1h30m, got {excerpt(text)}"
            ) from None
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must be a non-negative duration, got {excerpt(text)}")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"must be at most a week (168h), got {excerpt(text)}")
    return seconds


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise ValueError(f'must be "true" or "false", got {excerpt(text)}')


def _steps(text: str) -> tuple[int, ...]:
    parts = [p.strip().rstrip("%") for p in text.split(",")]
    if not parts or parts == [""]:
        raise ValueError("must list at least one canary percentage, e.g. 5,10,25,50")
    steps: list[int] = []
    for part in parts:
        if not part.isdigit():
            raise ValueError(
                f"must be comma-separated whole percentages, got {excerpt(part)} in {excerpt(text)}"
            )
        steps.append(int(part))
    for weight in steps:
        if not 1 <= weight <= 99:
            raise ValueError(
                f"each step must be within 1..99 (100 is the promotion), got {excerpt(weight)}"
            )
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"must be strictly increasing, got {','.join(map(str, steps))}")
    return tuple(steps)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number, got {excerpt(text)}") from None
    if not 0 < value < 0.5:
        raise ValueError(f"must be within (0, 0.5), got {excerpt(text)}")
    return value


def _tolerance(text: str) -> float:
    value = text.strip()
    scale = 1.0
    if value.endswith("%"):
        value, scale = value[:-1], 0.01
    try:
        number = float(value) * scale
    except ValueError:
        raise ValueError(
            f"must be a relative tolerance like 0.1 or 10%, got {excerpt(text)}"
        ) from None
    if not math.isfinite(number) or not 0 < number <= 100:
        raise ValueError(
            f"must be above 0 and at most 100 (0.1 = 10% worse allowed), got {excerpt(text)}"
        )
    return number


def _quantiles(text: str) -> tuple[float, ...]:
    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            q = float(part[1:]) / 100 if part.lower().startswith("p") else float(part)
        except ValueError:
            raise ValueError(
                f"must be quantiles like p50,p99 or 0.5,0.99, got {excerpt(part)}"
            ) from None
        if not 0 < q < 1:
            raise ValueError(
                f"each quantile must be within (0, 1) (p1..p99.9), got {excerpt(part)}"
            )
        out.append(q)
    if len(set(out)) != len(out):
        raise ValueError(f"has duplicates: {excerpt(text)}")
    return tuple(sorted(out))


def _critical(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("must name at least one metric, or the analysis could never fail")
    for name in names:
        if name not in METRIC_NAMES:
            raise ValueError(
                f"unknown metric {excerpt(name)}; the metrics are {', '.join(METRIC_NAMES)}"
            )
    return names


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {excerpt(text)}")
        return value

    return parse


def _name(text: str) -> str:
    value = text.strip()
    if not _NAME.match(value):
        raise ValueError(
            f"must be a Kubernetes object name (lower case, digits, '-', '.'), got {excerpt(text)}"
        )
    return value


def _port(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"must be a port number 1..65535, got {excerpt(text)}")
    return int(text)


def _match_header(text: str) -> str:
    Match.header(text)
    return text.strip()


def _match_cookie(text: str) -> str:
    Match.cookie(text)
    return text.strip()


def _max_duration(text: str) -> float | None:
    if text.strip().lower() in ("none", "never", "forever"):
        return None
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f'must be positive, or "none" to wait forever, got {excerpt(text)}')
    return seconds


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"must be positive, got {excerpt(text)}")
    return seconds


def _canary_replicas(text: str) -> CanaryReplicas:
    value = text.strip()
    if value.endswith("%"):
        number = value[:-1].strip()
        try:
            percent = float(number)
        except ValueError:
            percent = math.nan
        if not (math.isfinite(percent) and 0 < percent <= 100) or not number:
            raise ValueError(
                f"must be a percentage of the primary above 0 and at most 100%, got {excerpt(text)}"
            )
        return CanaryReplicas(percent=percent)
    if not value.isdigit() or not 1 <= int(value) <= MAX_CANARY_REPLICAS:
        raise ValueError(
            f"must be a replica count 1..{MAX_CANARY_REPLICAS} (e.g. 2) or a percentage of the "
            f"primary (e.g. 25%), got {excerpt(text)}"
        )
    return CanaryReplicas(count=int(value))


def _window(text: str) -> float:
    if text.strip().lower() in ("off", "none", "false"):
        return 0.0
    return parse_duration(text)


def _rate(text: str) -> float | None:
    if text.strip().lower() in ("", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be requests per second (e.g. 200), got {excerpt(text)}") from None
    if not (math.isfinite(value) and 0 < value <= 1e7):
        raise ValueError(f"must be within (0, 1e7] requests per second, got {excerpt(text)}")
    return value


def _selector(field: str) -> Callable[[str], str]:
    """A parser that applies the Prometheus provider's own rules for `field`."""

    def parse(text: str) -> str:
        value = text.strip()
        try:
            PromQueries.model_validate({field: value})
        except ValidationError as exc:
            message = "; ".join(str(e.get("msg", "invalid")) for e in exc.errors())
            raise ValueError(message.removeprefix("Value error, ")) from None
        return value

    return parse


def _metric_name(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", value):
        raise ValueError(f"must be a Prometheus metric name, got {excerpt(text)}")
    return value.removesuffix("_bucket")


def _url(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(f"must be an http:// or https:// URL, got {excerpt(text)}")
    return value


def _gate_url(text: str) -> str:
    value = _url(text)
    chat = chat_service(value)
    if chat is not None:
        raise ValueError(
            f"is a chat service's webhook ({chat}): a gate needs a receiver that answers "
            f"Flagger's payload (notifications: {PREFIX}webhook.post-rollout or "
            f"{PREFIX}webhook.rolled-back)"
        )
    return value


def _retries(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 10:
        raise ValueError(f"must be a whole number 0..10, got {excerpt(text)}")
    return int(text)


def _gate_timeout(text: str) -> float:
    seconds = parse_duration(text)
    if not 0 < seconds <= 120:
        raise ValueError(f"must be above 0 and at most 2m, got {excerpt(text)}")
    return seconds


def _threshold(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 100:
        raise ValueError(f"must be a whole number 1..100, got {excerpt(text)}")
    return int(text)


def _webhook_format(text: str) -> str:
    value = text.strip().lower().replace("-", "_")
    if value not in FORMATS:
        raise ValueError(f"must be one of {', '.join(FORMATS)}, got {excerpt(text)}")
    return value


# -- the table ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Annotation:
    key: str
    field: str  # dotted path into CanarySpec's input
    parse: Callable[[str], Any]
    default: str
    rule: str


def _a(name: str, field: str, parse: Callable[[str], Any], default: str, rule: str) -> Annotation:
    return Annotation(PREFIX + name, field, parse, default, rule)


ANNOTATIONS: tuple[Annotation, ...] = (
    _a("enabled", "enabled", _bool, "false", "`true` opts the Deployment in"),
    _a("steps", "steps", _steps, "5,10,25,50", "canary percentages, 1..99, strictly increasing"),
    _a(
        "min-step-duration",
        "min_step_s",
        parse_duration,
        "60s",
        "time at each step before it may advance (90s, 5m, 1h30m)",
    ),
    _a(
        "max-step-duration",
        "max_step_s",
        _max_duration,
        "15m",
        "no pass within it rolls back; `none` waits forever",
    ),
    _a(
        "no-data-deadline",
        "no_data_deadline_s",
        _positive_duration,
        "2m",
        "no metrics for this long rolls back",
    ),
    _a(
        "expected-rps",
        "expected_rps",
        _rate,
        "none",
        "requests/s the planner assumes when a rollout starts, to say at once how long a good "
        "canary needs to pass the first step (`none`: it says so after a minute of traffic)",
    ),
    _a(
        "canary-replicas",
        "canary_replicas",
        _canary_replicas,
        "(the app's replicas)",
        "the canary's size during a rollout: a count (`2`) or a percentage of app-primary's "
        "replicas (`25%`, rounded up, at least 1); with an HPA on the app, it starts there "
        "and the HPA's bounds rule",
    ),
    _a(
        "fast-rollback-window",
        "fast_rollback_window_s",
        _window,
        "off",
        "reverting to the template promoted before the current one within this long after "
        "that promotion (e.g. `1h`) goes straight to app-primary, analysis skipped; `off` "
        "analyses every template",
    ),
    _a(
        "analysis.alpha",
        "analysis.alpha",
        _probability,
        "(analysis default)",
        "false-rollback probability, however often we look; within (0, 0.5)",
    ),
    _a(
        "analysis.error-tolerance",
        "analysis.error_tolerance",
        _tolerance,
        "(analysis default)",
        "how much worse the canary's error rate may be: 0.1 or 10%",
    ),
    _a(
        "analysis.latency-tolerance",
        "analysis.latency_tolerance",
        _tolerance,
        "(analysis default)",
        "how much slower the canary may be: 0.1 or 10%",
    ),
    _a(
        "analysis.quantiles",
        "analysis.quantiles",
        _quantiles,
        "(analysis default)",
        "latency quantiles compared: p50,p99 or 0.5,0.99 (none without a latency histogram: "
        "`envoy`, or `custom` without `metrics.latency-buckets`)",
    ),
    _a(
        "analysis.critical",
        "analysis.critical",
        _critical,
        "(analysis default)",
        "metrics whose failure alone rolls back: errors, latency",
    ),
    _a(
        "router",
        "router.kind",
        _choice("ingress-nginx", "gateway-api"),
        "(required)",
        "`ingress-nginx` or `gateway-api`",
    ),
    _a(
        "ingress",
        "router.target",
        _name,
        "(required for ingress-nginx)",
        "the user's Ingress; a canary Ingress is created beside it",
    ),
    _a(
        "httproute",
        "router.target",
        _name,
        "(required for gateway-api)",
        "the HTTPRoute whose backendRefs weights are set",
    ),
    _a("port", "router.port", _port, "80", "the Services' port"),
    _a(
        "match-header",
        "match_header",
        _match_header,
        "",
        "A/B: `Name=value` (e.g. `X-Canary=always`); only requests with that header reach the "
        "canary, instead of weight steps (needs `canary.dev/ab-duration`)",
    ),
    _a(
        "match-cookie",
        "match_cookie",
        _match_cookie,
        "",
        "A/B: a cookie name (value `always`) or `name=value`; only requests with it reach the "
        "canary (needs `canary.dev/ab-duration`)",
    ),
    _a(
        "ab-duration",
        "ab_duration_s",
        parse_duration,
        "",
        "A/B: how long the matching requests are analysed before a pass promotes (90s, 5m); "
        "replaces `canary.dev/steps`",
    ),
    _a(
        "affinity",
        "affinity",
        _choice("cookie"),
        "",
        "`cookie`: a client sent to the canary stays there (ingress-nginx `affinity: cookie`, "
        "`affinity-canary-behavior: sticky`); refused for gateway-api, which has no standard "
        "session affinity",
    ),
    _a(
        "metrics",
        "metrics.preset",
        _choice("ingress-nginx", "envoy", "app-histogram", "custom"),
        "app-histogram",
        "`ingress-nginx`, `envoy`, `app-histogram` or `custom`",
    ),
    _a(
        "metrics.histogram",
        "metrics.histogram",
        _metric_name,
        "http_request_duration_seconds",
        "the app's histogram, for `app-histogram`",
    ),
    _a(
        "metrics.requests",
        "metrics.requests",
        _selector("requests"),
        "",
        'for `custom`: series selector counting requests, with {arm} (the Service) and {namespace}, e.g. `http_requests_total{namespace="{namespace}",service="{arm}"}`',
    ),
    _a(
        "metrics.errors",
        "metrics.errors",
        _selector("errors"),
        "",
        "for `custom`: series selector counting failed requests",
    ),
    _a(
        "metrics.latency-buckets",
        "metrics.latency_buckets",
        _selector("latency_buckets"),
        "",
        "for `custom` (optional): series selector of a histogram's `_bucket` series, in "
        "seconds; without it latency is not compared",
    ),
    *(
        _a(
            f"webhook.{kind}",
            f"webhooks.{kind}",
            _gate_url if kind in GATE_KINDS else _url,
            "",
            _WEBHOOK_RULES[kind],
        )
        for kind in WEBHOOK_TYPES
    ),
    *(
        _a(
            f"webhook.{kind}.format",
            f"webhook_formats.{kind}",
            _webhook_format,
            "",
            _EVENT_FORMAT_RULE if kind == "event" else _WEBHOOK_FORMAT_RULE.format(kind=kind),
        )
        for kind in NOTIFICATION_TYPES
    ),
    # One row each for every gate kind (the parser maps webhook.pre-rollout.timeout here).
    _a(
        "webhook.<gate>.timeout",
        "webhook_options.timeout_s",
        _gate_timeout,
        "10s",
        "a gate's timeout per attempt (at most 2m); no answer in time is a non-2xx",
    ),
    _a(
        "webhook.<gate>.retries",
        "webhook_options.retries",
        _retries,
        "0",
        "more attempts after the first on no answer, 429 or 5xx (0..10)",
    ),
    _a(
        "webhook.<gate>.metadata",
        "webhook_options.metadata",
        parse_metadata,
        "{}",
        "JSON object of strings sent as the payload's `metadata`, verbatim (e.g. "
        '`{"url":"http://app-canary/","rps":"50"}`); at most 32 keys, 4 KiB',
    ),
    # One row each for every notification kind (post-rollout, rolled-back, event).
    _a(
        "webhook.<notification>.timeout",
        "webhook_options.timeout_s",
        _gate_timeout,
        "5s",
        "a notification's timeout per attempt (at most 2m); no answer in time is retried, "
        "and the rollout never waits for it",
    ),
    _a(
        "webhook.<notification>.metadata",
        "webhook_options.metadata",
        parse_metadata,
        "{}",
        "JSON object of strings added to the payload's `metadata` (`flagger` and `json` "
        "formats only); an Event's own keys (`eventMessage`, ...) win, as in Flagger; at "
        "most 32 keys, 4 KiB",
    ),
    _a(
        "webhook.failure-threshold",
        "gate_failure_threshold",
        _threshold,
        str(DEFAULT_GATE_FAILURE_THRESHOLD),
        "failed `pre-rollout`/`rollout` calls that roll back (as Flagger's analysis threshold)",
    ),
)
_BY_KEY = {a.key: a for a in ANNOTATIONS}
_KEY_OF_FIELD = {a.field: a.key for a in ANNOTATIONS}


def markdown_table() -> str:
    """The README's annotation table."""
    rows = ["| Annotation | Default | Meaning |", "|---|---|---|"]
    for a in ANNOTATIONS:
        default = f"`{a.default}`" if a.default and not a.default.startswith("(") else a.default
        rows.append(f"| `{a.key}` | {default or '—'} | {a.rule} |")
    return "\n".join(rows)


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def parse_annotations(annotations: Mapping[str, str] | None) -> CanarySpec:
    """The spec the annotations describe (`enabled=False` when there are none).

    Raises SpecError naming every bad key and the rule it broke.
    """
    problems: dict[str, str] = {}
    raw: dict[str, Any] = {}
    target_from: str | None = None  # which annotation named the router's target
    formats: dict[str, tuple[str, Any]] = {}  # webhook type -> (annotation, format)
    options: dict[str, dict[str, tuple[str, Any]]] = {}  # gate -> option -> (annotation, value)
    for key, value in sorted((annotations or {}).items()):
        if not key.startswith(PREFIX) or key in RESERVED:
            continue
        if key == PREFIX + "webhook.rollback.format":
            problems[key] = (
                f"{PREFIX}webhook.rollback is now Flagger's rollback gate (polled; a 2xx rolls "
                f"back): for notifications of rollbacks use {PREFIX}webhook.rolled-back "
                "and its .format"
            )
            continue
        option, placeholder = _GATE_OPTION.match(key), "<gate>"
        if option is None:
            option, placeholder = _NOTIFY_OPTION.match(key), "<notification>"
        gate = option.group(1) if option is not None else None
        known = (
            _BY_KEY.get(f"{PREFIX}webhook.{placeholder}.{option.group(2)}")
            if option is not None
            else None
            if "<gate>" in key or "<notification>" in key  # the table's placeholder rows
            else _BY_KEY.get(key)
        )
        if known is None and key.endswith(".retries"):
            if key.removeprefix(PREFIX + "webhook.").removesuffix(".retries") in (
                NOTIFICATION_TYPES
            ):
                problems[key] = (
                    f"only gates take .retries: canary tries a notification up to "
                    f"{WEBHOOK_ATTEMPTS} times itself, and the rollout never waits for it"
                )
                continue
        if known is None:
            # (a key too long to be a typo of ours is not compared: difflib is quadratic)
            close = difflib.get_close_matches(key, list(_BY_KEY), n=1) if len(key) < 100 else []
            hint = f"; did you mean {close[0]}?" if close else ""
            problems[key] = f"unknown annotation{hint}"
            continue
        if not isinstance(value, str):
            problems[key] = f"must be a string, got {type(value).__name__}"
            continue
        if len(value) > MAX_ANNOTATION_BYTES:
            problems[key] = (
                f"is {len(value)} characters long; at most {MAX_ANNOTATION_BYTES} are read"
            )
            continue
        try:
            parsed = known.parse(value)
        except ValueError as exc:
            problems[key] = str(exc)
            continue
        if known.field.startswith("webhooks."):
            raw.setdefault("webhooks", []).append(
                {"type": known.field.split(".", 1)[1], "url": parsed}
            )
        elif known.field.startswith("webhook_formats."):
            formats[known.field.split(".", 1)[1]] = (key, parsed)
        elif known.field.startswith("webhook_options.") and gate is not None:
            options.setdefault(gate, {})[known.field.split(".", 1)[1]] = (key, parsed)
        else:
            if known.field == "router.target":
                if target_from is not None:
                    problems[key] = f"give either {PREFIX}ingress or {PREFIX}httproute, not both"
                    continue
                target_from = key.removeprefix(PREFIX)
            _set(raw, known.field, parsed)
    for kind, (key, chosen) in formats.items():
        hooks = [hook for hook in raw.get("webhooks", []) if hook["type"] == kind]
        if not hooks:
            problems[key] = f"no {PREFIX}webhook.{kind} to format"
        for hook in hooks:
            hook["format"] = chosen
    for gate, chosen_options in options.items():
        hooks = [hook for hook in raw.get("webhooks", []) if hook["type"] == gate]
        for option_name, (key, chosen) in chosen_options.items():
            if not hooks:
                problems[key] = f"no {PREFIX}webhook.{gate} to apply it to"
            elif option_name == "metadata":
                try:
                    generated_load(gate, chosen)  # a load test's rps and at
                except ValueError as exc:
                    problems[key] = str(exc)
            for hook in hooks:
                hook[option_name] = chosen
                if option_name != "metadata" or not chosen or gate not in NOTIFICATION_TYPES:
                    continue  # a gate's metadata goes out in Flagger's payload, always
                shape = hook.get("format") or ("flagger" if gate == "event" else "slack")
                if shape not in METADATA_FORMATS:
                    problems[key] = (
                        f"{METADATA_RULE}; {PREFIX}webhook.{gate} posts {shape} (see its .format)"
                    )
    if not problems:
        _cross_check(raw, problems, target_from)
    if problems:
        raise SpecError(problems)
    spec = _build(raw)
    if spec.analysis.quantiles is not None and not spec.metrics.has_latency:
        raise SpecError(
            {
                PREFIX + "analysis.quantiles": "needs latency metrics: "
                + (
                    f"{PREFIX}metrics.latency-buckets with {PREFIX}metrics: custom"
                    if spec.metrics.preset == "custom"
                    else f"{PREFIX}metrics: {spec.metrics.preset} has no latency histogram"
                )
            }
        )
    try:
        spec.analysis_config()
    except ValueError as exc:
        # E.g. no metric left critical: the analysis could never fail.
        given = [
            a.key
            for a in ANNOTATIONS
            if a.field.startswith("analysis.") and a.key in (annotations or {})
        ]
        raise SpecError({", ".join(given) or PREFIX + "analysis": _first_line(exc)}) from exc
    return spec


def _first_line(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", "invalid")) for e in errors())
    return str(exc)


def _cross_check(raw: dict[str, Any], problems: dict[str, str], target_from: str | None) -> None:
    router = raw.get("router", {})
    kind = router.get("kind")
    if raw.get("enabled") and kind is None:
        problems[PREFIX + "router"] = "is required: ingress-nginx or gateway-api"
    target_key = {"ingress-nginx": "ingress", "gateway-api": "httproute"}.get(kind or "")
    if target_key is not None and "target" not in router:
        problems[PREFIX + target_key] = f"is required with {PREFIX}router: {kind}"
    if target_key is not None and target_from not in (None, target_key):
        problems[PREFIX + str(target_from)] = f"does not apply to {PREFIX}router: {kind}"
    if "target" in router and kind is None:
        problems[PREFIX + "router"] = "is required when a target is given"
    minimum = raw.get("min_step_s", 60.0)
    maximum = raw.get("max_step_s", 900.0)
    if maximum is not None and maximum < minimum:
        key = PREFIX + ("max-step-duration" if "max_step_s" in raw else "min-step-duration")
        problems[key] = (
            f"max-step-duration ({maximum:g}s) must be at least min-step-duration ({minimum:g}s)"
        )
    _cross_check_ab(raw, problems, kind)
    metrics = raw.get("metrics", {})
    if metrics.get("preset") == "custom":
        for field in ("requests", "errors"):
            if field not in metrics:
                problems[PREFIX + "metrics." + field] = f"is required with {PREFIX}metrics: custom"
    else:
        for field in ("requests", "errors", "latency_buckets"):
            if field in metrics:
                problems[_KEY_OF_FIELD["metrics." + field]] = (
                    f"only applies to {PREFIX}metrics: custom"
                )


def _cross_check_ab(raw: dict[str, Any], problems: dict[str, str], kind: str | None) -> None:
    """A/B mode: one match and a duration, and no weight steps beside them."""
    matches = [k for k in ("match_header", "match_cookie") if k in raw]
    if len(matches) > 1:
        problems[PREFIX + "match-cookie"] = (
            f"give either {PREFIX}match-header or match-cookie, not both"
        )
    elif matches and "ab_duration_s" not in raw:
        problems[_KEY_OF_FIELD[matches[0]]] = f"A/B mode also needs {PREFIX}ab-duration"
    if "ab_duration_s" in raw:
        if not matches:
            problems[PREFIX + "ab-duration"] = (
                f"A/B mode needs {PREFIX}match-header or {PREFIX}match-cookie"
            )
        if "steps" in raw:
            problems[PREFIX + "steps"] = (
                f"A/B mode ({PREFIX}ab-duration) replaces the weight steps; remove one of them"
            )
    cookie = raw.get("match_cookie")
    if kind == "ingress-nginx" and cookie is not None and Match.cookie(cookie).value != "always":
        problems[PREFIX + "match-cookie"] = (
            "ingress-nginx sends a cookie to the canary only when its value is `always`: "
            f"give the cookie name alone, got {excerpt(cookie)}"
        )
    if raw.get("affinity") is not None and kind == "gateway-api":
        problems[PREFIX + "affinity"] = (
            "Gateway API has no standard session affinity (HTTPRoute has no such field); "
            "refused rather than ignored: use ingress-nginx, or a header/cookie match"
        )


def _build(raw: dict[str, Any]) -> CanarySpec:
    try:
        return CanarySpec.model_validate(raw)
    except Exception as exc:  # pydantic's ValidationError: map its location back to a key
        errors = getattr(exc, "errors", None)
        if not callable(errors):
            raise
        problems: dict[str, str] = {}
        for error in errors():
            path = ".".join(str(p) for p in error.get("loc", ()))
            key = _KEY_OF_FIELD.get(path, PREFIX + path)
            problems[key] = str(error.get("msg", "invalid"))
        raise SpecError(problems) from exc


def dump_problems(error: SpecError) -> str:
    """The compact JSON kept in the spec-error annotation (at most MAX_PROBLEMS_SHOWN)."""
    shown = dict(sorted(error.problems.items())[:MAX_PROBLEMS_SHOWN])
    if len(error.problems) > len(shown):
        shown[PREFIX + "…"] = f"and {len(error.problems) - len(shown)} more problems"
    return json.dumps(shown, separators=(",", ":"), sort_keys=True)
