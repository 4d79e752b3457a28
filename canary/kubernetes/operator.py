"""The Kubernetes reconciler: annotated Deployments roll out by themselves.

Why it is shaped like this: the pieces exist already, each tested on its own (the pure
rollout machine, D's RolloutRunner, G's Kube adapter, routers, annotation schema, F's record
store), so this module only joins them, and keeps four promises that only the join can keep.

Ownership (Flagger's model). The user edits Deployment `app` (annotated `canary.dev/enabled`).
On first sight the controller creates `app-primary` (a copy of `app`'s pod template, its
selector labels suffixed `-primary`, owned by `app`), the Services `app-primary` and
`app-canary`, the router at 0%, and scales `app` to zero. A new pod template on `app`
(`template_hash`) starts a rollout: `app` is scaled up, weights move, the analysis runs. On
pass the template is copied to `app-primary`, the controller waits until that rollout has
completed (`kube.deployment_rollout`), the weight goes back to 0 and `app` scales to zero.
On fail: weight 0, scale to zero. A template changed again mid-rollout ends the record with
outcome `superseded` and starts a new record whose start entry says what it superseded.

HPAs are watched beside the Deployments; a change to an app's HPA (or to our mirror of it)
wakes that app's worker, which syncs app-primary's HPA (canary.kubernetes.workload). The
canary's size is `canary.dev/canary-replicas`, else the app's HPA's minReplicas (the HPA then
scales the canary), else the app's replica count at first sight.

Ingresses and HTTPRoutes are watched too, into caches (canary.kubernetes.informer) that the
routers' per-tick read-back comes from instead of a GET per rollout per tick.

Fast rollback (`canary.dev/fast-rollback-window`, off by default): the status keeps the
template app-primary had before the last promotion and when that promotion was; a revert of
`app` to it within the window is promoted at once, without analysis, with a three-entry
record and a FastRollback Event that say why. The window is on the controller's clock (wall
time anchored at start), since it must hold across restarts, which no monotonic clock does.

State survives restarts. `KubeState` (compact JSON in the `canary.dev/status` annotation)
holds the rollout machine's whole `RolloutStatus`, the promoted revision, the record's
ConfigMap and the last manual command answered. It is written with resourceVersion-guarded
merge patches (Conflict: re-read, retry), once per reconcile (tick or command), and also just
*before* each weight change (write-ahead), so a controller killed between writing a weight
and saving its status cannot move the weight back on resume. A new instance resumes each
active rollout: same step, same step timer, no step taken twice. The analysis evidence is
rebuilt by replaying the cumulative counts of the record's ticks (since the analysis start)
into a fresh Analyzer, then the next tick re-queries Prometheus from the same
`analysis_started_at`, so nothing observed before the restart is lost (the analysis is
cadence-invariant, so a downsampled record replays to the same evidence as far as it goes).

Bad annotations are data: a Warning Event and the `canary.dev/spec-error` annotation (JSON:
key -> rule) on the Deployment, traffic untouched; the next watch event with valid
annotations clears it, no restart needed.

One actor at a time: with leader election only the Lease holder reconciles; losing the
Lease cancels every rollout task at once, and every write first checks `is_leader` (which
lapses by itself at the renew deadline), so two replicas never act at once. With shards
(canary.kubernetes.shards) the same holds per shard: a rollout is acted on only by the holder
of its shard's Lease, every write checks `holds(shard)`, and a shard lost stops its rollouts;
the others' rollouts are not touched, not even their status. Given `lease_kube`, the elector
runs on a thread of its own with that client (canary.kubernetes.lease_thread), so a loop busy
with many rollouts cannot make it miss its renewals.

Manual commands come from the CLI as the `canary.dev/command` annotation (JSON with an id);
the answer is stored in the status. GitOps tools never see the spec change.

Records: a head ConfigMap per rollout in the controller's namespace and sealed chunk
ConfigMaps owned by it (record_store: written incrementally, the history never rewritten). A failed write never fails the rollout: it is logged, counted
(`canary_errors{kind="record"}`), shown in the status (`record_error`) and sent as a Warning
Event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from analysis import Analyzer
from canary.core.advice import runner_traffic
from canary.core.fields import unknown_fields
from canary.core.inputs import MAX_ANNOTATION_BYTES, InputError, check_tick, clip, load_json
from canary.core.records import EndEntry, NoteEntry, StartEntry
from canary.core.redact import redact_text
from canary.core.rollout import (
    Command,
    RolloutStatus,
)
from canary.kubernetes.client import (
    Conflict,
    EventRecorder,
    Kube,
    KubeError,
    LeaderElector,
    ObjectRef,
    Relist,
    WatchEvent,
)
from canary.kubernetes.informer import ObjectCache, pack
from canary.kubernetes.lease_thread import LeaseThread
from canary.kubernetes.record_store import MAX_CONFIGMAP_BYTES, ConfigMapRecord
from canary.kubernetes.shards import ShardElector
from canary.kubernetes.spec import (
    ANNOTATION_COMMAND,
    ANNOTATION_SPEC_ERROR,
    ANNOTATION_STATUS,
    PREFIX,
    RESERVED,
    CanarySpec,
    SpecError,
    dump_problems,
    parse_annotations,
)
from canary.kubernetes.workload import (
    MANAGED_BY,
    MANAGED_BY_SELECTOR,
    AppDeployments,
    hpa_target,
    primary_template,
    template_hash,
)
from canary.metrics.batched import BatchedMetrics, PrometheusBatcher
from canary.notify.gates import GateCaller, GateConfig, load_from_gates
from canary.notify.webhooks import Notification, Notifier, NotifierError, WebhookConfig
from canary.routers.base import RouterError, TrafficRouter
from canary.routers.gateway_api import GatewayApiRouter
from canary.routers.ingress_nginx import IngressNginxRouter
from canary.runner import (
    CommandResult,
    NotActing,
    RolloutRunner,
    SavedRollout,
    StateWriteError,
    Telemetry,
    UnknownRollout,
)
from canary.runner.clock import MonotonicWallClock

__all__ = [
    "ENABLED",
    "AnnotationStore",
    "KubeState",
    "ManualRequest",
    "MetricBrief",
    "NotLeader",
    "Operator",
    "OperatorSettings",
    "parse_command",
    "primary_template",
    "template_hash",
]

log = logging.getLogger("canary.kubernetes.operator")

JSON = dict[str, Any]
ENABLED = PREFIX + "enabled"
_STATUS_ATTEMPTS = 5


# Which rollout events each annotated webhook type is told of (canary.notify.webhooks).
_WEBHOOK_EVENTS: dict[str, frozenset[Any]] = {
    "post-rollout": frozenset({"promoted", "rolled_back", "manual"}),
    "rolled-back": frozenset({"rolled_back"}),
    "event": frozenset({"event"}),  # every Kubernetes Event recorded for the app
}
# Event posts in flight per app beyond which more are dropped (and logged): a receiver that
# hangs must not pile up tasks, one per Event, for as long as it hangs.
_MAX_EVENT_POSTS = 64


def _gate_caller(spec: CanarySpec, allow_hosts: tuple[str, ...]) -> GateCaller | None:
    """The annotated gate webhooks (canary.notify.gates); the runner closes the caller."""
    gates = [
        GateConfig(
            type=hook.type,  # type: ignore[arg-type]  # a gate kind: is_gate says so
            url=hook.url,
            timeout_s=hook.timeout_s,
            retries=hook.retries,
            metadata=hook.metadata,
        )
        for hook in spec.webhooks
        if hook.is_gate
    ]
    return GateCaller(gates, allow_hosts=allow_hosts) if gates else None


class NotLeader(NotActing):
    """This instance may not act (it lost, or never held, the Lease)."""


# ---- persisted state -------------------------------------------------------------------


class CommandAnswer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")  # persisted: see KubeState

    id: str
    command: str
    accepted: bool
    message: str = ""


class MetricBrief(BaseModel):
    """One metric's result in the status annotation, as `canary status` shows it."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)  # see KubeState

    decision: str
    estimate: float | None = None
    lower: float | None = None
    upper: float | None = None
    scale: str = "ratio"
    critical: bool = True
    fail_ratio: float | None = None


