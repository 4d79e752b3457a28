"""The two-cluster topology file: which clusters, which services, how traffic moves between them.

A platform team runs a primary and a canary cluster; the canary cluster is also the standby.
One YAML file says, for each cluster, how to reach its API (kubeconfig context), where its
entry point is (the ingress address that DNS or a global load balancer points at) and where
its metrics are; and for each service its DNS name, the router that splits traffic between
the two entry points, the steady-state weights, the failover policy and the health checks.

Why one Prometheus block per cluster, each with a URL *and* a selector: with one Prometheus
per cluster the URLs differ; with one shared Prometheus (Thanos, Mimir) the URLs are the same
and the selectors (`cluster="eu-1"`) tell the clusters apart. One shape covers both.

Secrets (the PowerDNS API key) are never in the file: it names the environment variable.

Errors name the file and the field, as canary/config.py's do (`two-clusters.yaml:
services[0].router.zone: ...`), and unknown keys are errors.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from canary.core.advice import ExpectedTraffic
from canary.core.failover import FailoverPolicy
from canary.core.inputs import MAX_DURATION_S, MAX_TIMEOUT_S, check_tick, excerpt
from canary.core.rollout import RolloutSpec
from canary.notify.gates import WithWebhooks
from canary.static.config import ConfigError, format_validation_error, parse_steps, read_yaml_file

if TYPE_CHECKING:
    from analysis import AnalysisConfig

__all__ = [
    "ClusterConfig",
    "ExternalDNSRouterConfig",
    "GlobalHAProxyRouterConfig",
    "HealthConfig",
    "PowerDNSRouterConfig",
    "ServiceConfig",
    "Topology",
    "load_topology",
    "parse_topology",
]

TWO_CLUSTER_STEPS: tuple[int, ...] = (25, 50)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(
    r"^(?=.{1,253}\.?$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)
_METRIC = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are YAML floats, and never a sane setting
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _matchers(value: str) -> str:
    """Label matchers only (`job="shop",cluster="eu-1"`): no braces, functions or ranges."""
    if any(c in _QUOTED.sub('""', value) for c in "{}[]()"):
        raise ValueError(
            f"must be label matchers only, like 'cluster=\"eu-1\"', got {excerpt(value)}"
        )
    return value.strip().strip(",")


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://, got {excerpt(value)}")
    return value.rstrip("/")


def _dns_label(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"must be 1-63 lowercase letters, digits or '-', starting and ending with a "
            f"letter or digit, got {excerpt(value)}"
        )
    return value


class ClusterPrometheus(_Strict):
    """Where a cluster's metrics are: its own Prometheus, or a shared one plus a selector."""

    url: str
    selector: str = ""  # e.g. cluster="eu-1" in a shared Prometheus
    timeout_s: float = Field(default=5.0, gt=0, le=MAX_TIMEOUT_S)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        return _matchers(value)


