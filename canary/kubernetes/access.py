"""Who may call `canary kubernetes`' HTTP server: the cluster decides, as kube-rbac-proxy does.

Why: in a cluster the server listens behind a Service, so any pod can reach it. A command
there copies a template into app-primary, which the annotation path only lets those who
may `patch` the Deployment do; the HTTP path must ask the same question of the same RBAC,
or it is a way around it. So a bearer token is checked in two API calls:

1. TokenReview: is it a token of this cluster, and whose (user name, uid, groups)?
2. SubjectAccessReview: may that user `patch` (a command) or `get` (a read) `deployments`
   (group apps) named by the route, in its namespace? For the list of every rollout, `get`
   in the watched namespace (cluster-wide when the controller watches every namespace).

The recorded `who` is the user name the cluster gave (`Identity.authoritative`), never
the name a caller writes. Answers are kept for `ttl_s` (10 s) per (token, question), in a
bounded map, so a burst of requests costs two API calls, not two per request; a revoked
token or role is honoured within that time. An API server that cannot answer is a 503,
never an allow.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any

from canary.kubernetes.client import Kube, KubeError
from canary.server.auth import Denied, Identity, Verb

__all__ = ["KubeAccess"]

log = logging.getLogger(__name__)


class KubeAccess:
    """canary.server.auth.Access for a cluster: TokenReview, then SubjectAccessReview."""

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str | None,
        ttl_s: float = 10.0,
        max_cached: int = 1024,
    ) -> None:
        self.kube = kube
        self.namespace = namespace  # the watched one; None: every namespace
        self.ttl_s = ttl_s
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple[str, ...], tuple[float, Identity | Denied]] = OrderedDict()

    async def authorize(
        self, token: str | None, *, verb: Verb, namespace: str | None, name: str | None
    ) -> Identity:
        if not token:
            raise Denied(401, "this route needs Authorization: Bearer <a token of this cluster>")
        scope = namespace if namespace is not None else (self.namespace or "")
        digest = hashlib.sha256(token.encode()).hexdigest()
        # A name counts only with its namespace: "app" alone names no one Deployment.
        key = (digest, verb, scope, (name or "") if namespace is not None else "")
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return _answer(cached[1])
        try:
            answer: Identity | Denied = await self._review(token, verb, scope, key[3])
        except KubeError as exc:
            log.warning("cannot review a caller's token: %s", exc)
            raise Denied(503, "the cluster cannot check credentials now; try again") from None
        self._cache[key] = (now + self.ttl_s, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return _answer(answer)

    async def _review(self, token: str, verb: Verb, namespace: str, name: str) -> Identity | Denied:
        review = await self.kube.review_token(token)
        status: dict[str, Any] = review.get("status") or {}
        user: dict[str, Any] = status.get("user") or {}
        username = str(user.get("username") or "")
        if not status.get("authenticated") or not username:
            return Denied(401, "the bearer token is not valid in this cluster")
        attributes = {"verb": verb, "group": "apps", "resource": "deployments"}
        if namespace:
            attributes["namespace"] = namespace
        if name:
            attributes["name"] = name
        access = await self.kube.review_access(user, attributes)
        decision: dict[str, Any] = access.get("status") or {}
        if decision.get("allowed") and not decision.get("denied"):
            return Identity(username, authoritative=True)
        where = f"deployments/{name}" if name else "deployments"
        place = f"in namespace {namespace}" if namespace else "cluster-wide"
        return Denied(403, f"{username} may not {verb} {where} {place}")


def _answer(answer: Identity | Denied) -> Identity:
    if isinstance(answer, Denied):
        raise Denied(answer.status, answer.message)
    return answer
