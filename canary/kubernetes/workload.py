"""The Workload of an annotated Deployment: `app`, `app-primary` and their two Services.

Flagger's ownership model: the user edits Deployment `app`; canary owns `app-primary` (a copy
of the last promoted pod template, its selector labels suffixed `-primary`), and the Services
`app-primary` and `app-canary`, all owned by `app` so they go with it. The canary is `app`
itself, scaled to its size during a rollout and to zero between rollouts; promotion copies
the template to `app-primary` and waits until that Deployment has rolled out.

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
from canary.kubernetes.spec import CanarySpec

__all__ = ["MANAGED_BY", "AppDeployments", "primary_template", "template_hash"]

JSON = dict[str, Any]
MANAGED_BY = {"app.kubernetes.io/managed-by": "canary"}


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
        promote_timeout_s: float = 300.0,
        promote_poll_s: float = 1.0,
    ) -> None:
        self.kube = kube
        self.key = key
        self.app = app  # the Deployment `app` as last seen (the watch keeps it current)
        self.written = written  # told of every write to `app` (its new resourceVersion)
        self.check_acting = check_acting
        self.event = event
        self.replicas = replicas  # the canary's size while it runs
        self.promote_timeout_s = promote_timeout_s
        self.promote_poll_s = promote_poll_s

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
            try:
                current = await self.kube.get_service(namespace, service)
            except NotFound:
                self.check_acting()
                with contextlib.suppress(Conflict):
                    await self.kube.create_service(namespace, body)
                continue
            if (current.get("spec") or {}).get("selector") != selector:
                self.check_acting()
                await self.kube.patch_service(
                    namespace, service, {"spec": {"selector": selector}}
                )

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
        return await self.kube.patch_deployment(
            namespace, primary, {"spec": {"template": template}}
        )

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
