"""Webhook notifications: promotion, rollback, failover and manual actions, with a report link.

Why: the controller acts on its own, so the people who own a service must hear about it where
they already are (Slack, Teams, Discord, Google Chat, incident tools), with one click to the
evidence. Each webhook says which shape it wants (`format`); Slack's is the default.

A notification must never hold up or fail a rollout. `Notifier.notify` only schedules a
delivery task and returns; each delivery has a per-attempt timeout and a bounded number of
attempts with exponential backoff (honouring Retry-After), and its outcome is kept as data
(`Notifier.deliveries`) and logged, never raised. `aclose()` gives in-flight deliveries a
grace period, then cancels and awaits every task it started.

Webhook URLs come from config files and, in Kubernetes, from annotations that anyone who may
edit a Deployment writes, so a post is never a way into the controller's network: redirects
are not followed (a 3xx is a failed delivery, recorded), and a host whose address (every
one it resolves to, checked by the connector's own resolver, so a DNS answer cannot change
between the check and the connection) is loopback, link-local (the cloud metadata address
169.254.169.254), unspecified or the Kubernetes API server's ($KUBERNETES_SERVICE_HOST) is
refused without a connection, unless the operator's allow-list (`allow_hosts`, the
`--allow-webhook-host` flag) names the host.

The controller feeds it record entries (`Notifier.on_entry`), so what is notified is exactly
what is recorded. `WebhookConfig` is a plain pydantic model that the controller's config and
the Kubernetes annotations embed; its `format` picks the payload's shape (Slack, Microsoft
Teams, Discord, Google Chat or the event as plain JSON: canary.notify.formats).

Exception tree::

    NotifierError       misuse: notify() outside a running event loop, or after aclose()
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from canary.core.records import EndEntry, Entry, FailoverEntry, ManualEntry, StartEntry
from canary.core.redact import redact_text, redact_url
from canary.httpio import read_prefix
from canary.notify.formats import (
    EVENT_KINDS,
    FORMATS,
    METADATA_FORMATS,
    METADATA_RULE,
    NOTIFY_KINDS,
    EventKind,
    Format,
    Notification,
    payload_for,
    slack_payload,
)
from canary.retry import RetryPolicy, retrying

__all__ = [
    "EVENT_KINDS",
    "FORMATS",
    "DeliveryResult",
    "EventKind",
    "Format",
    "GuardedResolver",
    "Notification",
    "Notifier",
    "NotifierError",
    "RefusedAddress",
    "WebhookConfig",
    "notification_for",
    "parse_webhooks",
    "refusal",
    "report_id",
    "report_url",
    "slack_payload",
]

log = logging.getLogger(__name__)

# Retry-After from a chat service can say "wait an hour"; a rollout notification that late
# is noise, so waits are capped.
_MAX_BACKOFF_S = 30.0


class NotifierError(RuntimeError):
    """The notifier was used where it cannot work."""


class RefusedAddress(OSError):
    """A webhook host resolves to an address canary does not post to (see the module doc)."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _api_server_addresses(environ: Mapping[str, str]) -> set[IPAddress]:
    found: set[IPAddress] = set()
    for key in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_PORT_443_TCP_ADDR"):
        try:
            found.add(ipaddress.ip_address(environ.get(key, "").strip("[]")))
        except ValueError:
            pass
    return found


def refusal(address: str, *, environ: Mapping[str, str] | None = None) -> str | None:
    """Why a webhook may not be posted to `address` (an IP), or None when it may."""
    try:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address (e.g. the cloud metadata service)"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip in _api_server_addresses(os.environ if environ is None else environ):
        return f"{ip} is the Kubernetes API server"
    return None


