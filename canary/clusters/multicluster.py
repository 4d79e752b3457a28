"""Two clusters: cross-cluster canary rollouts by DNS weight, with failover to the standby beside.

For each service of a topology (canary/topology.py) this module runs two loops:

- `CrossClusterRollouts` watches the service's Deployment in the canary cluster. When its pod
  template differs from the primary cluster's (the primary's template *is* the last promoted
  one, so no other state is needed), it runs D's `RolloutRunner` around the pure machine:
  the DNS weight moves to the canary cluster in steps, the analysis compares the canary
  cluster's metrics with the primary cluster's, and
  - on pass (`Promote`), the template is applied to the primary cluster's Deployment and
    canary waits until it has rolled out (kube.deployment_rollout), then the weights go back
    to the steady state;
  - on fail, the machine sets the canary cluster's weight to 0; then the canary cluster's
    Deployment is reverted to the primary's template and, once that has rolled out, the
    steady-state weights return (the canary cluster is the warm standby again).
- `FailoverController` (canary/failover_controller.py) probes both entry points and moves all
  traffic to the standby when the primary is down. A failover aborts a rollout in progress
  through the runner's own command queue (so the abort is recorded like any manual one), and
  with `canary_on_standby: revert-first` reverts the standby before it serves everything.

While failed over no rollout starts, and the steady-state weights are left alone: the weights
belong to the failover controller until failback.

Manual failover is served over HTTP next to the rollouts (`/failover`, added through the
server's extension hook) and driven by `canary failover` / `canary failback` (canary.cli.clusters,
which also runs all this as `canary clusters`), so it is idempotent, refused when the target is
unhealthy unless forced, and recorded with who, when and why in the record, the status and
Kubernetes Events.

A service's webhooks (canary/notify.py, one Notifier per service) are fed every failover entry
and every entry of its rollouts' records, so chat hears of exactly what is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web

from analysis import Analyzer
from canary.clusters.failover_controller import FailoverController, FailoverRefused, save_state
from canary.clusters.health import (
    CheckResult,
    EntryPointHealth,
    HealthMonitor,
    error_ratio_check,
    http_check,
)
from canary.clusters.topology import (
    ClusterConfig,
    ClusterPrometheus,
    ExternalDNSRouterConfig,
    GlobalHAProxyRouterConfig,
    MetricsConfig,
    PowerDNSRouterConfig,
    ServiceConfig,
    Topology,
)
from canary.core.failover import FailoverCommand, FailoverState, Mode, Probe
from canary.core.records import FailoverEntry, NoteEntry
from canary.core.rollout import Command, RolloutStatus
from canary.executors import run_blocking
from canary.httpio import read_bounded
from canary.kubernetes.client import (
    Conflict,
    EventRecorder,
    Kube,
    KubeError,
    NotFound,
    ObjectRef,
    deployment_rollout,
)
from canary.kubernetes.spec import PREFIX
from canary.metrics.prometheus import (
    ArmsCounts,
    MetricsResult,
    NoData,
    PrometheusMetrics,
    PromQueries,
)
from canary.notify.gates import GateCaller, load_from_gates
from canary.notify.webhooks import Notifier
from canary.retry import ONCE_MORE, retrying
from canary.routers.base import RouterError, TrafficRouter, set_and_verify
from canary.runner import (
    AnalyzerLike,
    CommandResult,
    FileStateStore,
    RecordWriter,
    RolloutRunner,
    Telemetry,
)
from canary.server.app import authenticated_who

__all__ = [
    "ENABLED_ANNOTATION",
    "ClusterPairMetrics",
    "CrossClusterRollouts",
    "DeploymentPair",
    "MultiClusterController",
    "StateMirror",
    "TwoClusterService",
    "build_router",
    "cluster_metrics",
    "error_ratio_probe",
    "failover_routes",
    "merge_replace",
    "template_revision",
]

log = logging.getLogger("canary.clusters.multicluster")

# The error ratio's answer is one sample; anything near this is not an answer to that query.
PROMETHEUS_ANSWER_BYTES = 1024 * 1024

# The canary cluster's Deployment opts in with this annotation set to "true".
ENABLED_ANNOTATION = PREFIX + "two-clusters"
JSON = dict[str, Any]


# ---- metrics: each arm from its own cluster ---------------------------------------------


def cluster_queries(metrics: MetricsConfig, cluster: ClusterPrometheus) -> PromQueries:
    """Series selectors for one cluster: the service's matchers plus the cluster's.

    The arms are told apart by *where* they are read (URL + cluster selector), not by an arm
    label, so the templates carry no `{arm}`; PromQueries' validator insists on one for the
    one-Prometheus-two-arms case, hence model_construct over parts validated by topology.py.
    """
    matchers = ",".join(m for m in (metrics.selector, cluster.selector) if m)
    requests = f"{metrics.requests}{{{matchers}}}"
    errors = f"{metrics.requests}{{{','.join(m for m in (metrics.errors_matcher, matchers) if m)}}}"
    latency = (
        None if metrics.latency_buckets is None else f"{metrics.latency_buckets}{{{matchers}}}"
    )
    return PromQueries.model_construct(
        requests=requests,
        errors=errors,
        latency_buckets=latency,
        selector="",
        primary_arm="primary",
        canary_arm="canary",
        use_created=True,
        lookback_s=300.0,
    )


@dataclass
class ClusterPairMetrics:
    """MetricsProvider: the primary arm from the primary cluster, the canary arm from the canary
    cluster. Each side's provider answers for both arms with the same selectors, and only its
    own half is kept (twice the queries of one shared provider; simple, and exact)."""

    primary: PrometheusMetrics
    canary: PrometheusMetrics

    async def fetch(self, *, since: float, now: float) -> MetricsResult:
        primary, canary = await asyncio.gather(
            self.primary.fetch(since=since, now=now), self.canary.fetch(since=since, now=now)
        )
        if isinstance(primary, NoData):
            return NoData(f"primary cluster: {primary.reason}")
        if isinstance(canary, NoData):
            return NoData(f"canary cluster: {canary.reason}")
        return ArmsCounts(primary=primary.primary, canary=canary.canary)

    def close(self) -> None:
        self.primary.close()
        self.canary.close()


def cluster_metrics(topology: Topology, service: ServiceConfig) -> ClusterPairMetrics:
    def side(cluster: ClusterConfig) -> PrometheusMetrics:
        return PrometheusMetrics(
            cluster.prometheus.url,
            queries=cluster_queries(service.metrics, cluster.prometheus),
            timeout_s=cluster.prometheus.timeout_s,
        )

    return ClusterPairMetrics(side(topology.clusters.primary), side(topology.clusters.canary))


# ---- the Deployment in both clusters ----------------------------------------------------


def template_revision(template: JSON) -> str:
    """A short, stable name for a pod template (canonical JSON, sha256)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def merge_replace(old: Any, new: Any) -> Any:
    """A JSON merge patch that turns `old` into exactly `new` (keys only in `old` become null)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: JSON = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old or old[key] != value:
            patch[key] = merge_replace(old.get(key), value)
    return patch


def _image(template: JSON) -> str:
    containers = (template.get("spec") or {}).get("containers") or []
    return ",".join(str(c.get("image", "?")) for c in containers)


@dataclass
class DeploymentPair:
    """The service's Deployment in the primary and the canary cluster (same namespace/name)."""

    primary: Kube
    canary: Kube
    namespace: str
    name: str
    rollout_timeout_s: float = 600.0
    poll_s: float = 1.0

    async def read(self) -> tuple[JSON, JSON]:
        primary, canary = await asyncio.gather(
            self.primary.get_deployment(self.namespace, self.name),
            self.canary.get_deployment(self.namespace, self.name),
        )
        return primary, canary

    def ref(self, deployment: JSON) -> ObjectRef:
        return ObjectRef.deployment(deployment)

    async def apply_template(self, kube: Kube, template: JSON, *, where: str) -> None:
        """Make `kube`'s Deployment run `template`, then wait until it has rolled out."""
        current = await kube.get_deployment(self.namespace, self.name)
        old = (current.get("spec") or {}).get("template") or {}
        if old != template:
            await kube.patch_deployment(
                self.namespace,
                self.name,
                {"spec": {"template": merge_replace(old, template)}},
                resource_version=current["metadata"]["resourceVersion"],
            )
        await self.wait_rolled_out(kube, where=where)

    async def wait_rolled_out(self, kube: Kube, *, where: str) -> None:
        deadline = time.monotonic() + self.rollout_timeout_s
        while True:
            state, message = deployment_rollout(
                await kube.get_deployment(self.namespace, self.name)
            )
            if state == "done":
                return
            if state == "failed":
                raise RuntimeError(f"{where}: {message}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{where}: not rolled out after {self.rollout_timeout_s:g}s: {message}"
                )
            await asyncio.sleep(self.poll_s)


