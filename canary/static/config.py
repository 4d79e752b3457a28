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
    DEFAULT_GATE_FAILURE_THRESHOLD,
    DEFAULT_STEPS,
    RolloutSpec,
    check_steps,
)
from canary.metrics.prometheus import PromQueries
from canary.notify.gates import GateConfig
from canary.notify.webhooks import WebhookConfig

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


class TargetConfig(_Strict):
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
    # The traffic the planner assumes at the start of a rollout (requests/s at HAProxy, the
    # primary's error rate), to say at once how long a good canary needs to pass the first
    # step; null: the first estimate comes after a minute of observed traffic.
    expected_rps: float | None = Field(default=None, gt=0, le=1e7, allow_inf_nan=False)
    expected_error_rate: float = Field(default=0.01, ge=0, lt=1, allow_inf_nan=False)
    # A load test that a rollout hook runs (`canary loadtest`): the requests/s it adds and
    # where (entry: through HAProxy, split like real traffic; canary: the canary alone). The
    # planner's advice counts it; null: none.
    generated_rps: float | None = Field(default=None, gt=0, le=1e5, allow_inf_nan=False)
    generated_at: Literal["entry", "canary"] = "entry"
    record_dir: Path = Path("records")
    # Free-form labels for the record and reports.
    primary_version: str = ""
    canary_version: str = ""
    # Chat/incident webhooks told of promotion, rollback, failover and manual actions, and
    # (with a `type:`) gate webhooks the rollout waits for (canary.notify.gates).
    webhooks: list[WebhookConfig | GateConfig] = Field(default_factory=list)
    gate_failure_threshold: int = Field(default=DEFAULT_GATE_FAILURE_THRESHOLD, ge=1, le=100)

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhooks(cls, value: object) -> object:
        """An entry with a `type` is a gate, one without a notification; errors name the
        entry (webhooks[1].url: ...)."""
        if not isinstance(value, list):
            return value
        hooks: list[WebhookConfig | GateConfig] = []
        for index, item in enumerate(value):
            model: type[WebhookConfig] | type[GateConfig] = (
                GateConfig if isinstance(item, dict) and "type" in item else WebhookConfig
            )
            try:
                hooks.append(model.model_validate(item))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                message = str(first["msg"]).removeprefix("Value error, ")
                if first["type"] == "extra_forbidden":
                    message = "unknown key (typo?)"
                raise ValueError(f"webhooks[{index}].{where}: {message}") from None
        return hooks

    @property
    def notifications(self) -> list[WebhookConfig]:
        return [h for h in self.webhooks if isinstance(h, WebhookConfig)]

    @property
    def gates(self) -> list[GateConfig]:
        return [h for h in self.webhooks if isinstance(h, GateConfig)]

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
            gates=tuple(dict.fromkeys(g.type for g in self.gates)),
            gate_failure_threshold=self.gate_failure_threshold,
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
            }
        )
        return self.model_copy(update={"router": router, "record_dir": absolute(self.record_dir)})


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
        if message.startswith(f"{where}[") or message.startswith(f"{where}:"):
            lines.append(f"{source}: {message}")  # the validator already named the item
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
