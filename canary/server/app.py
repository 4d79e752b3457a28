"""The controller's small HTTP server (aiohttp): probes, metrics, state and manual commands.

Routes::

    GET  /healthz                          200 while the process serves
    GET  /readyz                           200 once this process runs the rollouts, 503 before
                                           (and, in Kubernetes, while it is not the leader)
    GET  /metrics                          the controller's Prometheus metrics (own registry)
    GET  /rollouts                         every rollout's state as JSON (`?history=1`: with
                                           each one's recent ticks, for the live page)
    GET  /rollouts/{name}                  one rollout's state (a name may be namespace/name)
    POST /rollouts/{name}/{command}        promote | abort | pause | resume (static targets);
                                           JSON body {"who": ..., "reason": ...}, both optional

A command answers 200 when accepted, 409 when the machine refused it (with its reason),
404 for an unknown rollout and 400 for an unknown command. Other parts add routes through
`extensions` (e.g. canary.reports.pages' /reports/, canary.server.live's page at /), so this
module never needs to know them; an extension may list a page in `app[PUBLIC_PAGES]` to serve
it without a token (a shell without data: what it shows, it fetches with the caller's token).

The server only reads state and queues commands: the rollout task stays the one place where
a status changes. What it shows is redacted (canary.core.redact): no URL credentials or tokens.

Who may call (canary.server.auth): the probes and /metrics are open; every other route needs
`Authorization: Bearer <token>`, decided by the mode's `Access` (a token file in static mode;
TokenReview + SubjectAccessReview in Kubernetes): a command is verb `patch` on the rollout,
a read is `get` (reads are open only with `public_reads`, never commands). Browsers are kept
out whatever the token: a request whose `Origin` is not the server's own is refused (403),
a POST must be `Content-Type: application/json` (415), and no CORS header is ever sent, so
a cross-site form post cannot reach a command. 401 carries `WWW-Authenticate: Bearer`.
When the identity is the cluster's (`Identity.authoritative`), it is the recorded `who`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from canary.core.redact import redact
from canary.core.rollout import Command
from canary.executors import run_blocking
from canary.runner import CommandResult, UnknownRollout
from canary.server.auth import Access, Denied, Identity

__all__ = [
    "COMMANDS",
    "IDENTITY",
    "OPEN_PATHS",
    "PUBLIC_PAGES",
    "Extension",
    "RolloutSource",
    "Server",
    "authenticated_who",
    "make_app",
]

log = logging.getLogger(__name__)

COMMANDS = ("promote", "abort", "pause", "resume")
_MAX_TEXT = 500  # who/reason lengths: they end up in records and Events


class _Ready(Protocol):
    def is_set(self) -> bool: ...


class _Telemetry(Protocol):
    @property
    def registry(self) -> CollectorRegistry: ...

    def exposition(self) -> bytes: ...


class RolloutSource(Protocol):
    """What the server needs of a controller (static or Kubernetes)."""

    @property
    def started(self) -> _Ready: ...

    @property
    def telemetry(self) -> _Telemetry: ...

    def states(self) -> list[dict[str, Any]]: ...

    async def command(self, name: str, command: Command) -> CommandResult: ...


Extension = Callable[[web.Application], None]

_SOURCE: web.AppKey[RolloutSource] = web.AppKey("rollouts", RolloutSource)
_READY: web.AppKey[Callable[[], bool]] = web.AppKey("ready", Callable[[], bool])  # type: ignore[arg-type]
# The caller of a guarded route, set by the guard before the handler runs.
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity", Identity)
# Open to anyone who reaches the port: the kubelet's probes and Prometheus.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Paths extensions serve to anyone: pages that hold no data themselves.
PUBLIC_PAGES: web.AppKey[set[str]] = web.AppKey("public_pages", set[str])
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(
    source: RolloutSource,
    *,
    access: Access,
    public_reads: bool = False,
    ready: Callable[[], bool] | None = None,
    extensions: Iterable[Extension] = (),
) -> web.Application:
    """The aiohttp application; each extension may add routes (e.g. /reports/), which the
    guard covers like the built-in ones. `ready` (default: the source has started) is what
    /readyz answers; `public_reads` lets GETs through without a token (commands never)."""
    app = web.Application(middlewares=[_guard(access, public_reads=public_reads)])
    app[_SOURCE] = source
    app[_READY] = ready or source.started.is_set
    app[PUBLIC_PAGES] = set()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/rollouts", _rollouts)
    # Names may hold a slash (Kubernetes "namespace/name"); the command is the last segment.
    app.router.add_get("/rollouts/{name:.+}", _rollout)
    app.router.add_post("/rollouts/{name:.+}/{command:[a-z]+}", _command)
    for extend in extensions:
        extend(app)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if request.app[_READY]():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready: starting, or not the leader\n")


def _guard(access: Access, *, public_reads: bool) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.match_info.http_exception is not None:
            return await handler(request)  # a probe, /metrics, or an unknown route (404/405)
        if request.method in ("GET", "HEAD") and request.path in request.app[PUBLIC_PAGES]:
            return await handler(request)  # a page shell: its data needs the token
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return _error(403, "cross-origin requests are refused")
        write = request.method not in ("GET", "HEAD")
        if write and request.content_type != "application/json":
            return _error(415, "a command needs Content-Type: application/json")
        if not write and public_reads:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else None
        namespace, name = _target(request.match_info.get("name"))
        try:
            identity = await access.authorize(
                bearer or None, verb="patch" if write else "get", namespace=namespace, name=name
            )
        except Denied as exc:
            log.info("%s %s refused (%d): %s", request.method, request.path, exc.status, exc)
            headers = {"WWW-Authenticate": 'Bearer realm="canary"'} if exc.status == 401 else None
            return web.json_response({"error": exc.message}, status=exc.status, headers=headers)
        request[IDENTITY] = identity
        return await handler(request)

    return guard


def _target(name: str | None) -> tuple[str | None, str | None]:
    """(namespace, name) of a rollout route's `name` ("namespace/name" in Kubernetes)."""
    if not name:
        return None, None
    namespace, _, short = name.rpartition("/")
    return namespace or None, short


