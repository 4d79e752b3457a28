"""Gateway API router: the weights of an HTTPRoute's backendRefs.

The canary percent is written as the weights of the primary and canary Services in every
rule of the HTTPRoute that routes to either (weights 100-p and p). A weight written is not
a weight applied: the gateway controller must accept the route and resolve its backends,
and says so in `status.parents[].conditions`. The read-back therefore checks, for every
parent gateway, that `Accepted` and `ResolvedRefs` are True for the route's current
generation, and raises a RouterError that names the parent and the failed condition with
the controller's reason and message otherwise.

Because the controller updates the status after our write, `set_weight` waits (up to
`settle_timeout_s`) for the status to catch up with the new generation.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

from canary.kubernetes.client import Conflict, Kube, KubeError, Unavailable
from canary.retry import ONCE_MORE, retrying
from canary.routers.base import RouterError, RouterRejected, RouterUnreachable

__all__ = ["GatewayApiRouter", "RouteNotReady"]

JSON = dict[str, Any]
REQUIRED_CONDITIONS = ("Accepted", "ResolvedRefs")


class RouteNotReady(RouterError):
    """The gateway has not accepted the route, or cannot resolve its backends."""


def _router_error(command: str, exc: KubeError) -> RouterError:
    if isinstance(exc, Unavailable):
        return RouterUnreachable(f"{command}: {exc}")
    return RouterRejected(command, str(exc))


class GatewayApiRouter:
    name = "gateway-api"

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        route: str,
        primary_service: str,
        canary_service: str,
        port: int | None = None,
        settle_timeout_s: float = 10.0,
        poll_s: float = 0.2,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.route = route
        self.primary_service = primary_service
        self.canary_service = canary_service
        self.port = port
        self.settle_timeout_s = settle_timeout_s
        self.poll_s = poll_s

    @property
    def _where(self) -> str:
        return f"HTTPRoute {self.namespace}/{self.route}"

    def _is_ours(self, ref: JSON) -> bool:
        return ref.get("kind", "Service") == "Service" and ref.get("name") in (
            self.primary_service,
            self.canary_service,
        )

    def weighted_rules(self, route: JSON, weight: int) -> list[JSON]:
        """The route's rules with our two backends weighted 100-weight / weight."""
        rules = copy.deepcopy((route.get("spec") or {}).get("rules") or [])
        touched = 0
        for rule in rules:
            refs = rule.get("backendRefs") or []
            ours = [ref for ref in refs if self._is_ours(ref)]
            if not ours:
                continue
            touched += 1
            template = {k: v for k, v in ours[0].items() if k not in ("name", "weight")}
            if self.port is not None:
                template["port"] = self.port
            by_name = {ref["name"]: ref for ref in ours}
            primary = {**template, **by_name.get(self.primary_service, {})}
            canary = {**template, **by_name.get(self.canary_service, {})}
            primary.update(name=self.primary_service, weight=100 - weight)
            canary.update(name=self.canary_service, weight=weight)
            others = [ref for ref in refs if not self._is_ours(ref)]
            rule["backendRefs"] = [*others, primary, canary]
        if touched == 0:
            raise RouterRejected(
                f"set weight {weight}",
                f"{self._where} has no rule with a backendRef to Service "
                f"{self.primary_service!r} or {self.canary_service!r}",
            )
        return rules

    async def set_weight(self, canary_percent: int) -> None:
        if not 0 <= canary_percent <= 100:
            raise ValueError(f"canary_percent must be within 0..100, got {canary_percent}")
        command = f"set {self._where} canary weight {canary_percent}"

        async def write() -> JSON | None:
            route = await self.kube.get_httproute(self.namespace, self.route)
            rules = self.weighted_rules(route, canary_percent)
            if rules == (route.get("spec") or {}).get("rules"):
                return None  # already there; nothing for the gateway to catch up with
            return await self.kube.patch_httproute(
                self.namespace,
                self.route,
                {"spec": {"rules": rules}},
                resource_version=route["metadata"]["resourceVersion"],
            )

        try:
            # A Conflict: someone wrote between our read and our write; read again.
            written = await retrying(write, policy=ONCE_MORE, on=Conflict, what=command)
        except KubeError as exc:
            raise _router_error(command, exc) from exc
        if written is not None:
            await self._settle(int(written["metadata"].get("generation") or 0))

    async def _settle(self, generation: int) -> None:
        """Wait until every parent's status has seen `generation` (or time runs out)."""
        deadline = time.monotonic() + self.settle_timeout_s
        while True:
            try:
                route = await self.kube.get_httproute(self.namespace, self.route)
            except KubeError as exc:
                raise _router_error(f"read {self._where}", exc) from exc
            parents = (route.get("status") or {}).get("parents") or []
            seen = [
                int(c.get("observedGeneration") or 0)
                for p in parents
                for c in p.get("conditions") or []
                if c.get("type") in REQUIRED_CONDITIONS
            ]
            if parents and seen and min(seen) >= generation:
                return
            if time.monotonic() >= deadline:
                return  # get_weight reports what is missing
            await asyncio.sleep(self.poll_s)

    def check_status(self, route: JSON) -> None:
        """Raise RouteNotReady unless every parent has Accepted and ResolvedRefs True
        for the route's current generation."""
        generation = int((route.get("metadata") or {}).get("generation") or 0)
        parents = (route.get("status") or {}).get("parents") or []
        if not parents:
            raise RouteNotReady(f"{self._where} has no parent status: no gateway has accepted it")
        for parent in parents:
            ref = parent.get("parentRef") or {}
            who = f"parent {ref.get('namespace', self.namespace)}/{ref.get('name', '?')}"
            conditions = {c.get("type"): c for c in parent.get("conditions") or []}
            for wanted in REQUIRED_CONDITIONS:
                condition = conditions.get(wanted)
                if condition is None:
                    raise RouteNotReady(f"{self._where}: {who} reports no {wanted} condition")
                if condition.get("status") != "True":
                    raise RouteNotReady(
                        f"{self._where}: {who}: {wanted} is {condition.get('status')} "
                        f"({condition.get('reason', '')}: {condition.get('message', '')})"
                    )
                observed = int(condition.get("observedGeneration") or generation)
                if observed < generation:
                    raise RouteNotReady(
                        f"{self._where}: {who}: {wanted} describes generation {observed}, "
                        f"the route is at {generation}: the gateway has not caught up"
                    )

    async def get_weight(self) -> int:
        command = f"read {self._where}"
        try:
            route = await self.kube.get_httproute(self.namespace, self.route)
        except KubeError as exc:
            raise _router_error(command, exc) from exc
        self.check_status(route)
        weights: set[int] = set()
        for rule in (route.get("spec") or {}).get("rules") or []:
            refs = [ref for ref in rule.get("backendRefs") or [] if self._is_ours(ref)]
            if not refs:
                continue
            primary = sum(
                int(r.get("weight", 1)) for r in refs if r["name"] == self.primary_service
            )
            canary = sum(int(r.get("weight", 1)) for r in refs if r["name"] == self.canary_service)
            if primary + canary == 0:
                raise RouterRejected(command, "both backends have weight 0: no traffic at all")
            weights.add(round(100 * canary / (primary + canary)))
        if not weights:
            raise RouterRejected(
                command, f"no rule routes to {self.primary_service!r} or {self.canary_service!r}"
            )
        if len(weights) > 1:
            raise RouterRejected(command, f"rules disagree on the canary weight: {sorted(weights)}")
        return weights.pop()
