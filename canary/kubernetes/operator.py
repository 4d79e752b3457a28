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
lapses by itself at the renew deadline), so two replicas never act at once.

Manual commands come from the CLI as the `canary.dev/command` annotation (JSON with an id);
the answer is stored in the status. GitOps tools never see the spec change.

Records: one ConfigMap per rollout in the controller's namespace (F's record_store: gzip +
base64, thinned to fit). A failed write never fails the rollout: it is logged, counted
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from analysis import Analyzer
from canary.core.inputs import MAX_ANNOTATION_BYTES, InputError, check_tick, clip, load_json
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
from canary.kubernetes.record_store import MAX_CONFIGMAP_BYTES, ConfigMapRecord
from canary.kubernetes.spec import (
    ANNOTATION_COMMAND,
    ANNOTATION_SPEC_ERROR,
    ANNOTATION_STATUS,
    PREFIX,
    CanarySpec,
    SpecError,
    dump_problems,
    parse_annotations,
)
from canary.kubernetes.workload import (
    AppDeployments,
    primary_template,
    template_hash,
)
from canary.metrics.batched import BatchedMetrics, PrometheusBatcher
from canary.notify.webhooks import Notifier, WebhookConfig
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
    "rollback": frozenset({"rolled_back"}),
}


class NotLeader(NotActing):
    """This instance may not act (it lost, or never held, the Lease)."""


# ---- persisted state -------------------------------------------------------------------


class CommandAnswer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    command: str
    accepted: bool
    message: str = ""