class PrimaryClusterWorkload:
    """The runner's Workload for a cross-cluster rollout: promotion applies the canary
    cluster's template to the primary cluster's Deployment (and waits, in apply_template,
    until it has rolled out); the canary cluster's size is its own business."""

    def __init__(self, pair: DeploymentPair, template: JSON) -> None:
        self.pair = pair
        self.template = template

    async def promote(self, revision: str) -> None:
        pair = self.pair
        await pair.apply_template(
            pair.primary,
            self.template,
            where=f"primary cluster Deployment {pair.namespace}/{pair.name}",
        )

    async def scale_canary(self, up: bool) -> None:
        return None


# ---- cross-cluster rollouts -------------------------------------------------------------


class CrossClusterRollouts:
    """Watches one service's canary-cluster Deployment and runs a rollout per new template."""

    def __init__(
        self,
        *,
        service: ServiceConfig,
        pair: DeploymentPair,
        router: TrafficRouter,
        metrics: ClusterPairMetrics | Any,
        record_dir: Path,
        log_path: Path,
        analyzer_factory: Callable[[], AnalyzerLike] | None = None,
        failed_over: Callable[[], bool] = lambda: False,
        events: EventRecorder | None = None,
        poll_s: float | None = None,
        telemetry: Telemetry | None = None,
        notifier: Notifier | None = None,
        allow_webhook_hosts: Sequence[str] = (),
    ) -> None:
        self.service = service
        self.pair = pair
        self.router = router
        self.metrics = metrics
        self.record_dir = record_dir
        self._log = RecordWriter(log_path)
        analysis = service.analysis_config()
        self.analyzer_factory = analyzer_factory or (lambda: Analyzer(analysis))
        self.failed_over = failed_over
        self.events = events
        self.poll_s = poll_s if poll_s is not None else service.tick_s
        self.telemetry = telemetry
        self.notifier = notifier  # told of every entry of every rollout's record
        self.allow_webhook_hosts = tuple(allow_webhook_hosts)  # the gates' too
        self.runner: RolloutRunner | None = None
        self.finished: list[tuple[str, str | None]] = []  # (revision, outcome)
        self._to_revert: str | None = None  # a failed revision still running in the canary cluster
        # The primary's template as last read: the last promoted one, known even when the
        # primary cluster's API is down (which is when a failover reverts the standby).
        self._promoted_template: JSON | None = None
        self.abort_timeout_s = 5.0
        self.revert_timeout_s = min(120.0, service.rollout_timeout_s)
        self._pending: set[asyncio.Future[CommandResult]] = set()
        self._canary_ref: ObjectRef | None = None

    # ---- hooks for the failover controller ------------------------------------------------

    def rollout_active(self) -> bool:
        return self.runner is not None and not self.runner.status.done

    async def abort(self, reason: str) -> None:
        """Abort the rollout in progress (a failover): recorded like a manual abort."""
        runner = self.runner
        if runner is None or runner.status.done:
            return
        await self._event("Warning", "RolloutAborted", f"failover aborted the rollout: {reason}")
        # The runner answers between ticks; one busy promoting (waiting on a primary cluster
        # that is down) must not hold the failover up. The abort stays queued, and the
        # failover controller re-asserts the standby's weight on every round meanwhile.
        pending = asyncio.ensure_future(runner.command(Command("abort", "failover", reason)))
        done, _ = await asyncio.wait({pending}, timeout=self.abort_timeout_s)
        if not done:
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._pending.add(pending)
            pending.add_done_callback(self._pending.discard)
            log.warning(
                "%s: the rollout has not taken the abort yet; failing over anyway",
                self.service.name,
            )
            return
        result = pending.result()
        if not result.accepted:
            log.warning("%s: abort refused: %s", self.service.name, result.message)

    async def revert_standby(self, reason: str) -> None:
        """Put the canary cluster back on the last promoted template, within a bounded time:
        past it the standby serves as it is (better than no service) and says so."""
        try:
            async with asyncio.timeout(self.revert_timeout_s):
                await self._revert(reason)
        except (TimeoutError, KubeError, RuntimeError) as exc:
            message = (
                f"could not revert the standby before failing over ({exc}); it serves as it is"
            )
            await self._note("warning", message)
            await self._event("Warning", "RevertFailed", message)

    # ---- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            for pending in self._pending:
                pending.cancel()
            for pending in list(self._pending):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending

    async def _loop(self) -> None:
        while True:
            try:
                await self._once()
            except KubeError as exc:
                log.warning("%s: %s", self.service.name, exc)
            except RouterError as exc:
                log.warning("%s: steady weight: %s", self.service.name, exc)
            except (RuntimeError, TimeoutError) as exc:  # a Deployment that did not roll out
                log.warning("%s: %s", self.service.name, exc)
            await asyncio.sleep(self.poll_s)

    async def _once(self) -> None:
        primary, canary = await self.pair.read()
        self._canary_ref = self.pair.ref(canary)
        if self.failed_over():
            return  # the failover controller owns the weights; no rollout starts now
        annotations = (canary.get("metadata") or {}).get("annotations") or {}
        template = (canary.get("spec") or {}).get("template") or {}
        primary_template = (primary.get("spec") or {}).get("template") or {}
        self._promoted_template = primary_template
        revision = template_revision(template)
        if template == primary_template or annotations.get(ENABLED_ANNOTATION) != "true":
            await self._steady()
            return
        if self._to_revert == revision:
            await self._after_failure(revision)  # a revert that failed earlier: again
            return
        # Judge the new version only once all of its pods serve (else the analysis would
        # compare a mix of old and new), and never move traffic to one that cannot roll out.
        state, message = deployment_rollout(canary)
        if state == "progressing":
            return
        if state == "failed":
            await self._event("Warning", "RolloutFailed", f"{revision} did not roll out: {message}")
            self.finished.append((revision, "rolled_back"))
            self._to_revert = revision
            await self._after_failure(revision)
            return
        await self._rollout(revision, template, primary_template)

    async def _steady(self) -> None:
        """Level-triggered: between rollouts the canary cluster gets its steady share."""
        wanted = self.service.steady_canary_percent
        try:
            current: int | None = await self.router.get_weight()
        except RouterError:  # e.g. no record yet: writing one is the fix
            current = None
        if current != wanted and not self.failed_over():
            await set_and_verify(self.router, wanted)
            await self._note(
                "info", f"steady-state weights restored: {wanted}% to the canary cluster"
            )

    async def _saved_state(self, revision: str) -> FileStateStore:
        """The service's status file: resumed when it holds an unfinished rollout of this
        very revision (a restarted controller carries on where it was); otherwise the
        rollout starts anew, and says why when a saved state could not be read."""
        path = self.record_dir / f"{self.service.name}.status.json"
        store = FileStateStore(path)
        try:
            saved = await store.load()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            saved = None
            message = f"saved rollout state {path} unreadable ({exc}): {revision} starts anew"
            await self._note("warning", message)
            await self._event("Warning", "ResumeFailed", message)
        if saved is not None and saved.status.done:
            saved = None  # over: the supervisor only starts rollouts that are due
        store.resume = saved is not None and saved.status.revision == revision
        if saved is not None and not store.resume:
            await self._note(
                "info",
                f"the unfinished rollout of {saved.status.revision} is superseded by {revision}",
            )
        return store

    async def _rollout(self, revision: str, template: JSON, primary_template: JSON) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = self.service.name
        store = await self._saved_state(revision)

        runner = RolloutRunner(
            name=name,
            spec=self.service.rollout_spec(),
            router=self.router,
            metrics=self.metrics,
            record_path=self.record_dir / f"{name}-{stamp}.jsonl",
            tick_s=self.service.tick_s,
            analyzer_factory=self.analyzer_factory,
            revision=revision,
            primary_version=_image(primary_template),
            canary_version=_image(template),
            config={
                "topology": "two-clusters",
                "dns_name": self.service.dns_name,
                "router": self.service.router.kind,
                "analysis": self.service.analysis,
            },
            workload=PrimaryClusterWorkload(self.pair, template),
            store=store,
            telemetry=self.telemetry,
            labels={"namespace": self.service.namespace},  # the gates' payload names it
            # the time-to-pass estimate at the start (and the load a rollout hook asks for)
            **self.service.runner_traffic(load_from_gates(self.service.gates)),
            # a caller per rollout: the runner closes it when the rollout ends
            gates=GateCaller(self.service.gates, allow_hosts=self.allow_webhook_hosts)
            if self.service.gates
            else None,
        )
        if self.notifier is not None:
            runner.entry_observers.append(self.notifier.on_entry)
        self.runner = runner
        await self._event(
            "Normal",
            "RolloutStarted",
            f"new template {revision} ({_image(template)}): moving DNS weight to this cluster in steps {list(self.service.steps)}",
        )
        status = await runner.run()
        self.finished.append((revision, status.outcome))
        await self._finished(revision, status)

    async def _finished(self, revision: str, status: RolloutStatus) -> None:
        if status.outcome == "promoted":
            await self._event(
                "Normal", "Promoted", f"{revision} applied to the primary cluster and rolled out"
            )
            if not self.failed_over():
                await self._steady()
            return
        await self._event("Warning", "RolledBack", f"{revision}: {status.message}")
        if self.failed_over():
            # The standby serves everything now; reverting it under load is the policy's call
            # (revert-first did it already). A new rollout is tried after failback.
            await self._note(
                "warning",
                f"rollout of {revision} ended ({status.outcome}) during a failover: the canary "
                "cluster keeps its template until failback",
            )
            return
        self._to_revert = revision
        await self._after_failure(revision)

    async def _after_failure(self, revision: str) -> None:
        await self._revert(f"rollout of {revision} did not pass")
        self._to_revert = None
        await self._steady()

    async def _revert(self, reason: str) -> None:
        try:
            primary = await self.pair.primary.get_deployment(self.pair.namespace, self.pair.name)
            template = (primary.get("spec") or {}).get("template") or {}
        except KubeError:
            if self._promoted_template is None:
                raise
            template = self._promoted_template  # the primary cluster is down: the last read
        await self.pair.apply_template(
            self.pair.canary,
            template,
            where=f"canary cluster Deployment {self.pair.namespace}/{self.pair.name}",
        )
        message = f"canary cluster reverted to the last promoted template {template_revision(template)} ({_image(template)}): {reason}"
        await self._note("warning", message)
        await self._event("Warning", "Reverted", message)

    async def _note(self, level: Literal["info", "warning"], message: str) -> None:
        log.info("%s: %s", self.service.name, message)
        await self._log.append(
            NoteEntry(at=time.time(), rollout=self.service.name, level=level, message=message)
        )

    async def _event(self, type: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        if self.events is not None and self._canary_ref is not None:
            await self.events.record(self._canary_ref, type=type, reason=reason, message=message)

    def state(self) -> JSON:
        runner = self.runner
        data: JSON = {
            "finished": [{"revision": r, "outcome": o} for r, o in self.finished],
            "rollout": None,
        }
        if runner is not None:
            data["rollout"] = runner.state()
        return data


# ---- routers ------------------------------------------------------------------------------


def build_router(
    topology: Topology, service: ServiceConfig, *, primary: Kube | None, canary: Kube | None
) -> TrafficRouter:
    """The router between the two entry points, as the service's config says."""
    config = service.router
    clusters = topology.clusters
    if isinstance(config, PowerDNSRouterConfig):
        from canary.routers.powerdns import PowerDNSRouter

        return PowerDNSRouter(
            api_url=config.api_url,
            api_key=config.api_key(),
            zone=config.zone,
            record_name=service.dns_name,
            primary_address=clusters.primary.entry_point,
            canary_address=clusters.canary.entry_point,
            ttl=config.ttl,
            server_id=config.server_id,
            dns_server=config.dns_server,
            dns_port=config.dns_port,
            name=f"powerdns:{service.dns_name}",
        )
    if isinstance(config, ExternalDNSRouterConfig):
        from canary.routers.external_dns import ClusterSide, ExternalDNSRouter

        if primary is None or canary is None:
            raise ValueError("the external-dns router needs both clusters' Kubernetes API")
        return ExternalDNSRouter(
            primary=ClusterSide(
                primary,
                entry_point=clusters.primary.entry_point,
                set_identifier=config.set_identifiers["primary"],
            ),
            canary=ClusterSide(
                canary,
                entry_point=clusters.canary.entry_point,
                set_identifier=config.set_identifiers["canary"],
            ),
            namespace=service.namespace,
            object_name=config.object_name or service.deployment,
            dns_name=service.dns_name,
            mode=config.mode,
            resource=config.resource,
            ttl=config.ttl,
            placement=config.placement,
            name=f"external-dns:{service.dns_name}",
        )
    assert isinstance(config, GlobalHAProxyRouterConfig)
    from canary.routers.haproxy import HAProxyRouter

    return HAProxyRouter(
        config.socket,
        config.backend,
        config.primary_server,
        config.canary_server,
        name=f"haproxy:{config.backend}",
    )


# ---- health -------------------------------------------------------------------------------


async def error_ratio_probe(
    session: aiohttp.ClientSession, cluster: ClusterConfig, service: ServiceConfig, threshold: float
) -> CheckResult:
    """5xx share over the last minute from the cluster's Prometheus; no data says nothing."""
    queries = cluster_queries(service.metrics, cluster.prometheus)
    # No 5xx series at all (a client library creates it on the first error) means 0 errors.
    expr = f"(sum(rate({queries.errors}[1m])) or vector(0)) / sum(rate({queries.requests}[1m]))"
    try:
        async with (
            asyncio.timeout(service.health.timeout_s),
            session.get(f"{cluster.prometheus.url}/api/v1/query", params={"query": expr}) as resp,
        ):
            body = json.loads(await read_bounded(resp, PROMETHEUS_ANSWER_BYTES))
        result = body.get("data", {}).get("result", [])
        ratio = float(result[0]["value"][1]) if result else None
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
        return CheckResult(None, f"error ratio: no data ({type(exc).__name__})")
    return error_ratio_check(
        None if ratio is None or math.isnan(ratio) else ratio, threshold=threshold
    )


async def _api_check(kube: Kube, service: ServiceConfig) -> CheckResult:
    try:
        async with asyncio.timeout(service.health.timeout_s):
            await kube.get_deployment(service.namespace, service.deployment)
    except NotFound:
        return CheckResult(True, "API answers")
    except (KubeError, TimeoutError) as exc:
        return CheckResult(False, f"Kubernetes API: {type(exc).__name__}: {exc}")
    return CheckResult(True, "API answers")


def health_monitor(
    topology: Topology,
    service: ServiceConfig,
    session: aiohttp.ClientSession,
    *,
    primary: Kube | None,
    canary: Kube | None,
) -> HealthMonitor:
    health = service.health

    def side(cluster: ClusterConfig, kube: Kube | None) -> EntryPointHealth:
        host = f"[{cluster.entry_point}]" if ":" in cluster.entry_point else cluster.entry_point
        url = f"{health.scheme}://{host}:{health.port}{health.path}"
        checks: list[Callable[[], Awaitable[CheckResult]]] = [
            lambda: http_check(session, url, timeout_s=health.timeout_s)
        ]
        threshold = health.error_ratio_threshold
        if threshold is not None:
            checks.append(lambda: error_ratio_probe(session, cluster, service, threshold))
        if health.check_api and kube is not None:
            checks.append(lambda: _api_check(kube, service))
        return EntryPointHealth(cluster.name, checks)

    return HealthMonitor(
        primary=side(topology.clusters.primary, primary),
        standby=side(topology.clusters.canary, canary),
    )


# ---- failover state, mirrored into a ConfigMap ------------------------------------------


@dataclass
class StateMirror:
    """The failover state as a ConfigMap (data.state = JSON), so a restarted pod finds it."""

    kube: Kube
    namespace: str
    name: str

    async def load(self) -> FailoverState | None:
        try:
            configmap = await self.kube.get_configmap(self.namespace, self.name)
        except NotFound:
            return None
        text = (configmap.get("data") or {}).get("state")
        return None if not text else FailoverState.model_validate_json(text)

    async def save(self, state: FailoverState) -> None:
        async def write() -> None:
            current: dict[str, Any] | None
            try:
                current = await self.kube.get_configmap(self.namespace, self.name)
                version: str | None = current["metadata"]["resourceVersion"]
            except NotFound:
                current, version = None, None
            await self.kube.put_configmap(
                self.namespace,
                self.name,
                {"state": state.model_dump_json()},
                resource_version=version,
                # a replace: what others set on it (labels, finalizers, ...) is kept
                keep=current["metadata"] if current is not None else None,
            )

        # A Conflict: another writer between our read and our write; read again.
        await retrying(
            write, policy=ONCE_MORE, on=Conflict, what=f"save {self.namespace}/{self.name}"
        )


# ---- one service in two clusters ----------------------------------------------------------


@dataclass
class TwoClusterService:
    """The failover controller and the rollout loop for one service, wired together."""

    service: ServiceConfig
    failover: FailoverController
    rollouts: CrossClusterRollouts | None
    mirror: StateMirror | None = None
    notifier: Notifier | None = None  # closed when run() ends
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.service.name

    async def run(self) -> None:
        """Both loops until cancelled; cancelling stops and awaits both."""
        await self._resume_from_mirror()
        self._tasks = [asyncio.create_task(self.failover.run(), name=f"failover:{self.name}")]
        if self.rollouts is not None:
            self._tasks.append(
                asyncio.create_task(self.rollouts.run(), name=f"rollouts:{self.name}")
            )
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.notifier is not None:
                # The last failover or rollout end gets a moment to go out.
                await self.notifier.aclose(grace_s=2.0)

    async def _resume_from_mirror(self) -> None:
        """A newer state in the ConfigMap than on disk (a pod restarted on an empty disk) wins."""
        if self.mirror is None:
            return
        try:
            mirrored = await self.mirror.load()
        except KubeError as exc:
            log.warning("%s: cannot read the mirrored failover state: %s", self.name, exc)
            return
        if mirrored is None or (mirrored.changed_at or 0) <= (self.failover.state.changed_at or 0):
            return
        await run_blocking("state", save_state, self.failover.state_path, mirrored)
        self.failover.state = mirrored
        log.info("%s: resumed failover state from ConfigMap: %s", self.name, mirrored.mode.value)

    async def command(self, to: Mode, *, who: str, reason: str, force: bool) -> JSON:
        try:
            state = await self.failover.command(FailoverCommand(to, who, reason, force))
        except FailoverRefused as exc:
            return {"name": self.name, "accepted": False, "message": str(exc), **self.state()}
        return {"name": self.name, "accepted": True, "message": state.reason, **self.state()}

    def state(self) -> JSON:
        probe: Probe | None = self.failover.last_probe
        data: JSON = {
            "name": self.name,
            "dns_name": self.service.dns_name,
            "failover": self.failover.state.model_dump(mode="json"),
            "last_probe": None
            if probe is None
            else {
                "primary_healthy": probe.primary_healthy,
                "standby_healthy": probe.standby_healthy,
                "detail": probe.detail,
            },
            "steady_canary_percent": self.service.steady_canary_percent,
        }
        if self.rollouts is not None:
            data.update(self.rollouts.state())
        return data


def wire(
    *,
    service: ServiceConfig,
    router: TrafficRouter,
    probe: Callable[[], Awaitable[Probe]],
    state_dir: Path,
    record_dir: Path,
    rollouts_factory: Callable[[Callable[[], bool]], CrossClusterRollouts] | None,
    events: EventRecorder | None = None,
    event_ref: Callable[[], ObjectRef | None] = lambda: None,
    probe_interval_s: float | None = None,
    mirror: StateMirror | None = None,
    notifier: Notifier | None = None,
) -> TwoClusterService:
    """Connect a FailoverController and a CrossClusterRollouts for one service."""
    holder: list[FailoverController] = []

    def failed_over() -> bool:
        return bool(holder) and holder[0].state.mode is Mode.STANDBY

    rollouts = rollouts_factory(failed_over) if rollouts_factory is not None else None

    async def on_entry(entry: FailoverEntry | NoteEntry) -> None:
        if notifier is not None and isinstance(entry, FailoverEntry):
            notifier.on_entry(entry)
        ref = event_ref() if rollouts is None else rollouts._canary_ref or event_ref()
        if events is None or ref is None:
            return
        if isinstance(entry, FailoverEntry):
            forced = " (forced)" if entry.forced else ""
            await events.record(
                ref,
                type="Warning" if entry.direction == "to-standby" else "Normal",
                reason="FailedOver" if entry.direction == "to-standby" else "FailedBack",
                message=f"{entry.direction} by {entry.who}{forced}: {entry.reason}",
            )
        else:
            await events.record(
                ref,
                type="Warning" if entry.level == "warning" else "Normal",
                reason="Failover",
                message=entry.message,
            )

    async def no_op(reason: str) -> None:
        return None

    controller = FailoverController(
        name=service.name,
        policy=service.failover,
        probe=probe,
        router=router,
        state_path=state_dir / f"{service.name}.failover.json",
        record_path=record_dir / f"{service.name}-clusters.jsonl",
        steady_canary_percent=service.steady_canary_percent,
        probe_interval_s=probe_interval_s or service.health.interval_s,
        rollout_active=rollouts.rollout_active if rollouts is not None else (lambda: False),
        on_abort_rollout=rollouts.abort if rollouts is not None else no_op,
        on_revert_standby=rollouts.revert_standby if rollouts is not None else no_op,
        on_entry=on_entry,
        on_state=mirror.save if mirror is not None else None,
    )
    holder.append(controller)
    return TwoClusterService(service, controller, rollouts, mirror, notifier)


# ---- the controller the HTTP server sees ---------------------------------------------------


def _failed_over(failover: FailoverController) -> float:
    return 1.0 if failover.state.mode is Mode.STANDBY else 0.0


class MultiClusterController:
    """Runs every service's loops; a RolloutSource for canary.server.app plus /failover routes."""

    def __init__(
        self, services: list[TwoClusterService], *, telemetry: Telemetry | None = None
    ) -> None:
        names = [s.name for s in services]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"two services are named {duplicate!r}")
        self.services = {s.name: s for s in services}
        self.telemetry = telemetry or Telemetry(mode="clusters")
        for service in services:  # read at each scrape
            self.telemetry.failover_active.labels(service.name).set_function(
                functools.partial(_failed_over, service.failover)
            )
        self.started = asyncio.Event()
        self._stop = asyncio.Event()

    def states(self) -> list[JSON]:
        out = []
        for service in self.services.values():
            rollouts = service.rollouts
            if rollouts is not None and rollouts.runner is not None:
                out.append(rollouts.runner.state())
        return out

    async def command(self, name: str, command: Command) -> CommandResult:
        from canary.runner import UnknownRollout

        service = self.services.get(name)
        if service is None:
            raise UnknownRollout(name)
        if service.rollouts is None or not service.rollouts.rollout_active():
            return CommandResult(False, "Idle", "no rollout in progress")
        assert service.rollouts.runner is not None
        return await service.rollouts.runner.command(command)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(s.run(), name=f"service:{s.name}") for s in self.services.values()
        ]
        self.started.set()
        stopper = asyncio.create_task(self._stop.wait())
        everything: list[asyncio.Task[Any]] = [*tasks, stopper]
        try:
            await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.error("%s crashed", task.get_name(), exc_info=task.exception())
        finally:
            for task in everything:
                task.cancel()
            for task in everything:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