async def _metrics(request: web.Request) -> web.Response:
    # Off the loop: rendering a thousand rollouts' series takes ~0.3 s (issue 13).
    body = await run_blocking("scrape", request.app[_SOURCE].telemetry.exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _states(request: web.Request) -> list[dict[str, Any]]:
    # Reasons and messages may quote a URL or an error: no credentials leave through here.
    states = request.app[_SOURCE].states()
    if request.query.get("history") != "1":  # only the live page wants every recent tick
        states = [{k: v for k, v in state.items() if k != "history"} for state in states]
    return [redact(state) for state in states]


async def _rollouts(request: web.Request) -> web.Response:
    return web.json_response({"rollouts": _states(request)})


async def _rollout(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    for state in _states(request):
        if state.get("name") == name:
            return web.json_response(state)
    return _error(404, f"no rollout named {name!r}")


async def _command(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    verb = request.match_info["command"]
    if verb not in COMMANDS:
        return _error(400, f"unknown command {verb!r}; expected one of {', '.join(COMMANDS)}")
    who, reason = "api", ""
    if request.can_read_body:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return _error(400, f"body is not JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object with optional 'who' and 'reason'")
        unknown = sorted(set(body) - {"who", "reason"})
        if unknown:
            return _error(400, f"unknown body keys {unknown}; expected 'who' and 'reason'")
        for key in ("who", "reason"):
            value = body.get(key)
            if value is not None and (not isinstance(value, str) or len(value) > _MAX_TEXT):
                return _error(400, f"{key} must be a string of at most {_MAX_TEXT} characters")
        who = body.get("who") or who
        reason = body.get("reason") or ""
    who = authenticated_who(request, who)
    try:
        result = await request.app[_SOURCE].command(name, Command(verb, who, reason))  # type: ignore[arg-type]
    except UnknownRollout:
        return _error(404, f"no rollout named {name!r}")
    payload = {
        "name": name,
        "command": verb,
        "accepted": result.accepted,
        "phase": result.phase,
        "message": result.message,
    }
    return web.json_response(payload, status=200 if result.accepted else 409)


def authenticated_who(request: web.Request, claimed: str) -> str:
    """The `who` to record for a guarded request: the cluster's name for the caller when the
    identity is authoritative (never the body's), else the caller's label."""
    identity: Identity | None = request.get(IDENTITY)
    if identity is not None and identity.authoritative:
        return identity.name
    return claimed


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Server:
    """Runs the app on host:port (port 0: a free one); `url` says where it listens."""

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:
            self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
