"""ingress-nginx router: a canary Ingress beside the user's, weighted by annotation.

ingress-nginx splits traffic when a second Ingress for the same host and path carries
`nginx.ingress.kubernetes.io/canary: "true"` and `canary-weight: N` (percent). As in
Flagger, the user's Ingress stays theirs and untouched; we own `<ingress>-canary`, a copy
of its rules with the primary Service swapped for the canary Service, and rewrite it from
the user's Ingress on every write so that edits to hosts or paths follow.

The weight counts as applied only once read back from the API server (set_and_verify), and
the read-back also checks that the canary Ingress still routes to the canary Service. With a
watch cache of Ingresses (`cache`, canary.kubernetes.informer), reads (the write's too) come
from it once it has seen this router's last write; until then, and without one, they GET.

A/B (a `Match`): with the match on, the canary Ingress also carries `canary-by-header` +
`canary-by-header-value` (or `canary-by-cookie`, whose value must be `always`: that is
ingress-nginx's rule), at weight 0, so only matching requests reach the canary; `get_match`
reads them back. Session affinity (`affinity="cookie"`) writes `affinity: cookie` and
`affinity-canary-behavior: sticky` on the canary Ingress and is read back with the weight.
"""

from __future__ import annotations

import copy
from typing import Any

from canary.kubernetes.client import Conflict, Kube, KubeError, NotFound, Unavailable
from canary.kubernetes.informer import HeldRead, ObjectCache
from canary.retry import ONCE_MORE, retrying
from canary.routers.base import Match, RouterError, RouterRejected, RouterUnreachable

__all__ = ["CANARY_ANNOTATION", "WEIGHT_ANNOTATION", "IngressNginxRouter"]

CANARY_ANNOTATION = "nginx.ingress.kubernetes.io/canary"
WEIGHT_ANNOTATION = "nginx.ingress.kubernetes.io/canary-weight"
BY_HEADER = "nginx.ingress.kubernetes.io/canary-by-header"
BY_HEADER_VALUE = "nginx.ingress.kubernetes.io/canary-by-header-value"
BY_COOKIE = "nginx.ingress.kubernetes.io/canary-by-cookie"
AFFINITY = "nginx.ingress.kubernetes.io/affinity"
AFFINITY_CANARY = "nginx.ingress.kubernetes.io/affinity-canary-behavior"
_NGINX_CANARY_PREFIX = "nginx.ingress.kubernetes.io/canary"
MANAGED_BY = {"app.kubernetes.io/managed-by": "canary"}

JSON = dict[str, Any]


def _router_error(command: str, exc: KubeError) -> RouterError:
    if isinstance(exc, Unavailable):
        return RouterUnreachable(f"{command}: {exc}")
    return RouterRejected(command, str(exc))


def _backends(spec: JSON) -> list[JSON]:
    """Every `backend.service` in an Ingress spec (default backend and rule paths)."""
    found: list[JSON] = []
    default = (spec.get("defaultBackend") or {}).get("service")
    if default is not None:
        found.append(default)
    for rule in spec.get("rules") or []:
        for path in (rule.get("http") or {}).get("paths") or []:
            service = (path.get("backend") or {}).get("service")
            if service is not None:
                found.append(service)
    return found