class KubeState(BaseModel):
    """Everything the controller keeps on a Deployment (the status annotation)."""

    # Read back by whichever canary runs next, maybe an older one: fields it does not know
    # are ignored (and named in a warning: unknown_fields), as RolloutStatus', not fatal.
    model_config = ConfigDict(frozen=True, extra="ignore")

    primary_revision: str = ""  # template hash now on app-primary
    replicas: int = 1  # the app's replica count at first sight: production's size
    # The template app-primary had before the last promotion, and when (the controller's
    # clock, unix seconds: a window must survive restarts) that promotion was: a revert to
    # it within canary.dev/fast-rollback-window skips the analysis. "" once used.
    previous_revision: str = ""
    promoted_at: float = 0.0
    rollout: RolloutStatus | None = None  # the current, or the last, rollout
    rollout_id: str = ""
    record: str = ""  # "namespace/configmap" of the rollout's record
    record_error: str = ""  # the last failure to write it, "" once a write succeeds
    command: CommandAnswer | None = None  # the last manual command answered
    # Each metric's result at the last save (the status is saved on every change of phase or
    # step and at least every volatile_save_s), so `canary status` shows them in a cluster.
    metrics: dict[str, MetricBrief] = {}

    def to_json(self) -> str:
        return self.model_dump_json(exclude_defaults=True)

    @classmethod
    def from_annotation(cls, text: str | None) -> KubeState | None:
        if not text:
            return None
        return cls.model_validate_json(text)

    @classmethod
    def unknown_fields(cls, text: str) -> list[str]:
        """The fields of a status annotation this version does not know (a newer canary
        wrote them), as dotted paths: they are ignored when it is read."""
        try:
            data = json.loads(text)
        except ValueError:
            return []
        return unknown_fields(cls, data)


class ManualRequest(BaseModel):
    """The `canary.dev/command` annotation, written by `canary promote|abort|pause|resume`.
    Read with `parse_command`: bounded, and its errors quote no more than an excerpt."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    id: str = Field(max_length=200)
    command: Literal["promote", "abort", "pause", "resume"]
    who: str = Field(default="cli", max_length=256)
    reason: str = Field(default="", max_length=2000)
    at: float = 0.0


def parse_command(raw: str) -> ManualRequest:
    """The request in a command annotation's value. Raises ValueError saying why, briefly."""
    if len(raw) > MAX_ANNOTATION_BYTES:
        raise ValueError(f"{len(raw)} characters; at most {MAX_ANNOTATION_BYTES} are read")
    try:
        data = load_json(raw, source=ANNOTATION_COMMAND)
    except InputError as exc:
        raise ValueError(str(exc).removeprefix(f"{ANNOTATION_COMMAND}: ")) from None
    try:
        return ManualRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        raise ValueError(clip(message, 300)) from None


# ---- pure helpers ----------------------------------------------------------------------


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta["name"])


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def _enabled_key_present(obj: Mapping[str, Any]) -> bool:
    return ENABLED in _annotations(obj)


