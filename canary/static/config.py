"""Static targets: the YAML file behind `canary run --config rollout.yaml`.

This is how services on hosts or VMs behind HAProxy use canary, and how the demo runs. One
file describes one service. Every model forbids unknown keys, so a typo (`min_setp_s`) is an
error rather than a silently ignored setting, and every error names the field path and the
file: ``rollout.yaml: steps[2]: must be greater than 25, got 20``.

Relative paths in the file (the HAProxy socket, the record directory) are relative to the
file's own directory, so a config works whatever the current directory is.

Example::

    name: checkout
    router:
      kind: haproxy
      socket: /run/haproxy/admin.sock
      backend: checkout
      primary_server: primary
      canary_server: canary
    metrics:
      kind: prometheus
      url: http://127.0.0.1:9090
      queries:
        selector: 'job="checkout"'
    steps: [5, 10, 25, 50]
    min_step_s: 60
    max_step_s: 900
    no_data_deadline_s: 120
    tick_s: 10
    analysis: {}
    expected_rps: 200  # optional: the time-to-pass estimate at the start uses it
    record_dir: records
    gate_failure_threshold: 5  # failed pre-rollout/rollout calls before a rollback
    webhooks:
      - url: https://hooks.slack.com/services/T0/B0/x  # no type: told of outcomes
        events: [promoted, rolled_back]
      - type: confirm-promotion  # a gate: 2xx lets the last step promote
        url: https://approvals.example.internal/checkout
        timeout_s: 10
        retries: 2
        metadata: {ticket: CHG-1234}
      - type: rollout  # called each tick while Progressing (drives a load tester)
        url: http://loadtester.example.internal/
        metadata: {url: "http://checkout-canary/", rps: "50", duration: "30s"}

Gate `type`s (Flagger's webhook kinds): confirm-rollout, pre-rollout, rollout,
confirm-traffic-increase, confirm-promotion, rollback (see canary.core.rollout).

A/B instead of weight steps: set `match_header: X-Canary=always` (or `match_cookie: canary`,
value "always"), `ab_duration_s: 300` and `router.ab_map: checkout-ab.map`, and leave out
`steps`. Only requests with `X-Canary: always` then reach the canary, for at least
`ab_duration_s`, and a pass promotes. The HAProxy backend needs the line
`use-server canary if { req.hdr(X-Canary),map_str(<ab_map>) -m str canary }`
(canary.routers.haproxy.ab_rule writes it). `router.affinity: cookie` goes with HAProxy's cookie
persistence: servers without traffic are then put in maintenance, so sticky clients leave them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from analysis import AnalysisConfig
from canary.core.advice import ExpectedTraffic
from canary.core.inputs import (
    MAX_DURATION_S,
    MAX_TIMEOUT_S,
    InputError,
    check_tick,
    clip,
    excerpt,
    load_yaml,
    read_text_file,
)
from canary.core.rollout import (
    DEFAULT_STEPS,
    RolloutSpec,
    check_steps,
)
from canary.metrics.prometheus import PromQueries
from canary.notify.gates import WithWebhooks
from canary.routers.base import Match

__all__ = [
    "ConfigError",
    "HAProxyRouterConfig",
    "PrometheusMetricsConfig",
    "TargetConfig",
    "format_validation_error",
    "load_config",
    "parse_config",
    "parse_steps",
    "read_yaml_file",
]

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


def parse_steps(value: object) -> tuple[int, ...]:
    """A `steps` key: a list of percentages the rollout machine accepts (a field validator's
    ValueError, so the message is placed under the key's path)."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of percentages, got {excerpt(value)}")
    return check_steps(tuple(value))


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are YAML floats, and never a sane setting
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class HAProxyRouterConfig(_Strict):
    """One HAProxy backend with two servers, driven over the runtime API."""

    kind: Literal["haproxy"]
    socket: Path  # the admin socket (`stats socket ... level admin`)
    backend: str
    primary_server: str = "primary"
    canary_server: str = "canary"
    # Where weights are saved so they survive a reload (`server-state-file`).
    state_file: Path | None = None
    timeout_s: float = Field(default=5.0, gt=0, le=MAX_TIMEOUT_S)
    # A/B: the map file the backend's `use-server` rule looks the header/cookie up in.
    ab_map: Path | None = None
    # Cookie persistence configured in haproxy.cfg: servers without traffic are put in
    # maintenance so that persistent clients leave them (see canary.routers.haproxy).
    affinity: Literal["cookie"] | None = None

    @field_validator("ab_map")
    @classmethod
    def _map_path(cls, value: Path | None) -> Path | None:
        if value is not None and any(c.isspace() or c == ";" for c in str(value)):
            raise ValueError(f"must be a path without spaces or ';', got {excerpt(str(value))}")
        return value

    @field_validator("backend", "primary_server", "canary_server")
    @classmethod
    def _haproxy_name(cls, value: str) -> str:
        if not value or any(c.isspace() or c in "/;" for c in value):
            raise ValueError(
                f"must be a non-empty name without spaces, '/' or ';', got {excerpt(value)}"
            )
        return value

    @model_validator(mode="after")
    def _distinct(self) -> HAProxyRouterConfig:
        if self.primary_server == self.canary_server:
            raise ValueError(
                f"primary_server and canary_server must differ, both are {self.primary_server!r}"
            )
        return self


class PrometheusMetricsConfig(_Strict):
    kind: Literal["prometheus"]
    url: str
    queries: PromQueries = Field(default_factory=PromQueries)
    timeout_s: float = Field(default=5.0, gt=0, le=MAX_TIMEOUT_S)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {excerpt(value)}")
        return value.rstrip("/")


# More kinds (powerdns, ...) join these unions with their own `kind`.
RouterConfig = Annotated[HAProxyRouterConfig, Field(discriminator="kind")]
MetricsConfig = Annotated[PrometheusMetricsConfig, Field(discriminator="kind")]


class TargetConfig(_Strict, WithWebhooks, ExpectedTraffic):
    """One static target: a service, its router, its metrics, and how to roll out."""

    name: str
    router: RouterConfig
    metrics: MetricsConfig
    steps: tuple[int, ...] = DEFAULT_STEPS
    # Finite and at most a week (`max_step_s: null` waits forever); ticks 0.05 s .. 1 h.
    min_step_s: float = Field(default=60.0, ge=0, le=MAX_DURATION_S)
    max_step_s: float | None = Field(default=900.0, gt=0, le=MAX_DURATION_S)
    no_data_deadline_s: float = Field(default=120.0, gt=0, le=MAX_DURATION_S)
    tick_s: float = Field(default=10.0, gt=0)
    # Alpha, tolerances, critical metrics: analysis.AnalysisConfig, checked field by field.
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    record_dir: Path = Path("records")
    # Free-form labels for the record and reports.
    primary_version: str = ""
    canary_version: str = ""
    # `webhooks:` (notifications and gates) and `gate_failure_threshold`: WithWebhooks
    # `expected_rps`, `expected_error_rate`, `generated_rps`, `generated_at` (the traffic at
    # HAProxy the planner assumes at the start): ExpectedTraffic

    # A/B mode instead of `steps`: route only matching requests to the canary.
    match_header: str | None = None  # "X-Canary=always"
    match_cookie: str | None = None  # "canary" (value "always") or "canary=yes"
    ab_duration_s: float | None = Field(default=None, ge=0, le=MAX_DURATION_S)

    @field_validator("match_header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        if value is not None:
            Match.header(value)
        return value

    @field_validator("match_cookie")
    @classmethod
    def _cookie(cls, value: str | None) -> str | None:
        if value is not None:
            Match.cookie(value)
        return value

    @property
    def match(self) -> Match | None:
        """The A/B match, or None for weight steps."""
        if self.match_header is not None:
            return Match.header(self.match_header)
        if self.match_cookie is not None:
            return Match.cookie(self.match_cookie)
        return None

    @model_validator(mode="after")
    def _ab(self) -> TargetConfig:
        matches = [k for k in ("match_header", "match_cookie") if getattr(self, k) is not None]
        if len(matches) > 1:
            raise ValueError("match_header and match_cookie: set one A/B match, not both")
        if matches and self.ab_duration_s is None:
            raise ValueError(f"{matches[0]}: A/B mode also needs ab_duration_s")
        if self.ab_duration_s is not None:
            if not matches:
                raise ValueError("ab_duration_s: A/B mode needs match_header or match_cookie")
            if "steps" in self.model_fields_set:
                raise ValueError(
                    "steps: A/B mode (ab_duration_s) replaces the weight steps; remove one of them"
                )
            if self.router.ab_map is None:
                raise ValueError(
                    "router.ab_map: A/B mode on HAProxy needs the map file the backend's "
                    "use-server rule reads"
                )
        elif self.router.ab_map is not None:
            raise ValueError("router.ab_map: only used in A/B mode (ab_duration_s)")
        return self

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "must be 1-63 lowercase letters, digits, '.', '_' or '-', "
                f"starting and ending with a letter or digit, got {excerpt(value)}"
            )
        return value

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: object) -> tuple[int, ...]:
        return parse_steps(value)

    @field_validator("tick_s")
    @classmethod
    def _tick(cls, value: float) -> float:
        return check_tick(value)

    @model_validator(mode="after")
    def _timing(self) -> TargetConfig:
        if self.max_step_s is not None and self.max_step_s < self.min_step_s:
            raise ValueError(
                f"max_step_s ({self.max_step_s:g}) must be at least min_step_s ({self.min_step_s:g})"
            )
        if (
            self.metrics.queries.latency_buckets is None
            and "quantiles" in self.analysis.model_fields_set
            and self.analysis.quantiles
        ):
            raise ValueError(
                "analysis.quantiles needs latency metrics: metrics.queries.latency_buckets is null"
            )
        return self

    def rollout_spec(self) -> RolloutSpec:
        """The pure machine's view of this target."""
        return RolloutSpec(
            steps=self.steps,
            min_step_s=self.min_step_s,
            max_step_s=self.max_step_s,
            no_data_deadline_s=self.no_data_deadline_s,
            promotion="shift",  # static targets: the canary server keeps the traffic
            gates=self.gate_kinds(),
            gate_failure_threshold=self.gate_failure_threshold,
            ab_duration_s=self.ab_duration_s,
        )

    def analysis_config(self) -> AnalysisConfig:
        """The analysis settings in force (defaults filled in). Without a latency histogram
        (metrics.queries.latency_buckets: null) there are no latency metrics: they would
        never have data, and a metric without data never passes, so no canary could be
        promoted."""
        if self.metrics.queries.latency_buckets is None:
            return AnalysisConfig.model_validate({**self.analysis.model_dump(), "quantiles": ()})
        return self.analysis

    def resolved(self, base: Path) -> TargetConfig:
        """Relative paths made absolute against `base` (the config file's directory)."""

        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else base / path

        router = self.router.model_copy(
            update={
                "socket": absolute(self.router.socket),
                "state_file": None
                if self.router.state_file is None
                else absolute(self.router.state_file),
                "ab_map": None if self.router.ab_map is None else absolute(self.router.ab_map),
            }
        )
        return self.model_copy(update={"router": router, "record_dir": absolute(self.record_dir)})