class IngressNginxRouter:
    """Canary percent = the canary Ingress' `canary-weight`; no canary Ingress means 0."""

    name = "ingress-nginx"

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        ingress: str,
        primary_service: str,
        canary_service: str,
        canary_ingress: str | None = None,
        match: Match | None = None,
        affinity: str | None = None,
        cache: ObjectCache | None = None,
    ) -> None:
        if match is not None and match.kind == "cookie" and match.value != "always":
            raise ValueError(
                f"ingress-nginx routes a cookie to the canary only when its value is 'always', "
                f"got {match.name}={match.value}"
            )
        if affinity not in (None, "cookie"):
            raise ValueError(f"ingress-nginx session affinity is 'cookie', got {affinity!r}")
        self.match = match
        self.affinity = affinity
        self.kube = kube
        self.namespace = namespace
        self.ingress = ingress
        self.primary_service = primary_service
        self.canary_service = canary_service
        self.canary_ingress = canary_ingress or f"{ingress}-canary"
        self.cache = cache
        self._weight_seen: HeldRead[int] = HeldRead()  # the weight read back from the cache

    def _where(self, name: str) -> str:
        return f"Ingress {self.namespace}/{name}"

    def _match_annotations(self) -> dict[str, str]:
        if self.match is None:
            return {}
        if self.match.kind == "header":
            return {BY_HEADER: self.match.name, BY_HEADER_VALUE: self.match.value}
        return {BY_COOKIE: self.match.name}

    def desired(self, user: JSON, weight: int, match: bool = False) -> JSON:
        """The canary Ingress for `user`'s Ingress at `weight` percent (and, with `match`,
        the A/B match on)."""
        spec = copy.deepcopy(user.get("spec") or {})
        swapped = 0
        for service in _backends(spec):
            if service.get("name") == self.primary_service:
                service["name"] = self.canary_service
                swapped += 1
        if swapped == 0:
            raise RouterRejected(
                f"set weight {weight}",
                f"{self._where(self.ingress)} has no backend for Service "
                f"{self.primary_service!r}, so there is nothing to split",
            )
        # ingress-nginx allows one canary per host/path, and TLS stays on the main Ingress.
        spec.pop("tls", None)
        user_meta = user.get("metadata") or {}
        annotations = {
            k: v
            for k, v in (user_meta.get("annotations") or {}).items()
            if not k.startswith(_NGINX_CANARY_PREFIX) and not k.startswith("kubectl.kubernetes.io/")
        }
        annotations[CANARY_ANNOTATION] = "true"
        annotations[WEIGHT_ANNOTATION] = str(weight)
        if match:
            annotations.update(self._match_annotations())
        if self.affinity == "cookie":
            annotations[AFFINITY] = "cookie"
            annotations[AFFINITY_CANARY] = "sticky"
        metadata: JSON = {
            "name": self.canary_ingress,
            "namespace": self.namespace,
            "labels": dict(MANAGED_BY),
            "annotations": annotations,
        }
        if user_meta.get("uid"):
            # Deleting the user's Ingress takes ours with it.
            metadata["ownerReferences"] = [
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "Ingress",
                    "name": self.ingress,
                    "uid": user_meta["uid"],
                }
            ]
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": metadata,
            "spec": spec,
        }

    async def set_weight(self, canary_percent: int) -> None:
        await self.set_route(canary_percent, False)

    async def set_route(self, canary_percent: int, match: bool) -> None:
        """Write the weight and the A/B match (on or off) in one patch."""
        if not 0 <= canary_percent <= 100:
            raise ValueError(f"canary_percent must be within 0..100, got {canary_percent}")
        if match and self.match is None:
            raise RouterError(f"{self.name} is not set up for A/B routing (no match)")
        command = f"set {self._where(self.canary_ingress)} canary-weight {canary_percent}" + (
            f" with {self.match}" if match else ""
        )

        async def write() -> None:
            # Both reads may come from the cache: a stale canary Ingress makes the guarded
            # patch a Conflict, after which (see `_writing`) the retry reads it with a GET.
            user = await self._read(self.ingress)
            body = self.desired(user, canary_percent, match)
            try:
                current = await self._read(self.canary_ingress)
            except NotFound:
                self._writing()
                self._wrote(await self.kube.create_ingress(self.namespace, body))
                return
            self._check_ours(current)
            old_annotations = (current.get("metadata") or {}).get("annotations") or {}
            # A merge patch keeps keys it does not name: drop ones no longer wanted.
            annotations: dict[str, str | None] = {k: None for k in old_annotations}
            annotations.update(body["metadata"]["annotations"])
            self._writing()
            written = await self.kube.patch_ingress(
                self.namespace,
                self.canary_ingress,
                {
                    "metadata": {"annotations": annotations, "labels": MANAGED_BY},
                    "spec": body["spec"],
                },
                resource_version=current["metadata"]["resourceVersion"],
            )
            self._wrote(written)

        try:
            # A Conflict: someone wrote between our read and our write; read again.
            await retrying(write, policy=ONCE_MORE, on=Conflict, what=command)
        except NotFound as exc:
            raise RouterRejected(command, f"{self._where(self.ingress)} not found: {exc}") from exc
        except KubeError as exc:
            raise _router_error(command, exc) from exc

    def _writing(self) -> None:
        if self.cache is not None:
            self.cache.writing(self.namespace, self.canary_ingress)

    def _wrote(self, obj: JSON) -> None:
        if self.cache is not None:
            self.cache.wrote(self.namespace, self.canary_ingress, obj)

    async def _read(self, name: str) -> JSON:
        """An Ingress: from the watch cache when it has caught up, else a GET."""
        if self.cache is not None:
            return await self.cache.get(self.namespace, name)
        return await self.kube.get_ingress(self.namespace, name)

    def _check_ours(self, current: JSON) -> None:
        labels = (current.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") != "canary":
            raise RouterRejected(
                "set weight",
                f"{self._where(self.canary_ingress)} exists and is not managed by canary "
                "(label app.kubernetes.io/managed-by=canary); refusing to overwrite it",
            )

    async def get_match(self) -> bool:
        """Whether the canary Ingress carries exactly our A/B match annotations."""
        command = f"read {self._where(self.canary_ingress)}"
        try:
            current = await self._read(self.canary_ingress)
        except NotFound:
            return False
        except KubeError as exc:
            raise _router_error(command, exc) from exc
        annotations = (current.get("metadata") or {}).get("annotations") or {}
        if annotations.get(CANARY_ANNOTATION) != "true":
            return False
        present = {
            k: annotations[k] for k in (BY_HEADER, BY_HEADER_VALUE, BY_COOKIE) if k in annotations
        }
        if not present:
            return False
        if present != self._match_annotations():
            raise RouterRejected(command, f"A/B annotations are {present}, not ours ({self.match})")
        return True

    async def get_weight(self) -> int:
        command = f"read {self._where(self.canary_ingress)}"
        held = None if self.cache is None else self.cache.held(self.namespace, self.canary_ingress)
        if held is not None:
            settings = (self.canary_service, self.affinity)
            return self._weight_seen.read(held, settings, lambda obj: self._weight_of(command, obj))
        try:
            current = await self._read(self.canary_ingress)
        except NotFound:
            return 0
        except KubeError as exc:
            raise _router_error(command, exc) from exc
        return self._weight_of(command, current)

    def _weight_of(self, command: str, current: JSON) -> int:
        """The canary weight the canary Ingress `current` gives (RouterRejected: not ours)."""
        annotations = (current.get("metadata") or {}).get("annotations") or {}
        if annotations.get(CANARY_ANNOTATION) != "true":
            return 0  # ingress-nginx treats it as a normal Ingress: the canary gets nothing
        raw = annotations.get(WEIGHT_ANNOTATION, "0")
        try:
            weight = int(raw)
        except ValueError:
            raise RouterRejected(command, f"{WEIGHT_ANNOTATION} is {raw!r}, not a number") from None
        if not 0 <= weight <= 100:
            raise RouterRejected(command, f"{WEIGHT_ANNOTATION} is {weight}, outside 0..100")
        names = {service.get("name") for service in _backends(current.get("spec") or {})}
        if names != {self.canary_service}:
            raise RouterRejected(
                command,
                f"routes to Services {sorted(str(n) for n in names)}, "
                f"expected only {self.canary_service!r}",
            )
        if self.affinity == "cookie" and (
            annotations.get(AFFINITY) != "cookie" or annotations.get(AFFINITY_CANARY) != "sticky"
        ):
            raise RouterRejected(
                command,
                f"session affinity not in place: {AFFINITY}={annotations.get(AFFINITY)!r}, "
                f"{AFFINITY_CANARY}={annotations.get(AFFINITY_CANARY)!r}",
            )
        return weight