_MAX_TEXT = 500


def failover_routes(controller: MultiClusterController) -> Callable[[web.Application], None]:
    """The server extension: GET /failover, POST /failover and /failover/{name}.

    POST body: {"to": "standby"|"primary", "who": ..., "reason": ..., "force": false}.
    200: every service accepted (a no-op included: idempotent); 409: some refused, with the
    reasons; 404: unknown service; 400: a bad body.
    """

    async def show(request: web.Request) -> web.Response:
        return web.json_response({"services": [s.state() for s in controller.services.values()]})

    async def move(request: web.Request) -> web.Response:
        name = request.match_info.get("name")
        if name is not None and name not in controller.services:
            return web.json_response(
                {"error": f"no two-cluster service named {name!r}"}, status=404
            )
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        unknown = sorted(set(body) - {"to", "who", "reason", "force"})
        if unknown:
            return web.json_response(
                {"error": f"unknown body keys {unknown}; expected to, who, reason, force"},
                status=400,
            )
        if body.get("to") not in ("standby", "primary"):
            return web.json_response(
                {"error": f"'to' must be 'standby' or 'primary', got {body.get('to')!r}"},
                status=400,
            )
        for key in ("who", "reason"):
            value = body.get(key, "")
            if not isinstance(value, str) or len(value) > _MAX_TEXT:
                return web.json_response(
                    {"error": f"{key} must be a string of at most {_MAX_TEXT} characters"},
                    status=400,
                )
        if not isinstance(body.get("force", False), bool):
            return web.json_response({"error": "force must be true or false"}, status=400)
        targets = [controller.services[name]] if name else list(controller.services.values())
        results = [
            await service.command(
                Mode(body["to"]),
                who=authenticated_who(request, body.get("who") or "api"),
                reason=body.get("reason") or "",
                force=bool(body.get("force", False)),
            )
            for service in targets
        ]
        ok = all(r["accepted"] for r in results)
        return web.json_response({"services": results}, status=200 if ok else 409)

    def extend(app: web.Application) -> None:
        app.router.add_get("/failover", show)
        app.router.add_post("/failover", move)
        app.router.add_post("/failover/{name}", move)

    return extend