def _literal_refusal(host: str, allow: Collection[str]) -> str | None:
    """For a host that is an IP literal (the resolver never sees those): why it is refused."""
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return None  # a name: the resolver checks what it resolves to
    if bare.lower() in allow:
        return None
    return refusal(bare)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a host when any address it resolves to is refused
    (`refusal`), unless `allow` names the host. Used by the connector itself, so the checked
    addresses are the ones connected to."""

    def __init__(self, allow: Collection[str] = ()) -> None:
        self._allow = frozenset(h.lower().strip("[]") for h in allow)
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower().rstrip(".") in self._allow:
            return results
        for result in results:
            why = refusal(result["host"])
            if why is not None:
                raise RefusedAddress(
                    f"{host} resolves to {why}; not posted (see --allow-webhook-host)"
                )
        return results

    async def close(self) -> None:
        await self._inner.close()


class _Failed(Exception):
    """One delivery attempt that failed in a way worth another: 429, 5xx, no answer."""

    def __init__(self, status: int | None, error: str, *, retry_after: float | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.retry_after = retry_after


# A webhook's `metadata` (gates, and notifications in the flagger and json formats).
MAX_METADATA_KEYS = 32
MAX_METADATA_BYTES = 4096  # the whole object as JSON


def parse_metadata(value: Any) -> dict[str, str]:
    """A webhook's metadata (a gate's, or a Flagger-format notification's): a JSON object (or its text) of string values, bounded. Raises
    ValueError with the rule."""
    if isinstance(value, str):
        if len(value) > MAX_METADATA_BYTES:
            raise ValueError(f"is {len(value)} bytes of JSON; at most {MAX_METADATA_BYTES}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be a JSON object of strings: {exc.msg} at {exc.pos}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be an object of strings, got {type(value).__name__}")
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"has {len(value)} keys; at most {MAX_METADATA_KEYS}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise ValueError(
                f"{str(key)[:40]!r}: values must be strings, got {type(item).__name__}"
            )
    size = len(json.dumps(value))
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")
    return dict(value)


class WebhookConfig(BaseModel):
    """One webhook: where to post, which events, and where reports are served."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    events: frozenset[EventKind] = Field(default_factory=lambda: frozenset(NOTIFY_KINDS))
    # e.g. "https://canary.example.internal": links become {base}/reports/{id}
    report_base_url: str | None = None
    # The payload's shape: slack, teams, discord, google_chat or json (canary.notify.formats).
    format: Format = "slack"
    timeout_s: float = Field(default=5.0, gt=0, le=120)
    max_attempts: int = Field(default=4, ge=1, le=10)
    backoff_s: float = Field(default=1.0, ge=0, le=_MAX_BACKOFF_S)
    # Strings added to the payload's `metadata`, as Flagger's webhooks' (`flagger` and `json`
    # formats only: a chat message has nowhere to put them).
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("url", "report_base_url")
    @classmethod
    def _http_url(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"{info.field_name} must be an absolute http:// or https:// URL, "
                f"got {redact_url(value, keep_path=False)!r}"
            )
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower().replace("-", "_")
            if value not in FORMATS:
                raise ValueError(f"must be one of {', '.join(FORMATS)}, got {value[:40]!r}")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> dict[str, str]:
        return parse_metadata(value)

    @model_validator(mode="after")
    def _metadata_has_a_place(self) -> WebhookConfig:
        if self.metadata and self.format not in METADATA_FORMATS:
            raise ValueError(
                f"metadata {METADATA_RULE}, and this webhook's format is {self.format}"
            )
        return self

    @field_validator("events", mode="before")
    @classmethod
    def _known_events(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple | set | frozenset):
            unknown = sorted(str(v) for v in value if v not in EVENT_KINDS)
            if unknown:
                raise ValueError(
                    f"events has unknown event(s) {', '.join(unknown)}; "
                    f"known: {', '.join(NOTIFY_KINDS)}"
                )
            if not value:
                raise ValueError("events is empty: the webhook would never fire")
        return value


class DeliveryResult(BaseModel):
    """How one webhook delivery went: kept so failures are visible, never raised."""

    model_config = ConfigDict(frozen=True)

    url: str
    event: EventKind
    rollout: str
    ok: bool
    attempts: int
    status: int | None  # last HTTP status, None if no answer
    error: str | None


def parse_webhooks(value: Any, *, source: str = "webhooks") -> list[WebhookConfig]:
    """Webhooks from a config value or an annotation: a URL, a list of URLs or of webhook
    objects, or that as JSON text. Errors name `source`, the item and the field."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}: not valid JSON: {exc.msg} at {exc.pos}") from None
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{source}: expected a URL or a list of webhooks, got {value!r}")
    hooks: list[WebhookConfig] = []
    for index, item in enumerate(value):
        try:
            hook = WebhookConfig.model_validate({"url": item} if isinstance(item, str) else item)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            at = f"{source}[{index}]" + (f".{where}" if where else "")
            raise ValueError(f"{at}: {first['msg']}") from None
        if "event" in hook.events:
            raise ValueError(
                f"{source}[{index}].events: `event` (every Kubernetes Event) is sent by the "
                "Kubernetes controller alone, to a Deployment's canary.dev/webhook.event; "
                f"here the events are {', '.join(NOTIFY_KINDS)}"
            )
        hooks.append(hook)
    return hooks


def report_id(rollout: str) -> str:
    """The id a rollout's report is served under: the rollout id made URL- and file-safe."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in rollout)
    return safe.strip("._") or "rollout"