class ClusterConfig(_Strict):
    name: str  # for records, Events and `canary failover` output
    context: str | None = None  # kubeconfig context (None: the current one)
    kubeconfig: Path | None = None  # None: $KUBECONFIG or ~/.kube/config, as kubectl
    entry_point: str  # the ingress address DNS points at: IPv4, IPv6 or a DNS name
    prometheus: ClusterPrometheus

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value)

    @field_validator("entry_point")
    @classmethod
    def _entry_point(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _DNS_NAME.match(value):
                raise ValueError(
                    f"must be an IP address or a DNS name, got {excerpt(value)}"
                ) from None
        return value


class Clusters(_Strict):
    primary: ClusterConfig
    canary: ClusterConfig  # also the standby

    @model_validator(mode="after")
    def _distinct(self) -> Clusters:
        if self.primary.name == self.canary.name:
            raise ValueError(
                f"primary and canary must have different names, both are {self.primary.name!r}"
            )
        if self.primary.entry_point == self.canary.entry_point:
            raise ValueError(
                f"primary and canary must have different entry points, both are {self.primary.entry_point!r}"
            )
        same_prom = self.primary.prometheus.url == self.canary.prometheus.url
        if same_prom and self.primary.prometheus.selector == self.canary.prometheus.selector:
            raise ValueError(
                "both clusters read the same Prometheus with the same selector, so their metrics "
                'cannot be told apart: give each cluster a prometheus.selector such as cluster="eu-1"'
            )
        return self


class PowerDNSRouterConfig(_Strict):
    """A LUA `pickwrandom` record through the PowerDNS HTTP API."""

    kind: Literal["powerdns"]
    api_url: str
    api_key_env: str = "PDNS_API_KEY"  # the key itself never sits in the file
    zone: str
    server_id: str = "localhost"
    ttl: int = Field(default=5, ge=1, le=3600)
    # Where to resolve the name after each write (a broken LUA record answers SERVFAIL).
    dns_server: str | None = None
    dns_port: int = Field(default=53, ge=1, le=65535)

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
            raise ValueError(f"must be an environment variable name, got {excerpt(value)}")
        return value

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"router.api_key_env: ${self.api_key_env} is not set")
        return key


class ExternalDNSRouterConfig(_Strict):
    """Route 53 weighted records through external-dns, written in each cluster."""

    kind: Literal["external-dns"]
    # annotations: set-identifier + aws-weight on a Service or Ingress in each cluster;
    # dnsendpoint: a DNSEndpoint object (externaldns.k8s.io/v1alpha1) in each cluster.
    mode: Literal["annotations", "dnsendpoint"] = "annotations"
    resource: Literal["service", "ingress"] = "service"  # annotations mode only
    # dnsendpoint mode: "each" cluster publishes its own record, or the "canary" cluster
    # publishes both (so a failover needs nothing from a primary cluster that is down).
    placement: Literal["each", "canary"] = "each"
    object_name: str | None = None  # default: the service's deployment name
    set_identifiers: dict[str, str] = Field(
        default_factory=lambda: {"primary": "primary", "canary": "canary"}
    )
    ttl: int = Field(default=60, ge=1)

    @model_validator(mode="after")
    def _placement(self) -> ExternalDNSRouterConfig:
        if self.placement == "canary" and self.mode != "dnsendpoint":
            raise ValueError("placement: canary needs mode: dnsendpoint (one object, both records)")
        return self

    @field_validator("set_identifiers")
    @classmethod
    def _both(cls, value: dict[str, str]) -> dict[str, str]:
        if set(value) != {"primary", "canary"}:
            raise ValueError(f"must name both primary and canary, got {sorted(value)}")
        if value["primary"] == value["canary"]:
            raise ValueError(f"primary and canary must differ, both are {value['primary']!r}")
        return value


class GlobalHAProxyRouterConfig(_Strict):
    """A global HAProxy in front of both clusters' entry points (one server each)."""

    kind: Literal["haproxy"]
    socket: Path
    backend: str
    primary_server: str = "primary"
    canary_server: str = "canary"


RouterConfig = Annotated[
    PowerDNSRouterConfig | ExternalDNSRouterConfig | GlobalHAProxyRouterConfig,
    Field(discriminator="kind"),
]