def build_controller(
    topology: Topology,
    session: aiohttp.ClientSession,
    *,
    primary: Kube,
    canary: Kube,
    probe_interval_s: float | None = None,
    poll_s: float | None = None,
    allow_webhook_hosts: Sequence[str] = (),
) -> MultiClusterController:
    """Every service of the topology, wired: router, metrics, health, rollouts, failover.
    `allow_webhook_hosts`: webhook hosts that may be loopback, link-local or the API server."""
    telemetry = Telemetry(mode="clusters")
    events = EventRecorder(canary)
    services = []
    for service in topology.services:
        router = build_router(topology, service, primary=primary, canary=canary)
        metrics = cluster_metrics(topology, service)
        pair = DeploymentPair(
            primary,
            canary,
            service.namespace,
            service.deployment,
            rollout_timeout_s=service.rollout_timeout_s,
        )
        monitor = health_monitor(topology, service, session, primary=primary, canary=canary)
        # One notifier per service: each names its own webhooks.
        notifier = (
            Notifier(service.notifications, allow_hosts=allow_webhook_hosts)
            if service.notifications
            else None
        )

        def factory(
            failed_over: Callable[[], bool],
            service: ServiceConfig = service,
            router: TrafficRouter = router,
            metrics: ClusterPairMetrics = metrics,
            pair: DeploymentPair = pair,
            notifier: Notifier | None = notifier,
        ) -> CrossClusterRollouts:
            return CrossClusterRollouts(
                service=service,
                pair=pair,
                router=router,
                metrics=metrics,
                record_dir=topology.record_dir,
                log_path=topology.record_dir / f"{service.name}-clusters.jsonl",
                failed_over=failed_over,
                events=events,
                poll_s=poll_s,
                telemetry=telemetry,
                notifier=notifier,
                allow_webhook_hosts=allow_webhook_hosts,
            )

        services.append(
            wire(
                service=service,
                router=router,
                probe=monitor.probe,
                state_dir=topology.state_dir,
                record_dir=topology.record_dir,
                rollouts_factory=factory,
                events=events,
                probe_interval_s=probe_interval_s,
                mirror=None
                if topology.state_namespace is None
                else StateMirror(
                    canary, topology.state_namespace, f"canary-failover-{service.name}"
                ),
                notifier=notifier,
            )
        )
    return MultiClusterController(services, telemetry=telemetry)