def report_url(base_url: str | None, rollout: str) -> str | None:
    if not base_url:
        return None
    return f"{base_url.rstrip('/')}/reports/{quote(report_id(rollout))}"


def notification_for(entry: Entry, *, target: str) -> Notification | None:
    """The notification a record entry calls for, if any."""
    if isinstance(entry, EndEntry):
        if entry.outcome == "superseded":
            return None
        # An abort moves traffic back to the primary, as a rollback does.
        event: EventKind = "promoted" if entry.outcome == "promoted" else "rolled_back"
        words = entry.outcome.replace("_", " ")
        return Notification(
            event=event,
            rollout=entry.rollout,
            target=target,
            title=f"{target}: {words}",
            text=entry.reason,
            at=entry.at,
            fields={"Outcome": words, "Duration": f"{entry.duration_s:.0f}s"},
        )
    if isinstance(entry, FailoverEntry):
        return Notification(
            event="failover",
            rollout=entry.rollout,
            target=target,
            title=f"{target}: failover {entry.direction}",
            text=entry.reason,
            at=entry.at,
            fields={"By": entry.who, "Forced": "yes" if entry.forced else "no"},
        )
    if isinstance(entry, ManualEntry):
        return Notification(
            event="manual",
            rollout=entry.rollout,
            target=target,
            title=f"{target}: {entry.who} ran {entry.command}",
            text=entry.reason or f"manual {entry.command}",
            at=entry.at,
            fields={"By": entry.who, "Command": entry.command},
        )
    return None


