"""The Kubernetes seam: the only module that imports kubernetes_asyncio.

Everything the controller asks of a cluster goes through `Kube`, a thin typed adapter over
the real client. It exists so that the rest of the code sees plain JSON dicts and a small
exception tree, never the generated models or `ApiException`, and so that three API-server
rules live in one place:

- optimistic concurrency: writes may carry the resourceVersion they were computed from,
  and a stale one is a `Conflict`, never a silent overwrite;
- the API server sheds load with 429 + Retry-After and fails transiently with 5xx: calls
  are retried with bounded, jittered backoff that never retries sooner than Retry-After;
- watches resume from the last resourceVersion seen, and re-list on 410 Gone, since the
  events in between are lost and only a fresh list tells the truth (and, after a backoff,
  on a 429 or 5xx inside a stream, which resuming could meet again).

`API_CALLS` lists every (group, resource, verb) the adapter can issue; each call checks
itself against it, and tests assert the manifests' RBAC grants exactly this set.

Exception tree::

    KubeError                   anything the API server did not do
    ├── NotFound                404: no such object
    ├── Conflict                409: stale resourceVersion, or the name already exists
    ├── Gone                    410: a watch's resourceVersion is too old (re-list)
    ├── Unavailable             429 / 5xx / no connection, still failing after the retries
    └── Rejected                any other error answer; `.status` and the server's message

Leader election (`LeaderElector`) follows client-go's: a coordination.k8s.io/v1 Lease whose
holder renews it; others take it over only after seeing it unchanged for a whole
leaseDurationSeconds on their own clock; every write is guarded by resourceVersion, and a
leader that cannot renew steps down after `renew_deadline_s`, before anyone else may
take over. Unlike client-go, a candidate counts the Lease duration from the start of its
previous read (which did not show the renewal yet) when that still leaves `SAFETY_S` between
the leader's renew deadline and its own first write, and wakes when the Lease it watches
expires: the argument is in canary.kubernetes.shards, whose Leases follow the same rule.

Also here: `EventRecorder` (Events without the flood of a level-triggered loop) and
`deployment_rollout()` (whether a Deployment has finished rolling out, as kubectl judges).

A caveat of retrying writes: a guarded write whose answer was lost (a 5xx from a proxy after
the API server applied it) comes back as Conflict on the retry. Callers re-read and
reconcile, as they must after any Conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import aiohttp

import canary.retry
from canary.kubernetes import _lean_client

# Before the imports below: the whole generated client is ~38 MiB per controller (issue 13).
_lean_client.install()
from kubernetes_asyncio import client as k8s  # noqa: E402
from kubernetes_asyncio import config as k8s_config  # noqa: E402

__all__ = [
    "API_CALLS",
    "OPERATOR_CALLS",
    "OWN_NAMESPACE_RESOURCES",
    "SAFETY_S",
    "TWO_CLUSTER_CALLS",
    "ApiCall",
    "Conflict",
    "EventRecorder",
    "Gone",
    "Kube",
    "KubeError",
    "LeaderElector",
    "NotFound",
    "ObjectRef",
    "Rejected",
    "Relist",
    "RetryPolicy",
    "Unavailable",
    "WatchEvent",
    "deployment_rollout",
    "kept_metadata",
    "with_retries",
]

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")

# The least a takeover counted from the previous read may leave between the holder's renew
# deadline and the taker's first write (the argument: canary.kubernetes.shards): for a write
# that checked `holds(i)` / `is_leader` just before the deadline and is still in flight (a
# request to a healthy API server takes milliseconds to tens of them) and for the two
# monotonic clocks' rates (a few hundred ppm at worst: milliseconds over 15 s). It is only the
# worst case: with regular reads the margin is about 3 s at the default timings; anything
# slower falls back to client-go's count (from when the renewal was seen).
SAFETY_S = 1.0


# -- errors ------------------------------------------------------------------------------


class KubeError(Exception):
    """The API server did not do what was asked."""

    status: int = 0


class NotFound(KubeError):
    status = 404


class Conflict(KubeError):
    """A stale resourceVersion, or a create whose name already exists."""

    status = 409


class Gone(KubeError):
    status = 410


class Unavailable(KubeError):
    """Still 429, 5xx or unreachable after every retry."""


class Rejected(KubeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's Retry-After in seconds."""

    def __init__(self, message: str, *, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


# -- retries -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter; never sooner than a Retry-After."""

    attempts: int = 5
    initial_delay_s: float = 0.2
    max_delay_s: float = 10.0
    # A server asking for a longer pause than this gets an Unavailable instead of a wait.
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if not 0 < self.initial_delay_s <= self.max_delay_s:
            raise ValueError(
                "RetryPolicy needs 0 < initial_delay_s <= max_delay_s, got "
                f"{self.initial_delay_s} and {self.max_delay_s}"
            )

    def backoff(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based), with equal jitter."""
        base = min(self.max_delay_s, self.initial_delay_s * 2 ** (attempt - 1))
        return float(base / 2 + random.uniform(0, base / 2))

    def retry_policy(self) -> canary.retry.RetryPolicy:
        """The same bounds for the shared retry helper: the wait before retry n lies within
        [b/2, b] for b = min(max_delay_s, initial_delay_s * 2 ** (n - 1)), as `backoff`'s."""
        return canary.retry.RetryPolicy(
            attempts=self.attempts,
            wait_initial_s=self.initial_delay_s / 2,
            wait_max_s=self.max_delay_s,
            wait_jitter_s=self.initial_delay_s / 2,
            max_retry_after_s=self.max_retry_after_s,
        )


async def with_retries(call: Callable[[], Awaitable[T]], *, policy: RetryPolicy, what: str) -> T:
    """Run `call`, retrying `_Transient` failures under `policy`; raise Unavailable at the end.
    `what` names the call in log lines; the failures' messages name it already."""
    try:
        return await canary.retry.retrying(
            call,
            policy=policy.retry_policy(),
            on=_Transient,
            retry_after=lambda exc: exc.retry_after,
            what=what,
        )
    except canary.retry.RetryAfterTooLong as exc:
        raise Unavailable(str(exc)) from exc.error
    except _Transient as exc:
        raise Unavailable(f"{exc} (gave up after {policy.attempts} attempts)") from exc


# -- the calls the adapter makes (RBAC is derived from and tested against this) ---------


@dataclass(frozen=True, slots=True, order=True)
class ApiCall:
    group: str  # "" is the core API group, as in RBAC rules
    resource: str
    verb: str


def _calls(group: str, resource: str, *verbs: str) -> set[ApiCall]:
    return {ApiCall(group, resource, verb) for verb in verbs}


# external-dns' DNSEndpoint CRD: Route 53 weighted records between two clusters, written only
# by `canary clusters` (canary.routers.external_dns) with the kubeconfig it is given for each
# cluster; the in-cluster controller's ServiceAccount (manifests/rbac.yaml) is not granted them.
TWO_CLUSTER_CALLS: frozenset[ApiCall] = frozenset(
    _calls("externaldns.k8s.io", "dnsendpoints", "get", "create", "patch")
)

API_CALLS: frozenset[ApiCall] = TWO_CLUSTER_CALLS | frozenset(
    _calls("apps", "deployments", "get", "list", "watch", "create", "patch")
    # list + watch (ours alone, by label): ensure_services' cache (canary.kubernetes.informer).
    | _calls("", "services", "get", "list", "watch", "create", "patch")
    # The app's HorizontalPodAutoscaler is followed; app-primary's is our mirror of it.
    | _calls(
        "autoscaling",
        "horizontalpodautoscalers",
        *("get", "list", "watch", "create", "patch", "delete"),
    )
    # patch: a record's new lines are added as one key (record_store), nothing rewritten.
    | _calls("", "configmaps", "get", "create", "update", "patch")
    | _calls("", "events", "create")
    # list + watch: the routers' read-back cache (canary.kubernetes.informer).
    | _calls("networking.k8s.io", "ingresses", "get", "list", "watch", "create", "patch")
    | _calls("gateway.networking.k8s.io", "httproutes", "get", "list", "watch", "patch")
    | _calls("coordination.k8s.io", "leases", "get", "create", "update")
    # Who is calling the HTTP server, and may they (canary.kubernetes.access), as
    # kube-rbac-proxy asks: TokenReview, then SubjectAccessReview.
    | _calls("authentication.k8s.io", "tokenreviews", "create")
    | _calls("authorization.k8s.io", "subjectaccessreviews", "create")
)

# What `canary kubernetes` calls: what manifests/rbac.yaml grants its ServiceAccount.
OPERATOR_CALLS: frozenset[ApiCall] = API_CALLS - TWO_CLUSTER_CALLS

# Used only in the controller's own namespace (the Lease, its state ConfigMaps): the RBAC
# grants them by a namespaced Role, not the ClusterRole.
OWN_NAMESPACE_RESOURCES = frozenset({"leases", "configmaps"})

_MERGE_PATCH = "application/merge-patch+json"

# What `_watch` can list and watch.
_Watched = Literal["deployments", "horizontalpodautoscalers", "ingresses", "httproutes", "services"]


# -- watch values ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: JSON


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Relist:
    """The whole current state: sent first, and again after a 410 Gone. Objects absent
    here are gone, whether or not their DELETED event was ever seen."""

    objects: list[JSON]
    resource_version: str


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """What an Event is about."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str = ""

    @classmethod
    def deployment(cls, obj: JSON) -> ObjectRef:
        meta = obj.get("metadata", {})
        return cls("apps/v1", "Deployment", meta["namespace"], meta["name"], meta.get("uid", ""))


# What a replace (PUT) of an object must carry over from the object as read, or it drops
# them: others' labels and annotations, an owner someone gave it (dropping one counts as
# changing ownerReferences, which OwnerReferencesPermissionEnforcement allows only with
# 'delete' on the object: the controller has none), and finalizers.
KEPT_METADATA = ("labels", "annotations", "ownerReferences", "finalizers")


def kept_metadata(metadata: Mapping[str, Any] | None) -> JSON:
    """The KEPT_METADATA of `metadata` (an object's, as read) that are set, for a replace."""
    if not metadata:
        return {}
    return {key: metadata[key] for key in KEPT_METADATA if metadata.get(key)}


def _now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now_seconds() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _guarded(patch: JSON, resource_version: str | None) -> JSON:
    """A merge patch that the API server applies only at `resource_version`."""
    if resource_version is None:
        return patch
    meta = dict(patch.get("metadata") or {})
    meta["resourceVersion"] = resource_version
    return {**patch, "metadata": meta}


# -- the adapter -------------------------------------------------------------------------


# Requests on the wire at once (watches apart: they hold their own connections). The HTTP
# pool has 100; fewer in flight keeps the API server's priority and fairness from queueing us.
MAX_IN_FLIGHT = 32
LEASE_IN_FLIGHT = 4  # leader and shard Leases: never queued behind the rest
# The routers' reads and writes of the objects that split traffic (not their lists, which
# the watch caches make): a rollback's weight must not wait behind a thousand record writes.
TRAFFIC_IN_FLIGHT = 8
_TRAFFIC_RESOURCES = frozenset({"ingresses", "httproutes", "dnsendpoints"})


_PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NETRC",
)


def _no_env_lookups(api_client: Any) -> None:
    """kubernetes-asyncio's HTTP session trusts the environment, so aiohttp looks for a netrc
    file on every request, in asyncio's shared default thread pool: at 1,000 rollouts that was
    ~4% of the controller's CPU (issue 13). Bearer tokens and client certificates never come
    from netrc; proxies do come from the environment, so with a proxy (or NETRC) set the
    session is left as it is."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return
    session = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if session is not None and hasattr(session, "_trust_env"):
        session._trust_env = False


class Kube:
    """Typed access to the few API calls canary needs. Build with `await Kube.connect()`."""

    def __init__(
        self,
        api_client: Any,
        *,
        retry: RetryPolicy | None = None,
        request_timeout_s: float = 30.0,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {request_timeout_s}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._api = api_client
        self.retry = retry or RetryPolicy()
        # A hung API server costs one timeout per attempt, not a hung controller.
        self.request_timeout_s = request_timeout_s
        # Requests past this many wait here, before their timeout starts: queued in the HTTP
        # pool instead, a thousand rollouts' reconciles timed out waiting for a connection
        # (issue 13's scale run), retried, and piled on the API server all over again.
        self._slots = asyncio.Semaphore(max_in_flight)
        # Leases have slots of their own: a renewal queued behind a thousand reconciles missed
        # its deadline, the replica let go of its shard, took it back, restarted its rollouts
        # and starved the next renewal the same way (issue 13's 2,000-rollout run, 2 shards).
        self._lease_slots = asyncio.Semaphore(LEASE_IN_FLIGHT)
        # Weight sets and their read-backs have slots of their own too: queued behind the
        # record and status writes of 1,000 rollouts on a congested API server, they ran out
        # the router's 10 s timeout before their PATCH was sent (issue 13's 2,000-rollout run:
        # ~100-500 timed-out sets in a 10-minute window), and a rollback's would have too.
        self._traffic_slots = asyncio.Semaphore(TRAFFIC_IN_FLIGHT)
        _no_env_lookups(api_client)
        self._apps = k8s.AppsV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self._net = k8s.NetworkingV1Api(api_client)
        self._coord = k8s.CoordinationV1Api(api_client)
        self._autoscaling = k8s.AutoscalingV2Api(api_client)
        self._custom = k8s.CustomObjectsApi(api_client)
        self._authn = k8s.AuthenticationV1Api(api_client)
        self._authz = k8s.AuthorizationV1Api(api_client)

    @classmethod
    async def connect(
        cls,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        retry: RetryPolicy | None = None,
        request_timeout_s: float = 30.0,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> Kube:
        """Like kubectl: `kubeconfig` (else $KUBECONFIG, else ~/.kube/config) and `context`
        (else current-context); inside a pod with neither given, the service account."""
        if kubeconfig is None and context is None and "KUBERNETES_SERVICE_HOST" in os.environ:
            configuration = k8s.Configuration()
            # It reads the service account's files: off the event loop.
            await asyncio.to_thread(
                k8s_config.load_incluster_config, client_configuration=configuration
            )
            return cls(
                k8s.ApiClient(configuration),
                retry=retry,
                request_timeout_s=request_timeout_s,
                max_in_flight=max_in_flight,
            )
        if kubeconfig is not None and not await asyncio.to_thread(os.path.isfile, kubeconfig):
            raise KubeError(f"kubeconfig {kubeconfig} does not exist")
        try:
            api_client = await k8s_config.new_client_from_config(
                config_file=kubeconfig, context=context, persist_config=False
            )
        except (k8s_config.ConfigException, OSError, TypeError, ValueError, KeyError) as exc:
            # The loader reports a malformed file with whatever exception it tripped on.
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise KubeError(f"kubeconfig {where} (context {context or 'current'}): {exc}") from exc
        return cls(
            api_client,
            retry=retry,
            request_timeout_s=request_timeout_s,
            max_in_flight=max_in_flight,
        )

    async def close(self) -> None:
        await self._api.close()

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the one HTTP seam ---------------------------------------------------------------

    def _slots_for(self, call: ApiCall) -> asyncio.Semaphore:
        """Leases and the objects that split traffic never queue behind the rest."""
        if call.resource == "leases":
            return self._lease_slots
        if call.resource in _TRAFFIC_RESOURCES and call.verb != "list":
            return self._traffic_slots
        return self._slots

    async def _call(
        self, call: ApiCall, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> JSON:
        if call not in API_CALLS:  # keeps API_CALLS, and so the RBAC, honest
            raise AssertionError(f"{call} is missing from API_CALLS")
        what = f"{call.verb} {call.resource} {_target(call, args)}"

        async def once() -> JSON:
            try:
                async with self._slots_for(call):
                    resp = await fn(
                        *args,
                        _preload_content=False,
                        _request_timeout=self.request_timeout_s,
                        **kwargs,
                    )
                    async with resp:
                        body = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _Transient(f"{what}: no answer: {exc!r}") from exc
            return _decode(resp.status, resp.headers.get("Retry-After"), body, what)

        return await with_retries(once, policy=self.retry, what=what)

    # -- Deployments ---------------------------------------------------------------------

    async def get_deployment(self, namespace: str, name: str) -> JSON:
        return await self._call(
            ApiCall("apps", "deployments", "get"),
            self._apps.read_namespaced_deployment,
            name,
            namespace,
        )

    async def list_deployments(self, namespace: str | None = None) -> Relist:
        return await self._list("deployments", namespace)

    async def create_deployment(self, namespace: str, body: JSON) -> JSON:
        return await self._call(
            ApiCall("apps", "deployments", "create"),
            self._apps.create_namespaced_deployment,
            namespace,
            body,
        )

    async def patch_deployment(
        self, namespace: str, name: str, patch: JSON, *, resource_version: str | None = None
    ) -> JSON:
        """Merge-patch a Deployment; with `resource_version`, raise Conflict if it is stale."""
        return await self._call(
            ApiCall("apps", "deployments", "patch"),
            self._apps.patch_namespaced_deployment,
            name,
            namespace,
            _guarded(patch, resource_version),
            _content_type=_MERGE_PATCH,
        )

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> JSON:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        return await self.patch_deployment(namespace, name, {"spec": {"replicas": replicas}})

    def watch_deployments(
        self, namespace: str | None = None, *, timeout_s: int = 300
    ) -> AsyncGenerator[Relist | WatchEvent, None]:
        """Deployments: see `_watch`."""
        return self._watch("deployments", namespace, timeout_s=timeout_s)

    def watch_hpas(
        self, namespace: str | None = None, *, timeout_s: int = 300
    ) -> AsyncGenerator[Relist | WatchEvent, None]:
        """autoscaling/v2 HorizontalPodAutoscalers: see `_watch`."""
        return self._watch("horizontalpodautoscalers", namespace, timeout_s=timeout_s)

    def watch_ingresses(
        self,
        namespace: str | None = None,
        *,
        timeout_s: int = 300,
        on_stream: Callable[[bool], None] | None = None,
    ) -> AsyncGenerator[Relist | WatchEvent, None]:
        """networking.k8s.io/v1 Ingresses: see `_watch`."""
        return self._watch("ingresses", namespace, timeout_s=timeout_s, on_stream=on_stream)

    def watch_services(
        self,
        namespace: str | None = None,
        *,
        timeout_s: int = 300,
        on_stream: Callable[[bool], None] | None = None,
        label_selector: str | None = None,
    ) -> AsyncGenerator[Relist | WatchEvent, None]:
        """v1 Services (those `label_selector` selects): see `_watch`."""
        return self._watch(
            "services",
            namespace,
            timeout_s=timeout_s,
            on_stream=on_stream,
            label_selector=label_selector,
        )

    def watch_httproutes(
        self,
        namespace: str | None = None,
        *,
        timeout_s: int = 300,
        on_stream: Callable[[bool], None] | None = None,
    ) -> AsyncGenerator[Relist | WatchEvent, None]:
        """gateway.networking.k8s.io/v1 HTTPRoutes: see `_watch`. Without the CRD, the
        first list raises NotFound."""
        return self._watch("httproutes", namespace, timeout_s=timeout_s, on_stream=on_stream)

    def _listing(
        self, resource: _Watched, namespace: str | None
    ) -> tuple[str, Callable[..., Awaitable[Any]], tuple[str, ...]]:
        """(API group, generated list function, its positional arguments) for `resource`
        in `namespace` (None: every namespace); with watch=True the same function watches."""
        all_fn: Callable[..., Awaitable[Any]]
        ns_fn: Callable[..., Awaitable[Any]]
        if resource == "deployments":
            group, all_fn, ns_fn = (
                "apps",
                self._apps.list_deployment_for_all_namespaces,
                self._apps.list_namespaced_deployment,
            )
        elif resource == "horizontalpodautoscalers":
            group, all_fn, ns_fn = (
                "autoscaling",
                self._autoscaling.list_horizontal_pod_autoscaler_for_all_namespaces,
                self._autoscaling.list_namespaced_horizontal_pod_autoscaler,
            )
        elif resource == "ingresses":
            group, all_fn, ns_fn = (
                "networking.k8s.io",
                self._net.list_ingress_for_all_namespaces,
                self._net.list_namespaced_ingress,
            )
        elif resource == "services":
            group, all_fn, ns_fn = (
                "",
                self._core.list_service_for_all_namespaces,
                self._core.list_namespaced_service,
            )
        else:  # a CRD: (group, version, [namespace,] plural)
            group = "gateway.networking.k8s.io"
            if namespace is None:
                return group, self._custom.list_cluster_custom_object, (group, "v1", resource)
            return (
                group,
                self._custom.list_namespaced_custom_object,
                (group, "v1", namespace, resource),
            )
        if namespace is None:
            return group, all_fn, ()
        return group, ns_fn, (namespace,)

    async def _list(
        self, resource: _Watched, namespace: str | None, label_selector: str | None = None
    ) -> Relist:
        group, fn, args = self._listing(resource, namespace)
        selected = {} if label_selector is None else {"label_selector": label_selector}
        body = await self._call(ApiCall(group, resource, "list"), fn, *args, **selected)
        return Relist(list(body.get("items") or []), str(body["metadata"]["resourceVersion"]))

    async def list_ingresses(self, namespace: str | None = None) -> Relist:
        return await self._list("ingresses", namespace)

    async def list_httproutes(self, namespace: str | None = None) -> Relist:
        return await self._list("httproutes", namespace)

    async def _watch(
        self,
        resource: _Watched,
        namespace: str | None,
        *,
        timeout_s: int,
        on_stream: Callable[[bool], None] | None = None,
        label_selector: str | None = None,
    ) -> AsyncGenerator[Relist | WatchEvent, None]:
        """A Relist first, then events, forever: resumes from the last resourceVersion
        after the server ends a stream, and re-lists (a new Relist) after 410 Gone.

        An ERROR event with a 429 or 5xx inside a stream is also answered with a re-list,
        after a backoff, as client-go's reflector does: resuming could meet the same error
        (the real server answers 500 to a watch resumed at the revision etcd was just
        compacted to). After `retry.attempts` such errors in a row it raises Unavailable.

        `on_stream(True)` is called once a watch stream is open (events flow from then on),
        `on_stream(False)` once it has ended, for whatever reason: in between, a cache fed by
        these items is as current as the watch.

        A consumer lets go of each item once applied (`del item` in its loop): a quiet watch
        waits for hours, and a Relist kept meanwhile is every object decoded (issue 13)."""
        if timeout_s < 1:
            raise ValueError(f"timeout_s must be >= 1, got {timeout_s}")
        group, watch_fn, args = self._listing(resource, namespace)
        call = ApiCall(group, resource, "watch")
        resource_version: str | None = None
        empty_streams = stream_errors = 0
        while True:
            if resource_version is None:
                relist = await self._list(resource, namespace, label_selector)
                resource_version = relist.resource_version
                yield relist
                # Not held while the watch waits: a quiet watch waits for ever, and a whole
                # list of Deployments is ~12 KiB a Deployment decoded (issue 13's RSS).
                del relist
            opened, events = time.monotonic(), 0
            try:
                stream = self._watch_once(
                    call, watch_fn, args, resource_version, timeout_s, on_stream, label_selector
                )
                async with contextlib.aclosing(stream):
                    async for event in stream:
                        events += 1
                        stream_errors = 0
                        resource_version = event.object["metadata"]["resourceVersion"]
                        yield event
            except Gone:
                log.info(
                    "watch %s: resourceVersion %s is gone, re-listing", resource, resource_version
                )
                resource_version = None
                continue
            except _Transient as exc:
                stream_errors += 1
                if stream_errors >= self.retry.attempts:
                    raise Unavailable(
                        f"{exc} (gave up after {stream_errors} errors in a row)"
                    ) from exc
                log.warning(
                    "watch %s from resourceVersion %s: %s; re-listing",
                    resource,
                    resource_version,
                    exc,
                )
                await asyncio.sleep(self.retry.backoff(stream_errors))
                resource_version = None
                continue
            # Streams cut at once and empty (a flapping proxy) must not become a busy loop.
            if events == 0 and time.monotonic() - opened < 1.0:
                empty_streams += 1
                await asyncio.sleep(self.retry.backoff(min(empty_streams, 10)))
            else:
                empty_streams = 0

    async def _watch_once(
        self,
        call: ApiCall,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[str, ...],
        resource_version: str,
        timeout_s: int,
        on_stream: Callable[[bool], None] | None = None,
        label_selector: str | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        what = f"watch {call.resource}"
        selected = {} if label_selector is None else {"label_selector": label_selector}
        if call not in API_CALLS:
            raise AssertionError(f"{call} is missing from API_CALLS")

        async def open_stream() -> Any:
            try:
                resp = await fn(
                    *args,
                    watch=True,
                    resource_version=resource_version,
                    timeout_seconds=timeout_s,
                    allow_watch_bookmarks=False,
                    _preload_content=False,
                    **selected,
                    # A silent, half-dead connection must not hang the watch forever.
                    _request_timeout=aiohttp.ClientTimeout(sock_read=timeout_s + 15),
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise _Transient(f"{what}: no answer: {exc!r}") from exc
            if resp.status != 200:
                async with resp:
                    _decode(
                        resp.status, resp.headers.get("Retry-After"), await resp.read(), "watch"
                    )
            return resp

        resp = await with_retries(open_stream, policy=self.retry, what=what)
        if on_stream is not None:
            on_stream(True)
        try:
            async with resp:
                while True:
                    try:
                        line = await resp.content.readline()
                    except (
                        aiohttp.ClientPayloadError,
                        aiohttp.ClientConnectionError,
                        TimeoutError,
                    ):
                        return  # the caller reconnects from the last resourceVersion
                    if not line:
                        return
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind = event.get("type")
                    if kind == "ERROR":
                        status = event.get("object") or {}
                        code = int(status.get("code") or 0)
                        message = status.get("message") or "watch error"
                        if code == 410:
                            raise Gone(message)
                        if code in _TRANSIENT_STATUSES:
                            raise _Transient(f"{what}: {code}: {message}", status=code)
                        raise _error(code, message)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        yield WatchEvent(kind, event["object"])
                    # BOOKMARK and unknown types carry nothing for us.
        finally:
            if on_stream is not None:
                on_stream(False)

    # -- Services ------------------------------------------------------------------------

    async def get_service(self, namespace: str, name: str) -> JSON:
        return await self._call(
            ApiCall("", "services", "get"), self._core.read_namespaced_service, name, namespace
        )

    async def create_service(self, namespace: str, body: JSON) -> JSON:
        return await self._call(
            ApiCall("", "services", "create"), self._core.create_namespaced_service, namespace, body
        )

    async def patch_service(
        self, namespace: str, name: str, patch: JSON, *, resource_version: str | None = None
    ) -> JSON:
        return await self._call(
            ApiCall("", "services", "patch"),
            self._core.patch_namespaced_service,
            name,
            namespace,
            _guarded(patch, resource_version),
            _content_type=_MERGE_PATCH,
        )

    # -- HorizontalPodAutoscalers (autoscaling/v2) --------------------------------------

    async def list_hpas(self, namespace: str | None = None) -> Relist:
        return await self._list("horizontalpodautoscalers", namespace)

    async def get_hpa(self, namespace: str, name: str) -> JSON:
        return await self._call(
            ApiCall("autoscaling", "horizontalpodautoscalers", "get"),
            self._autoscaling.read_namespaced_horizontal_pod_autoscaler,
            name,
            namespace,
        )

    async def create_hpa(self, namespace: str, body: JSON) -> JSON:
        return await self._call(
            ApiCall("autoscaling", "horizontalpodautoscalers", "create"),
            self._autoscaling.create_namespaced_horizontal_pod_autoscaler,
            namespace,
            body,
        )

    async def patch_hpa(
        self, namespace: str, name: str, patch: JSON, *, resource_version: str | None = None
    ) -> JSON:
        return await self._call(
            ApiCall("autoscaling", "horizontalpodautoscalers", "patch"),
            self._autoscaling.patch_namespaced_horizontal_pod_autoscaler,
            name,
            namespace,
            _guarded(patch, resource_version),
            _content_type=_MERGE_PATCH,
        )

    async def delete_hpa(self, namespace: str, name: str, *, uid: str | None = None) -> JSON:
        """Delete an HPA; with `uid`, only that object (not one re-created under its name)."""
        body = {"preconditions": {"uid": uid}} if uid else None
        return await self._call(
            ApiCall("autoscaling", "horizontalpodautoscalers", "delete"),
            self._autoscaling.delete_namespaced_horizontal_pod_autoscaler,
            name,
            namespace,
            body=body,
        )

    # -- Ingresses -----------------------------------------------------------------------

    async def get_ingress(self, namespace: str, name: str) -> JSON:
        return await self._call(
            ApiCall("networking.k8s.io", "ingresses", "get"),
            self._net.read_namespaced_ingress,
            name,
            namespace,
        )

    async def create_ingress(self, namespace: str, body: JSON) -> JSON:
        return await self._call(
            ApiCall("networking.k8s.io", "ingresses", "create"),
            self._net.create_namespaced_ingress,
            namespace,
            body,
        )

    async def patch_ingress(
        self, namespace: str, name: str, patch: JSON, *, resource_version: str | None = None
    ) -> JSON:
        return await self._call(
            ApiCall("networking.k8s.io", "ingresses", "patch"),
            self._net.patch_namespaced_ingress,
            name,
            namespace,
            _guarded(patch, resource_version),
            _content_type=_MERGE_PATCH,
        )

    # -- Gateway API HTTPRoutes (a CRD: no generated model) -------------------------------

    async def get_httproute(self, namespace: str, name: str) -> JSON:
        return await self._call(
            ApiCall("gateway.networking.k8s.io", "httproutes", "get"),
            self._custom.get_namespaced_custom_object,
            "gateway.networking.k8s.io",
            "v1",
            namespace,
            "httproutes",
            name,
        )

    async def patch_httproute(
        self, namespace: str, name: str, patch: JSON, *, resource_version: str | None = None
    ) -> JSON:
        return await self._call(
            ApiCall("gateway.networking.k8s.io", "httproutes", "patch"),
            self._custom.patch_namespaced_custom_object,
            "gateway.networking.k8s.io",
            "v1",
            namespace,
            "httproutes",
            name,
            _guarded(patch, resource_version),
            _content_type=_MERGE_PATCH,
        )

    # -- external-dns DNSEndpoints (a CRD: no generated model) ---------------------------

    async def get_dnsendpoint(self, namespace: str, name: str) -> JSON:
        return await self._call(
            ApiCall("externaldns.k8s.io", "dnsendpoints", "get"),
            self._custom.get_namespaced_custom_object,
            "externaldns.k8s.io",
            "v1alpha1",
            namespace,
            "dnsendpoints",
            name,
        )

    async def create_dnsendpoint(self, namespace: str, body: JSON) -> JSON:
        return await self._call(
            ApiCall("externaldns.k8s.io", "dnsendpoints", "create"),
            self._custom.create_namespaced_custom_object,
            "externaldns.k8s.io",
            "v1alpha1",
            namespace,
            "dnsendpoints",
            body,
        )

    async def patch_dnsendpoint(
        self, namespace: str, name: str, patch: JSON, *, resource_version: str | None = None
    ) -> JSON:
        return await self._call(
            ApiCall("externaldns.k8s.io", "dnsendpoints", "patch"),
            self._custom.patch_namespaced_custom_object,
            "externaldns.k8s.io",
            "v1alpha1",
            namespace,
            "dnsendpoints",
            name,
            _guarded(patch, resource_version),
            _content_type=_MERGE_PATCH,
        )

    # -- ConfigMaps ----------------------------------------------------------------------

    async def get_configmap(self, namespace: str, name: str) -> JSON:
        return await self._call(
            ApiCall("", "configmaps", "get"), self._core.read_namespaced_config_map, name, namespace
        )

    async def put_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        *,
        resource_version: str | None = None,
        labels: Mapping[str, str] | None = None,
        owner: Mapping[str, str] | None = None,
        keep: Mapping[str, Any] | None = None,
    ) -> JSON:
        """Create the ConfigMap when `resource_version` is None (Conflict if it exists),
        else replace its data, guarded by `resource_version`. The RBAC allows this in the
        controller's own namespace only (OWN_NAMESPACE_RESOURCES). `owner` (an
        ownerReference: apiVersion, kind, name, uid) lets the garbage collector delete this
        ConfigMap with its owner; without blockOwnerDeletion it needs no further RBAC.
        `keep`: metadata of the object as read (KEPT_METADATA) that a replace must not
        drop, under `labels` and `owner`; ignored by a create."""
        metadata: JSON = kept_metadata(keep) if resource_version is not None else {}
        metadata.update(name=name, namespace=namespace)
        if labels:
            metadata["labels"] = {**metadata.get("labels", {}), **labels}
        if owner:
            refs = list(metadata.get("ownerReferences", ()))
            if not any(ref.get("uid") == owner.get("uid") for ref in refs):
                # listed already: the list stays as it is (any change to it, even its order,
                # needs 'delete' under OwnerReferencesPermissionEnforcement)
                refs.append(dict(owner))
            metadata["ownerReferences"] = refs
        body: JSON = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            "data": dict(data),
        }
        if resource_version is None:
            return await self._call(
                ApiCall("", "configmaps", "create"),
                self._core.create_namespaced_config_map,
                namespace,
                body,
            )
        body["metadata"]["resourceVersion"] = resource_version
        return await self._call(
            ApiCall("", "configmaps", "update"),
            self._core.replace_namespaced_config_map,
            name,
            namespace,
            body,
        )

    async def patch_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        *,
        resource_version: str | None = None,
    ) -> JSON:
        """Merge `data` into the ConfigMap's data: those keys are added or replaced, the
        others stay. Guarded by `resource_version` (Conflict if it moved)."""
        return await self._call(
            ApiCall("", "configmaps", "patch"),
            self._core.patch_namespaced_config_map,
            name,
            namespace,
            _guarded({"data": dict(data)}, resource_version),
            _content_type=_MERGE_PATCH,
        )

    # -- Events --------------------------------------------------------------------------

    async def emit_event(
        self,
        ref: ObjectRef,
        *,
        type: Literal["Normal", "Warning"],
        reason: str,
        message: str,
        component: str = "canary",
    ) -> JSON:
        """Record a core/v1 Event about `ref`, as `kubectl describe` shows them."""
        now = _now_seconds()
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{ref.name}.{time.time_ns():x}",
                "namespace": ref.namespace,
            },
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "namespace": ref.namespace,
                "name": ref.name,
                "uid": ref.uid,
            },
            "type": type,
            "reason": reason,
            # The API server rejects messages over 1 KiB.
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": os.environ.get("HOSTNAME", component),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        return await self._call(
            ApiCall("", "events", "create"), self._core.create_namespaced_event, ref.namespace, body
        )

    # -- reviews: who is calling, and may they ------------------------------------------

    async def review_token(self, token: str) -> JSON:
        """A TokenReview of a bearer token: its `status` (authenticated, user, error).
        The token is sent only in the body; no message ever quotes it."""
        return await self._call(
            ApiCall("authentication.k8s.io", "tokenreviews", "create"),
            self._authn.create_token_review,
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token},
            },
        )

    async def review_access(self, user: JSON, attributes: JSON) -> JSON:
        """A SubjectAccessReview: may `user` (a TokenReview's status.user: username, uid,
        groups, extra) do `attributes` (verb, group, resource, namespace, name)? Its
        `status` (allowed, denied, reason)."""
        spec: JSON = {
            "user": user.get("username", ""),
            "groups": list(user.get("groups") or []),
            "resourceAttributes": attributes,
        }
        if user.get("uid"):
            spec["uid"] = user["uid"]
        if user.get("extra"):
            spec["extra"] = user["extra"]
        return await self._call(
            ApiCall("authorization.k8s.io", "subjectaccessreviews", "create"),
            self._authz.create_subject_access_review,
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": spec,
            },
        )

    # -- Leases --------------------------------------------------------------------------

    async def get_lease(self, namespace: str, name: str) -> JSON:
        return await self._call(
            ApiCall("coordination.k8s.io", "leases", "get"),
            self._coord.read_namespaced_lease,
            name,
            namespace,
        )

    async def create_lease(self, namespace: str, body: JSON) -> JSON:
        return await self._call(
            ApiCall("coordination.k8s.io", "leases", "create"),
            self._coord.create_namespaced_lease,
            namespace,
            body,
        )

    async def replace_lease(self, namespace: str, name: str, body: JSON) -> JSON:
        """Replace a Lease; `body.metadata.resourceVersion` makes it conditional."""
        return await self._call(
            ApiCall("coordination.k8s.io", "leases", "update"),
            self._coord.replace_namespaced_lease,
            name,
            namespace,
            body,
        )


def _target(call: ApiCall, args: tuple[Any, ...]) -> str:
    """namespace/name of a call, for messages, from the generated methods' argument order."""
    if call.resource in ("tokenreviews", "subjectaccessreviews"):
        return ""  # cluster-scoped, and the body holds a token: never quoted
    if call.group in ("gateway.networking.k8s.io", "externaldns.k8s.io"):
        if call.verb in ("list", "watch"):  # (group, version, [namespace,] plural)
            return f"in {args[2]}" if len(args) == 4 else "in all namespaces"
        # custom objects: (group, version, namespace, plural, name or body)
        name = args[4] if isinstance(args[4], str) else (args[4].get("metadata") or {}).get("name")
        return f"{args[2]}/{name}"
    if call.verb == "create":  # (namespace, body)
        return f"{args[0]}/{(args[1].get('metadata') or {}).get('name', '')}"
    if call.verb in ("list", "watch"):  # (namespace,) or all namespaces
        return f"in {args[0]}" if args else "in all namespaces"
    return f"{args[1]}/{args[0]}"  # (name, namespace, ...)