class KubeState(BaseModel):
    """Everything the controller keeps on a Deployment (the status annotation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    primary_revision: str = ""  # template hash now on app-primary
    replicas: int = 1  # the canary's size while it runs
    rollout: RolloutStatus | None = None  # the current, or the last, rollout
    rollout_id: str = ""
    record: str = ""  # "namespace/configmap" of the rollout's record
    record_error: str = ""  # the last failure to write it, "" once a write succeeds
    command: CommandAnswer | None = None  # the last manual command answered

    def to_json(self) -> str:
        return self.model_dump_json(exclude_defaults=True)

    @classmethod
    def from_annotation(cls, text: str | None) -> KubeState | None:
        if not text:
            return None
        return cls.model_validate_json(text)


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


def _default_identity() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


@dataclass(frozen=True)
class OperatorSettings:
    """How the reconciler runs; the CLI's `canary kubernetes` flags."""

    prometheus_url: str
    record_namespace: str
    namespace: str | None = None  # None: every namespace
    tick_s: float = 10.0
    record_flush_s: float = 30.0  # the record ConfigMap is rewritten at most this often...
    # ...except on transitions and the end, which are written at once.
    promote_timeout_s: float = 300.0  # how long one promotion attempt waits for app-primary
    promote_poll_s: float = 1.0
    identity: str = ""
    metrics_timeout_s: float = 5.0
    record_max_bytes: int = MAX_CONFIGMAP_BYTES  # the whole ConfigMap stays under 1 MiB
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
        self.obj: JSON = {}
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
        self.notifier: Notifier | None = None
        self._webhooks: tuple[WebhookConfig, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.key[0]}/{self.key[1]}"

    def update(self, obj: JSON) -> None:
        previous, self.obj = self.obj, obj
        version = obj["metadata"].get("resourceVersion", self._rv)
        self._rv = version
        if version and version in self._own_versions:
            return  # the echo of our own write: nothing in it we did not decide
        if previous and _same_but_our_status(previous, obj):
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
        manual actions) and `rollback` webhooks (the only kinds canary.kubernetes.spec accepts)."""
        hooks = tuple(
            WebhookConfig(url=hook.url, events=_WEBHOOK_EVENTS[hook.type], format=hook.format)
            for hook in spec.webhooks
            if hook.type in _WEBHOOK_EVENTS
        )
        if hooks != self._webhooks:
            if self.notifier is not None:
                await self.notifier.aclose(grace_s=2.0)
            allow = self.op.settings.allow_webhook_hosts
            self.notifier = Notifier(hooks, allow_hosts=allow) if hooks else None
            self._webhooks = hooks
        return self.notifier

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

    async def announce(
        self, type: Literal["Normal", "Warning"], reason: str, message: str
    ) -> None:
        """The runner's Announcer: its transitions become Events on this Deployment."""
        await self.event(type, reason, message)

    async def event(self, type: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        if not self.op.acting() or not self.obj:
            return
        await self.op.events.record(
            ObjectRef.deployment(self.obj), type=type, reason=reason, message=message
        )

    async def _patch_annotations(self, annotations: Mapping[str, str | None]) -> None:
        """A merge patch of annotations only, guarded by resourceVersion; on Conflict the
        object is read again and the patch retried."""
        namespace, name = self.key
        for attempt in range(_STATUS_ATTEMPTS):
            self.op.check_acting()
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
            if status.done and status.outcome == "promoted":
                update["primary_revision"] = status.revision
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
        self.op.check_acting()
        annotations = _annotations(obj)
        try:
            spec = parse_annotations(annotations)
        except SpecError as exc:
            await self._bad_spec(exc)
            return
        if not spec.enabled:
            return
        if self.spec_error or ANNOTATION_SPEC_ERROR in annotations:
            await self._patch_annotations({ANNOTATION_SPEC_ERROR: None})
            if self.spec_error:
                await self.event(
                    "Normal", "SpecValid", "the canary.dev annotations are valid again"
                )
            self.spec_error = ""

        if self.state is None:
            try:
                self.state = KubeState.from_annotation(annotations.get(ANNOTATION_STATUS))
            except ValidationError as exc:
                log.warning("%s: unreadable status annotation, starting over: %s", self.name, exc)
                self.state = None
            if self.state is not None:
                self._written = self.state.to_json()
        if self.state is None:
            await self._initialize(spec)
            return

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
        if last is not None and last.active:
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
        await self._start_rollout(spec, revision=revision, resume=None)

    async def _bad_spec(self, exc: SpecError) -> None:
        text = dump_problems(exc)
        if _annotations(self.obj).get(ANNOTATION_SPEC_ERROR) != text:
            await self._patch_annotations({ANNOTATION_SPEC_ERROR: text})
        self.spec_error = text
        await self.event("Warning", "InvalidSpec", f"traffic left as it is: {exc}")

    async def _initialize(self, spec: CanarySpec) -> None:
        """First sight: app-primary, the Services, the router at 0%, the canary at zero."""
        replicas = int((self.obj.get("spec") or {}).get("replicas", 1) or 1)
        workload = self.workload(replicas)
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
        workload = self.workload(self.state.replicas)
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
                may_write=self.op.acting,
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
            expected_rps=spec.expected_rps,
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
            guard=self.op.check_acting,
            identity=settings.identity,
            labels={"namespace": namespace, "deployment": name},
            telemetry=self.op.telemetry,
            clock=self.op.clock,
        )
        notifier = await self._notifier(spec)
        if notifier is not None:
            runner.entry_observers.append(notifier.on_entry)
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
            )
        return GatewayApiRouter(
            self.op.kube,
            namespace=namespace,
            route=spec.router.target,
            primary_service=f"{name}-primary",
            canary_service=f"{name}-canary",
            port=spec.router.port,
            match=spec.match,
        )

    def workload(self, replicas: int) -> AppDeployments:
        """What is deployed for this Deployment (the runner's Workload)."""

        settings = self.op.settings
        return AppDeployments(
            self.op.kube,
            self.key,
            app=lambda: self.obj,
            written=self._wrote,
            check_acting=self.op.check_acting,
            event=self.event,
            replicas=replicas,
            promote_timeout_s=settings.promote_timeout_s,
            promote_poll_s=settings.promote_poll_s,
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
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not settings.identity:
            settings = replace(settings, identity=_default_identity())
        self.kube = kube
        self.settings = settings
        self.elector = elector
        self.telemetry = telemetry or Telemetry(mode="kubernetes")
        self.events = EventRecorder(kube, component="canary")
        self.clock = clock or MonotonicWallClock()  # timers never jump with the wall clock
        self.started = asyncio.Event()
        self.objects: dict[tuple[str, str], JSON] = {}
        self.workers: dict[tuple[str, str], DeploymentWorker] = {}
        self._leading = elector is None
        self.telemetry.leader.set_function(lambda: 1.0 if self.acting() else 0.0)
        # One reader and one HTTP session for every rollout's counts: about one batch per
        # tick; a tick goes on with counts up to two ticks old rather than wait for a batch.
        self.metrics = PrometheusBatcher(
            settings.prometheus_url, timeout_s=settings.metrics_timeout_s, period_s=settings.tick_s
        )

    # ---- leadership -----------------------------------------------------------------

    def acting(self) -> bool:
        """May this instance write to the cluster now?"""
        if self.elector is None:
            return True
        return self._leading and self.elector.is_leader

    def check_acting(self) -> None:
        if not self.acting():
            raise NotLeader(f"{self.settings.identity} does not hold the lease")

    # ---- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Watch and reconcile until `stop` is set or the task is cancelled."""
        stop = stop or asyncio.Event()
        election: asyncio.Task[None] | None = None
        elector_stop = asyncio.Event()
        watch = asyncio.create_task(self._watch(), name="watch deployments")
        if self.elector is not None:
            election = asyncio.create_task(self.elector.run(elector_stop), name="leader election")
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
        finally:
            stopping.cancel()
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
            await self._stop_workers()
            self._leading = self.elector is None
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
            for obj in list(self.objects.values()):
                self._dispatch(obj)
        elif not leading and self._leading:
            log.warning("%s: lost the lease: stopping every rollout", self.settings.identity)
            self._leading = False
            await self._stop_workers()

    async def _stop_workers(self) -> None:
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            await worker.stop()

    async def _watch(self) -> None:
        """Follow the Deployments; an API server that stays away is waited for, not fatal."""
        while True:
            try:
                await self._follow()
            except KubeError as exc:
                log.warning("watch deployments failed, retrying: %s", exc)
                await asyncio.sleep(self.settings.tick_s)

    async def _follow(self) -> None:
        async for item in self.kube.watch_deployments(self.settings.namespace):
            if isinstance(item, Relist):
                seen = {_key(obj): obj for obj in item.objects if _enabled_key_present(obj)}
                for key in [k for k in self.objects if k not in seen]:
                    await self._forget(key)
                for obj in seen.values():
                    self.objects[_key(obj)] = obj
                    self._dispatch(obj)
                self.started.set()
                continue
            assert isinstance(item, WatchEvent)
            key = _key(item.object)
            if item.type == "DELETED" or not _enabled_key_present(item.object):
                if key in self.objects:
                    await self._forget(key)
                continue
            self.objects[key] = item.object
            self._dispatch(item.object)

    async def _forget(self, key: tuple[str, str]) -> None:
        self.objects.pop(key, None)
        worker = self.workers.pop(key, None)
        if worker is not None:
            await worker.stop()

    def _dispatch(self, obj: JSON) -> None:
        if not self.acting():
            return
        key = _key(obj)
        worker = self.workers.get(key)
        if worker is None:
            worker = DeploymentWorker(self, key)
            self.workers[key] = worker
            worker.update(obj)
            worker.start()
        else:
            worker.update(obj)

    # ---- server.RolloutSource -------------------------------------------------------

    def ready(self) -> bool:
        """/readyz: only the replica that runs the rollouts is Ready, so the Service sends
        /rollouts and commands to the leader alone (a standby has no workers to answer)."""
        return self.started.is_set() and self.acting()

    def states(self) -> list[dict[str, Any]]:
        return [worker.view() for worker in self.workers.values()]

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