class Notifier:
    """Delivers notifications to webhooks in tracked background tasks.

    Use inside a running event loop; `await aclose()` (or `async with`) on shutdown.
    """

    def __init__(
        self,
        webhooks: Sequence[WebhookConfig],
        *,
        allow_hosts: Collection[str] = (),
        max_results: int = 200,
    ) -> None:
        self._webhooks = tuple(webhooks)
        # Hosts the operator allows to be loopback, link-local or the API server.
        self._allow = frozenset(h.lower().strip("[]") for h in allow_hosts)
        # Always our own session: its connector's resolver is the address check.
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[DeliveryResult]] = set()
        self._events_of: dict[asyncio.Task[DeliveryResult], EventKind] = {}
        self._pending_by_event: dict[EventKind, int] = {}
        self._targets: dict[str, str] = {}
        self._closed = False
        self._max_results = max_results
        self.deliveries: list[DeliveryResult] = []

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def pending_of(self, event: EventKind) -> int:
        """Deliveries of `event` in flight."""
        return self._pending_by_event.get(event, 0)

    def wants(self, event: EventKind) -> bool:
        """Whether any of its webhooks is told of `event`."""
        return any(event in hook.events for hook in self._webhooks)

    @property
    def webhooks(self) -> tuple[WebhookConfig, ...]:
        return self._webhooks

    def use(self, webhooks: Sequence[WebhookConfig]) -> None:
        """Tell these webhooks from now on (the annotations changed mid-rollout): deliveries
        in flight go on, and the rollouts' targets are kept, so nothing is lost or misnamed
        by the change (closing this notifier and making another would lose both)."""
        self._webhooks = tuple(webhooks)

    def on_entry(self, entry: Entry, *, target: str | None = None) -> int:
        """Feed every record entry here; notifies those that call for it. Returns the number
        of deliveries scheduled. `target`: what the rollout acts on, when the caller knows it
        (a resumed rollout's record may have no StartEntry to learn it from)."""
        if isinstance(entry, StartEntry):
            self._targets[entry.rollout] = entry.target
            return 0
        target = self._targets.get(entry.rollout, target or entry.rollout)
        notification = notification_for(entry, target=target)
        if isinstance(entry, EndEntry):
            self._targets.pop(entry.rollout, None)
        return self.notify(notification) if notification is not None else 0

    def notify(self, notification: Notification) -> int:
        """Schedule deliveries to every webhook subscribed to this event; never waits."""
        if self._closed:
            raise NotifierError("notify() after aclose(): the notifier is shut down")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise NotifierError("notify() needs a running event loop") from None
        scheduled = 0
        for hook in self._webhooks:
            if notification.event not in hook.events:
                continue
            payload = payload_for(
                hook.format,
                notification,
                link=report_url(hook.report_base_url, notification.rollout),
                metadata=hook.metadata,
            )
            task = asyncio.create_task(
                self._deliver(hook, notification, payload),
                name=f"webhook {notification.event} {notification.rollout}",
            )
            self._tasks.add(task)
            self._events_of[task] = notification.event
            counts = self._pending_by_event
            counts[notification.event] = counts.get(notification.event, 0) + 1
            task.add_done_callback(self._done)
            scheduled += 1
        return scheduled

    def _done(self, task: asyncio.Task[DeliveryResult]) -> None:
        self._tasks.discard(task)
        event = self._events_of.pop(task, None)
        if event is not None:
            self._pending_by_event[event] -= 1
        if task.cancelled() or task.exception() is not None:
            return
        self.deliveries.append(task.result())
        del self.deliveries[: -self._max_results]

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._allow))
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _deliver(
        self, hook: WebhookConfig, notification: Notification, payload: dict[str, Any]
    ) -> DeliveryResult:
        attempts = 0

        async def attempt() -> DeliveryResult:
            nonlocal attempts
            attempts += 1
            why = _literal_refusal(urlsplit(hook.url).hostname or "", self._allow)
            if why is not None:  # an IP literal: refused without any connection
                error = f"refused: {why}; not posted (see --allow-webhook-host)"
                return self._result(hook, notification, attempts, None, error)
            try:
                session = await self._get_session()
                async with session.post(
                    hook.url,
                    json=payload,
                    timeout=aiohttp.ClientTimeout(total=hook.timeout_s),
                    allow_redirects=False,  # a 307 would re-POST the payload elsewhere
                ) as response:
                    status = response.status
                    body = (await read_prefix(response, 4096)).decode("utf-8", "replace")[:200]
                    if 200 <= status < 300:
                        return self._result(hook, notification, attempts, status, None)
                    if 300 <= status < 400:
                        error = f"HTTP {status}: a redirect, not followed"
                        return self._result(hook, notification, attempts, status, error)
                    error = f"HTTP {status}: {body.strip()}" if body.strip() else f"HTTP {status}"
                    if status != 429 and status < 500:
                        # The receiver refused the request itself; sending it again won't help.
                        return self._result(hook, notification, attempts, status, error)
                    retry_after = _retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                raise _Failed(None, f"no answer within {hook.timeout_s}s") from None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, RefusedAddress):  # no retry: it would be refused again
                    error = f"refused: {exc.os_error}"
                    return self._result(hook, notification, attempts, None, error)
                raise _Failed(None, f"{type(exc).__name__}: {exc}") from None
            except aiohttp.ClientError as exc:
                raise _Failed(None, f"{type(exc).__name__}: {exc}") from None
            except Exception as exc:  # anything else is still a failed delivery, not a crash
                log.exception("webhook %s: unexpected error", _redact(hook.url))
                return self._result(hook, notification, attempts, None, f"{type(exc).__name__}")
            raise _Failed(status, error, retry_after=retry_after)

        try:
            return await retrying(
                attempt,
                policy=RetryPolicy(
                    attempts=hook.max_attempts,
                    wait_initial_s=hook.backoff_s,
                    wait_max_s=_MAX_BACKOFF_S,
                ),
                on=_Failed,
                retry_after=lambda failed: failed.retry_after,
                what=f"webhook {_redact(hook.url)}",
            )
        except _Failed as failed:
            return self._result(hook, notification, attempts, failed.status, failed.error)

    def _result(
        self,
        hook: WebhookConfig,
        notification: Notification,
        attempts: int,
        status: int | None,
        error: str | None,
    ) -> DeliveryResult:
        ok = error is None
        if error is not None:
            error = redact_text(error)  # a client error may quote the URL with its token
        if not ok:
            log.warning(
                "webhook %s for %s %s failed after %d attempt(s): %s",
                _redact(hook.url),
                notification.event,
                notification.rollout,
                attempts,
                error,
            )
        return DeliveryResult(
            url=_redact(hook.url),
            event=notification.event,
            rollout=notification.rollout,
            ok=ok,
            attempts=attempts,
            status=status,
            error=error,
        )

    async def wait(self, *, timeout_s: float) -> bool:
        """Wait up to timeout_s for deliveries in flight; True if none is left."""
        deadline = time.monotonic() + timeout_s
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def aclose(self, *, grace_s: float = 0.0) -> None:
        """Give deliveries `grace_s` to finish, cancel the rest, await them all, and close
        the HTTP session if this notifier opened it."""
        self._closed = True
        if grace_s > 0:
            await self.wait(timeout_s=grace_s)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: rare for webhooks; the backoff applies


def _redact(url: str) -> str:
    # Slack-style webhook URLs carry their secret in the path (or userinfo, or query): logs
    # and results get only the host.
    return redact_url(url, keep_path=False)
