"""external-dns router: Route 53 weighted records between two clusters, written in each cluster.

Each cluster runs its own external-dns, which publishes its own entry point for the service's
name. Route 53 splits between records of the same name by weight when each carries a
set identifier. external-dns takes both from Kubernetes objects, in one of two ways:

- `mode="annotations"`: on the service's Service (or Ingress) in each cluster,
  `external-dns.alpha.kubernetes.io/set-identifier` and `.../aws-weight`;
- `mode="dnsendpoint"`: a DNSEndpoint (externaldns.k8s.io/v1alpha1) in each cluster that canary
  owns, with `setIdentifier` and `providerSpecific: [{name: aws/weight, value: N}]`.

The canary percent is the canary cluster's weight out of the two (weights are written as
100 - p and p). As everywhere in canary, a weight counts only once read back: get_weight reads
both clusters' objects and checks that the set identifiers are the ones configured, so a
hand-edited record is reported, never guessed at. Route 53 itself is external-dns' job; we
verify what we can see, the objects it reads.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from canary.kubernetes.client import Conflict, Kube, KubeError, NotFound, Unavailable
from canary.retry import ONCE_MORE, retrying
from canary.routers.base import RouterError, RouterRejected, RouterUnreachable

__all__ = [
    "HOSTNAME_ANNOTATION",
    "SET_IDENTIFIER_ANNOTATION",
    "WEIGHT_ANNOTATION",
    "ClusterSide",
    "ExternalDNSRouter",
]

SET_IDENTIFIER_ANNOTATION = "external-dns.alpha.kubernetes.io/set-identifier"
WEIGHT_ANNOTATION = "external-dns.alpha.kubernetes.io/aws-weight"
HOSTNAME_ANNOTATION = "external-dns.alpha.kubernetes.io/hostname"
AWS_WEIGHT = "aws/weight"
MANAGED_BY = {"app.kubernetes.io/managed-by": "canary"}

JSON = dict[str, Any]


class ClusterSide:
    """One cluster's half: its API, its entry point and its set identifier."""

    def __init__(self, kube: Kube, *, entry_point: str, set_identifier: str) -> None:
        if not set_identifier:
            raise ValueError("set_identifier must not be empty")
        self.kube = kube
        self.entry_point = entry_point
        self.set_identifier = set_identifier


def _router_error(command: str, exc: KubeError) -> RouterError:
    if isinstance(exc, Unavailable):
        return RouterUnreachable(f"{command}: {exc}")
    return RouterRejected(command, str(exc))


def _record_type(address: str) -> str:
    try:
        return "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
    except ValueError:
        return "CNAME"