# A model-level validator's message that starts with the key(s) it is about ("steps: ...").
_NAMES_A_KEY = re.compile(r"^[a-z_]+(\.[a-z_]+)*( and [a-z_]+)?: ")


def _location(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("haproxy", "prometheus") and path in ("router", "metrics"):
            continue  # pydantic adds the discriminator's tag; the user never wrote it
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def format_validation_error(error: ValidationError, *, source: str) -> str:
    """One line per problem: `source: field.path: message`."""
    lines = []
    for problem in error.errors():
        where = _location(tuple(problem["loc"]))
        message = str(problem["msg"])
        message = message.removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key (typo?)"
        elif problem["type"] == "missing":
            message = "required key is missing"
        elif problem["type"] in ("union_tag_invalid", "union_tag_not_found"):
            context = problem.get("ctx") or {}
            where = f"{where}.{context.get('discriminator', 'kind')}".replace("'", "")
            if problem["type"] == "union_tag_not_found":
                message = "required key is missing"
            else:
                message = (
                    f"must be one of {context.get('expected_tags')}, got {context.get('tag')!r}"
                )
        # A key or a message may quote a value of any size: at most an excerpt of each.
        message = clip(message, 300)
        # A validator that named the item did so from its own key (webhooks[1].url: ...):
        # the path above that key goes in front (services[0].webhooks[1].url: ...).
        above, _, key = where.rpartition(".")
        if message.startswith((f"{key}[", f"{key}:")):
            lines.append(f"{source}: {above + '.' if above else ''}{message}")
        elif where == "(top level)" and _NAMES_A_KEY.match(message):
            lines.append(f"{source}: {message}")
        else:
            lines.append(f"{source}: {clip(where, 120)}: {message}")
    return "\n".join(lines)


def parse_config(data: object, *, source: str = "config", base: Path | None = None) -> TargetConfig:
    """Validate already-parsed YAML/JSON. Raises ConfigError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of settings, got {type(data).__name__}"
        )
    try:
        config = TargetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source)) from None
    except (TypeError, OverflowError) as exc:  # a validator's own error, not pydantic's
        raise ConfigError(f"{source}: {type(exc).__name__}: {clip(str(exc))}") from None
    return config.resolved(base) if base is not None else config


def read_yaml_file(path: Path) -> object:
    """The parsed YAML in `path`, read within canary.core.inputs' bounds (size, nesting,
    aliases, UTF-8). Raises ConfigError naming the file (and line, column)."""
    try:
        data = load_yaml(read_text_file(path), source=str(path))
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    return data


def load_config(path: str | Path) -> TargetConfig:
    """Read and validate one YAML config file. Raises ConfigError naming the file and field."""
    path = Path(path)
    return parse_config(read_yaml_file(path), source=str(path), base=path.resolve().parent)
