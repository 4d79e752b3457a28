"""The Workload of an annotated Deployment: `app`, `app-primary` and their two Services.

Flagger's ownership model: the user edits Deployment `app`; canary owns `app-primary` (a copy
of the last promoted pod template, its selector labels suffixed `-primary`), and the Services
`app-primary` and `app-canary`, all owned by `app` so they go with it. The canary is `app`
itself, scaled to its size during a rollout and to zero between rollouts; promotion copies
the template to `app-primary` and waits until that Deployment has rolled out.

An autoscaling/v2 HPA on `app` is mirrored to an `app-primary` HPA (`sync_hpa`: owned by
`app`, labelled ours, patched when the app's changes, deleted when it goes; one of that name
that is not ours is never touched). app-primary's replicas are then its HPA's: we only ever
raise them, at promotion, to what its HPA (or, without one, the app) asks, so a promotion
never shrinks production.

This is the runner's Workload seam (canary.runner.seams.Workload) for Kubernetes; the
operator also uses it to set a Deployment up on first sight. Every write first asks
`check_acting` (a replica that lost its Lease raises NotActing and writes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from canary.kubernetes.client import Conflict, Kube, NotFound, deployment_rollout
from canary.kubernetes.informer import ObjectCache
from canary.kubernetes.spec import CanarySpec

__all__ = [
    "MANAGED_BY",
    "AppDeployments",
    "hpa_target",
    "primary_hpa",
    "primary_template",
    "template_hash",
]

JSON = dict[str, Any]
MANAGED_BY = {"app.kubernetes.io/managed-by": "canary"}
MANAGED_BY_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())


def template_hash(deployment: Mapping[str, Any]) -> str:
    """A short, stable hash of a Deployment's pod template: a new one is a new version."""
    template = (deployment.get("spec") or {}).get("template") or {}
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _primary_labels(labels: Mapping[str, str], selector: Mapping[str, str]) -> dict[str, str]:
    """Selector labels get `-primary`, so app-canary's selector never matches primary pods."""
    return {k: (f"{v}-primary" if k in selector else v) for k, v in labels.items()}


def primary_template(app: Mapping[str, Any]) -> tuple[dict[str, str], JSON]:
    """(app-primary's selector, its pod template) copied from Deployment `app`."""
    spec = app.get("spec") or {}
    selector = dict((spec.get("selector") or {}).get("matchLabels") or {})
    if not selector:
        name = (app.get("metadata") or {}).get("name", "?")
        raise ValueError(f"Deployment {name} has no spec.selector.matchLabels to derive from")
    template = copy.deepcopy(spec.get("template") or {})
    meta = template.setdefault("metadata", {})
    meta["labels"] = _primary_labels(meta.get("labels") or {}, selector)
    return _primary_labels(selector, selector), template


