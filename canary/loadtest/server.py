"""The load tester's HTTP server: webhooks in, jobs out, counts on /metrics.

Routes::

    POST /          a Flagger-style webhook payload (policy.parse_payload): starts the load,
                    or extends it when the same (namespace, name, url) is running; 200 with the
                    job, 4xx {"error", "key"} naming what is wrong, 429 at --max-jobs
    GET  /jobs      the running jobs as JSON
    GET  /metrics   Prometheus text (generator.LoadMetrics)
    GET  /healthz   200 "ok"

A rollout hook calls POST / every tick, so a call is cheap and idempotent: the job's deadline
moves to now + duration, never a second generator. When a job ends (its deadline, a
post-rollout hook, SIGTERM) its task is awaited; `JobManager.aclose` cancels and awaits them
all. With `--token-file`, POST / needs `Authorization: Bearer <token>` (reads stay open).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from canary.core.redact import redact_url
from canary.loadtest.generator import GuardedResolver, Job, LoadMetrics
from canary.loadtest.policy import BadRequest, Limits, LoadRequest, TargetPolicy, parse_payload

__all__ = ["MAX_BODY_BYTES", "JobManager", "build_app", "serve"]

log = logging.getLogger("canary.loadtest")

MAX_BODY_BYTES = 64 * 1024  # a webhook payload is a few hundred bytes


class JobManager:
    """The running jobs, one per (namespace, name, url), each its own task."""

    def __init__(self, *, limits: Limits, policy: TargetPolicy, metrics: LoadMetrics) -> None:
        self.limits = limits
        self.policy = policy
        self.metrics = metrics
        self.jobs: dict[tuple[str, str, str], Job] = {}
        self._tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._running: set[asyncio.Task[None]] = set()  # every job task not yet done
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy),
                limit=self.limits.max_jobs * self.limits.max_in_flight,
                limit_per_host=0,
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def submit(self, request: LoadRequest) -> tuple[str, Job | None]:
        """Start, extend or stop the job a payload names. Returns (what happened, the job)."""
        if self._closed:
            raise BadRequest("server", "is shutting down", status=503)
        job = self.jobs.get(request.key)
        if request.action == "stop":
            if job is not None:
                # Out of the table at once: a start for the same key right after is a new job.
                del self.jobs[request.key]
                self._tasks.pop(request.key).cancel()
                self.metrics.jobs.set(len(self.jobs))
            return "stopped", job
        if job is not None:
            job.extend(request)
            return "extended", job
        if len(self.jobs) >= self.limits.max_jobs:
            raise BadRequest(
                "metadata.url",
                f"{self.limits.max_jobs} jobs are running already (--max-jobs); try again later",
                status=429,
            )
        job = Job(request, session=self._get_session(), limits=self.limits, metrics=self.metrics)
        task = asyncio.create_task(job.run(), name=f"loadtest {request.namespace}/{request.name}")
        self.jobs[request.key] = job
        self._tasks[request.key] = task
        self._running.add(task)
        self.metrics.jobs.set(len(self.jobs))
        task.add_done_callback(functools.partial(self._finished, request.key, job))
        return "started", job

    def _finished(self, key: tuple[str, str, str], job: Job, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._tasks.get(key) is task:  # not a stopped job's: that left the table already
            del self._tasks[key]
            del self.jobs[key]
            self.metrics.jobs.set(len(self.jobs))
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("load job %s/%s failed: %r", key[0], key[1], exc)
        else:
            log.info(
                "load job %s/%s ended: %d sent, %s, %d dropped",
                key[0],
                key[1],
                job.sent,
                job.outcomes,
                job.dropped,
            )

    async def aclose(self) -> None:
        """Cancel every job (stopped ones still winding down included) and await it; then
        close the HTTP session."""
        self._closed = True
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def _error(exc: BadRequest) -> web.Response:
    return web.json_response({"error": str(exc), "key": exc.key}, status=exc.status)


def build_app(manager: JobManager, *, token: str | None = None) -> web.Application:
    """The aiohttp app over `manager` (which the caller closes)."""

    async def hook(request: web.Request) -> web.Response:
        if token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                manager.metrics.webhooks.labels(result="refused").inc()
                return web.json_response(
                    {"error": "Authorization: a bearer token is required", "key": "Authorization"},
                    status=401,
                )
        try:
            try:
                raw = await request.read()  # client_max_size bounds it
            except web.HTTPRequestEntityTooLarge:
                raise BadRequest(
                    "body", f"is larger than {MAX_BODY_BYTES} bytes", status=413
                ) from None
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                raise BadRequest("body", "is not JSON") from None
            load = parse_payload(body, limits=manager.limits, policy=manager.policy)
            what, job = manager.submit(load)
        except BadRequest as exc:
            manager.metrics.webhooks.labels(result="refused").inc()
            log.warning("webhook refused: %s", exc)
            return _error(exc)
        manager.metrics.webhooks.labels(result=what).inc()
        if what != "extended":
            log.info(
                "%s load %s/%s -> %s at %g req/s",
                what,
                load.namespace,
                load.name,
                redact_url(load.url),
                load.rps,
            )
        return web.json_response({"result": what, "job": job.describe() if job else None})

    async def jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": [job.describe() for job in manager.jobs.values()]})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(manager.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/", hook)
    app.router.add_get("/jobs", jobs)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(
    *,
    host: str,
    port: int,
    limits: Limits,
    policy: TargetPolicy,
    token: str | None = None,
    ready: Callable[[str], Awaitable[None] | None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop every job (cancelled and awaited) and return."""
    manager = JobManager(limits=limits, policy=policy, metrics=LoadMetrics())
    runner = web.AppRunner(build_app(manager, token=token), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound: Any = runner.addresses[0] if runner.addresses else (host, port)
        url = f"http://{bound[0]}:{bound[1]}"
        log.info("canary loadtest serving on %s", url)
        if ready is not None:
            result = ready(url)
            if result is not None:
                await result
        await stop.wait()
        log.info("stopping: %d load jobs", len(manager.jobs))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await manager.aclose()
        await runner.cleanup()