def _seconds(value: float) -> str:
    """A duration for people: 3600 -> 1h0m0s, 42.5 -> 42s."""
    whole = int(value)
    hours, rest = divmod(whole, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _default_identity() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


@dataclass(frozen=True)
class OperatorSettings:
    """How the reconciler runs; the CLI's `canary kubernetes` flags."""

    prometheus_url: str
    record_namespace: str
    namespace: str | None = None  # None: every namespace
    tick_s: float = 10.0
    # The record's head ConfigMap is rewritten at most this often (ticks lost with a crash are
    # only the report's resolution: counts are cumulative), except on transitions and the
    # end, written at once, and when the runner needs the last data time stored (a minute
    # each for the record and the status, taking turns, at the default no-data deadline).
    record_flush_s: float = 60.0
    promote_timeout_s: float = 300.0  # how long one promotion attempt waits for app-primary
    promote_poll_s: float = 1.0
    identity: str = ""
    metrics_timeout_s: float = 5.0
    record_max_bytes: int = MAX_CONFIGMAP_BYTES  # each record ConfigMap stays under 1 MiB
    # Webhook hosts (from annotations) that may be loopback, link-local or the API server.
    allow_webhook_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_tick(self.tick_s)
        except ValueError as exc:
            raise ValueError(f"tick_s {exc}") from None
        if self.record_flush_s < 0:
            raise ValueError(f"record_flush_s must be >= 0, got {self.record_flush_s}")
        if not self.prometheus_url.startswith(("http://", "https://")):
            raise ValueError(
                f"prometheus url must start with http:// or https://, got {self.prometheus_url!r}"
            )
        if not self.record_namespace:
            raise ValueError("record_namespace must name the namespace for record ConfigMaps")


# ---- the runner's Kubernetes adapters ----------------------------------------------------


class AnnotationStore:
    """The runner's StateStore: the `canary.dev/status` annotation of the Deployment.

    `load` gives the rollout that the annotation held when the worker started (read once, on
    first sight); `save` writes the worker's whole KubeState, resourceVersion-guarded."""

    def __init__(self, worker: DeploymentWorker, resume: SavedRollout | None) -> None:
        self.worker = worker
        self.resume = resume

    def __str__(self) -> str:
        return f"the {ANNOTATION_STATUS} annotation of {self.worker.name}"

    async def acquire(self) -> None:
        return None  # the Lease makes this replica the only one acting

    async def release(self) -> None:
        return None

    async def load(self) -> SavedRollout | None:
        return self.resume

    async def save(self, saved: SavedRollout) -> None:
        try:
            await self.worker.persist()
        except KubeError as exc:  # conflicts that would not settle, an API that stays away
            raise StateWriteError(f"the status annotation of {self.worker.name}: {exc}") from exc


# ---- one Deployment ---------------------------------------------------------------------


class DeploymentWorker:
    """Reconciles one annotated Deployment: one task, woken by each watch event."""

    def __init__(self, op: Operator, key: tuple[str, str]) -> None:
        self.op = op
        self.key = key
        # The Deployment as its last event had it, packed as compact JSON: a dict of it is
        # ~8 KiB and a replica holds a thousand (issue 13's RSS); `obj` decodes it.
        self._held = b""
        self.state: KubeState | None = None
        self.runner: RolloutRunner | None = None
        self.record_error = ""
        self._rv = ""
        self._written = ""
        # resourceVersions of our own writes to this Deployment: their watch events carry
        # nothing to reconcile (issue 13: no reconcile triggered by our own writes).
        self._own_versions: deque[str] = deque(maxlen=8)
        self.reconciles = 0  # for tests and /metrics-style introspection
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._runner_task: asyncio.Task[RolloutStatus] | None = None
        self._metrics: BatchedMetrics | None = None
        self.task: asyncio.Task[None] | None = None
        self.spec_error: str = ""
        self._hpa_error = ""  # the last failure to sync app-primary's HPA
        self.notifier: Notifier | None = None
        self._webhooks: tuple[WebhookConfig, ...] = ()
        self._event_posts_dropped = 0  # Events not posted while too many posts were in flight
        # The last valid spec and the canary.dev/ annotations it came from: most reconciles
        # (a command, the Deployment's status, a rollout ended) leave them as they were, and
        # parsing them is most of a reconcile's CPU.
        self._parsed: tuple[tuple[tuple[str, str], ...], CanarySpec] | None = None

    @property
    def name(self) -> str:
        return f"{self.key[0]}/{self.key[1]}"

    @property
    def obj(self) -> JSON:
        """The Deployment as its last event had it ({} before any), the caller's own copy:
        decoded at each use (a reconcile, an Event, a promotion), not each tick."""
        if not self._held:
            return {}
        decoded: JSON = json.loads(self._held)
        return decoded

    def acting(self) -> bool:
        return self.op.acting(self.key)

    def check_acting(self) -> None:
        self.op.check_acting(self.key)

    def update(self, obj: JSON, held: bytes | None = None) -> None:
        """The Deployment's new version (`held`: its packed text, if made already)."""
        previous, self._held = self._held, pack(obj) if held is None else held
        version = obj["metadata"].get("resourceVersion", self._rv)
        self._rv = version
        if version and version in self._own_versions:
            return  # the echo of our own write: nothing in it we did not decide
        if previous == self._held:
            return  # the same object again (a relist)
        if previous and _same_but_our_status(json.loads(previous), obj):
            return  # an echo that came before the answer to our write told us its version
        self._changed.set()

    def _wrote(self, obj: JSON) -> None:
        self._rv = obj["metadata"]["resourceVersion"]
        self._own_versions.append(self._rv)

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name=f"deployment:{self.name}")

    async def stop(self) -> None:
        """Cancel the rollout and the worker; weights stay where they are."""
        for task in (self._runner_task, self.task):
            if task is not None:
                task.cancel()
        for task in (self._runner_task, self.task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.notifier is not None:
            await self.notifier.aclose(grace_s=2.0)
            self.notifier = None

    async def _notifier(self, spec: CanarySpec) -> Notifier | None:
        """Notifications (in each webhook's format) for the `post-rollout` (promoted, rolled back,
        manual actions), `rolled-back` and `event` (every Kubernetes Event) webhooks; the gate
        kinds go to the runner. One notifier for the worker, whose webhooks follow the
        annotations (None while they name none)."""
        hooks = tuple(
            WebhookConfig(
                url=hook.url,
                events=_WEBHOOK_EVENTS[hook.type],
                format=hook.format,
                metadata=hook.metadata,
                # a notification's own default unless `.timeout` was given
                timeout_s=(
                    hook.timeout_s
                    if "timeout_s" in hook.model_fields_set
                    else WebhookConfig.model_fields["timeout_s"].default
                ),
            )
            for hook in spec.webhooks
            if hook.type in _WEBHOOK_EVENTS
        )
        if hooks != self._webhooks:
            if self.notifier is not None:
                # In place: its deliveries in flight go on, and it keeps the rollout's target
                # (a new notifier would cancel the first and misname the next notification).
                self.notifier.use(hooks)
            elif hooks:
                allow = self.op.settings.allow_webhook_hosts
                self.notifier = Notifier(hooks, allow_hosts=allow)
            self._webhooks = hooks
        return self.notifier if hooks else None

    async def _loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self.reconcile()
            except NotLeader:
                return
            except Exception as exc:  # an API error, or a bug: retried, never fatal
                log.warning("%s: reconcile failed, retrying: %s", self.name, exc, exc_info=True)
                with contextlib.suppress(Exception):
                    await self.event("Warning", "ReconcileFailed", f"will retry: {exc}")
                await asyncio.sleep(self.op.settings.tick_s)
                self._changed.set()

    # ---- cluster writes -------------------------------------------------------------

    async def announce(self, type: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        """The runner's Announcer: its transitions become Events on this Deployment."""
        await self.event(type, reason, message)

    async def event(self, type: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        if not self.acting() or not self._held:
            return
        if await self.op.events.record(
            ObjectRef.deployment(self.obj), type=type, reason=reason, message=message
        ):
            # As the Event went out: not a repeat the recorder held back, the API server's
            # 1 KiB cut (so a receiver sees what `kubectl describe` shows).
            self._post_event(type, reason, message[:1024])

    def _tell_entry(self, entry: Any) -> None:
        """A record entry to the notification webhooks: those the spec names now (the
        reconcile keeps the notifier in step with the annotations, mid-rollout too)."""
        if self.notifier is not None:
            with contextlib.suppress(NotifierError):  # closed meanwhile: the worker is stopping
                self.notifier.on_entry(entry, target=self.name)

    def _post_event(self, type: str, reason: str, message: str) -> None:
        """Tell the `webhook.event` webhooks of an Event just recorded (never waits)."""
        notifier = self.notifier
        if notifier is None or not notifier.wants("event"):
            return
        if notifier.pending_of("event") >= _MAX_EVENT_POSTS:
            if not self._event_posts_dropped:
                log.warning(
                    "%s: %d Event posts in flight (webhook.event does not answer); Events "
                    "are not posted until they end",
                    self.name,
                    _MAX_EVENT_POSTS,
                )
            self._event_posts_dropped += 1
            return
        if self._event_posts_dropped:
            log.warning(
                "%s: Events are posted again; %d were not (webhook.event was not answering)",
                self.name,
                self._event_posts_dropped,
            )
            self._event_posts_dropped = 0
        namespace, name = self.key
        rollout = self.runner.status if self.runner is not None else None
        if rollout is None and self.state is not None:
            rollout = self.state.rollout
        target = self.name
        with contextlib.suppress(NotifierError):  # closed meanwhile: the worker is stopping
            notifier.notify(
                Notification(
                    event="event",
                    rollout=self.runner.rollout_id if self.runner is not None else target,
                    target=target,
                    title=f"{target}: {reason}",
                    # leaves the cluster: an error's text may quote a URL with its token
                    text=redact_text(message),
                    at=self.op.clock(),
                    fields={
                        "name": name,
                        "namespace": namespace,
                        "phase": rollout.phase.value if rollout is not None else "",
                        "checksum": rollout.revision if rollout is not None else "",
                        "type": type,
                        "reason": reason,
                    },
                )
            )

    async def _patch_annotations(self, annotations: Mapping[str, str | None]) -> None:
        """A merge patch of annotations only, guarded by resourceVersion; on Conflict the
        object is read again and the patch retried."""
        namespace, name = self.key
        for attempt in range(_STATUS_ATTEMPTS):
            self.check_acting()
            try:
                written = await self.op.kube.patch_deployment(
                    namespace,
                    name,
                    {"metadata": {"annotations": dict(annotations)}},
                    resource_version=self._rv or None,
                )
            except Conflict:
                if attempt == _STATUS_ATTEMPTS - 1:
                    raise
                fresh = await self.op.kube.get_deployment(namespace, name)
                self._rv = fresh["metadata"]["resourceVersion"]
                continue
            self._wrote(written)
            return

    def current_state(self) -> KubeState:
        state = self.state or KubeState()
        runner = self.runner
        update: dict[str, Any] = {"record_error": self.record_error}
        if runner is not None:
            self.record_error = runner.record_error
            update["record_error"] = runner.record_error
            status = runner.status
            update.update(rollout=status, rollout_id=runner.rollout_id, record=runner.record_ref)
            update["metrics"] = {
                name: MetricBrief.model_validate(
                    {k: v for k, v in m.items() if k in MetricBrief.model_fields}
                )
                for name, m in runner.metric_results().items()
            }
            if status.done and status.outcome == "promoted":
                update["primary_revision"] = status.revision
                if status.revision != state.primary_revision:
                    update["previous_revision"] = state.primary_revision
                    update["promoted_at"] = self.op.clock()
        return state.model_copy(update=update)

    async def persist(self) -> None:
        """Write the state annotation if it changed (once per reconcile)."""
        async with self._lock:
            state = self.current_state()
            text = state.to_json()
            if text == self._written:
                return
            await self._patch_annotations({ANNOTATION_STATUS: text})
            self.state = state
            self._written = text

    # ---- reconcile ------------------------------------------------------------------

    async def reconcile(self) -> None:
        self.reconciles += 1
        obj = self.obj
        self.check_acting()
        annotations = _annotations(obj)
        source = tuple(
            sorted(
                (k, v) for k, v in annotations.items() if k.startswith(PREFIX) and k not in RESERVED
            )
        )
        if self._parsed is not None and self._parsed[0] == source:
            spec = self._parsed[1]
        else:
            try:
                spec = parse_annotations(annotations)
            except SpecError as exc:
                self._parsed = None
                await self._bad_spec(exc)
                return
            self._parsed = (source, spec)
        if not spec.enabled:
            return
        await self._notifier(spec)  # `webhook.event` hears of every Event from now on
        if self.spec_error or ANNOTATION_SPEC_ERROR in annotations:
            await self._patch_annotations({ANNOTATION_SPEC_ERROR: None})
            if self.spec_error:
                await self.event(
                    "Normal", "SpecValid", "the canary.dev annotations are valid again"
                )
            self.spec_error = ""

        if self.state is None:
            text = annotations.get(ANNOTATION_STATUS)
            try:
                self.state = KubeState.from_annotation(text)
                if text and (unknown := KubeState.unknown_fields(text)):
                    log.warning(
                        "%s: the status annotation has fields this canary does not know, "
                        "ignored (written by a newer version?): %s",
                        self.name,
                        ", ".join(unknown),
                    )
            except ValidationError as exc:
                log.warning("%s: unreadable status annotation, starting over: %s", self.name, exc)
                self.state = None
            if self.state is not None:
                self._written = self.state.to_json()
        if self.state is None:
            await self._initialize(spec)
            return

        await self._sync_hpa()
        command = annotations.get(ANNOTATION_COMMAND)
        revision = template_hash(obj)
        running = self._runner_task is not None and not self._runner_task.done()
        if running:
            assert self.runner is not None
            await self._handle_command(command)
            self.runner.supersede(revision)
            return
        state = self.state
        last = state.rollout
        if last is not None and last.underway:  # underway: also waiting at a start gate
            await self._start_rollout(spec, revision=last.revision, resume=last)
            if revision != last.revision:
                assert self.runner is not None
                self.runner.supersede(revision)
            # Only now: a command sent while no replica ran this rollout (a restart, a new
            # leader) goes to the resumed runner, not "no rollout is in progress".
            await self._handle_command(command)
            return
        await self._handle_command(command)
        if revision == state.primary_revision:
            return
        if last is not None and last.revision == revision:
            return  # this version was rolled back: it waits for a new template
        fast = self._fast_rollback_reason(spec, revision)
        if fast:
            await self._fast_rollback(revision, fast)
            return
        await self._start_rollout(spec, revision=revision, resume=None)

    def _fast_rollback_reason(self, spec: CanarySpec, revision: str) -> str:
        """Why `revision` may skip the analysis ("" if it may not): it is the template
        promoted before the current one, and that promotion is within the window."""
        state = self.state
        window = spec.fast_rollback_window_s
        if state is None or window <= 0 or not state.previous_revision:
            return ""
        if revision != state.previous_revision or not state.promoted_at:
            return ""
        age = self.op.clock() - state.promoted_at
        if not 0 <= age <= window:
            return ""
        at = datetime.fromtimestamp(state.promoted_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"fast rollback: template equals revision {revision}, which app-primary ran "
            f"before {state.primary_revision} was promoted at {at}; within window "
            f"{_seconds(window)} ({_seconds(age)} after); analysis skipped"
        )

    async def _fast_rollback(self, revision: str, reason: str) -> None:
        """Straight to app-primary: a template that was production minutes ago needs no new
        evidence, and analysing it would keep the suspect version serving meanwhile."""
        assert self.state is not None
        namespace, name = self.key
        settings = self.op.settings
        started = self.op.clock()
        rollout_id = f"{self.name}@{revision}-fast-rollback-{int(started)}"
        await self.event("Normal", "FastRollback", reason)
        await self.workload(self.state.replicas, self.state.replicas).promote(revision)
        record = ConfigMapRecord(
            self.op.kube,
            namespace=settings.record_namespace,
            rollout=rollout_id,
            max_bytes=settings.record_max_bytes,
            flush_s=settings.record_flush_s,
            may_write=self.op.acting,
        )
        now = self.op.clock()
        entries = (
            StartEntry(
                at=started,
                rollout=rollout_id,
                target=self.name,
                primary_version=self.state.primary_revision,
                canary_version=revision,
                steps=[],
                config={"namespace": namespace, "deployment": name, "reason": reason},
            ),
            NoteEntry(at=now, rollout=rollout_id, message=reason),
            EndEntry(
                at=now,
                rollout=rollout_id,
                outcome="promoted",
                reason=reason,
                duration_s=max(0.0, now - started),
            ),
        )
        record_error = ""
        for entry in entries:
            await record.append(entry)
        try:
            await record.flush(force=True)
        except Exception as exc:  # as for any record: never fails the rollout, only shown
            record_error = f"could not write {record.label}: {exc}"
            log.warning("%s: %s", self.name, record_error)
        status = RolloutStatus(
            stage="Succeeded",
            revision=revision,
            weight=0,
            started_at=started,
            promoted=True,
            outcome="promoted",
            reason=reason,
        )
        # The runner of the reverted rollout is done: forget it, or its "promoted" would be
        # read back as the primary's revision.
        self.runner, self._runner_task = None, None
        self.record_error = record_error
        self.state = self.state.model_copy(
            update={
                "primary_revision": revision,
                "previous_revision": "",  # no fast path back to the version just reverted
                "promoted_at": now,
                "rollout": status,
                "rollout_id": rollout_id,
                "record": record.ref,
            }
        )
        await self.persist()
        await self.event("Normal", "Promoted", f"{name}-primary runs {revision} again: {reason}")

    async def _sync_hpa(self) -> None:
        """app-primary's HPA follows the app's (once the HPA watch has listed them all)."""
        if not self.op.hpas_listed.is_set():
            return
        assert self.state is not None
        namespace, name = self.key
        mirror = self.op.hpas.get((namespace, f"{name}-primary"))
        if mirror is not None and hpa_target(mirror) is not None:
            mirror = None  # not ours: sync_hpa refuses to touch it when it comes to it
        workload = self.workload(self.state.replicas, self.state.replicas)
        try:
            done = await workload.sync_hpa(mirror)
        except (KubeError, RuntimeError) as exc:
            # Rollouts go on without the mirror; the next change of the app or an HPA retries
            # (logged once per distinct error: every reconcile meets it again).
            if str(exc) != self._hpa_error:
                log.warning("%s: HPA mirror not synced: %s", self.name, exc)
            self._hpa_error = str(exc)
            await self.event("Warning", "HPAMirrorFailed", str(exc))
            return
        self._hpa_error = ""
        if done:
            await self.event("Normal", "HPAMirrored", done)

    async def _bad_spec(self, exc: SpecError) -> None:
        text = dump_problems(exc)
        if _annotations(self.obj).get(ANNOTATION_SPEC_ERROR) != text:
            await self._patch_annotations({ANNOTATION_SPEC_ERROR: text})
        self.spec_error = text
        await self.event("Warning", "InvalidSpec", f"traffic left as it is: {exc}")

    async def _initialize(self, spec: CanarySpec) -> None:
        """First sight: app-primary, the Services, the router at 0%, the canary at zero."""
        replicas = int((self.obj.get("spec") or {}).get("replicas", 1) or 1)
        workload = self.workload(replicas, replicas)
        await workload.ensure_services(spec)
        await workload.copy_to_primary(replicas=replicas)
        router = self._router(spec)
        try:
            await router.set_weight(0)
        except RouterError as exc:
            await self.event("Warning", "RouterFailed", f"cannot set the router to 0%: {exc}")
            raise KubeError(str(exc)) from exc
        await workload.scale(0)
        self.state = KubeState(primary_revision=template_hash(self.obj), replicas=replicas)
        await self.persist()
        await self._sync_hpa()
        await self.event(
            "Normal",
            "Initialized",
            f"{self.key[1]}-primary serves all traffic; new pod templates on {self.key[1]} "
            "roll out as canaries",
        )

    async def _handle_command(self, raw: str | None) -> None:
        if not raw:
            return
        try:
            request = parse_command(raw)
        except ValueError as exc:
            text = f"{ANNOTATION_COMMAND}: not a command: {exc}"
            answer = CommandAnswer(id="?", command="?", accepted=False, message=text)
            if self.state is not None and self.state.command != answer:
                self.state = self.state.model_copy(update={"command": answer})
                await self.event("Warning", "InvalidCommand", text)
                await self.persist()
            return
        if self.state is not None and self.state.command and self.state.command.id == request.id:
            return  # answered already
        running = self._runner_task is not None and not self._runner_task.done()
        if running and self.runner is not None:
            result = await self.runner.command(
                Command(request.command, request.who, request.reason)
            )
        else:
            result = CommandResult(False, "Idle", "no rollout is in progress")
        answer = CommandAnswer(
            id=request.id,
            command=request.command,
            accepted=result.accepted,
            message=result.message,
        )
        assert self.state is not None
        self.state = self.state.model_copy(update={"command": answer})
        await self.persist()

    async def _start_rollout(
        self, spec: CanarySpec, *, revision: str, resume: RolloutStatus | None
    ) -> None:
        assert self.state is not None
        namespace, name = self.key
        workload = self.workload(await self._canary_size(spec), self.state.replicas)
        await workload.ensure_services(spec)
        settings = self.op.settings
        router = self._router(spec)
        if self._metrics is not None:
            self._metrics.close()
        # Every rollout reads through the operator's one batcher: one query per metric family
        # per tick for all of them, whatever their number and age (canary.metrics.batched).
        self._metrics = self.op.metrics.provider(
            spec.metrics.prom_queries(
                namespace=namespace,
                primary_service=f"{name}-primary",
                canary_service=f"{name}-canary",
            )
        )
        analysis_config = spec.analysis_config()
        gates = _gate_caller(spec, settings.allow_webhook_hosts)
        generated = load_from_gates(gates.gates) if gates is not None else None
        saved: SavedRollout | None = None
        if resume is not None:
            saved = SavedRollout(
                rollout_id=self.state.rollout_id or f"{self.name}@{resume.revision}",
                record=self.state.record,
                started_at=resume.started_at or self.op.clock(),
                status=resume,
                record_error=self.record_error,
            )

        def open_record(rollout_id: str, *, ref: str | None = None) -> ConfigMapRecord:
            return ConfigMapRecord(
                self.op.kube,
                namespace=settings.record_namespace,
                rollout=rollout_id,
                max_bytes=settings.record_max_bytes,
                flush_s=settings.record_flush_s,
                may_write=self.acting,
                ref=ref,
            )

        runner = RolloutRunner(
            name=self.name,
            spec=spec.rollout_spec(),
            router=router,
            metrics=self._metrics,
            tick_s=settings.tick_s,
            analyzer_factory=lambda: Analyzer(analysis_config),
            analysis=analysis_config,
            # with what a load-test rollout hook sends (webhook.rollout.metadata rps/at)
            **runner_traffic(spec.expected_rps, generated),
            revision=revision,
            primary_version=self.state.primary_revision,
            canary_version=revision,
            config={
                "analysis": analysis_config.model_dump(mode="json"),
                "tick_s": settings.tick_s,
                "router": spec.router.model_dump(mode="json") if spec.router else {},
                "metrics": spec.metrics.model_dump(mode="json"),
                "namespace": namespace,
                "deployment": name,
                "reason": "",
            },
            workload=workload,
            store=AnnotationStore(self, saved),
            records=open_record,
            announcer=self,
            guard=self.check_acting,
            identity=settings.identity,
            labels={"namespace": namespace, "deployment": name},
            gates=gates,
            telemetry=self.op.telemetry,
            clock=self.op.clock,
        )
        runner.entry_observers.append(self._tell_entry)  # reconcile keeps the notifier
        self.runner = runner
        self._runner_task = asyncio.create_task(runner.run(), name=f"rollout:{self.name}")
        self._runner_task.add_done_callback(self._rollout_done)

    def _rollout_done(self, task: asyncio.Task[RolloutStatus]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, NotLeader):
            self._changed.set()  # reconcile: maybe start the next rollout
            return
        log.error(
            "%s: the rollout task crashed; resuming in %gs",
            self.name,
            self.op.settings.tick_s,
            exc_info=exc,
        )
        # Resumed from the saved status after a pause, so a crash cannot become a busy loop.
        asyncio.get_running_loop().call_later(self.op.settings.tick_s, self._changed.set)

    def _router(self, spec: CanarySpec) -> TrafficRouter:
        namespace, name = self.key
        assert spec.router is not None  # parse_annotations requires it when enabled
        if spec.router.kind == "ingress-nginx":
            return IngressNginxRouter(
                self.op.kube,
                namespace=namespace,
                ingress=spec.router.target,
                primary_service=f"{name}-primary",
                canary_service=f"{name}-canary",
                match=spec.match,
                affinity=spec.affinity,
                cache=self.op.ingresses,
            )
        return GatewayApiRouter(
            self.op.kube,
            namespace=namespace,
            route=spec.router.target,
            primary_service=f"{name}-primary",
            canary_service=f"{name}-canary",
            port=spec.router.port,
            match=spec.match,
            cache=self.op.httproutes,
        )

    async def _canary_size(self, spec: CanarySpec) -> int:
        """canary.dev/canary-replicas (of app-primary's replicas now), else the HPA's
        minReplicas (the HPA then scales the canary as it would the app), else the app's
        replica count."""
        assert self.state is not None
        namespace, name = self.key
        if spec.canary_replicas is not None:
            if spec.canary_replicas.count is not None:
                return spec.canary_replicas.count
            primary = await self.op.kube.get_deployment(namespace, f"{name}-primary")
            return spec.canary_replicas.of(int((primary.get("spec") or {}).get("replicas", 1)))
        hpa = self.app_hpa()
        if hpa is not None:
            return int((hpa.get("spec") or {}).get("minReplicas") or 1)
        return self.state.replicas

    def app_hpa(self) -> JSON | None:
        """The app's HPA as the watch last saw it (the first by name, if there are several:
        the HPA controller itself refuses to act on an ambiguous target)."""
        namespace, name = self.key
        found = [
            obj
            for (ns, _), obj in sorted(self.op.hpas.items())
            if ns == namespace and hpa_target(obj) == name
        ]
        return found[0] if found else None

    def hpa_changed(self) -> None:
        """The app's HPA, or our mirror of it, changed: reconcile (not an echo)."""
        self._changed.set()

    def workload(self, replicas: int, app_replicas: int) -> AppDeployments:
        """What is deployed for this Deployment (the runner's Workload)."""

        settings = self.op.settings
        return AppDeployments(
            self.op.kube,
            self.key,
            app=lambda: self.obj,
            written=self._wrote,
            check_acting=self.check_acting,
            event=self.event,
            replicas=replicas,
            app_replicas=app_replicas,
            hpa=self.app_hpa,
            promote_timeout_s=settings.promote_timeout_s,
            promote_poll_s=settings.promote_poll_s,
            services=self.op.services,
        )

    # ---- views ----------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        if self.runner is not None:
            data = self.runner.state()
        else:
            state = self.state or KubeState()
            status = state.rollout or RolloutStatus()
            data = {
                "name": self.name,
                "rollout": state.rollout_id,
                "phase": "Idle" if state.rollout is None else status.phase.value,
                "step": status.step,
                "steps": [],
                "weight": status.weight,
                "weight_verified": status.weight_verified,
                "last_decision": status.last_decision,
                "reason": status.reason,
                "message": status.message,
            }
        data["namespace"], data["deployment"] = self.key
        if self.op.shards is not None:
            data["shard"] = self.op.shards.shard_of(*self.key)
            data["held_by"] = self.op.settings.identity
        if self.spec_error:
            data["spec_error"] = json.loads(self.spec_error)
        record_error = self.runner.record_error if self.runner is not None else self.record_error
        if record_error:
            data["record_error"] = record_error
        return data


def _same_but_our_status(old: JSON, new: JSON) -> bool:
    """Whether two versions of a Deployment differ only in our status annotation (and in
    what every write changes: resourceVersion, managedFields)."""

    def rest(obj: JSON) -> JSON:
        metadata = {
            k: v for k, v in obj.get("metadata", {}).items() if k not in _EVERY_WRITE_CHANGES
        }
        annotations = dict(metadata.get("annotations") or {})
        annotations.pop(ANNOTATION_STATUS, None)
        return {**obj, "metadata": {**metadata, "annotations": annotations}}

    return bool(rest(old) == rest(new))


_EVERY_WRITE_CHANGES = frozenset({"resourceVersion", "managedFields"})


def _slim(obj: JSON) -> JSON:
    """The Deployment as kept between events: without metadata.managedFields, which nothing
    here reads and which is often most of a Deployment's bytes (kept for a thousand apps,
    they were tens of MiB; issue 13)."""
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and "managedFields" in metadata:
        obj = {**obj, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}
    return obj


# ---- the operator -----------------------------------------------------------------------


class Operator:
    """Watches annotated Deployments and reconciles each in its own task, while leader.

    Implements server.RolloutSource (`started`, `telemetry`, `states`, `command`), so the
    HTTP server serves /healthz, /readyz, /metrics and /rollouts for it.
    """

    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        *,
        elector: LeaderElector | None = None,
        shards: ShardElector | None = None,
        lease_kube: Callable[[], Awaitable[Kube]] | None = None,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if elector is not None and shards is not None:
            raise ValueError("leader election and shards exclude each other: use one")
        if not settings.identity:
            settings = replace(settings, identity=_default_identity())
        self.kube = kube
        self.settings = settings
        self.elector = elector
        self.shards = shards
        # Given, the elector runs on a thread of its own with the client this makes there
        # (canary.kubernetes.lease_thread): a saturated loop cannot delay its renewals.
        self.lease_kube = lease_kube
        # shard -> the term this instance acts in; a shard lost (or lost and taken again)
        # stops its rollouts before any starts again.
        self._terms: dict[int, int] = {}
        if shards is not None and shards.on_release is None:
            shards.on_release = self._release_shard
        self.telemetry = telemetry or Telemetry(mode="kubernetes")
        self.events = EventRecorder(kube, component="canary")
        self.clock = clock or MonotonicWallClock()  # timers never jump with the wall clock
        self.started = asyncio.Event()
        # Every opted-in Deployment, packed as its JSON text (informer.pack): ~1.5-3 KiB
        # instead of ~8-11 as dicts (issue 13: at 2,000 rollouts over 2 shards, each replica
        # holds the other's thousand Deployments too); its worker shares the same bytes.
        self.objects: dict[tuple[str, str], bytes] = {}
        self.workers: dict[tuple[str, str], DeploymentWorker] = {}
        # Every HPA in the watched namespaces, by (namespace, name): the apps' and our
        # mirrors; `hpas_listed` once the first list is in (before it, no mirror is touched).
        self.hpas: dict[tuple[str, str], JSON] = {}
        self.hpas_listed = asyncio.Event()
        # The routers' read-back: every tick reads its weight from these watch caches, not
        # with a GET (issue 13); same namespaces as the Deployment watch.
        self.ingresses = ObjectCache(kube, "ingresses", settings.namespace)
        self.httproutes = ObjectCache(kube, "httproutes", settings.namespace)
        # app-primary and app-canary, which ensure_services looks at on every start and resume
        self.services = ObjectCache(
            kube, "services", settings.namespace, label_selector=MANAGED_BY_SELECTOR
        )
        self._leading = elector is None
        self.telemetry.leader.set_function(lambda: 1.0 if self.acting() else 0.0)
        # One reader and one HTTP session for every rollout's counts: about one batch per
        # tick; a tick goes on with counts up to two ticks old rather than wait for a batch.
        self.metrics = PrometheusBatcher(
            settings.prometheus_url,
            timeout_s=settings.metrics_timeout_s,
            period_s=settings.tick_s,
            timings=self.telemetry,
        )

    # ---- leadership -----------------------------------------------------------------

    def acting(self, key: tuple[str, str] | None = None) -> bool:
        """May this instance write to the cluster now (about the rollout `key`, with shards;
        without a key: about some rollout)?"""
        if self.shards is not None:
            if key is None:
                # /metrics calls this from its scrape thread: copy the shards (one C call)
                # rather than iterate a dict the loop may change meanwhile.
                return any(self.shards.holds(i) for i in tuple(self._terms))
            shard = self.shards.shard_of(*key)
            return shard in self._terms and self.shards.holds(shard)
        if self.elector is None:
            return True
        return self._leading and self.elector.is_leader

    def check_acting(self, key: tuple[str, str] | None = None) -> None:
        if not self.acting(key):
            if self.shards is not None and key is not None:
                shard = self.shards.shard_of(*key)
                raise NotLeader(f"{self.settings.identity} does not hold {self.shards.name(shard)}")
            raise NotLeader(f"{self.settings.identity} does not hold the lease")

    # ---- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Watch and reconcile until `stop` is set or the task is cancelled."""
        stop = stop or asyncio.Event()
        election: asyncio.Task[None] | None = None
        elector_stop = asyncio.Event()
        watch = asyncio.create_task(self._watch(), name="watch deployments")
        watch_hpas = asyncio.create_task(self._watch_hpas(), name="watch hpas")
        caches = [
            asyncio.create_task(self.ingresses.run(), name="watch ingresses"),
            asyncio.create_task(self.httproutes.run(), name="watch httproutes"),
            asyncio.create_task(self.services.run(), name="watch services"),
        ]
        electing = self.elector or self.shards
        if electing is not None:
            elect = (
                LeaseThread(electing, self.lease_kube).run
                if self.lease_kube is not None
                else electing.run
            )
            name = "leader election" if self.elector is not None else "shard leases"
            election = asyncio.create_task(elect(elector_stop), name=name)
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            while True:
                done, _ = await asyncio.wait(
                    {watch, stopping, *([election] if election else [])},
                    timeout=0.1,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if stopping in done:
                    break
                if watch in done or (election is not None and election in done):
                    failed = watch if watch in done else election
                    assert failed is not None
                    failed.result()  # raises what ended it
                    raise RuntimeError(f"{failed.get_name()} ended")
                await self._follow_leadership()
                await self._follow_shards()
        finally:
            stopping.cancel()
            watch.cancel()
            watch_hpas.cancel()
            for cache in caches:
                cache.cancel()
            for task in (watch, watch_hpas, *caches):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._stop_workers()
            self._leading = self.elector is None
            self._terms.clear()
            if election is not None:
                elector_stop.set()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(election, 5)
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
            await self.metrics.aclose()

    async def _follow_leadership(self) -> None:
        if self.elector is None:
            return
        leading = self.elector.is_leader
        if leading and not self._leading:
            log.info(
                "%s: leading: reconciling %d deployments", self.settings.identity, len(self.objects)
            )
            self._leading = True
            for key in list(self.objects):
                self._dispatch(self._unpark(key))
        elif not leading and self._leading:
            log.warning("%s: lost the lease: stopping every rollout", self.settings.identity)
            self._leading = False
            # A standby exports no rollout's series: the new leader does, and two replicas'
            # would disagree (the standby's frozen at the handover).
            await self._stop_workers(forget=True)

    async def _follow_shards(self) -> None:
        """Stop the rollouts of shards lost (or lost and taken again), start those taken."""
        if self.shards is None:
            return
        held = self.shards.held()
        for shard in [s for s, term in self._terms.items() if held.get(s) != term]:
            log.warning(
                "%s: lost %s: stopping its rollouts",
                self.settings.identity,
                self.shards.name(shard),
            )
            await self._release_shard(shard)
        for shard, term in held.items():
            if shard in self._terms:
                continue
            self._terms[shard] = term
            self.telemetry.shard_held.labels(str(shard)).set(1.0)
            keys = [k for k in self.objects if self.shards.shard_of(*k) == shard]
            log.info(
                "%s: holds %s: reconciling %d deployments",
                self.settings.identity,
                self.shards.name(shard),
                len(keys),
            )
            for key in keys:  # decoded one at a time: a shard of a thousand is ~8 MiB of dicts
                self._dispatch(self._unpark(key))

    async def _release_shard(self, shard: int) -> None:
        """Stop acting on a shard's rollouts (awaited: nothing of theirs is in flight after)."""
        assert self.shards is not None
        self._terms.pop(shard, None)
        self.telemetry.shard_held.labels(str(shard)).set(0.0)
        keys = [k for k in self.workers if self.shards.shard_of(*k) == shard]
        for key in keys:
            worker = self.workers.pop(key, None)
            if worker is not None:
                await worker.stop()
                # The replica that takes the shard exports them now; two would disagree.
                self.telemetry.forget(worker.name)

    async def _stop_workers(self, *, forget: bool = False) -> None:
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            await worker.stop()
            if forget:
                self.telemetry.forget(worker.name)

    async def _watch(self) -> None:
        """Follow the Deployments; an API server that stays away is waited for, not fatal."""
        while True:
            try:
                await self._follow()
            except KubeError as exc:
                log.warning("watch deployments failed, retrying: %s", exc)
                await asyncio.sleep(self.settings.tick_s)

    async def _watch_hpas(self) -> None:
        """Follow the HPAs, as the Deployments; a failing watch only delays the mirrors."""
        while True:
            try:
                await self._follow_hpas()
            except KubeError as exc:
                log.warning("watch horizontalpodautoscalers failed, retrying: %s", exc)
                await asyncio.sleep(self.settings.tick_s)

    async def _follow_hpas(self) -> None:
        async for item in self.kube.watch_hpas(self.settings.namespace):
            if isinstance(item, Relist):
                before = self.hpas
                self.hpas = {_key(obj): obj for obj in item.objects}
                self.hpas_listed.set()
                touched = {self._hpa_app(k, o) for k, o in (*before.items(), *self.hpas.items())}
                self._hpa_changed(touched if before else set(self.workers))
                del item, before, touched  # not held while the watch waits (_follow)
                continue
            assert isinstance(item, WatchEvent)
            key = _key(item.object)
            old = self.hpas.pop(key, None)
            if item.type != "DELETED":
                self.hpas[key] = item.object
            touched = {self._hpa_app(key, item.object)}
            if old is not None:
                touched.add(self._hpa_app(key, old))
            self._hpa_changed(touched)

    @staticmethod
    def _hpa_app(key: tuple[str, str], hpa: JSON) -> tuple[str, str]:
        """The Deployment an HPA concerns: its target, or for our mirror, the app."""
        labels = (hpa.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") == MANAGED_BY["app.kubernetes.io/managed-by"]:
            return key[0], key[1].removesuffix("-primary")
        return key[0], hpa_target(hpa) or ""

    def _hpa_changed(self, apps: set[tuple[str, str]]) -> None:
        for app in apps:
            worker = self.workers.get(app)
            if worker is not None:
                worker.hpa_changed()

    async def _follow(self) -> None:
        async for item in self.kube.watch_deployments(self.settings.namespace):
            if isinstance(item, Relist):
                seen = {_key(obj): _slim(obj) for obj in item.objects if _enabled_key_present(obj)}
                for key in [k for k in self.objects if k not in seen]:
                    await self._forget(key)
                for key, obj in seen.items():
                    self._keep(key, obj)
                self.started.set()
                # The list, whole, must not stay alive while a quiet watch waits for its next
                # event: ~12 KiB a Deployment decoded, every Deployment in the namespace.
                del item, seen
                continue
            assert isinstance(item, WatchEvent)
            key = _key(item.object)
            if item.type == "DELETED" or not _enabled_key_present(item.object):
                if key in self.objects:
                    await self._forget(key)
                continue
            self._keep(key, _slim(item.object))

    async def _forget(self, key: tuple[str, str]) -> None:
        """The Deployment is gone, or no longer opted in: stop its rollout, drop its series
        (after the stop: no tick of it is left to set them again)."""
        self.objects.pop(key, None)
        worker = self.workers.pop(key, None)
        if worker is not None:
            await worker.stop()
        self.telemetry.forget(f"{key[0]}/{key[1]}")

    def _keep(self, key: tuple[str, str], obj: JSON) -> None:
        """Keep a Deployment as it is now, and reconcile it if this replica acts on it."""
        held = self.objects[key] = pack(obj)
        if self.acting(key):
            self._dispatch(obj, held)

    def _unpark(self, key: tuple[str, str]) -> JSON:
        """A kept Deployment as a dict (about to be acted on: a shard or the lease taken)."""
        decoded: JSON = json.loads(self.objects[key])
        return decoded

    def _dispatch(self, obj: JSON, held: bytes | None = None) -> None:
        key = _key(obj)
        if not self.acting(key):
            return
        held = self.objects.get(key) if held is None else held
        worker = self.workers.get(key)
        if worker is None:
            worker = DeploymentWorker(self, key)
            self.workers[key] = worker
            worker.update(obj, held)
            worker.start()
        else:
            worker.update(obj, held)

    # ---- server.RolloutSource -------------------------------------------------------

    def ready(self) -> bool:
        """/readyz: only a replica that runs rollouts is Ready, so the Service sends
        /rollouts and commands to the leader alone (a standby has no workers to answer);
        with shards, to the replicas that hold at least one."""
        return self.started.is_set() and self.acting()

    def states(self) -> list[dict[str, Any]]:
        return [worker.view() for worker in self.workers.values()]

    def record_refs(self) -> list[str]:
        """ "namespace/configmap" of each watched Deployment's current or last rollout record
        (the cluster's /reports/, canary.reports.cluster)."""
        refs = []
        for worker in self.workers.values():
            runner, state = worker.runner, worker.state
            ref = runner.record_ref if runner is not None else (state.record if state else "")
            if ref:
                refs.append(ref)
        return refs

    async def command(self, name: str, command: Command) -> CommandResult:
        """A command from the HTTP server: `name` is namespace/deployment."""
        namespace, _, deployment = name.rpartition("/")
        worker = self.workers.get((namespace or "default", deployment))
        if worker is None:
            raise UnknownRollout(name)
        runner, task = worker.runner, worker._runner_task
        if runner is None or task is None or task.done():
            return CommandResult(False, worker.view()["phase"], "no rollout is in progress")
        return await runner.command(command)