def _container_port(obj: Mapping[str, Any], *, default: int) -> int | str:
    """Where the pods listen: the port named `http`, else the first container port."""
    containers = ((obj.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers")
    ports = [p for c in containers or [] for p in c.get("ports") or []]
    for port in ports:
        if port.get("name") == "http":
            return "http"
    if ports and ports[0].get("containerPort"):
        return int(ports[0]["containerPort"])
    return default


def hpa_target(hpa: Mapping[str, Any]) -> str | None:
    """The Deployment an autoscaling/v2 HPA scales, or None (another kind, or our mirror)."""
    labels = (hpa.get("metadata") or {}).get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") == MANAGED_BY["app.kubernetes.io/managed-by"]:
        return None  # app-primary's HPA, which we made: it mirrors, it is never mirrored
    ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
    if ref.get("kind") != "Deployment" or (ref.get("apiVersion") or "apps/v1") != "apps/v1":
        return None
    name = ref.get("name")
    return str(name) if name else None


def primary_hpa(app_hpa: Mapping[str, Any], primary: str) -> JSON:
    """The spec of app-primary's HPA: the app's, aimed at app-primary."""
    spec = copy.deepcopy(dict(app_hpa.get("spec") or {}))
    spec["scaleTargetRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": primary}
    return spec


def _hpa_floor(hpa: Mapping[str, Any] | None) -> int:
    """What an HPA asks at least: its minReplicas (1 by default) or, if higher, the count it
    last decided on."""
    if hpa is None:
        return 0
    spec, status = hpa.get("spec") or {}, hpa.get("status") or {}
    return max(int(spec.get("minReplicas") or 1), int(status.get("desiredReplicas") or 0))


class AppDeployments:
    """`app` and what canary owns beside it, for one annotated Deployment."""

    def __init__(
        self,
        kube: Kube,
        key: tuple[str, str],
        *,
        app: Callable[[], JSON],
        written: Callable[[JSON], None],
        check_acting: Callable[[], None],
        event: Callable[[Literal["Normal", "Warning"], str, str], Awaitable[None]],
        replicas: int = 1,
        app_replicas: int = 1,
        hpa: Callable[[], JSON | None] = lambda: None,
        promote_timeout_s: float = 300.0,
        promote_poll_s: float = 1.0,
        services: ObjectCache | None = None,
    ) -> None:
        self.kube = kube
        self.key = key
        self.app = app  # the Deployment `app` as last seen (the watch keeps it current)
        self.written = written  # told of every write to `app` (its new resourceVersion)
        self.check_acting = check_acting
        self.event = event
        self.replicas = replicas  # the canary's size while it runs
        self.app_replicas = app_replicas  # production's size without an HPA (first sight)
        self.hpa = hpa  # the app's HPA as last seen (the HPA watch keeps it current), or None
        self.promote_timeout_s = promote_timeout_s
        self.promote_poll_s = promote_poll_s
        # The Services canary manages, as the watch last saw them (None: GET each time).
        self.services = services

    async def scale_canary(self, up: bool) -> None:
        """The runner's Workload: the canary gets its replicas, or none."""
        await self.scale(self.replicas if up else 0)

    def owner(self) -> list[JSON]:
        meta = self.app().get("metadata") or {}
        return [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": meta.get("name"),
                "uid": meta.get("uid", ""),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]

    async def ensure_services(self, spec: CanarySpec) -> None:
        namespace, name = self.key
        port = spec.router.port if spec.router else 80
        app_selector = dict(
            ((self.app().get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        )
        primary_selector, _ = primary_template(self.app())
        target_port = _container_port(self.app(), default=port)
        for service, selector in (
            (f"{name}-primary", primary_selector),
            (f"{name}-canary", app_selector),
        ):
            body: JSON = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": service,
                    "namespace": namespace,
                    "labels": dict(MANAGED_BY),
                    "ownerReferences": self.owner(),
                },
                "spec": {
                    "selector": selector,
                    "ports": [{"name": "http", "port": port, "targetPort": target_port}],
                },
            }
            read = self.kube.get_service if self.services is None else self.services.get
            try:
                current = await read(namespace, service)
            except NotFound:
                self.check_acting()
                with contextlib.suppress(Conflict):
                    await self._write_service(service, self.kube.create_service(namespace, body))
                continue
            if (current.get("spec") or {}).get("selector") != selector:
                self.check_acting()
                patch = {"spec": {"selector": selector}}
                await self._write_service(
                    service, self.kube.patch_service(namespace, service, patch)
                )

    async def _write_service(self, name: str, write: Awaitable[JSON]) -> None:
        """Await a write to one of our Services, told to the cache: its reads GET until the
        watch has delivered what the write returned."""
        if self.services is not None:
            self.services.writing(self.key[0], name)
        written = await write
        if self.services is not None:
            self.services.wrote(self.key[0], name, written)

    async def copy_to_primary(self, *, replicas: int | None = None) -> JSON:
        """Create app-primary, or give it `app`'s pod template (idempotent)."""
        namespace, name = self.key
        selector, template = primary_template(self.app())
        primary = f"{name}-primary"
        self.check_acting()
        try:
            current = await self.kube.get_deployment(namespace, primary)
        except NotFound:
            body: JSON = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": primary,
                    "namespace": namespace,
                    "labels": dict(MANAGED_BY),
                    "ownerReferences": self.owner(),
                },
                "spec": {
                    "replicas": replicas if replicas is not None else 1,
                    "selector": {"matchLabels": selector},
                    "template": template,
                },
            }
            return await self.kube.create_deployment(namespace, body)
        if (current.get("spec") or {}).get("template") == template:
            return current
        patch: JSON = {"template": template}
        # Promotion never shrinks production: app-primary keeps what it runs (its HPA's
        # doing, or a manual scale) unless its HPA or the app asks for more.
        have = int((current.get("spec") or {}).get("replicas", 1))
        hpa = self.hpa()
        asked = _hpa_floor(await self._primary_hpa()) if hpa is not None else self.app_replicas
        if asked > have:
            patch["replicas"] = asked
        return await self.kube.patch_deployment(namespace, primary, {"spec": patch})

    async def _primary_hpa(self) -> JSON | None:
        namespace, name = self.key
        try:
            return await self.kube.get_hpa(namespace, f"{name}-primary")
        except NotFound:
            return None

    async def sync_hpa(self, mirror: JSON | None) -> str:
        """Make app-primary's HPA mirror the app's (or go with it). `mirror` is our HPA as
        the watch last saw it, if any. Returns what was done, for Events ("" if nothing)."""
        namespace, name = self.key
        primary = f"{name}-primary"
        app_hpa = self.hpa()
        if app_hpa is None:
            if mirror is None:
                return ""
            self.check_acting()
            uid = (mirror.get("metadata") or {}).get("uid")
            with contextlib.suppress(NotFound):
                await self.kube.delete_hpa(namespace, primary, uid=uid or None)
            return f"HorizontalPodAutoscaler {primary} deleted: {name} has none any more"
        source = (app_hpa.get("metadata") or {}).get("name", "?")
        spec = primary_hpa(app_hpa, primary)
        current = await self._primary_hpa()
        if current is None:
            self.check_acting()
            body: JSON = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {
                    "name": primary,
                    "namespace": namespace,
                    "labels": dict(MANAGED_BY),
                    "ownerReferences": self.owner(),
                },
                "spec": spec,
            }
            with contextlib.suppress(Conflict):
                await self.kube.create_hpa(namespace, body)
            return f"HorizontalPodAutoscaler {primary} created from {source}"
        labels = (current.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY["app.kubernetes.io/managed-by"]:
            raise RuntimeError(
                f"HorizontalPodAutoscaler {namespace}/{primary} exists and is not ours "
                "(no app.kubernetes.io/managed-by: canary): not overwriting it"
            )
        have = dict(current.get("spec") or {})
        if have == spec:
            return ""
        # A merge patch: keys the app's HPA no longer has are removed with null.
        patch = {**{key: None for key in have if key not in spec}, **spec}
        self.check_acting()
        await self.kube.patch_hpa(
            namespace,
            primary,
            {"spec": patch},
            resource_version=(current.get("metadata") or {}).get("resourceVersion"),
        )
        return f"HorizontalPodAutoscaler {primary} updated from {source}"

    async def promote(self, revision: str) -> None:
        """Copy the template to app-primary and wait until that rollout has completed."""
        namespace, name = self.key
        if template_hash(self.app()) != revision:
            raise RuntimeError(
                f"{namespace}/{name} no longer has the template {revision}: not promoting a stale one"
            )
        await self.copy_to_primary()
        deadline = time.monotonic() + self.promote_timeout_s
        while True:
            current = await self.kube.get_deployment(namespace, f"{name}-primary")
            state, message = deployment_rollout(current)
            if state == "done":
                await self.event("Normal", "PrimaryUpdated", message)
                return
            if state == "failed" or time.monotonic() >= deadline:
                raise RuntimeError(f"{name}-primary has not rolled out: {message}")
            await asyncio.sleep(self.promote_poll_s)

    async def scale(self, replicas: int) -> None:
        namespace, name = self.key
        current = (self.app().get("spec") or {}).get("replicas")
        if current == replicas:
            return
        self.check_acting()
        written = await self.kube.scale_deployment(namespace, name, replicas)
        self.written(written)