def _error(status: int, message: str) -> KubeError:
    if status == 404:
        return NotFound(message)
    if status == 409:
        return Conflict(message)
    if status == 410:
        return Gone(message)
    return Rejected(status, message)


def _decode(status: int, retry_after: str | None, body: bytes, what: str) -> JSON:
    """A response as JSON, or the matching error (transient ones are retried)."""
    if 200 <= status < 300:
        try:
            decoded = json.loads(body)
        except ValueError as exc:
            raise Rejected(status, f"{what}: answer is not JSON: {body[:200]!r}") from exc
        if not isinstance(decoded, dict):
            raise Rejected(status, f"{what}: answer is not a JSON object")
        return decoded
    try:
        message = str(json.loads(body).get("message") or "")
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    text = f"{what}: HTTP {status}: {message}".rstrip(": ")
    if status in _TRANSIENT_STATUSES:
        delay: float | None = None
        if retry_after is not None:
            try:
                delay = max(0.0, float(retry_after))
            except ValueError:
                delay = None  # an HTTP date: fall back to our own backoff
        raise _Transient(text, status=status, retry_after=delay)
    raise _error(status, text)


# -- reading Deployment status -----------------------------------------------------------


RolloutState = Literal["done", "progressing", "failed"]


def deployment_rollout(obj: JSON) -> tuple[RolloutState, str]:
    """Whether a Deployment has finished rolling out, as `kubectl rollout status` judges it:
    the controller has seen the latest spec, every replica is updated and available, and
    no old replica remains. "failed" once its progress deadline is exceeded."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    name = meta.get("name", "?")
    generation = int(meta.get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    if observed < generation:
        return "progressing", f"{name}: waiting for the controller to see generation {generation}"
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "Progressing"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return "failed", f"{name}: progress deadline exceeded: {condition.get('message', '')}"
    wanted = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < wanted:
        return "progressing", f"{name}: {updated} of {wanted} replicas updated"
    if total > updated:
        return "progressing", f"{name}: {total - updated} old replicas pending termination"
    if available < updated:
        return "progressing", f"{name}: {available} of {updated} updated replicas available"
    return "done", f"{name}: {updated} replicas updated and available"


# -- events, without the flood ------------------------------------------------------------


class EventRecorder:
    """Sends Events, but not the same one again and again.

    A level-triggered controller sees a bad annotation on every reconcile; one Warning per
    `repeat_after_s` says it as clearly as a hundred. An Event that cannot be sent is logged
    and reported as False, never raised: Events explain, they must not stop a rollout.
    """

    def __init__(
        self,
        kube: Kube,
        *,
        component: str = "canary",
        repeat_after_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.component = component
        self.repeat_after_s = repeat_after_s
        self.clock = clock
        self._sent: dict[tuple[str, str, str, str, str], float] = {}

    async def record(
        self, ref: ObjectRef, *, type: Literal["Normal", "Warning"], reason: str, message: str
    ) -> bool:
        """Send the Event unless an identical one went out within `repeat_after_s`."""
        key = (ref.uid or f"{ref.namespace}/{ref.kind}/{ref.name}", ref.name, type, reason, message)
        now = self.clock()
        last = self._sent.get(key)
        if last is not None and now - last < self.repeat_after_s:
            return False
        try:
            await self.kube.emit_event(
                ref, type=type, reason=reason, message=message, component=self.component
            )
        except Conflict:
            # Each Event's name is new, so "already exists" means an earlier attempt of this
            # very call landed and only its answer was lost (a timeout, then the retry).
            pass
        except KubeError as exc:
            log.warning(
                "event %s %s on %s/%s not sent: %s", type, reason, ref.namespace, ref.name, exc
            )
            return False
        self._sent[key] = now
        # Forget what can no longer suppress anything, so the map stays small.
        self._sent = {k: t for k, t in self._sent.items() if now - t < self.repeat_after_s}
        return True


# -- leader election ---------------------------------------------------------------------


@dataclass
class LeaderElector:
    """Leader election on a coordination.k8s.io/v1 Lease; `is_leader` is the only truth.

    `is_leader` turns False by itself `renew_deadline_s` after the start of the last
    successful renewal, whether or not the loop is running, so a stalled leader stops
    acting before another candidate can take over (which takes a whole
    `lease_duration_s` of the Lease unchanged, counted from the previous read only while
    that leaves `SAFETY_S` after the leader's renew deadline: canary.kubernetes.shards).
    """

    kube: Kube
    namespace: str
    name: str
    identity: str
    lease_duration_s: int = 15
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    on_change: Callable[[bool], None] | None = None
    clock: Callable[[], float] = time.monotonic
    safety_s: float = SAFETY_S
    _leader_until: float = field(default=0.0, init=False)
    _leading: bool = field(default=False, init=False)
    _observed_rv: str | None = field(default=None, init=False)
    _observed_at: float = field(default=0.0, init=False)  # since when it counts as unchanged
    _last_read: float | None = field(default=None, init=False)  # the last read's start
    # The longest `F - P` for which a record's count starts at `P`; None: never (no room)
    _from_previous_within: float | None = field(default=None, init=False)
    _next_expiry: float = field(default=math.inf, init=False)  # another holder's, as observed
    _lease: JSON | None = field(default=None, init=False)
    _standby_for: str = field(default="", init=False)  # the holder last logged as such

    def __post_init__(self) -> None:
        if self.lease_duration_s < 1:
            raise ValueError(f"lease_duration_s must be >= 1, got {self.lease_duration_s}")
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                "leader election needs 0 < retry_period_s < renew_deadline_s < lease_duration_s, "
                f"got {self.retry_period_s}, {self.renew_deadline_s}, {self.lease_duration_s}"
            )
        if not self.identity:
            raise ValueError("identity must not be empty")
        if self.safety_s <= 0:
            raise ValueError(f"safety_s must be > 0, got {self.safety_s}")
        room = self.lease_duration_s - self.renew_deadline_s - self.safety_s
        if room >= self.retry_period_s:  # else a read a retry period apart never qualifies
            self._from_previous_within = room

    @property
    def leader_until(self) -> float:
        """The `clock()` time at which leadership lapses unless renewed; once it has
        been lost, the time it ended."""
        return self._leader_until

    @property
    def is_leader(self) -> bool:
        # Read from the operator's loop while the elector's thread writes
        # (canary.kubernetes.lease_thread): `_leader_until` is set before `_leading` turns True
        # and cut before it turns False, so a read between the two errs towards False.
        return self._leading and self.clock() < self._leader_until

    def _set_leading(self, leading: bool) -> None:
        if not leading:
            self._leader_until = min(self._leader_until, self.clock())
        if leading != self._leading:
            self._leading = leading
            log.info(
                "lease %s/%s: %s %s leadership",
                self.namespace,
                self.name,
                self.identity,
                "acquired" if leading else "lost",
            )
            if self.on_change is not None:
                self.on_change(leading)

    async def run(self, stop: asyncio.Event) -> None:
        """Acquire and renew until `stop` is set, then release the Lease."""
        try:
            while not stop.is_set():
                started = self.clock()
                try:
                    renewed = await self.try_acquire_or_renew()
                except KubeError as exc:
                    log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                    renewed = False
                if renewed and self.clock() < started + self.renew_deadline_s:
                    self._leader_until = started + self.renew_deadline_s
                    self._set_leading(True)
                elif not self.is_leader:
                    self._set_leading(False)
                wake = self.wake_at()
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, wake - self.clock()))
                except TimeoutError:
                    pass
                if self._leading and not self.is_leader:
                    self._set_leading(False)
        finally:
            was_leader = self.is_leader
            self._set_leading(False)
            if was_leader and stop.is_set():
                await self.release()

    def wake_at(self) -> float:
        """When the loop looks again: a retry period from now, or sooner when leadership
        lapses or the other holder's record would have expired (a takeover then, not a
        round later)."""
        now = self.clock()
        wake = now + self.retry_period_s
        if self._leading:
            wake = min(wake, self._leader_until)
        if now < self._next_expiry < wake:
            wake = self._next_expiry
        return wake

    async def try_acquire_or_renew(self) -> bool:
        """One round: True if this candidate holds the Lease now (written just now)."""
        began = self.clock()
        previous, self._next_expiry = self._last_read, math.inf
        try:
            lease = await self.kube.get_lease(self.namespace, self.name)
        except NotFound:
            self._last_read = began
            try:
                self._lease = await self.kube.create_lease(self.namespace, self._body(None, None))
            except Conflict:
                return False  # another candidate created it first
            return True
        meta, spec = lease.get("metadata", {}), lease.get("spec") or {}
        now = self.clock()
        self._last_read = began
        if meta.get("resourceVersion") != self._observed_rv:
            # From the previous read's start if provably safe (canary.kubernetes.shards).
            since = now
            if (
                previous is not None
                and self._from_previous_within is not None
                and spec.get("leaseDurationSeconds") == self.lease_duration_s
                and now - previous <= self._from_previous_within
            ):
                since = previous
            self._observed_rv, self._observed_at = meta.get("resourceVersion"), since
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and holder != self.identity and now < self._observed_at + duration:
            self._next_expiry = self._observed_at + duration
            if holder != self._standby_for:
                self._standby_for = holder
                log.info(
                    "lease %s/%s: held by %s; %s is standby",
                    self.namespace,
                    self.name,
                    holder,
                    self.identity,
                )
            return False
        self._standby_for = ""
        try:
            self._lease = await self.kube.replace_lease(
                self.namespace, self.name, self._body(lease, meta.get("resourceVersion"))
            )
        except Conflict:
            return False  # someone else wrote it since we read it
        return True

    def _body(self, current: JSON | None, resource_version: str | None) -> JSON:
        spec = dict((current or {}).get("spec") or {})
        now = _now_micro()
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                current is not None
            )
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=self.lease_duration_s,
            renewTime=now,
        )
        # a renewal replaces the Lease: what others set on it stays (KEPT_METADATA)
        meta: JSON = {
            **kept_metadata((current or {}).get("metadata")),
            "name": self.name,
            "namespace": self.namespace,
        }
        if resource_version is not None:
            meta["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    async def release(self) -> None:
        """Give the Lease up so that another candidate need not wait for it to expire."""
        self._set_leading(False)
        if (
            self._lease is None
            or (self._lease.get("spec") or {}).get("holderIdentity") != self.identity
        ):
            return
        meta = self._lease["metadata"]
        spec = dict(self._lease.get("spec") or {})
        spec.update(holderIdentity="", renewTime=_now_micro(), leaseDurationSeconds=1)
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                **kept_metadata(meta),
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": meta.get("resourceVersion"),
            },
            "spec": spec,
        }
        try:
            self._lease = await self.kube.replace_lease(self.namespace, self.name, body)
        except KubeError as exc:
            log.info(
                "lease %s/%s: release failed (it will expire): %s", self.namespace, self.name, exc
            )