class HealthConfig(_Strict):
    """How each cluster's entry point is probed (canary/health.py)."""

    path: str = "/healthz"
    port: int = Field(default=80, ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    timeout_s: float = Field(default=2.0, gt=0, le=MAX_TIMEOUT_S)
    interval_s: float = Field(default=5.0, gt=0, le=MAX_TIMEOUT_S)
    # Above this 5xx ratio (over the last minute, from the cluster's Prometheus) the cluster
    # is unhealthy; None: no error-ratio check.
    error_ratio_threshold: float | None = Field(default=None, gt=0, le=1)
    # Count an unreachable Kubernetes API as unhealthy.
    check_api: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {excerpt(value)}")
        return value


class MetricsConfig(_Strict):
    """Which series count requests, errors and latency; the cluster's selector is added."""

    requests: str = "http_requests_total"
    errors_matcher: str = 'code=~"5.."'
    latency_buckets: str | None = "http_request_duration_seconds_bucket"
    selector: str = ""  # e.g. job="shop"

    @field_validator("requests", "latency_buckets")
    @classmethod
    def _metric(cls, value: str | None) -> str | None:
        if value is not None and not _METRIC.match(value):
            raise ValueError(f"must be a metric name, got {excerpt(value)}")
        return value

    @field_validator("selector", "errors_matcher")
    @classmethod
    def _sel(cls, value: str) -> str:
        return _matchers(value)


class ServiceConfig(_Strict, WithWebhooks, ExpectedTraffic):
    name: str
    dns_name: str
    namespace: str = "default"
    deployment: str  # the same name in both clusters; the canary cluster's is annotated
    router: RouterConfig
    # The canary cluster's share when no rollout runs: warm standby traffic.
    steady_canary_percent: int = Field(default=10, ge=0, le=50)
    failover: FailoverPolicy = Field(default_factory=FailoverPolicy)
    health: HealthConfig = Field(default_factory=HealthConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    # Above the steady share: the canary cluster already serves 10% between rollouts.
    steps: tuple[int, ...] = TWO_CLUSTER_STEPS
    # Finite and at most a week (`max_step_s: null` waits forever); ticks 0.05 s .. 1 h.
    min_step_s: float = Field(default=60.0, ge=0, le=MAX_DURATION_S)
    max_step_s: float | None = Field(default=900.0, gt=0, le=MAX_DURATION_S)
    no_data_deadline_s: float = Field(default=120.0, gt=0, le=MAX_DURATION_S)
    tick_s: float = Field(default=10.0, gt=0)
    # for the primary's Deployment
    rollout_timeout_s: float = Field(default=600.0, gt=0, le=MAX_DURATION_S)
    analysis: dict[str, Any] = Field(default_factory=dict)
    # `webhooks:` (notifications of promotions, rollbacks, failovers and manual actions;
    # gates, with a `type:`, as in a static config) and `gate_failure_threshold`: WithWebhooks
    # `expected_rps` (requests/s at the service's DNS name, both clusters), `expected_error_rate`,
    # `generated_rps`, `generated_at`: the planner's estimate at the start, as in a static
    # config (ExpectedTraffic)

    @field_validator("name", "deployment")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value)

    @field_validator("dns_name")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not _DNS_NAME.match(value):
            raise ValueError(f"must be a fully qualified DNS name, got {excerpt(value)}")
        return value.rstrip(".") + "."

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: object) -> tuple[int, ...]:
        return parse_steps(value)

    @field_validator("tick_s")
    @classmethod
    def _tick(cls, value: float) -> float:
        return check_tick(value)

    @model_validator(mode="after")
    def _consistent(self) -> ServiceConfig:
        if self.steps[0] <= self.steady_canary_percent:
            raise ValueError(
                f"steps[0] ({self.steps[0]}) must be above steady_canary_percent "
                f"({self.steady_canary_percent}): a rollout moves more traffic to the canary cluster"
            )
        if self.max_step_s is not None and self.max_step_s < self.min_step_s:
            raise ValueError(
                f"max_step_s ({self.max_step_s:g}) must be at least min_step_s ({self.min_step_s:g})"
            )
        if isinstance(self.router, PowerDNSRouterConfig):
            zone = self.router.zone.rstrip(".") + "."
            if not self.dns_name.endswith("." + zone):
                raise ValueError(f"dns_name {self.dns_name!r} is not inside router.zone {zone!r}")
        if self.metrics.latency_buckets is None and self.analysis.get("quantiles"):
            raise ValueError(
                "analysis.quantiles needs latency metrics: metrics.latency_buckets is null"
            )
        if self.analysis:
            self.analysis_config()
        return self

    def analysis_config(self) -> AnalysisConfig:
        """The analysis' configuration (analysis.AnalysisConfig). Without a latency histogram
        (metrics.latency_buckets: null) there are no latency metrics: they would never have
        data, and a metric without data never passes, so no canary could be promoted."""
        from analysis import AnalysisConfig

        config: AnalysisConfig = AnalysisConfig.model_validate(self.analysis)
        if self.metrics.latency_buckets is None:
            config = AnalysisConfig.model_validate({**config.model_dump(), "quantiles": ()})
        return config

    def rollout_spec(self) -> RolloutSpec:
        # "copy": after a pass the template goes to the primary cluster and the canary
        # cluster's share goes back down, as Flagger does within one cluster.
        return RolloutSpec(
            steps=self.steps,
            min_step_s=self.min_step_s,
            max_step_s=self.max_step_s,
            no_data_deadline_s=self.no_data_deadline_s,
            promotion="copy",
            gates=self.gate_kinds(),
            gate_failure_threshold=self.gate_failure_threshold,
        )