class ExternalDNSRouter:
    """TrafficRouter over two clusters' external-dns sources; canary percent 0..100."""

    def __init__(
        self,
        *,
        primary: ClusterSide,
        canary: ClusterSide,
        namespace: str,
        object_name: str,
        dns_name: str,
        mode: Literal["annotations", "dnsendpoint"] = "annotations",
        resource: Literal["service", "ingress"] = "service",
        ttl: int = 60,
        placement: Literal["each", "canary"] = "each",
        name: str = "external-dns",
    ) -> None:
        if primary.set_identifier == canary.set_identifier:
            raise ValueError(f"set identifiers must differ, both are {primary.set_identifier!r}")
        if mode not in ("annotations", "dnsendpoint"):
            raise ValueError(f"mode must be annotations or dnsendpoint, got {mode!r}")
        if resource not in ("service", "ingress"):
            raise ValueError(f"resource must be service or ingress, got {resource!r}")
        if placement not in ("each", "canary"):
            raise ValueError(f"placement must be each or canary, got {placement!r}")
        if placement == "canary" and mode != "dnsendpoint":
            raise ValueError("placement canary needs mode dnsendpoint (one object, both records)")
        self.name = name
        self.primary, self.canary = primary, canary
        self.namespace = namespace
        self.object_name = object_name
        self.dns_name = dns_name.rstrip(".")
        self.mode = mode
        self.resource = resource
        self.ttl = ttl
        self.placement = placement

    def _where(self) -> str:
        kind = {"service": "Service", "ingress": "Ingress"}[self.resource]
        kind = "DNSEndpoint" if self.mode == "dnsendpoint" else kind
        return f"{kind} {self.namespace}/{self.object_name}"

    # ---- writing --------------------------------------------------------------------

    async def set_weight(self, canary_percent: int) -> None:
        if isinstance(canary_percent, bool) or not 0 <= canary_percent <= 100:
            raise ValueError(f"canary_percent must be within 0..100, got {canary_percent!r}")
        weights = {"primary": 100 - canary_percent, "canary": canary_percent}
        if self.placement == "canary":
            # Both records live in the canary cluster, whose external-dns publishes them:
            # a failover then needs nothing from the primary cluster, which may be down.
            command = f"set {self._where()} weights {weights} in {self.canary.set_identifier}"
            body = self._body(
                [
                    self._entry(self.primary, weights["primary"]),
                    self._entry(self.canary, canary_percent),
                ]
            )
            try:
                await self._write_endpoint(self.canary, body, command)
            except KubeError as exc:
                raise _router_error(command, exc) from exc
            return
        # The side losing weight first: in between, the split errs toward where it is going.
        # Every side is tried even when one fails, so a reachable cluster is never left behind
        # an unreachable one; the first error is raised at the end.
        sides = [(self.primary, weights["primary"]), (self.canary, canary_percent)]
        sides.sort(key=lambda side: side[1])
        first: RouterError | None = None
        for side, weight in sides:
            command = f"set {self._where()} weight {weight} in {side.set_identifier}"
            try:
                if self.mode == "annotations":
                    await self._annotate(side, weight)
                else:
                    body = self._body([self._entry(side, weight)])
                    await self._write_endpoint(side, body, command)
            except NotFound as exc:
                first = first or RouterRejected(command, f"{self._where()} not found: {exc}")
            except KubeError as exc:
                first = first or _router_error(command, exc)
            except RouterError as exc:
                first = first or exc
        if first is not None:
            raise first

    async def _annotate(self, side: ClusterSide, weight: int) -> None:
        patch = {
            "metadata": {
                "annotations": {
                    SET_IDENTIFIER_ANNOTATION: side.set_identifier,
                    WEIGHT_ANNOTATION: str(weight),
                    HOSTNAME_ANNOTATION: self.dns_name,
                }
            }
        }
        if self.resource == "service":
            await side.kube.patch_service(self.namespace, self.object_name, patch)
        else:
            await side.kube.patch_ingress(self.namespace, self.object_name, patch)

    def _entry(self, side: ClusterSide, weight: int) -> JSON:
        return {
            "dnsName": self.dns_name,
            "recordType": _record_type(side.entry_point),
            "recordTTL": self.ttl,
            "targets": [side.entry_point],
            "setIdentifier": side.set_identifier,
            "providerSpecific": [{"name": AWS_WEIGHT, "value": str(weight)}],
        }

    def _body(self, entries: list[JSON]) -> JSON:
        return {
            "apiVersion": "externaldns.k8s.io/v1alpha1",
            "kind": "DNSEndpoint",
            "metadata": {
                "name": self.object_name,
                "namespace": self.namespace,
                "labels": dict(MANAGED_BY),
            },
            "spec": {"endpoints": entries},
        }

    def endpoint(self, side: ClusterSide, weight: int) -> JSON:
        """The DNSEndpoint canary keeps in `side`'s cluster (placement "each")."""
        return self._body([self._entry(side, weight)])

    async def _write_endpoint(self, side: ClusterSide, body: JSON, command: str) -> None:
        async def write() -> None:
            try:
                current = await side.kube.get_dnsendpoint(self.namespace, self.object_name)
            except NotFound:
                await side.kube.create_dnsendpoint(self.namespace, body)
                return
            labels = (current.get("metadata") or {}).get("labels") or {}
            if labels.get("app.kubernetes.io/managed-by") != "canary":
                raise RouterRejected(
                    command,
                    f"{self._where()} exists and is not managed by canary (label "
                    "app.kubernetes.io/managed-by=canary); refusing to overwrite it",
                )
            await side.kube.patch_dnsendpoint(
                self.namespace,
                self.object_name,
                {"spec": body["spec"]},
                resource_version=current["metadata"]["resourceVersion"],
            )

        # A Conflict: someone wrote (or created it) between our read and our write.
        await retrying(write, policy=ONCE_MORE, on=Conflict, what=command)

    # ---- reading back -----------------------------------------------------------------

    async def get_weight(self) -> int:
        primary = await self._read(self.primary)
        canary = await self._read(self.canary)
        if primary + canary == 0:
            # Route 53 then splits evenly: not a split canary wrote, so not one to trust.
            raise RouterError(f"{self._where()}: both weights are 0")
        return round(100 * canary / (primary + canary))

    async def _read(self, side: ClusterSide) -> int:
        command = f"read {self._where()} in {side.set_identifier}"
        # placement "canary": both records are read from the canary cluster's object
        kube = self.canary.kube if self.placement == "canary" else side.kube
        try:
            if self.mode == "dnsendpoint":
                obj = await kube.get_dnsendpoint(self.namespace, self.object_name)
            elif self.resource == "service":
                obj = await side.kube.get_service(self.namespace, self.object_name)
            else:
                obj = await side.kube.get_ingress(self.namespace, self.object_name)
        except KubeError as exc:
            raise _router_error(command, exc) from exc
        if self.mode == "dnsendpoint":
            identifier, raw = self._from_endpoint(obj, command, side.set_identifier)
        else:
            annotations = (obj.get("metadata") or {}).get("annotations") or {}
            identifier = annotations.get(SET_IDENTIFIER_ANNOTATION)
            raw = annotations.get(WEIGHT_ANNOTATION)
        if identifier != side.set_identifier:
            raise RouterRejected(
                command,
                f"set identifier is {identifier!r}, expected {side.set_identifier!r}",
            )
        if raw is None:
            raise RouterRejected(command, "has no aws weight")
        try:
            weight = int(raw)
        except ValueError:
            raise RouterRejected(command, f"aws weight is {raw!r}, not a number") from None
        if not 0 <= weight <= 255:  # Route 53's range
            raise RouterRejected(command, f"aws weight is {weight}, outside 0..255")
        return weight

    def _from_endpoint(
        self, obj: JSON, command: str, set_identifier: str
    ) -> tuple[str | None, str | None]:
        endpoints = [
            e
            for e in (obj.get("spec") or {}).get("endpoints") or []
            if str(e.get("dnsName", "")).rstrip(".") == self.dns_name
        ]
        expected = 2 if self.placement == "canary" else 1
        if len(endpoints) != expected:
            raise RouterRejected(
                command, f"has {len(endpoints)} endpoints for {self.dns_name}, expected {expected}"
            )
        if self.placement == "canary":
            mine = [e for e in endpoints if e.get("setIdentifier") == set_identifier]
            endpoint = mine[0] if len(mine) == 1 else endpoints[0]
        else:
            endpoint = endpoints[0]
        weights = [
            p.get("value")
            for p in endpoint.get("providerSpecific") or []
            if p.get("name") == AWS_WEIGHT
        ]
        return endpoint.get("setIdentifier"), (str(weights[0]) if len(weights) == 1 else None)
