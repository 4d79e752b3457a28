"""A small Kubernetes API server emulator over real HTTP, for driving the real client.

Why our own and not kmock's `KubernetesEmulator`: kmock 0.8 keeps objects but not the
parts of the API that a controller's correctness rests on: it lists with a placeholder
resourceVersion, never answers 409 to a stale resourceVersion, and has no watch history,
so it cannot answer 410 Gone. This emulator does only what the API server's contract
says about those, for any group/version/resource:

- a single, monotonically increasing resourceVersion over all objects (as etcd's revision);
- create (409 AlreadyExists), get, list (with the list's resourceVersion), update with a
  resourceVersion precondition (409 Conflict), merge / strategic-merge (treated as merge) /
  JSON patch, each honouring a resourceVersion carried in the patch, delete, and the
  `status` subresource;
- watches: `?watch=1&resourceVersion=N&timeoutSeconds=S`, chunked JSON lines ADDED /
  MODIFIED / DELETED, replayed from a history ring; a resourceVersion older than the ring
  gets an ERROR event with a 410 Status, as the real server sends it;
- injected faults (429 with Retry-After, 5xx, 410 on watches), matched by verb, resource
  and bearer token, so one client of several can be made to fail;
- optionally, a stand-in for the Deployment controller that marks every Deployment rolled
  out (status.observedGeneration, replicas, updatedReplicas, ...).

- TokenReview and SubjectAccessReview (`add_user`, `grant`): tokens map to users and groups,
  and a grant is (user or group, verb, group, resource, namespace or "" for cluster-wide), as
  an RBAC rule would allow; enough to test that the controller's HTTP server asks the
  cluster who a caller is and what they may do, and records the cluster's name for them.
  Why the emulator and not a real API server here: these tests need users, tokens and
  grants made up per test and a record of the reviews the controller asked for, in
  milliseconds; the real control plane checks the same calls end to end against real RBAC
  (tests/cluster/test_operator_on_cluster.py reads /rollouts with a user's token).

Every request is recorded (time, verb, resource, token, status) so tests check what the
client did, e.g. that a retry waited for Retry-After, from the server's side.

Where it is still used, and why: the operator's end-to-end cases (promote and roll back with
ingress-nginx and the Gateway API, kill and resume, two replicas with leader election, bad
annotations, manual commands, records in ConfigMaps) run on a real control plane
(tests/support/control_plane.py, tests/cluster/), and so do the real server's own faults:
409 from a concurrent write (test_conflicts_on_cluster.py), 410 Gone to a watch after an
etcd compaction and 429 with Retry-After from API Priority and Fairness
(test_api_faults_on_cluster.py). The emulator stays for what a real server cannot be made to
do on cue, at a chosen request and for a chosen client:

- a fault at one chosen request or moment, with the test's own values: a 409 on one
  particular write, a 410 on the open watches mid-rollout, a 429 with a Retry-After of the
  test's choosing (the real one starts at 1 s and doubles as it pleases), 5xx bursts on one
  resource (the client's retries, the operator's fault paths in
  tests/kubernetes/test_operator.py, test_kube_client.py, test_k8s_routers.py);
- failures for one bearer token only (one leader-election candidate's Lease calls failing
  while the other's succeed: test_leader.py, test_operator.py);
- every write of one resource failing (the record ConfigMaps: test_operator.py,
  tests/reports/test_report_store.py);
- users, tokens and grants made up per test (test_access.py, test_cli_target.py);
- the unit-level adapter tests that count the exact requests each client method makes
  (test_manifests.py, tests/routers/test_external_dns.py);
- the primary cluster's API answering 503 to everything during a failover, while the
  session's real cluster must stay up for the other tests, and the canary cluster's
  Deployment held "not rolled out" at will (tests/clusters/test_multicluster_failover.py,
  test_multicluster_notify.py, test_state_mirror.py). Cross-cluster rollouts themselves
  (promote, roll back and revert, resume) run on two real control planes:
  tests/cluster/test_multicluster_on_clusters.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

__all__ = ["Fault", "KubeEmulator", "RecordedRequest"]

JSON = dict[str, Any]
# (group, version, resource, namespace, name); group "" is the core API.
Key = tuple[str, str, str, str | None, str]


@dataclass
class RecordedRequest:
    at: float  # time.monotonic() when the request arrived
    method: str
    verb: str  # get list watch create update patch delete
    group: str
    version: str
    resource: str
    namespace: str | None
    name: str | None
    subresource: str | None
    query: dict[str, str]
    token: str | None
    status: int = 0
    body: Any = None  # the decoded JSON body of a write


@dataclass
class Fault:
    """Answer matching requests with `status` instead of serving them, `times` times."""

    status: int
    times: int = 1
    verb: str | None = None
    resource: str | None = None
    token: str | None = None
    retry_after: int | None = None
    # Answer only after this long (a hung server); the status is then served normally
    # when `status` is 0.
    delay_s: float = 0.0
    # Serve the request at once (a write is done) but answer only after this long: a reply
    # lost to the client's timeout, whose retry then finds its own write.
    answer_late_s: float = 0.0

    def matches(self, request: RecordedRequest) -> bool:
        return (
            self.times > 0
            and self.verb in (None, request.verb)
            and self.resource in (None, request.resource)
            and self.token in (None, request.token)
        )


class _Selector:
    """A label selector as the API server parses it (`labelSelector`): requirements joined
    by commas, each `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` or `!k`."""

    _SET = re.compile(r"^\s*(\S+)\s+(in|notin)\s*\(([^()]*)\)\s*$")

    def __init__(self, text: str) -> None:
        self.requirements: list[tuple[str, str, frozenset[str]]] = []
        for part in re.split(r",(?![^()]*\))", text):
            if not part.strip():
                continue
            if found := self._SET.match(part):
                values = frozenset(v.strip() for v in found[3].split(","))
                self.requirements.append((found[1], found[2], values))
            elif "!=" in part:
                key, value = part.split("!=", 1)
                self.requirements.append((key.strip(), "notin", frozenset([value.strip()])))
            elif "=" in part:
                key, value = part.replace("==", "=", 1).split("=", 1)
                self.requirements.append((key.strip(), "in", frozenset([value.strip()])))
            elif part.strip().startswith("!"):
                self.requirements.append((part.strip()[1:].strip(), "absent", frozenset()))
            else:
                self.requirements.append((part.strip(), "exists", frozenset()))
        for key, _, _ in self.requirements:
            if not re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", key):
                raise _ApiError(400, f"unable to parse requirement: invalid label key {key!r}")

    def matches(self, obj: JSON | None) -> bool:
        if obj is None:
            return False
        labels = obj.get("metadata", {}).get("labels") or {}
        for key, op, values in self.requirements:
            present = key in labels
            if op == "exists" and not present:
                return False
            if op == "absent" and present:
                return False
            if op == "in" and labels.get(key) not in values:
                return False
            if op == "notin" and present and labels[key] in values:
                return False
        return True


@dataclass
class _Watcher:
    group: str
    resource: str
    namespace: str | None
    selector: _Selector | None = None
    queue: asyncio.Queue[JSON | None] = field(default_factory=asyncio.Queue)

    def wants(self, key: Key) -> bool:
        return key[0] == self.group and key[2] == self.resource and self.namespace in (None, key[3])

    def event(self, kind: str, key: Key, obj: JSON, prev: JSON | None) -> JSON | None:
        """The event this watch sees, as the API server's watch cache filters it by label:
        an object that comes to match is ADDED, one that stops matching is DELETED (its
        previous content at the new resourceVersion), one that never matched is not seen."""
        if not self.wants(key):
            return None
        if self.selector is None:
            return {"type": kind, "object": obj}
        old = obj if kind == "DELETED" else prev  # None for an ADDED
        before = self.selector.matches(old)
        if kind != "DELETED" and self.selector.matches(obj):
            return {"type": "MODIFIED" if before else "ADDED", "object": obj}
        if before and old is not None:
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"]
            return {"type": "DELETED", "object": gone}
        return None


def _selector(rec: RecordedRequest) -> _Selector | None:
    text = rec.query.get("labelSelector")
    return _Selector(text) if text else None


def _status(code: int, reason: str, message: str) -> JSON:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class _ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or _REASONS.get(code, "Failure")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _ApiError(422, f"JSON patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list[JSON]) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, test, move, copy."""
    doc = copy.deepcopy(doc)

    def parent(parts: list[str]) -> tuple[Any, str]:
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    def get(parts: list[str]) -> Any:
        node = doc
        for part in parts:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    for op in ops:
        try:
            kind, parts = op["op"], _pointer(op["path"])
            if kind == "test":
                if get(parts) != op["value"]:
                    raise _ApiError(422, f"JSON patch test failed at {op['path']}")
                continue
            if kind in ("move", "copy"):
                value = copy.deepcopy(get(_pointer(op["from"])))
                if kind == "move":
                    node, last = parent(_pointer(op["from"]))
                    del node[int(last) if isinstance(node, list) else last]
                kind, op = "add", {"op": "add", "path": op["path"], "value": value}
            node, last = parent(parts)
            if kind == "add":
                if isinstance(node, list):
                    node.insert(len(node) if last == "-" else int(last), op["value"])
                else:
                    node[last] = op["value"]
            elif kind == "remove":
                del node[int(last) if isinstance(node, list) else last]
            elif kind == "replace":
                index: Any = int(last) if isinstance(node, list) else last
                if not isinstance(node, list) and last not in node:
                    raise _ApiError(422, f"JSON patch replace of missing {op['path']}")
                node[index] = op["value"]
            else:
                raise _ApiError(422, f"JSON patch op {kind!r} is not supported")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise _ApiError(422, f"JSON patch {op!r} failed: {exc!r}") from exc
    return doc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class KubeEmulator:
    """An in-memory API server on 127.0.0.1. Use `async with KubeEmulator() as api:`."""

    def __init__(self, *, history: int = 1000, simulate_deployments: bool = True) -> None:
        self.objects: dict[Key, JSON] = {}
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.simulate_deployments = simulate_deployments
        self._rv = 0
        # Watch events remembered for resuming: (rv, type, key, object).
        # each event with the object's content before it (None for an ADDED)
        self._history: deque[tuple[int, str, Key, JSON, JSON | None]] = deque(maxlen=history)
        # Watches from a resourceVersion below this get 410 Gone.
        self._compacted = 0
        self._watchers: list[_Watcher] = []
        self._runner: web.AppRunner | None = None
        self.port = 0
        # TokenReview: token -> the user it authenticates (username, uid, groups).
        self.users: dict[str, JSON] = {}
        # SubjectAccessReview: (user or group, verb, api group, resource, namespace; "" = all).
        self.grants: set[tuple[str, str, str, str, str]] = set()

    def add_user(self, token: str, username: str, groups: tuple[str, ...] = ()) -> None:
        self.users[token] = {
            "username": username,
            "uid": uuid.uuid4().hex,
            "groups": [*groups, "system:authenticated"],
        }

    def grant(
        self,
        subject: str,
        verb: str,
        *,
        group: str = "apps",
        resource: str = "deployments",
        namespace: str = "",
    ) -> None:
        self.grants.add((subject, verb, group, resource, namespace))

    def _review(self, resource: str, body: Any) -> JSON:
        spec = (body or {}).get("spec") or {}
        if resource == "tokenreviews":
            user = self.users.get(str(spec.get("token", "")))
            status: JSON = (
                {"authenticated": True, "user": copy.deepcopy(user)}
                if user is not None
                else {"authenticated": False, "error": "invalid bearer token"}
            )
        else:
            attrs = spec.get("resourceAttributes") or {}
            subjects = {spec.get("user", ""), *(spec.get("groups") or [])}
            allowed = any(
                (subject, attrs.get("verb"), attrs.get("group", ""), attrs.get("resource"), ns)
                in self.grants
                for subject in subjects
                for ns in {"", attrs.get("namespace", "")}
            )
            status = {"allowed": allowed} | ({} if allowed else {"reason": "no RBAC rule"})
        return {**(body or {}), "status": status}

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> KubeEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        self.port = _free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(
        self, path: Path, *, token: str = "token-a", context: str = "emulator"
    ) -> Path:
        """A kubeconfig whose `context` points at this emulator with a bearer token."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": context, "cluster": {"server": self.url}}],
                    "users": [{"name": context, "user": {"token": token}}],
                    "contexts": [
                        {"name": context, "context": {"cluster": context, "user": context}}
                    ],
                    "current-context": context,
                }
            )
        )
        return path

    # -- test controls ---------------------------------------------------------------

    def inject(
        self,
        status: int,
        *,
        times: int = 1,
        verb: str | None = None,
        resource: str | None = None,
        token: str | None = None,
        retry_after: int | None = None,
        delay_s: float = 0.0,
        answer_late_s: float = 0.0,
    ) -> Fault:
        """Fail matching requests `times` times with `status` (0: serve them, after `delay_s`;
        with `answer_late_s`, serve them at once and answer that much later)."""
        fault = Fault(status, times, verb, resource, token, retry_after, delay_s, answer_late_s)
        self.faults.append(fault)
        return fault

    def close_watches(self, *, gone: bool = False, error: int = 0) -> None:
        """End every open watch stream; with `gone`, each ends with a 410 ERROR event, with
        `error`, with an ERROR event of that status (500: InternalError)."""
        watchers, self._watchers = self._watchers, []
        for w in watchers:
            if gone:
                w.queue.put_nowait(
                    {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
                )
            elif error:
                w.queue.put_nowait(
                    {"type": "ERROR", "object": _status(error, "InternalError", "etcd hiccup")}
                )
            w.queue.put_nowait(None)

    def compact(self) -> None:
        """Forget the watch history, as etcd compaction does: older resumes get 410."""
        self._history.clear()
        self._compacted = self._rv

    @property
    def resource_version(self) -> int:
        return self._rv

    def get(
        self, group: str, version: str, resource: str, namespace: str | None, name: str
    ) -> JSON:
        return copy.deepcopy(self.objects[(group, version, resource, namespace, name)])

    def put(self, group: str, version: str, resource: str, obj: JSON) -> JSON:
        """Create or replace an object directly (seeding, or another actor's write)."""
        meta = obj.setdefault("metadata", {})
        key: Key = (group, version, resource, meta.get("namespace"), meta["name"])
        old = self.objects.get(key)
        return self._write(key, copy.deepcopy(obj), old)

    def delete(
        self, group: str, version: str, resource: str, namespace: str | None, name: str
    ) -> None:
        key: Key = (group, version, resource, namespace, name)
        obj = self.objects.pop(key)
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._emit("DELETED", key, obj)

    def recorded(self, **match: Any) -> list[RecordedRequest]:
        """Recorded requests whose attributes equal every keyword given."""
        return [r for r in self.requests if all(getattr(r, k) == v for k, v in match.items())]

    # -- store -----------------------------------------------------------------------

    def _write(self, key: Key, obj: JSON, old: JSON | None) -> JSON:
        meta = obj.setdefault("metadata", {})
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        meta["name"] = key[4]
        if key[3] is not None:
            meta["namespace"] = key[3]
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta["generation"] = 1
        else:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            generation = old["metadata"].get("generation", 1)
            meta["generation"] = generation + (obj.get("spec") != old.get("spec"))
        if self.simulate_deployments and key[0] == "apps" and key[2] == "deployments":
            replicas = obj.get("spec", {}).get("replicas", 1)
            obj["status"] = {
                "observedGeneration": meta["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            }
        self.objects[key] = obj
        self._emit("ADDED" if old is None else "MODIFIED", key, obj, old)
        return copy.deepcopy(obj)

    def _emit(self, kind: str, key: Key, obj: JSON, prev: JSON | None = None) -> None:
        snapshot = copy.deepcopy(obj)
        before = copy.deepcopy(prev) if prev is not None else None
        self._history.append((self._rv, kind, key, snapshot, before))
        for w in self._watchers:
            if (event := w.event(kind, key, snapshot, before)) is not None:
                w.queue.put_nowait(event)

    def _list(
        self, group: str, resource: str, namespace: str | None, selector: _Selector | None = None
    ) -> Iterator[tuple[Key, JSON]]:
        for key, obj in sorted(self.objects.items(), key=lambda kv: str(kv[0])):
            if key[0] == group and key[2] == resource and namespace in (None, key[3]):
                if selector is None or selector.matches(obj):
                    yield key, obj

    # -- HTTP ------------------------------------------------------------------------

    @staticmethod
    def _parse(request: web.Request) -> RecordedRequest:
        parts = [p for p in request.path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _ApiError(404, f"no API at {request.path}")
        namespace = None
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise _ApiError(404, f"no resource at {request.path}")
        resource, name, sub = (
            rest[0],
            (rest[1] if len(rest) > 1 else None),
            (rest[2] if len(rest) > 2 else None),
        )
        query = dict(request.query)
        method = request.method
        watching = query.get("watch") in ("1", "true", "True")
        verb = {
            "GET": "watch" if watching else ("get" if name else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(method)
        if verb is None:
            raise _ApiError(405, f"method {method} not allowed")
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        return RecordedRequest(
            at=time.monotonic(),
            method=method,
            verb=verb,
            group=group,
            version=version,
            resource=resource,
            namespace=namespace,
            name=name,
            subresource=sub,
            query=query,
            token=token,
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            rec = self._parse(request)
        except _ApiError as exc:
            return web.json_response(_status(exc.code, exc.reason, str(exc)), status=exc.code)
        self.requests.append(rec)
        answer_late_s = 0.0
        for fault in self.faults:
            if fault.matches(rec):
                fault.times -= 1
                if fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                if fault.status == 0:
                    answer_late_s = fault.answer_late_s
                    break
                rec.status = fault.status
                if rec.verb == "watch" and fault.status == 410:
                    return await self._stream(request, rec, gone=True)
                headers = (
                    {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                )
                return web.json_response(
                    _status(fault.status, _REASONS.get(fault.status, "Failure"), "injected fault"),
                    status=fault.status,
                    headers=headers,
                )
        try:
            if rec.verb == "watch":
                rec.status = 200
                return await self._stream(request, rec)
            body: Any = None
            if request.can_read_body:
                try:
                    body = json.loads(await request.read())
                except json.JSONDecodeError as exc:
                    raise _ApiError(400, f"body is not JSON: {exc}") from exc
                rec.body = copy.deepcopy(body)
            code, payload = self._serve(rec, body, request.content_type)
        except _ApiError as exc:
            rec.status = exc.code
            return web.json_response(_status(exc.code, exc.reason, str(exc)), status=exc.code)
        rec.status = code
        if answer_late_s:
            await asyncio.sleep(answer_late_s)
        return web.json_response(payload, status=code)

    def _serve(self, rec: RecordedRequest, body: Any, content_type: str) -> tuple[int, JSON]:
        g, v, r, ns, name = rec.group, rec.version, rec.resource, rec.namespace, rec.name
        if rec.verb == "list":
            items = [copy.deepcopy(o) for _, o in self._list(g, r, ns, _selector(rec))]
            return 200, {
                "kind": "List",
                "apiVersion": f"{g}/{v}" if g else v,
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        if rec.verb == "create" and r in ("tokenreviews", "subjectaccessreviews"):
            return 201, self._review(r, body)  # answered, never stored
        if rec.verb == "create":
            if not isinstance(body, dict):
                raise _ApiError(400, "create needs a JSON object")
            meta = body.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if not meta.get("name"):
                raise _ApiError(422, "metadata.name: Required value")
            if ns is not None:
                meta["namespace"] = ns
            key: Key = (g, v, r, ns, meta["name"])
            if key in self.objects:
                raise _ApiError(409, f'{r} "{meta["name"]}" already exists', "AlreadyExists")
            meta.pop("resourceVersion", None)
            return 201, self._write(key, body, None)
        assert name is not None
        key = (g, v, r, ns, name)
        current = self.objects.get(key)
        if current is None:
            raise _ApiError(404, f'{r} "{name}" not found')
        current_rv = current["metadata"]["resourceVersion"]
        if rec.verb == "get":
            return 200, copy.deepcopy(current)
        if rec.verb == "delete":
            self.delete(g, v, r, ns, name)
            return 200, _status(200, "", "deleted") | {"status": "Success"}
        if rec.verb == "update":
            if not isinstance(body, dict):
                raise _ApiError(400, "update needs a JSON object")
            new = body
        else:  # patch
            if "json-patch" in content_type:
                if not isinstance(body, list):
                    raise _ApiError(400, "a JSON patch is a list of operations")
                new = json_patch(current, body)
            elif "merge-patch" in content_type:
                if not isinstance(body, dict):
                    raise _ApiError(400, "a merge patch is a JSON object")
                new = merge_patch(current, body)
            else:
                raise _ApiError(415, f"unsupported patch type {content_type!r}")
        sent_rv = new.get("metadata", {}).get("resourceVersion")
        if rec.verb == "update" and not sent_rv:
            sent_rv = current_rv  # an update without a precondition is unconditional
        if sent_rv != current_rv:
            raise _ApiError(
                409,
                f'Operation cannot be fulfilled on {r} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )
        if rec.subresource == "status":
            new = copy.deepcopy(current) | {"status": new.get("status")}
        elif rec.subresource is not None:
            raise _ApiError(404, f"subresource {rec.subresource!r} is not emulated")
        elif "status" in current and rec.verb == "update":
            new["status"] = current["status"]  # the main resource ignores status writes
        return 200, self._write(key, new, current)

    async def _stream(
        self, request: web.Request, rec: RecordedRequest, *, gone: bool = False
    ) -> web.StreamResponse:
        selector = _selector(rec)  # a bad one is answered 400, before the stream starts
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        watcher = _Watcher(rec.group, rec.resource, rec.namespace, selector)
        since = rec.query.get("resourceVersion", "")
        if gone or (since not in ("", "0") and int(since) < self._compacted):
            watcher.queue.put_nowait(
                {
                    "type": "ERROR",
                    "object": _status(410, "Expired", f"too old resource version: {since}"),
                }
            )
            watcher.queue.put_nowait(None)
        elif since in ("", "0"):
            for _, obj in self._list(rec.group, rec.resource, rec.namespace, watcher.selector):
                watcher.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(obj)})
            self._watchers.append(watcher)
        else:
            for rv, kind, key, obj, prev in self._history:
                if rv > int(since) and (event := watcher.event(kind, key, obj, prev)) is not None:
                    watcher.queue.put_nowait(event)
            self._watchers.append(watcher)
        timeout = float(rec.query.get("timeoutSeconds", "0")) or None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                if event is None:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
        except ConnectionResetError:
            pass  # the client went away
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response