class Topology(_Strict):
    clusters: Clusters
    services: list[ServiceConfig] = Field(min_length=1)
    state_dir: Path = Path("state")  # failover state files
    # Also mirror each service's failover state into a ConfigMap in this namespace of the
    # canary cluster (the one still up during an outage), so a controller pod that restarts
    # on an empty disk resumes from it. None: the state files only.
    state_namespace: str | None = None
    record_dir: Path = Path("records")

    @model_validator(mode="after")
    def _unique(self) -> Topology:
        for attr in ("name", "dns_name"):
            seen: set[str] = set()
            for index, service in enumerate(self.services):
                value = getattr(service, attr)
                if value in seen:
                    raise ValueError(f"services[{index}].{attr}: {excerpt(value)} is used twice")
                seen.add(value)
        return self

    def service(self, name: str) -> ServiceConfig:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)

    def resolved(self, base: Path) -> Topology:
        """Relative paths made absolute against the file's directory."""

        def absolute(path: Path | None) -> Path | None:
            return None if path is None or path.is_absolute() else base / path

        def fix_cluster(cluster: ClusterConfig) -> ClusterConfig:
            if cluster.kubeconfig is None or cluster.kubeconfig.is_absolute():
                return cluster
            return cluster.model_copy(update={"kubeconfig": base / cluster.kubeconfig})

        clusters = Clusters(
            primary=fix_cluster(self.clusters.primary), canary=fix_cluster(self.clusters.canary)
        )
        services = []
        for service in self.services:
            router = service.router
            if isinstance(router, GlobalHAProxyRouterConfig) and not router.socket.is_absolute():
                router = router.model_copy(update={"socket": base / router.socket})
            services.append(service.model_copy(update={"router": router}))
        return self.model_copy(
            update={
                "clusters": clusters,
                "services": services,
                "state_dir": absolute(self.state_dir) or self.state_dir,
                "record_dir": absolute(self.record_dir) or self.record_dir,
            }
        )


def parse_topology(data: object, *, source: str = "topology", base: Path | None = None) -> Topology:
    """Validate parsed YAML. Raises ConfigError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        topology = Topology.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc, source=source)
        # pydantic names the union member it tried; the user wrote `kind`, not the tag
        for tag in ("powerdns", "external-dns", "haproxy"):
            message = message.replace(f"router.{tag}.", "router.")
        raise ConfigError(message) from None
    except (TypeError, OverflowError) as exc:  # a validator's own error, not pydantic's
        raise ConfigError(f"{source}: {type(exc).__name__}: {str(exc)[:200]}") from None
    return topology.resolved(base) if base is not None else topology


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file. Raises ConfigError naming the file and field."""
    path = Path(path)
    return parse_topology(read_yaml_file(path), source=str(path), base=path.resolve().parent)
