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

With a watch cache of HTTPRoutes (`cache`, canary.kubernetes.informer), reads (the write's too)
come from it once it has seen this router's last write; until then, and without one, they GET.

A/B (a `Match`): with the match on, every weighted rule gets a twin placed before it with
the same matches plus a header match (a cookie is matched on the `Cookie` header with a
RegularExpression) and the canary as its only backend. Gateway API gives a rule with more
header matches precedence, so matching requests reach the canary while the weights (0)
send it nothing else. Twins are recognised by their shape (only the canary backend, our
header match) and removed when the match goes off; `get_match` reads them back.

Session affinity: the standard channel of Gateway API has no session affinity
(`sessionPersistence` is experimental and implementation-specific), so it is refused when
the spec is read, never accepted and ignored.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from typing import Any

from canary.kubernetes.client import Conflict, Kube, KubeError, Unavailable
from canary.kubernetes.informer import HeldRead, ObjectCache
from canary.retry import ONCE_MORE, retrying
from canary.routers.base import Match, RouterError, RouterRejected, RouterUnreachable

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
        match: Match | None = None,
        cache: ObjectCache | None = None,
    ) -> None:
        self.match = match
        self.kube = kube
        self.cache = cache
        self.namespace = namespace
        self.route = route
        self.primary_service = primary_service
        self.canary_service = canary_service
        self.port = port
        self.settle_timeout_s = settle_timeout_s
        self.poll_s = poll_s
        self._weight_seen: HeldRead[int] = HeldRead()  # the weight read back from the cache

    @property
    def _where(self) -> str:
        return f"HTTPRoute {self.namespace}/{self.route}"

    def _is_ours(self, ref: JSON) -> bool:
        return ref.get("kind", "Service") == "Service" and ref.get("name") in (
            self.primary_service,
            self.canary_service,
        )

    def header_match(self) -> JSON:
        """The HTTPRoute header match for our Match."""
        assert self.match is not None
        if self.match.kind == "header":
            return {"type": "Exact", "name": self.match.name, "value": self.match.value}
        cookie = re.escape(f"{self.match.name}={self.match.value}")
        return {
            "type": "RegularExpression",
            "name": "Cookie",
            "value": f"(^|.*; ?){cookie}(;.*|$)",
        }

    def _is_ab_rule(self, rule: JSON) -> bool:
        """One of our A/B twins: only the canary backend, and our header match in each match."""
        if self.match is None:
            return False
        refs = rule.get("backendRefs") or []
        if (
            len(refs) != 1
            or not self._is_ours(refs[0])
            or refs[0].get("name") != self.canary_service
        ):
            return False
        matches = rule.get("matches") or []
        wanted = self.header_match()
        return bool(matches) and all(wanted in (m.get("headers") or []) for m in matches)

    def _ab_twin(self, rule: JSON) -> JSON:
        twin = {
            k: copy.deepcopy(v)
            for k, v in rule.items()
            if k not in ("backendRefs", "matches", "name")
        }
        matches = copy.deepcopy(rule.get("matches") or [{}])
        for m in matches:
            m["headers"] = [*(m.get("headers") or []), self.header_match()]
        canary = next(ref for ref in rule["backendRefs"] if ref.get("name") == self.canary_service)
        twin["matches"] = matches
        twin["backendRefs"] = [{**copy.deepcopy(canary), "weight": 1}]
        return twin

    def weighted_rules(self, route: JSON, weight: int, match: bool = False) -> list[JSON]:
        """The route's rules with our two backends weighted 100-weight / weight (and, with
        `match`, each preceded by its A/B twin)."""
        rules = [
            r
            for r in copy.deepcopy((route.get("spec") or {}).get("rules") or [])
            if not self._is_ab_rule(r)
        ]
        touched = 0
        out: list[JSON] = []
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
            if match:
                out.append(self._ab_twin(rule))
        if touched == 0:
            raise RouterRejected(
                f"set weight {weight}",
                f"{self._where} has no rule with a backendRef to Service "
                f"{self.primary_service!r} or {self.canary_service!r}",
            )
        if match:
            # Each twin goes right before its rule (insertion order is kept in `out`).
            merged: list[JSON] = []
            twins = iter(out)
            for rule in rules:
                if any(self._is_ours(ref) for ref in rule.get("backendRefs") or []):
                    merged.append(next(twins))
                merged.append(rule)
            if len(merged) > 16:
                raise RouterRejected(
                    f"set weight {weight} with {self.match}",
                    f"{self._where} would have {len(merged)} rules with the A/B twins; "
                    "an HTTPRoute holds at most 16",
                )
            return merged
        return rules

    async def set_weight(self, canary_percent: int) -> None:
        await self.set_route(canary_percent, False)

    async def set_route(self, canary_percent: int, match: bool) -> None:
        """Write the weights and the A/B twins (on or off) in one patch."""
        if not 0 <= canary_percent <= 100:
            raise ValueError(f"canary_percent must be within 0..100, got {canary_percent}")
        if match and self.match is None:
            raise RouterError(f"{self.name} is not set up for A/B routing (no match)")
        command = f"set {self._where} canary weight {canary_percent}" + (
            f" with {self.match}" if match else ""
        )

        async def write() -> JSON | None:
            # From the cache when it can be trusted: a stale route makes the guarded patch a
            # Conflict, after which (`writing` was called) the retry reads it with a GET.
            route = await self._read()
            rules = self.weighted_rules(route, canary_percent, match)
            if rules == (route.get("spec") or {}).get("rules"):
                return None  # already there; nothing for the gateway to catch up with
            if self.cache is not None:
                self.cache.writing(self.namespace, self.route)
            written = await self.kube.patch_httproute(
                self.namespace,
                self.route,
                {"spec": {"rules": rules}},
                resource_version=route["metadata"]["resourceVersion"],
            )
            if self.cache is not None:
                self.cache.wrote(self.namespace, self.route, written)
            return written

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
                route = await self._read()
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

    async def _read(self) -> JSON:
        """The route: from the watch cache when it has caught up, else a GET."""
        if self.cache is not None:
            return await self.cache.get(self.namespace, self.route)
        return await self.kube.get_httproute(self.namespace, self.route)

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
        held = None if self.cache is None else self.cache.held(self.namespace, self.route)
        if held is not None:
            settings = (self.primary_service, self.canary_service, self.match)
            return self._weight_seen.read(held, settings, lambda obj: self._weight_of(command, obj))
        try:
            route = await self._read()
        except KubeError as exc:
            raise _router_error(command, exc) from exc
        return self._weight_of(command, route)

    def _weight_of(self, command: str, route: JSON) -> int:
        """The canary weight the route gives (RouteNotReady: not accepted; RouterRejected:
        not ours, or rules that disagree)."""
        self.check_status(route)
        weights: set[int] = set()
        for rule in (route.get("spec") or {}).get("rules") or []:
            if self._is_ab_rule(rule):
                continue
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

    async def get_match(self) -> bool:
        """Whether every weighted rule has its A/B twin (True) or none has (False); anything
        in between is a route someone else edited, reported as such."""
        command = f"read {self._where}"
        try:
            route = await self._read()
        except KubeError as exc:
            raise _router_error(command, exc) from exc
        self.check_status(route)
        rules = (route.get("spec") or {}).get("rules") or []
        twins = sum(1 for rule in rules if self._is_ab_rule(rule))
        weighted = sum(
            1
            for rule in rules
            if not self._is_ab_rule(rule)
            and any(self._is_ours(ref) for ref in rule.get("backendRefs") or [])
        )
        if twins == 0:
            return False
        if twins != weighted:
            raise RouterRejected(
                command, f"{twins} A/B rules for {weighted} weighted rules: expected one each"
            )
        return True
